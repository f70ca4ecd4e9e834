//! A TCP proxy in front of a real `redis-server` (its unix socket) that can
//! lose an answer: the request reaches Redis and runs, then the connection
//! drops before the answer comes back. That is the fault a client cannot
//! tell from "never ran", and the one a control plane must survive.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixStream};

pub struct Proxy {
    /// `redis://127.0.0.1:<port>`.
    pub url: String,
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free local port and forwards each connection to the
    /// unix socket `upstream`.
    pub async fn start(upstream: &Path) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("redis://{}", listener.local_addr().unwrap());
        let armed: Arc<Mutex<Option<Vec<u8>>>> = Arc::default();
        let cuts = Arc::new(AtomicUsize::new(0));
        let upstream: PathBuf = upstream.to_path_buf();
        let (a, c) = (armed.clone(), cuts.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = UnixStream::connect(&upstream).await else {
                    continue;
                };
                tokio::spawn(pump(client, server, a.clone(), c.clone()));
            }
        });
        Proxy {
            url,
            armed,
            cuts,
            task,
        }
    }

    /// The next request whose bytes contain `needle` reaches Redis; its
    /// connection is then dropped before the answer is forwarded.
    pub fn lose_answer_to(&self, needle: &[u8]) {
        *self.armed.lock().unwrap() = Some(needle.to_vec());
    }

    /// How many answers were lost so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    client: tokio::net::TcpStream,
    server: UnixStream,
    armed: Arc<Mutex<Option<Vec<u8>>>>,
    cuts: Arc<AtomicUsize>,
) {
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let cut_up = cut.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            {
                let mut a = armed.lock().unwrap();
                let hit = a
                    .as_ref()
                    .is_some_and(|needle| buf[..n].windows(needle.len()).any(|w| w == needle));
                if hit {
                    *a = None;
                    cut_up.store(true, Ordering::SeqCst);
                }
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if cut.load(Ordering::SeqCst) {
                // The request ran (this is its answer, or part of it):
                // drop the connection with the answer unsent.
                cuts.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if cw.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever direction ends first ends the connection: both halves are
    // dropped, so the client sees the connection close.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}
