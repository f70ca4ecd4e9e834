//! Escape: tries to break out of the sandbox (files, env, args, stdin, network) and reports what happened as JSON.
//!
//! Every probe records `{"ok": bool, "detail": "..."}`; a correct host makes
//! every `ok` false (or the list empty).

wit_bindgen::generate!({ world: "agent", path: "../../wit" });

use serde_json::{Value, json};
use std::io::Read;
use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::time::Duration;

struct Escape;

fn probe<T>(r: std::io::Result<T>, show: impl FnOnce(T) -> String) -> Value {
    match r {
        Ok(v) => json!({"ok": true, "detail": show(v)}),
        Err(e) => json!({"ok": false, "detail": e.to_string()}),
    }
}

impl Guest for Escape {
    fn run(_input: String) -> Result<String, String> {
        let passwd = probe(std::fs::read_to_string("/etc/passwd"), |s| {
            format!("{} bytes", s.len())
        });
        let root = probe(std::fs::read_dir("/"), |d| {
            let names: Vec<String> = d
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.join(",")
        });
        let cwd = probe(std::fs::read_dir("."), |d| format!("{} entries", d.count()));
        let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
        let args: Vec<String> = std::env::args().collect();
        let mut stdin = Vec::new();
        let stdin_read = std::io::stdin().read_to_end(&mut stdin).unwrap_or(0);
        let tcp = probe(
            TcpStream::connect_timeout(&"127.0.0.1:6379".parse().unwrap(), Duration::from_secs(1)),
            |s| format!("connected to {:?}", s.peer_addr()),
        );
        let udp = probe(UdpSocket::bind("0.0.0.0:0"), |s| {
            format!("bound {:?}", s.local_addr())
        });
        let dns = probe(("localhost", 80).to_socket_addrs(), |a| {
            format!("{:?}", a.collect::<Vec<_>>())
        });
        Ok(json!({
            "passwd": passwd,
            "list_root": root,
            "list_cwd": cwd,
            "env": env,
            "args": args,
            "stdin_bytes": stdin_read,
            "tcp": tcp,
            "udp": udp,
            "dns": dns,
        })
        .to_string())
    }
}

export!(Escape);
