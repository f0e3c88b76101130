//! Helpers for tests that run the built `meshward` binary: temp dirs, free
//! ports, processes killed on drop, a plain HTTP application, and a running
//! `meshward server` with tokens and certificates from it.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshward")
}

pub fn run(args: &[&str]) -> Output {
    let out = Command::new(bin()).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "meshward {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshward-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Kills the process when the test ends, however it ends.
pub struct Process(pub Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A plain HTTP/1.1 application: answers `NAME PATH` (after sleeping MS for
/// `/delay/MS`), one request per connection.
pub fn app(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                if let Some(ms) = path.strip_prefix("/delay/") {
                    std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
                }
                let body = format!("{name} {path}");
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    addr
}

/// GET over plain HTTP/1.1 with std only: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

pub struct Mesh {
    pub dir: PathBuf,
    pub data: PathBuf,
    pub ca_addr: String,
    pub server: Process,
}

pub fn server(dir: &Path) -> Mesh {
    server_with(dir, &[])
}

/// `meshward server` on a free port with `extra` arguments.
pub fn server_with(dir: &Path, extra: &[&str]) -> Mesh {
    let data = dir.join("data");
    let listen: &[&str] = if extra.contains(&"--listen") {
        &[]
    } else {
        &["--listen", "127.0.0.1:0"]
    };
    let mut child = Command::new(bin())
        .args(["server", "--data-dir", data.to_str().unwrap()])
        .args(listen)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut ca_addr = None;
    while ca_addr.is_none() {
        let line = lines.next().unwrap().unwrap();
        if let Some(rest) = line.strip_prefix("listening on https://") {
            ca_addr = rest.split_whitespace().next().map(str::to_owned);
        }
    }
    // Keep reading, so the server never writes to a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Mesh {
        dir: dir.to_owned(),
        data,
        ca_addr: ca_addr.unwrap(),
        server: Process(child),
    }
}

impl Mesh {
    /// Runs a `meshward` command against this server with the admin credential.
    pub fn admin(&self, args: &[&str]) -> Output {
        Command::new(bin())
            .args(args)
            .args(["--server", &format!("https://{}", self.ca_addr)])
            .args(["--data-dir", self.data.to_str().unwrap()])
            .output()
            .unwrap()
    }

    pub fn token(&self, ns: &str, sa: &str) -> PathBuf {
        let out = run(&[
            "token",
            "create",
            "--data-dir",
            self.data.to_str().unwrap(),
            "-n",
            ns,
            "--service-account",
            sa,
        ]);
        let path = self.dir.join(format!("{ns}-{sa}.token"));
        std::fs::write(&path, out.stdout).unwrap();
        path
    }

    /// Issues a certificate with `meshward ca issue`: (cert chain, key, root).
    pub fn issue(&self, ns: &str, sa: &str) -> (PathBuf, PathBuf, PathBuf) {
        let out = self.dir.join(format!("cert-{ns}-{sa}"));
        run(&[
            "ca",
            "issue",
            "--data-dir",
            self.data.to_str().unwrap(),
            "-n",
            ns,
            "--service-account",
            sa,
            "--out",
            out.to_str().unwrap(),
        ]);
        (
            out.join("cert-chain.pem"),
            out.join("key.pem"),
            out.join("root-cert.pem"),
        )
    }
}

/// GET over plain HTTP/1.1 until it answers `status`, for at most `within`.
pub fn eventually_status(addr: SocketAddr, path: &str, status: u16, within: Duration) {
    let deadline = std::time::Instant::now() + within;
    loop {
        let got = http_get(addr, path).map(|r| r.0);
        if got == Some(status) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "GET {path} via {addr}: wanted {status}, still {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
