//! nbdinfo (libnbd) against the gateway: export listing, sizes, flags and
//! the base:allocation map (data vs holes after writes and trims).

use snapgate_e2e::*;
use std::process::Command;

/// One line of `nbdinfo --map`: (offset, length, type bits, description).
fn parse_map(text: &str) -> Vec<(u64, u64, u32, String)> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 3, "odd nbdinfo --map line: {l:?}");
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[2].parse().expect("type"),
                f[3..].join(" "),
            )
        })
        .collect()
}

fn map_type_at(map: &[(u64, u64, u32, String)], off: u64) -> u32 {
    map.iter()
        .find(|(o, l, _, _)| *o <= off && off < o + l)
        .unwrap_or_else(|| panic!("offset {off} not covered by map {map:?}"))
        .2
}

fn nbdinfo_map(gw: &Gateway, export: &str) -> Vec<(u64, u64, u32, String)> {
    let out = run(Command::new("nbdinfo").arg("--map").arg(gw.nbd_uri(export)));
    let map = parse_map(&out);
    // Extents are consecutive from 0 and cover the export.
    let mut next = 0;
    for (o, l, _, _) in &map {
        assert_eq!(*o, next, "map not consecutive:\n{out}");
        assert!(*l > 0, "zero-length extent:\n{out}");
        next = o + l;
    }
    assert_eq!(
        next,
        gw.nbd_size(export),
        "map does not cover the export:\n{out}"
    );
    map
}

#[test]
fn list_shows_heads_and_points() {
    if !require_tool("nbdinfo") {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("alpha", "8M");
    gw.create_volume("beta", "16M");
    gw.snapshot("alpha", "p1");
    gw.snapshot("alpha", "p2");

    let uri = format!("nbd://127.0.0.1:{}", gw.nbd_port);
    let out = run(Command::new("nbdinfo").args(["--list", "--json", &uri]));
    let j: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --list --json");
    let exports = j["exports"].as_array().expect("exports array");
    let find = |name: &str| {
        exports
            .iter()
            .find(|e| e["export-name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed:\n{out}"))
    };
    assert_eq!(find("alpha")["export-size"].as_u64(), Some(8 << 20));
    assert_eq!(find("beta")["export-size"].as_u64(), Some(16 << 20));
    assert_eq!(find("alpha")["is_read_only"], false);
    for p in ["alpha@p1", "alpha@p2"] {
        let e = find(p);
        assert_eq!(e["export-size"].as_u64(), Some(8 << 20), "{p}");
        assert_eq!(e["is_read_only"], true, "{p} must be read-only:\n{out}");
    }
    assert_eq!(exports.len(), 4, "unexpected exports:\n{out}");

    // Human form too.
    let human = run(Command::new("nbdinfo").args(["--list", &uri]));
    for n in ["alpha", "beta", "alpha@p1", "alpha@p2"] {
        assert!(
            human.contains(&format!("export=\"{n}\"")) || human.contains(n),
            "{n} missing:\n{human}"
        );
    }

    // A deleted snapshot disappears from the list.
    gw.cli_ok(&["snapshot", "delete", "alpha", "p1"]);
    let out = run(Command::new("nbdinfo").args(["--list", "--json", &uri]));
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    let names: Vec<&str> = j["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .filter_map(|e| e["export-name"].as_str())
        .collect();
    assert!(
        !names.contains(&"alpha@p1"),
        "deleted point still listed: {names:?}"
    );
    assert!(names.contains(&"alpha@p2"), "p2 missing: {names:?}");
}

#[test]
fn json_size_and_flags() {
    if !require_tool("nbdinfo") {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("v", "24M");
    gw.snapshot("v", "s");
    let out = run(Command::new("nbdinfo").arg("--json").arg(gw.nbd_uri("v")));
    let j: serde_json::Value = serde_json::from_str(&out).expect("nbdinfo --json");
    let e = &j["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(24 << 20), "{out}");
    assert_eq!(j["protocol"], "newstyle-fixed", "{out}");
    assert_eq!(j["structured"], true, "{out}");
    for flag in [
        "can_flush",
        "can_fua",
        "can_trim",
        "can_zero",
        "can_multi_conn",
    ] {
        assert_eq!(e[flag], true, "{flag} not advertised:\n{out}");
    }
    assert_eq!(e["is_read_only"], false, "{out}");
    let ctx: Vec<&str> = e["contexts"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c.as_str()).collect())
        .unwrap_or_default();
    assert!(
        ctx.contains(&"base:allocation"),
        "base:allocation missing:\n{out}"
    );

    let out = run(Command::new("nbdinfo").arg("--json").arg(gw.nbd_uri("v@s")));
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(j["exports"][0]["is_read_only"], true, "{out}");
    assert_eq!(j["exports"][0]["export-size"].as_u64(), Some(24 << 20));
}

#[test]
fn map_shows_data_and_holes() {
    if !require_tools(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("m", "16M");
    // A fresh volume is one big hole.
    let map = nbdinfo_map(&gw, "m");
    assert!(
        map.iter().all(|e| e.2 & 1 == 1),
        "fresh volume has data: {map:?}"
    );

    gw.qemu_io_ok(
        "m",
        &[
            "write -P 0x1 0 1M",
            "write -P 0x2 4M 1M",
            "write -P 0x3 12M 4k",
        ],
    );
    let map = nbdinfo_map(&gw, "m");
    for off in [0, (1 << 20) - 1, 4 << 20, (5 << 20) - 1, 12 << 20] {
        assert_eq!(
            map_type_at(&map, off) & 1,
            0,
            "{off} should be data: {map:?}"
        );
    }
    for off in [1 << 20, 3 << 20, 6 << 20, 11 << 20, (16 << 20) - 1] {
        assert_eq!(
            map_type_at(&map, off),
            3,
            "{off} should be hole,zero: {map:?}"
        );
    }

    // Trim makes a hole again; write-zeroes reads as zero.
    gw.qemu_io_ok(
        "m",
        &[
            "discard 0 1M",
            "write -z 4M 1M",
            "write -z 6M 1M",
            "write -z -u 10M 1M",
        ],
    );
    let map = nbdinfo_map(&gw, "m");
    // qemu-io's `write -z` without -u sends NO_HOLE: never-written blocks
    // become allocated zeros; with -u (may unmap) they stay holes.
    for off in [6 << 20, (7 << 20) - 1] {
        assert_eq!(
            map_type_at(&map, off),
            2,
            "NO_HOLE zeroes at {off} should be zero, not hole: {map:?}"
        );
    }
    assert_eq!(map_type_at(&map, 10 << 20), 3, "{map:?}");
    for off in [0, 512 << 10, (1 << 20) - 1] {
        assert_eq!(
            map_type_at(&map, off),
            3,
            "trimmed {off} should be hole,zero: {map:?}"
        );
    }
    for off in [4 << 20, (5 << 20) - 1] {
        assert_eq!(
            map_type_at(&map, off) & 2,
            2,
            "write-zeroed {off} should be zero: {map:?}"
        );
    }
    assert_eq!(
        map_type_at(&map, 12 << 20) & 1,
        0,
        "untouched data lost: {map:?}"
    );

    // A snapshot taken before the trim keeps its data map.
    gw.qemu_io_ok("m", &["write -P 0x4 8M 1M"]);
    gw.snapshot("m", "s");
    gw.qemu_io_ok("m", &["discard 8M 1M"]);
    let snap = nbdinfo_map(&gw, "m@s");
    assert_eq!(
        map_type_at(&snap, 8 << 20) & 1,
        0,
        "snapshot lost data: {snap:?}"
    );
    let head = nbdinfo_map(&gw, "m");
    assert_eq!(
        map_type_at(&head, 8 << 20),
        3,
        "head trim not a hole: {head:?}"
    );
}

#[test]
fn unix_socket_export() {
    if !require_tools(&["nbdinfo", "qemu-io"]) {
        return;
    }
    let gw = Gateway::start_with(Options {
        unix_socket: true,
        ..Options::default()
    });
    gw.create_volume("u", "4M");
    let uri = gw.nbd_unix_uri("u");
    let size = run(Command::new("nbdinfo").args(["--size", &uri]));
    assert_eq!(size.trim(), (4u64 << 20).to_string());
    let out = run(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5a 0 64k",
        "-c",
        "read -P 0x5a 0 64k",
        &uri,
    ]));
    assert!(!out.contains("failed"), "{out}");
    // Same data over TCP.
    gw.qemu_io_ok("u", &["read -P 0x5a 0 64k"]);
}
