//! fio's nbd engine: a verifying random-write job with two connections.

use snapgate_e2e::*;
use std::process::Command;

#[test]
fn randwrite_verify_crc32c_two_jobs() {
    if !require_tool("fio") {
        return;
    }
    let gw = Gateway::start();
    // Two jobs, each on its own 64 MiB region (offset_increment), so their
    // verify headers never overwrite each other.
    gw.create_volume("vol", "128M");
    let json = gw.tmp().join("fio.json");
    // fio drops verify state files into its working directory: keep them in tmp.
    let out = run_output(Command::new("fio").current_dir(gw.tmp()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", gw.nbd_uri("vol")),
        "--rw=randwrite",
        "--bs=4k",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--iodepth=32",
        "--numjobs=2",
        "--size=64M",
        "--offset_increment=64M",
        "--output-format=json",
        &format!("--output={}", json.display()),
    ]));
    let text = std::fs::read_to_string(&json).unwrap_or_default();
    assert!(
        out.status.success(),
        "fio failed ({}):\n{}\n{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_str(&text).expect("fio json");
    let jobs = j["jobs"].as_array().expect("jobs");
    assert_eq!(jobs.len(), 2, "expected 2 jobs:\n{text}");
    for job in jobs {
        assert_eq!(job["error"].as_i64(), Some(0), "fio job error:\n{job}");
        assert_eq!(
            job["write"]["io_bytes"].as_u64(),
            Some(64 << 20),
            "written bytes:\n{job}"
        );
        // The verify phase reads everything back.
        assert_eq!(
            job["read"]["io_bytes"].as_u64(),
            Some(64 << 20),
            "verified bytes:\n{job}"
        );
    }
    assert!(gw.healthy());
}

#[test]
fn mixed_randrw_no_errors() {
    if !require_tool("fio") {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("vol", "64M");
    let json = gw.tmp().join("fio.json");
    run(Command::new("fio").current_dir(gw.tmp()).args([
        "--name=mixed",
        "--ioengine=nbd",
        &format!("--uri={}", gw.nbd_uri("vol")),
        "--rw=randrw",
        "--bsrange=512-128k",
        "--iodepth=64",
        "--numjobs=2",
        "--size=64M",
        "--io_size=32M",
        "--output-format=json",
        &format!("--output={}", json.display()),
    ]));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("fio json")).expect("json");
    for job in j["jobs"].as_array().expect("jobs") {
        assert_eq!(job["error"].as_i64(), Some(0), "fio job error:\n{job}");
    }
}
