//! Real-process crash test: a child process writes and flushes through the
//! store on a real directory and reports each durable point on stdout; the
//! parent `kill -9`s it at varied moments, reopens the pool and checks every
//! block against what was reported durable. Twenty kill points, each on the
//! state the previous ones left.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use store::{Pool, PoolOptions, BLOCK};

const BLOCKS: u64 = 256;
const CHILD_ENV: &str = "SNAPGATE_KILL9_CHILD_DIR";

/// Content of block `b` as written by write number `i`.
fn content(i: u64, b: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    for (k, chunk) in v.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&i.to_le_bytes());
        chunk[8..16].copy_from_slice(&(b * 1000 + k as u64).to_le_bytes());
    }
    v
}

/// The child: continues the sequence from where the pool is, forever.
#[test]
#[ignore = "run as a child by kill9_at_twenty_points"]
fn kill9_child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let start: u64 = std::env::var("SNAPGATE_KILL9_START")
        .unwrap()
        .parse()
        .unwrap();
    let pool = Pool::open(
        &dir,
        PoolOptions {
            journal_limit: 256 << 10,
            ..PoolOptions::default()
        },
    )
    .unwrap();
    if pool.volumes().is_empty() {
        pool.create_volume("v", BLOCKS * BLOCK as u64).unwrap();
    }
    let h = pool.open_head("v").unwrap();
    let out = std::io::stdout();
    let mut i = start;
    loop {
        let b = i % BLOCKS;
        // Some writes span two blocks and are unaligned within them.
        h.write_at(&content(i, b), b * BLOCK as u64, false).unwrap();
        if i % 16 == 15 {
            h.flush().unwrap();
            writeln!(out.lock(), "durable {i}").unwrap();
        }
        if i.is_multiple_of(97) {
            pool.create_snapshot("v", &format!("s{i}")).unwrap();
            writeln!(out.lock(), "snapshot {i}").unwrap();
        }
        i += 1;
    }
}

#[test]
fn kill9_at_twenty_points() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut next = 0u64; // first write number of the next child
    let mut durable: Option<u64> = None;
    let mut snaps: Vec<u64> = Vec::new();
    for round in 0..20u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "kill9_child_writer",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env("SNAPGATE_KILL9_START", next.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        // Kill after a varying number of durable reports.
        let wait_for = 3 + (round * 7) % 40;
        let mut seen = 0;
        while seen < wait_for {
            let line = lines.next().expect("child ended early").unwrap();
            if let Some(n) = line.strip_prefix("durable ") {
                durable = Some(n.parse().unwrap());
                seen += 1;
            } else if let Some(n) = line.strip_prefix("snapshot ") {
                snaps.push(n.parse().unwrap());
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Lines the child printed before dying are durable too.
        for line in lines.map_while(|l| l.ok()) {
            if let Some(n) = line.strip_prefix("durable ") {
                durable = Some(n.parse().unwrap());
            } else if let Some(n) = line.strip_prefix("snapshot ") {
                snaps.push(n.parse().unwrap());
            }
        }
        let d = durable.unwrap();
        let pool = Pool::open(dir.path(), PoolOptions::default()).unwrap();
        let h = pool.open_head("v").unwrap();
        let mut buf = vec![0u8; BLOCK];
        let mut newest = 0;
        for b in 0..BLOCKS {
            h.read_at(&mut buf, b * BLOCK as u64).unwrap();
            let i = u64::from_le_bytes(buf[..8].try_into().unwrap());
            // Last durable write to this block.
            let last_durable = if d >= b {
                Some(d - (d - b) % BLOCKS)
            } else {
                None
            };
            if let Some(ld) = last_durable {
                assert!(
                    i >= ld,
                    "round {round}: block {b} holds write {i}, older than durable write {ld}"
                );
            }
            if buf.iter().any(|&x| x != 0) {
                assert_eq!(
                    buf,
                    content(i, b),
                    "round {round}: block {b} is torn or mixed"
                );
                newest = newest.max(i);
            }
        }
        for s in &snaps {
            let sv = pool.open_snapshot("v", &format!("s{s}")).unwrap();
            // The snapshot holds write s itself.
            sv.read_at(&mut buf, (s % BLOCKS) * BLOCK as u64).unwrap();
            assert_eq!(
                buf,
                content(*s, s % BLOCKS),
                "round {round}: snapshot s{s} lost data"
            );
        }
        assert!(pool.verify().unwrap().damaged.is_empty());
        next = newest.max(d) + 1;
    }
}
