//! A thread that lives in one pod's network namespace and creates sockets there.
//!
//! A socket belongs to the netns it was created in, whatever thread uses it later, so the
//! agent creates pod listeners and upstream sockets on such a thread and drives them from
//! the tokio runtime like any other socket. setns on a dedicated thread never moves the
//! runtime's own threads.

use std::{
    fs::File,
    io,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("opening network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("reading the cookie of network namespace {path}: {source}")]
    Cookie { path: PathBuf, source: io::Error },
    #[error("the thread of network namespace {0} is gone")]
    Gone(PathBuf),
    #[error("spawning a thread for {path}: {source}")]
    Spawn { path: PathBuf, source: io::Error },
}

type Job = Box<dyn FnOnce() + Send>;

/// Handle to the thread; the thread ends when the last handle is dropped.
#[derive(Clone)]
pub struct NetnsThread {
    path: PathBuf,
    cookie: u64,
    jobs: mpsc::Sender<Job>,
}

impl NetnsThread {
    /// Starts a thread inside the network namespace at `path` (e.g. /var/run/netns/web-1).
    pub fn spawn(path: &Path) -> Result<Self, NetnsError> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel();
        let owned = path.to_owned();
        thread::Builder::new()
            .name(format!(
                "netns:{}",
                path.file_name()
                    .map_or_else(|| "?".into(), |n| n.to_string_lossy())
            ))
            .spawn(move || {
                let entered = enter(&owned);
                let failed = entered.is_err();
                let _ = ready_tx.send(entered);
                if failed {
                    return;
                }
                for job in queue {
                    job();
                }
            })
            .map_err(|source| NetnsError::Spawn {
                path: path.to_owned(),
                source,
            })?;
        let cookie = ready_rx
            .recv()
            .map_err(|_| NetnsError::Gone(path.to_owned()))??;
        Ok(Self {
            path: path.to_owned(),
            cookie,
            jobs,
        })
    }

    /// The kernel's cookie of this network namespace: the key of the eBPF enrolled map.
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Runs `f` on the thread (inside the namespace) and returns its result.
    pub async fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .send(job)
            .map_err(|_| NetnsError::Gone(self.path.clone()))?;
        rx.await.map_err(|_| NetnsError::Gone(self.path.clone()))
    }

    /// Queues `f` to run on the thread, without waiting for it.
    pub fn submit(&self, f: impl FnOnce() + Send + 'static) {
        // A gone thread means the pod is being removed: nothing left to do.
        let _ = self.jobs.send(Box::new(f));
    }

    /// Like [`run`](Self::run), for callers outside the runtime.
    pub fn run_blocking<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        self.jobs
            .send(job)
            .map_err(|_| NetnsError::Gone(self.path.clone()))?;
        rx.recv().map_err(|_| NetnsError::Gone(self.path.clone()))
    }
}

fn enter(path: &Path) -> Result<u64, NetnsError> {
    let file = File::open(path).map_err(|source| NetnsError::Open {
        path: path.to_owned(),
        source,
    })?;
    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
        path: path.to_owned(),
        source,
    })?;
    current_cookie().map_err(|source| NetnsError::Cookie {
        path: path.to_owned(),
        source,
    })
}

/// The cookie of the calling thread's network namespace (SO_NETNS_COOKIE, Linux 5.14+).
pub fn current_cookie() -> io::Result<u64> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))?;
    socket_netns_cookie(&socket)
}

/// The cookie of the network namespace a socket lives in.
// Unsafe: SO_NETNS_COOKIE has no safe wrapper (neither nix nor socket2 has it), so this calls
// getsockopt(2) itself.
#[allow(unsafe_code)]
pub fn socket_netns_cookie(socket: &impl AsFd) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length of a u64.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
