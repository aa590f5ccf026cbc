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
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::error::ConfigError;
use super::file::Scope;
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
    /// A source's publishing side, as the file watcher's: `updates` carries the snapshots,
    /// `task` produces them, `status` counts them.
    pub fn new(
        updates: watch::Receiver<Arc<Config>>,
        status: Arc<ReloadStatus>,
        task: JoinHandle<()>,
    ) -> Self {
        Self {
            updates,
            status,
            task,
        }
    }

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

    /// The polling task, dropping this watcher's own receiver: the task then ends when the
    /// receivers from [`ConfigWatch::current`] are all gone.
    pub fn into_task(self) -> JoinHandle<()> {
        self.task
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
    /// How long reading, parsing and validating the last published snapshot took.
    pub last_build: Option<Duration>,
}

impl ReloadStatus {
    pub fn snapshot(&self) -> ReloadStats {
        self.inner.lock().clone()
    }

    /// A new snapshot was published; building it took `built`.
    pub fn applied(&self, built: Duration) {
        let mut s = self.inner.lock();
        s.applied += 1;
        s.last_build = Some(built);
        s.last_error = None;
        s.last_applied_at = Some(SystemTime::now());
    }

    fn valid_unchanged(&self) {
        self.inner.lock().last_error = None;
    }

    /// A change was refused, for `message`.
    pub fn rejected(&self, message: String) {
        let mut s = self.inner.lock();
        s.rejected += 1;
        s.last_error = Some(message);
    }
}

/// Loads the file at `path` (refusing an invalid one) and watches it, polling every
/// [`DEFAULT_POLL_INTERVAL`]. `node` is the command line's node, which wins over the file's
/// at every reload as it did at start. The watcher starts from the version loaded here: the
/// file is parsed again only once it changed, not at the first poll. Needs a Tokio runtime.
pub fn load(path: impl Into<PathBuf>, node: Option<String>) -> Result<ConfigWatch, ConfigError> {
    load_scoped(path, node, Scope::Everything)
}

/// As [`load`], refusing what `scope` leaves to another source.
pub fn load_scoped(
    path: impl Into<PathBuf>,
    node: Option<String>,
    scope: Scope,
) -> Result<ConfigWatch, ConfigError> {
    load_with_interval(path, node, scope, DEFAULT_POLL_INTERVAL)
}

/// As [`load_scoped`], polling every `interval`.
pub fn load_with_interval(
    path: impl Into<PathBuf>,
    node: Option<String>,
    scope: Scope,
    interval: Duration,
) -> Result<ConfigWatch, ConfigError> {
    let path = path.into();
    // The metadata before the content: a change between the two is seen at the next polls.
    let stamp = std::fs::metadata(&path).ok().map(|meta| Stamp::of(&meta));
    let text = super::file::read(&path)?;
    let file = path.display().to_string();
    let config = Config::from_yaml_str_scoped(&text, &file, node.as_deref(), scope)?;
    let state = State {
        stamp,
        hash: Some(content_hash(&text)),
        ..State::default()
    };
    let source = FileSource { path, node, scope };
    Ok(start(source, Arc::new(config), state, interval))
}

fn start(
    source: FileSource,
    current: Arc<Config>,
    state: State,
    interval: Duration,
) -> ConfigWatch {
    let (tx, updates) = watch::channel(current);
    let status = Arc::new(ReloadStatus::default());
    let task = tokio::spawn(run(source, tx, Arc::clone(&status), state, interval));
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

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            ino: meta.ino(),
            len: meta.len(),
            mtime: meta.modified().ok(),
        }
    }
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

/// The file and how to read it.
struct FileSource {
    path: PathBuf,
    node: Option<String>,
    scope: Scope,
}

async fn run(
    source: FileSource,
    tx: watch::Sender<Arc<Config>>,
    status: Arc<ReloadStatus>,
    mut state: State,
    interval: Duration,
) {
    let FileSource { path, node, scope } = source;
    let file = path.display().to_string();
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

        let read_error = |source| ConfigError::Read {
            file: file.clone(),
            source,
        };
        let stamp = match tokio::fs::metadata(&path).await {
            Ok(meta) => Stamp::of(&meta),
            Err(source) => {
                unreadable(&mut state, &status, read_error(source));
                continue;
            }
        };
        if state.stamp != Some(stamp) {
            if state.pending != Some(stamp) {
                state.pending = Some(stamp);
                continue; // let it settle for one poll
            }
        } else if !polls.is_multiple_of(FULL_CHECK_EVERY) {
            continue;
        }
        state.pending = None;

        let building = std::time::Instant::now();
        let text = match tokio::fs::read_to_string(&path).await {
            Ok(text) => text,
            Err(source) => {
                unreadable(&mut state, &status, read_error(source));
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

        match Config::from_yaml_str_scoped(&text, &file, node.as_deref(), scope) {
            Ok(config) => {
                if **tx.borrow() == config {
                    tracing::debug!(file = %file, "configuration file changed, snapshot did not");
                    status.valid_unchanged();
                    continue;
                }
                let built = building.elapsed();
                tx.send_replace(Arc::new(config));
                status.applied(built);
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::test_support::eventually;

    const POLL: Duration = Duration::from_millis(20);

    fn service_doc(name: &str, port: u16) -> String {
        format!(
            "agent: {{node: n1}}\n\
             services:\n\
             \x20 - name: {name}\n\
             \x20   vips: [10.96.0.1]\n\
             \x20   ports: [{{port: {port}}}]\n\
             \x20   endpoints: {{addresses: [10.0.0.1]}}\n"
        )
    }

    /// Line 8 gives a second service the VIP of the first.
    fn invalid_doc() -> String {
        service_doc("a", 80)
            + "  - name: b\n    vips: [10.96.0.1]\n    ports: [{port: 80}]\n    \
               endpoints: {addresses: [10.0.0.2]}\n"
    }

    fn start(dir: &Path) -> (PathBuf, ConfigWatch) {
        start_on(dir, None)
    }

    fn start_on(dir: &Path, node: Option<&str>) -> (PathBuf, ConfigWatch) {
        let path = dir.join("mesh.yaml");
        std::fs::write(&path, service_doc("a", 80)).expect("write");
        let watch = load_with_interval(&path, node.map(str::to_owned), Scope::Everything, POLL)
            .unwrap_or_else(|e| panic!("{e}"));
        (path, watch)
    }

    async fn next(rx: &mut watch::Receiver<Arc<Config>>) -> Arc<Config> {
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("no reload published within 5 s")
            .expect("watcher gone");
        Arc::clone(&rx.borrow_and_update())
    }

    /// Lets the watcher look at the file for several polls.
    async fn settle() {
        tokio::time::sleep(POLL * 8).await;
    }

    fn service_name(config: &Arc<Config>) -> String {
        config
            .services
            .first()
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn valid_change_is_published() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, watch) = start(dir.path());
        let mut rx = watch.current();
        std::fs::write(&path, service_doc("b", 81)).expect("rewrite in place");
        let config = next(&mut rx).await;
        assert_eq!(service_name(&config), "b");
        assert!(
            config
                .service_by_vip("10.96.0.1:81".parse().expect("addr"))
                .is_some()
        );
        assert_eq!(service_name(&watch.snapshot()), "b");
        let stats = watch.stats().snapshot();
        assert_eq!(
            (stats.applied, stats.rejected, stats.last_error),
            (1, 0, None)
        );
        assert!(stats.last_applied_at.is_some());
    }

    #[tokio::test]
    async fn the_command_line_node_stays_across_reloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, watch) = start_on(dir.path(), Some("from-downward-api"));
        let mut rx = watch.current();
        assert_eq!(watch.snapshot().agent().startup.node, "from-downward-api");
        // The file names node n1; a reload must not bring it back (the agent would refuse the
        // reload as a change of a start-up setting).
        std::fs::write(&path, service_doc("b", 81)).expect("rewrite");
        let config = next(&mut rx).await;
        assert_eq!(service_name(&config), "b");
        assert_eq!(config.agent().startup.node, "from-downward-api");
    }

    #[tokio::test]
    async fn with_the_agent_block_only_a_change_that_lists_services_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("mesh.yaml");
        std::fs::write(&path, "agent: {node: n1}\n").expect("write");
        let watch = load_with_interval(&path, None, Scope::AgentOnly, POLL)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut rx = watch.current();
        let stats = watch.stats();

        std::fs::write(&path, service_doc("a", 80)).expect("write");
        eventually("the rejection", || stats.snapshot().rejected == 1).await;
        let error = stats.snapshot().last_error.unwrap_or_default();
        assert!(
            error.starts_with(&format!("{}:3:5: services[0]: ", path.display())),
            "{error}"
        );
        assert!(!rx.has_changed().expect("watcher alive"));

        // A live setting of the agent block applies.
        std::fs::write(&path, "agent: {node: n1, connectTimeoutMs: 77}\n").expect("write");
        let config = next(&mut rx).await;
        assert_eq!(
            config.agent().live.connect_timeout,
            Duration::from_millis(77)
        );
    }

    #[tokio::test]
    async fn invalid_change_is_refused_and_the_previous_snapshot_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, watch) = start(dir.path());
        let mut rx = watch.current();
        let stats = watch.stats();

        std::fs::write(&path, invalid_doc()).expect("write");
        eventually("the rejection", || stats.snapshot().rejected == 1).await;
        let s = stats.snapshot();
        assert_eq!(
            s.last_error.as_deref(),
            Some(
                format!(
                    "{}:8:12: services[1].vips[0]: 10.96.0.1 is already the VIP of service \
                     default/a",
                    path.display()
                )
                .as_str()
            )
        );
        assert_eq!(s.applied, 0);
        settle().await;
        assert!(
            !rx.has_changed().expect("watcher alive"),
            "an invalid file was published"
        );
        assert_eq!(service_name(&watch.snapshot()), "a");
        assert_eq!(
            stats.snapshot().rejected,
            1,
            "the same bad file is reported once"
        );

        // Fixing the file publishes and clears the error.
        std::fs::write(&path, service_doc("c", 80)).expect("write");
        assert_eq!(service_name(&next(&mut rx).await), "c");
        let s = stats.snapshot();
        assert_eq!((s.applied, s.rejected, s.last_error), (1, 1, None));
    }

    #[tokio::test]
    async fn rename_over_the_file_is_seen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, watch) = start(dir.path());
        let mut rx = watch.current();
        let tmp = dir.path().join(".mesh.yaml.swp");
        std::fs::write(&tmp, service_doc("renamed", 80)).expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
        assert_eq!(service_name(&next(&mut rx).await), "renamed");
    }

    #[tokio::test]
    async fn touch_or_comment_publishes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, watch) = start(dir.path());
        let rx = watch.current();
        std::fs::write(&path, service_doc("a", 80)).expect("same content");
        settle().await;
        std::fs::write(&path, service_doc("a", 80) + "# a comment\n").expect("comment");
        settle().await;
        assert!(!rx.has_changed().expect("watcher alive"));
        let s = watch.stats().snapshot();
        assert_eq!((s.applied, s.rejected), (0, 0));
    }

    #[tokio::test]
    async fn missing_file_is_reported_once_then_picked_up_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, watch) = start(dir.path());
        let mut rx = watch.current();
        let stats = watch.stats();
        std::fs::remove_file(&path).expect("remove");
        eventually("the read error", || stats.snapshot().rejected == 1).await;
        settle().await;
        let s = stats.snapshot();
        assert_eq!(s.rejected, 1);
        let error = s.last_error.unwrap_or_default();
        assert!(
            error.starts_with(&format!("{}: cannot read configuration: ", path.display())),
            "{error}"
        );
        std::fs::write(&path, service_doc("back", 80)).expect("write");
        assert_eq!(service_name(&next(&mut rx).await), "back");
        assert_eq!(stats.snapshot().last_error, None);
    }

    #[tokio::test]
    async fn stops_when_asked_or_when_nobody_listens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_path, watch) = start(dir.path());
        watch.stop();
        eventually("the abort", || watch.is_finished()).await;

        let (_path, watch) = start(dir.path());
        let rx = watch.current();
        let task = watch.into_task();
        // A receiver is left: the watcher keeps running.
        settle().await;
        assert!(!task.is_finished());
        drop(rx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the watcher did not stop once nobody listened")
            .expect("the watcher panicked");
    }
}
