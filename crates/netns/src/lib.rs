//! A local network of Linux network namespaces with no route out: the
//! lab `meshward up` runs a mesh in, and the hosts of the tests that need
//! real addresses.
//!
//! # Topology
//!
//! [`Lab::create`] makes the hub, `<PREFIX><PID>n<K>-hub` (PID the creating
//! process's, K counting its labs): a bridge `br0`, up, holding the lab's
//! gateway addresses [`GATEWAY_V4`]/24 and [`GATEWAY_V6`]/64 and nothing
//! else (IPv6 address generation is off on the bridge and its ports), so
//! the hub's only routes are those two subnets, and it does not forward.
//! [`Lab::host`] makes `<PREFIX><PID>n<K>-<NAME>` with `lo` up and `eth0`,
//! one end of a veth pair whose other end (`v<I>`) is a port of the
//! bridge; `eth0` has `198.18.0.<I>/24` and `2001:2::<I>/64` (`nodad`:
//! usable at once), I counting the lab's hosts from 1. Both ends of a veth
//! pair are created in their namespaces (`ip -n HOST link add eth0 … peer
//! name v<I> netns HUB`), never in the root namespace, whose interfaces,
//! routes and firewall are never touched.
//!
//! Besides its subnets, a host routes the mesh's service addresses to the
//! gateway: [`SERVICES_V4`] (where the control plane allocates IPv4
//! service addresses) and [`SERVICES_V6`]. The kernel needs a route to an
//! address before capture rules can redirect a connection to it; whatever
//! is not redirected reaches the hub, which neither answers for nor
//! forwards those addresses, and ends there. Any other address has no
//! route: a connection fails at once with "Network is unreachable", and no
//! packet is sent.
//!
//! Each host has its own `/etc/resolv.conf` (through `ip netns exec`'s
//! `/etc/netns/NS/`), naming the gateway, which answers nothing: a name
//! resolves in a host only when capture sends the query to a meshward DNS
//! proxy (or a file of the host's own, [`Host::write_etc`], says so).
//!
//! # Cleanup
//!
//! Dropping a [`Lab`] kills whatever still runs in its namespaces (`ip
//! netns pids`, SIGKILL, a bounded wait) and deletes them with their
//! `/etc/netns` files. A process killed before its lab was dropped leaves
//! its namespaces behind; the next [`Lab::create`] with the same prefix
//! removes every `<PREFIX><PID>n<K>-…` namespace whose PID no longer runs.
//!
//! Namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN): the machine's,
//! or root of a user namespace of this process's own ([`userns`]), where
//! an ordinary user is.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub mod userns;

/// Where `ip netns` keeps its namespaces (one file each, named as the
/// namespace).
pub const NETNS_DIR: &str = "/run/netns";
/// Where `ip netns exec NS` finds files it mounts over `/etc` for NS.
pub const ETC_NETNS: &str = "/etc/netns";

/// The hub's addresses on the bridge: where hosts send service addresses.
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0xfe);
/// The service address ranges hosts route to the gateway.
pub const SERVICES_V4: &str = "240.240.0.0/16";
pub const SERVICES_V6: &str = "2001:2::/48";

/// The hosts of a lab are numbered from 1 (`198.18.0.1`) up to this.
pub const MAX_HOSTS: usize = 250;

/// How long removal waits for what it killed to be gone.
const SETTLE: Duration = Duration::from_secs(30);

/// Labs made by this process so far: the K in `<PREFIX><PID>n<K>-…`.
static LABS: AtomicU32 = AtomicU32::new(0);

/// The first `ip netns add` on a machine turns /run/netns into a shared
/// mount; two doing so at once can stack two mounts. One at a time here.
static NETNS_ADD: Mutex<()> = Mutex::new(());

/// Why a lab could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)")]
    NotRoot,
    #[error("`ip` (iproute2) is not installed: apt-get install iproute2")]
    NoIp,
    #[error("ip {command}: {stderr}")]
    Ip { command: String, stderr: String },
    #[error("host name {0:?}: use 1 to 32 of a-z, 0-9 and '-' (not \"hub\"), unique in the lab")]
    HostName(String),
    #[error("at most {MAX_HOSTS} hosts per lab")]
    TooManyHosts,
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("entering network namespace {netns}: {source}")]
    Enter { netns: String, source: nix::Error },
    #[error("making network namespace {netns}: {source}")]
    Make { netns: String, source: nix::Error },
}

/// Whether this process may make namespaces (it runs as root).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A hub namespace with a bridge, and the hosts on it; every namespace is
/// deleted on drop.
#[derive(Debug)]
pub struct Lab {
    id: String,
    /// Names of the namespaces made so far, the hub first.
    namespaces: Mutex<Vec<String>>,
}

impl Lab {
    /// A new lab, its namespaces named `<prefix><PID>n<K>-…` (`prefix`:
    /// lower-case letters only, so names stay short and parse back), no
    /// hosts yet. Removes what dead processes left with the same prefix
    /// first.
    pub fn create(prefix: &'static str) -> Result<Lab, LabError> {
        if !is_root() {
            return Err(LabError::NotRoot);
        }
        remove_stale(prefix);
        let k = LABS.fetch_add(1, Ordering::SeqCst);
        let lab = Lab {
            id: format!("{prefix}{}n{k}", std::process::id()),
            namespaces: Mutex::new(Vec::new()),
        };
        let (hub, _) = lab.add_namespace("hub")?;
        ip_batch(
            &hub,
            &format!(
                "link add br0 type bridge\n\
                 link set br0 addrgenmode none\n\
                 addr add {GATEWAY_V4}/24 dev br0\n\
                 addr add {GATEWAY_V6}/64 dev br0 nodad\n\
                 link set br0 up\n"
            ),
        )?;
        Ok(lab)
    }

    /// The hub's namespace: the bridge, nothing else.
    pub fn hub(&self) -> String {
        format!("{}-hub", self.id)
    }

    /// Every namespace made so far, the hub first.
    pub fn namespaces(&self) -> Vec<String> {
        self.lock().clone()
    }

    /// A new host named `name` (lower-case letters, digits and `-`; unique
    /// in the lab): its own namespace, plugged into the bridge, with the
    /// next addresses (see the module docs).
    pub fn host(&self, name: &str) -> Result<Host, LabError> {
        let valid = !name.is_empty()
            && name.len() <= 32
            && name != "hub"
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            return Err(LabError::HostName(name.to_owned()));
        }
        let (netns, index) = self.add_namespace(name)?;
        let host = Host {
            name: name.to_owned(),
            netns,
            index,
        };
        host.write_etc(
            "resolv.conf",
            &format!("nameserver {GATEWAY_V4}\noptions timeout:1 attempts:1\n"),
        )?;
        let (hub, port) = (self.hub(), format!("v{index}"));
        ip_batch(
            &host.netns,
            &format!(
                "link set lo up\n\
                 link add eth0 type veth peer name {port} netns {hub}\n\
                 addr add {}/24 dev eth0\n\
                 addr add {}/64 dev eth0 nodad\n\
                 link set eth0 up\n\
                 route add {SERVICES_V4} via {GATEWAY_V4}\n\
                 route add {SERVICES_V6} via {GATEWAY_V6}\n",
                host.ipv4(),
                host.ipv6()
            ),
        )?;
        ip_batch(
            &hub,
            &format!(
                "link set {port} addrgenmode none\n\
                 link set {port} master br0\n\
                 link set {port} up\n"
            ),
        )?;
        Ok(host)
    }

    /// Records, then makes, the namespace `<id>-<suffix>`: its name, and
    /// its place among the lab's namespaces (the hub's is 0, the hosts'
    /// count from 1).
    fn add_namespace(&self, suffix: &str) -> Result<(String, u8), LabError> {
        let name = format!("{}-{suffix}", self.id);
        let index = {
            let mut namespaces = self.lock();
            if namespaces.contains(&name) {
                return Err(LabError::HostName(suffix.to_owned()));
            }
            if namespaces.len() > MAX_HOSTS {
                return Err(LabError::TooManyHosts);
            }
            namespaces.push(name.clone());
            // At most MAX_HOSTS + 1 entries: fits.
            u8::try_from(namespaces.len() - 1).map_err(|_| LabError::TooManyHosts)?
        };
        let _one = NETNS_ADD.lock().unwrap_or_else(PoisonError::into_inner);
        if userns::in_initial() {
            ip(&["netns", "add", &name])?;
        } else {
            add_in_user_namespace(&name)?;
        }
        Ok((name, index))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.namespaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let namespaces = std::mem::take(&mut *self.lock());
        remove(&namespaces);
    }
}

/// One namespace of a lab, on its bridge.
#[derive(Clone, Debug)]
pub struct Host {
    name: String,
    netns: String,
    index: u8,
}

impl Host {
    /// The name it was given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its network namespace's name (`ip netns exec NETNS`).
    pub fn netns(&self) -> &str {
        &self.netns
    }

    pub fn ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, self.index)
    }

    pub fn ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, u16::from(self.index))
    }

    /// `ip netns exec NETNS PROGRAM`: `ip` enters the namespace (and
    /// mounts the host's `/etc/netns` files over `/etc`), then execs
    /// PROGRAM in its own process, so the child's pid is PROGRAM's.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.netns]).arg(program);
        command
    }

    /// Writes `/etc/netns/NETNS/FILE`, which processes started through
    /// [`Host::command`] see as `/etc/FILE` (`resolv.conf`, `hosts`).
    pub fn write_etc(&self, file: &str, text: &str) -> Result<(), LabError> {
        let dir = Path::new(ETC_NETNS).join(&self.netns);
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |source| LabError::Io { path, source }
        };
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let path = dir.join(file);
        std::fs::write(&path, text).map_err(io(&path))
    }
}

/// `ip netns add NAME` for a process in a user namespace of its own
/// (where `ip` fails: see [`userns`]): a thread makes the namespace and
/// binds it to `NETNS_DIR/NAME`, which keeps it after the thread ends.
fn add_in_user_namespace(name: &str) -> Result<(), LabError> {
    let path = Path::new(NETNS_DIR).join(name);
    std::fs::File::create_new(&path).map_err(|source| LabError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let made = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)?;
                nix::mount::mount(
                    Some("/proc/thread-self/ns/net"),
                    &path,
                    None::<&str>,
                    nix::mount::MsFlags::MS_BIND,
                    None::<&str>,
                )
            })
            .join()
    });
    if !matches!(made, Ok(Ok(()))) {
        // Not left behind to block a retry under the same name.
        let _ = std::fs::remove_file(&path);
    }
    match made {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(LabError::Make {
            netns: name.to_owned(),
            source,
        }),
        Err(_) => Err(LabError::Io {
            path: path.display().to_string(),
            source: std::io::Error::other("the thread making it panicked"),
        }),
    }
}

/// Moves the calling thread into network namespace `netns` (sockets it
/// makes from then on belong there, and stay there wherever they are
/// used). `nix`'s `setns` is safe.
pub fn enter(netns: &str) -> Result<(), LabError> {
    let path = Path::new(NETNS_DIR).join(netns);
    let file = std::fs::File::open(&path).map_err(|source| LabError::Io {
        path: path.display().to_string(),
        source,
    })?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| LabError::Enter {
        netns: netns.to_owned(),
        source,
    })
}

/// The namespaces `ip netns list` shows (names only).
pub fn list() -> Result<Vec<String>, LabError> {
    let out = run_ip(&["netns", "list"], None)?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// `ip ARGS`.
fn ip(args: &[&str]) -> Result<(), LabError> {
    run_ip(args, None).map(drop)
}

/// `ip` commands (one a line, as `ip -batch` reads them) in `netns`.
fn ip_batch(netns: &str, commands: &str) -> Result<(), LabError> {
    run_ip(&["-n", netns, "-batch", "-"], Some(commands)).map(drop)
}

/// Runs `ip`, returning its standard output; its standard error in the
/// error when it fails.
fn run_ip(args: &[&str], input: Option<&str>) -> Result<String, LabError> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LabError::NoIp,
            _ => LabError::Io {
                path: "ip".into(),
                source: e,
            },
        })?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A write error shows as ip's own failure below.
        let _ = stdin.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| LabError::Io {
        path: "ip".into(),
        source,
    })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(LabError::Ip {
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// The pid in a namespace name a lab with `prefix` makes
/// (`<prefix><PID>n<K>-…`).
fn creator(prefix: &str, netns: &str) -> Option<i32> {
    let rest = netns.strip_prefix(prefix)?;
    let (pid, rest) = rest.split_once('n')?;
    let (k, _) = rest.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(k) {
        return None;
    }
    pid.parse().ok()
}

/// Whether a process `pid` exists (a zombie counts: its parent reaps it).
fn exists(pid: i32) -> bool {
    !matches!(
        kill(Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// Removes the namespaces of labs with `prefix` whose process no longer runs.
pub fn remove_stale(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    let stale: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| creator(prefix, name).is_some_and(|pid| !exists(pid)))
        .collect();
    remove(&stale);
}

/// Kills what runs in `namespaces`, waits (bounded) for it to be gone, and
/// deletes them with their `/etc/netns` files. Never fails: it runs in
/// `Drop`.
fn remove(namespaces: &[String]) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let left: Vec<i32> = namespaces.iter().flat_map(|ns| pids_in(ns)).collect();
        if left.is_empty() || Instant::now() >= deadline {
            break;
        }
        for pid in left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(20)); // pacing: the poll interval of a bounded wait
    }
    for ns in namespaces {
        let _ = run_ip(&["netns", "del", ns], None);
        let _ = std::fs::remove_dir_all(Path::new(ETC_NETNS).join(ns));
    }
}

/// The processes in namespace `netns` (zombies are in none).
fn pids_in(netns: &str) -> Vec<i32> {
    run_ip(&["netns", "pids", netns], None)
        .map(|out| {
            out.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_to_their_creator_only_with_their_prefix() {
        assert_eq!(creator("mw", "mw123n4-hub"), Some(123));
        assert_eq!(creator("mwup", "mwup123n0-productpage"), Some(123));
        // Another prefix's names, and names of other shapes, are not ours.
        assert_eq!(creator("mw", "mwup123n0-productpage"), None);
        assert_eq!(creator("mw", "mw-cap-1-2"), None);
        assert_eq!(creator("mw", "mwa"), None);
        assert_eq!(creator("mw", "mw12n-x"), None);
    }

    #[test]
    fn host_addresses_follow_their_index() {
        let host = Host {
            name: "a".into(),
            netns: "mw1n0-a".into(),
            index: 7,
        };
        assert_eq!(host.ipv4(), Ipv4Addr::new(198, 18, 0, 7));
        assert_eq!(host.ipv6().to_string(), "2001:2::7");
    }
}
