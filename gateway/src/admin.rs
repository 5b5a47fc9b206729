//! The admin endpoint: HTTP + JSON over the pool, used by the `snapgate` CLI
//! and by scripts, plus `GET /metrics` for Prometheus.
//!
//! | method | path | body | answer |
//! |---|---|---|---|
//! | GET | `/health` | | 200 `{"status":"ok"}` |
//! | GET | `/v1/site` | | `{site, version}` |
//! | GET | `/v1/volumes` | | `[Volume]` |
//! | POST | `/v1/volumes` | `{name, size}` | 201 `Volume` |
//! | GET | `/v1/volumes/{name}` | | `Volume` |
//! | POST | `/v1/volumes/{name}/resize` | `{size, shrink?}` | `Volume` |
//! | DELETE | `/v1/volumes/{name}` | | 204 |
//! | GET | `/v1/volumes/{name}/snapshots` | | `[Snapshot]` |
//! | POST | `/v1/volumes/{name}/snapshots` | `{name}` | 201 `Snapshot` |
//! | DELETE | `/v1/volumes/{name}/snapshots/{snap}` | | 204 |
//! | GET | `/v1/volumes/{name}/diff?from=A[&to=B]` | | `Diff`: changed extents after point A, up to point B or the head |
//! | GET | `/v1/mounts` | | `[Mount]` |
//! | POST | `/v1/mounts` | `{dir, holder?}` (dir absolute) | 201 `Mount`: the FUSE view, served by this gateway; 409 when `dir` already shows one |
//! | DELETE | `/v1/mounts?dir=DIR` | | 204 |
//! | GET | `/metrics` | | Prometheus text |
//!
//! Sizes are bytes. Names go in the path percent-encoded (a mirror volume's
//! `/` as `%2F`). Every error is `{"error": "<one line>"}` with the status
//! chosen by [`http_status`]. Store calls block, so each runs on tokio's
//! blocking pool, never on the async workers that also carry NBD traffic.
//!
//! A view made with a `holder` (the pid of a process on this machine;
//! `snapgate mount` sends its own) lives as long as that process: the gateway
//! holds a pidfd of it (so a reused pid is never mistaken for it), and
//! unmounts the view when the process ends, `kill -9` included. A view made
//! without one lives until `DELETE /v1/mounts`, an outside unmount or the
//! gateway's end.

use crate::error::{BodyProblem, Error, Result};
use crate::fuse::{self, FuseView, MountError};
use crate::metrics::{self, Metrics};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use store::{Pool, SnapshotInfo, VolumeInfo, VolumeOptions};

/// A volume as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeView {
    pub name: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Bytes of stored data the volume and its snapshots hold.
    pub allocated_bytes: u64,
    pub snapshots: usize,
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
    /// Bytes per changed-block-tracking bit.
    #[serde(default)]
    pub cbt_granularity: u64,
}

impl From<VolumeInfo> for VolumeView {
    fn from(v: VolumeInfo) -> Self {
        VolumeView {
            name: v.name,
            size: v.size,
            allocated_bytes: v.allocated_bytes,
            snapshots: v.snapshots,
            created_ms: v.created_ms,
            cbt_granularity: v.cbt_granularity,
        }
    }
}

/// A snapshot as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotView {
    pub name: String,
    pub volume: String,
    /// The volume's size when the snapshot was taken, in bytes.
    pub size: u64,
    pub created_ms: u64,
    /// The NBD export that serves it read-only: `volume@name`.
    pub export: String,
}

impl From<SnapshotInfo> for SnapshotView {
    fn from(s: SnapshotInfo) -> Self {
        SnapshotView {
            export: format!("{}@{}", s.volume, s.name),
            name: s.name,
            volume: s.volume,
            size: s.size,
            created_ms: s.created_ms,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteView {
    pub site: String,
    pub version: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    pub size: u64,
    /// Bytes per change-tracking bit; 0 turns tracking off; absent: 64 KiB.
    #[serde(default)]
    pub cbt_granularity: Option<u64>,
}

/// Changed extents between two points of a volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffView {
    pub volume: String,
    pub from: String,
    /// The newer point, or `null` for the head.
    pub to: Option<String>,
    /// Bytes per tracking bit: extents are whole multiples of it (clipped
    /// to the volume's end).
    pub granularity: u64,
    pub extents: Vec<ExtentView>,
    /// Sum of the extents' lengths.
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtentView {
    pub offset: u64,
    pub length: u64,
}

#[derive(Clone, Debug, Deserialize)]
pub struct DiffQuery {
    pub from: String,
    #[serde(default)]
    pub to: Option<String>,
}

/// A FUSE view served by the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountView {
    pub dir: String,
    pub site: String,
    pub alive: bool,
    /// The pid of the process the view lives with, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<u32>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MountRequest {
    pub dir: String,
    /// Unmount the view when the process with this pid ends.
    #[serde(default)]
    pub holder: Option<u32>,
}

/// A FUSE view this gateway serves.
pub struct Mount {
    view: FuseView,
    holder: Option<u32>,
    /// The holder's pidfd, to tell whether it has ended.
    holder_fd: Option<Arc<OwnedFd>>,
    /// Tells this mount from a later one on the same directory.
    id: u64,
    /// The task waiting for the holder's end; stopped when the mount is
    /// dropped first.
    watch: Option<Watch>,
}

impl Mount {
    /// Whether the process the view lives with has ended.
    fn holder_ended(&self) -> bool {
        self.holder_fd.as_deref().is_some_and(readable_now)
    }

    /// Unmounts the view and stops watching its holder.
    pub fn unmount(self) -> std::result::Result<(), MountError> {
        self.view.unmount()
    }
}

/// Aborts the holder-watching task on drop, unless disarmed.
struct Watch(Option<tokio::task::AbortHandle>);

impl Watch {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// The FUSE views this gateway serves, by canonical directory. Dropping a
/// mount unmounts its view.
pub type Mounts = Arc<Mutex<BTreeMap<PathBuf, Mount>>>;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolume {
    pub size: u64,
    /// Shrinking discards the data past the new end, so it must be asked
    /// for explicitly.
    #[serde(default)]
    pub shrink: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    pub name: String,
}

/// The body of every error answer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// What the handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
    pub site: String,
    pub mounts: Mounts,
}

/// The admin API; serve it with `axum::serve`.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(prometheus))
        .route("/v1/site", get(site))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(show_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/resize", post(resize_volume))
        .route(
            "/v1/volumes/{name}/snapshots",
            get(list_snapshots).post(create_snapshot),
        )
        .route(
            "/v1/volumes/{name}/snapshots/{snap}",
            axum::routing::delete(delete_snapshot),
        )
        .route("/v1/volumes/{name}/diff", get(diff))
        .route(
            "/v1/mounts",
            get(list_mounts).post(create_mount).delete(delete_mount),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::map_response(json_errors))
        .with_state(state)
}

/// The one place where a gateway error becomes an HTTP status.
pub fn http_status(err: &Error) -> StatusCode {
    use store::ErrorKind as K;
    match err {
        Error::Store(e) | Error::OpenPool { source: e, .. } => match e.kind() {
            K::NotFound | K::Deleted => StatusCode::NOT_FOUND,
            K::AlreadyExists => StatusCode::CONFLICT,
            K::InvalidName | K::InvalidArgument | K::OutOfRange => StatusCode::BAD_REQUEST,
            K::ReadOnly => StatusCode::CONFLICT,
            K::Locked => StatusCode::LOCKED,
            K::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
            K::Corruption | K::Io => StatusCode::INTERNAL_SERVER_ERROR,
        },
        Error::Invalid(_) => StatusCode::BAD_REQUEST,
        Error::BadBody(_, BodyProblem::ContentType) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Error::BadBody(_, BodyProblem::TooLarge) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::NotMounted(_) => StatusCode::NOT_FOUND,
        Error::Mount(e) => match e {
            MountError::Missing(_)
            | MountError::NotADirectory(_)
            | MountError::NotEmpty(_)
            | MountError::InvalidSite(_) => StatusCode::BAD_REQUEST,
            MountError::AlreadyMounted { .. } | MountError::Occupied { .. } => StatusCode::CONFLICT,
            MountError::NoFuseDevice => StatusCode::SERVICE_UNAVAILABLE,
            MountError::Stale { .. }
            | MountError::Dir { .. }
            | MountError::Mount { .. }
            | MountError::Unmount { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        },
        Error::Unavailable(_) => StatusCode::NOT_IMPLEMENTED,
        Error::Bind { .. } | Error::Io { .. } | Error::Internal(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = http_status(&self);
        let message = self.to_string();
        if status.is_server_error() {
            tracing::error!(error = %message, "admin request failed");
        } else {
            tracing::debug!(error = %message, status = status.as_u16(), "admin request refused");
        }
        (status, Json(ErrorBody { error: message })).into_response()
    }
}

/// Runs a blocking store call off the async workers.
async fn blocking<T, F>(f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await?
}

/// Turns axum's plain-text body rejections into our JSON errors, keeping
/// the status of a wrong content type (415) and of a body too large (413).
fn body<T>(parsed: Result<Json<T>, JsonRejection>) -> Result<T> {
    parsed.map(|Json(v)| v).map_err(|e| {
        let msg = format!("bad request body: {}", e.body_text());
        match e.status() {
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Error::BadBody(msg, BodyProblem::ContentType),
            StatusCode::PAYLOAD_TOO_LARGE => Error::BadBody(msg, BodyProblem::TooLarge),
            _ => Error::Invalid(msg),
        }
    })
}

/// Every error answer is `{"error": ...}`: the rejections of axum's own
/// extractors (a path segment that is not UTF-8, a query string without a
/// field it needs) come as plain text, and are wrapped here.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let text = match axum::body::to_bytes(resp.into_body(), 64 << 10).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_owned(),
        Err(_) => String::new(),
    };
    let error = if text.is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request failed")
            .to_owned()
    } else {
        text
    };
    (status, Json(ErrorBody { error })).into_response()
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn site(State(st): State<AdminState>) -> Json<SiteView> {
    Json(SiteView {
        site: st.site.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

async fn list_volumes(State(st): State<AdminState>) -> Result<Json<Vec<VolumeView>>> {
    let pool = st.pool;
    let mut volumes = blocking(move || Ok(pool.volumes())).await?;
    volumes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(volumes.into_iter().map(VolumeView::from).collect()))
}

async fn create_volume(
    State(st): State<AdminState>,
    req: Result<Json<CreateVolume>, JsonRejection>,
) -> Result<(StatusCode, Json<VolumeView>)> {
    let req = body(req)?;
    let pool = st.pool;
    let mut opts = VolumeOptions::default();
    if let Some(g) = req.cbt_granularity {
        opts.cbt_granularity = g;
    }
    let info = blocking(move || Ok(pool.create_volume_with(&req.name, req.size, &opts)?)).await?;
    tracing::info!(volume = %info.name, size = info.size, "created volume");
    Ok((StatusCode::CREATED, Json(info.into())))
}

async fn show_volume(
    State(st): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<VolumeView>> {
    let pool = st.pool;
    let info = blocking(move || Ok(pool.volume_info(&name)?)).await?;
    Ok(Json(info.into()))
}

async fn resize_volume(
    State(st): State<AdminState>,
    Path(name): Path<String>,
    req: Result<Json<ResizeVolume>, JsonRejection>,
) -> Result<Json<VolumeView>> {
    let req = body(req)?;
    let pool = st.pool;
    let info = blocking(move || {
        let current = pool.volume_info(&name)?;
        if req.size < current.size && !req.shrink {
            return Err(Error::Invalid(format!(
                "shrinking volume {name} from {} to {} bytes discards data; ask for it explicitly (\"shrink\": true, or --shrink)",
                current.size, req.size
            )));
        }
        Ok(pool.resize_volume(&name, req.size, req.shrink)?)
    })
    .await?;
    tracing::info!(volume = %info.name, size = info.size, "resized volume");
    Ok(Json(info.into()))
}

async fn delete_volume(
    State(st): State<AdminState>,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    let pool = st.pool;
    let deleted = name.clone();
    blocking(move || Ok(pool.delete_volume(&name)?)).await?;
    // Its series go with it: a volume created later under the name starts
    // from zero.
    st.metrics.forget_volume(&deleted);
    tracing::info!(volume = %deleted, "deleted volume");
    Ok(StatusCode::NO_CONTENT)
}

async fn list_snapshots(
    State(st): State<AdminState>,
    Path(volume): Path<String>,
) -> Result<Json<Vec<SnapshotView>>> {
    let pool = st.pool;
    let snaps = blocking(move || Ok(pool.snapshots(&volume)?)).await?;
    Ok(Json(snaps.into_iter().map(SnapshotView::from).collect()))
}

async fn create_snapshot(
    State(st): State<AdminState>,
    Path(volume): Path<String>,
    req: Result<Json<CreateSnapshot>, JsonRejection>,
) -> Result<(StatusCode, Json<SnapshotView>)> {
    let req = body(req)?;
    let pool = st.pool;
    let snap = blocking(move || Ok(pool.create_snapshot(&volume, &req.name)?)).await?;
    tracing::info!(volume = %snap.volume, snapshot = %snap.name, "created snapshot");
    Ok((StatusCode::CREATED, Json(snap.into())))
}

async fn delete_snapshot(
    State(st): State<AdminState>,
    Path((volume, snap)): Path<(String, String)>,
) -> Result<StatusCode> {
    let pool = st.pool;
    let export = format!("{volume}@{snap}");
    blocking(move || Ok(pool.delete_snapshot(&volume, &snap)?)).await?;
    st.metrics.forget_export(&export);
    tracing::info!(snapshot = %export, "deleted snapshot");
    Ok(StatusCode::NO_CONTENT)
}

/// A per-volume gauge: metric name, help text, value.
type VolumeGauge = (&'static str, &'static str, fn(&VolumeInfo) -> u64);

async fn diff(
    State(st): State<AdminState>,
    Path(name): Path<String>,
    Query(q): Query<DiffQuery>,
) -> Result<Json<DiffView>> {
    let d = blocking(move || Ok(st.pool.diff(&name, &q.from, q.to.as_deref())?)).await?;
    Ok(Json(DiffView {
        volume: d.volume,
        from: d.from,
        to: d.to,
        granularity: d.granularity,
        extents: d
            .extents
            .into_iter()
            .map(|(offset, length)| ExtentView { offset, length })
            .collect(),
        bytes: d.bytes,
    }))
}

fn mount_view(site: &str, m: &Mount) -> MountView {
    MountView {
        dir: m.view.dir().display().to_string(),
        site: site.to_owned(),
        alive: m.view.is_alive(),
        holder: m.holder,
    }
}

/// The directory of a mount request: absolute (the CLI resolves it; the
/// gateway's working directory means nothing to the caller), canonical
/// when it exists.
fn mount_dir(dir: &str) -> Result<PathBuf> {
    let p = PathBuf::from(dir);
    if !p.is_absolute() {
        return Err(Error::Invalid(format!(
            "mount directory {dir:?} must be an absolute path"
        )));
    }
    Ok(std::fs::canonicalize(&p).unwrap_or(p))
}

async fn list_mounts(State(st): State<AdminState>) -> Json<Vec<MountView>> {
    let mut mounts = st.mounts.lock();
    // Views unmounted from outside (fusermount3 -u) are forgotten.
    mounts.retain(|_, m| m.view.is_alive());
    Json(mounts.values().map(|m| mount_view(&st.site, m)).collect())
}

/// The process a view lives with, held by a pidfd: it stays bound to that
/// process (a pid reused later is another process) and turns readable when
/// the process ends. `fd` is `None` where the kernel gives none (no
/// `pidfd_open`, or a sandbox that forbids it): the view then stays until
/// unmounted.
struct Holder {
    pid: u32,
    fd: Option<Arc<OwnedFd>>,
}

impl Holder {
    fn open(pid: u32) -> Result<Holder> {
        let refused = |e: std::io::Error| {
            Error::Invalid(format!(
                "holder {pid} is not a process this gateway can see ({e}); `snapgate mount` must run on the gateway's machine, in its process namespace"
            ))
        };
        let raw = libc::pid_t::try_from(pid)
            .map_err(|_| refused(std::io::Error::from_raw_os_error(libc::ESRCH)))?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1; it touches no memory of ours.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw, 0) };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOSYS) | Some(libc::EPERM) => {
                    tracing::warn!(
                        pid,
                        "cannot watch a mount's holder ({e}): its view stays until unmounted"
                    );
                    Ok(Holder { pid, fd: None })
                }
                _ => Err(refused(e)),
            };
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let holder = Holder {
            pid,
            fd: Some(Arc::new(fd)),
        };
        if holder.has_ended() {
            return Err(Error::Invalid(format!("holder {pid} has already ended")));
        }
        Ok(holder)
    }

    fn has_ended(&self) -> bool {
        self.fd.as_deref().is_some_and(readable_now)
    }
}

/// Whether `fd` is readable right now (a pidfd: its process has ended).
fn readable_now(fd: &OwnedFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; no waiting.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// Waits for the holder behind `fd` to end: true when it has, false when
/// it cannot be watched (the runtime is shutting down, say).
async fn ended(fd: Arc<OwnedFd>, pid: u32) -> bool {
    use tokio::io::{unix::AsyncFd, Interest};
    // SAFETY: the Arc keeps the descriptor open, and the same one, for as
    // long as the AsyncFd holds its clone.
    match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
        Ok(fd) => fd.readable().await.is_ok(),
        Err(e) => {
            tracing::warn!(
                pid,
                "cannot watch a mount's holder ({}); its view stays until unmounted",
                e
            );
            false
        }
    }
}

/// Unmounts the view on `dir` once its holder has ended, unless mount `id`
/// is gone by then (or the gateway with it).
async fn unmount_when_ended(
    mounts: std::sync::Weak<Mutex<BTreeMap<PathBuf, Mount>>>,
    dir: PathBuf,
    id: u64,
    pid: u32,
    fd: Arc<OwnedFd>,
) {
    if !ended(fd, pid).await {
        return;
    }
    let Some(mounts) = mounts.upgrade() else {
        return;
    };
    let gone = {
        let mut m = mounts.lock();
        match m.get(&dir) {
            Some(x) if x.id == id => m.remove(&dir),
            _ => None,
        }
    };
    let Some(Mount { view, watch, .. }) = gone else {
        return;
    };
    // This task is the watch: dropping its handle armed would abort it.
    if let Some(w) = watch {
        w.disarm();
    }
    tracing::info!(dir = %dir.display(), pid, "the process holding the FUSE view ended: unmounting it");
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = view.unmount() {
            tracing::warn!(dir = %dir.display(), "{e}");
        }
    })
    .await;
}

static NEXT_MOUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

async fn create_mount(
    State(st): State<AdminState>,
    parsed: Result<Json<MountRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<MountView>)> {
    let req = body(parsed)?;
    let dir = mount_dir(&req.dir)?;
    let holder = req.holder.map(Holder::open).transpose()?;
    let id = NEXT_MOUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let rt = tokio::runtime::Handle::current();
    // Everything, the holder's watch included, happens in the blocking
    // task, which runs to its end even if the client goes away meanwhile:
    // a view is never left without the watch that ends it.
    let answer = blocking(move || {
        let old = {
            let mut m = st.mounts.lock();
            if let Some(old) = m.get(&dir) {
                if old.view.is_alive() && !old.holder_ended() {
                    let why = match old.holder {
                        Some(pid) => format!(
                            ", kept by `snapgate mount` (pid {pid}) through this gateway: stop that command first"
                        ),
                        None => format!(
                            " of this gateway, mounted through its admin API: unmount it first (`fusermount3 -u {}`)",
                            dir.display()
                        ),
                    };
                    return Err(MountError::AlreadyMounted { dir, why }.into());
                }
            }
            // Unmounted from outside, or its holder has ended: replaced.
            m.remove(&dir)
        };
        if let Some(old) = old {
            old.unmount()?;
        }
        let view = fuse::mount(Arc::clone(&st.pool), st.site.clone(), &dir)?;
        let key = view.dir().to_path_buf();
        let mut mount = Mount {
            view,
            holder: holder.as_ref().map(|h| h.pid),
            holder_fd: holder.as_ref().and_then(|h| h.fd.clone()),
            id,
            watch: None,
        };
        let answer = mount_view(&st.site, &mount);
        tracing::info!(dir = %answer.dir, holder = ?mount.holder, "FUSE view mounted");
        let mut m = st.mounts.lock();
        if let Some(h) = &holder {
            if let Some(fd) = &h.fd {
                let task = rt.spawn(unmount_when_ended(
                    Arc::downgrade(&st.mounts),
                    key.clone(),
                    id,
                    h.pid,
                    Arc::clone(fd),
                ));
                mount.watch = Some(Watch(Some(task.abort_handle())));
            }
        }
        m.insert(key, mount);
        Ok(answer)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(answer)))
}

#[derive(Clone, Debug, Deserialize)]
pub struct MountQuery {
    pub dir: String,
}

async fn delete_mount(
    State(st): State<AdminState>,
    Query(q): Query<MountQuery>,
) -> Result<StatusCode> {
    let dir = mount_dir(&q.dir)?;
    let mount = st.mounts.lock().remove(&dir);
    match mount {
        Some(m) => {
            blocking(move || Ok(m.unmount()?)).await?;
            tracing::info!(dir = %dir.display(), "FUSE view unmounted");
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(Error::NotMounted(dir.display().to_string())),
    }
}

async fn prometheus(State(st): State<AdminState>) -> Result<Response> {
    let pool = st.pool;
    let (mut volumes, stats) = blocking(move || Ok((pool.volumes(), pool.stats()))).await?;
    volumes.sort_by(|a, b| a.name.cmp(&b.name));

    let mut out = String::new();
    st.metrics.render(&mut out);
    metrics::header(
        &mut out,
        "snapgate_build_info",
        "gauge",
        "Always 1; the labels name the gateway's version and site.",
    );
    let _ = writeln!(
        out,
        "snapgate_build_info{{version=\"{}\",site=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        metrics::escape_label(&st.site)
    );
    metrics::header(
        &mut out,
        "snapgate_volumes",
        "gauge",
        "Volumes in the pool.",
    );
    let _ = writeln!(out, "snapgate_volumes {}", volumes.len());
    let pool_metrics: [(&str, &str, &str, u64); 8] = [
        (
            "snapgate_map_pages",
            "gauge",
            "Pages of the volumes' block maps.",
            stats.map_pages,
        ),
        (
            "snapgate_map_dirty_pages",
            "gauge",
            "Map pages changed since the last checkpoint (held in memory).",
            stats.map_dirty_pages,
        ),
        (
            "snapgate_map_patch_bytes",
            "gauge",
            "Memory of changed map pages kept as patches (old page plus changes) until the next checkpoint.",
            stats.map_patch_bytes,
        ),
        (
            "snapgate_map_cache_bytes",
            "gauge",
            "Memory of the clean map pages in the cache (see --map-cache).",
            stats.map_cached_bytes,
        ),
        (
            "snapgate_map_page_reads_total",
            "counter",
            "Map pages read from disk because the cache did not hold them.",
            stats.map_page_loads,
        ),
        (
            "snapgate_journal_bytes",
            "gauge",
            "Bytes in the current metadata journal.",
            stats.journal_bytes,
        ),
        (
            "snapgate_gc_pending_volumes",
            "gauge",
            "Volumes whose deleted snapshots' space is still being reclaimed in the background.",
            stats.gc_pending_volumes,
        ),
        (
            "snapgate_space_reserve_bytes",
            "gauge",
            "Disk space held for reopening the pool on a full disk; 0 while a full disk has it given back.",
            stats.space_reserve_bytes,
        ),
    ];
    for (name, kind, help, value) in pool_metrics {
        metrics::header(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    let gauges: [VolumeGauge; 3] = [
        (
            "snapgate_volume_size_bytes",
            "Virtual size of each volume.",
            |v| v.size,
        ),
        (
            "snapgate_volume_allocated_bytes",
            "Stored bytes held by each volume and its snapshots.",
            |v| v.allocated_bytes,
        ),
        (
            "snapgate_volume_snapshots",
            "Snapshots of each volume.",
            |v| v.snapshots as u64,
        ),
    ];
    for (name, help, value) in gauges {
        metrics::header(&mut out, name, "gauge", help);
        for v in &volumes {
            let _ = writeln!(
                out,
                "{name}{{volume=\"{}\"}} {}",
                metrics::escape_label(&v.name),
                value(v)
            );
        }
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response())
}

async fn no_route(method: Method, uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorBody {
            error: format!("no such endpoint: {method} {}", uri.path()),
        }),
    )
        .into_response()
}

async fn wrong_method(method: Method, uri: Uri) -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ErrorBody {
            error: format!("{method} is not allowed on {}", uri.path()),
        }),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Op;
    use serde_json::{json, Value};
    use std::net::SocketAddr;
    use std::time::Duration;

    /// The router served on a loopback port over a fresh pool, driven with
    /// real HTTP requests (the same client library as the CLI).
    struct Api {
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        pool: Arc<Pool>,
        _dir: tempfile::TempDir,
    }

    async fn api() -> Api {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path().join("pool"), store::PoolOptions::default()).unwrap();
        let metrics = Arc::new(Metrics::new());
        let app = router(AdminState {
            pool: Arc::clone(&pool),
            metrics: Arc::clone(&metrics),
            site: "paris".into(),
            mounts: Mounts::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Api {
            addr,
            metrics,
            pool,
            _dir: dir,
        }
    }

    struct Answer {
        status: u16,
        content_type: String,
        text: String,
    }

    impl Answer {
        fn json(&self) -> Value {
            serde_json::from_str(&self.text)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
        }

        fn error(&self) -> String {
            self.json()["error"]
                .as_str()
                .unwrap_or_else(|| panic!("no error message: {}", self.text))
                .to_owned()
        }
    }

    impl Api {
        async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Answer {
            let url = format!("http://{}{path}", self.addr);
            let method = method.to_owned();
            tokio::task::spawn_blocking(move || {
                let req = ureq::request(&method, &url).timeout(Duration::from_secs(10));
                let sent = match body {
                    Some(body) => req.send_json(body),
                    None => req.call(),
                };
                let resp = match sent {
                    Ok(resp) => resp,
                    Err(ureq::Error::Status(_, resp)) => resp,
                    Err(e) => panic!("{e}"),
                };
                Answer {
                    status: resp.status(),
                    content_type: resp.content_type().to_owned(),
                    text: resp.into_string().unwrap(),
                }
            })
            .await
            .unwrap()
        }

        async fn get(&self, path: &str) -> Answer {
            self.call("GET", path, None).await
        }

        async fn post(&self, path: &str, body: Value) -> Answer {
            self.call("POST", path, Some(body)).await
        }

        async fn delete(&self, path: &str) -> Answer {
            self.call("DELETE", path, None).await
        }
    }

    #[tokio::test]
    async fn health_and_site() {
        let api = api().await;
        let health = api.get("/health").await;
        assert_eq!(health.status, 200);
        assert_eq!(health.json(), json!({"status": "ok"}));
        let site: SiteView = serde_json::from_str(&api.get("/v1/site").await.text).unwrap();
        assert_eq!(site.site, "paris");
        assert_eq!(site.version, env!("CARGO_PKG_VERSION"));
    }

    #[tokio::test]
    async fn volume_lifecycle() {
        let api = api().await;
        assert_eq!(api.get("/v1/volumes").await.json(), json!([]));

        let created = api
            .post("/v1/volumes", json!({"name": "vm1", "size": 10u64 << 20}))
            .await;
        assert_eq!(created.status, 201, "{}", created.text);
        let v: VolumeView = serde_json::from_str(&created.text).unwrap();
        assert_eq!((v.name.as_str(), v.size, v.snapshots), ("vm1", 10 << 20, 0));
        api.post("/v1/volumes", json!({"name": "a0", "size": 1u64 << 20}))
            .await;

        let listed: Vec<VolumeView> =
            serde_json::from_str(&api.get("/v1/volumes").await.text).unwrap();
        let names: Vec<_> = listed.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["a0", "vm1"]);

        let shown = api.get("/v1/volumes/vm1").await;
        assert_eq!(shown.status, 200);
        assert_eq!(serde_json::from_str::<VolumeView>(&shown.text).unwrap(), v);

        let dup = api
            .post("/v1/volumes", json!({"name": "vm1", "size": 1u64 << 20}))
            .await;
        assert_eq!(dup.status, 409);
        assert!(dup.error().contains("vm1"), "{}", dup.error());

        let grown = api
            .post("/v1/volumes/vm1/resize", json!({"size": 20u64 << 20}))
            .await;
        assert_eq!(grown.status, 200, "{}", grown.text);
        assert_eq!(grown.json()["size"], json!(20u64 << 20));

        let refused = api
            .post("/v1/volumes/vm1/resize", json!({"size": 1u64 << 20}))
            .await;
        assert_eq!(refused.status, 400);
        assert!(refused.error().contains("shrink"), "{}", refused.error());
        assert_eq!(
            api.get("/v1/volumes/vm1").await.json()["size"],
            json!(20u64 << 20)
        );

        let shrunk = api
            .post(
                "/v1/volumes/vm1/resize",
                json!({"size": 1u64 << 20, "shrink": true}),
            )
            .await;
        assert_eq!(shrunk.status, 200, "{}", shrunk.text);
        assert_eq!(shrunk.json()["size"], json!(1u64 << 20));

        let deleted = api.delete("/v1/volumes/vm1").await;
        assert_eq!(deleted.status, 204, "{}", deleted.text);
        assert_eq!(api.get("/v1/volumes/vm1").await.status, 404);
        let again = api.delete("/v1/volumes/vm1").await;
        assert_eq!(again.status, 404);
        assert!(again.error().contains("vm1"), "{}", again.error());
    }

    #[tokio::test]
    async fn snapshot_lifecycle() {
        let api = api().await;
        api.post("/v1/volumes", json!({"name": "vm1", "size": 1u64 << 20}))
            .await;

        let made = api
            .post("/v1/volumes/vm1/snapshots", json!({"name": "s1"}))
            .await;
        assert_eq!(made.status, 201, "{}", made.text);
        let s: SnapshotView = serde_json::from_str(&made.text).unwrap();
        assert_eq!(
            (s.name.as_str(), s.volume.as_str(), s.export.as_str()),
            ("s1", "vm1", "vm1@s1")
        );
        assert_eq!(s.size, 1 << 20);
        api.post("/v1/volumes/vm1/snapshots", json!({"name": "s2"}))
            .await;

        let dup = api
            .post("/v1/volumes/vm1/snapshots", json!({"name": "s1"}))
            .await;
        assert_eq!(dup.status, 409);

        let listed: Vec<SnapshotView> =
            serde_json::from_str(&api.get("/v1/volumes/vm1/snapshots").await.text).unwrap();
        let mut names: Vec<_> = listed.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        assert_eq!(names, ["s1", "s2"]);
        assert_eq!(
            api.get("/v1/volumes/vm1").await.json()["snapshots"],
            json!(2)
        );

        assert_eq!(api.delete("/v1/volumes/vm1/snapshots/s1").await.status, 204);
        assert_eq!(api.delete("/v1/volumes/vm1/snapshots/s1").await.status, 404);
        assert_eq!(api.get("/v1/volumes/nope/snapshots").await.status, 404);
        let on_missing = api
            .post("/v1/volumes/nope/snapshots", json!({"name": "s1"}))
            .await;
        assert_eq!(on_missing.status, 404);
    }

    #[tokio::test]
    async fn bad_requests_get_json_errors() {
        let api = api().await;
        for (path, body) in [
            ("/v1/volumes", json!({"name": "vm1"})),
            ("/v1/volumes", json!({"name": "vm1", "size": -1})),
            ("/v1/volumes", json!({"name": "vm1", "size": "10G"})),
            ("/v1/volumes", json!({"name": "vm1", "size": 0})),
            ("/v1/volumes/vm1/snapshots", json!({})),
        ] {
            let answer = api.post(path, body.clone()).await;
            assert_eq!(answer.status, 400, "{path} {body}: {}", answer.text);
            assert!(!answer.error().is_empty());
        }
        let not_json = tokio::task::spawn_blocking({
            let url = format!("http://{}/v1/volumes", api.addr);
            move || match ureq::post(&url)
                .set("content-type", "application/json")
                .send_string("{nope")
            {
                Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
                other => panic!("{other:?}"),
            }
        })
        .await
        .unwrap();
        assert_eq!(not_json.0, 400);
        assert!(not_json.1.contains("\"error\""), "{}", not_json.1);

        let bad_name = api
            .post("/v1/volumes", json!({"name": "a@b", "size": 4096}))
            .await;
        assert_eq!(bad_name.status, 400, "{}", bad_name.text);

        // A misspelt field is refused, not ignored.
        let typo = api
            .post(
                "/v1/volumes",
                json!({"name": "t", "size": 4096, "cbt_granulariy": 0}),
            )
            .await;
        assert_eq!(typo.status, 400, "{}", typo.text);
        assert!(typo.error().contains("cbt_granulariy"), "{}", typo.text);
        // The rejections of the path and query extractors are JSON too.
        for (method, path) in [
            ("GET", "/v1/volumes/t/diff"),
            ("GET", "/v1/volumes/t/diff?from=a&from=b"),
            ("GET", "/v1/volumes/%FF"),
            ("DELETE", "/v1/volumes/%FF/snapshots/s"),
            ("DELETE", "/v1/mounts"),
        ] {
            let answer = api.call(method, path, None).await;
            assert_eq!(answer.status, 400, "{method} {path}: {}", answer.text);
            assert_eq!(answer.content_type, "application/json", "{method} {path}");
            assert!(!answer.error().is_empty(), "{method} {path}");
        }
        // A body that is not declared JSON: 415.
        let wrong_type = tokio::task::spawn_blocking({
            let url = format!("http://{}/v1/volumes", api.addr);
            move || match ureq::post(&url)
                .set("content-type", "text/plain")
                .send_string(r#"{"name":"t","size":4096}"#)
            {
                Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap()),
                other => panic!("{other:?}"),
            }
        })
        .await
        .unwrap();
        assert_eq!(wrong_type.0, 415, "{}", wrong_type.1);
        assert!(wrong_type.1.contains("\"error\""), "{}", wrong_type.1);

        // A mount's holder must be a running process (checked before the
        // directory is touched).
        let dir = api._dir.path().display().to_string();
        for holder in [json!(0), json!(i32::MAX), json!(u32::MAX), json!("me")] {
            let answer = api
                .post("/v1/mounts", json!({"dir": dir, "holder": holder}))
                .await;
            assert_eq!(answer.status, 400, "holder {holder}: {}", answer.text);
            assert!(!answer.error().is_empty());
        }
        // A holder that has ended (a zombie: pidfd_open still finds it).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let stat = format!("/proc/{}/stat", child.id());
        for _ in 0..500 {
            let s = std::fs::read_to_string(&stat).unwrap_or_default();
            if s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let answer = api
            .post("/v1/mounts", json!({"dir": dir, "holder": child.id()}))
            .await;
        child.wait().unwrap();
        assert_eq!(answer.status, 400, "{}", answer.text);
        assert!(
            answer.error().contains("has already ended"),
            "{}",
            answer.text
        );

        let nowhere = api.get("/v2/nothing").await;
        assert_eq!(nowhere.status, 404);
        assert!(nowhere.error().contains("/v2/nothing"));
        let wrong = api.call("PUT", "/v1/volumes", None).await;
        assert_eq!(wrong.status, 405);
        assert!(wrong.error().contains("PUT"));

        // Percent-encoded names reach the store decoded.
        let encoded = api.get("/v1/volumes/paris%2Fvm1").await;
        assert!(
            encoded.status == 404 || encoded.status == 400,
            "{}",
            encoded.text
        );
        assert!(encoded.error().contains("paris/vm1"), "{}", encoded.error());
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text() {
        let api = api().await;
        api.post("/v1/volumes", json!({"name": "vm1", "size": 1u64 << 20}))
            .await;
        api.metrics
            .record("vm1", Op::Write, 4096, Duration::from_micros(300));
        let answer = api.get("/metrics").await;
        assert_eq!(answer.status, 200);
        assert_eq!(answer.content_type, "text/plain");
        let text = answer.text;
        for line in [
            "snapgate_nbd_requests_total{volume=\"vm1\",op=\"write\"} 1",
            "snapgate_nbd_bytes_total{volume=\"vm1\",op=\"write\"} 4096",
            "snapgate_volumes 1",
            "snapgate_volume_size_bytes{volume=\"vm1\"} 1048576",
            "snapgate_volume_snapshots{volume=\"vm1\"} 0",
            "snapgate_build_info{version=\"",
            "# TYPE snapgate_volume_allocated_bytes gauge",
            "# TYPE snapgate_map_page_reads_total counter",
            "snapgate_map_dirty_pages ",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    #[test]
    fn statuses_come_from_one_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let _held = Pool::open(dir.path(), store::PoolOptions::default()).unwrap();
        let locked = Pool::open(dir.path(), store::PoolOptions::default())
            .err()
            .unwrap();
        assert_eq!(locked.kind(), store::ErrorKind::Locked);
        assert_eq!(http_status(&Error::Store(locked)), StatusCode::LOCKED);
        assert_eq!(
            http_status(&Error::Invalid("x".into())),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            http_status(&Error::Unavailable("replication")),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(
            http_status(&Error::Internal("x".into())),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn deleting_leaves_the_pool_consistent() {
        // The handlers hold no state of their own: what the API did is what
        // the pool shows.
        let rt = tokio::runtime::Runtime::new().unwrap();
        let api = rt.block_on(api());
        rt.block_on(api.post("/v1/volumes", json!({"name": "v", "size": 4096})));
        assert_eq!(api.pool.volumes().len(), 1);
        rt.block_on(api.delete("/v1/volumes/v"));
        assert!(api.pool.volumes().is_empty());
    }
}
