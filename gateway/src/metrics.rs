//! Request metrics of the NBD server, rendered in the Prometheus text
//! exposition format (version 0.0.4) by the admin endpoint's `GET /metrics`.
//!
//! Design note: `record` runs once per NBD request, on many connections at
//! once, so it must not serialize them. Each export gets one
//! `VolumeMetrics` made of plain atomics; the map from export name to it sits
//! behind a `RwLock` that is taken for writing only the first time an export
//! is seen. The hot path is therefore one shared read lock plus a handful of
//! relaxed atomic adds. Rendering reads the atomics without stopping writers,
//! so one scrape may see a request counted in one family and not yet in
//! another; every family on its own is monotonic and self-consistent (a
//! histogram's `_count` is computed from its own buckets).

use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The NBD commands that are measured, one series per command and export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    Cache,
    BlockStatus,
}

impl Op {
    /// Every op, in the order they are rendered.
    pub const ALL: [Op; 7] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::WriteZeroes,
        Op::Cache,
        Op::BlockStatus,
    ];

    /// The value of the `op` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Cache => "cache",
            Op::BlockStatus => "block_status",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds of the latency histogram buckets, in microseconds: from a
/// page-cache hit (tens of µs) to a flush stuck behind a slow disk (seconds).
const BUCKETS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 10_000_000,
];

/// Counters of one (export, op) pair.
#[derive(Default)]
struct OpMetrics {
    requests: AtomicU64,
    bytes: AtomicU64,
    /// Non-cumulative: `buckets[i]` counts latencies in
    /// `(BUCKETS_US[i-1], BUCKETS_US[i]]`, the last slot those above every bound.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    latency_sum_ns: AtomicU64,
}

impl OpMetrics {
    fn record(&self, bytes: u64, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let us = latency.as_micros();
        let slot = BUCKETS_US
            .iter()
            .position(|&bound| us <= u128::from(bound))
            .unwrap_or(BUCKETS_US.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

/// All counters of one export (`vol` or `vol@snap`).
#[derive(Default)]
struct VolumeMetrics {
    ops: [OpMetrics; Op::ALL.len()],
    /// Requests answered with an error, by error name (rare: a lock is
    /// cheap enough).
    errors: Mutex<BTreeMap<&'static str, u64>>,
}

/// The gateway's NBD metrics; one instance is shared by the NBD server
/// (which records) and the admin endpoint (which renders).
#[derive(Default)]
pub struct Metrics {
    volumes: RwLock<HashMap<String, Arc<VolumeMetrics>>>,
    connections: AtomicI64,
    connections_total: AtomicU64,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one finished request on export `volume`: `bytes` is the payload
    /// moved (or affected, for TRIM/WRITE_ZEROES/CACHE), `latency` the time
    /// from receiving the request to sending its reply.
    pub fn record(&self, volume: &str, op: Op, bytes: u64, latency: Duration) {
        self.volume(volume).ops[op.index()].record(bytes, latency);
    }

    /// Counts one request on export `volume` answered with error `errno`
    /// (its name: `EINVAL`, `ENOSPC`, ...), refused before the device or
    /// failed by it.
    pub fn record_error(&self, volume: &str, errno: &'static str) {
        *self.volume(volume).errors.lock().entry(errno).or_default() += 1;
    }

    /// Drops the series of export `name` (a deleted snapshot `vol@snap`).
    pub fn forget_export(&self, name: &str) {
        self.volumes.write().remove(name);
    }

    /// Drops the series of volume `name` and of its snapshots' exports.
    pub fn forget_volume(&self, name: &str) {
        let snaps = format!("{name}@");
        self.volumes
            .write()
            .retain(|export, _| export != name && !export.starts_with(&snaps));
    }

    /// A client connected (counts in the gauge and the total).
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
    }

    /// A client connection ended, whatever the reason.
    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }

    /// Connections open right now.
    pub fn open_connections(&self) -> i64 {
        self.connections.load(Ordering::Relaxed)
    }

    fn volume(&self, name: &str) -> Arc<VolumeMetrics> {
        if let Some(v) = self.volumes.read().get(name) {
            return Arc::clone(v);
        }
        // First request on this export: a second thread may have raced us
        // here, `entry` keeps whichever inserted first.
        Arc::clone(self.volumes.write().entry(name.to_owned()).or_default())
    }

    /// Appends every metric family in Prometheus text format to `out`.
    /// Exports are sorted by name so that scrapes diff cleanly.
    pub fn render(&self, out: &mut String) {
        let mut volumes: Vec<(String, Arc<VolumeMetrics>)> = self
            .volumes
            .read()
            .iter()
            .map(|(name, v)| (name.clone(), Arc::clone(v)))
            .collect();
        volumes.sort_by(|a, b| a.0.cmp(&b.0));
        // Only ops that happened at least once get series: seven ops times
        // eighteen buckets per export would otherwise bury the useful ones.
        let series: Vec<(String, Op, &OpMetrics)> = volumes
            .iter()
            .flat_map(|(name, v)| {
                Op::ALL.iter().filter_map(move |&op| {
                    let m = &v.ops[op.index()];
                    (m.requests() > 0).then(|| (escape_label(name), op, m))
                })
            })
            .collect();

        header(
            out,
            "snapgate_nbd_requests_total",
            "counter",
            "NBD requests completed, by export and command.",
        );
        for (vol, op, m) in &series {
            let _ = writeln!(
                out,
                "snapgate_nbd_requests_total{{volume=\"{vol}\",op=\"{}\"}} {}",
                op.as_str(),
                m.requests()
            );
        }

        header(
            out,
            "snapgate_nbd_bytes_total",
            "counter",
            "Bytes read, written, trimmed, zeroed or cached by NBD requests, by export and command.",
        );
        for (vol, op, m) in &series {
            let _ = writeln!(
                out,
                "snapgate_nbd_bytes_total{{volume=\"{vol}\",op=\"{}\"}} {}",
                op.as_str(),
                m.bytes.load(Ordering::Relaxed)
            );
        }

        header(
            out,
            "snapgate_nbd_errors_total",
            "counter",
            "NBD requests answered with an error, by export and error (refused before the store, or failed by it).",
        );
        for (name, v) in &volumes {
            let vol = escape_label(name);
            for (errno, n) in v.errors.lock().iter() {
                let _ = writeln!(
                    out,
                    "snapgate_nbd_errors_total{{volume=\"{vol}\",errno=\"{errno}\"}} {n}"
                );
            }
        }

        header(
            out,
            "snapgate_nbd_request_duration_seconds",
            "histogram",
            "Time from receiving an NBD request to sending its reply.",
        );
        for (vol, op, m) in &series {
            let op = op.as_str();
            let mut cumulative = 0u64;
            for (i, bound) in BUCKETS_US.iter().enumerate() {
                cumulative += m.buckets[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "snapgate_nbd_request_duration_seconds_bucket{{volume=\"{vol}\",op=\"{op}\",le=\"{}\"}} {cumulative}",
                    seconds(*bound)
                );
            }
            cumulative += m.buckets[BUCKETS_US.len()].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "snapgate_nbd_request_duration_seconds_bucket{{volume=\"{vol}\",op=\"{op}\",le=\"+Inf\"}} {cumulative}"
            );
            let sum_ns = m.latency_sum_ns.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "snapgate_nbd_request_duration_seconds_sum{{volume=\"{vol}\",op=\"{op}\"}} {}",
                sum_ns as f64 / 1e9
            );
            let _ = writeln!(
                out,
                "snapgate_nbd_request_duration_seconds_count{{volume=\"{vol}\",op=\"{op}\"}} {cumulative}"
            );
        }

        header(
            out,
            "snapgate_nbd_open_connections",
            "gauge",
            "NBD client connections open now.",
        );
        let _ = writeln!(
            out,
            "snapgate_nbd_open_connections {}",
            self.open_connections()
        );
        header(
            out,
            "snapgate_nbd_connections_total",
            "counter",
            "NBD client connections accepted since the gateway started.",
        );
        let _ = writeln!(
            out,
            "snapgate_nbd_connections_total {}",
            self.connections_total.load(Ordering::Relaxed)
        );
    }
}

/// Writes the `# HELP` and `# TYPE` lines of a metric family.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Escapes a label value as the exposition format requires: backslash,
/// double quote and line feed.
pub fn escape_label(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// A bucket bound in seconds, printed without float noise (`0.00005`, `2.5`).
fn seconds(us: u64) -> String {
    let whole = us / 1_000_000;
    let frac = us % 1_000_000;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(m: &Metrics) -> String {
        let mut out = String::new();
        m.render(&mut out);
        out
    }

    #[test]
    fn deleted_volumes_and_snapshots_lose_their_series() {
        let m = Metrics::new();
        for export in ["v", "v@a", "v@b", "vv", "w@a"] {
            m.record(export, Op::Read, 4096, Duration::from_micros(10));
        }
        m.record_error("v", "EIO");
        m.forget_export("v@a");
        let text = rendered(&m);
        assert!(!text.contains("volume=\"v@a\""), "{text}");
        assert!(text.contains("volume=\"v@b\""), "{text}");
        m.forget_volume("v");
        let text = rendered(&m);
        for gone in ["v", "v@b"] {
            assert!(!text.contains(&format!("volume=\"{gone}\"")), "{text}");
        }
        for kept in ["vv", "w@a"] {
            assert!(text.contains(&format!("volume=\"{kept}\"")), "{text}");
        }
    }

    fn value(text: &str, series: &str) -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"));
        line[series.len() + 1..].parse().unwrap()
    }

    #[test]
    fn bucket_bounds_print_exactly() {
        assert_eq!(seconds(50), "0.00005");
        assert_eq!(seconds(2_500), "0.0025");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(2_500_000), "2.5");
    }

    #[test]
    fn empty_metrics_still_have_every_family() {
        let text = rendered(&Metrics::new());
        for family in [
            "snapgate_nbd_requests_total counter",
            "snapgate_nbd_bytes_total counter",
            "snapgate_nbd_request_duration_seconds histogram",
            "snapgate_nbd_open_connections gauge",
            "snapgate_nbd_connections_total counter",
        ] {
            assert!(text.contains(&format!("# TYPE {family}\n")), "{family}");
        }
        assert_eq!(value(&text, "snapgate_nbd_open_connections"), 0.0);
        assert!(!text.contains("volume="));
    }

    #[test]
    fn counts_bytes_and_latency_per_volume_and_op() {
        let m = Metrics::new();
        m.record("vm1", Op::Read, 4096, Duration::from_micros(40));
        m.record("vm1", Op::Read, 8192, Duration::from_micros(700));
        m.record("vm1", Op::Write, 512, Duration::from_secs(20));
        m.record("vm2@s1", Op::Read, 1, Duration::from_millis(3));
        m.connection_opened();
        m.connection_opened();
        m.connection_closed();
        let text = rendered(&m);

        let read = "{volume=\"vm1\",op=\"read\"}";
        assert_eq!(
            value(&text, &format!("snapgate_nbd_requests_total{read}")),
            2.0
        );
        assert_eq!(
            value(&text, &format!("snapgate_nbd_bytes_total{read}")),
            12288.0
        );
        let bucket = |vol: &str, op: &str, le: &str| {
            value(
                &text,
                &format!(
                    "snapgate_nbd_request_duration_seconds_bucket{{volume=\"{vol}\",op=\"{op}\",le=\"{le}\"}}"
                ),
            )
        };
        assert_eq!(bucket("vm1", "read", "0.00005"), 1.0);
        assert_eq!(bucket("vm1", "read", "0.0005"), 1.0);
        assert_eq!(bucket("vm1", "read", "0.001"), 2.0);
        assert_eq!(bucket("vm1", "read", "+Inf"), 2.0);
        // 20 s is above every bound: only +Inf holds it.
        assert_eq!(bucket("vm1", "write", "10"), 0.0);
        assert_eq!(bucket("vm1", "write", "+Inf"), 1.0);
        assert_eq!(bucket("vm2@s1", "read", "0.0025"), 0.0);
        assert_eq!(bucket("vm2@s1", "read", "0.005"), 1.0);
        let sum = value(
            &text,
            &format!("snapgate_nbd_request_duration_seconds_sum{read}"),
        );
        assert!((sum - 0.00074).abs() < 1e-9, "{sum}");
        assert_eq!(
            value(
                &text,
                &format!("snapgate_nbd_request_duration_seconds_count{read}")
            ),
            2.0
        );
        // Ops never seen get no series.
        assert!(!text.contains("op=\"trim\""));
        assert_eq!(value(&text, "snapgate_nbd_open_connections"), 1.0);
        assert_eq!(value(&text, "snapgate_nbd_connections_total"), 2.0);
    }

    #[test]
    fn output_is_well_formed_exposition_text() {
        let m = Metrics::new();
        for op in Op::ALL {
            m.record("a\"b\\c\nd", op, 1, Duration::from_millis(1));
        }
        let text = rendered(&m);
        assert!(text.contains("volume=\"a\\\"b\\\\c\\nd\""));
        assert!(text.ends_with('\n'));
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(typed.insert(name.to_owned()), "family {name} typed twice");
                continue;
            }
            if line.starts_with("# HELP ") {
                continue;
            }
            // name{labels} value — the value parses as a number and the
            // series belongs to a family declared above it.
            let (series, val) = line.rsplit_once(' ').unwrap();
            val.parse::<f64>().unwrap();
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                .unwrap_or(name);
            assert!(typed.contains(family), "series {name} before its TYPE");
        }
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let m = Arc::new(Metrics::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = Arc::clone(&m);
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        let vol = if i % 2 == 0 { "even" } else { "odd" };
                        m.record(vol, Op::Write, t + 1, Duration::from_micros(i));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = rendered(&m);
        let even = "{volume=\"even\",op=\"write\"}";
        assert_eq!(
            value(&text, &format!("snapgate_nbd_requests_total{even}")),
            2000.0
        );
        assert_eq!(
            value(&text, &format!("snapgate_nbd_bytes_total{even}")),
            5000.0
        );
    }
}
