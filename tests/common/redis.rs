//! Real `redis-server` processes for tests: each test starts its own, in its
//! own temp dir, so it can kill and restart them at will.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A standalone `redis-server` on a unix socket in a temp dir.
pub struct RedisServer {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// `redis+unix://` URL of the socket.
    pub url: String,
    /// Append-only file with `appendfsync always`: a restart keeps every
    /// acknowledged write.
    durable: bool,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// With the append-only file on and `appendfsync always`.
    pub fn start_durable() -> Self {
        Self::start_with(true)
    }

    fn start_with(durable: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("redis.sock");
        let url = format!("redis+unix://{}", socket.display());
        let mut s = RedisServer {
            child: None,
            dir,
            socket,
            url,
            durable,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
            .args(["--unixsocketperm", "700", "--save", ""])
            .args(if self.durable {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (scripts/ensure-deps.sh installs it)");
        self.child = Some(child);
        wait_until(|| std::os::unix::net::UnixStream::connect(&self.socket).is_ok());
    }

    /// SIGKILL the server (data is lost unless started durable).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Redis Cluster of `masters` real `redis-server` processes on loopback.
pub struct RedisCluster {
    children: Vec<Child>,
    pub dir: tempfile::TempDir,
    pub ports: Vec<u16>,
    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,...`
    pub url: String,
}

impl RedisCluster {
    pub fn start(masters: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let ports = free_cluster_ports(masters);
        let mut children = Vec::new();
        for p in &ports {
            let node_dir = dir.path().join(p.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &p.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(node_dir.join("nodes.conf"))
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(&node_dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server must be installed");
            children.push(child);
        }
        for p in &ports {
            wait_until(|| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok());
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for p in &ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        // Wait until every node agrees the cluster is up.
        for p in &ports {
            wait_until(|| {
                Command::new("redis-cli")
                    .args(["-p", &p.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
                    .unwrap_or(false)
            });
        }
        let url = format!(
            "redis+cluster://{}",
            ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        RedisCluster {
            children,
            dir,
            ports,
            url,
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_until(mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "redis did not come up in 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Ports whose cluster-bus twin (port + 10000) is free as well.
fn free_cluster_ports(n: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    while ports.len() < n {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p > 55000 || ports.contains(&p) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", p + 10000)).is_ok() {
            ports.push(p);
        }
    }
    ports
}

// ---- moving a slot between the masters of a live cluster ----

type Conn = redis::aio::MultiplexedConnection;

pub async fn node(port: u16) -> Conn {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Which master (index into `ports`) serves `slot`, from CLUSTER NODES.
pub async fn owner(ports: &[u16], slot: u16) -> usize {
    let mut c = node(ports[0]).await;
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut c)
        .await
        .unwrap();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let port: u16 = f[1]
            .split('@')
            .next()
            .and_then(|hp| hp.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap();
        for r in f.iter().skip(8) {
            if r.starts_with('[') {
                continue;
            }
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            let (a, b): (u16, u16) = (a.parse().unwrap(), b.parse().unwrap());
            if (a..=b).contains(&slot) {
                return ports.iter().position(|p| *p == port).unwrap();
            }
        }
    }
    panic!("no owner for slot {slot}");
}

async fn my_id(c: &mut Conn) -> String {
    redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(c)
        .await
        .unwrap()
}

/// Moves `slot` from master `from` to master `to` the way
/// `redis-cli --cluster reshard` does (IMPORTING / MIGRATING, MIGRATE in
/// batches, SETSLOT NODE everywhere), `batch` keys at a time with `pause`
/// between batches. With `anchor`, the shard is paused first (anchor set
/// to `moving`) and resumed on the new owner at the end, as documented.
/// Answers how many keys moved.
pub async fn move_slot(
    ports: &[u16],
    slot: u16,
    from: usize,
    to: usize,
    anchor: Option<&str>,
    batch: usize,
    pause: Duration,
) -> usize {
    let mut src = node(ports[from]).await;
    let mut dst = node(ports[to]).await;
    let src_id = my_id(&mut src).await;
    let dst_id = my_id(&mut dst).await;
    if let Some(a) = anchor {
        let _: () = redis::cmd("SET")
            .arg(a)
            .arg("moving")
            .query_async(&mut src)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("CLUSTER")
        .arg(&["SETSLOT", &slot.to_string(), "IMPORTING", &src_id][..])
        .query_async(&mut dst)
        .await
        .unwrap();
    let _: () = redis::cmd("CLUSTER")
        .arg(&["SETSLOT", &slot.to_string(), "MIGRATING", &dst_id][..])
        .query_async(&mut src)
        .await
        .unwrap();
    let mut moved = 0;
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(batch)
            .query_async(&mut src)
            .await
            .unwrap();
        if keys.is_empty() {
            break;
        }
        let _: () = redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(ports[to])
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async(&mut src)
            .await
            .unwrap();
        moved += keys.len();
        tokio::time::sleep(pause).await;
    }
    let set_node = |p: u16| {
        let dst_id = dst_id.clone();
        async move {
            let mut c = node(p).await;
            let _: () = redis::cmd("CLUSTER")
                .arg(&["SETSLOT", &slot.to_string(), "NODE", &dst_id][..])
                .query_async(&mut c)
                .await
                .unwrap();
        }
    };
    set_node(ports[to]).await;
    set_node(ports[from]).await;
    for (i, p) in ports.iter().enumerate() {
        if i != from && i != to {
            set_node(*p).await;
        }
    }
    if let Some(a) = anchor {
        let _: () = redis::cmd("SET")
            .arg(a)
            .arg("ready")
            .query_async(&mut dst)
            .await
            .unwrap();
    }
    moved
}
