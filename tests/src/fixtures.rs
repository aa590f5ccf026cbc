//! Topologies several test files share: two nodes with an mTLS service between them.

use std::path::PathBuf;

use crate::{Agent, Background, ConfigBuilder, Node, Pod, Topology, assert_root};

/// Node 1 with client pods `a` and `d`, node 2 with echo server `b`; service `echo`
/// (10.96.0.10:80 -> b:8080); a CA shared by both agents.
pub struct TwoNodes {
    pub topo: Topology,
    pub n1: Node,
    pub n2: Node,
    pub a: Pod,
    pub d: Pod,
    pub b: Pod,
    pub ca_dir: PathBuf,
    _server: Background,
}

impl TwoNodes {
    /// Builds it; panics (the test fails) when the topology cannot be made.
    pub fn new(name: &str) -> TwoNodes {
        assert_root();
        let mut topo = Topology::new(name).expect("topology");
        let n1 = topo.add_node("node1").expect("node1");
        let n2 = topo.add_node("node2").expect("node2");
        topo.connect_nodes(&n1, &n2).expect("underlay");
        let a = topo.add_pod(&n1, "a").expect("pod a");
        let d = topo.add_pod(&n1, "d").expect("pod d");
        let b = topo.add_pod(&n2, "b").expect("pod b");
        let tool = crate::testtool_path().expect("mesh-testtool");
        let server = b
            .spawn_ready(tool, ["serve", "--listen", "[::]:8080", "--name", "b"])
            .expect("server");
        let ca_dir = std::env::temp_dir()
            .join(format!("mesh-test-{}", topo.id()))
            .join("ca");
        crate::agent::init_ca(&ca_dir).expect("mesh-agent ca init");
        TwoNodes {
            topo,
            n1,
            n2,
            a,
            d,
            b,
            ca_dir,
            _server: server,
        }
    }

    /// The config of the agent on `node`: every workload of both nodes, the service, the CA.
    pub fn config(&self, node: &Node, extra_agent: &[&str], policies: Option<&str>) -> String {
        let mut builder = ConfigBuilder::new(&self.topo, node)
            .agent_line(&format!(
                "caCertFile: {}",
                self.ca_dir.join("ca.crt").display()
            ))
            .agent_line(&format!(
                "caKeyFile: {}",
                self.ca_dir.join("ca.key").display()
            ));
        for line in extra_agent {
            builder = builder.agent_line(line);
        }
        builder = builder
            .workload(&self.a, &[("app", "client")], &[])
            .workload(&self.d, &[("app", "other")], &[])
            .workload(&self.b, &[("app", "echo")], &[])
            .service("echo", &["10.96.0.10"], 80, 8080, &[("app", "echo")]);
        if let Some(policies) = policies {
            builder = builder.policies(policies);
        }
        builder.build()
    }

    /// Both agents, node 1's and node 2's (with its own pin name).
    pub fn agents(&self, extra_agent: &[&str], policies: Option<&str>) -> (Agent, Agent) {
        let pin2 = format!("{}-n2", self.topo.bpf_pin_name());
        let one = Agent::start(
            &self.topo,
            &self.n1,
            &self.config(&self.n1, extra_agent, policies),
        )
        .expect("agent 1");
        let two_config = self.config(&self.n2, extra_agent, policies).replace(
            &format!("bpfName: {}\n", self.topo.bpf_pin_name()),
            &format!("bpfName: {pin2}\n"),
        );
        let two = Agent::start(&self.topo, &self.n2, &two_config).expect("agent 2");
        (one, two)
    }
}
