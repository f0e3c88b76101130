//! Attack: leave a mesh behind. `meshward up` and the test harness are
//! ended the ways a terminal, a user and CI end them — SIGHUP, SIGKILL, the
//! whole test process killed — and every process they started must exit.
//!
//! The mesh is small: two workloads with proxies, one running `meshward
//! demo-app`, the other a `meshward.io/command` shell that also starts a
//! background job (`sleep 600 & demo-app`), so grandchildren are covered.
//! Processes are found by walking /proc, never by name: `up` is started
//! with a variable unique to the test ([`MARK_ENV`]) that everything it
//! starts inherits; parent links and process groups are read from
//! /proc/PID/stat.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Set on `meshward up` (and so inherited by all it starts) with a value
/// unique to one test.
const MARK_ENV: &str = "MESHWARD_ORPHANS_TEST_MARK";

/// `up` picks free ports by binding and releasing them: one mesh at a time.
static ONE_MESH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_mesh() -> std::sync::MutexGuard<'static, ()> {
    ONE_MESH
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A process as /proc shows it.
#[derive(Debug, Clone)]
struct Proc {
    pid: i32,
    ppid: i32,
    pgrp: i32,
    state: char,
    /// Start time in clock ticks since boot: with the pid, the process's
    /// identity (a pid can be reused, not both).
    start: u64,
    argv: Vec<String>,
}

impl Proc {
    fn read(pid: i32) -> Option<Proc> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "PID (COMM) STATE PPID PGRP ..." — COMM may hold spaces and ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        Some(Proc {
            pid,
            state: fields.first()?.chars().next()?,
            ppid: fields.get(1)?.parse().ok()?,
            pgrp: fields.get(2)?.parse().ok()?,
            // Field 22 of stat; `fields` starts at field 3.
            start: fields.get(19)?.parse().ok()?,
            argv: cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect(),
        })
    }

    /// `PROGRAM ARG1` with the program's directory left out: what it is.
    fn kind(&self) -> String {
        let program = self.argv.first().map_or("", |p| {
            Path::new(p)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(p)
        });
        format!("{program} {}", self.argv.get(1).map_or("", String::as_str))
    }

    /// Still running: the same process (pid and start time), not a zombie.
    fn alive(&self) -> bool {
        Proc::read(self.pid).is_some_and(|p| p.start == self.start && p.state != 'Z')
    }
}

/// Every running process (zombies excluded) whose environment holds
/// `MARK_ENV=mark`.
fn marked(mark: &str) -> Vec<Proc> {
    let entry = format!("{MARK_ENV}={mark}");
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            // Other users' processes cannot be read: they are not ours.
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == entry.as_bytes()))
        })
        .filter_map(Proc::read)
        .filter(|p| p.state != 'Z')
        .collect()
}

/// How many of each kind of process, for comparing with what `up` starts.
fn census(procs: &[Proc]) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    for p in procs {
        *kinds.entry(p.kind()).or_default() += 1;
    }
    kinds
}

/// What `up` starts for the tiny mesh, besides the worker's shell (which
/// may or may not hand its last command over with exec): the control
/// plane, two proxies, two demo-apps (one under the shell), the guard and
/// the shell's background job.
fn assert_whole_mesh(procs: &[Proc]) {
    let kinds = census(procs);
    for (kind, count) in [
        ("meshward server", 1),
        ("meshward proxy", 2),
        ("meshward demo-app", 2),
        ("meshward guard", 1),
        ("sleep 600", 1),
    ] {
        assert_eq!(
            kinds.get(kind).copied().unwrap_or(0),
            count,
            "{kind}: {kinds:?}"
        );
    }
}

/// Waits until none of `procs` is running; fails naming the survivors.
fn assert_all_exit(procs: &[Proc], after: &str) {
    wait_for(SETTLE, || {
        let left: Vec<&Proc> = procs.iter().filter(|p| p.alive()).collect();
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("still running after {after}: {left:#?}"))
        }
    });
}

/// A copy of the tiny mesh in `root`: two workloads, both with proxies.
fn tiny_mesh(root: &Path) -> std::path::PathBuf {
    let dir = root.join("mesh");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("workloads.yaml"),
        format!(
            r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: web, namespace: demo}}
spec: {{serviceAccount: web, labels: {{app: web}}, ports: {{http: 80}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: worker
  namespace: demo
  annotations:
    meshward.io/command: "sleep 600 & '{bin}' demo-app --name {{name}} --listen 127.0.0.1:{{port}}"
spec: {{serviceAccount: worker, labels: {{app: worker}}, ports: {{http: 80}}}}
"#,
            bin = bin()
        ),
    )
    .unwrap();
    dir
}

/// A mark no other test or run shares.
fn unique_mark(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{}-{name}-{nanos}", std::process::id())
}

/// `meshward up` on the tiny mesh, marked with `mark`; returns once it is
/// ready, with what it wrote to up.json.
fn up(name: &str, mark: &str) -> (Spawned, serde_json::Value) {
    let root = tempdir(name);
    let dir = tiny_mesh(&root);
    let data = root.join("data");
    let mut up = spawn(
        "meshward up",
        meshward()
            .args(["up", "--explicit", dir.to_str().unwrap(), "--data-dir"])
            .arg(&data)
            .env(MARK_ENV, mark),
    );
    let up_json = data.join("up.json");
    let text = wait_for(START, || {
        up.assert_running();
        std::fs::read_to_string(&up_json).map_err(|e| format!("{}: {e}", up_json.display()))
    });
    (up, serde_json::from_str(&text).unwrap())
}

/// Whether a process catches `signal` (`SigCgt` in /proc/PID/status).
fn catches(pid: u32, signal: Signal) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (signal as u64 - 1)) != 0)
}

#[test]
fn sighup_to_up_stops_everything_it_started() {
    let _one = one_mesh();
    let mark = unique_mark("sighup");
    let (mut up, mesh) = up("orphans-sighup", &mark);
    let up_pid = i32::try_from(up.pid()).unwrap();
    let children: Vec<Proc> = marked(&mark)
        .into_iter()
        .filter(|p| p.pid != up_pid)
        .collect();
    assert_whole_mesh(&children);

    // Its children share a process group of their own, named in up.json
    // (not up's: the terminal's signals reach up alone). A command's own
    // processes are in the group its guard made for them.
    let group = i32::try_from(mesh["process_group"].as_i64().unwrap()).unwrap();
    let up_proc = Proc::read(up_pid).unwrap();
    assert_ne!(group, up_proc.pgrp);
    for child in children.iter().filter(|p| p.ppid == up_pid) {
        assert_eq!(child.pgrp, group, "{child:?}");
    }
    let guard = children
        .iter()
        .find(|p| p.kind() == "meshward guard")
        .unwrap();
    let sleep = children.iter().find(|p| p.kind() == "sleep 600").unwrap();
    assert_ne!(sleep.pgrp, group);
    let leader = Proc::read(sleep.pgrp).expect("the command's group leader");
    assert_eq!(leader.ppid, guard.pid, "{leader:?}");

    assert!(
        catches(up.pid(), Signal::SIGHUP),
        "meshward up does not catch SIGHUP: was the test run with SIGHUP ignored (nohup)? up then rightly keeps ignoring it"
    );
    up.process.signal(Signal::SIGHUP);
    assert_all_exit(&children, "SIGHUP to meshward up");
    let status = up.wait_exit(SETTLE);
    assert!(status.success(), "{status}{}", up.logs.dump());
    up.logs
        .wait_for_stdout("meshward up: stopping (SIGHUP)", SETTLE);
    assert!(marked(&mark).is_empty(), "{:#?}", marked(&mark));
}

#[test]
fn sigkill_of_up_takes_everything_it_started_with_it() {
    let _one = one_mesh();
    let mark = unique_mark("sigkill");
    let (up, _) = up("orphans-sigkill", &mark);
    let up_pid = i32::try_from(up.pid()).unwrap();
    let children: Vec<Proc> = marked(&mark)
        .into_iter()
        .filter(|p| p.pid != up_pid)
        .collect();
    assert_whole_mesh(&children);

    // up cannot do anything about SIGKILL: the kernel's parent-death signal
    // stops its children, and the guard stops the command's group.
    up.process.signal(Signal::SIGKILL);
    assert_all_exit(&children, "SIGKILL of meshward up");
    assert!(marked(&mark).is_empty(), "{:#?}", marked(&mark));
}

/// Run by [`a_killed_test_run_leaves_nothing`] in a test process of its
/// own, which it kills: starts a mesh with the process helper, says so,
/// and holds it until its standard input closes.
#[test]
#[ignore = "run (and killed) by a_killed_test_run_leaves_nothing"]
fn inner_test_run_holding_a_mesh() {
    let mark = std::env::var(MARK_ENV).expect("the mark from the outer test");
    let (up, _) = up("orphans-inner", &mark);
    println!("inner: mesh ready, up {}", up.pid());
    // Until the outer test kills this process (or, failing, closes stdin).
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
    drop(up);
}

#[test]
fn a_killed_test_run_leaves_nothing() {
    let _one = one_mesh();
    let mark = unique_mark("killed-run");
    // This test binary, running only the inner test, as `cargo test` runs
    // it; its process group is what CI kills on a timeout.
    let inner = spawn(
        "inner test run",
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "inner_test_run_holding_a_mesh",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(MARK_ENV, &mark),
    );
    inner.logs.wait_for_stdout("inner: mesh ready", START);
    let inner_pid = i32::try_from(inner.pid()).unwrap();
    let started: Vec<Proc> = marked(&mark);
    let mesh: Vec<Proc> = started
        .iter()
        .filter(|p| p.pid != inner_pid && p.kind() != "meshward up")
        .cloned()
        .collect();
    assert_whole_mesh(&mesh);
    assert!(
        started.iter().any(|p| p.kind() == "meshward up"),
        "{started:#?}"
    );

    // Nothing of the mesh is in the test run's process group: killing the
    // group reaches the test process alone, and what it started must
    // follow from there.
    assert!(
        started
            .iter()
            .all(|p| p.pid == inner_pid || p.pgrp != inner_pid)
    );
    killpg(Pid::from_raw(inner_pid), Signal::SIGKILL).unwrap();
    assert_all_exit(&started, "the test run's process group was killed");
    assert!(marked(&mark).is_empty(), "{:#?}", marked(&mark));
}
