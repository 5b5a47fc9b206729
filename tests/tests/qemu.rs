//! qemu-io and qemu-img (QEMU's own NBD client) against the gateway.

use snapgate_e2e::*;
use std::process::Command;

fn combined(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn pattern_write_read_aligned_and_unaligned() {
    if !require_tool("qemu-io") {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("vol", "64M");
    gw.qemu_io_ok("vol", &["write -P 0x55 0 1M", "read -P 0x55 0 1M"]);
    // Unaligned inside existing data, in one connection and in a new one.
    gw.qemu_io_ok(
        "vol",
        &["write -P 0xaa 1000 3000", "read -P 0xaa 1000 3000"],
    );
    gw.qemu_io_ok(
        "vol",
        &[
            "read -P 0x55 0 1000",
            "read -P 0xaa 1000 3000",
            "read -P 0x55 4000 1044576",
        ],
    );
    // Unaligned across a never-written region and a 4 KiB boundary.
    gw.qemu_io_ok(
        "vol",
        &[
            "write -P 0x33 5000000 10000",
            "read -P 0 4999000 1000",
            "read -P 0x33 5000000 10000",
            "read -P 0 5010000 1000",
        ],
    );
    // Never-written space reads as zeros.
    gw.qemu_io_ok("vol", &["read -P 0 32M 16M"]);
    // Write-zeroes and discard read back as zeros; neighbours stay.
    gw.qemu_io_ok(
        "vol",
        &[
            "write -P 0x77 8M 2M",
            "write -z 8M 512k",
            "discard 9M 512k",
            "read -P 0 8M 512k",
            "read -P 0x77 8704k 512k",
            "read -P 0 9M 512k",
            "read -P 0x77 9728k 512k",
        ],
    );
    // FUA writes and an explicit flush are accepted.
    gw.qemu_io_ok(
        "vol",
        &["write -f -P 0x12 12M 64k", "flush", "read -P 0x12 12M 64k"],
    );
    // Last bytes of the device.
    gw.qemu_io_ok(
        "vol",
        &["write -P 0xee 67108352 512", "read -P 0xee 67108352 512"],
    );
}

#[test]
fn read_pattern_mismatch_really_fails() {
    if !require_tool("qemu-io") {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("vol", "4M");
    gw.qemu_io_ok("vol", &["write -P 0x11 0 64k"]);
    let out = gw.qemu_io("vol", &["read -P 0x22 0 64k"]);
    let text = combined(&out);
    assert!(
        text.contains("Pattern verification failed"),
        "a wrong pattern was not detected:\n{text}"
    );
    assert!(
        !out.status.success(),
        "qemu-io exited 0 on a pattern mismatch:\n{text}"
    );
    // And one byte off is also caught.
    gw.qemu_io_ok("vol", &["write -P 0x11 100000 1"]);
    let out = gw.qemu_io("vol", &["read -P 0 99999 3"]);
    assert!(combined(&out).contains("Pattern verification failed"));
}

#[test]
fn snapshot_isolation_through_vol_at_snap() {
    if !require_tool("qemu-io") {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("vol", "16M");
    gw.qemu_io_ok("vol", &["write -P 0x41 0 1M", "write -P 0x41 4M 1M"]);
    gw.snapshot("vol", "s1");
    gw.qemu_io_ok(
        "vol",
        &[
            "write -P 0x42 0 512k",
            "discard 4M 1M",
            "write -P 0x42 8M 4k",
        ],
    );

    // Head sees B, snapshot still sees A.
    gw.qemu_io_ok(
        "vol",
        &[
            "read -P 0x42 0 512k",
            "read -P 0x41 512k 512k",
            "read -P 0 4M 1M",
            "read -P 0x42 8M 4k",
        ],
    );
    let snap_reads = ["read -P 0x41 0 1M", "read -P 0x41 4M 1M", "read -P 0 8M 4k"];
    let out = run_output(
        Command::new("qemu-io")
            .args(["-r", "-f", "raw"])
            .args(snap_reads.iter().flat_map(|c| ["-c", c]))
            .arg(gw.nbd_uri("vol@s1")),
    );
    let text = combined(&out);
    assert!(
        out.status.success() && !text.contains("failed"),
        "snapshot reads:\n{text}"
    );

    // Writing to the snapshot export fails and changes nothing.
    let out = gw.qemu_io("vol@s1", &["write -P 0x43 0 4k"]);
    let text = combined(&out);
    assert!(
        !out.status.success() || text.contains("failed"),
        "write to vol@s1 did not fail:\n{text}"
    );
    assert!(
        !text.contains("wrote 4096/4096"),
        "write to vol@s1 claims success:\n{text}"
    );
    let out = run_output(
        Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read -P 0x41 0 1M"])
            .arg(gw.nbd_uri("vol@s1")),
    );
    assert!(
        out.status.success() && !combined(&out).contains("failed"),
        "{}",
        combined(&out)
    );

    // A second snapshot, then delete the first: the second keeps its data.
    gw.snapshot("vol", "s2");
    gw.qemu_io_ok("vol", &["write -P 0x44 0 1M"]);
    gw.cli_ok(&["snapshot", "delete", "vol", "s1"]);
    let out = run_output(
        Command::new("qemu-io")
            .args([
                "-r",
                "-f",
                "raw",
                "-c",
                "read -P 0x42 0 512k",
                "-c",
                "read -P 0x41 512k 512k",
                "-c",
                "read -P 0 4M 1M",
            ])
            .arg(gw.nbd_uri("vol@s2")),
    );
    assert!(
        out.status.success() && !combined(&out).contains("failed"),
        "s2 after deleting s1:\n{}",
        combined(&out)
    );
    gw.qemu_io_ok("vol", &["read -P 0x44 0 1M"]);
    // The deleted snapshot is gone as an export.
    let out = run_output(
        Command::new("qemu-io")
            .args(["-r", "-f", "raw", "-c", "read 0 4k"])
            .arg(gw.nbd_uri("vol@s1")),
    );
    assert!(
        !out.status.success(),
        "deleted snapshot still served:\n{}",
        combined(&out)
    );
}

#[test]
fn qemu_img_convert_in_and_out() {
    if !require_tools(&["qemu-img", "sha256sum"]) {
        return;
    }
    let gw = Gateway::start();
    let size = 32u64 << 20;
    gw.create_volume("img", "32M");
    let src = gw.tmp().join("src.raw");
    make_sparse_image(&src, size, 7);

    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(gw.nbd_uri("img")));
    let out = gw.tmp().join("out.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(gw.nbd_uri("img"))
        .arg(&out));
    assert_eq!(
        sha256(&src),
        sha256(&out),
        "raw round trip through qemu-img differs"
    );

    // Restore a snapshot into qcow2, as the README shows.
    gw.snapshot("img", "snap");
    // Change the head after the snapshot: the restore must not see it.
    run(Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x99 0 8M"])
        .arg(gw.nbd_uri("img")));
    let q = gw.tmp().join("restore.qcow2");
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(gw.nbd_uri("img@snap"))
        .arg(&q));
    let cmp = run_output(
        Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&q)
            .arg(&src),
    );
    assert!(
        cmp.status.success(),
        "restored qcow2 differs from the snapshot's source:\n{}{}",
        String::from_utf8_lossy(&cmp.stdout),
        String::from_utf8_lossy(&cmp.stderr)
    );
}

#[test]
fn qemu_img_info_and_map() {
    if !require_tools(&["qemu-img", "qemu-io"]) {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("m", "16M");
    gw.qemu_io_ok("m", &["write -P 0x1 0 1M", "write -P 0x2 8M 1M"]);

    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-f", "raw"])
        .arg(gw.nbd_uri("m")));
    let j: serde_json::Value = serde_json::from_str(&info).expect("qemu-img info json");
    assert_eq!(
        j["virtual-size"].as_u64(),
        Some(16 << 20),
        "virtual-size in {j}"
    );

    let map = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "raw"])
        .arg(gw.nbd_uri("m")));
    let entries: Vec<serde_json::Value> = serde_json::from_str(&map).expect("qemu-img map json");
    let data_at = |off: u64| -> bool {
        let e = entries
            .iter()
            .find(|e| {
                let s = e["start"].as_u64().unwrap_or(0);
                let l = e["length"].as_u64().unwrap_or(0);
                s <= off && off < s + l
            })
            .unwrap_or_else(|| panic!("offset {off} not covered by map {map}"));
        e["data"].as_bool().unwrap_or(true)
    };
    assert!(
        data_at(0) && data_at((1 << 20) - 1),
        "written range 0..1M not data: {map}"
    );
    assert!(
        data_at(8 << 20) && data_at((9 << 20) - 1),
        "written range 8M..9M not data: {map}"
    );
    assert!(
        !data_at(2 << 20) && !data_at(5 << 20),
        "never-written range reported as data: {map}"
    );
    assert!(!data_at((16 << 20) - 1), "tail reported as data: {map}");
    let total: u64 = entries
        .iter()
        .map(|e| e["length"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        total,
        16 << 20,
        "map does not cover the device exactly: {map}"
    );
}

#[test]
fn resize_keeps_data_and_regrown_space_reads_zero() {
    if !require_tools(&["qemu-io", "nbdinfo"]) {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("r", "10M");
    gw.qemu_io_ok("r", &["write -P 0x71 0 1M", "write -P 0x72 8M 2M"]);
    gw.snapshot("r", "before");

    // Grow: old data stays, new space is zero.
    gw.cli_ok(&["volume", "resize", "r", "--size", "20M"]);
    assert_eq!(gw.nbd_size("r"), 20 << 20);
    gw.qemu_io_ok(
        "r",
        &[
            "read -P 0x71 0 1M",
            "read -P 0x72 8M 2M",
            "read -P 0 10M 10M",
            "write -P 0x73 19M 1M",
        ],
    );
    // A snapshot is immutable, its size included.
    assert_eq!(
        gw.nbd_size("r@before"),
        10 << 20,
        "snapshot size changed with the head"
    );

    // Shrink, then grow again: what was cut off must not come back.
    gw.cli_ok(&["volume", "resize", "r", "--size", "5M", "--shrink"]);
    assert_eq!(gw.nbd_size("r"), 5 << 20);
    gw.cli_ok(&["volume", "resize", "r", "--size", "20M"]);
    gw.qemu_io_ok("r", &["read -P 0x71 0 1M", "read -P 0 5M 15M"]);
    // The snapshot still has everything.
    let out = run(Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0x71 0 1M",
            "-c",
            "read -P 0x72 8M 2M",
        ])
        .arg(gw.nbd_uri("r@before")));
    assert!(!out.contains("failed"), "{out}");
}
