//! `mesh-agent`: the node agent. See `mesh-agent --help`.

use std::io::IsTerminal;

use clap::Parser;
use mesh_agent::{admin, agent, cli, ebpf};

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        cli::Command::Run { config, cgroup } => runtime.block_on(agent::run(&config, cgroup)),
        cli::Command::Status { admin, json } => runtime.block_on(admin::status::print(admin, json)),
        cli::Command::Uninstall { name } => {
            let root = ebpf::pin_root(&name);
            if ebpf::uninstall(&name)? {
                println!("removed {}", root.display());
            } else {
                println!("nothing pinned at {}", root.display());
            }
            Ok(())
        }
    }
}
