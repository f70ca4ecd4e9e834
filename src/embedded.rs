//! The `redis-server` that `serve` starts when it is given no `--redis`.
//!
//! It listens only on a unix socket inside the data dir (no TCP port, so
//! nothing else on the machine can reach it), keeps an append-only file there
//! (`appendfsync everysec`: a crash loses at most about one second of
//! acknowledged writes) and is stopped with SIGTERM — which makes Redis flush
//! the AOF — when `serve` exits. It has a `maxmemory` with the `noeviction`
//! policy: a full Redis refuses writes (answered 503 `storage_full`) instead
//! of swapping the machine to death or evicting jobs and ledgers.

use anyhow::{Context, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How to get `redis-server` when it is missing.
const INSTALL_HINT: &str = "redis-server was not found on PATH. Install it \
(Debian/Ubuntu: `sudo apt-get install redis-server`; macOS: `brew install redis`) \
or point agentplane at an existing Redis with `--redis redis://HOST:PORT`.";

/// Entries per stream listpack node; Redis's default is 100.
pub const STREAM_NODE_MAX_ENTRIES: &str = "16";
/// Fields past which a hash is a hash table; Redis's default is 128.
pub const HASH_MAX_LISTPACK_ENTRIES: &str = "16";

/// A running `redis-server` child.
pub struct EmbeddedRedis {
    child: Option<Child>,
    /// The unix socket it listens on.
    pub socket: PathBuf,
    /// `redis+unix://` URL of the socket.
    pub url: String,
}

impl EmbeddedRedis {
    /// Starts `redis-server` with its data in `data_dir` and waits until it
    /// answers PING. The dir must exist; making it private (it will hold
    /// every tenant's data) is the caller's part, as `serve` does first.
    pub fn start(data_dir: &Path, maxmemory: u64) -> anyhow::Result<EmbeddedRedis> {
        let data_dir = data_dir
            .canonicalize()
            .with_context(|| format!("resolving {}", data_dir.display()))?;
        let socket = data_dir.join("redis.sock");
        // Unix socket paths are limited to ~107 bytes by the kernel.
        if socket.as_os_str().len() > 100 {
            bail!(
                "the data dir path is too long for a unix socket ({}); use a shorter --data",
                socket.display()
            );
        }
        if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
            bail!(
                "a Redis already listens on {} (another `agentplane serve` on this data dir?). \
                 Stop it, or use it with --redis redis+unix://{}",
                socket.display(),
                socket.display()
            );
        }
        let _ = std::fs::remove_file(&socket);
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", "0", "--unixsocket"])
            .arg(&socket)
            .args(["--unixsocketperm", "700"])
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            // The AOF is the persistence; periodic RDB snapshots would only
            // add fork pauses.
            .args(["--save", ""])
            .args(["--maxmemory", &maxmemory.to_string()])
            .args(["--maxmemory-policy", "noeviction"])
            // Fewer Redis instructions per job (docs/OPERATIONS.md): a
            // queue head is found by scanning its stream node from the
            // start, so nodes are kept small; a tenant hash read and written
            // by every CLAIM and FINALIZE is kept as a hash table, not a
            // listpack scanned per field.
            .args(["--stream-node-max-entries", STREAM_NODE_MAX_ENTRIES])
            .args(["--hash-max-listpack-entries", HASH_MAX_LISTPACK_ENTRIES])
            .arg("--dir")
            .arg(&data_dir)
            .arg("--logfile")
            .arg(data_dir.join("redis.log"))
            .arg("--pidfile")
            .arg(data_dir.join("redis.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // Its own process group: a Ctrl-C in the terminal reaches only us,
        // so Redis stays up while the worker drains and releases its leases.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        die_with_parent(&mut cmd);
        private_files(&mut cmd);
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!("{INSTALL_HINT}"),
            Err(e) => return Err(e).context("starting redis-server"),
        };
        let url = format!("redis+unix://{}", socket.display());
        let mut me = EmbeddedRedis {
            child: Some(child),
            socket,
            url,
        };
        me.wait_ready(Duration::from_secs(30))?;
        Ok(me)
    }

    fn wait_ready(&mut self, within: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                bail!(
                    "redis-server exited at start ({status}); see {}",
                    self.socket.with_file_name("redis.log").display()
                );
            }
            if ping(&self.socket) {
                return Ok(());
            }
            if start.elapsed() > within {
                bail!("redis-server did not answer within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM (Redis flushes the AOF and exits), then wait for it; SIGKILL
    /// if it takes longer than 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let start = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if start.elapsed() < Duration::from_secs(10) => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        tracing::info!("embedded redis-server stopped");
    }
}

impl Drop for EmbeddedRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Parses a `maxmemory` in Redis syntax (`1073741824`, `512mb`, `2gb`,
/// `64kb`; 1024-based, case-insensitive) into bytes. At least 1 MiB: below
/// that Redis cannot even hold its own bookkeeping.
pub fn parse_maxmemory(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t.as_str(), ""),
    };
    let mult: u64 = match unit {
        "" | "b" => 1,
        "k" | "kb" => 1 << 10,
        "m" | "mb" => 1 << 20,
        "g" | "gb" => 1 << 30,
        _ => {
            return Err(format!(
                "`{s}`: expected bytes or a number with kb, mb or gb"
            ));
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}`: expected bytes or a number with kb, mb or gb"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))?;
    if bytes < 1 << 20 {
        return Err(format!("`{s}` is below the minimum of 1mb"));
    }
    Ok(bytes)
}

/// If we die without stopping it (SIGKILL), the kernel sends the child
/// SIGTERM, so it flushes the AOF and does not linger as an orphan.
#[cfg(target_os = "linux")]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec; prctl is
    // async-signal-safe and the closure touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn die_with_parent(_cmd: &mut Command) {}

/// Redis creates its AOF, log and pid files with the umask it inherits:
/// 077 makes them readable by our user only, whatever ours is.
fn private_files(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: umask(2) is async-signal-safe and the closure touches no
    // memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        });
    }
}

/// A PING over the socket, in RESP, without a client library.
fn ping(socket: &Path) -> bool {
    use std::io::Read;
    let Ok(mut s) = std::os::unix::net::UnixStream::connect(socket) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maxmemory_parses_redis_syntax() {
        assert_eq!(parse_maxmemory("2gb"), Ok(2 << 30));
        assert_eq!(parse_maxmemory("512MB"), Ok(512 << 20));
        assert_eq!(parse_maxmemory("1048576"), Ok(1 << 20));
        for bad in ["", "gb", "12xb", "-1gb", "100", "99999999999999999999gb"] {
            assert!(parse_maxmemory(bad).is_err(), "{bad}");
        }
    }

    /// The embedded server is bounded: maxmemory as given, never evicting.
    #[test]
    fn embedded_redis_has_maxmemory_and_noeviction() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let r = EmbeddedRedis::start(dir.path(), 64 << 20).unwrap();
        let mut s = std::os::unix::net::UnixStream::connect(&r.socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(b"CONFIG GET maxmemory*\r\n").unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = String::new();
        while !(got.contains("67108864") && got.contains("noeviction")) {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "{got}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }

    /// Sends one inline command and answers the first reply line.
    fn command(socket: &Path, line: &str) -> String {
        use std::io::{BufRead, BufReader};
        let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(format!("{line}\r\n").as_bytes()).unwrap();
        let mut r = BufReader::new(s);
        let mut out = String::new();
        r.read_line(&mut out).unwrap();
        if out.starts_with('$') && out.trim() != "$-1" {
            out.clear();
            r.read_line(&mut out).unwrap();
        }
        out.trim().to_string()
    }

    /// What was acknowledged survives redis-server being SIGKILLed, not
    /// only a clean stop: `serve` may be killed with its Redis.
    #[test]
    fn acknowledged_writes_survive_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = EmbeddedRedis::start(dir.path(), 64 << 20).unwrap();
        assert_eq!(command(&r.socket, "SET k crash-proof"), "+OK");
        let mut child = r.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!ping(&r.socket));
        let r = EmbeddedRedis::start(dir.path(), 64 << 20).unwrap();
        assert_eq!(command(&r.socket, "GET k"), "crash-proof");
    }

    #[test]
    fn embedded_redis_starts_persists_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = EmbeddedRedis::start(dir.path(), 64 << 20).unwrap();
        assert!(ping(&r.socket));
        assert_eq!(command(&r.socket, "SET k kept"), "+OK");
        // A second start on the same dir is refused, not a second server.
        assert!(EmbeddedRedis::start(dir.path(), 64 << 20).is_err());
        r.stop();
        assert!(!ping(&r.socket));
        assert!(dir.path().join("appendonlydir").exists());
        let r = EmbeddedRedis::start(dir.path(), 64 << 20).unwrap();
        assert_eq!(command(&r.socket, "GET k"), "kept");
    }
}
