//! Thin provisioning and space reclaim (M1, M2): never-written, trimmed and
//! all-zero ranges take no space; deleting a snapshot or a volume frees what
//! only it held.
//!
//! The store keeps space freed by overwrites allocated as a warm reuse
//! reserve of 24 MiB plus 4% of the data stored
//! (`PoolOptions::reuse_reserve_bytes` / `reuse_reserve_percent`), so the
//! test writes more than that and allows the reserve as slack when checking
//! that space came back. Once the snapshot is deleted, the whole data
//! directory must hold at most the live data + 10% + 64 MiB (M3).

use snapgate_e2e::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Data written per step: well above the reuse reserve.
const DATA: u64 = 160 * MIB;
/// Freed space the store may keep allocated (reuse reserve, at most two
/// copies of the data stored, + metadata).
const SLACK: u64 = 24 * MIB + 2 * DATA * 4 / 100 + 16 * MIB;

/// Bytes allocated on disk under a directory (st_blocks, so holes are free).
fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let m = match e.metadata() {
                Ok(m) => m,
                Err(_) => continue,
            };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                total += m.blocks() * 512;
            }
        }
    }
    total
}

/// Poll (bounded) until the usage is at most `limit`; returns the last value.
fn wait_usage_at_most(dir: &Path, limit: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let u = disk_usage(dir);
        if u <= limit || Instant::now() >= deadline {
            return u;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn mib(x: u64) -> u64 {
    x / MIB
}

#[test]
fn thin_trim_zero_and_snapshot_reclaim() {
    if !require_tool("qemu-io") {
        return;
    }
    let gw = Gateway::start();
    let dir = gw.data_dir().to_path_buf();
    gw.create_volume("huge", "2T");
    gw.create_volume("v", "512M");
    let base = disk_usage(&dir);
    assert!(base < 80 * MIB, "empty 2T volume uses {} MiB", mib(base));
    let d = format!("{}M", mib(DATA));

    // Data takes about its size.
    gw.qemu_io_ok("v", &[&format!("write -P 0x5c 0 {d}"), "flush"]);
    let full = disk_usage(&dir);
    assert!(
        full >= base + DATA - 8 * MIB,
        "{d} written but usage only grew {} MiB",
        mib(full - base)
    );

    // Trimming it gives the space back (all but the reserve).
    gw.qemu_io_ok("v", &[&format!("discard 0 {d}"), "flush"]);
    let u = wait_usage_at_most(&dir, base + SLACK);
    assert!(
        u <= base + SLACK,
        "after trimming {d} usage is still {} MiB over the base",
        mib(u.saturating_sub(base))
    );
    gw.qemu_io_ok("v", &[&format!("read -P 0 0 {d}")]);

    // All-zero data takes no data space.
    let before = disk_usage(&dir);
    gw.qemu_io_ok(
        "v",
        &[
            &format!("write -P 0 0 {d}"),
            &format!("write -z {d} {d}"),
            "flush",
        ],
    );
    let u = disk_usage(&dir);
    assert!(
        u <= before + 16 * MIB,
        "{d} of zero writes + {d} of write-zeroes grew usage by {} MiB",
        mib(u.saturating_sub(before))
    );
    gw.qemu_io_ok("v", &["read -P 0 0 320M"]);

    // A snapshot holds the old data while the head is overwritten; deleting
    // the snapshot frees it.
    gw.qemu_io_ok("v", &[&format!("write -P 0x31 0 {d}"), "flush"]);
    let one = disk_usage(&dir);
    gw.snapshot("v", "s");
    gw.qemu_io_ok("v", &[&format!("write -P 0x32 0 {d}"), "flush"]);
    let two = disk_usage(&dir);
    assert!(
        two >= one + DATA - 8 * MIB,
        "overwrite after a snapshot did not keep the old data ({} -> {} MiB)",
        mib(one),
        mib(two)
    );
    gw.cli_ok(&["snapshot", "delete", "v", "s"]);
    gw.qemu_io_ok("v", &["flush"]);
    let u = wait_usage_at_most(&dir, one + SLACK);
    assert!(
        u <= one + SLACK,
        "deleting the snapshot freed too little: {} MiB over one copy",
        mib(u.saturating_sub(one))
    );
    assert!(
        u <= DATA + DATA / 10 + 64 * MIB,
        "{} MiB on disk for {} MiB of live data",
        mib(u),
        mib(DATA)
    );
    gw.qemu_io_ok("v", &[&format!("read -P 0x32 0 {d}")]);

    // Deleting the volume frees its data.
    gw.cli_ok(&["volume", "delete", "v"]);
    let u = wait_usage_at_most(&dir, base + SLACK);
    assert!(
        u <= base + SLACK,
        "deleted volume still uses {} MiB",
        mib(u.saturating_sub(base))
    );
}

/// Free bytes of the filesystem holding `dir`.
fn fs_free(dir: &Path) -> u64 {
    let out = run(Command::new("df").args(["-B1", "--output=avail"]).arg(dir));
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("cannot read df output: {out}"))
}

/// A full disk (M1, M4): writes get ENOSPC over NBD and the gateway goes
/// on serving; deleting a snapshot gives space back, and writes and
/// flushes then succeed with no restart; everything flushed survives a
/// `kill -9`.
#[test]
fn a_full_disk_gets_enospc_and_recovers_once_a_snapshot_is_deleted() {
    if !require_tools(&["qemu-io", "df", "mount", "umount"]) || !can_mount() {
        return;
    }
    let mut gw = Gateway::start_with(Options {
        data_fs_bytes: Some(160 * MIB),
        ..Options::default()
    });
    let dir = gw.data_dir().to_path_buf();
    gw.create_volume("v", "1G");
    gw.qemu_io_ok("v", &["write -P 0x41 0 64M", "flush"]);
    gw.snapshot("v", "s");
    // 128 MiB more does not fit next to the snapshot's 64 MiB.
    fill_the_disk(&gw, "write -P 0x42 0 128M");
    // Other requests keep working: the snapshot still reads whole.
    let out = run(Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read -P 0x41 0 64M"])
        .arg(gw.nbd_uri("v@s")));
    assert!(!out.contains("failed"), "reading the snapshot: {out}");
    // Deleting the snapshot gives its space back, in the background.
    gw.cli_ok(&["snapshot", "delete", "v", "s"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while fs_free(&dir) < 48 * MIB {
        assert!(
            Instant::now() < deadline,
            "space did not come back: {} MiB free",
            mib(fs_free(&dir))
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Writes and flushes succeed again, no restart needed.
    gw.qemu_io_ok("v", &["write -P 0x43 0 64M", "flush"]);
    gw.restart();
    gw.qemu_io_ok("v", &["read -P 0x43 0 64M"]);
}

/// A gateway killed on a full disk starts again (M4: recovery needs no
/// manual repair): opening writes a checkpoint and a new journal, and when
/// the disk has no room for them the pool gives back its space reserve
/// (the file `reserve` in the data directory) and opens. Until the reserve
/// is back, new data leaves its size free, so a second crash on the full
/// disk starts again too. Everything flushed reads back; once space is
/// freed the reserve is taken again.
#[test]
fn a_gateway_killed_on_a_full_disk_starts_again() {
    if !require_tools(&["qemu-io", "df", "mount", "umount"]) || !can_mount() {
        return;
    }
    let mut gw = Gateway::start_with(Options {
        data_fs_bytes: Some(96 * MIB),
        ..Options::default()
    });
    let dir = gw.data_dir().to_path_buf();
    let reserve = dir.join("reserve");
    assert_eq!(
        std::fs::metadata(&reserve).map(|m| m.blocks() * 512).ok(),
        Some(16 * MIB),
        "a new pool holds a 16 MiB space reserve"
    );
    gw.create_volume("v", "1G");
    gw.qemu_io_ok("v", &["write -P 0x41 0 32M", "flush"]);
    // Unflushed writes fill the disk; the gateway dies right then.
    fill_the_disk(&gw, "write -P 0x42 32M 128M");
    gw.restart();
    assert!(
        gw.log().contains("giving back the space reserve"),
        "the restart did not need the reserve:\n{}",
        gw.log()
    );
    assert!(!reserve.exists(), "the reserve is back on a full disk");
    assert_eq!(reserve_metric(&gw), 0);
    gw.qemu_io_ok("v", &["read -P 0x41 0 32M"]);
    // With the reserve given back, new data keeps its size free: writing
    // on fails with ENOSPC before the disk is full, so that a second crash
    // still leaves the open its room.
    let out = gw.qemu_io("v", &["write -P 0x44 32M 128M"]);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("No space left on device"), "{text}");
    assert!(
        fs_free(&dir) >= 8 * MIB,
        "new data took the reserve's room: {} MiB free",
        mib(fs_free(&dir))
    );
    gw.restart();
    gw.qemu_io_ok("v", &["read -P 0x41 0 32M"]);
    // Trimming what did not fit frees space; the reserve comes back after
    // the next background flush.
    gw.qemu_io_ok("v", &["discard 32M 128M", "flush"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while reserve_metric(&gw) != 16 * MIB {
        assert!(
            Instant::now() < deadline,
            "the reserve did not come back: {} MiB free\n{}",
            mib(fs_free(&dir)),
            gw.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(reserve.exists());
    gw.qemu_io_ok("v", &["write -P 0x43 32M 16M", "flush"]);
    gw.restart();
    gw.qemu_io_ok("v", &["read -P 0x41 0 32M", "read -P 0x43 32M 16M"]);
}

/// `snapgate_space_reserve_bytes` from the admin endpoint's /metrics.
fn reserve_metric(gw: &Gateway) -> u64 {
    let (code, body) =
        http_get(gw.admin_addr(), "/metrics", Duration::from_secs(5)).expect("GET /metrics");
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("snapgate_space_reserve_bytes "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no snapgate_space_reserve_bytes in /metrics:\n{body}"))
}

/// `serve --space-reserve SIZE` sets the reserve's size; a restart with
/// another size (0: none) takes or gives back the difference.
#[test]
fn the_space_reserve_follows_its_setting() {
    let mut gw = Gateway::start_with(Options {
        serve_args: vec!["--space-reserve".into(), "4M".into()],
        ..Options::default()
    });
    let reserve = gw.data_dir().join("reserve");
    let held = |p: &Path| std::fs::metadata(p).map(|m| m.blocks() * 512).ok();
    assert_eq!(held(&reserve), Some(4 * MIB));
    assert_eq!(reserve_metric(&gw), 4 * MIB);
    gw.serve_args = vec!["--space-reserve".into(), "0".into()];
    gw.restart();
    assert_eq!(held(&reserve), None, "--space-reserve 0 keeps the reserve");
    assert_eq!(reserve_metric(&gw), 0);
    gw.serve_args = vec![];
    gw.restart();
    assert_eq!(
        held(&reserve),
        Some(16 * MIB),
        "the default reserve is 16 MiB"
    );
    assert_eq!(reserve_metric(&gw), 16 * MIB);
}

/// Runs a qemu-io write on volume `v` that must fail with ENOSPC and leave
/// the gateway's disk full.
fn fill_the_disk(gw: &Gateway, write: &str) {
    let out = gw.qemu_io("v", &[write]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("No space left on device"),
        "writing past the disk's size: {text}"
    );
    assert!(fs_free(gw.data_dir()) < 8 * MIB, "the disk did not fill up");
}
