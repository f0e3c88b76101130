//! Hosts for tests that need real addresses: one network namespace per
//! workload, joined by veth pairs to a bridge in a namespace with no route
//! out, so nothing a test sends can leave the machine. The topology is
//! `meshward-netns`'s (crates/netns), the same `meshward up` runs a mesh in;
//! this module adds what tests need: processes with the guarantees of the
//! common `spawn`, closures run inside a host, and failing loudly.
//!
//! # Topology
//!
//! As `meshward_netns` documents it: a hub with the bridge and the gateway
//! addresses (198.18.0.254, 2001:2::fe), hosts `198.18.0.<I>` and
//! `2001:2::<I>` on it, the service ranges routed to the gateway, no other
//! route, and a `resolv.conf` naming the gateway, which answers nothing.
//! The root namespace, which has a route out, is never used to reach a
//! host: every client runs in one.
//!
//! Every network is a world of its own: addresses, ports and interface
//! names repeat across networks, so a test may use fixed ports (8080) in
//! its hosts, and tests run in parallel threads and processes.
//!
//! # Processes
//!
//! [`Host::command`] is `ip netns exec NS PROGRAM`: `ip` enters the
//! namespace and then execs PROGRAM in its own process (it does not fork),
//! so a process started through the common [`spawn`] ([`Host::spawn`],
//! [`Host::output`], [`Host::run`]) has every guarantee a process started in
//! the root namespace has: its pid is the program's, its parent is the test
//! process (so `MESHWARD_PARENT_PID` and the parent-death signal hold), it
//! leads its own process group and is stopped with it on drop. Start
//! processes from the test's own thread, never inside [`Host::within`]:
//! the parent-death signal follows the thread that started a process.
//!
//! (`ip netns exec` also bind-mounts the files of `/etc/netns/NS/` over
//! `/etc` for the program: the host's own `resolv.conf`.)
//!
//! [`Host::within`] runs a closure on a fresh thread that has entered the
//! host's namespace (`setns`): sockets made there stay in that namespace
//! when handed back, for in-process listeners and clients.
//!
//! # Cleanup
//!
//! Dropping a [`Network`] kills whatever still runs in its namespaces
//! (`ip netns pids`, SIGKILL) and deletes them. Processes a test keeps in
//! [`Spawned`] handles should be stopped first, gracefully: declare the
//! `Network` before them, and locals drop in reverse order. A test process
//! killed before its networks were dropped leaves its namespaces behind;
//! the next [`Network::new`] on the machine removes every `mw<PID>n<K>-…`
//! namespace whose PID no longer runs (a reused PID only delays that).
//!
//! # Root
//!
//! Namespaces need root: tests start with [`require_root!`], which skips
//! them (saying so) otherwise. CI runs as root, so there they run.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::Duration;

use super::{START, Spawned, output, spawn, wait_for};

/// Every namespace name the harness makes starts with this, then the
/// creating process's pid, `n`, the network's number and `-`.
const PREFIX: &str = "mw";

/// Skips the test (returns from it, saying why) unless it runs as root.
/// (Unused in test binaries without namespaces, like the rest of `common`.)
#[allow(unused_macros)]
macro_rules! require_root {
    () => {
        if !$crate::common::netns::root_or_skip() {
            return;
        }
    };
}
#[allow(unused_imports)]
pub(crate) use require_root;

/// Whether the test runs as root; if not, prints that it is skipped.
pub fn root_or_skip() -> bool {
    if meshward_netns::is_root() {
        return true;
    }
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("this test");
    eprintln!("skipped: {test} needs root (network namespaces)");
    false
}

/// A hub namespace with a bridge, and the hosts on it; every namespace is
/// deleted on drop (see the module docs).
pub struct Network {
    test: String,
    lab: meshward_netns::Lab,
}

impl Network {
    /// A new network for `test` (its name, for messages): the hub and its
    /// bridge, no hosts yet. Removes what killed test processes left first.
    pub fn new(test: &str) -> Network {
        let lab = meshward_netns::Lab::create(PREFIX)
            .unwrap_or_else(|e| panic!("{test}: making a network: {e}"));
        Network {
            test: test.to_owned(),
            lab,
        }
    }

    /// The hub's namespace: the bridge, nothing else.
    pub fn hub(&self) -> String {
        self.lab.hub()
    }

    /// Every namespace it made so far, the hub first.
    pub fn namespaces(&self) -> Vec<String> {
        self.lab.namespaces()
    }

    /// A new host named `name` (lower-case letters, digits and `-`; unique
    /// in the network): its own namespace, plugged into the bridge, with
    /// the next addresses (see the module docs).
    pub fn host(&self, name: &str) -> Host {
        let host = self
            .lab
            .host(name)
            .unwrap_or_else(|e| panic!("{}: host {name}: {e}", self.test));
        Host(host)
    }
}

/// One host of a [`Network`]: a namespace with its own addresses.
#[derive(Clone, Debug)]
pub struct Host(meshward_netns::Host);

impl Host {
    /// The name it was given.
    pub fn name(&self) -> &str {
        self.0.name()
    }

    /// Its network namespace's name (for `ip -n`, `ip netns exec`).
    pub fn netns(&self) -> &str {
        self.0.netns()
    }

    /// `198.18.0.<I>`, on its `eth0`.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.0.ipv4()
    }

    /// `2001:2::<I>`, on its `eth0`.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.0.ipv6()
    }

    /// `program`, to be run in the host's namespace (`ip netns exec`, which
    /// execs it: see the module docs). Start it with the common [`spawn`]
    /// or [`output`], from the test's thread.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.0.command(program)
    }

    /// Starts `argv` (program, then arguments) in the host with the common
    /// [`spawn`]; `name` is used in messages.
    pub fn spawn(&self, name: &str, argv: &[impl AsRef<OsStr>]) -> Spawned {
        spawn(name, &mut self.argv(argv))
    }

    /// Runs `argv` in the host to completion within [`COMMAND`](super::COMMAND): its status
    /// and output, whatever the status.
    pub fn output(&self, argv: &[impl AsRef<OsStr>]) -> Output {
        output(&mut self.argv(argv))
    }

    /// [`Self::output`], failing the test unless the command succeeds.
    pub fn run(&self, argv: &[impl AsRef<OsStr>]) -> Output {
        let out = self.output(argv);
        assert!(
            out.status.success(),
            "in {}: {:?} {}: {}{}",
            self.name(),
            argv.iter().map(AsRef::as_ref).collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn argv(&self, argv: &[impl AsRef<OsStr>]) -> Command {
        let (program, args) = argv.split_first().expect("a program to run");
        let mut command = self.command(program);
        command.args(args);
        command
    }

    /// Runs `f` on a new thread that has entered the host's network
    /// namespace, and returns what it returns (a panic in `f` fails the
    /// caller). Sockets made in `f` belong to the host's namespace wherever
    /// they are used afterwards. Do not start processes in `f`.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|scope| {
            let thread = std::thread::Builder::new()
                .name(format!("in {}", self.netns()))
                .spawn_scoped(scope, || {
                    meshward_netns::enter(self.netns()).unwrap_or_else(|e| panic!("{e}"));
                    f()
                })
                .unwrap();
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Waits up to [`START`] until a TCP connection from this host to
    /// `addr` succeeds (and closes it).
    pub fn wait_for_port(&self, addr: SocketAddr) {
        self.within(|| {
            wait_for(START, || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                    .map(drop)
                    .map_err(|e| format!("connecting from {} to {addr}: {e}", self.name()))
            });
        });
    }
}

/// The namespaces `ip netns list` shows (names only), for tests that check
/// what exists.
pub fn list() -> Vec<String> {
    meshward_netns::list().unwrap_or_else(|e| panic!("{e}"))
}
