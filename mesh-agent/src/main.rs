//! `mesh-agent`: the node agent. See `mesh-agent --help`.

use anyhow::Context;
use clap::Parser;
use mesh_agent::{
    admin::{self, client::View},
    agent, ca, cli, config, ebpf, logging, tls, tunnel,
};

fn main() -> anyhow::Result<()> {
    let cli = cli::Cli::parse();
    // The services' lines (the agent's, the CA's) go through a writer thread: a stalled log
    // reader must not stall them. Held until main returns, which writes what is queued.
    let service = matches!(
        cli.command,
        cli::Command::Run { .. }
            | cli::Command::Ca {
                command: cli::CaCommand::Serve { .. }
            }
    );
    let _logs = logging::init(cli.log_format, service);
    // Checking a file needs nothing else: no runtime, no privilege.
    if let cli::Command::Config {
        command: cli::ConfigCommand::Check { file, source },
    } = &cli.command
    {
        match config::check(file, source.config_scope()) {
            Ok(summary) => {
                println!("{summary}");
                return Ok(());
            }
            Err(error) => {
                eprintln!("{error}");
                std::process::exit(1);
            }
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        cli::Command::Run {
            config,
            cgroup,
            node,
            source,
        } => runtime.block_on(agent::run(&config, cgroup, node, source)),
        cli::Command::Status { view, admin, json } => {
            let view = match view {
                None => View::Overview,
                Some(cli::StatusView::Pods) => View::Pods,
                Some(cli::StatusView::Services) => View::Services,
                Some(cli::StatusView::Connections { limit }) => View::Connections {
                    limit: limit as usize,
                },
                Some(cli::StatusView::Certificates) => View::Certificates,
            };
            match runtime.block_on(admin::client::show(admin, view, json)) {
                Ok(text) => {
                    // A closed pipe (`| head`) is the reader's choice, not an error.
                    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
                    Ok(())
                }
                Err(error) => {
                    eprintln!("mesh-agent status: {error}");
                    std::process::exit(1);
                }
            }
        }
        cli::Command::Probe {
            check,
            admin,
            timeout_ms,
            agent_pid,
        } => {
            let timeout = std::time::Duration::from_millis(timeout_ms);
            let probe = admin::probe::check(admin, check.path(), timeout, agent_pid);
            match runtime.block_on(probe) {
                Ok(line) => {
                    println!("{line}");
                    Ok(())
                }
                Err(line) => {
                    println!("{line}");
                    std::process::exit(1);
                }
            }
        }
        cli::Command::Uninstall { name } => {
            // The development CA, if the agent made one (/run/mesh-agent/<name>).
            if let Some(state) = tunnel::dev_ca_dir(&name).parent() {
                let _ = std::fs::remove_dir_all(state);
            }
            let root = ebpf::pin_root(&name);
            if ebpf::uninstall(&name)? {
                println!("removed {}", root.display());
            } else {
                println!("nothing pinned at {}", root.display());
            }
            Ok(())
        }
        // Handled above, before the runtime.
        cli::Command::Config { .. } => Ok(()),
        cli::Command::Ca { command } => runtime.block_on(ca_command(command)),
    }
}

async fn ca_command(command: cli::CaCommand) -> anyhow::Result<()> {
    match command {
        cli::CaCommand::Init {
            dir,
            trust_domain,
            days,
            parent,
            force,
        } => {
            let (cert, key) = match parent {
                Some(parent) => {
                    tls::init_intermediate_ca(&parent, &dir, &trust_domain, days, force)?
                }
                None => tls::init_dev_ca(&dir, &trust_domain, days, force)?,
            };
            println!("wrote {} and {}", cert.display(), key.display());
        }
        cli::CaCommand::Serve {
            dir,
            config,
            kubernetes,
            trust_domain,
            agent_service_account,
            listen,
            trust_roots,
            max_lifetime_minutes,
            rate_per_node,
            burst_per_node,
        } => {
            let limits = ca::Limits {
                max_lifetime: std::time::Duration::from_secs(max_lifetime_minutes * 60),
                per_node_rate: std::num::NonZeroU32::new(rate_per_node)
                    .context("--rate-per-node must be at least 1")?,
                per_node_burst: std::num::NonZeroU32::new(burst_per_node)
                    .context("--burst-per-node must be at least 1")?,
                ..ca::Limits::default()
            };
            let mode = match config {
                Some(config) if !kubernetes => ca::Mode::Local {
                    config,
                    trust_roots,
                },
                _ => {
                    let agent_service_account =
                        agent_service_account.unwrap_or_else(|| "mesh-system/mesh-agent".into());
                    let (namespace, name) = agent_service_account
                        .split_once('/')
                        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'))
                        .context("--agent-service-account must be NAMESPACE/NAME")?;
                    ca::Mode::Kubernetes {
                        trust_domain: trust_domain.unwrap_or_else(|| "cluster.local".into()),
                        token: ca::TokenOptions {
                            agent_namespace: namespace.to_owned(),
                            agent_service_account: name.to_owned(),
                            ..ca::TokenOptions::default()
                        },
                    }
                }
            };
            ca::serve(ca::ServeOptions {
                ca_dir: dir,
                mode,
                listen,
                limits,
            })
            .await?;
        }
        cli::CaCommand::IssueNode {
            dir,
            node,
            trust_domain,
            days,
            out,
            force,
        } => {
            let (cert, key) = ca::issue_node(&dir, &trust_domain, &node, days, &out, force)?;
            println!("wrote {} and {}", cert.display(), key.display());
        }
    }
    Ok(())
}
