//! Running processes inside a pod or node: cgroup join + netns entry in a
//! `pre_exec` hook, plus bounded-time helpers so a test never hangs.
//!
//! Why not `ip netns exec`: it remounts /sys, which hides the cgroup2 mount,
//! so a process could not join its pod cgroup afterwards. Instead the child
//! writes its own pid to the pod's `cgroup.procs` first and then `setns`es
//! into the network namespace; both survive `exec`.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead as _, BufReader};
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

/// Default bound for `Pod::run` / `Node::run`.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`spawn_ready`] waits for the `ready` line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a process should run: a netns, optionally a cgroup.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub(crate) label: String,
    pub(crate) netns_path: PathBuf,
    pub(crate) cgroup_dir: Option<PathBuf>,
}

impl Target {
    /// Builds a Command that joins the cgroup (if any) and then the netns.
    ///
    /// The fds are opened here, before fork, because opening files is not
    /// async-signal-safe; the hook only calls `getpid`, `write` and `setns`.
    // Unsafe: `CommandExt::pre_exec`, the only way to run code between fork and exec.
    #[allow(unsafe_code)]
    pub(crate) fn try_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        let netns: OwnedFd = File::open(&self.netns_path)
            .with_context(|| {
                format!(
                    "opening netns {} of {}",
                    self.netns_path.display(),
                    self.label
                )
            })?
            .into();
        let procs: Option<OwnedFd> = match &self.cgroup_dir {
            Some(dir) => {
                let p = dir.join("cgroup.procs");
                Some(
                    OpenOptions::new()
                        .write(true)
                        .open(&p)
                        .with_context(|| format!("opening {} of {}", p.display(), self.label))?
                        .into(),
                )
            }
            None => None,
        };
        let mut cmd = Command::new(program);
        let hook = move || -> io::Result<()> {
            if let Some(fd) = &procs {
                write_own_pid(fd)?;
            }
            // SAFETY: setns on a valid fd we own; async-signal-safe syscall.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        };
        // SAFETY: the hook only performs async-signal-safe syscalls on fds
        // opened before fork and allocates nothing.
        unsafe {
            cmd.pre_exec(hook);
        }
        Ok(cmd)
    }

    /// Like [`Self::try_command`], but errors are deferred to `spawn()`
    /// (the returned Command fails to start), after being printed with context.
    // Unsafe: `CommandExt::pre_exec` (a hook that makes the spawn fail).
    #[allow(unsafe_code)]
    pub(crate) fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let program = program.as_ref().to_owned();
        match self.try_command(&program) {
            Ok(cmd) => cmd,
            Err(e) => {
                eprintln!(
                    "mesh-tests: cannot prepare command in {}: {e:#}",
                    self.label
                );
                let code = e
                    .chain()
                    .find_map(|c| {
                        c.downcast_ref::<io::Error>()
                            .and_then(io::Error::raw_os_error)
                    })
                    .unwrap_or(libc::EINVAL);
                let mut cmd = Command::new(program);
                // SAFETY: the hook only builds an io::Error from a code.
                unsafe {
                    cmd.pre_exec(move || Err(io::Error::from_raw_os_error(code)));
                }
                cmd
            }
        }
    }

    /// Runs `program args` to completion (bounded by [`RUN_TIMEOUT`]);
    /// a non-zero exit is an error carrying stdout and stderr.
    pub(crate) fn run<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.try_command(program)?;
        cmd.args(args);
        let out = output_timeout(&mut cmd, RUN_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "{:?} in {} failed ({}):\nstdout: {}\nstderr: {}",
                cmd,
                self.label,
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }
}

/// Writes the decimal pid of the calling process to `fd` without allocating.
fn write_own_pid(fd: &OwnedFd) -> io::Result<()> {
    // getpid and write are async-signal-safe; nothing here allocates.
    let pid = nix::unistd::getpid().as_raw();
    let mut buf = [0u8; 12];
    let mut n = pid.unsigned_abs();
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    nix::unistd::write(fd, &buf[i..])?;
    Ok(())
}

/// Runs a command capturing stdout/stderr, killing it after `timeout`.
pub fn output_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    let out_reader = spawn_reader(child.stdout.take());
    let err_reader = spawn_reader(child.stderr.take());
    let status =
        wait_timeout(&mut child, timeout).with_context(|| format!("waiting for {cmd:?}"))?;
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{cmd:?} timed out after {timeout:?} (killed)\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout).trim(),
            String::from_utf8_lossy(&stderr).trim()
        ),
    }
}

fn spawn_reader<R: io::Read + Send + 'static>(r: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Polls `done` every 50 ms until it holds or `timeout` passes; whether it held. For the
/// results an agent records a moment after the client is done (metrics, log lines).
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for `child` up to `timeout`; on timeout kills and reaps it and
/// returns None.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(Some(st));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// A long-running process (a server, the agent) killed and reaped on drop.
///
/// Its stdout after the `ready` line, and its stderr, are forwarded to the
/// test's stderr with a `[label]` prefix so failures are debuggable.
#[derive(Debug)]
pub struct Background {
    child: Child,
    label: String,
}

impl Background {
    /// The OS pid of the process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Access to the child (e.g. to `try_wait`).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Kills the process and returns its exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        let _ = self.child.kill();
        self.child
            .wait()
            .with_context(|| format!("waiting for {}", self.label))
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Spawns `cmd` with its output discarded (for a process that only has to exist, like a
/// pod's sandbox).
pub(crate) fn spawn_quiet(cmd: &mut Command, label: &str) -> Result<Background> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let child = cmd
        .spawn()
        .with_context(|| format!("spawning {label}: {cmd:?}"))?;
    Ok(Background {
        child,
        label: label.to_owned(),
    })
}

/// Spawns `cmd` and waits until it prints a line `ready` on stdout
/// (bounded by [`READY_TIMEOUT`]). Use for servers, so a test connects
/// only once the listener exists.
pub fn spawn_ready(cmd: &mut Command, label: &str) -> Result<Background> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("spawning {label}: {cmd:?}"))?;
    forward_lines(child.stderr.take(), label.to_owned(), None);
    let (tx, rx) = mpsc::channel();
    forward_lines(child.stdout.take(), label.to_owned(), Some(tx));
    let bg = Background {
        child,
        label: label.to_owned(),
    };
    match rx.recv_timeout(READY_TIMEOUT) {
        Ok(()) => Ok(bg),
        Err(_) => {
            let mut bg = bg;
            let status = bg.child.try_wait().ok().flatten();
            bail!(
                "{label} did not print `ready` within {READY_TIMEOUT:?} (exit status: {status:?}); see its output above"
            )
        }
    }
}

/// Forwards lines to stderr; signals `ready` once on the first `ready` line.
fn forward_lines<R: io::Read + Send + 'static>(
    r: Option<R>,
    label: String,
    ready: Option<mpsc::Sender<()>>,
) {
    let Some(r) = r else { return };
    thread::spawn(move || {
        let mut ready = ready;
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            if ready.is_some() && line.trim() == "ready" {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
                continue;
            }
            eprintln!("[{label}] {line}");
        }
    });
}
