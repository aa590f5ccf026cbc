//! Reload the configuration file when it changes.
//!
//! The watcher polls (no inotify: it must survive editors that write in place as well as
//! those that write a temporary file and rename it over the original, and bind-mounted
//! ConfigMaps whose symlinks are swapped). Each poll looks at the file's inode, length and
//! mtime; a change is acted upon once it has been stable for one poll (so a half-written file
//! is not read), and the content is then hashed, so a touch without change does nothing.
//! Every [`FULL_CHECK_EVERY`] polls the content is hashed even when the metadata looks
//! unchanged (same-size rewrites within the mtime granularity).
//!
//! A changed file is parsed and validated: a valid one that differs from the snapshot in force
//! is published as a new `Arc<Config>`; an invalid one is logged with its `file:line:column`
//! message and counted in [`ReloadStatus`], and the snapshot in force stays.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::error::ConfigError;
use super::model::Config;

/// How often the file is looked at.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Hash the content every this many polls even if the metadata did not change.
pub const FULL_CHECK_EVERY: u64 = 10;

/// A running watcher. Dropping it does not stop the task: the task ends when this value and
/// every receiver from [`ConfigWatch::current`] are gone, or on [`ConfigWatch::stop`].
#[derive(Debug)]
pub struct ConfigWatch {
    updates: watch::Receiver<Arc<Config>>,
    status: Arc<ReloadStatus>,
    task: JoinHandle<()>,
}

impl ConfigWatch {
    /// A receiver of the snapshot in force; its `changed()` fires on each published reload
    /// after this call.
    pub fn current(&self) -> watch::Receiver<Arc<Config>> {
        let mut rx = self.updates.clone();
        rx.mark_unchanged();
        rx
    }

    /// The snapshot in force now.
    pub fn snapshot(&self) -> Arc<Config> {
        Arc::clone(&self.updates.borrow())
    }

    /// Reload counters and the last rejection, for the admin API.
    pub fn stats(&self) -> Arc<ReloadStatus> {
        Arc::clone(&self.status)
    }

    /// Stops polling (receivers keep the last snapshot).
    pub fn stop(&self) {
        self.task.abort();
    }

    /// Whether the polling task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Shared, lock-protected reload bookkeeping.
#[derive(Debug, Default)]
pub struct ReloadStatus {
    inner: Mutex<ReloadStats>,
}

/// A copy of the reload bookkeeping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadStats {
    /// New snapshots published.
    pub applied: u64,
    /// Changes refused (invalid file, or file unreadable).
    pub rejected: u64,
    /// Why the file on disk is refused right now (`file:line:column: field: message`);
    /// cleared when a valid file is seen again.
    pub last_error: Option<String>,
    /// When the last snapshot was published.
    pub last_applied_at: Option<SystemTime>,
}

impl ReloadStatus {
    pub fn snapshot(&self) -> ReloadStats {
        self.lock().clone()
    }

    fn lock(&self) -> MutexGuard<'_, ReloadStats> {
        // The data stays consistent even if a holder panicked: every update is one assignment.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn applied(&self) {
        let mut s = self.lock();
        s.applied += 1;
        s.last_error = None;
        s.last_applied_at = Some(SystemTime::now());
    }

    fn valid_unchanged(&self) {
        self.lock().last_error = None;
    }

    fn rejected(&self, message: String) {
        let mut s = self.lock();
        s.rejected += 1;
        s.last_error = Some(message);
    }
}

/// Watches `path`, polling every [`DEFAULT_POLL_INTERVAL`]. `current` is the snapshot in force
/// (normally `Config::load(path)`); the first poll re-reads the file and publishes only if it
/// differs, so a change between loading and spawning is not lost. Needs a Tokio runtime.
pub fn spawn(path: impl Into<PathBuf>, current: Arc<Config>) -> ConfigWatch {
    spawn_with_interval(path, current, DEFAULT_POLL_INTERVAL)
}

/// As [`spawn`], polling every `interval`.
pub fn spawn_with_interval(
    path: impl Into<PathBuf>,
    current: Arc<Config>,
    interval: Duration,
) -> ConfigWatch {
    let path = path.into();
    let (tx, updates) = watch::channel(current);
    let status = Arc::new(ReloadStatus::default());
    let task = tokio::spawn(run(path, tx, Arc::clone(&status), interval));
    ConfigWatch {
        updates,
        status,
        task,
    }
}

/// What identifies a version of the file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

#[derive(Debug, Default)]
struct State {
    /// Metadata of the version last read.
    stamp: Option<Stamp>,
    /// Metadata seen at the previous poll, not yet read (waiting for it to settle).
    pending: Option<Stamp>,
    /// Content hash of the version last read.
    hash: Option<u64>,
    /// The last poll failed to read the file (log once per failure streak).
    unreadable: bool,
}

async fn run(
    path: PathBuf,
    tx: watch::Sender<Arc<Config>>,
    status: Arc<ReloadStatus>,
    interval: Duration,
) {
    let file = path.display().to_string();
    let mut state = State::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut polls: u64 = 0;
    tracing::debug!(file = %file, ?interval, "watching configuration file");
    loop {
        ticker.tick().await;
        if tx.is_closed() {
            tracing::debug!(file = %file, "no configuration subscriber left: watcher stops");
            return;
        }
        polls = polls.wrapping_add(1);

        let stamp = match tokio::fs::metadata(&path).await {
            Ok(meta) => Stamp {
                ino: meta.ino(),
                len: meta.len(),
                mtime: meta.modified().ok(),
            },
            Err(source) => {
                unreadable(
                    &mut state,
                    &status,
                    ConfigError::Read {
                        file: file.clone(),
                        source,
                    },
                );
                continue;
            }
        };
        if state.stamp != Some(stamp) {
            if state.pending != Some(stamp) {
                state.pending = Some(stamp);
                continue; // let it settle for one poll
            }
        } else if polls % FULL_CHECK_EVERY != 0 && !state.unreadable {
            continue;
        }
        state.pending = None;

        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(source) => {
                unreadable(
                    &mut state,
                    &status,
                    ConfigError::Read {
                        file: file.clone(),
                        source,
                    },
                );
                continue;
            }
        };
        state.unreadable = false;
        state.stamp = Some(stamp);
        let hash = content_hash(&text);
        if state.hash == Some(hash) {
            continue;
        }
        state.hash = Some(hash);

        match Config::from_yaml_str(&text, &file) {
            Ok(config) => {
                if **tx.borrow() == config {
                    tracing::debug!(file = %file, "configuration file changed, snapshot did not");
                    status.valid_unchanged();
                    continue;
                }
                tx.send_replace(Arc::new(config));
                status.applied();
                tracing::info!(file = %file, "configuration reloaded");
            }
            Err(err) => {
                let message = err.to_string();
                tracing::error!(
                    error = %message,
                    "configuration change refused; the previous configuration stays in force"
                );
                status.rejected(message);
            }
        }
    }
}

fn unreadable(state: &mut State, status: &ReloadStatus, err: ConfigError) {
    state.pending = None;
    // Read it again, whatever its metadata, once it is back.
    state.stamp = None;
    state.hash = None;
    if !state.unreadable {
        state.unreadable = true;
        let message = err.to_string();
        tracing::warn!(
            error = %message,
            "configuration file unreadable; the previous configuration stays in force"
        );
        status.rejected(message);
    }
}

fn content_hash(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}
