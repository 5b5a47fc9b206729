//! Durability across `kill -9`: what was flushed (or written with FUA) before
//! the crash is there after a restart on the same data directory.

use snapgate_e2e::*;

#[test]
fn flushed_writes_survive_kill9() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut gw = Gateway::start();
    gw.create_volume("vol", "64M");
    gw.qemu_io_ok(
        "vol",
        &["write -P 0xa5 0 4M", "write -P 0x3c 1000 3000", "flush"],
    );
    gw.snapshot("vol", "before");
    gw.qemu_io_ok("vol", &["write -P 0x5a 8M 2M", "discard 1M 1M", "flush"]);
    // FUA without a flush is durable too.
    gw.qemu_io_ok("vol", &["write -f -P 0x77 20M 64k"]);

    gw.kill9();
    gw.restart();

    let j = gw.cli_json(&["volume", "list"]);
    assert!(
        json_find_named(&j, "vol").is_some(),
        "volume lost in crash: {j}"
    );
    let s = gw.cli_json(&["snapshot", "list", "vol"]);
    assert!(
        json_find_named(&s, "before").is_some(),
        "snapshot lost in crash: {s}"
    );

    gw.qemu_io_ok(
        "vol",
        &[
            "read -P 0xa5 0 1000",
            "read -P 0x3c 1000 3000",
            "read -P 0xa5 4000 1044576",
            "read -P 0 1M 1M",
            "read -P 0xa5 2M 2M",
            "read -P 0x5a 8M 2M",
            "read -P 0x77 20M 64k",
            "read -P 0 30M 1M",
        ],
    );
    // The snapshot export still shows the pre-snapshot state.
    let out = run(std::process::Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0xa5 1M 1M",
            "-c",
            "read -P 0 8M 2M",
        ])
        .arg(gw.nbd_uri("vol@before")));
    assert!(!out.contains("failed"), "snapshot after crash:\n{out}");
}

#[test]
fn repeated_crashes_keep_every_flushed_write() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut gw = Gateway::start();
    gw.create_volume("v", "32M");
    for round in 0..4u64 {
        let p = 0x20 + round;
        gw.qemu_io_ok(
            "v",
            &[&format!("write -P {p:#x} {}M 1M", round * 2), "flush"],
        );
        gw.kill9();
        gw.restart();
        for r in 0..=round {
            gw.qemu_io_ok("v", &[&format!("read -P {:#x} {}M 1M", 0x20 + r, r * 2)]);
        }
    }
}

#[test]
fn unflushed_writes_do_not_break_reopen() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut gw = Gateway::start();
    gw.create_volume("v", "32M");
    gw.qemu_io_ok("v", &["write -P 0x11 0 8M", "flush"]);
    // Lots of unflushed writes, then a crash: the store must reopen by
    // itself and keep everything flushed before.
    gw.qemu_io_ok("v", &["write -P 0x22 8M 8M", "write -P 0x33 4M 1M"]);
    gw.kill9();
    gw.restart();
    gw.qemu_io_ok(
        "v",
        &["read -P 0x11 0 4M", "read -P 0x11 5M 3M", "read 8M 8M"],
    );
    // And it keeps working.
    gw.qemu_io_ok("v", &["write -P 0x44 16M 1M", "read -P 0x44 16M 1M"]);
}

#[test]
fn metadata_changes_survive_kill9() {
    let mut gw = Gateway::start();
    gw.create_volume("a", "8M");
    gw.create_volume("b", "8M");
    gw.cli_ok(&["volume", "resize", "a", "--size", "16M"]);
    gw.cli_ok(&["volume", "delete", "b"]);
    gw.snapshot("a", "s1");
    gw.kill9();
    gw.restart();
    let j = gw.cli_json(&["volume", "list"]);
    let a = json_find_named(&j, "a").unwrap_or_else(|| panic!("a lost: {j}"));
    assert!(json_has_number(a, 16 << 20), "resize lost: {a}");
    assert!(
        json_find_named(&j, "b").is_none(),
        "deleted volume came back: {j}"
    );
    let s = gw.cli_json(&["snapshot", "list", "a"]);
    assert!(json_find_named(&s, "s1").is_some(), "snapshot lost: {s}");
}
