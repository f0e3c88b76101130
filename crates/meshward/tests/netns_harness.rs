//! The network-namespace harness (`common/netns.rs`) itself: hosts reach
//! each other over the bridge and nothing else, processes in them keep the
//! guarantees of the common `spawn`, and no namespace or process outlives
//! its test, even a test process that was killed. Root only; skipped,
//! saying so, otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use common::netns::{self, Host, Network, require_root};
use common::*;
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Where the demo app listens in its host: every network is its own world,
/// so a fixed port is free.
const PORT: u16 = 8080;

/// `meshward demo-app` named `name` in `host`, serving HTTP on every
/// address of it (IPv4 and IPv6) at [`PORT`].
fn demo_app(host: &Host, name: &str) -> Spawned {
    let listen = format!("[::]:{PORT}");
    let app = host.spawn(
        &format!("demo-app in {}", host.name()),
        &[bin(), "demo-app", "--name", name, "--listen", &listen],
    );
    app.logs
        .wait_for_stderr(&format!("demo-app {name}: "), START);
    app
}

/// A process as /proc/PID/stat shows it: (start time in clock ticks since
/// boot, state, parent). Pid and start time are its identity (a pid can be
/// reused, not both).
fn stat(pid: i32) -> Option<(u64, char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (COMM) STATE PPID ..." — COMM may hold spaces and ')'; the start
    // time is field 22, the 20th after COMM.
    let fields: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
    Some((
        fields.get(19)?.parse().ok()?,
        fields.first()?.chars().next()?,
        fields.get(1)?.parse().ok()?,
    ))
}

/// A process seen once (pid and start time): whether it still runs, and
/// SIGKILL on drop if it does, so a failing test leaves nothing behind.
struct Seen {
    pid: i32,
    start: u64,
}

impl Seen {
    fn new(pid: i32) -> Seen {
        let (start, state, _) = stat(pid).unwrap_or_else(|| panic!("no process {pid}"));
        assert_ne!(state, 'Z', "process {pid} has exited already");
        Seen { pid, start }
    }

    fn running(&self) -> bool {
        stat(self.pid).is_some_and(|(start, state, _)| start == self.start && state != 'Z')
    }
}

impl Drop for Seen {
    fn drop(&mut self) {
        if self.running() {
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
        }
    }
}

/// The network namespace a process is in (the inode of /proc/PID/ns/net).
fn netns_of(pid: i32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino()
}

/// The network namespace `ip netns` names `name`.
fn netns_named(name: &str) -> u64 {
    std::fs::metadata(format!("/run/netns/{name}"))
        .unwrap()
        .ino()
}

/// `ip -n NETNS ARGS`: its standard output.
fn ip_in(netns: &str, args: &[&str]) -> String {
    let out = output(Command::new("ip").args(["-n", netns]).args(args));
    assert!(out.status.success(), "ip -n {netns} {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn hosts_reach_each_other_over_tcp_by_ipv4_and_ipv6() {
    require_root!();
    let net = Network::new("reach");
    let a = net.host("a");
    let b = net.host("b");
    assert_eq!(
        (a.ipv4(), b.ipv4()),
        (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2))
    );
    assert_eq!(
        (a.ipv6(), b.ipv6()),
        (
            "2001:2::1".parse::<Ipv6Addr>().unwrap(),
            "2001:2::2".parse::<Ipv6Addr>().unwrap()
        )
    );
    let _app = demo_app(&a, "a");

    for (server, client) in [
        (IpAddr::from(a.ipv4()), IpAddr::from(b.ipv4())),
        (a.ipv6().into(), b.ipv6().into()),
    ] {
        let addr = SocketAddr::new(server, PORT);
        b.wait_for_port(addr);
        // curl, unmodified, in b: the answer is a's, and b called from its
        // own address on the bridge.
        let out = b.run(&[
            "curl",
            "-sS",
            "--max-time",
            "30",
            "-w",
            "\n%{local_ip}",
            &format!("http://{addr}/hello"),
        ]);
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, local_ip) = text.rsplit_once('\n').unwrap();
        let seen: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(seen["name"], "a", "{body}");
        assert_eq!(seen["path"], "/hello", "{body}");
        assert_eq!(local_ip.parse::<IpAddr>().unwrap(), client, "{text}");
    }
}

#[test]
fn a_process_in_a_host_is_the_program_itself_in_the_hosts_namespace() {
    require_root!();
    let net = Network::new("process");
    let a = net.host("a");
    let app = demo_app(&a, "a");
    let pid = i32::try_from(app.pid()).unwrap();
    // `ip netns exec` exec'd the program: the pid `spawn` holds is the
    // demo app's, its parent is this test process (so the parent-death
    // signal it asked for through MESHWARD_PARENT_PID is tied to us; it
    // checked that parent at start), and it leads its own process group.
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        std::fs::canonicalize(bin()).unwrap()
    );
    assert_eq!(
        stat(pid).unwrap().2,
        i32::try_from(std::process::id()).unwrap()
    );
    assert_eq!(
        nix::unistd::getpgid(Some(Pid::from_raw(pid))).unwrap(),
        Pid::from_raw(pid)
    );
    assert_eq!(netns_of(pid), netns_named(a.netns()));
    assert_ne!(
        netns_of(pid),
        netns_of(i32::try_from(std::process::id()).unwrap())
    );
}

#[test]
fn hosts_and_hub_have_no_route_out() {
    require_root!();
    let net = Network::new("no-route");
    let a = net.host("a");
    let _b = net.host("b");

    // The hub: the gateway addresses on the bridge and nothing else, so
    // its only routes are the two subnets; it does not forward.
    let hub = net.hub();
    let v4 = ip_in(&hub, &["-4", "route", "show", "table", "main"]);
    assert!(
        v4.lines().all(|l| l.starts_with("198.18.0.0/24 dev br0 ")),
        "{v4}"
    );
    let v6 = ip_in(&hub, &["-6", "route", "show", "table", "main"]);
    assert!(
        v6.lines()
            .all(|l| l.starts_with("2001:2::/64 dev br0 ") || l.starts_with("multicast ")),
        "{v6}"
    );
    for (key, expected) in [
        ("net.ipv4.ip_forward", "0"),
        ("net.ipv6.conf.all.forwarding", "0"),
    ] {
        let out = Command::new("ip")
            .args(["netns", "exec", &hub, "sysctl", "-n", key])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            expected,
            "{key}"
        );
    }
    // A host: its subnets on eth0 (and link-local), the service ranges via
    // the gateway, no default route.
    for host in net.namespaces().iter().skip(1) {
        assert_eq!(ip_in(host, &["-4", "route", "show", "default"]), "");
        assert_eq!(ip_in(host, &["-6", "route", "show", "default"]), "");
        let v4 = ip_in(host, &["-4", "route", "show"]);
        assert!(
            v4.lines().all(|l| l.starts_with("198.18.0.0/24 dev eth0 ")
                || l.starts_with("240.240.0.0/16 via 198.18.0.254 dev eth0")),
            "{host}: {v4}"
        );
        let v6 = ip_in(host, &["-6", "route", "show"]);
        assert!(
            v6.lines().all(|l| l.starts_with("2001:2::/64 dev eth0 ")
                || l.starts_with("2001:2::/48 via 2001:2::fe dev eth0")
                || l.starts_with("fe80::/64 ")),
            "{host}: {v6}"
        );
    }
    // The hub has no route for a service address: what reaches it ends there.
    for address in ["240.240.0.1", "2001:2:0:1::1"] {
        let out = Command::new("ip")
            .args(["-n", &hub, "route", "get", address])
            .output()
            .unwrap();
        assert!(!out.status.success(), "the hub routes {address}");
    }

    // Processes in a host resolve through the gateway, not the machine's
    // resolver.
    let resolv = a.run(&["cat", "/etc/resolv.conf"]);
    assert_eq!(
        String::from_utf8_lossy(&resolv.stdout).lines().next(),
        Some("nameserver 198.18.0.254")
    );

    // Any other address (still in the benchmark range, so even a broken
    // harness would send nowhere real): no route, refused by the host's own
    // kernel before any packet.
    let outside = SocketAddr::from((Ipv4Addr::new(198, 19, 0, 1), 80));
    let error = a
        .within(|| TcpStream::connect_timeout(&outside, SETTLE))
        .expect_err("a connection out of the network");
    assert_eq!(
        error.kind(),
        ErrorKind::NetworkUnreachable,
        "{outside}: {error}"
    );
    assert_eq!(
        error.raw_os_error(),
        Some(nix::errno::Errno::ENETUNREACH as i32)
    );
}

#[test]
fn sockets_made_within_a_host_belong_to_it() {
    require_root!();
    let net = Network::new("within");
    let a = net.host("a");
    let b = net.host("b");
    // a's address exists only in a's namespace: binding it succeeds there
    // (and not here, in the root namespace).
    let at = SocketAddr::from((a.ipv4(), 9000));
    assert_eq!(
        TcpListener::bind(at).unwrap_err().kind(),
        ErrorKind::AddrNotAvailable
    );
    let listener = a.within(|| TcpListener::bind(at)).unwrap();
    // The listener serves from this thread; b's client is made in b.
    let mut client = b
        .within(|| TcpStream::connect_timeout(&at, SETTLE))
        .unwrap();
    client.write_all(b"hello from b").unwrap();
    drop(client);
    let (mut accepted, from) = listener.accept().unwrap();
    assert_eq!(from.ip(), IpAddr::from(b.ipv4()));
    let mut got = String::new();
    accepted.set_read_timeout(Some(SETTLE)).unwrap();
    accepted.read_to_string(&mut got).unwrap();
    assert_eq!(got, "hello from b");
}

#[test]
fn dropping_the_network_removes_its_namespaces_and_what_runs_in_them() {
    require_root!();
    let net = Network::new("drop");
    let a = net.host("a");
    let _b = net.host("b");
    let namespaces = net.namespaces();
    assert_eq!(namespaces.len(), 3, "{namespaces:?}");
    let listed = netns::list();
    assert!(
        namespaces.iter().all(|ns| listed.contains(ns)),
        "{listed:?}"
    );

    // A process that left its process group and session (so no handle
    // stops it): the network's drop must.
    let out = a.run(&[
        "sh",
        "-c",
        "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!",
    ]);
    let pid: i32 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let stray = Seen::new(pid);
    assert_eq!(netns_of(pid), netns_named(a.netns()));
    assert_eq!(
        nix::unistd::getsid(Some(Pid::from_raw(pid))).unwrap(),
        Pid::from_raw(pid)
    );
    // And one with a handle, dropped first, as declared after the network.
    let app = demo_app(&a, "a");
    let app_seen = Seen::new(i32::try_from(app.pid()).unwrap());
    drop(app);
    assert!(!app_seen.running());

    drop(net);
    // Drop waited for what it killed: nothing of it runs, no name is left.
    assert!(!stray.running(), "process {pid} outlived the network");
    let listed = netns::list();
    assert!(
        namespaces.iter().all(|ns| !listed.contains(ns)),
        "{namespaces:?} still in {listed:?}"
    );
    // Nor their resolver files.
    for ns in &namespaces {
        let dir = std::path::Path::new("/etc/netns").join(ns);
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}

#[test]
fn a_namespace_named_for_a_dead_process_is_removed_by_the_next_network() {
    require_root!();
    // A pid that was a process and is no more (reaped), and a live one.
    let mut gone = spawn("true", &mut Command::new("true"));
    gone.wait_exit(COMMAND);
    let dead = gone.pid();
    assert!(
        stat(i32::try_from(dead).unwrap()).is_none(),
        "pid {dead} was reused already"
    );
    let live = spawn("sleep", Command::new("sleep").arg("600"));
    let (stale, kept) = (format!("mw{dead}n0-a"), format!("mw{}n0-a", live.pid()));
    for ns in [&stale, &kept] {
        assert!(
            output(Command::new("ip").args(["netns", "add", ns]))
                .status
                .success()
        );
    }
    let _kept_removed = Removed(kept.clone());

    let _net = Network::new("sweep");
    let listed = netns::list();
    // (Another test's `Network::new` may have swept first: either way, it
    // is gone once a network was made after its creator died.)
    assert!(!listed.contains(&stale), "{stale} is still in {listed:?}");
    assert!(
        listed.contains(&kept),
        "{kept} (live pid) was removed: {listed:?}"
    );
}

/// Deletes a namespace the test made by hand, however the test ends.
struct Removed(String);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Run by [`a_killed_test_run_leaves_no_process_and_its_namespaces_go`] in
/// a test process of its own, which it kills: makes a network with a host
/// running the demo app, says so, and holds it until stdin closes.
#[test]
#[ignore = "run (and killed) by a_killed_test_run_leaves_no_process_and_its_namespaces_go"]
fn inner_test_run_holding_a_network() {
    require_root!();
    let net = Network::new("inner");
    let a = net.host("a");
    let app = demo_app(&a, "a");
    println!("inner: ready {} {}", app.pid(), net.namespaces().join(" "));
    // Until the outer test kills this process (or, failing, closes stdin).
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

#[test]
fn a_killed_test_run_leaves_no_process_and_its_namespaces_go() {
    require_root!();
    let mut inner = spawn(
        "inner test run",
        Command::new(std::env::current_exe().unwrap()).args([
            "inner_test_run_holding_a_network",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads",
            "1",
        ]),
    );
    let line = inner.logs.wait_for_stdout("inner: ready", START);
    let (_, ready) = line.split_once("inner: ready").unwrap();
    let mut words = ready.split_whitespace();
    let app = Seen::new(words.next().unwrap().parse().unwrap());
    let namespaces: Vec<String> = words.map(str::to_owned).collect();
    assert_eq!(namespaces.len(), 2, "{line}");

    // SIGKILL: the test process cleans up nothing.
    let inner_pid = Pid::from_raw(i32::try_from(inner.pid()).unwrap());
    killpg(inner_pid, Signal::SIGKILL).unwrap();
    inner.wait_exit(SETTLE);
    // The demo app in the host was tied to the test process through
    // `ip netns exec`: the parent-death signal stopped it.
    wait_until(SETTLE, "the demo app to stop with its test process", || {
        !app.running()
    });
    // Its namespaces are stale now; the next network removes them.
    let _net = Network::new("after-kill");
    let listed = netns::list();
    assert!(
        namespaces.iter().all(|ns| !listed.contains(ns)),
        "{namespaces:?} still in {listed:?}"
    );
}
