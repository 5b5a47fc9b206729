//! `snapgate serve`: opens the pool and runs the NBD server (TCP, optionally
//! a Unix socket) and the admin endpoint on one tokio runtime.
//!
//! Lifecycle: [`Gateway::start`] does everything that can fail on a bad
//! configuration (opening the pool, binding every socket) before any server
//! runs, so a mistake is one error and nothing half-started. Once it returns
//! the gateway is serving. [`Gateway::shutdown`] then stops it in the order
//! that keeps acknowledged writes safe:
//!
//! 1. the shutdown watch flips: the servers stop accepting; the NBD server
//!    finishes the requests already in flight and closes its connections;
//! 2. we wait for them, at most `drain` long (a client that never lets go
//!    must not keep the gateway from stopping);
//! 3. the pool is flushed, so even writes acknowledged without FUA are on
//!    stable storage, and the last handle on it is dropped (its lock goes).

use crate::admin::{self, AdminState};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::nbd::{ExportProvider, Server};
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use store::{Pool, PoolOptions};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What `snapgate serve` was asked to do.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The pool's directory; created if missing.
    pub data: PathBuf,
    /// This gateway's site name (peers and mirror volumes refer to it).
    pub site: String,
    /// NBD over TCP, `HOST:PORT` (port 0 picks a free one).
    pub listen: String,
    /// NBD over a Unix socket as well, if set.
    pub socket: Option<PathBuf>,
    /// The admin endpoint, `HOST:PORT`.
    pub admin: String,
    /// Where peers would connect for replication (not built yet).
    pub peer_listen: Option<String>,
    /// Memory for the store's map pages (see `store::PoolOptions`).
    pub map_cache: u64,
    /// Disk space held for a restart on a full disk (see `store::PoolOptions`).
    pub space_reserve: u64,
}

/// The NBD exports of a pool: every volume's head `vol` (read-write) and
/// each of its snapshots `vol@snap` (read-only).
pub struct PoolExports {
    pool: Arc<Pool>,
}

impl PoolExports {
    pub fn new(pool: Arc<Pool>) -> Self {
        PoolExports { pool }
    }
}

impl ExportProvider for PoolExports {
    fn list(&self) -> Vec<String> {
        let mut volumes = self.pool.volumes();
        volumes.sort_by(|a, b| a.name.cmp(&b.name));
        let mut exports = Vec::new();
        for v in volumes {
            // A volume deleted since `volumes()` simply has no points to list.
            let snaps = self.pool.snapshots(&v.name).unwrap_or_default();
            exports.extend(snaps.into_iter().map(|s| format!("{}@{}", v.name, s.name)));
            exports.push(v.name);
        }
        exports.sort();
        exports
    }

    fn open(&self, name: &str) -> Result<store::Volume, store::Error> {
        // Volume names never contain '@', so the first one separates the point.
        match name.split_once('@') {
            Some((volume, snapshot)) => self.pool.open_snapshot(volume, snapshot),
            None => self.pool.open_head(name),
        }
    }
}

/// A running gateway.
pub struct Gateway {
    pool: Arc<Pool>,
    site: String,
    data: PathBuf,
    nbd_addr: SocketAddr,
    admin_addr: SocketAddr,
    socket: Option<PathBuf>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<(&'static str, io::Result<()>)>,
    /// FUSE views served for `snapgate mount`; unmounted at shutdown.
    mounts: admin::Mounts,
}

impl Gateway {
    /// Opens the pool, binds every listener and starts serving.
    pub async fn start(cfg: ServeConfig) -> Result<Gateway> {
        if cfg.peer_listen.is_some() {
            return Err(Error::Unavailable("replication"));
        }
        check_site_name(&cfg.site)?;

        // Sockets first: a start that fails on a busy port leaves no data
        // directory behind.
        let nbd_listener = bind_tcp("NBD", &cfg.listen).await?;
        let admin_listener = bind_tcp("the admin endpoint", &cfg.admin).await?;
        let nbd_addr = local_addr(&nbd_listener, &cfg.listen)?;
        let admin_addr = local_addr(&admin_listener, &cfg.admin)?;
        let unix_listener = match &cfg.socket {
            Some(path) => Some(bind_unix(path)?),
            None => None,
        };

        let dir = cfg.data.clone();
        let opts = PoolOptions {
            map_cache_bytes: cfg.map_cache,
            space_reserve_bytes: cfg.space_reserve,
            ..PoolOptions::default()
        };
        let opened = tokio::task::spawn_blocking(move || Pool::open(&dir, opts))
            .await
            .map_err(Error::from)
            .and_then(|opened| {
                opened.map_err(|source| Error::OpenPool {
                    dir: cfg.data.clone(),
                    source,
                })
            });
        let pool = match opened {
            Ok(pool) => pool,
            Err(e) => {
                if let Some(path) = &cfg.socket {
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
        };

        let metrics = Arc::new(Metrics::new());
        let provider: Arc<dyn ExportProvider> = Arc::new(PoolExports::new(Arc::clone(&pool)));
        let server = Arc::new(Server::new(provider, Arc::clone(&metrics)));
        let (shutdown, stop) = watch::channel(false);
        let mut tasks = JoinSet::new();

        tasks.spawn({
            let server = Arc::clone(&server);
            let stop = stop.clone();
            async move { ("NBD (TCP)", server.serve_tcp(nbd_listener, stop).await) }
        });
        if let Some(listener) = unix_listener {
            let server = Arc::clone(&server);
            let stop = stop.clone();
            tasks.spawn(
                async move { ("NBD (Unix socket)", server.serve_unix(listener, stop).await) },
            );
        }
        let mounts = admin::Mounts::default();
        let router = admin::router(AdminState {
            pool: Arc::clone(&pool),
            metrics,
            site: cfg.site.clone(),
            mounts: Arc::clone(&mounts),
        });
        tasks.spawn(async move {
            let mut stop = stop;
            let served = axum::serve(admin_listener, router)
                .with_graceful_shutdown(async move {
                    // An error means the sender is gone: stop as well.
                    let _ = stop.wait_for(|stopping| *stopping).await;
                })
                .await;
            ("the admin endpoint", served)
        });

        tracing::info!(
            site = %cfg.site,
            data = %cfg.data.display(),
            nbd = %nbd_addr,
            socket = ?cfg.socket,
            admin = %admin_addr,
            "gateway started"
        );
        Ok(Gateway {
            pool,
            site: cfg.site,
            data: cfg.data,
            nbd_addr,
            admin_addr,
            socket: cfg.socket,
            shutdown,
            tasks,
            mounts,
        })
    }

    /// The NBD TCP address actually bound (useful with port 0).
    pub fn nbd_addr(&self) -> SocketAddr {
        self.nbd_addr
    }

    /// The admin endpoint's address actually bound.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    pub fn socket(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    pub fn site(&self) -> &str {
        &self.site
    }

    pub fn data(&self) -> &Path {
        &self.data
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Resolves only if a server stops by itself before shutdown was asked
    /// for, which means the gateway can no longer do its job. Cancel-safe,
    /// so it can sit in a `select!` next to the signal handlers.
    pub async fn failed(&mut self) -> Error {
        match self.tasks.join_next().await {
            Some(Ok((what, Err(e)))) => Error::io(format!("{what} stopped"), e),
            Some(Ok((what, Ok(())))) => Error::Internal(format!("{what} stopped on its own")),
            Some(Err(e)) => Error::Internal(format!("a server task died: {e}")),
            None => std::future::pending().await,
        }
    }

    /// Stops serving, lets in-flight NBD requests finish (for at most
    /// `drain`), then flushes the pool. Errors of the servers on the way
    /// down are logged; the flush's error is returned, since it is the one
    /// that means data may not be durable.
    pub async fn shutdown(mut self, drain: Duration) -> Result<()> {
        tracing::info!("shutting down: no new connections, finishing requests in flight");
        let _ = self.shutdown.send(true);
        let drained = tokio::time::timeout(drain, async {
            while let Some(joined) = self.tasks.join_next().await {
                match joined {
                    Ok((_, Ok(()))) => {}
                    Ok((what, Err(e))) => tracing::warn!(error = %e, "{what} ended with an error"),
                    Err(e) => tracing::warn!(error = %e, "a server task died"),
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                "clients still connected after {drain:?}; closing them (their unacknowledged requests are dropped)"
            );
            self.tasks.shutdown().await;
        }
        if let Some(path) = &self.socket {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(error = %e, path = %path.display(), "cannot remove the NBD socket");
            }
        }
        // Unmount the FUSE views before the pool goes.
        let views = std::mem::take(&mut *self.mounts.lock());
        for (dir, view) in views {
            let unmounted = tokio::task::spawn_blocking(move || view.unmount()).await?;
            if let Err(e) = unmounted {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot unmount a FUSE view");
            }
        }
        let pool = self.pool;
        tokio::task::spawn_blocking(move || pool.flush()).await??;
        tracing::info!("pool flushed; stopped");
        Ok(())
    }
}

/// Site names appear in mirror volume names (`SITE/VOLUME`) and in paths of
/// the FUSE view, so they must fit in one path segment and one export name.
fn check_site_name(site: &str) -> Result<()> {
    let bad = site.is_empty()
        || site.len() > 64
        || site == "."
        || site == ".."
        || !site
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if bad {
        return Err(Error::Invalid(format!(
            "invalid site name {site:?}: use 1 to 64 letters, digits, '-', '_' or '.' (e.g. --site paris-1)"
        )));
    }
    Ok(())
}

async fn bind_tcp(what: &'static str, addr: &str) -> Result<TcpListener> {
    // Accept the admin address the way the CLI does, with or without scheme.
    let host_port = addr.strip_prefix("http://").unwrap_or(addr);
    let host_port = host_port.strip_suffix('/').unwrap_or(host_port);
    TcpListener::bind(host_port)
        .await
        .map_err(|source| Error::Bind {
            what,
            addr: addr.to_owned(),
            source,
        })
}

fn local_addr(listener: &TcpListener, addr: &str) -> Result<SocketAddr> {
    listener
        .local_addr()
        .map_err(|e| Error::io(format!("cannot read the bound address of {addr}"), e))
}

/// Binds the NBD Unix socket. A socket file left by a gateway that died is
/// replaced; one that a live server still answers on is not.
fn bind_unix(path: &Path) -> Result<UnixListener> {
    let bind_err = |source| Error::Bind {
        what: "NBD",
        addr: format!("unix:{}", path.display()),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(bind_err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another server is listening on this socket",
                )));
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        Ok(_) => {
            return Err(bind_err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(bind_err(e)),
    }
    UnixListener::bind(path).map_err(bind_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn site_names() {
        for ok in ["paris-1", "a", "site.example", "X_2"] {
            check_site_name(ok).unwrap();
        }
        for bad in ["", "a/b", "a@b", "with space", "..", &"x".repeat(65)] {
            assert!(check_site_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn exports_are_heads_and_points() {
        let dir = tempfile::tempdir().unwrap();
        let pool = Pool::open(dir.path().join("pool"), PoolOptions::default()).unwrap();
        pool.create_volume("vm1", 1 << 20).unwrap();
        pool.create_volume("vm0", 1 << 20).unwrap();
        pool.create_snapshot("vm1", "s1").unwrap();
        let exports = PoolExports::new(Arc::clone(&pool));
        assert_eq!(exports.list(), ["vm0", "vm1", "vm1@s1"]);
        let head = exports.open("vm1").unwrap();
        assert_eq!(head.name(), "vm1");
        assert!(!head.read_only());
        let point = exports.open("vm1@s1").unwrap();
        assert_eq!(point.snapshot(), Some("s1"));
        assert!(point.read_only());
        assert_eq!(
            exports.open("nope").err().map(|e| e.kind()),
            Some(store::ErrorKind::NotFound)
        );
        assert_eq!(
            exports.open("vm1@nope").err().map(|e| e.kind()),
            Some(store::ErrorKind::NotFound)
        );
    }

    #[tokio::test]
    async fn stale_unix_socket_is_replaced_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let live = bind_unix(&path).unwrap();
        let err = bind_unix(&path).err().unwrap();
        assert!(err.to_string().contains("another server"), "{err}");
        drop(live);
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(bind_unix(&dir.path().join("file")).is_err());
    }

    #[tokio::test]
    async fn peer_listen_is_refused_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let err = Gateway::start(ServeConfig {
            data: dir.path().join("data"),
            site: "s".into(),
            listen: "127.0.0.1:0".into(),
            socket: None,
            admin: "127.0.0.1:0".into(),
            peer_listen: Some("127.0.0.1:0".into()),
            map_cache: 64 << 20,
            space_reserve: 16 << 20,
        })
        .await
        .err()
        .unwrap();
        assert_eq!(err.to_string(), "replication is not available yet");
        assert!(!dir.path().join("data").exists());
    }

    #[tokio::test]
    async fn start_serve_and_shut_down() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let cfg = ServeConfig {
            data: data.clone(),
            site: "test".into(),
            listen: "127.0.0.1:0".into(),
            socket: Some(dir.path().join("nbd.sock")),
            admin: "127.0.0.1:0".into(),
            peer_listen: None,
            map_cache: 64 << 20,
            space_reserve: 16 << 20,
        };
        let gw = Gateway::start(cfg.clone()).await.unwrap();

        // A second gateway on the same socket, or on the same data, fails
        // with a clear error and leaves the first one's socket alone.
        let second = Gateway::start(cfg.clone()).await.err().unwrap();
        assert!(second.to_string().contains("another server"), "{second}");
        let other_socket = ServeConfig {
            socket: Some(dir.path().join("other.sock")),
            ..cfg.clone()
        };
        let second = Gateway::start(other_socket).await.err().unwrap();
        assert!(!dir.path().join("other.sock").exists());
        assert!(second
            .to_string()
            .contains("cannot open the data directory"));
        assert_eq!(second.store_kind(), Some(store::ErrorKind::Locked));

        // The NBD server greets with its magic on TCP and on the socket.
        use tokio::io::AsyncReadExt;
        let mut magic = [0u8; 8];
        let mut tcp = tokio::net::TcpStream::connect(gw.nbd_addr()).await.unwrap();
        tcp.read_exact(&mut magic).await.unwrap();
        assert_eq!(&magic, b"NBDMAGIC");
        let mut unix = tokio::net::UnixStream::connect(gw.socket().unwrap())
            .await
            .unwrap();
        unix.read_exact(&mut magic).await.unwrap();
        assert_eq!(&magic, b"NBDMAGIC");
        drop((tcp, unix));

        let admin = gw.admin_addr();
        let health = tokio::task::spawn_blocking(move || {
            ureq::get(&format!("http://{admin}/health"))
                .call()
                .map(|r| r.status())
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(health, 200);

        gw.shutdown(Duration::from_secs(10)).await.unwrap();
        assert!(!dir.path().join("nbd.sock").exists());
        assert!(tokio::net::TcpStream::connect(admin).await.is_err());
        // The pool's lock went with the gateway.
        drop(Pool::open(&data, PoolOptions::default()).unwrap());
    }
}
