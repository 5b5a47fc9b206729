//! Changed-block tracking over NBD (M8, SPEC "CBT over NBD"): on export
//! `VOL` or `VOL@B`, the meta context `qemu:dirty-bitmap:A` (A an older point
//! of that volume) reports as dirty every block written after A (up to now,
//! or up to B). False positives are allowed (64 KiB tracking blocks), false
//! negatives never.

use snapgate_e2e::*;
use std::process::Command;

/// `nbdinfo --map=CONTEXT` as (offset, length, type) triples.
fn map(gw: &Gateway, export: &str, ctx: &str) -> Vec<(u64, u64, u32)> {
    let out = run(Command::new("nbdinfo")
        .arg(format!("--map={ctx}"))
        .arg(gw.nbd_uri(export)));
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[2].parse().expect("type"),
            )
        })
        .collect()
}

fn dirty_at(m: &[(u64, u64, u32)], off: u64) -> bool {
    m.iter()
        .find(|(o, l, _)| *o <= off && off < o + l)
        .unwrap_or_else(|| panic!("{off} not covered: {m:?}"))
        .2
        & 1
        == 1
}

#[test]
fn dirty_bitmap_reports_writes_after_a_point() {
    if !require_tools(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("v", "16M");
    gw.qemu_io_ok("v", &["write -P 0x1 0 1M"]);
    gw.snapshot("v", "a");
    gw.qemu_io_ok("v", &["write -P 0x2 4M 1M", "write -P 0x2 6M 4k"]);
    gw.snapshot("v", "b");
    // Trim data that existed before a: a change too.
    gw.qemu_io_ok("v", &["write -P 0x3 8M 1M", "discard 512k 64k"]);

    let mut ctxs = Vec::new();
    let out = run(Command::new("nbdinfo").arg("--json").arg(gw.nbd_uri("v")));
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    if let Some(a) = j["exports"][0]["contexts"].as_array() {
        ctxs.extend(a.iter().filter_map(|c| c.as_str().map(str::to_owned)));
    }
    for want in ["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"] {
        assert!(
            ctxs.iter().any(|c| c == want),
            "{want} not offered: {ctxs:?}"
        );
    }

    // Head against a: everything written after a.
    let m = map(&gw, "v", "qemu:dirty-bitmap:a");
    for off in [
        4 << 20,
        (5 << 20) - 1,
        6 << 20,
        8 << 20,
        (9 << 20) - 1,
        512 << 10,
    ] {
        assert!(
            dirty_at(&m, off),
            "head vs a: {off} written after a but clean: {m:?}"
        );
    }
    for off in [0, 2 << 20, 10 << 20, 12 << 20, (16 << 20) - 1] {
        assert!(
            !dirty_at(&m, off),
            "head vs a: {off} untouched but dirty: {m:?}"
        );
    }
    // Head against b: only what came after b.
    let m = map(&gw, "v", "qemu:dirty-bitmap:b");
    assert!(
        dirty_at(&m, 8 << 20) && dirty_at(&m, 512 << 10),
        "head vs b: {m:?}"
    );
    assert!(
        !dirty_at(&m, 4 << 20) && !dirty_at(&m, 0),
        "head vs b: {m:?}"
    );
    // b against a: between the two points.
    let m = map(&gw, "v@b", "qemu:dirty-bitmap:a");
    assert!(
        dirty_at(&m, 4 << 20) && dirty_at(&m, 6 << 20),
        "b vs a: {m:?}"
    );
    assert!(
        !dirty_at(&m, 8 << 20) && !dirty_at(&m, 0) && !dirty_at(&m, 512 << 10),
        "b vs a: {m:?}"
    );
}

#[test]
fn dirty_bitmap_survives_kill9() {
    if !require_tools(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let mut gw = Gateway::start();
    gw.create_volume("v", "16M");
    gw.snapshot("v", "a");
    gw.qemu_io_ok("v", &["write -P 0x5 4M 1M", "flush"]);
    gw.kill9();
    gw.restart();
    let m = map(&gw, "v", "qemu:dirty-bitmap:a");
    assert!(
        dirty_at(&m, 4 << 20),
        "write since a lost from CBT after a crash: {m:?}"
    );
}

/// The contexts as libnbd negotiates them: listed per export (only older
/// points), and answered together with base:allocation in one BLOCK_STATUS.
#[test]
fn dirty_bitmap_contexts_through_libnbd() {
    if !require_python_nbd() || !require_tool("qemu-io") {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("v", "8M");
    gw.snapshot("v", "a");
    gw.qemu_io_ok("v", &["write -P 0x9 1M 64k"]);
    gw.snapshot("v", "b");
    let script = format!(
        r#"
import nbd

def listed(export):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri("{base}" + export)
    h.add_meta_context("qemu:dirty-bitmap:")
    got = []
    h.opt_list_meta_context(lambda name: got.append(name) or 0)
    h.opt_abort()
    return sorted(got)

head = listed("v")
assert head == ["qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"], head
at_b = listed("v@b")
assert at_b == ["qemu:dirty-bitmap:a"], at_b
at_a = listed("v@a")
assert at_a == [], at_a

h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:a")
h.connect_uri("{base}v@b")
seen = {{}}
def cb(meta, off, entries, err):
    seen.setdefault(meta, []).append(list(entries))
    return 0
h.block_status(2 << 20, 0, cb)
assert sorted(seen) == ["base:allocation", "qemu:dirty-bitmap:a"], seen
assert all(len(v) == 1 for v in seen.values()), "more than one chunk per context: %r" % seen
dirty = seen["qemu:dirty-bitmap:a"][0]
# entries are (length, flags) pairs from offset 0: 0..1M clean, 1M.. dirty.
assert dirty[0] == 1 << 20 and dirty[1] == 0 and dirty[3] & 1 == 1, dirty
print("ALL OK")
"#,
        base = format!("nbd://127.0.0.1:{}/", gw.nbd_port)
    );
    let out = run(Command::new(SYS_PYTHON).args(["-c", &script]));
    assert!(out.contains("ALL OK"), "{out}");
}

/// A connection's `qemu:dirty-bitmap:a` stands for the snapshot `a` it
/// started with: once that is deleted and another taken under the name,
/// the context fails on that connection rather than quietly comparing with
/// the new one (which would report the older changes clean); a new
/// connection compares with the new `a`.
#[test]
fn a_dirty_bitmap_context_keeps_its_snapshot() {
    if !require_python_nbd() {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("v", "1M");
    gw.snapshot("v", "a");
    let script = format!(
        r#"
import nbd, subprocess, sys

def connect():
    h = nbd.NBD()
    h.add_meta_context("qemu:dirty-bitmap:a")
    h.connect_uri("{uri}")
    return h

def dirty(h):
    seen = []
    h.block_status(1 << 20, 0, lambda meta, off, entries, err: seen.extend(entries) or 0)
    runs, pos = [], 0
    for i in range(0, len(seen), 2):
        if seen[i + 1] & 1:
            runs.append((pos, seen[i]))
        pos += seen[i]
    return runs

def cli(*args):
    subprocess.run(["{bin}", "--admin", "{admin}", *args], check=True, stdout=subprocess.DEVNULL)

h = connect()
h.pwrite(b"x" * 65536, 0)
h.flush()
assert dirty(h) == [(0, 65536)], dirty(h)
cli("snapshot", "delete", "v", "a")
cli("snapshot", "create", "v", "a")
h.pwrite(b"y" * 65536, 65536)
try:
    got = dirty(h)
    sys.exit("the old connection's context now compares with the new snapshot: %r" % got)
except nbd.Error:
    pass
fresh = connect()
assert dirty(fresh) == [(65536, 65536)], dirty(fresh)
print("ALL OK")
"#,
        uri = gw.nbd_uri("v"),
        bin = snapgate_bin().display(),
        admin = gw.admin(),
    );
    let out = run(Command::new(SYS_PYTHON).args(["-c", &script]));
    assert!(out.contains("ALL OK"), "{out}");
    assert!(
        gw.log()
            .contains("a snapshot taken under that name since is another one"),
        "the gateway did not say why the context failed"
    );
}

/// `qemu-img map` through QEMU's `x-dirty-bitmap` hack reads the same
/// bitmap: QEMU reports dirty blocks as "data": false (absent), clean ones as
/// data. Exactly the 64 KiB blocks written after the point are absent.
#[test]
fn qemu_img_map_reads_the_dirty_bitmap() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("v", "8M");
    gw.qemu_io_ok("v", &["write -P 0x1 0 2M"]);
    gw.snapshot("v", "a");
    gw.qemu_io_ok("v", &["write -P 0x2 1M 4k", "write -P 0x3 5M 128k"]);
    gw.snapshot("v", "b");
    gw.qemu_io_ok("v", &["write -P 0x4 7M 4k"]);
    let port = gw.nbd_addr().port();
    let dirty = |export: &str, point: &str| -> Vec<(u64, u64)> {
        let out = run(Command::new("qemu-img").args([
            "map",
            "--output=json",
            "--image-opts",
            &format!(
                "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export},x-dirty-bitmap=qemu:dirty-bitmap:{point}"
            ),
        ]));
        let j: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map json");
        j.as_array()
            .expect("array")
            .iter()
            .filter(|e| !e["data"].as_bool().unwrap_or(true))
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect()
    };
    assert_eq!(
        dirty("v", "a"),
        vec![
            (1 << 20, 64 << 10),
            (5 << 20, 128 << 10),
            (7 << 20, 64 << 10)
        ],
        "head since a"
    );
    assert_eq!(dirty("v", "b"), vec![(7 << 20, 64 << 10)], "head since b");
    assert_eq!(
        dirty("v@b", "a"),
        vec![(1 << 20, 64 << 10), (5 << 20, 128 << 10)],
        "b since a"
    );
}

/// `snapgate snapshot diff` prints the same extents, and its JSON adds up.
#[test]
fn snapshot_diff_cli() {
    if !require_tools(&["qemu-io"]) {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("v", "8M");
    gw.snapshot("v", "a");
    gw.qemu_io_ok("v", &["write -P 0x2 1M 4k", "write -P 0x3 5M 128k"]);
    gw.snapshot("v", "b");
    gw.qemu_io_ok("v", &["write -P 0x4 7M 4k"]);
    let j = gw.cli_json(&["snapshot", "diff", "v", "a", "b"]);
    let ext: Vec<(u64, u64)> = j["extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(ext, vec![(1 << 20, 64 << 10), (5 << 20, 128 << 10)]);
    assert_eq!(j["bytes"].as_u64(), Some(192 << 10));
    assert_eq!(j["granularity"].as_u64(), Some(64 << 10));
    let j = gw.cli_json(&["snapshot", "diff", "v", "b"]);
    assert_eq!(j["bytes"].as_u64(), Some(64 << 10));
    assert!(j["to"].is_null());
    let human = gw.cli_ok(&["snapshot", "diff", "v", "a"]);
    assert!(human.contains("256 KiB changed in 3 extents"), "{human}");
    // Asking backwards or for an unknown point is a clear error.
    let out = gw.cli(&["snapshot", "diff", "v", "b", "a"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("not older"), "{err}");
    let out = gw.cli(&["snapshot", "diff", "v", "nope"]);
    assert!(!out.status.success());
}
