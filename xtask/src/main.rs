//! Project tasks. `cargo xtask --help` lists them.

mod bench;
mod command;
mod demo;
mod ebpf;
mod manifests;
mod setup;

use clap::{Parser, Subcommand};

use command::{cargo, run, workspace_root};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF programs (installs rust-src, clippy and bpf-linker when missing).
    BuildEbpf,
    /// The lint part of `test`, without root: build the eBPF programs, rustfmt check and
    /// clippy (warnings denied) on the workspace and on mesh-ebpf.
    Lint,
    /// Show the agent at work: a node with three pods on this machine, traffic through a
    /// service VIP, the agent's status; everything is removed afterwards (needs root).
    Demo,
    /// Everything CI runs: set up this machine, lint, build, and run all tests (needs root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Render deploy/kubernetes (base and overlays) and check it offline: strict Kubernetes
    /// schemas, the agent's config, the example custom resources against their CRDs (no root;
    /// installs kubectl and the Python checkers when missing).
    CheckManifests,
    /// Data-path benchmark on a two-node topology: direct, through the agent, through
    /// HAProxy (needs root); writes target/bench/results.{json,md} and latency.svg.
    Bench(bench::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::BuildEbpf => ebpf::build(),
        Task::Lint => lint(),
        Task::Demo => demo::demo(),
        Task::Test { args } => test(&args),
        Task::CheckManifests => {
            ebpf::build()?;
            manifests::check()
        }
        Task::Bench(args) => bench::run_bench(&args),
    }
}

fn test(args: &[String]) -> anyhow::Result<()> {
    setup::require_root("the tests load eBPF programs and create network namespaces")?;
    setup::machine()?;
    lint()?;
    // The end-to-end tests run this binary in the test nodes.
    run(
        cargo().args(["build", "-p", "mesh-agent"]),
        "cargo build -p mesh-agent",
    )?;
    manifests::check()?;
    run(
        cargo().args(["test", "--workspace", "--"]).args(args),
        "cargo test",
    )
}

/// Builds the eBPF object (the agent embeds it, so clippy on the workspace needs it), then
/// checks formatting and runs clippy on both workspaces.
fn lint() -> anyhow::Result<()> {
    ebpf::build()?;
    let root = workspace_root();
    run(
        cargo().args(["fmt", "--all", "--", "--check"]),
        "cargo fmt --check",
    )?;
    run(
        cargo()
            .args(["fmt", "--manifest-path"])
            .arg(root.join("mesh-ebpf/Cargo.toml"))
            .args(["--", "--check"]),
        "cargo fmt --check (mesh-ebpf)",
    )?;
    run(
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
        "cargo clippy",
    )?;
    ebpf::clippy()
}
