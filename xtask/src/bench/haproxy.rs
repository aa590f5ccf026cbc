//! The HAProxy reference path: an L4 proxy pair with mutual TLS between the nodes.
//!
//! client pod -> haproxy in the client node (plain TCP, on the pod bridge address)
//!   == TLS 1.3, both sides present and verify the bench certificate ==>
//! haproxy in the server node (on its underlay address) -> server pod (plain TCP).
//!
//! The certificate is a throw-away self-signed P-256 one made by openssl at bench time.

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, Result};
use mesh_tests::Node;

use crate::command::run;

/// The name the certificate carries and the client side checks.
const SERVER_NAME: &str = "bench.mesh.local";

/// Installs the Debian package when `haproxy` is not on PATH.
pub fn ensure_installed() -> Result<PathBuf> {
    if let Some(path) = which("haproxy") {
        return Ok(path);
    }
    eprintln!("installing haproxy (apt-get)");
    run(
        Command::new("apt-get").args(["update", "-q"]),
        "apt-get update",
    )?;
    run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends", "haproxy"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        "apt-get install haproxy",
    )?;
    which("haproxy").context("haproxy is still not on PATH after apt-get install")
}

fn which(command: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join(command))
        .find(|p| p.is_file())
}

/// Writes `cert.pem` (certificate, also the CA) and `bundle.pem` (certificate + key) in `dir`.
fn make_certificate(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let bundle = dir.join("bundle.pem");
    run(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec"])
            .args([
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
            ])
            .arg("-subj")
            .arg(format!("/CN={SERVER_NAME}"))
            .arg("-addext")
            .arg(format!("subjectAltName=DNS:{SERVER_NAME}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "openssl req (bench certificate)",
    )?;
    let mut pem = fs::read(&cert)?;
    pem.extend(fs::read(&key)?);
    fs::write(&bundle, pem)?;
    Ok((cert, bundle))
}

const COMMON: &str = "global\n  maxconn 8000\n  log stderr format short local0 warning\n\
defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n";

/// The two running haproxy processes; killed when dropped.
pub struct HaproxyPair {
    children: Vec<Child>,
    /// Where client pods connect.
    pub front: SocketAddr,
}

impl HaproxyPair {
    /// `front` (in `client_node`) forwards over TLS to `tls_listen` (in `server_node`),
    /// which forwards to `backend`. Files go to `dir`.
    pub fn start(
        bin: &Path,
        dir: &Path,
        client_node: &Node,
        server_node: &Node,
        front: SocketAddr,
        tls_listen: SocketAddr,
        backend: SocketAddr,
    ) -> Result<Self> {
        fs::create_dir_all(dir)?;
        let (cert, bundle) = make_certificate(dir)?;
        let client_cfg = format!(
            "{COMMON}frontend plain\n  bind {front}\n  default_backend tunnel\n\
             backend tunnel\n  server peer {tls_listen} ssl verify required ca-file {ca} \
             verifyhost {SERVER_NAME} sni str({SERVER_NAME}) crt {crt}\n",
            ca = cert.display(),
            crt = bundle.display(),
        );
        let server_cfg = format!(
            "{COMMON}frontend tls\n  bind {tls_listen} ssl crt {crt} ca-file {ca} verify required\n  \
             default_backend app\nbackend app\n  server app {backend}\n",
            ca = cert.display(),
            crt = bundle.display(),
        );
        let mut pair = HaproxyPair {
            children: Vec::new(),
            front,
        };
        for (node, name, cfg) in [
            (server_node, "haproxy-server.cfg", server_cfg),
            (client_node, "haproxy-client.cfg", client_cfg),
        ] {
            let path = dir.join(name);
            fs::write(&path, cfg)?;
            let log = fs::File::create(path.with_extension("log"))?;
            let mut command = node.try_command(bin)?;
            command
                .arg("-db")
                .arg("-f")
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            pair.children.push(
                command
                    .spawn()
                    .with_context(|| format!("starting haproxy ({name})"))?,
            );
        }
        Ok(pair)
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }

    /// Fails if a haproxy already exited (a config error, say).
    pub fn check_running(&mut self) -> Result<()> {
        for child in &mut self.children {
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("haproxy exited ({status}); see the haproxy-*.log files");
            }
        }
        Ok(())
    }
}

impl Drop for HaproxyPair {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
