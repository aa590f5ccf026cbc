//! `cargo xtask demo`: the agent at work on this machine, on the shipped example config
//! (deploy/examples/local.yaml): one node, a client pod and two echo server pods as network
//! namespaces, traffic through the `echo` service VIP, then `mesh-agent status`.

use std::{fs, path::PathBuf};

use anyhow::{Context, bail};
use mesh_tests::{Agent, Topology, parse_id_reply};

use crate::{
    command::{cargo, run, target_dir, workspace_root},
    ebpf, setup,
};

const VIP: &str = "10.96.0.10:80";

// Unsafe: `std::env::set_var` (it tells mesh-tests where the freshly built agent is).
#[allow(unsafe_code)]
pub fn demo() -> anyhow::Result<()> {
    setup::require_root("the demo loads eBPF programs and creates network namespaces")?;
    setup::machine()?;
    ebpf::build()?;
    run(
        cargo().args([
            "build",
            "--quiet",
            "-p",
            "mesh-agent",
            "-p",
            "mesh-tests",
            "--bins",
        ]),
        "building the agent",
    )?;
    let bin_dir = target_dir().join("debug");
    // SAFETY: single-threaded here, before anything reads the environment concurrently.
    unsafe {
        std::env::set_var("MESH_AGENT_BIN", bin_dir.join("mesh-agent"));
    }
    let tool = bin_dir.join("mesh-testtool");

    let mut topo = Topology::new("demo")?;
    let node = topo.add_node("node-a")?;
    let client = topo.add_pod(&node, "client")?;
    let servers = [
        topo.add_pod(&node, "server-1")?,
        topo.add_pod(&node, "server-2")?,
    ];
    let _serving = servers
        .iter()
        .map(|pod| {
            pod.spawn_ready(
                &tool,
                ["serve", "--listen", "[::]:8080", "--name", pod.name()],
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    step(&format!(
        "node-a: pods client {}, server-1 {}, server-2 {} (echo servers on :8080)",
        client.ipv4(),
        servers[0].ipv4(),
        servers[1].ipv4()
    ));

    let config = example_config(&topo, [&client, &servers[0], &servers[1]])?;
    step("starting mesh-agent with deploy/examples/local.yaml (netns paths of this run)");
    let agent = Agent::start(&topo, &node, &config)?;

    step(&format!(
        "client -> service echo at {VIP}, six new connections"
    ));
    for _ in 0..6 {
        let out = client.run(&tool, ["id", "--connect", VIP])?;
        let (server, seen_as) = parse_id_reply(&String::from_utf8_lossy(&out.stdout))?;
        println!("    answered by {server:<9} (which saw the connection from {seen_as})");
    }
    step("client -> echo: 64 MiB echoed back, checked byte for byte");
    let out = client.run(
        &tool,
        [
            "echo",
            "--connect",
            VIP,
            "--bytes",
            &(64u64 << 20).to_string(),
        ],
    )?;
    println!(
        "    {} bytes intact",
        String::from_utf8_lossy(&out.stdout).trim()
    );

    step("mesh-agent status");
    print!("{}", agent.status_table()?);
    step("done: stopping the agent, removing its pins, namespaces and cgroups");
    Ok(())
}

/// The shipped example with this run's namespace paths, cgroup and pin name.
fn example_config(topo: &Topology, pods: [&mesh_tests::Pod; 3]) -> anyhow::Result<String> {
    let path: PathBuf = workspace_root().join("deploy/examples/local.yaml");
    let mut config =
        fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    for pod in pods {
        let shipped = format!("netns: /var/run/netns/{}\n", pod.name());
        if !config.contains(&shipped) {
            bail!("{} no longer has `{}`", path.display(), shipped.trim());
        }
        config = config.replace(
            &shipped,
            &format!("netns: {}\n", pod.netns_path().display()),
        );
    }
    Ok(config.replace(
        "  bpfName: mesh\n",
        &format!(
            "  bpfName: {}\n  cgroup: {}\n",
            topo.bpf_pin_name(),
            topo.cgroup_root().display()
        ),
    ))
}

fn step(text: &str) {
    println!("\n==> {text}");
}
