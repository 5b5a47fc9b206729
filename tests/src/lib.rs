//! End-to-end test harness for snapgate.
//!
//! The tests in `tests/tests/*.rs` drive the real `snapgate` binary with real
//! clients (qemu-img, qemu-io, nbdinfo, nbdcopy, nbdsh/libnbd, fio) over real
//! sockets. This crate holds what they share:
//!
//! ```text
//!   test ──spawn──▶ snapgate serve --data <tmp>/data --listen 127.0.0.1:P
//!     │                             --admin 127.0.0.1:Q --site testsite
//!     ├── cli(["volume", "create", …])  ──HTTP──▶ admin endpoint (Q)
//!     └── qemu-io / nbdinfo / … nbd://127.0.0.1:P/vol ──NBD──▶ server (P)
//! ```
//!
//! Design notes:
//! - Every gateway gets its own ports (bind port 0, read it, drop it) and its
//!   own temporary directory, so tests run in parallel.
//! - Every external command runs with a deadline ([`CMD_TIMEOUT`]): a hung
//!   server fails a test, it never hangs the suite.
//! - The gateway's stderr goes to a file; it is printed when a test panics,
//!   which is usually the only clue to what the server saw.
//! - A missing tool panics under `CI=true` and is a visible skip elsewhere
//!   ([`require_tool`]).

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// How long the gateway may take to answer `GET /health` after spawning.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for any one external command (client tool or CLI call).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(180);
/// The site name every test gateway runs with.
pub const SITE: &str = "testsite";
/// The system python that has the libnbd bindings (python3-libnbd); a pyenv or
/// venv python3 earlier in PATH does not.
pub const SYS_PYTHON: &str = "/usr/bin/python3";

/// Root of the cargo workspace (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(Path::to_path_buf).unwrap_or(here)
}

/// Directory of helper scripts shipped with the tests (`tests/py`).
pub fn py_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("py")
}

/// The `snapgate` binary under test: `$SNAPGATE_BIN`, else the workspace's
/// `target/release/snapgate`, else `target/debug/snapgate`. Panics with a
/// clear message when none exists.
pub fn snapgate_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SNAPGATE_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "SNAPGATE_BIN={} does not exist or is not a file",
            p.display()
        );
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| {
            if p.is_absolute() {
                p
            } else {
                workspace_root().join(p)
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("snapgate");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "snapgate binary not found under {} (release or debug); \
         run `cargo build --release -p snapgate` first or set SNAPGATE_BIN",
        target.display()
    );
}

/// True when running under CI (`CI=true`): missing tools are then failures.
pub fn in_ci() -> bool {
    matches!(std::env::var("CI").as_deref(), Ok("true") | Ok("1"))
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn missing(what: &str) -> bool {
    if in_ci() {
        panic!("required tool missing under CI=true: {what} (scripts/setup installs it)");
    }
    eprintln!("SKIP: {what} not installed (run scripts/setup); test skipped");
    false
}

/// Whether the command `name` is installed. Missing: panics under `CI=true`,
/// otherwise prints a skip line and returns false, so the test can `return`.
pub fn require_tool(name: &str) -> bool {
    find_in_path(name).is_some() || missing(name)
}

/// Like [`require_tool`] for several tools at once.
pub fn require_tools(names: &[&str]) -> bool {
    names.iter().all(|n| require_tool(n))
}

/// Whether the libnbd Python bindings are importable by [`SYS_PYTHON`].
pub fn require_python_nbd() -> bool {
    let ok = Command::new(SYS_PYTHON)
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok || missing("python3-libnbd (import nbd in /usr/bin/python3)")
}

/// A free TCP port on 127.0.0.1 (bound, read, released). Another process can
/// in principle take it before the gateway binds it; [`Gateway::start`]
/// retries with new ports when the gateway dies during startup.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// Build a [`Command`] from a program and its arguments.
pub fn cmd<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Command {
    let mut c = Command::new(program);
    c.args(args);
    c
}

/// Render a command for messages.
pub fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            s.push_str(&format!(" '{a}'"));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Run a command to completion with the default deadline; returns its output
/// whatever the exit status.
pub fn run_output(c: &mut Command) -> Output {
    run_output_timeout(c, CMD_TIMEOUT)
}

/// Run a command with a deadline: on timeout the process is killed and the
/// test panics (a hang is a failure, never a stuck suite).
pub fn run_output_timeout(c: &mut Command, timeout: Duration) -> Output {
    let what = describe(c);
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{what}`: {e}"));
    // Drain both pipes on threads so a chatty child never blocks on a full pipe.
    let mut so = child.stdout.take().expect("stdout pipe");
    let mut se = child.stderr.take().expect("stderr pipe");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = match wait_timeout(&mut child, timeout) {
        Some(s) => s,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            let err = t_err.join().unwrap_or_default();
            panic!(
                "`{what}` did not finish within {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Wait for a child with a deadline; `None` when it is still running.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(e) => panic!("wait for child: {e}"),
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run a command, assert it succeeded, return its stdout.
pub fn run(c: &mut Command) -> String {
    let what = describe(c);
    let out = run_output(c);
    assert!(
        out.status.success(),
        "`{what}` failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command, assert it FAILED (non-zero exit), return its output.
pub fn run_fail(c: &mut Command) -> Output {
    let what = describe(c);
    let out = run_output(c);
    assert!(
        !out.status.success(),
        "`{what}` was expected to fail but succeeded\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a shell pipeline with bash (for tools best driven by a one-liner).
pub fn sh(script: &str) -> String {
    run(Command::new("bash").args(["-c", script]))
}

/// sha256 of a file, via coreutils' sha256sum.
pub fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    out.split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_owned()
}

/// Parse a human size as the CLI does (binary units: 64K = 65536).
pub fn parse_size(s: &str) -> u64 {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K') | Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') | Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('G') | Some('g') => (&s[..s.len() - 1], 1 << 30),
        Some('T') | Some('t') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().expect("size number") * mult
}

/// Minimal HTTP/1.1 GET with a deadline; returns (status code, body).
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Options for [`Gateway::start_with`].
#[derive(Default, Clone, Debug)]
pub struct Options {
    /// Also serve NBD on a Unix socket (`--socket <tmp>/nbd.sock`).
    pub unix_socket: bool,
    /// Put the data directory on a tmpfs of this many bytes (a small disk
    /// that fills up). Needs root: see [`can_mount`].
    pub data_fs_bytes: Option<u64>,
    /// More `snapgate serve` arguments.
    pub serve_args: Vec<String>,
}

/// Whether this process may mount filesystems (root); under CI=true it
/// must.
pub fn can_mount() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(!in_ci(), "mounting a tmpfs needs root under CI=true");
    eprintln!("SKIP: mounting a tmpfs needs root");
    false
}

/// A running `snapgate serve` on private ports and a private data directory.
/// Dropping it kills the process (and prints its log if the test panicked).
pub struct Gateway {
    child: Option<Child>,
    bin: PathBuf,
    tmp: tempfile::TempDir,
    data: PathBuf,
    log: PathBuf,
    /// NBD TCP port on 127.0.0.1.
    pub nbd_port: u16,
    /// Admin HTTP port on 127.0.0.1.
    pub admin_port: u16,
    /// Unix socket path when started with `unix_socket`.
    pub socket: Option<PathBuf>,
    starts: u32,
    /// The data directory is a tmpfs mount point (unmounted on drop).
    mounted: bool,
    /// More `snapgate serve` arguments, used at every (re)start.
    pub serve_args: Vec<String>,
}

impl Gateway {
    /// Start a gateway on fresh ports with a fresh data directory and wait
    /// until `GET /health` answers.
    pub fn start() -> Gateway {
        Self::start_with(Options::default())
    }

    /// Start with options (e.g. a Unix socket).
    pub fn start_with(opts: Options) -> Gateway {
        let bin = snapgate_bin();
        let tmp = tempfile::Builder::new()
            .prefix("snapgate-e2e-")
            .tempdir()
            .expect("tempdir");
        let data = tmp.path().join("data");
        let log = tmp.path().join("gateway.log");
        let socket = opts.unix_socket.then(|| tmp.path().join("nbd.sock"));
        let mut gw = Gateway {
            child: None,
            bin,
            tmp,
            data,
            log,
            nbd_port: 0,
            admin_port: 0,
            socket,
            starts: 0,
            mounted: false,
            serve_args: opts.serve_args.clone(),
        };
        if let Some(bytes) = opts.data_fs_bytes {
            std::fs::create_dir_all(&gw.data).expect("mkdir data");
            run(Command::new("mount")
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={bytes}"))
                .arg("tmpfs")
                .arg(&gw.data));
            gw.mounted = true;
        }
        // A port picked by free_port() can be taken by a parallel test before
        // the gateway binds it: retry with new ports a few times.
        let mut last_err = String::new();
        for _ in 0..3 {
            gw.nbd_port = free_port();
            gw.admin_port = free_port();
            while gw.admin_port == gw.nbd_port {
                gw.admin_port = free_port();
            }
            match gw.spawn_and_wait() {
                Ok(()) => return gw,
                Err(e) => last_err = e,
            }
        }
        panic!(
            "gateway did not start: {last_err}\n--- gateway log ---\n{}",
            gw.log()
        );
    }

    /// Spawn the serve process on the current ports and data dir and wait for
    /// health. Err with a reason when it exits or times out.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("open log: {e}"))?;
        let mut logw = log.try_clone().map_err(|e| e.to_string())?;
        let _ = writeln!(
            logw,
            "=== harness: start #{} nbd=127.0.0.1:{} admin=127.0.0.1:{}",
            self.starts, self.nbd_port, self.admin_port
        );
        let mut c = Command::new(&self.bin);
        c.arg("serve")
            .arg("--data")
            .arg(&self.data)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.nbd_port))
            .arg("--admin")
            .arg(format!("127.0.0.1:{}", self.admin_port))
            .arg("--site")
            .arg(SITE);
        if let Some(sock) = &self.socket {
            let _ = std::fs::remove_file(sock);
            c.arg("--socket").arg(sock);
        }
        c.args(&self.serve_args);
        c.env_remove("SNAPGATE_ADMIN")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let child = c
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", describe(&c)))?;
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("gateway exited during startup with {status}"));
            }
            if let Ok((200, _)) = http_get(self.admin_addr(), "/health", Duration::from_secs(2)) {
                break;
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(format!(
                    "GET /health did not answer 200 within {START_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Health answers; the NBD listener should too (bounded).
        let nbd: SocketAddr = self.nbd_addr();
        loop {
            if TcpStream::connect_timeout(&nbd, Duration::from_secs(1))
                .map(|s| s.shutdown(Shutdown::Both))
                .is_ok()
            {
                break;
            }
            if Instant::now() >= deadline {
                self.kill9();
                return Err(format!(
                    "NBD port {nbd} not accepting within {START_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// The admin endpoint as `127.0.0.1:Q`.
    pub fn admin(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }

    /// The admin endpoint as a socket address.
    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin_port))
    }

    /// The NBD endpoint as a socket address.
    pub fn nbd_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nbd_port))
    }

    /// `nbd://127.0.0.1:P/EXPORT`.
    pub fn nbd_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.nbd_port, export)
    }

    /// `nbd+unix:///EXPORT?socket=PATH` (gateway started with a Unix socket).
    pub fn nbd_unix_uri(&self, export: &str) -> String {
        let sock = self
            .socket
            .as_ref()
            .expect("gateway started without --socket");
        format!("nbd+unix:///{}?socket={}", export, sock.display())
    }

    /// The gateway's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// A scratch directory that lives as long as the gateway.
    pub fn tmp(&self) -> &Path {
        self.tmp.path()
    }

    /// Everything the gateway printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The serve process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// A `snapgate --admin 127.0.0.1:Q ARGS…` command (not run yet).
    pub fn cli_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--admin").arg(self.admin()).args(args);
        c.env_remove("SNAPGATE_ADMIN");
        c
    }

    /// Run the CLI against this gateway; returns the output whatever the status.
    pub fn cli(&self, args: &[&str]) -> Output {
        run_output(&mut self.cli_cmd(args))
    }

    /// Run the CLI, assert success, return stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        run(&mut self.cli_cmd(args))
    }

    /// Run the CLI with `--json` appended, assert success, parse stdout.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "`snapgate {}` printed invalid JSON ({e}):\n{out}",
                a.join(" ")
            )
        })
    }

    /// `volume create NAME --size SIZE`.
    pub fn create_volume(&self, name: &str, size: &str) {
        self.cli_ok(&["volume", "create", name, "--size", size]);
    }

    /// `snapshot create VOLUME NAME`.
    pub fn snapshot(&self, volume: &str, name: &str) {
        self.cli_ok(&["snapshot", "create", volume, name]);
    }

    /// SIGKILL the gateway and reap it (no clean shutdown, like a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Send a signal to the serve process.
    pub fn signal(&self, sig: i32) {
        let pid = self.pid().expect("gateway not running");
        // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
    }

    /// Wait (bounded) for the serve process to exit; takes ownership of it.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take().expect("gateway not running");
        match wait_timeout(&mut child, timeout) {
            Some(s) => Some(s),
            None => {
                self.child = Some(child);
                None
            }
        }
    }

    /// Start the gateway again on the same data directory and ports (after
    /// [`kill9`](Self::kill9), or killing it first if still running).
    pub fn restart(&mut self) {
        self.kill9();
        // The old listener's port may linger briefly; retry within the bound.
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!(
                        "gateway did not restart: {e}\n--- gateway log ---\n{}",
                        self.log()
                    )
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Whether the admin endpoint answers `GET /health` with 200.
    pub fn healthy(&self) -> bool {
        matches!(
            http_get(self.admin_addr(), "/health", Duration::from_secs(5)),
            Ok((200, _))
        )
    }

    /// Whether the serve process is still running.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// `qemu-io -f raw -c C1 -c C2 … URI` on an export; returns the output.
    pub fn qemu_io(&self, export: &str, cmds: &[&str]) -> Output {
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw"]);
        for x in cmds {
            c.arg("-c").arg(x);
        }
        c.arg(self.nbd_uri(export));
        run_output(&mut c)
    }

    /// qemu-io that must succeed with no "failed" line; returns stdout.
    pub fn qemu_io_ok(&self, export: &str, cmds: &[&str]) -> String {
        let out = self.qemu_io(export, cmds);
        let so = String::from_utf8_lossy(&out.stdout).into_owned();
        let se = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !so.contains("failed") && !se.contains("failed"),
            "qemu-io {cmds:?} on {export} failed ({})\nstdout:\n{so}\nstderr:\n{se}",
            out.status
        );
        so
    }

    /// Export size as reported by `nbdinfo --size`.
    pub fn nbd_size(&self, export: &str) -> u64 {
        let out = run(Command::new("nbdinfo")
            .arg("--size")
            .arg(self.nbd_uri(export)));
        out.trim().parse().expect("nbdinfo --size number")
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill9();
        if self.mounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.data)
                .stderr(Stdio::null())
                .status();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: String = {
                let lines: Vec<&str> = log.lines().collect();
                let start = lines.len().saturating_sub(80);
                lines[start..].join("\n")
            };
            eprintln!(
                "--- gateway log (last 80 lines of {}) ---\n{tail}\n--- end of gateway log ---",
                self.log.display()
            );
            if std::env::var_os("SNAPGATE_KEEP_TMP").is_some() {
                let p = std::mem::replace(&mut self.tmp, tempfile::tempdir().expect("tempdir"));
                eprintln!("keeping {}", p.keep().display());
            }
        }
    }
}

/// Write a file of `size` bytes: random data in some 1 MiB chunks, holes
/// (never written, sparse) elsewhere, and one explicit all-zero chunk.
/// Deterministic for a given seed.
pub fn make_sparse_image(path: &Path, size: u64, seed: u64) {
    use rand::{RngCore, SeedableRng};
    use std::io::{Seek, SeekFrom};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("set_len");
    let chunk = 1u64 << 20;
    let mut buf = vec![0u8; chunk as usize];
    let mut off = 0;
    let mut i = 0u64;
    while off < size {
        let n = chunk.min(size - off) as usize;
        match i % 4 {
            // data
            0 | 1 => {
                rng.fill_bytes(&mut buf[..n]);
                f.seek(SeekFrom::Start(off)).expect("seek");
                f.write_all(&buf[..n]).expect("write");
            }
            // a little data in the middle of a mostly-hole chunk
            2 if i % 8 == 2 => {
                rng.fill_bytes(&mut buf[..4096]);
                f.seek(SeekFrom::Start(off + 12345)).expect("seek");
                f.write_all(&buf[..4096]).expect("write");
            }
            // hole
            _ => {}
        }
        off += n as u64;
        i += 1;
    }
    f.sync_all().expect("sync");
}

/// Bytes of `stderr` as trimmed non-empty lines.
pub fn stderr_lines(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Find, anywhere in a JSON document, an object that has some string field
/// equal to `name` (e.g. a volume entry in `volume list --json`).
pub fn json_find_named<'a>(v: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => {
            if m.values().any(|x| x.as_str() == Some(name)) {
                return Some(v);
            }
            m.values().find_map(|x| json_find_named(x, name))
        }
        serde_json::Value::Array(a) => a.iter().find_map(|x| json_find_named(x, name)),
        _ => None,
    }
}

/// Whether any number anywhere inside `v` equals `n`.
pub fn json_has_number(v: &serde_json::Value, n: u64) -> bool {
    match v {
        serde_json::Value::Number(x) => x.as_u64() == Some(n),
        serde_json::Value::Object(m) => m.values().any(|x| json_has_number(x, n)),
        serde_json::Value::Array(a) => a.iter().any(|x| json_has_number(x, n)),
        _ => false,
    }
}

/// A hand-rolled NBD client speaking raw bytes, for what real clients never
/// do: half-finished handshakes, truncated payloads, garbage. It follows
/// "Fixed newstyle negotiation" with NBD_OPT_EXPORT_NAME and NO_ZEROES.
pub struct RawNbd {
    /// The TCP stream (public so tests can write whatever they like).
    pub stream: TcpStream,
    /// Export size from the handshake.
    pub size: u64,
    /// Transmission flags from the handshake.
    pub flags: u16,
}

/// NBD request magic.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// NBD simple reply magic.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// NBD_CMD_READ.
pub const NBD_CMD_READ: u16 = 0;
/// NBD_CMD_WRITE.
pub const NBD_CMD_WRITE: u16 = 1;
/// NBD_CMD_DISC.
pub const NBD_CMD_DISC: u16 = 2;

impl RawNbd {
    /// Read the server greeting and send the client flags; the stream is then
    /// in option haggling.
    pub fn greet(addr: SocketAddr) -> std::io::Result<TcpStream> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.set_write_timeout(Some(Duration::from_secs(10)))?;
        let mut greet = [0u8; 18];
        s.read_exact(&mut greet)?;
        if &greet[..8] != b"NBDMAGIC" || &greet[8..16] != b"IHAVEOPT" {
            return Err(std::io::Error::other(format!("bad greeting {greet:02x?}")));
        }
        // FIXED_NEWSTYLE | NO_ZEROES
        s.write_all(&3u32.to_be_bytes())?;
        Ok(s)
    }

    /// Complete a handshake with NBD_OPT_EXPORT_NAME (simple replies only).
    pub fn connect(addr: SocketAddr, export: &str) -> std::io::Result<RawNbd> {
        let mut s = Self::greet(addr)?;
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        s.write_all(&opt)?;
        let mut hdr = [0u8; 10];
        s.read_exact(&mut hdr)?;
        let size = u64::from_be_bytes(hdr[..8].try_into().expect("8 bytes"));
        let flags = u16::from_be_bytes([hdr[8], hdr[9]]);
        Ok(RawNbd {
            stream: s,
            size,
            flags,
        })
    }

    /// Encode a request header.
    pub fn request(cmd: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
        let mut r = [0u8; 28];
        r[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        r[4..6].copy_from_slice(&0u16.to_be_bytes());
        r[6..8].copy_from_slice(&cmd.to_be_bytes());
        r[8..16].copy_from_slice(&handle.to_be_bytes());
        r[16..24].copy_from_slice(&offset.to_be_bytes());
        r[24..28].copy_from_slice(&len.to_be_bytes());
        r
    }

    /// Read one simple reply: (error, handle).
    pub fn read_simple_reply(&mut self) -> std::io::Result<(u32, u64)> {
        let mut r = [0u8; 16];
        self.stream.read_exact(&mut r)?;
        let magic = u32::from_be_bytes(r[..4].try_into().expect("4"));
        if magic != NBD_SIMPLE_REPLY_MAGIC {
            return Err(std::io::Error::other(format!("bad reply magic {magic:#x}")));
        }
        let err = u32::from_be_bytes(r[4..8].try_into().expect("4"));
        let handle = u64::from_be_bytes(r[8..16].try_into().expect("8"));
        Ok((err, handle))
    }

    /// A full WRITE, waiting for its reply; returns the NBD error (0 = ok).
    pub fn write(&mut self, handle: u64, offset: u64, data: &[u8]) -> std::io::Result<u32> {
        self.stream.write_all(&Self::request(
            NBD_CMD_WRITE,
            handle,
            offset,
            data.len() as u32,
        ))?;
        self.stream.write_all(data)?;
        let (err, h) = self.read_simple_reply()?;
        assert_eq!(h, handle, "reply handle mismatch");
        Ok(err)
    }

    /// A full READ, waiting for its reply; returns the data.
    pub fn read(&mut self, handle: u64, offset: u64, len: u32) -> std::io::Result<Vec<u8>> {
        self.stream
            .write_all(&Self::request(NBD_CMD_READ, handle, offset, len))?;
        let (err, h) = self.read_simple_reply()?;
        assert_eq!(h, handle, "reply handle mismatch");
        if err != 0 {
            return Err(std::io::Error::other(format!("NBD read error {err}")));
        }
        let mut v = vec![0u8; len as usize];
        self.stream.read_exact(&mut v)?;
        Ok(v)
    }
}
