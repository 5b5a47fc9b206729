//! Checksums end to end (M4): a damaged block is found by `snapgate verify`
//! and read as an I/O error (NBD EIO), never returned as data.

use snapgate_e2e::*;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Offset of the first 4 KiB-aligned block of the file filled with `byte`.
fn find_block(path: &Path, byte: u8) -> Option<u64> {
    let mut f = std::fs::File::open(path).ok()?;
    let mut buf = vec![0u8; 4096];
    let mut off = 0u64;
    loop {
        match f.read_exact(&mut buf) {
            Ok(()) => {}
            Err(_) => return None,
        }
        if buf.iter().all(|&b| b == byte) {
            return Some(off);
        }
        off += 4096;
    }
}

/// Every regular file under the data directory, largest first.
fn files_by_size(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() {
                v.push(p);
            }
        }
    }
    v.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)));
    v
}

fn stop(gw: &mut Gateway) {
    gw.signal(libc::SIGTERM);
    let st = gw
        .wait_exit(Duration::from_secs(30))
        .expect("gateway did not stop on SIGTERM");
    assert!(st.success(), "gateway exited with {st}");
}

fn verify(gw: &Gateway, json: bool) -> std::process::Output {
    let mut c = Command::new(snapgate_bin());
    c.arg("verify").arg("--data").arg(gw.data_dir());
    if json {
        c.arg("--json");
    }
    run_output(&mut c)
}

#[test]
fn corruption_is_found_and_never_served() {
    if !require_tool("qemu-io") {
        return;
    }
    let mut gw = Gateway::start();
    gw.create_volume("vol", "16M");
    gw.qemu_io_ok(
        "vol",
        &["write -P 0x11 0 1M", "write -P 0x6b 4M 1M", "flush"],
    );
    stop(&mut gw);

    let clean = verify(&gw, false);
    assert!(
        clean.status.success(),
        "verify of a clean store failed:\n{}{}",
        String::from_utf8_lossy(&clean.stdout),
        String::from_utf8_lossy(&clean.stderr)
    );

    // Flip one byte inside a stored block of 0x6b.
    let (file, off) = files_by_size(gw.data_dir())
        .into_iter()
        .find_map(|f| find_block(&f, 0x6b).map(|o| (f, o)))
        .expect("no stored block of 0x6b found in the data directory");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("open data file");
        f.seek(SeekFrom::Start(off + 100)).expect("seek");
        f.write_all(&[0x6c]).expect("corrupt");
        f.sync_all().expect("sync");
    }

    let bad = verify(&gw, false);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&bad.stdout),
        String::from_utf8_lossy(&bad.stderr)
    );
    assert!(
        !bad.status.success(),
        "verify missed a flipped byte:\n{text}"
    );
    assert!(
        text.contains("vol"),
        "verify does not name the damaged volume:\n{text}"
    );
    let badj = verify(&gw, true);
    assert!(!badj.status.success());
    let j: serde_json::Value =
        serde_json::from_slice(&badj.stdout).expect("verify --json prints one JSON document");
    assert!(
        json_find_named(&j, "vol").is_some(),
        "damage not named in {j}"
    );

    // Served: the damaged block is an I/O error, everything else still reads.
    gw.restart();
    gw.qemu_io_ok("vol", &["read -P 0x11 0 1M", "read -P 0 8M 1M"]);
    let out = gw.qemu_io("vol", &["read -P 0x6b 4M 1M"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("read 1048576/1048576"),
        "damaged data was returned:\n{text}"
    );
    assert!(
        text.contains("Input/output error"),
        "damaged block not reported as EIO:\n{text}"
    );
    // Block by block through libnbd: exactly one 4 KiB block is EIO, the
    // others of the range read fine, and the connection survives the error.
    if require_python_nbd() {
        let script = format!(
            r#"
import nbd
h = nbd.NBD()
h.connect_uri("{uri}")
bad = []
for i in range(256):
    off = (4 << 20) + i * 4096
    try:
        d = bytes(h.pread(4096, off))
        assert d == b"\x6b" * 4096, f"block at {{off}} returned wrong data"
    except nbd.Error as e:
        assert e.errno == "EIO", f"block at {{off}}: {{e.errno}}"
        bad.append(off)
assert len(bad) == 1, f"damaged blocks: {{bad}}"
assert bytes(h.pread(4096, 0)) == b"\x11" * 4096
print("ALL OK", bad)
"#,
            uri = gw.nbd_uri("vol")
        );
        let out = run(Command::new(SYS_PYTHON).args(["-c", &script]));
        assert!(out.contains("ALL OK"), "{out}");
    }
    // Overwriting the damaged block heals it.
    gw.qemu_io_ok("vol", &["write -P 0x22 4M 1M", "read -P 0x22 4M 1M"]);
}

#[test]
fn verify_refuses_or_survives_a_running_gateway() {
    let gw = Gateway::start();
    gw.create_volume("v", "1M");
    // The pool is locked by the running gateway: verify must not report
    // damage that is not there; a clear one-line refusal is fine.
    let out = verify(&gw, false);
    if !out.status.success() {
        let lines = stderr_lines(&out);
        assert_eq!(lines.len(), 1, "verify on a live store: {lines:?}");
    }
    assert!(gw.healthy());
}
