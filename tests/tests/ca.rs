//! The certificate authority off the nodes, end to end: a `mesh-agent ca serve` process (in
//! node 1's network namespace, on its underlay address) holding an intermediate CA key, and
//! one agent per node holding only the root and its node certificate. Direct requests to the
//! CA are made as a node would make them — the agent's own client, real mutual TLS — from a
//! thread inside the node's network namespace.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use http::{Method, StatusCode};
use mesh_agent::tls::{
    Answer, CaError, ControlId, LocalCa, NodeCredential, RemoteSigner, RemoteSignerOptions, Signer,
    SpiffeId, TrustBundle, ca_api, pem_certificate,
};
use mesh_tests::{Agent, ConfigBuilder, Node, Pod, Topology, agent::agent_path, assert_root};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};

const TOOL: &str = env!("CARGO_BIN_EXE_mesh-testtool");
const VIP: &str = "10.96.0.10:80";
const CA_PORT: u16 = 15012;
const LIFETIME: Duration = Duration::from_secs(600);

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "test", sa).expect("identity")
}

/// Node 1 with client pod `a`, node 2 with echo server `b`; a root, an intermediate (the CA's
/// key) and a node certificate for each node, in the test's directory.
struct Mesh {
    topo: Topology,
    n1: Node,
    n2: Node,
    a: Pod,
    b: Pod,
    dir: PathBuf,
    _server: mesh_tests::Background,
}

impl Mesh {
    fn new(name: &str) -> Mesh {
        assert_root();
        let mut topo = Topology::new(name).expect("topology");
        let n1 = topo.add_node("node1").expect("node1");
        let n2 = topo.add_node("node2").expect("node2");
        topo.connect_nodes(&n1, &n2).expect("underlay");
        let a = topo.add_pod(&n1, "a").expect("pod a");
        let b = topo.add_pod(&n2, "b").expect("pod b");
        let server = b
            .spawn_ready(TOOL, ["serve", "--listen", "[::]:8080", "--name", "b"])
            .expect("server");
        let dir = std::env::temp_dir().join(format!("mesh-test-{}", topo.id()));
        let mesh = Mesh {
            topo,
            n1,
            n2,
            a,
            b,
            dir,
            _server: server,
        };
        mesh.ca_cli(&["init", "--dir", &mesh.path("root")]);
        mesh.ca_cli(&[
            "init",
            "--dir",
            &mesh.path("intermediate"),
            "--parent",
            &mesh.path("root"),
        ]);
        for node in ["node1", "node2"] {
            mesh.ca_cli(&[
                "issue-node",
                "--dir",
                &mesh.path("intermediate"),
                "--node",
                node,
                "--out",
                &mesh.path(node),
            ]);
        }
        fs::write(mesh.dir.join("ca.yaml"), mesh.placement("node2")).expect("CA config");
        mesh
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn ca_cli(&self, args: &[&str]) {
        let out = Command::new(agent_path().expect("agent binary"))
            .arg("ca")
            .args(args)
            .output()
            .expect("mesh-agent ca");
        assert!(
            out.status.success(),
            "mesh-agent ca {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The CA's address: node 1's underlay address.
    fn ca_addr(&self) -> String {
        format!("{}:{CA_PORT}", self.n1.underlay_ipv4())
    }

    /// The mesh configuration as the CA reads it, with `b` placed on `b_node`.
    fn placement(&self, b_node: &str) -> String {
        ConfigBuilder::new(&self.topo, &self.n1)
            .workload(&self.a, &[("app", "client")], &[])
            .workload(&self.b, &[("app", "echo")], &[])
            .service("echo", &["10.96.0.10"], 80, 8080, &[("app", "echo")])
            .build()
            .replace("    node: node2\n", &format!("    node: {b_node}\n"))
    }

    /// Starts `mesh-agent ca serve` in node 1 and waits until it answers node 1.
    fn start_ca(&self, extra: &[&str]) -> CaProcess {
        let child = self
            .n1
            .command(agent_path().expect("agent binary"))
            .args(["ca", "serve", "--dir", &self.path("intermediate")])
            .args([
                "--config",
                &self.path("ca.yaml"),
                "--listen",
                &self.ca_addr(),
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .expect("mesh-agent ca serve");
        let ca = CaProcess { child };
        let client = self.client("node1");
        let deadline = Instant::now() + Duration::from_secs(10);
        while in_netns(&self.n1, || block_on(client.check())).is_err() {
            assert!(
                Instant::now() < deadline,
                "the CA did not answer within 10 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        ca
    }

    /// A node's client of the CA, with that node's certificate (or `cert_dir`'s).
    fn client(&self, node: &str) -> RemoteSigner {
        self.client_with(node, &self.dir.join(node))
    }

    fn client_with(&self, node: &str, cert_dir: &Path) -> RemoteSigner {
        RemoteSigner::new(RemoteSignerOptions {
            address: self.ca_addr(),
            trust_domain: "cluster.local".into(),
            node: node.into(),
            credential: NodeCredential::Certificate {
                cert_file: cert_dir.join("node.crt"),
                key_file: cert_dir.join("node.key"),
            },
            bundle: TrustBundle::from_pem_files(&[self.dir.join("root/ca.crt")]).expect("bundle"),
            request_timeout: Duration::from_secs(5),
        })
        .expect("CA client")
    }

    /// The agent config of `node`: the root only, the CA's address, the node certificate.
    fn agent_config(&self, node: &Node, pin: &str) -> String {
        let certs = self.dir.join(node.name());
        ConfigBuilder::new(&self.topo, node)
            .agent_line(&format!("trustRootFiles: [{}]", self.path("root/ca.crt")))
            .agent_line("ca:")
            .agent_line(&format!("  address: \"{}\"", self.ca_addr()))
            .agent_line(&format!(
                "  nodeCertFile: {}",
                certs.join("node.crt").display()
            ))
            .agent_line(&format!(
                "  nodeKeyFile: {}",
                certs.join("node.key").display()
            ))
            .agent_line("  checkIntervalMs: 300")
            .workload(&self.a, &[("app", "client")], &[])
            .workload(&self.b, &[("app", "echo")], &[])
            .service("echo", &["10.96.0.10"], 80, 8080, &[("app", "echo")])
            .build()
            .replace(
                &format!("bpfName: {}\n", self.topo.bpf_pin_name()),
                &format!("bpfName: {pin}\n"),
            )
    }
}

/// The CA process; killed on drop.
struct CaProcess {
    child: Child,
}

impl CaProcess {
    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for CaProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `f` on a thread inside `node`'s network namespace (the test's own threads stay put).
fn in_netns<T: Send>(node: &Node, f: impl FnOnce() -> T + Send) -> T {
    let netns = fs::File::open(node.netns_path()).expect("node netns");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("entering the node netns");
                f()
            })
            .join()
            .expect("netns thread")
    })
}

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

fn spki() -> Vec<u8> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .expect("key")
        .subject_public_key_info()
}

/// `node`'s client asks for `identity`.
fn sign(node: &Node, client: &RemoteSigner, identity: &SpiffeId) -> Result<(), CaError> {
    in_netns(node, || block_on(client.sign(identity, &spki(), LIFETIME))).map(|_| ())
}

/// An oversize request is refused: answered `413`, or, when the CA closes the connection
/// before the client has written its whole body (a race the client can lose), the write fails
/// with the connection closed under it. Never anything else.
fn refused_as_too_large(result: &Result<Answer, CaError>) -> bool {
    match result {
        Ok((status, _)) => *status == StatusCode::PAYLOAD_TOO_LARGE,
        Err(CaError::Unavailable(reason)) => {
            reason.contains("Broken pipe") || reason.contains("reset by peer")
        }
        Err(_) => false,
    }
}

fn certificates(agent: &Agent) -> Vec<String> {
    let status = agent.status().expect("status");
    let mut ids: Vec<String> = status["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .map(|c| c["identity"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    ids
}

fn wait_for(what: &str, timeout: Duration, done: impl FnMut() -> bool) {
    assert!(
        mesh_tests::wait_until(timeout, done),
        "{what} within {timeout:?}"
    );
}

#[test]
fn agents_get_their_own_pods_certificates_from_the_ca_and_keep_serving_without_it() {
    let mesh = Mesh::new("ca_agents");
    let mut ca = mesh.start_ca(&[]);
    let pin = mesh.topo.bpf_pin_name();
    let one =
        Agent::start(&mesh.topo, &mesh.n1, &mesh.agent_config(&mesh.n1, &pin)).expect("agent 1");
    let pin2 = format!("{pin}-n2");
    let two =
        Agent::start(&mesh.topo, &mesh.n2, &mesh.agent_config(&mesh.n2, &pin2)).expect("agent 2");

    // Each agent holds the certificates of its own pods, and no other.
    assert_eq!(certificates(&one), [id("a").to_string()]);
    assert_eq!(certificates(&two), [id("b").to_string()]);
    let status = one.status().expect("status");
    assert_eq!(status["ca"]["mode"], "remote");
    assert_eq!(status["ca"]["address"], mesh.ca_addr().as_str());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let expiry = status["certificates"][0]["notAfter"]
        .as_u64()
        .expect("notAfter");
    assert!(
        expiry > now + 3600,
        "a day's certificate: {expiry} vs now {now}"
    );
    wait_for(
        "agent 1 sees the CA reachable",
        Duration::from_secs(5),
        || one.status().expect("status")["ca"]["reachable"] == true,
    );
    assert!(
        one.metric("mesh_ca_requests_total", &[("outcome", "issued")])
            .expect("metrics")
            >= 1.0
    );
    assert_eq!(one.metric("mesh_ca_reachable", &[]).expect("metrics"), 1.0);

    // No CA key on the nodes: none configured, and no development CA made.
    for (agent, pin) in [(&one, &pin), (&two, &pin2)] {
        let config = fs::read_to_string(agent.config_path()).expect("agent config");
        assert!(!config.contains("caKeyFile") && !config.contains("caCertFile"));
        let dev_ca = mesh_agent::tunnel::dev_ca_dir(pin);
        assert!(!dev_ca.exists(), "{} exists", dev_ca.display());
    }

    // Cross-node traffic with certificates issued this way: mutual TLS, a's identity seen.
    let (name, _) = mesh.a.id(VIP).expect("a reaches b");
    assert_eq!(name, "b");
    let mtls = |agent: &Agent, direction: &str| {
        agent
            .metric_sum(
                "mesh_connections_total",
                &[
                    ("direction", direction),
                    ("security", "mutual_tls"),
                    ("outcome", "closed"),
                ],
            )
            .expect("metrics")
    };
    wait_for(
        "both agents count the mTLS connection",
        Duration::from_secs(5),
        || mtls(&one, "outbound") == 1.0 && mtls(&two, "tunnel") == 1.0,
    );

    // Node 1 asking for b's identity (placed on node 2) is refused, and the CA says why.
    match sign(&mesh.n1, &mesh.client("node1"), &id("b")) {
        Err(CaError::Refused(reason)) => {
            assert!(
                reason.contains("403") && reason.contains("node node1"),
                "{reason}"
            )
        }
        other => panic!("node 1 got b's identity: {other:?}"),
    }

    // The CA stops: the agents say so, and what they hold keeps working.
    ca.stop();
    wait_for(
        "agent 1 reports the CA unreachable",
        Duration::from_secs(10),
        || one.status().expect("status")["ca"]["reachable"] == false,
    );
    assert_eq!(one.metric("mesh_ca_reachable", &[]).expect("metrics"), 0.0);
    let table = one.status_table().expect("status table");
    assert!(table.contains("UNREACHABLE"), "{table}");
    for _ in 0..3 {
        let (name, _) = mesh.a.id(VIP).expect("a still reaches b");
        assert_eq!(name, "b");
    }
    assert_eq!(certificates(&one), [id("a").to_string()]);
}

#[test]
fn placement_follows_a_moved_pod_and_bad_node_certificates_are_refused() {
    let mesh = Mesh::new("ca_placement");
    let _ca = mesh.start_ca(&[]);
    let (c1, c2) = (mesh.client("node1"), mesh.client("node2"));
    sign(&mesh.n1, &c1, &id("a")).expect("a is on node 1");
    sign(&mesh.n2, &c2, &id("b")).expect("b is on node 2");
    assert!(matches!(
        sign(&mesh.n2, &c2, &id("a")),
        Err(CaError::Refused(_))
    ));
    assert!(matches!(
        sign(&mesh.n1, &c1, &id("b")),
        Err(CaError::Refused(_))
    ));
    assert!(
        matches!(sign(&mesh.n1, &c1, &id("nobody")), Err(CaError::Refused(_))),
        "an identity no pod runs as"
    );

    // b moves to node 1 (the CA's config changes; it reloads).
    let moved = mesh.dir.join("ca.yaml.new");
    fs::write(&moved, mesh.placement("node1")).expect("write");
    fs::rename(&moved, mesh.dir.join("ca.yaml")).expect("rename");
    wait_for("the CA issues b to node 1", Duration::from_secs(10), || {
        sign(&mesh.n1, &c1, &id("b")).is_ok()
    });
    assert!(matches!(
        sign(&mesh.n2, &c2, &id("b")),
        Err(CaError::Refused(_))
    ));

    // Node certificates the CA must refuse at the handshake: expired, and of another CA.
    let node1 = ControlId::node("cluster.local", "node1").expect("node id");
    let intermediate = LocalCa::load_dir(&mesh.dir.join("intermediate")).expect("CA");
    let past = SystemTime::now() - Duration::from_secs(7200);
    let expired = write_node_cert(&mesh.dir.join("expired"), |key| {
        intermediate.sign_control_valid(&node1, key, past, past + Duration::from_secs(60))
    });
    mesh.ca_cli(&["init", "--dir", &mesh.path("other")]);
    let other = LocalCa::load_dir(&mesh.dir.join("other")).expect("other CA");
    let foreign = write_node_cert(&mesh.dir.join("foreign"), |key| {
        other.sign_control_now(&node1, key, LIFETIME)
    });
    for (what, dir) in [("expired", expired), ("of another CA", foreign)] {
        let client = mesh.client_with("node1", &dir);
        match sign(&mesh.n1, &client, &id("a")) {
            Err(CaError::Unavailable(reason)) => {
                assert!(reason.contains("alert"), "{what}: {reason}")
            }
            other => panic!("a node certificate {what} was accepted: {other:?}"),
        }
    }
}

/// Writes `dir/node.crt` (the chain `sign` makes for a new key) and `dir/node.key`.
fn write_node_cert(
    dir: &Path,
    sign: impl FnOnce(&[u8]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, CaError>,
) -> PathBuf {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let chain = sign(&key.subject_public_key_info()).expect("sign");
    fs::create_dir_all(dir).expect("dir");
    let pem: String = chain.iter().map(pem_certificate).collect();
    fs::write(dir.join("node.crt"), pem).expect("cert");
    fs::write(dir.join("node.key"), key.serialize_pem()).expect("key");
    dir.to_owned()
}

#[test]
fn garbage_oversize_and_a_flood_from_one_node_do_not_starve_another() {
    let mesh = Mesh::new("ca_flood");
    let mut ca = mesh.start_ca(&["--rate-per-node", "5", "--burst-per-node", "5"]);
    let addr = mesh.ca_addr();
    let c2 = mesh.client("node2");
    // Node 2 asks three times while node 1 misbehaves: all three are served.
    let node2_meanwhile = |after: Duration| {
        std::thread::sleep(after);
        (0..3)
            .filter(|_| sign(&mesh.n2, &c2, &id("b")).is_ok())
            .count()
    };

    // Garbage, and a hundred clients that connect and say nothing (node 1 holds at most 8
    // handshake slots, each until the CA's handshake timeout).
    let served = std::thread::scope(|scope| {
        let misbehave = scope.spawn(|| {
            in_netns(&mesh.n1, || {
                block_on(async {
                    use tokio::io::AsyncWriteExt;
                    let mut garbage = tokio::net::TcpStream::connect(&addr)
                        .await
                        .expect("connect");
                    garbage.write_all(&[0x16; 65536]).await.ok();
                    let mut silent = Vec::new();
                    for _ in 0..100 {
                        if let Ok(stream) = tokio::net::TcpStream::connect(&addr).await {
                            silent.push(stream);
                        }
                    }
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    silent.len()
                })
            })
        });
        let served = node2_meanwhile(Duration::from_millis(300));
        assert!(misbehave.join().expect("garbage thread") > 0);
        served
    });
    assert_eq!(served, 3, "node 2 was served while node 1 sent garbage");

    // An oversize request, then a flood of 320 signing requests, eight at a time.
    let (statuses, served) = std::thread::scope(|scope| {
        let flood = scope.spawn(|| {
            in_netns(&mesh.n1, || {
                block_on(async {
                    let c1 = Arc::new(mesh.client("node1"));
                    for size in [20 << 10, 1 << 20] {
                        let oversize = Bytes::from(vec![b' '; size]);
                        let result = c1.exchange(Method::POST, ca_api::SIGN_PATH, oversize).await;
                        assert!(
                            refused_as_too_large(&result),
                            "{size} bytes: {:?}",
                            result.as_ref().map(|(status, _)| status)
                        );
                    }
                    let tasks: Vec<_> = (0..8)
                        .map(|_| {
                            let c1 = c1.clone();
                            tokio::spawn(async move {
                                let mut statuses = Vec::new();
                                for _ in 0..40 {
                                    let body = Bytes::from_static(b"{\"garbage\": true}");
                                    if let Ok((status, _)) =
                                        c1.exchange(Method::POST, ca_api::SIGN_PATH, body).await
                                    {
                                        statuses.push(status);
                                    }
                                }
                                statuses
                            })
                        })
                        .collect();
                    let mut statuses = Vec::new();
                    for task in tasks {
                        statuses.extend(task.await.expect("flood task"));
                    }
                    statuses
                })
            })
        });
        let served = node2_meanwhile(Duration::from_millis(50));
        (flood.join().expect("flood thread"), served)
    });
    let limited = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert!(
        limited >= 200,
        "node 1 was held to its rate: {limited} of {} limited",
        statuses.len()
    );
    assert_eq!(served, 3, "node 2 was served during node 1's flood");
    assert!(ca.is_running(), "the CA survived");
    sign(&mesh.n2, &c2, &id("b")).expect("node 2 is served after it all");
}

#[test]
fn an_agent_started_before_the_ca_gets_its_certificates_once_the_ca_is_up() {
    let mesh = Mesh::new("ca_late");
    let pin = format!("{}-n2", mesh.topo.bpf_pin_name());
    let two = Agent::start(&mesh.topo, &mesh.n2, &mesh.agent_config(&mesh.n2, &pin))
        .expect("agent 2 starts without its CA");
    let status = two.status().expect("status");
    assert_eq!(certificates(&two), Vec::<String>::new());
    assert!(
        status["ca"]["unavailable"].as_u64() >= Some(1),
        "{}",
        status["ca"]
    );
    wait_for(
        "agent 2 reports the CA unreachable",
        Duration::from_secs(5),
        || two.status().expect("status")["ca"]["reachable"] == false,
    );
    assert_eq!(two.metric("mesh_enrolled_pods", &[]).expect("metrics"), 0.0);

    let _ca = mesh.start_ca(&[]);
    // The enrollment holds the pods' lock while it waits for its certificate, and the status
    // reads them: statuses from two more threads all along (an operator and a monitoring
    // loop) must each be answered, and must not stall the enrollment's own wait.
    let enrolled = std::sync::atomic::AtomicBool::new(false);
    let answered = std::thread::scope(|scope| {
        let poll = || {
            let started = Instant::now();
            let mut answered = 0;
            while !enrolled.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(30)
            {
                two.status().expect("a status while b enrolls");
                answered += 1;
            }
            answered
        };
        let pollers = [scope.spawn(poll), scope.spawn(poll)];
        wait_for(
            "agent 2 enrolls b with a certificate",
            Duration::from_secs(20),
            || certificates(&two) == [id("b").to_string()],
        );
        enrolled.store(true, std::sync::atomic::Ordering::Relaxed);
        pollers.map(|poller| poller.join().expect("a status poller failed"))
    });
    assert!(
        answered.iter().all(|n| *n >= 1),
        "statuses answered: {answered:?}"
    );
    assert_eq!(two.metric("mesh_enrolled_pods", &[]).expect("metrics"), 1.0);
    assert_eq!(two.status().expect("status")["ca"]["reachable"], true);
}

#[test]
fn a_failed_rotation_keeps_the_current_certificate_and_is_retried_when_the_ca_is_back() {
    let mesh = Mesh::new("ca_rotation");
    let mut ca = mesh.start_ca(&[]);
    // One-minute certificates: rotation is due after about 30 s. Idle tunnels close at once,
    // so each connection below makes a new TLS handshake with the certificates held then.
    let short = |config: String| {
        config.replace(
            "    checkIntervalMs: 300\n",
            "    checkIntervalMs: 300\n  certLifetimeMinutes: 1\n  tunnelIdleTimeoutMs: 100\n",
        )
    };
    let pin = mesh.topo.bpf_pin_name();
    let _one = Agent::start(
        &mesh.topo,
        &mesh.n1,
        &short(mesh.agent_config(&mesh.n1, &pin)),
    )
    .expect("agent 1");
    let pin2 = format!("{pin}-n2");
    let two = Agent::start(
        &mesh.topo,
        &mesh.n2,
        &short(mesh.agent_config(&mesh.n2, &pin2)),
    )
    .expect("agent 2");
    let certificate = || two.status().expect("status")["certificates"][0].clone();
    let issued = certificate();
    let lifetime = issued["notAfter"]
        .as_u64()
        .zip(issued["notBefore"].as_u64());
    assert!(
        lifetime.is_some_and(|(end, start)| end - start <= 66),
        "a one-minute certificate (give or take the skew): {issued}"
    );

    ca.stop();
    wait_for(
        "agent 2 tries to rotate without the CA",
        Duration::from_secs(50),
        || two.status().expect("status")["ca"]["unavailable"].as_u64() >= Some(1),
    );
    assert_eq!(
        certificate()["serial"],
        issued["serial"],
        "the current certificate stays"
    );
    let (name, _) = mesh.a.id(VIP).expect("a still reaches b");
    assert_eq!(name, "b");

    let _ca = mesh.start_ca(&[]);
    wait_for(
        "the retried rotation succeeds",
        Duration::from_secs(25),
        || certificate()["serial"] != issued["serial"],
    );
    let (name, _) = mesh.a.id(VIP).expect("a reaches b");
    assert_eq!(name, "b");
}
