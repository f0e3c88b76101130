//! Helpers for tests that run the built `meshward` binary: temp dirs, free
//! ports, a plain HTTP application, a running `meshward server` with tokens
//! and certificates from it — and the one way tests start processes.
//!
//! # Processes
//!
//! [`spawn`] starts every process a test runs for longer than a command
//! ([`output`] and [`run`] are built on it). What it starts:
//!
//! - leads a process group of its own, stopped as a whole when its
//!   [`Spawned`] (or [`Process`]) is dropped, however the test ends:
//!   SIGTERM to the group, up to [`STOP_GRACE`] to exit, then SIGKILL to the
//!   group (and every wait is bounded);
//! - dies with the test even when the test process is killed: meshward
//!   processes get `MESHWARD_PARENT_PID` and ask the kernel for SIGTERM when
//!   the *thread* that started them exits — start them from the test's own
//!   thread, not from a thread that ends sooner;
//! - has its standard output and error collected as written ([`Logs`]),
//!   printed when the test fails, and waited on with a deadline that also
//!   notices the process exiting ([`Logs::wait_for_stdout`]);
//! - reads standard input only from the test ([`Spawned::input`]).
//!
//! Conditions are waited on with [`wait_for`] / [`wait_until`] and a
//! generous deadline ([`START`], [`SETTLE`]): CI machines are shared, and a
//! deadline costs time only when a test fails. Tests do not sleep to decide
//! an outcome: `.ci/run` rejects `thread::sleep`/`time::sleep` in test files
//! unless the line says why it paces (`// pacing: ...`).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid};
use nix::unistd::{Pid, getpgid};

/// Hosts in network namespaces (root only): see its docs.
pub mod netns;

/// How long a process gets to be ready.
pub const START: Duration = Duration::from_secs(90);
/// How long a change gets to take effect: a push, a watched file, a signal.
pub const SETTLE: Duration = Duration::from_secs(30);
/// How long a process gets to exit after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(20);
/// How long a short command (`meshward apply`, `curl`) may take.
pub const COMMAND: Duration = Duration::from_secs(60);

/// meshward's variable for "stop when this process dies"
/// (crates/meshward/src/children.rs).
pub const PARENT_PID_ENV: &str = "MESHWARD_PARENT_PID";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_meshward")
}

/// A `meshward` command (spawn it with [`spawn`] or [`output`]).
pub fn meshward() -> Command {
    Command::new(bin())
}

/// Runs `meshward ARGS` to completion; fails the test unless it succeeds.
pub fn run(args: &[&str]) -> Output {
    let out = output(meshward().args(args));
    assert!(
        out.status.success(),
        "meshward {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs a command to completion within [`COMMAND`] (killed and failing the
/// test otherwise): its status and everything it wrote.
pub fn output(command: &mut Command) -> Output {
    output_with_input(command, b"")
}

/// [`output`], with `input` as the command's standard input.
pub fn output_with_input(command: &mut Command, input: &[u8]) -> Output {
    let name = format!("{:?}", command.get_program());
    let mut spawned = spawn(&name, command);
    spawned.input(input);
    let status = spawned.wait_exit(COMMAND);
    spawned.logs.wait_closed(SETTLE);
    Output {
        status,
        stdout: spawned.logs.stdout.bytes(),
        stderr: spawned.logs.stderr.bytes(),
    }
}

pub fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshward-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A port free on 127.0.0.1 for a process the test is about to start.
///
/// It is probed and released, so something could take it before the
/// process binds it. The kernel hands out ports for outgoing connections
/// (and binds to port 0) from its ephemeral range, so the port comes from
/// below that range, which nothing allocates by itself, in turn from a
/// start that differs between test processes (as `meshward up` picks its
/// ports): the tests' own connections never take a released port.
pub fn free_port() -> u16 {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: OnceLock<(AtomicU32, u32)> = OnceLock::new();
    const FIRST: u32 = 10_000;
    let (next, end) = NEXT.get_or_init(|| {
        let end = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(0)
            .min(u32::from(u16::MAX));
        let seed = std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        let start = if end > FIRST + 1_000 {
            seed % (end - FIRST)
        } else {
            0
        };
        (AtomicU32::new(start), end)
    });
    if *end > FIRST + 1_000 {
        for _ in 0..1_000 {
            let port = FIRST + next.fetch_add(1, Ordering::Relaxed) % (end - FIRST);
            if let Ok(port) = u16::try_from(port)
                && let Ok(listener) = TcpListener::bind(("127.0.0.1", port))
            {
                return listener.local_addr().unwrap().port();
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `condition` until it gives `Ok`, for at most `within`; then fails
/// the test with its last `Err` (what was still missing).
pub fn wait_for<T>(within: Duration, mut condition: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match condition() {
            Ok(value) => return value,
            Err(state) => assert!(
                Instant::now() < deadline,
                "still not so after {within:?}: {state}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50)); // pacing: wait_for's poll interval
    }
}

/// [`wait_for`] a condition that is true or false; `what` names it.
pub fn wait_until(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    wait_for(within, || {
        if condition() {
            Ok(())
        } else {
            Err(what.to_owned())
        }
    });
}

/// A process started by a test: stopped on drop with its process group (see
/// the module docs). Tests that build their own `Command` may wrap its child
/// here; [`spawn`] does it and also keeps the output.
pub struct Process(pub Child);

/// Where a child is, without reaping it (`waitid` with `WNOWAIT`).
#[derive(PartialEq)]
enum State {
    Running,
    /// Exited, not yet reaped: its pid — and so its group's id — is still taken.
    Exited,
    /// Reaped already (by `Child::wait`/`try_wait`).
    Reaped,
}

impl Process {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    fn raw_pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.0.id()).unwrap())
    }

    fn state(&self) -> State {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(self.raw_pid()), flags) {
            Ok(WaitStatus::StillAlive) => State::Running,
            Ok(_) => State::Exited,
            Err(_) => State::Reaped,
        }
    }

    /// Sends `signal` to the process alone, if it has not exited.
    pub fn signal(&self, signal: Signal) {
        if self.state() == State::Running {
            kill(self.raw_pid(), signal).unwrap();
        }
    }

    /// Its exit status once it has exited (reaping it).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.0.try_wait().unwrap()
    }

    /// SIGTERM to its process group if it leads one (to it alone if not),
    /// up to [`STOP_GRACE`] to exit, then SIGKILL to the group: what it left
    /// behind there, or itself if it would not stop. Returns its status.
    pub fn halt(&mut self) -> Option<ExitStatus> {
        if self.state() == State::Reaped {
            return self.0.try_wait().ok().flatten();
        }
        let pid = self.raw_pid();
        // A process started without `spawn` shares the test's group: only
        // the process itself is signalled then.
        let leads_group = getpgid(Some(pid)) == Ok(pid);
        let send = |signal| {
            let _ = if leads_group {
                killpg(pid, signal)
            } else {
                kill(pid, signal)
            };
        };
        send(Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while self.state() == State::Running && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20)); // pacing: halt's poll interval
        }
        // It is not reaped yet, so the group's id still names its group.
        send(Signal::SIGKILL);
        self.0.wait().ok()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Bytes a process writes to one stream, collected by a thread as written.
#[derive(Clone, Default)]
pub struct Stream {
    bytes: Arc<Mutex<Vec<u8>>>,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Stream {
    fn collect(mut from: impl Read + Send + 'static) -> Stream {
        let stream = Stream::default();
        let (bytes, closed) = (stream.bytes.clone(), stream.closed.clone());
        std::thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            while let Ok(n @ 1..) = from.read(&mut chunk) {
                bytes.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
            closed.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        stream
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.lock().unwrap().clone()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes()).into_owned()
    }

    /// Whether the writing end is closed: the process (and anything it
    /// passed the stream to) has exited.
    pub fn closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A process's standard output and error; printed (the last 16 KiB of
/// each) when dropped while the test is failing.
pub struct Logs {
    pub name: String,
    pub stdout: Stream,
    pub stderr: Stream,
    /// Already shown in a failure message: not printed again on drop.
    shown: std::sync::atomic::AtomicBool,
}

impl Logs {
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    pub fn stderr(&self) -> String {
        self.stderr.text()
    }

    /// The first line of standard output containing `needle`, waiting up
    /// to `within`; fails at once if the process closes its output first.
    pub fn wait_for_stdout(&self, needle: &str, within: Duration) -> String {
        self.wait_for_line(&self.stdout, "stdout", 0, needle, within)
    }

    /// As [`Self::wait_for_stdout`], on standard error (logs).
    pub fn wait_for_stderr(&self, needle: &str, within: Duration) -> String {
        self.wait_for_line(&self.stderr, "stderr", 0, needle, within)
    }

    /// How much standard error holds now, to wait for what comes after it
    /// with [`Self::wait_for_new_stderr`].
    pub fn stderr_mark(&self) -> usize {
        self.stderr.bytes.lock().unwrap().len()
    }

    /// As [`Self::wait_for_stderr`], for a line written after `mark`.
    pub fn wait_for_new_stderr(&self, mark: usize, needle: &str, within: Duration) -> String {
        self.wait_for_line(&self.stderr, "stderr", mark, needle, within)
    }

    fn wait_for_line(
        &self,
        stream: &Stream,
        which: &str,
        from: usize,
        needle: &str,
        within: Duration,
    ) -> String {
        wait_for(within, || {
            // Read `closed` first: if it was set, the text is complete.
            let closed = stream.closed();
            let bytes = stream.bytes();
            let text = String::from_utf8_lossy(&bytes[from.min(bytes.len())..]);
            if let Some(line) = text.lines().find(|l| l.contains(needle)) {
                return Ok(line.to_owned());
            }
            assert!(
                !closed,
                "{} closed its {which} without writing {needle:?}{}",
                self.name,
                self.dump()
            );
            Err(format!(
                "{} has not written {needle:?} to {which}",
                self.name
            ))
        })
    }

    /// Waits until the process and everything it passed its output to have
    /// closed both streams.
    pub fn wait_closed(&self, within: Duration) {
        wait_until(within, &format!("{}'s output to close", self.name), || {
            self.stdout.closed() && self.stderr.closed()
        });
    }

    /// Both streams' last 16 KiB, for a failure message.
    pub fn dump(&self) -> String {
        self.shown.store(true, std::sync::atomic::Ordering::SeqCst);
        let tail = |s: String| {
            let start = s.len().saturating_sub(16 * 1024);
            let start = (start..s.len())
                .find(|i| s.is_char_boundary(*i))
                .unwrap_or(s.len());
            s[start..].to_owned()
        };
        format!(
            "\n--- {} stdout:\n{}\n--- {} stderr:\n{}\n---",
            self.name,
            tail(self.stdout()),
            self.name,
            tail(self.stderr())
        )
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() && !self.shown.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("{}", self.dump());
        }
    }
}

/// A process started with [`spawn`]. Dropping it stops it (with its group)
/// first, then prints its output if the test is failing.
pub struct Spawned {
    pub process: Process,
    pub logs: Logs,
    stdin: Option<ChildStdin>,
}

/// Starts `command` as the module docs describe; `name` is used in
/// messages.
pub fn spawn(name: &str, command: &mut Command) -> Spawned {
    let mut child = command
        .env(PARENT_PID_ENV, std::process::id().to_string())
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    let stdin = child.stdin.take();
    let stdout = Stream::collect(child.stdout.take().unwrap());
    let stderr = Stream::collect(child.stderr.take().unwrap());
    Spawned {
        process: Process(child),
        logs: Logs {
            name: name.to_owned(),
            stdout,
            stderr,
            shown: Default::default(),
        },
        stdin,
    }
}

impl Spawned {
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Writes `bytes` to its standard input, then closes it.
    pub fn input(&mut self, bytes: &[u8]) {
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(bytes);
        }
    }

    /// Its exit status, waiting up to `within`; fails the test (showing its
    /// output) if it is still running then.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let name = self.logs.name.clone();
        wait_for(within, || {
            self.process
                .try_wait()
                .ok_or_else(|| format!("{name} is still running"))
        })
    }

    /// SIGTERM to the process alone (as Ctrl-C or a service manager would
    /// stop it); its exit status within [`SETTLE`].
    pub fn stop(&mut self) -> ExitStatus {
        self.process.signal(Signal::SIGTERM);
        self.wait_exit(SETTLE)
    }

    /// Fails the test (showing its output) if it has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.process.try_wait() {
            // Its last words may still be in the pipe (or held open a moment
            // by a child it passed the stream to).
            let deadline = Instant::now() + Duration::from_secs(5);
            while !(self.logs.stdout.closed() && self.logs.stderr.closed())
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20)); // pacing: the poll interval
            }
            panic!("{} exited ({status}){}", self.logs.name, self.logs.dump());
        }
    }
}

/// A plain HTTP/1.1 application: answers `NAME PATH` (after sleeping MS for
/// `/delay/MS`), one request per connection.
pub fn app(name: &'static str) -> SocketAddr {
    http_app(name, |path| {
        if let Some(ms) = path.strip_prefix("/delay/") {
            let ms = Duration::from_millis(ms.parse().unwrap_or(0));
            std::thread::sleep(ms); // pacing: the delay asked for
        }
    })
}

/// An application like [`app`] that holds every request until the test
/// releases it, and reports each arrival: a test knows a request is in
/// flight without guessing how long it takes to get there.
pub struct HeldApp {
    pub addr: SocketAddr,
    arrivals: Mutex<std::sync::mpsc::Receiver<String>>,
    release: std::sync::mpsc::Sender<()>,
}

impl HeldApp {
    pub fn start(name: &'static str) -> HeldApp {
        let (arrived, arrivals) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let arrived = Mutex::new(arrived);
        let released = Mutex::new(released);
        let addr = http_app(name, move |path| {
            let _ = arrived.lock().unwrap().send(path.to_owned());
            // Ends when released, or when the test has dropped the HeldApp.
            let _ = released.lock().unwrap().recv();
        });
        HeldApp {
            addr,
            arrivals: Mutex::new(arrivals),
            release,
        }
    }

    /// Waits up to [`SETTLE`] for a request for `path` to arrive.
    pub fn arrived(&self, path: &str) {
        let arrivals = self.arrivals.lock().unwrap();
        let deadline = Instant::now() + SETTLE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match arrivals.recv_timeout(left) {
                Ok(p) if p == path => return,
                Ok(_) => {}
                Err(e) => panic!("no request for {path} reached the application: {e}"),
            }
        }
    }

    /// Lets one held request be answered.
    pub fn release(&self) {
        self.release.send(()).unwrap();
    }
}

/// Serves HTTP/1.1 on a free port, one request per connection: calls
/// `before_answer(path)`, then answers `200 NAME PATH`.
fn http_app(
    name: &'static str,
    before_answer: impl Fn(&str) + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let before_answer = Arc::new(before_answer);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let before_answer = before_answer.clone();
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
                before_answer(&path);
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

/// The value of one series in Prometheus text exposition, `series` written
/// exactly as exposed (`name` or `name{labels}`); `None` if absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// GET over plain HTTP/1.1 with std only: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, SETTLE).ok()?;
    s.set_read_timeout(Some(SETTLE)).ok()?;
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
    /// The server's output (after `server`, so it is printed after the
    /// server stopped when a test fails).
    pub server_logs: Logs,
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
    let spawned = spawn(
        "meshward server",
        meshward()
            .args(["server", "--data-dir", data.to_str().unwrap()])
            .args(listen)
            .args(extra),
    );
    let line = spawned.logs.wait_for_stdout("listening on https://", START);
    let ca_addr = line
        .strip_prefix("listening on https://")
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    let Spawned { process, logs, .. } = spawned;
    Mesh {
        dir: dir.to_owned(),
        data,
        ca_addr,
        server: process,
        server_logs: logs,
    }
}

impl Mesh {
    /// Runs a `meshward` command against this server with the admin credential.
    pub fn admin(&self, args: &[&str]) -> Output {
        output(
            meshward()
                .args(args)
                .args(["--server", &format!("https://{}", self.ca_addr)])
                .args(["--data-dir", self.data.to_str().unwrap()]),
        )
    }

    /// Sends one `ApplyRequest` straight to the server's config API with the
    /// admin credential (`DATA/admin/`), as `meshward apply` does once it
    /// has checked the files itself: a test can send what the command would
    /// refuse before sending. The server's answer, refusals included; not
    /// reaching the server fails the test, so a refusal is the server's.
    pub fn apply_via_api(
        &self,
        file: &str,
        text: &str,
    ) -> Result<meshward_api::control::ApplyResponse, tonic::Status> {
        use meshward_api::control::ApplyRequest;
        use meshward_api::control::config_service_client::ConfigServiceClient;
        use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

        let admin = meshward_control_plane::admin::admin_dir(&self.data);
        let read = |name: &str| std::fs::read_to_string(admin.join(name)).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("root-cert.pem")))
            .identity(Identity::from_pem(read("cert-chain.pem"), read("key.pem")))
            .domain_name("localhost");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let channel = Channel::from_shared(format!("https://{}", self.ca_addr))
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect_timeout(SETTLE)
                .timeout(COMMAND)
                .connect()
                .await
                .unwrap_or_else(|e| {
                    panic!("connecting to the config API at {}: {e:?}", self.ca_addr)
                });
            ConfigServiceClient::new(channel)
                .apply(ApplyRequest {
                    file: file.to_owned(),
                    text: text.to_owned(),
                    mesh_config: false,
                })
                .await
                .map(tonic::Response::into_inner)
        })
    }

    /// `meshward proxy` for `ns/sa` with `args`, configured by this server
    /// (unless `args` name `--control-plane` and `--ca-address`
    /// themselves), logs off; returns once it is ready and configured,
    /// with its admin address.
    pub fn proxy(&self, ns: &str, sa: &str, args: &[String]) -> (Spawned, SocketAddr) {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut command = meshward();
        command
            .args([
                "proxy",
                "--identity",
                &format!("spiffe://cluster.local/ns/{ns}/sa/{sa}"),
            ])
            .args(args);
        if !args.iter().any(|a| a == "--control-plane") {
            command
                .args(["--control-plane", &self.ca_addr])
                .args(["--ca-address", &format!("https://{}", self.ca_addr)]);
        }
        command
            .args([
                "--ca-root",
                self.data.join("root-cert.pem").to_str().unwrap(),
            ])
            .args(["--ca-server-name", "localhost"])
            .args(["--token-file", self.token(ns, sa).to_str().unwrap()])
            .args(["--admin", &admin.to_string()])
            .args(["--access-log", "off", "--audit-log", "off"]);
        let mut process = spawn(&format!("meshward proxy ({ns}/{sa})"), &mut command);
        wait_for(START, || {
            process.assert_running();
            let dump = http_get(admin, "/config_dump");
            if let Some((200, body)) = &dump
                && body.contains("control plane, version")
                && http_get(admin, "/healthz/ready").map(|r| r.0) == Some(200)
            {
                Ok(())
            } else {
                Err(format!("the proxy is not configured: {dump:?}"))
            }
        });
        (process, admin)
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
    wait_for(within, || {
        let got = http_get(addr, path).map(|r| r.0);
        if got == Some(status) {
            Ok(())
        } else {
            Err(format!(
                "GET {path} via {addr}: wanted {status}, got {got:?}"
            ))
        }
    });
}
