//! The writer thread against writers that record, stall and never return.

use std::sync::mpsc;

use super::*;
use crate::test_support::eventually;

/// A writer that records each write call.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

impl Write for Recorder {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Recorder {
    fn writes(&self) -> usize {
        self.0.lock().len()
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().concat()).expect("utf-8")
    }
}

/// Lines `from..to`, each naming its number.
fn lines(from: usize, to: usize) -> Vec<String> {
    (from..to).map(|i| format!("line {i:05}\n")).collect()
}

#[tokio::test]
async fn access_lines_are_written_together_and_in_order() {
    let out = Recorder::default();
    let writer = Batched::start(out.clone());
    let all = lines(0, 200);
    for line in &all {
        writer.shared.push(line.as_bytes(), false);
    }
    eventually("every line written", || {
        out.text().len() == all.concat().len()
    })
    .await;
    assert_eq!(out.text(), all.concat(), "every line, in order");
    // The first line wakes the writer, which lingers while the others arrive.
    assert!(out.writes() <= 3, "{} writes for 200 lines", out.writes());
    writer.shared.close(EXIT_WAIT);
}

#[tokio::test]
async fn a_stalled_reader_costs_lines_counted_and_the_rest_follow_in_order() {
    // The first write blocks until the test lets it go.
    let (release, released) = mpsc::channel::<()>();
    struct Stalled(Recorder, Option<mpsc::Receiver<()>>);
    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if let Some(wait) = self.1.take() {
                let _ = wait.recv();
            }
            self.0.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let out = Recorder::default();
    let writer = Batched::start(Stalled(out.clone(), Some(released)));
    let first = "first\n";
    writer.shared.push(first.as_bytes(), true);
    // The writer now holds `first` in its blocked write.
    eventually("the writer took the first line", || {
        writer.shared.state.lock().lines.is_empty()
    })
    .await;

    let per_line = lines(0, 1)[0].len();
    let fit = QUEUED / per_line;
    let pushed = lines(0, fit + 100);
    for line in &pushed {
        writer.shared.push(line.as_bytes(), false);
    }
    assert_eq!(writer.shared.dropped.load(Ordering::Relaxed), 100);

    release.send(()).expect("writer waits");
    writer.shared.close(EXIT_WAIT);
    assert_eq!(out.text(), format!("{first}{}", pushed[..fit].concat()));
}

#[test]
fn closing_writes_what_waits_and_gives_up_on_a_writer_that_never_returns() {
    let out = Recorder::default();
    let writer = Batched::start(out.clone());
    writer.shared.push(b"last access line\n", false);
    writer.shared.close(EXIT_WAIT);
    assert_eq!(
        out.text(),
        "last access line\n",
        "written before close returned"
    );
    writer.shared.push(b"too late\n", true);
    assert_eq!(writer.shared.dropped.load(Ordering::Relaxed), 1);

    // A writer stuck for good (its reader never reads again) does not hold the exit.
    struct Stuck;
    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            std::thread::park();
            Ok(0)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let stuck = Batched::start(Stuck);
    stuck.shared.push(b"never written\n", true);
    let started = Instant::now();
    stuck.shared.close(Duration::from_millis(200));
    assert!(started.elapsed() < Duration::from_secs(2));
}
