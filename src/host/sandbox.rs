//! The WASI 0.2 environment of a run: everything linked, nothing granted.
//! No preopened directories, no environment, no arguments, an empty stdin,
//! every socket and name lookup denied; stdout/stderr go to bounded buffers.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

/// Bytes one `wasi:random` call may ask for.
pub(crate) const MAX_RANDOM_BYTES: u64 = 64 << 10;

/// Appended where output was dropped, so a reader knows the log is partial.
pub(crate) const TRUNCATED: &str = "[... output truncated]";

/// Builds the WASI context of one run, with stdout and stderr captured.
pub(crate) fn wasi_ctx(stdout: &Capture, stderr: &Capture) -> WasiCtx {
    let mut b = WasiCtxBuilder::new();
    // Stdin, env, args and preopens are empty by default; sockets are denied
    // by default too, but the sandbox must not depend on a library default
    // that may change, so every grant is refused explicitly.
    b.allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }))
        .allow_blocking_current_thread(false)
        // One `get-random-bytes` call builds its answer in host memory; the
        // default (64 MiB) let a guest make the host allocate far more per
        // call than its own memory limit. Real callers ask for a few bytes.
        .max_random_size(MAX_RANDOM_BYTES)
        .stdout(stdout.clone())
        .stderr(stderr.clone());
    b.build()
}

/// A bounded byte sink shared between the guest's stream and the host.
/// Writes beyond the bound are accepted and dropped (failing them would make
/// a chatty guest trap, turning a logging habit into a job failure).
#[derive(Clone)]
pub(crate) struct Capture {
    inner: Arc<Mutex<CaptureBuf>>,
}

struct CaptureBuf {
    bytes: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Capture {
    pub fn new(cap: usize) -> Self {
        Capture {
            inner: Arc::new(Mutex::new(CaptureBuf {
                bytes: Vec::new(),
                cap,
                truncated: false,
            })),
        }
    }

    /// What was kept, as text, with the truncation marker if bytes were dropped.
    pub fn text(&self) -> String {
        let b = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = String::from_utf8_lossy(&b.bytes).into_owned();
        if b.truncated {
            if !s.is_empty() && !s.ends_with('\n') {
                s.push('\n');
            }
            s.push_str(TRUNCATED);
            s.push('\n');
        }
        s
    }

    /// Empties the buffer for the next run of a warm instance, whose guest
    /// keeps the stream handles it already has: nothing written before this
    /// call shows in what the next run reports (writes land synchronously,
    /// see [`OutputStream`] below, so none is still in flight).
    pub fn clear(&self) {
        let mut b = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        b.bytes.clear();
        b.truncated = false;
    }

    fn write(&self, buf: &[u8]) {
        let mut b = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let room = b.cap.saturating_sub(b.bytes.len());
        let n = room.min(buf.len());
        b.bytes.extend_from_slice(&buf[..n]);
        if n < buf.len() {
            b.truncated = true;
        }
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    /// The stream the guest writes to, writing straight into the buffer.
    /// The default wraps [`Capture::async_stream`] in a stream that spawns a
    /// tokio task per `get-stdout` (a few µs of every run) and writes
    /// behind the guest's back, so output could land after the run ended.
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

/// Bytes a guest may hand over per write: what `check-write` permits.
/// Writes past the capture's bound are accepted and dropped, so this only
/// bounds the copy one call makes.
const WRITE_PERMIT: usize = 64 << 10;

impl OutputStream for Capture {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        Capture::write(self, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(WRITE_PERMIT)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Capture {
    /// Always ready: writes never wait.
    async fn ready(&mut self) {}
}

impl AsyncWrite for Capture {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Capture::write(&self, buf);
        // Report everything as written, kept or not: see the type's doc.
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// `log.write` lines of one run, bounded in bytes like stdout.
pub(crate) struct LogLines {
    text: String,
    cap: usize,
    truncated: bool,
}

impl LogLines {
    pub fn new(cap: usize) -> Self {
        LogLines {
            text: String::new(),
            cap,
            truncated: false,
        }
    }

    pub fn push(&mut self, level: &str, message: &str) {
        if self.truncated {
            return;
        }
        let line = format!("[{level}] {message}\n");
        if self.text.len() + line.len() > self.cap {
            self.truncated = true;
            return;
        }
        self.text.push_str(&line);
    }

    pub fn text(&self) -> String {
        let mut s = self.text.clone();
        if self.truncated {
            s.push_str(TRUNCATED);
            s.push('\n');
        }
        s
    }
}

/// Unflushed bytes of a live log at which its reader is woken before its
/// next tick (see [`LiveLog::grown`]).
pub const LIVE_FLUSH_BYTES: usize = 4 << 10;

struct LiveInner {
    lines: Mutex<LogLines>,
    /// The tenant's secret values, replaced in every line pushed.
    redactor: std::sync::OnceLock<Arc<crate::secrets::Redactor>>,
    /// Bytes the reader has taken (set by [`LiveLog::taken`]).
    taken: std::sync::atomic::AtomicUsize,
    grown: tokio::sync::Notify,
}

/// The `log.write` lines of one run as they are written: the same bounded
/// buffer the run's final log is made of, shared with a reader (the worker)
/// that takes what is new while the run is in flight. The text only grows,
/// by whole lines, so a reader keeps a byte offset into it.
#[derive(Clone)]
pub struct LiveLog(Arc<LiveInner>);

impl LiveLog {
    /// An empty log holding at most `cap` bytes of lines.
    pub fn new(cap: usize) -> LiveLog {
        LiveLog(Arc::new(LiveInner {
            lines: Mutex::new(LogLines::new(cap)),
            redactor: Default::default(),
            taken: Default::default(),
            grown: tokio::sync::Notify::new(),
        }))
    }

    fn lines(&self) -> std::sync::MutexGuard<'_, LogLines> {
        self.0.lines.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces `r`'s values in every line pushed from now on (set once,
    /// before the run starts).
    pub(crate) fn redact_with(&self, r: Arc<crate::secrets::Redactor>) {
        let _ = self.0.redactor.set(r);
    }

    pub(crate) fn push(&self, level: &str, message: &str) {
        use std::sync::atomic::Ordering;
        let redacted;
        let message = match self.0.redactor.get() {
            Some(r) => {
                redacted = r.redact(message);
                redacted.as_str()
            }
            None => message,
        };
        let len = {
            let mut l = self.lines();
            l.push(level, message);
            l.text.len()
        };
        // Not per line: the reader is woken once a batch is waiting.
        if len >= self.0.taken.load(Ordering::Acquire) + LIVE_FLUSH_BYTES {
            self.0.grown.notify_waiters();
        }
    }

    /// The lines written since byte `offset` (whole lines; empty when
    /// nothing is new). The cut mark of a full log is not part of it.
    pub fn since(&self, offset: usize) -> String {
        self.lines().text.get(offset..).unwrap_or("").to_string()
    }

    /// Says the reader has taken the first `offset` bytes.
    pub fn taken(&self, offset: usize) {
        self.0
            .taken
            .store(offset, std::sync::atomic::Ordering::Release);
    }

    /// Resolves once [`LIVE_FLUSH_BYTES`] or more were written past what the
    /// reader has taken.
    pub async fn grown(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let notified = self.0.grown.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lines().text.len() >= self.0.taken.load(Ordering::Acquire) + LIVE_FLUSH_BYTES {
                return;
            }
            notified.await;
        }
    }

    /// The whole log as the run reports it (with the cut mark when full).
    pub(crate) fn text(&self) -> String {
        self.lines().text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_the_bound_and_marks_the_cut() {
        let c = Capture::new(5);
        c.write(b"abc");
        c.write(b"defgh");
        assert_eq!(c.text(), format!("abcde\n{TRUNCATED}\n"));
        let mut l = LogLines::new(20);
        l.push("info", "hello");
        l.push("info", "a long line that does not fit");
        l.push("info", "x");
        assert_eq!(l.text(), format!("[info] hello\n{TRUNCATED}\n"));
    }

    #[tokio::test]
    async fn a_live_log_hands_out_what_is_new_and_wakes_its_reader_per_batch() {
        let l = LiveLog::new(1 << 20);
        l.push("info", "one");
        assert_eq!(l.since(0), "[info] one\n");
        l.taken(11);
        assert_eq!(l.since(11), "");
        // One short line does not wake the reader; a batch does.
        let waiting = tokio::spawn({
            let l = l.clone();
            async move { l.grown().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        l.push("info", "two");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiting.is_finished());
        l.push("info", &"x".repeat(LIVE_FLUSH_BYTES));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("woken by a batch")
            .unwrap();
        assert!(l.since(11).starts_with("[info] two\n[info] xxx"));
    }
}
