//! Labs without root: a user namespace in which this process is root.
//!
//! An ordinary user may create a user namespace (where the kernel allows
//! it, as rootless containers do), be root inside it, and there create
//! network namespaces, veth pairs, bridges and iptables rules that belong
//! to it and to nothing else: the machine's own network is out of its
//! reach. [`enter`] moves this process into a new user namespace with a
//! mount namespace of its own, mapping the user's uid and gid to root;
//! everything it starts afterwards inherits both.
//!
//! Two things of `ip netns` need writing where only the real root may:
//! the namespace files in [`NETNS_DIR`](crate::NETNS_DIR) and the per-host
//! files in [`ETC_NETNS`](crate::ETC_NETNS). [`enter`] gives this mount
//! namespace its own copy of their parents (`/run`, `/etc`): a tmpfs
//! holding a bind mount of every original entry, and the leaf itself new
//! and empty. Nothing changes outside; the lab's namespaces are bound into
//! that copy and vanish with the mount namespace, when the last process
//! in it ends, however it ends.
//!
//! `ip netns add` cannot be used inside (after making a namespace it
//! returns to the machine's, which a user namespace may not enter), so a
//! lab there makes its namespaces itself ([`crate::Lab`], through
//! [`in_initial`]).
//!
//! [`join`] enters such a process's namespaces from another process of the
//! same user, as `meshward exec` does.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, setns, unshare};
use nix::unistd::{getegid, geteuid};

/// Why a user namespace could not be entered or set up.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    #[error(
        "this kernel does not let an ordinary user create a user namespace ({0}); \
         it may be turned off (sysctl user.max_user_namespaces, \
         kernel.unprivileged_userns_clone, or an AppArmor restriction such as \
         kernel.apparmor_restrict_unprivileged_userns)"
    )]
    Refused(nix::Error),
    #[error("a user namespace must be entered before any thread starts")]
    Threads,
    #[error("{what}: {source}")]
    Setup {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Mount { what: String, source: nix::Error },
    #[error("entering the namespaces of process {pid}: {source}")]
    Join { pid: i32, source: std::io::Error },
}

/// Moves this process (which must have a single thread) into a new user
/// namespace and mount namespace, as root there, with writable
/// [`NETNS_DIR`](crate::NETNS_DIR) and [`ETC_NETNS`](crate::ETC_NETNS)
/// of its own (see the module docs).
pub fn enter() -> Result<(), UsernsError> {
    let (uid, gid) = (geteuid(), getegid());
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS).map_err(|e| match e {
        nix::Error::EINVAL => UsernsError::Threads,
        e => UsernsError::Refused(e),
    })?;
    // An unprivileged process may map its own ids, once setgroups is off.
    write("/proc/self/setgroups", "deny")?;
    write("/proc/self/uid_map", &format!("0 {uid} 1"))?;
    write("/proc/self/gid_map", &format!("0 {gid} 1"))?;
    // Nothing mounted here from now on reaches the machine's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|source| UsernsError::Mount {
        what: "making / private".into(),
        source,
    })?;
    fresh_directory(Path::new(crate::NETNS_DIR))?;
    fresh_directory(Path::new(crate::ETC_NETNS))?;
    Ok(())
}

/// Whether this process is in the machine's own user namespace (the one
/// whose uid map is the identity over every id).
pub fn in_initial() -> bool {
    std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|map| {
        let fields: Vec<&str> = map.split_whitespace().collect();
        fields == ["0", "0", "4294967295"]
    })
}

/// Enters the user and mount namespaces of process `pid` (one that called
/// [`enter`]): this process (single-threaded) is then root there and sees
/// its lab. Only the user who made the namespace (or root) may.
pub fn join(pid: i32) -> Result<(), UsernsError> {
    let open = |ns: &str| {
        std::fs::File::open(format!("/proc/{pid}/ns/{ns}"))
            .map_err(|source| UsernsError::Join { pid, source })
    };
    let (user, mnt) = (open("user")?, open("mnt")?);
    let fail = |e: nix::Error| UsernsError::Join {
        pid,
        source: std::io::Error::from(e),
    };
    setns(&user, CloneFlags::CLONE_NEWUSER).map_err(fail)?;
    setns(&mnt, CloneFlags::CLONE_NEWNS).map_err(fail)
}

/// Makes `dir` a new, empty, writable directory in this mount namespace:
/// its parent becomes a tmpfs holding every other entry of the original
/// (symbolic links copied, everything else bound in place, with what is
/// mounted below it), and `dir` itself a new directory there.
fn fresh_directory(dir: &Path) -> Result<(), UsernsError> {
    let (Some(parent), Some(leaf)) = (dir.parent(), dir.file_name()) else {
        return Err(UsernsError::Setup {
            what: format!("{}: not a directory below another", dir.display()),
            source: std::io::ErrorKind::InvalidInput.into(),
        });
    };
    let setup = |what: &Path| {
        let what = what.display().to_string();
        move |source| UsernsError::Setup { what, source }
    };
    // The original stays reachable through this descriptor once the tmpfs
    // covers its path: /proc/self/fd/N/ENTRY.
    let original = std::fs::File::open(parent).map_err(setup(parent))?;
    let entries: Vec<(std::ffi::OsString, std::fs::FileType)> = std::fs::read_dir(parent)
        .map_err(setup(parent))?
        .filter_map(|e| {
            let e = e.ok()?;
            Some((e.file_name(), e.file_type().ok()?))
        })
        .filter(|(name, _)| name != leaf)
        .collect();
    mount(
        Some("tmpfs"),
        parent,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )
    .map_err(|source| UsernsError::Mount {
        what: format!("a tmpfs on {}", parent.display()),
        source,
    })?;
    let through = PathBuf::from(format!("/proc/self/fd/{}", original.as_raw_fd()));
    for (name, kind) in entries {
        let (from, to) = (through.join(&name), parent.join(&name));
        if kind.is_symlink() {
            let target = std::fs::read_link(&from).map_err(setup(&to))?;
            std::os::unix::fs::symlink(target, &to).map_err(setup(&to))?;
            continue;
        }
        if kind.is_dir() {
            std::fs::create_dir(&to).map_err(setup(&to))?;
        } else {
            std::fs::File::create(&to).map_err(setup(&to))?;
        }
        mount(
            Some(&from),
            &to,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|source| UsernsError::Mount {
            what: format!("binding {} in place", to.display()),
            source,
        })?;
    }
    std::fs::create_dir(dir).map_err(setup(dir))
}

fn write(path: &str, text: &str) -> Result<(), UsernsError> {
    std::fs::write(path, text).map_err(|source| UsernsError::Setup {
        what: format!("writing {text:?} to {path}"),
        source,
    })
}
