//! The `snapgate` command line: argument definitions and what each command
//! does. Management commands are thin clients of the admin endpoint (blocking
//! HTTP with ureq); `serve` runs the gateway; `verify` opens the pool itself.
//!
//! Error messages are built with their cause inline (`format!("…: {e}")`),
//! never with `anyhow::Context`, because `main` prints only the outermost
//! message: one line, whatever the depth.

use anyhow::{anyhow, bail, Result};
use clap::{Args, Parser, Subcommand};
use gateway::admin::{DiffView, ErrorBody, MountView, SnapshotView, VolumeView};
use gateway::serve::{Gateway, ServeConfig};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::io::{IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

pub const DEFAULT_ADMIN: &str = "127.0.0.1:10810";
const DEFAULT_DATA: &str = "./snapgate-data";
const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
/// Threads running blocking store calls (NBD requests, admin, FUSE helpers).
const BLOCKING_THREADS: usize = 16;
/// How long `serve` waits for its servers to stop when asked to: the NBD
/// server gives its clients `nbd::DRAIN_TIMEOUT` to finish, plus a margin.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(gateway::nbd::DRAIN_TIMEOUT.as_secs() + 5);

#[derive(Debug, Parser)]
#[command(
    name = "snapgate",
    version,
    about = "Thin block volumes over NBD, with snapshots",
    propagate_version = true
)]
pub struct Cli {
    /// The admin endpoint: where `serve` listens, and what the other
    /// commands talk to.
    #[arg(
        long,
        global = true,
        env = "SNAPGATE_ADMIN",
        default_value = DEFAULT_ADMIN,
        value_name = "ADDR",
        value_parser = admin_address
    )]
    pub admin: String,

    /// Print one JSON document on stdout instead of text (for `serve`: log
    /// JSON lines).
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway: NBD server and admin endpoint.
    Serve(ServeArgs),
    /// Create, list, resize and delete volumes.
    #[command(subcommand, arg_required_else_help = false)]
    Volume(VolumeCommand),
    /// Create, list, delete and compare (diff) snapshots of a volume.
    #[command(subcommand, arg_required_else_help = false)]
    Snapshot(SnapshotCommand),
    /// Check every stored block of a stopped gateway's data; exit 1 if any is damaged.
    Verify(VerifyArgs),
    /// Show every point as a read-only image file under DIR/<site>/<volume>/<point>.img
    /// (served by the gateway) until Ctrl-C or `fusermount3 -u DIR`.
    Mount {
        /// An existing, empty directory.
        dir: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The data directory (created if missing).
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA)]
    pub data: PathBuf,
    /// This gateway's site name [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub site: Option<String>,
    /// NBD over TCP.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_LISTEN)]
    pub listen: String,
    /// Also serve NBD on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Accept replication from peers here.
    #[arg(long, value_name = "ADDR")]
    pub peer_listen: Option<String>,
    /// Memory for volume map pages (half for pages read from disk, half
    /// for changed pages waiting to be written; the more, the fewer map
    /// writes per small random write once much data is written).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_size)]
    pub map_cache: u64,
    /// Disk space kept in the data directory (the file `reserve`) so that
    /// the gateway can start again after the disk filled up; it is given
    /// back when a start finds no room, and taken again once there is.
    /// 0 keeps none.
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = parse_size_or_zero)]
    pub space_reserve: u64,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a thin volume.
    Create {
        name: String,
        /// Virtual size: bytes or a binary unit (512, 64K, 10M, 4G, 2T).
        #[arg(long, value_parser = parse_volume_size, allow_hyphen_values = true)]
        size: u64,
        /// Changed-block tracking granularity (a power of two, 4K..1G), or
        /// `off` [default: 64K].
        #[arg(long, value_name = "SIZE|off", value_parser = parse_granularity)]
        cbt_granularity: Option<u64>,
    },
    /// List the volumes.
    List,
    /// Show one volume.
    Show { name: String },
    /// Change a volume's size.
    Resize {
        name: String,
        /// The new size (512, 64K, 10M, 4G, 2T).
        #[arg(long, value_parser = parse_volume_size, allow_hyphen_values = true)]
        size: u64,
        /// Allow a smaller size: the data past the new end is discarded.
        #[arg(long)]
        shrink: bool,
    },
    /// Delete a volume and all its snapshots.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a volume.
    Create { volume: String, name: String },
    /// List a volume's snapshots.
    List { volume: String },
    /// Delete one snapshot.
    Delete { volume: String, name: String },
    /// The extents changed after snapshot FROM, up to snapshot TO or the head
    /// (from change tracking: no data is read).
    Diff {
        volume: String,
        from: String,
        to: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The data directory of the stopped gateway.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_DATA)]
    pub data: PathBuf,
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let out = Output { json: cli.json };
    match cli.command {
        Command::Serve(args) => serve(args, &cli.admin, cli.json),
        Command::Verify(args) => {
            init_logging("warn", false);
            verify(&args.data, out)
        }
        Command::Volume(cmd) => {
            let client = Client::new(&cli.admin);
            volume(&client, cmd, out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshot(cmd) => {
            let client = Client::new(&cli.admin);
            snapshot(&client, cmd, out)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Mount { dir } => {
            let client = Client::new(&cli.admin);
            mount(&client, &dir, out)
        }
    }
}

/// Checks an admin endpoint address: `HOST:PORT`, or `http://HOST:PORT`.
fn admin_address(s: &str) -> std::result::Result<String, String> {
    let bare = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
    let wrong =
        || format!("expected HOST:PORT (like {DEFAULT_ADMIN}) or http://HOST:PORT, got {s:?}");
    let (host, port) = bare.rsplit_once(':').ok_or_else(wrong)?;
    let host_ok = !host.is_empty() && !host.contains('/') && !host.contains("://");
    match port.parse::<u16>() {
        Ok(_) if host_ok => Ok(s.to_owned()),
        _ => Err(wrong()),
    }
}

// ---------------------------------------------------------------- mount

/// Asks the gateway to serve the FUSE view on `dir`, then waits for Ctrl-C,
/// SIGTERM or an outside unmount, and asks it to unmount. The gateway also
/// watches this process (its pid goes with the request as `holder`) and
/// unmounts the view when it ends, however it ends.
fn mount(client: &Client, dir: &Path, out: Output) -> Result<ExitCode> {
    // The gateway's working directory is not ours: send an absolute path.
    let abs = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| anyhow!("cannot resolve {}: {e}", dir.display()))?
            .join(dir)
    };
    // Only a missing directory is refused here: a dead mount left by a
    // crashed gateway fails `stat` with ENOTCONN, and the gateway clears it.
    if let Err(e) = std::fs::metadata(&abs) {
        if e.kind() == std::io::ErrorKind::NotFound {
            bail!(
                "mount directory {} does not exist (create it with mkdir first)",
                dir.display()
            );
        }
    }
    let abs = std::fs::canonicalize(&abs).unwrap_or(abs);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow!("cannot start the signal handler: {e}"))?;
    let result = rt.block_on(mount_and_wait(client, &abs, out));
    // A request still hanging on a gateway that does not answer is left
    // behind, not waited for.
    rt.shutdown_background();
    result
}

/// The body of [`mount`], with signals handled from before the request on
/// (the view appears before the answer arrives), and every request off
/// the signal-handling thread (a gateway that does not answer must not
/// keep Ctrl-C from working).
async fn mount_and_wait(client: &Client, abs: &Path, out: Output) -> Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| anyhow!("cannot handle signals: {e}"))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| anyhow!("cannot handle signals: {e}"))?;
    let dir_text = abs.display().to_string();
    let request = {
        let c = client.clone();
        let body = serde_json::json!({ "dir": dir_text, "holder": std::process::id() });
        tokio::task::spawn_blocking(move || c.post::<MountView>("/v1/mounts", &body))
    };
    tokio::pin!(request);
    let answered = tokio::select! {
        r = &mut request => Some(r),
        _ = term.recv() => None,
        _ = int.recv() => None,
    };
    let answered = match answered {
        Some(r) => r,
        // Interrupted while the gateway mounts: give it a moment to answer,
        // so that a view it made is unmounted now, not only once we end.
        None => match tokio::time::timeout(Duration::from_secs(5), &mut request).await {
            Ok(r) => {
                let view = r.map_err(|e| anyhow!("the mount request failed: {e}"))??;
                return unmount_on_signal(client, &view.dir).await;
            }
            Err(_) => bail!(
                "interrupted while the gateway was mounting {dir_text}; if it still does, the view ends with this command"
            ),
        },
    };
    let view = answered.map_err(|e| anyhow!("the mount request failed: {e}"))??;
    out.show(&view, || {
        println!(
            "mounted the snapshot view on {} ({}/<volume>/<point>.img); Ctrl-C or `fusermount3 -u {}` to unmount",
            view.dir, view.site, view.dir
        )
    })?;
    let _ = std::io::stdout().flush();
    let poller = client.with_timeout(POLL_TIMEOUT);
    let end = loop {
        tokio::select! {
            _ = term.recv() => break MountEnd::Signal,
            _ = int.recv() => break MountEnd::Signal,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        // Unmounted from outside, or the gateway went away?
        let poll = {
            let c = poller.clone();
            tokio::task::spawn_blocking(move || c.get::<Vec<MountView>>("/v1/mounts"))
        };
        let mounts = tokio::select! {
            r = poll => r.map_err(|e| anyhow!("the request failed: {e}"))?,
            _ = term.recv() => break MountEnd::Signal,
            _ = int.recv() => break MountEnd::Signal,
        };
        match mounts {
            Ok(m) if m.iter().any(|m| m.dir == view.dir && m.alive) => {}
            Ok(_) => break MountEnd::Outside,
            // No answer: a busy gateway still serves the view; a gone one
            // left a dead mount (ENOTCONN) or none.
            Err(e) => match mount_state(abs) {
                MountState::Alive => {}
                MountState::Dead => break MountEnd::GatewayGone(e, true),
                MountState::Gone => break MountEnd::GatewayGone(e, false),
            },
        }
    };
    match end {
        MountEnd::Outside => {
            eprintln!("snapgate: the view on {} was unmounted", view.dir);
            Ok(ExitCode::SUCCESS)
        }
        MountEnd::Signal => unmount_on_signal(client, &view.dir).await,
        MountEnd::GatewayGone(e, dead) => {
            let left = if !dead {
                String::new()
            } else if let Err(why) = detach(abs) {
                format!(
                    "; its dead mount is still there ({why}): run `fusermount3 -u {}`",
                    view.dir
                )
            } else {
                "; its dead mount was cleared".to_owned()
            };
            bail!(
                "the gateway stopped answering ({e:#}), so the view on {} is gone{left}",
                view.dir
            )
        }
    }
}

/// How long one look at the gateway's mounts may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the unmount request after Ctrl-C may take.
const UNMOUNT_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the gateway to unmount the view on `dir` after Ctrl-C or SIGTERM,
/// waiting at most [`UNMOUNT_TIMEOUT`]: a gateway that does not answer
/// unmounts it once this command has ended (it watches it).
async fn unmount_on_signal(client: &Client, dir: &str) -> Result<ExitCode> {
    let c = client.with_timeout(UNMOUNT_TIMEOUT);
    let path = format!("/v1/mounts?dir={}", encode(dir));
    let asked = tokio::task::spawn_blocking(move || c.delete(&path))
        .await
        .map_err(|e| anyhow!("the unmount request failed: {e}"))?;
    match asked {
        Ok(()) => {
            eprintln!("snapgate: unmounted {dir}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => bail!(
            "cannot ask the gateway to unmount {dir} ({e:#}); it unmounts the view once this command has ended"
        ),
    }
}

/// Why `snapgate mount` stops waiting.
enum MountEnd {
    /// Ctrl-C or SIGTERM: unmount.
    Signal,
    /// Unmounted from outside (`fusermount3 -u`).
    Outside,
    /// The admin endpoint does not answer and the view no longer does
    /// either; `true` when a dead mount is left on the directory.
    GatewayGone(anyhow::Error, bool),
}

enum MountState {
    /// Still mounted and answering.
    Alive,
    /// Mounted, but the process that served it is gone (ENOTCONN).
    Dead,
    /// Not a mount point any more.
    Gone,
}

/// What is on the view's directory now.
fn mount_state(dir: &Path) -> MountState {
    use std::os::unix::fs::MetadataExt as _;
    match std::fs::metadata(dir) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => MountState::Dead,
        Err(_) => MountState::Gone,
        Ok(m) => {
            let parent = dir.parent().and_then(|p| std::fs::metadata(p).ok());
            match parent {
                Some(p) if p.dev() == m.dev() => MountState::Gone,
                _ => MountState::Alive,
            }
        }
    }
}

/// Detaches a dead FUSE mount: `umount2(MNT_DETACH)` as root, else
/// `fusermount3 -u -z` (which unprivileged users may run on their mounts).
fn detach(dir: &Path) -> std::result::Result<(), String> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path that lives across the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    let first = std::io::Error::last_os_error();
    match std::process::Command::new("fusermount3")
        .arg("-u")
        .arg("-z")
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(st) if st.success() => Ok(()),
        Ok(st) => Err(format!("umount: {first}; fusermount3 -u -z: {st}")),
        Err(e) => Err(format!("umount: {first}; fusermount3: {e}")),
    }
}

// ---------------------------------------------------------------- serve

fn serve(args: ServeArgs, admin: &str, json_logs: bool) -> Result<ExitCode> {
    init_logging("info", json_logs);
    let site = match args.site {
        Some(site) => site,
        None => hostname()?,
    };
    let cfg = ServeConfig {
        data: args.data,
        site,
        listen: args.listen,
        socket: args.socket,
        admin: admin.to_owned(),
        peer_listen: args.peer_listen,
        map_cache: args.map_cache,
        space_reserve: args.space_reserve,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("snapgate")
        // Store calls run on the blocking pool. More threads than this only
        // fight over the volume locks and the CPUs (measured: 128 threads
        // for two fio connections spent a third of their time in futex
        // wake-ups and sched_yield); extra requests queue instead.
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
        .map_err(|e| anyhow!("cannot start the async runtime: {e}"))?;
    runtime.block_on(serve_until_signal(cfg))?;
    Ok(ExitCode::SUCCESS)
}

/// Signals this close to the first one are taken as the same request.
const SAME_SIGNAL: Duration = Duration::from_secs(1);

async fn serve_until_signal(cfg: ServeConfig) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    // Installed before the ready line, so a supervisor that signals as soon
    // as it sees that line gets a clean stop, not the default kill.
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| anyhow!("cannot install the SIGTERM handler: {e}"))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| anyhow!("cannot install the SIGINT handler: {e}"))?;

    let mut gateway = Gateway::start(cfg).await?;
    // A stdout nobody can write to (closed, /dev/full) must not stop the
    // gateway: the line is for scripts, the log says the same.
    let _ = writeln!(std::io::stdout(), "{}", ready_line(&gateway));
    // The ready line is how scripts know we are up: do not leave it buffered.
    let _ = std::io::stdout().flush();

    let failure = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM received"); None }
        _ = int.recv() => { tracing::info!("SIGINT received"); None }
        e = gateway.failed() => Some(e),
    };
    // A second signal while draining means "stop now": the unflushed tail
    // is the price the operator chose. One within a second of the first is
    // the same request twice (`timeout` signals the process, then its
    // group), not a second thought.
    let first = std::time::Instant::now();
    let shutdown = gateway.shutdown(DRAIN_TIMEOUT);
    tokio::pin!(shutdown);
    let stopped = loop {
        tokio::select! {
            r = &mut shutdown => break r,
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if first.elapsed() >= SAME_SIGNAL {
            bail!("stopped by a second signal before the pool was flushed");
        }
        tracing::info!("a second signal right after the first: still stopping cleanly");
    };
    if let Some(e) = failure {
        if let Err(flush) = stopped {
            tracing::error!(error = %flush, "flush on the way down failed");
        }
        return Err(e.into());
    }
    stopped.map_err(|e| anyhow!("flushing the pool on shutdown failed: {e}"))
}

fn ready_line(gw: &Gateway) -> String {
    let mut nbd = gw.nbd_addr().to_string();
    if let Some(socket) = gw.socket() {
        nbd.push_str(&format!(" and unix:{}", socket.display()));
    }
    format!(
        "snapgate: serving NBD on {nbd}, admin on http://{}, data {}, site {}",
        gw.admin_addr(),
        gw.data().display(),
        gw.site()
    )
}

fn hostname() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call;
    // gethostname writes at most `len` bytes into it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        bail!(
            "cannot read the host name for the default site name ({}); pass --site NAME",
            std::io::Error::last_os_error()
        );
    }
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..len]);
    // A fully qualified host name would make a clumsy site name.
    let short = name.split('.').next().unwrap_or_default();
    if short.is_empty() {
        bail!("the host name is empty; pass --site NAME");
    }
    Ok(short.to_owned())
}

/// Logs go to stderr so stdout stays for results; RUST_LOG overrides the
/// default level.
fn init_logging(default: &str, json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

// ---------------------------------------------------------------- verify

fn verify(data: &Path, out: Output) -> Result<ExitCode> {
    if !data.is_dir() || !store::Pool::exists_in(data) {
        bail!(
            "no snapgate data directory at {} (pass --data DIR, the directory `snapgate serve` uses)",
            data.display()
        );
    }
    let pool = store::Pool::open(data, store::PoolOptions::default()).map_err(|e| {
        if e.kind() == store::ErrorKind::Locked {
            anyhow!(
                "the data directory {} is in use; stop `snapgate serve` before verifying ({e})",
                data.display()
            )
        } else {
            anyhow!("cannot open the data directory {}: {e}", data.display())
        }
    })?;
    let report = pool
        .verify()
        .map_err(|e| anyhow!("verifying {} failed: {e}", data.display()))?;

    if out.json {
        let damaged: Vec<_> = report
            .damaged
            .iter()
            .map(|d| {
                serde_json::json!({
                    "volume": d.volume,
                    "snapshot": d.snapshot,
                    "offset": d.offset,
                    "what": d.what,
                })
            })
            .collect();
        out.print_json(&serde_json::json!({
            "data": data.display().to_string(),
            "blocks_checked": report.blocks_checked,
            "ok": report.damaged.is_empty(),
            "damaged": damaged,
        }))?;
    } else {
        if !report.damaged.is_empty() {
            let rows = report
                .damaged
                .iter()
                .map(|d| {
                    vec![
                        d.volume.clone(),
                        d.snapshot.clone().unwrap_or_else(|| "-".into()),
                        d.offset.to_string(),
                        d.what.clone(),
                    ]
                })
                .collect();
            print_table(&["VOLUME", "SNAPSHOT", "OFFSET", "DAMAGE"], &[2], rows);
        }
        println!(
            "checked {} blocks in {}: {} damaged",
            report.blocks_checked,
            data.display(),
            report.damaged.len()
        );
    }
    if report.damaged.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "snapgate: error: {} damaged block{} found in {}",
            report.damaged.len(),
            if report.damaged.len() == 1 { "" } else { "s" },
            data.display()
        );
        Ok(ExitCode::FAILURE)
    }
}

// ---------------------------------------------------------------- volumes

fn volume(client: &Client, cmd: VolumeCommand, out: Output) -> Result<()> {
    match cmd {
        VolumeCommand::Create {
            name,
            size,
            cbt_granularity,
        } => {
            let v: VolumeView = client.post(
                "/v1/volumes",
                &serde_json::json!({ "name": name, "size": size, "cbt_granularity": cbt_granularity }),
            )?;
            out.show(&v, || {
                println!("created volume {} ({})", v.name, human_size(v.size))
            })
        }
        VolumeCommand::List => {
            let volumes: Vec<VolumeView> = client.get("/v1/volumes")?;
            out.show(&volumes, || print_volumes(&volumes))
        }
        VolumeCommand::Show { name } => {
            let v: VolumeView = client.get(&format!("/v1/volumes/{}", encode(&name)))?;
            out.show(&v, || print_volumes(std::slice::from_ref(&v)))
        }
        VolumeCommand::Resize { name, size, shrink } => {
            let v: VolumeView = client.post(
                &format!("/v1/volumes/{}/resize", encode(&name)),
                &serde_json::json!({ "size": size, "shrink": shrink }),
            )?;
            out.show(&v, || {
                println!("resized volume {} to {}", v.name, human_size(v.size))
            })
        }
        VolumeCommand::Delete { name } => {
            client.delete(&format!("/v1/volumes/{}", encode(&name)))?;
            out.show(&serde_json::json!({ "deleted": name }), || {
                println!("deleted volume {name}")
            })
        }
    }
}

fn print_volumes(volumes: &[VolumeView]) {
    let rows = volumes
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                human_size(v.size),
                human_size(v.allocated_bytes),
                v.snapshots.to_string(),
                utc_time(v.created_ms),
            ]
        })
        .collect();
    print_table(
        &["NAME", "SIZE", "ALLOCATED", "SNAPSHOTS", "CREATED"],
        &[1, 2, 3],
        rows,
    );
}

// ---------------------------------------------------------------- snapshots

fn snapshot(client: &Client, cmd: SnapshotCommand, out: Output) -> Result<()> {
    match cmd {
        SnapshotCommand::Create { volume, name } => {
            let s: SnapshotView = client.post(
                &format!("/v1/volumes/{}/snapshots", encode(&volume)),
                &serde_json::json!({ "name": name }),
            )?;
            out.show(&s, || {
                println!("created snapshot {} (export {})", s.name, s.export)
            })
        }
        SnapshotCommand::List { volume } => {
            let snaps: Vec<SnapshotView> =
                client.get(&format!("/v1/volumes/{}/snapshots", encode(&volume)))?;
            out.show(&snaps, || {
                let rows = snaps
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            human_size(s.size),
                            utc_time(s.created_ms),
                            s.export.clone(),
                        ]
                    })
                    .collect();
                print_table(&["NAME", "SIZE", "CREATED", "EXPORT"], &[1], rows);
            })
        }
        SnapshotCommand::Diff { volume, from, to } => {
            let mut path = format!(
                "/v1/volumes/{}/diff?from={}",
                encode(&volume),
                encode(&from)
            );
            if let Some(to) = &to {
                path.push_str(&format!("&to={}", encode(to)));
            }
            let d: DiffView = client.get(&path)?;
            out.show(&d, || {
                let rows = d
                    .extents
                    .iter()
                    .map(|e| {
                        vec![
                            e.offset.to_string(),
                            e.length.to_string(),
                            human_size(e.offset),
                            human_size(e.length),
                        ]
                    })
                    .collect();
                print_table(&["OFFSET", "LENGTH", "AT", "SIZE"], &[0, 1, 2, 3], rows);
                println!(
                    "{} changed in {} extent{} between {volume}@{from} and {} (granularity {})",
                    human_size(d.bytes),
                    d.extents.len(),
                    if d.extents.len() == 1 { "" } else { "s" },
                    match &d.to {
                        Some(t) => format!("{volume}@{t}"),
                        None => format!("the head of {volume}"),
                    },
                    human_size(d.granularity)
                );
            })
        }
        SnapshotCommand::Delete { volume, name } => {
            client.delete(&format!(
                "/v1/volumes/{}/snapshots/{}",
                encode(&volume),
                encode(&name)
            ))?;
            out.show(
                &serde_json::json!({ "deleted": format!("{volume}@{name}") }),
                || println!("deleted snapshot {volume}@{name}"),
            )
        }
    }
}

// ---------------------------------------------------------------- output

#[derive(Clone, Copy)]
struct Output {
    json: bool,
}

impl Output {
    /// One JSON document, or the human rendering.
    fn show<T: Serialize>(self, value: &T, human: impl FnOnce()) -> Result<()> {
        if self.json {
            self.print_json(value)
        } else {
            human();
            Ok(())
        }
    }

    fn print_json<T: Serialize>(self, value: &T) -> Result<()> {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| anyhow!("cannot encode the result as JSON: {e}"))?;
        println!("{text}");
        Ok(())
    }
}

/// Prints rows under headers, columns padded to the widest cell; the columns
/// listed in `right` (numbers, sizes) are right-aligned.
fn print_table(headers: &[&str], right: &[usize], rows: Vec<Vec<String>>) {
    print!("{}", table(headers, right, rows));
}

fn table(headers: &[&str], right: &[usize], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let header_row = headers.iter().map(|h| h.to_string()).collect();
    let mut text = String::new();
    for row in std::iter::once(header_row).chain(rows) {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if right.contains(&i) {
                    format!("{cell:>w$}", w = widths[i])
                } else {
                    format!("{cell:<w$}", w = widths[i])
                }
            })
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];

/// `10 GiB`, `1.5 MiB`, `512 B`: one decimal at most, none when exact.
/// A change-tracking granularity: a size, or `off` (0).
/// [`parse_size`] for a volume: at most what the store takes (1 PiB).
fn parse_volume_size(s: &str) -> std::result::Result<u64, String> {
    let size = parse_size(s)?;
    if size > store::MAX_VOLUME_SIZE {
        return Err(format!(
            "{s} is larger than the largest volume ({})",
            human_size(store::MAX_VOLUME_SIZE)
        ));
    }
    Ok(size)
}

fn parse_granularity(s: &str) -> std::result::Result<u64, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(0);
    }
    let wrong =
        || format!("granularity {s} is not a power of two from 4K to 1G (e.g. 64K), or off");
    if s.trim() == "0" {
        return Err(wrong());
    }
    let g = parse_size(s)?;
    if !g.is_power_of_two() || !(4096..=1 << 30).contains(&g) {
        return Err(wrong());
    }
    Ok(g)
}

pub fn human_size(bytes: u64) -> String {
    let mut unit = 0;
    while unit + 1 < UNITS.len() && bytes >= 1u64 << (10 * (unit + 1)) {
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    let scale = 1u64 << (10 * unit);
    if bytes.is_multiple_of(scale) {
        return format!("{} {}", bytes / scale, UNITS[unit]);
    }
    let value = bytes as f64 / scale as f64;
    let text = format!("{value:.1}");
    // 1023.96 KiB rounds to "1024.0": say 1.0 MiB instead.
    if text.starts_with("1024") && unit + 1 < UNITS.len() {
        return format!("{:.1} {}", value / 1024.0, UNITS[unit + 1]);
    }
    format!("{text} {}", UNITS[unit])
}

/// Parses a size: plain bytes or a number with a binary unit, any case:
/// `512`, `64K`, `64k`, `64KiB`, `10M`, `4G`, `2T`, `1P`, `100B`.
pub fn parse_size(text: &str) -> Result<u64, String> {
    const EXAMPLE: &str = "use bytes or a binary unit, e.g. 512, 64K, 10M, 4G, 2T";
    let s = text.trim();
    let digits = s.len() - s.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let (number, unit) = s.split_at(digits);
    if number.is_empty() {
        return Err(format!("{text:?} is not a size: {EXAMPLE}"));
    }
    if unit.starts_with('.') {
        return Err(format!(
            "{text:?}: fractions are not accepted, use a smaller unit (1536M, not 1.5G); {EXAMPLE}"
        ));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {:?}: {EXAMPLE}",
                unit.trim()
            ))
        }
    };
    let too_big = || format!("{text:?} is too large: at most 16 EiB - 1 byte");
    let n: u64 = number.parse().map_err(|_| too_big())?;
    if n == 0 {
        return Err(format!(
            "{text:?}: a volume needs a size above 0; {EXAMPLE}"
        ));
    }
    n.checked_mul(1u64 << shift).ok_or_else(too_big)
}

/// [`parse_size`], with 0 allowed (it turns the setting off).
pub fn parse_size_or_zero(text: &str) -> Result<u64, String> {
    if text.trim() == "0" {
        Ok(0)
    } else {
        parse_size(text)
    }
}

/// Unix milliseconds as `2024-05-01 12:00:00Z` (UTC).
pub fn utc_time(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ---------------------------------------------------------------- admin client

/// A blocking client of the admin endpoint.
#[derive(Clone)]
struct Client {
    addr: String,
    base: String,
    agent: ureq::Agent,
}

impl Client {
    fn new(addr: &str) -> Self {
        let trimmed = addr.trim_end_matches('/');
        let base = if trimmed.starts_with("http://") || trimmed.starts_with("https://") {
            trimmed.to_owned()
        } else {
            format!("http://{trimmed}")
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            // Deleting a large volume may take a while; a hung gateway must
            // still not hang scripts forever.
            .timeout(Duration::from_secs(600))
            .build();
        Client {
            addr: addr.to_owned(),
            base,
            agent,
        }
    }

    /// The same client, giving up on a request after `limit`.
    fn with_timeout(&self, limit: Duration) -> Client {
        Client {
            agent: ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(5).min(limit))
                .timeout(limit)
                .build(),
            ..self.clone()
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let resp = self.send(self.agent.get(&self.url(path)), None)?;
        self.decode(resp)
    }

    fn post<T: DeserializeOwned>(&self, path: &str, body: &serde_json::Value) -> Result<T> {
        let resp = self.send(self.agent.post(&self.url(path)), Some(body))?;
        self.decode(resp)
    }

    fn delete(&self, path: &str) -> Result<()> {
        self.send(self.agent.delete(&self.url(path)), None)?;
        Ok(())
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn send(&self, req: ureq::Request, body: Option<&serde_json::Value>) -> Result<ureq::Response> {
        let sent = match body {
            Some(body) => req.send_json(body),
            None => req.call(),
        };
        match sent {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                match serde_json::from_str::<ErrorBody>(&text) {
                    Ok(body) => Err(anyhow!("{}", body.error)),
                    Err(_) => Err(anyhow!(
                        "the admin endpoint at {} answered HTTP {code} without an error message (is it a snapgate gateway?)",
                        self.addr
                    )),
                }
            }
            Err(ureq::Error::Transport(t)) => match t.kind() {
                ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns => Err(anyhow!(
                    "cannot reach the snapgate admin endpoint at {} (is `snapgate serve` running?)",
                    self.addr
                )),
                ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => Err(anyhow!(
                    "{:?} is not a usable admin address: give HOST:PORT, e.g. {DEFAULT_ADMIN}",
                    self.addr
                )),
                // ureq reports some of these as I/O errors; the text tells.
                _ if not_http(&t) => Err(anyhow!(
                    "{} does not answer HTTP: is it the NBD port? The admin endpoint is `serve --admin` (default {DEFAULT_ADMIN})",
                    self.addr
                )),
                _ if t.to_string().contains("timed out") => Err(anyhow!(
                    "the admin endpoint at {} did not answer in time (is the gateway stopped or overloaded?)",
                    self.addr
                )),
                _ => Err(anyhow!(
                    "talking to the admin endpoint at {} failed: {t}",
                    self.addr
                )),
            },
        }
    }

    fn decode<T: DeserializeOwned>(&self, resp: ureq::Response) -> Result<T> {
        resp.into_json().map_err(|e| {
            anyhow!(
                "unexpected answer from the admin endpoint at {}: {e}",
                self.addr
            )
        })
    }
}

/// Whether a transport error says the other side does not speak HTTP.
fn not_http(t: &ureq::Transport) -> bool {
    matches!(
        t.kind(),
        ureq::ErrorKind::BadStatus | ureq::ErrorKind::BadHeader
    ) || {
        let text = t.to_string();
        text.contains("Header field didn't end") || text.contains("HTTP version")
    }
}

/// Percent-encodes one path segment (a mirror volume's `/` becomes `%2F`).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        for (text, bytes) in [
            ("512", 512),
            ("64K", 64 << 10),
            ("64k", 64 << 10),
            ("64KiB", 64 << 10),
            ("64kib", 64 << 10),
            ("64KB", 64 << 10),
            ("10M", 10 << 20),
            ("4G", 4 << 30),
            ("4 GiB", 4 << 30),
            ("2T", 2 << 40),
            ("1P", 1 << 50),
            ("100B", 100),
            (" 7 ", 7),
            ("1048576", 1 << 20),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn bad_sizes_say_what_is_wrong_with_an_example() {
        for (text, says) in [
            ("", "is not a size"),
            ("G", "is not a size"),
            ("-5", "is not a size"),
            ("1.5G", "fractions are not accepted"),
            ("10X", "unknown unit \"X\""),
            ("0", "above 0"),
            ("99999999999999999999", "too large"),
            ("16384P", "too large"),
        ] {
            let err = parse_size(text).unwrap_err();
            assert!(err.contains(says), "{text}: {err}");
            assert!(!err.contains('\n'), "{err}");
            if !says.contains("large") {
                assert!(err.contains("e.g. 512, 64K, 10M, 4G, 2T"), "{err}");
            }
        }
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(1024), "1 KiB");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(10 << 30), "10 GiB");
        assert_eq!(human_size((1 << 20) - 1), "1.0 MiB");
        assert_eq!(human_size(u64::MAX), "16.0 EiB");
    }

    #[test]
    fn times_are_utc() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(utc_time(1_700_000_000_123), "2023-11-14 22:13:20Z");
    }

    #[test]
    fn tables_align() {
        let text = table(
            &["NAME", "SIZE"],
            &[1],
            vec![
                vec!["a".into(), "10 GiB".into()],
                vec!["longer-name".into(), "1 B".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME           SIZE\na            10 GiB\nlonger-name     1 B\n"
        );
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("vm1"), "vm1");
        assert_eq!(encode("paris/vm 1"), "paris%2Fvm%201");
        assert_eq!(encode("vm1@s1"), "vm1@s1");
    }

    #[test]
    fn command_line_shapes() {
        let cli =
            Cli::try_parse_from(["snapgate", "volume", "create", "vm1", "--size", "10G"]).unwrap();
        assert_eq!(cli.admin, DEFAULT_ADMIN);
        assert!(matches!(
            cli.command,
            Command::Volume(VolumeCommand::Create { ref name, size, cbt_granularity: None }) if name == "vm1" && size == 10 << 30
        ));
        let cli = Cli::try_parse_from([
            "snapgate",
            "volume",
            "list",
            "--json",
            "--admin",
            "127.0.0.2:1",
        ])
        .unwrap();
        assert!(cli.json);
        assert_eq!(cli.admin, "127.0.0.2:1");
        let cli = Cli::try_parse_from(["snapgate", "serve", "--admin", "127.0.0.1:9"]).unwrap();
        assert_eq!(cli.admin, "127.0.0.1:9");
        let err = Cli::try_parse_from(["snapgate", "volume", "create", "v", "--size", "3Q"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown unit"), "{err}");
    }
}
