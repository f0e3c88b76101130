//! Test support: scratch network namespaces, so that tests run the real
//! iptables without ever touching the machine's own rules, and a
//! transcript to read a dry run back.
//!
//! Compiled with the `testing` feature (the crate's own tests enable it;
//! other crates' tests may too).

// Test support: a failed setup step must fail the test at once, where it
// happened, so unwrap and expect are the right tools here, as in tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::Runner;

/// True when the test runs as root; otherwise says that it is skipped.
/// Use as `if !testing::root_or_skip() { return; }`.
pub fn root_or_skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    println!("skipped: needs root (creates a network namespace)");
    false
}

/// A network namespace of its own (`mw-cap-<pid>-<n>`), deleted when
/// dropped, also when the test panics. Its rules start empty.
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new() -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "mw-cap-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let status = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .expect("running ip netns add");
        assert!(status.success(), "ip netns add {name}: {status}");
        Netns { name }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A runner whose commands run in this namespace.
    pub fn runner(&self) -> Runner {
        Runner::system().in_netns(&self.name)
    }

    /// Runs a program in the namespace; its standard output, or a panic
    /// with its standard error.
    pub fn exec(&self, program: &str, args: &[&str]) -> String {
        let output = Command::new("ip")
            .args(["netns", "exec", &self.name, program])
            .args(args)
            .output()
            .expect("running ip netns exec");
        assert!(
            output.status.success(),
            "{program} {args:?} in {}: {}\n{}",
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Joins this namespace to `other` with a veth pair (`eth0` in both),
    /// each end with its addresses (IPv6 ones without duplicate address
    /// detection, so they work at once), and brings `lo` up in both. No
    /// route leads out of either namespace.
    pub fn link(&self, other: &Netns, mine: &[&str], theirs: &[&str]) {
        ip(&[
            "-n",
            &self.name,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &other.name,
        ]);
        for (ns, addrs) in [(self, mine), (other, theirs)] {
            for addr in addrs {
                let mut args = vec!["-n", &ns.name, "addr", "add", addr, "dev", "eth0"];
                if addr.contains(':') {
                    args.push("nodad");
                }
                ip(&args);
            }
            ip(&["-n", &ns.name, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        }
    }

    /// A socket that belongs to this namespace: made on a thread that
    /// entered it (a socket keeps the namespace it was made in, wherever
    /// it is used later).
    pub fn socket(&self, domain: socket2::Domain) -> socket2::Socket {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("opening the namespace");
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
                .expect("socket")
        })
        .join()
        .expect("the socket thread")
    }

    /// A TCP listener in this namespace on `addr` (IPv6 ones IPv6-only).
    pub fn listen(&self, addr: SocketAddr) -> TcpListener {
        let socket = self.socket(socket2::Domain::for_address(addr));
        if addr.is_ipv6() {
            socket.set_only_v6(true).expect("IPV6_V6ONLY");
        }
        socket.set_reuse_address(true).expect("SO_REUSEADDR");
        socket
            .bind(&addr.into())
            .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        socket.listen(16).expect("listen");
        socket.into()
    }

    /// `iptables-save` (or `ip6tables-save`) of every table, without the
    /// comment lines (which carry a timestamp) and with chain counters
    /// zeroed, so two states compare by their rules.
    pub fn rules(&self, save: &str) -> String {
        self.exec(save, &[])
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| match line.find(" [") {
                Some(at) if line.starts_with(':') => format!("{} [0:0]\n", &line[..at]),
                _ => format!("{line}\n"),
            })
            .collect()
    }
}

/// Which of `listeners` gets the next connection (its index), and that
/// connection; fails the test if none does within 10 s.
pub fn accept_any(listeners: &[&TcpListener]) -> (usize, TcpStream) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds: Vec<PollFd> = listeners
        .iter()
        .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
        .collect();
    let ready = poll(&mut fds, PollTimeout::from(10_000u16)).expect("poll");
    assert!(ready > 0, "no listener got a connection within 10 s");
    let index = fds
        .iter()
        .position(|fd| fd.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
        .expect("a ready listener");
    let (stream, _) = listeners[index].accept().expect("accept");
    (index, stream)
}

/// Where a redirected connection was going (`SO_ORIGINAL_DST`, or
/// `IP6T_SO_ORIGINAL_DST`).
pub fn original_dst(stream: &TcpStream) -> SocketAddr {
    let socket = socket2::SockRef::from(stream);
    let addr = if stream.local_addr().expect("local address").is_ipv6() {
        socket.original_dst_v6()
    } else {
        socket.original_dst_v4()
    };
    addr.expect("original destination")
        .as_socket()
        .expect("an IP address")
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("running ip");
    assert!(status.success(), "ip {}: {status}", args.join(" "));
}

impl Default for Netns {
    fn default() -> Self {
        Netns::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A writer whose text can be read back: give a clone to
/// [`Runner::dry_run`], then read [`Transcript::text`].
#[derive(Clone, Default)]
pub struct Transcript(Arc<Mutex<Vec<u8>>>);

impl Transcript {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

impl Write for Transcript {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
