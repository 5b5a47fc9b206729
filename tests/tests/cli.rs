//! The `snapgate` CLI against a running gateway: volumes, snapshots, human and
//! `--json` output, and the "non-zero exit with one clear stderr line" rule.

use snapgate_e2e::*;

fn list_json(gw: &Gateway) -> serde_json::Value {
    gw.cli_json(&["volume", "list"])
}

/// Assert a failed CLI call printed exactly one non-empty line on stderr.
fn assert_one_line_error(out: &std::process::Output, what: &str) -> String {
    assert!(
        !out.status.success(),
        "{what}: expected failure, got success"
    );
    let lines = stderr_lines(out);
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected exactly one stderr line, got {}:\n{}",
        lines.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    lines[0].clone()
}

#[test]
fn volume_create_list_resize_delete() {
    let gw = Gateway::start();
    gw.create_volume("vm1", "10M");
    gw.create_volume("vm2", "64K");
    gw.create_volume("big", "2T");

    let human = gw.cli_ok(&["volume", "list"]);
    for name in ["vm1", "vm2", "big"] {
        assert!(human.contains(name), "human list lacks {name}:\n{human}");
    }

    let j = list_json(&gw);
    let vm1 = json_find_named(&j, "vm1").unwrap_or_else(|| panic!("vm1 not in {j}"));
    assert!(
        json_has_number(vm1, 10 << 20),
        "vm1 size 10M (10485760) not in {vm1}"
    );
    let vm2 = json_find_named(&j, "vm2").unwrap_or_else(|| panic!("vm2 not in {j}"));
    assert!(json_has_number(vm2, 64 << 10), "vm2 size 64K not in {vm2}");
    let big = json_find_named(&j, "big").unwrap_or_else(|| panic!("big not in {j}"));
    assert!(json_has_number(big, 2 << 40), "big size 2T not in {big}");

    if require_tool("nbdinfo") {
        assert_eq!(gw.nbd_size("vm1"), 10 << 20);
        assert_eq!(gw.nbd_size("big"), 2 << 40);
    }

    gw.cli_ok(&["volume", "resize", "vm1", "--size", "20M"]);
    let j = list_json(&gw);
    let vm1 = json_find_named(&j, "vm1").expect("vm1 after resize");
    assert!(
        json_has_number(vm1, 20 << 20),
        "vm1 not 20M after resize: {vm1}"
    );
    if require_tool("nbdinfo") {
        assert_eq!(gw.nbd_size("vm1"), 20 << 20, "NBD size after resize");
    }

    gw.cli_ok(&["volume", "delete", "vm2"]);
    let j = list_json(&gw);
    assert!(
        json_find_named(&j, "vm2").is_none(),
        "vm2 still listed: {j}"
    );
    assert!(json_find_named(&j, "vm1").is_some(), "vm1 vanished: {j}");
    let human = gw.cli_ok(&["volume", "list"]);
    assert!(!human.contains("vm2"), "human list still has vm2:\n{human}");
}

#[test]
fn sizes_use_binary_units() {
    let gw = Gateway::start();
    for (name, size) in [
        ("s512", "512"),
        ("s64k", "64K"),
        ("s10m", "10M"),
        ("s4g", "4G"),
    ] {
        gw.create_volume(name, size);
        let j = list_json(&gw);
        let v = json_find_named(&j, name).unwrap_or_else(|| panic!("{name} not in {j}"));
        assert!(
            json_has_number(v, parse_size(size)),
            "{name}: {size} = {} bytes not in {v}",
            parse_size(size)
        );
    }
}

#[test]
fn snapshot_create_list_delete() {
    let gw = Gateway::start();
    gw.create_volume("db", "16M");
    gw.snapshot("db", "s1");
    gw.snapshot("db", "s2");
    gw.snapshot("db", "s3");

    let human = gw.cli_ok(&["snapshot", "list", "db"]);
    for s in ["s1", "s2", "s3"] {
        assert!(human.contains(s), "snapshot list lacks {s}:\n{human}");
    }
    let j = gw.cli_json(&["snapshot", "list", "db"]);
    for s in ["s1", "s2", "s3"] {
        assert!(json_find_named(&j, s).is_some(), "{s} not in {j}");
    }

    // Delete the middle one; the others stay.
    gw.cli_ok(&["snapshot", "delete", "db", "s2"]);
    let j = gw.cli_json(&["snapshot", "list", "db"]);
    assert!(json_find_named(&j, "s2").is_none(), "s2 still listed: {j}");
    assert!(json_find_named(&j, "s1").is_some(), "s1 vanished: {j}");
    assert!(json_find_named(&j, "s3").is_some(), "s3 vanished: {j}");

    // A duplicate snapshot name is an error.
    let out = gw.cli(&["snapshot", "create", "db", "s1"]);
    assert_one_line_error(&out, "duplicate snapshot");
    // Deleting a missing snapshot is an error.
    let out = gw.cli(&["snapshot", "delete", "db", "s2"]);
    assert_one_line_error(&out, "delete missing snapshot");
}

#[test]
fn bad_size_is_one_line_error() {
    let gw = Gateway::start();
    for bad in ["12Q", "abc", "", "1.5G", "0x10", "-1", "99999999999T"] {
        let out = gw.cli(&["volume", "create", "x", "--size", bad]);
        let line = assert_one_line_error(&out, &format!("--size {bad:?}"));
        assert!(!line.is_empty());
    }
    let out = gw.cli(&["volume", "create", "y", "--size", "0"]);
    assert_one_line_error(&out, "--size 0");
    let j = list_json(&gw);
    assert!(
        json_find_named(&j, "x").is_none(),
        "volume created despite bad size: {j}"
    );
    assert!(
        json_find_named(&j, "y").is_none(),
        "zero-size volume created: {j}"
    );

    gw.create_volume("ok", "1M");
    let out = gw.cli(&["volume", "resize", "ok", "--size", "zz"]);
    assert_one_line_error(&out, "resize --size zz");
}

#[test]
fn unknown_volume_is_an_error() {
    let gw = Gateway::start();
    gw.create_volume("here", "1M");
    let cases: &[&[&str]] = &[
        &["volume", "delete", "nosuch"],
        &["volume", "resize", "nosuch", "--size", "2M"],
        &["snapshot", "create", "nosuch", "s1"],
        &["snapshot", "list", "nosuch"],
        &["snapshot", "delete", "nosuch", "s1"],
        &["snapshot", "delete", "here", "nosuchsnap"],
    ];
    for args in cases {
        let out = gw.cli(args);
        let line = assert_one_line_error(&out, &args.join(" "));
        assert!(
            line.contains("nosuch"),
            "`{}`: error should name what is missing: {line}",
            args.join(" ")
        );
    }
    // A duplicate volume is an error too, and leaves the first intact.
    let out = gw.cli(&["volume", "create", "here", "--size", "2M"]);
    assert_one_line_error(&out, "duplicate volume");
    let j = list_json(&gw);
    let v = json_find_named(&j, "here").expect("here");
    assert!(
        json_has_number(v, 1 << 20),
        "duplicate create changed the volume: {v}"
    );
}

#[test]
fn unreachable_gateway_is_a_clear_error() {
    let port = free_port(); // nothing listens there
    let addr = format!("127.0.0.1:{port}");
    let start = std::time::Instant::now();
    let out = run_output(
        cmd(
            snapgate_bin().to_str().expect("utf-8 path"),
            &["--admin", &addr, "volume", "list"],
        )
        .env_remove("SNAPGATE_ADMIN"),
    );
    assert!(
        start.elapsed() < std::time::Duration::from_secs(30),
        "unreachable gateway took {:?} to report",
        start.elapsed()
    );
    let line = assert_one_line_error(&out, "unreachable gateway");
    let l = line.to_lowercase();
    assert!(
        l.contains(&port.to_string())
            || l.contains("connect")
            || l.contains("refused")
            || l.contains("unreachable"),
        "error does not say what went wrong: {line}"
    );
}

#[test]
fn admin_address_from_environment() {
    let gw = Gateway::start();
    let bin = snapgate_bin();
    let out = run(cmd(
        bin.to_str().expect("utf-8"),
        &["volume", "create", "envvol", "--size", "1M"],
    )
    .env("SNAPGATE_ADMIN", gw.admin()));
    let _ = out;
    let out = run(
        cmd(bin.to_str().expect("utf-8"), &["volume", "list", "--json"])
            .env("SNAPGATE_ADMIN", gw.admin()),
    );
    let j: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert!(json_find_named(&j, "envvol").is_some(), "envvol not in {j}");
}

#[test]
fn json_output_is_one_document() {
    let gw = Gateway::start();
    gw.create_volume("a", "1M");
    gw.snapshot("a", "p1");
    for args in [
        vec!["volume", "list", "--json"],
        vec!["snapshot", "list", "a", "--json"],
    ] {
        let out = gw.cli_ok(&args);
        let mut it = serde_json::Deserializer::from_str(&out).into_iter::<serde_json::Value>();
        assert!(
            matches!(it.next(), Some(Ok(_))),
            "`{}` printed no JSON:\n{out}",
            args.join(" ")
        );
        assert!(
            it.next().is_none(),
            "`{}` printed more than one JSON document:\n{out}",
            args.join(" ")
        );
    }
    // Empty listings are still valid JSON.
    gw.create_volume("b", "1M");
    let j = gw.cli_json(&["snapshot", "list", "b"]);
    assert!(
        json_find_named(&j, "p1").is_none(),
        "b lists a's snapshot: {j}"
    );
}

#[test]
fn names_that_would_break_export_names_are_refused() {
    let gw = Gateway::start();
    // '@' separates volume and point in export names; '/' marks mirrors.
    for bad in ["a@b", "site/vol", ""] {
        let out = gw.cli(&["volume", "create", bad, "--size", "1M"]);
        assert_one_line_error(&out, &format!("volume name {bad:?}"));
    }
    gw.create_volume("ok", "1M");
    let out = gw.cli(&["snapshot", "create", "ok", "x@y"]);
    assert_one_line_error(&out, "snapshot name with '@'");
    let j = list_json(&gw);
    assert!(json_find_named(&j, "a@b").is_none(), "{j}");
}

#[test]
fn shrinking_needs_to_be_asked_for() {
    let gw = Gateway::start();
    gw.create_volume("s", "10M");
    let out = gw.cli(&["volume", "resize", "s", "--size", "5M"]);
    assert_one_line_error(&out, "implicit shrink");
    let j = list_json(&gw);
    let v = json_find_named(&j, "s").expect("s");
    assert!(
        json_has_number(v, 10 << 20),
        "refused shrink changed the size: {v}"
    );
    gw.cli_ok(&["volume", "resize", "s", "--size", "5M", "--shrink"]);
    let j = list_json(&gw);
    let v = json_find_named(&j, "s").expect("s");
    assert!(json_has_number(v, 5 << 20), "shrink did not apply: {v}");
    if require_tool("nbdinfo") {
        assert_eq!(gw.nbd_size("s"), 5 << 20);
    }
}

/// `snapgate verify` on a directory that holds no pool (a typo in --data,
/// the wrong working directory) fails with one line and writes nothing
/// there: it does not create a pool and report it clean.
#[test]
fn verify_refuses_a_directory_without_a_pool() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    std::fs::write(other.join("readme.txt"), b"hi").expect("write");
    for dir in [other.clone(), tmp.path().join("missing")] {
        let out = run_output(
            std::process::Command::new(snapgate_bin())
                .arg("verify")
                .arg("--data")
                .arg(&dir),
        );
        let line = assert_one_line_error(&out, "verify of a directory without a pool");
        assert!(line.contains("no snapgate data directory"), "{line}");
    }
    let names: Vec<_> = std::fs::read_dir(&other)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("readme.txt")]);
    assert!(!tmp.path().join("missing").exists());
}
