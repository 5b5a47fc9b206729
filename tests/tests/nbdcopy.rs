//! nbdcopy round trips, single and multi-connection.

use snapgate_e2e::*;
use std::process::Command;

#[test]
fn round_trip_64m_with_holes() {
    if !require_tools(&["nbdcopy", "sha256sum"]) {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("disk", "64M");
    let src = gw.tmp().join("src.raw");
    make_sparse_image(&src, 64 << 20, 42);

    run(Command::new("nbdcopy").arg(&src).arg(gw.nbd_uri("disk")));
    let out1 = gw.tmp().join("out1.raw");
    run(Command::new("nbdcopy").arg(gw.nbd_uri("disk")).arg(&out1));
    let want = sha256(&src);
    assert_eq!(want, sha256(&out1), "single-connection round trip differs");

    // Multi-conn both ways (the server advertises MULTI_CONN).
    gw.create_volume("disk2", "64M");
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=64"])
        .arg(&src)
        .arg(gw.nbd_uri("disk2")));
    let out2 = gw.tmp().join("out2.raw");
    run(Command::new("nbdcopy")
        .args(["--connections=4", "--requests=64"])
        .arg(gw.nbd_uri("disk2"))
        .arg(&out2));
    assert_eq!(want, sha256(&out2), "4-connection round trip differs");

    // Export to export, and out of a snapshot.
    gw.snapshot("disk2", "s");
    gw.create_volume("disk3", "64M");
    run(Command::new("nbdcopy")
        .arg("--connections=4")
        .arg(gw.nbd_uri("disk2@s"))
        .arg(gw.nbd_uri("disk3")));
    let out3 = gw.tmp().join("out3.raw");
    run(Command::new("nbdcopy").arg(gw.nbd_uri("disk3")).arg(&out3));
    assert_eq!(want, sha256(&out3), "snapshot -> volume copy differs");
}

#[test]
fn holes_stay_holes() {
    if !require_tools(&["nbdcopy", "nbdinfo"]) {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("sparse", "64M");
    let src = gw.tmp().join("src.raw");
    make_sparse_image(&src, 64 << 20, 3);
    run(Command::new("nbdcopy").arg(&src).arg(gw.nbd_uri("sparse")));
    // make_sparse_image leaves chunk 3 (3M..4M) a hole.
    let out = run(Command::new("nbdinfo")
        .args(["--map", "--totals"])
        .arg(gw.nbd_uri("sparse")));
    // --totals prints "bytes percent type description"; type 3 = hole,zero.
    let hole_bytes: u64 = out
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[2] == "3")
                .then(|| f[0].parse::<u64>().ok())
                .flatten()
        })
        .sum();
    assert!(
        hole_bytes >= 16 << 20,
        "nbdcopy of a half-sparse image left only {hole_bytes} bytes of holes:\n{out}"
    );
}
