//! Helpers the unit tests of several modules share.

use std::time::Duration;

/// Waits until `done` holds, looking every 10 ms; fails the test after 5 s, naming `what`.
pub async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
