//! Orderly shutdown: SIGTERM (and Ctrl-C's SIGINT) end the gateway with
//! status 0 within a bounded time, also with clients connected.

use snapgate_e2e::*;
use std::time::Duration;

const BOUND: Duration = Duration::from_secs(10);

fn assert_clean_exit(gw: &mut Gateway, sig: i32, what: &str) {
    gw.signal(sig);
    match gw.wait_exit(BOUND) {
        Some(status) => assert!(
            status.success(),
            "{what}: gateway exited with {status}, expected 0\n{}",
            gw.log()
        ),
        None => panic!("{what}: gateway still running {BOUND:?} after the signal"),
    }
}

#[test]
fn sigterm_exits_zero() {
    let mut gw = Gateway::start();
    gw.create_volume("v", "1M");
    assert_clean_exit(&mut gw, libc::SIGTERM, "SIGTERM");
}

#[test]
fn sigint_exits_zero() {
    let mut gw = Gateway::start();
    assert_clean_exit(&mut gw, libc::SIGINT, "SIGINT");
}

#[test]
fn sigterm_with_idle_client_connected() {
    let mut gw = Gateway::start();
    gw.create_volume("v", "1M");
    let mut c = RawNbd::connect(gw.nbd_addr(), "v").expect("connect");
    assert_eq!(c.write(1, 0, &[7u8; 4096]).expect("write"), 0);
    let _half = RawNbd::greet(gw.nbd_addr()).expect("greet"); // stuck in negotiation
    assert_clean_exit(&mut gw, libc::SIGTERM, "SIGTERM with clients");
}

#[test]
fn data_and_restart_after_sigterm() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut gw = Gateway::start();
    gw.create_volume("v", "8M");
    gw.qemu_io_ok("v", &["write -P 0x61 0 1M", "flush"]);
    assert_clean_exit(&mut gw, libc::SIGTERM, "SIGTERM");
    gw.restart();
    gw.qemu_io_ok("v", &["read -P 0x61 0 1M"]);
}

/// The same SIGTERM twice in a row (GNU `timeout` signals the process and
/// then its process group) is one request: the gateway still drains,
/// flushes and exits 0, and the unflushed writes are there after the
/// restart. The writes leave its final flush enough work to be running
/// when the second signal comes.
#[test]
fn a_repeated_sigterm_still_stops_cleanly() {
    if !require_tool("qemu-io") || !require_python_nbd() {
        return;
    }
    let mut gw = Gateway::start();
    gw.create_volume("v", "512M");
    // Written and never flushed (qemu-io flushes when it closes; libnbd's
    // shutdown does not).
    run(std::process::Command::new(SYS_PYTHON).args([
        "-c",
        "import nbd, sys\n\
         h = nbd.NBD()\n\
         h.connect_uri(sys.argv[1])\n\
         buf = b'\\x5c' * (4 << 20)\n\
         for i in range(96):\n    h.pwrite(buf, i * (4 << 20))\n\
         h.shutdown()\n",
        &gw.nbd_uri("v"),
    ]));
    gw.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(20));
    gw.signal(libc::SIGTERM);
    match gw.wait_exit(BOUND) {
        Some(status) => assert!(status.success(), "exited with {status}\n{}", gw.log()),
        None => panic!("gateway still running {BOUND:?} after the signals"),
    }
    gw.restart();
    gw.qemu_io_ok("v", &["read -P 0x5c 0 384M"]);
}

/// SIGTERM in the middle of a stream of writes: the gateway drains (every
/// write it acknowledged is on disk after the restart, none is torn) and
/// exits 0.
#[test]
fn sigterm_during_write_stream_keeps_acked_writes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    if !require_python_nbd() {
        return;
    }
    let mut gw = Gateway::start();
    gw.create_volume("w", "512M");
    let ack = gw.tmp().join("acked.txt");
    let script = py_dir().join("acked_writer.py");
    let mut writer = Command::new(SYS_PYTHON)
        .arg(&script)
        .args(["write", &gw.nbd_uri("w")])
        .arg(&ack)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn acked_writer.py");
    let stdout = writer.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let first = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
    assert_eq!(first, "READY", "writer did not start streaming");
    assert_clean_exit(&mut gw, libc::SIGTERM, "SIGTERM during writes");
    let st = wait_timeout(&mut writer, Duration::from_secs(30)).expect("writer did not stop");
    let rest: Vec<String> = rx.try_iter().collect();
    assert!(st.success(), "writer failed: {rest:?}");
    println!("writer: {rest:?}");

    gw.restart();
    let out = run(Command::new(SYS_PYTHON)
        .arg(&script)
        .args(["check", &gw.nbd_uri("w")])
        .arg(&ack));
    assert!(out.contains("ALL OK"), "{out}");
    println!("{out}");
}
