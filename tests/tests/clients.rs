//! One misbehaving or vanished client never disturbs another, nor the gateway.

use snapgate_e2e::*;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Another client writes and verifies its own volume with qemu-io.
fn other_client_round(gw: &Gateway, round: u8) {
    let p = format!("{:#04x}", 0x10 + round);
    let off = (round as u64 % 8) << 20;
    gw.qemu_io_ok(
        "b",
        &[
            &format!("write -P {p} {off} 1M"),
            "flush",
            &format!("read -P {p} {off} 1M"),
        ],
    );
}

#[test]
fn sigkill_client_mid_stream() {
    if !require_python_nbd() || !require_tool("qemu-io") {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("a", "64M");
    gw.create_volume("b", "16M");
    let script = py_dir().join("aio_writer.py");

    for round in 0..3u8 {
        let mut writer = Command::new(SYS_PYTHON)
            .arg(&script)
            .arg(gw.nbd_uri("a"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn aio_writer.py");
        // Wait (bounded) for READY on a thread, so a dead writer cannot hang us.
        let stdout = writer.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(30)).unwrap_or_default();
        if !line.starts_with("READY") {
            let _ = writer.kill();
            let out = writer.wait_with_output().expect("writer output");
            panic!(
                "writer never got ready: {line:?}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Work on another volume while the writer streams, then kill it.
        other_client_round(&gw, round);
        std::thread::sleep(Duration::from_millis(50 + 70 * round as u64));
        writer.kill().expect("SIGKILL writer");
        let _ = writer.wait();
        other_client_round(&gw, round + 10);
        assert!(
            gw.healthy(),
            "gateway unhealthy after client SIGKILL (round {round})"
        );
    }
    // The writer's volume is still fully usable.
    gw.qemu_io_ok("a", &["write -P 0xc3 0 1M", "read -P 0xc3 0 1M"]);
}

#[test]
fn broken_and_hostile_clients() {
    if !require_tool("qemu-io") {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("a", "16M");
    gw.create_volume("b", "16M");
    let addr = gw.nbd_addr();

    // Connect and close at once.
    for _ in 0..10 {
        let s = TcpStream::connect(addr).expect("connect");
        drop(s);
    }
    // Garbage instead of a handshake.
    {
        let mut s = RawNbd::greet(addr).expect("greet");
        let _ = s.write_all(&[0xffu8; 4096]);
        let _ = s.shutdown(Shutdown::Both);
    }
    // Unknown client flags must make the server drop the connection.
    {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut g = [0u8; 18];
        std::io::Read::read_exact(&mut s, &mut g).expect("greeting");
        s.write_all(&0xffff_fff0u32.to_be_bytes()).expect("flags");
        let mut buf = [0u8; 64];
        let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "server kept talking after unknown client flags");
    }
    // Half a handshake: greeting read, option header cut short, idle.
    let half = {
        let mut s = RawNbd::greet(addr).expect("greet");
        s.write_all(b"IHAVEOP").expect("partial option");
        s
    };
    // A write whose payload never fully arrives.
    {
        let mut c = RawNbd::connect(addr, "a").expect("raw connect");
        assert_eq!(c.size, 16 << 20);
        assert_eq!(c.write(1, 0, &[0x5au8; 4096]).expect("write"), 0);
        c.stream
            .write_all(&RawNbd::request(NBD_CMD_WRITE, 2, 0, 1 << 20))
            .expect("header");
        c.stream
            .write_all(&[0xa5u8; 1000])
            .expect("partial payload");
        let _ = c.stream.shutdown(Shutdown::Both);
    }
    // A request with a bad magic: the server may drop this connection only.
    {
        let mut c = RawNbd::connect(addr, "a").expect("raw connect");
        let mut r = RawNbd::request(NBD_CMD_READ, 3, 0, 512);
        r[0] = 0;
        let _ = c.stream.write_all(&r);
    }
    // Pipelined reads answered by handle, then DISC.
    {
        let mut c = RawNbd::connect(addr, "a").expect("raw connect");
        for h in 0..32u64 {
            c.stream
                .write_all(&RawNbd::request(NBD_CMD_READ, 100 + h, h * 4096, 4096))
                .expect("req");
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..32 {
            let (err, h) = c.read_simple_reply().expect("reply");
            assert_eq!(err, 0);
            let mut data = vec![0u8; 4096];
            std::io::Read::read_exact(&mut c.stream, &mut data).expect("data");
            assert!(seen.insert(h), "duplicate reply handle {h}");
            if h == 100 {
                assert!(data.iter().all(|&b| b == 0x5a), "first block lost its data");
            }
        }
        c.stream
            .write_all(&RawNbd::request(NBD_CMD_DISC, 999, 0, 0))
            .expect("disc");
        let mut buf = [0u8; 16];
        let n = std::io::Read::read(&mut c.stream, &mut buf).unwrap_or(0);
        assert_eq!(n, 0, "server replied to DISC or did not close");
    }

    // Others still work, and the write whose payload never arrived was not
    // applied, not even in part.
    gw.qemu_io_ok("b", &["write -P 0x21 0 1M", "read -P 0x21 0 1M"]);
    gw.qemu_io_ok("a", &["read -P 0x5a 0 4k", "read -P 0 4k 1020k"]);
    assert!(gw.healthy());
    drop(half);
}

#[test]
fn many_concurrent_connections() {
    if !require_tool("qemu-io") {
        return;
    }
    let gw = Gateway::start();
    gw.create_volume("v", "64M");
    let deadline = Instant::now() + Duration::from_secs(120);
    let handles: Vec<_> = (0..16u64)
        .map(|i| {
            let addr = gw.nbd_addr();
            std::thread::spawn(move || {
                let mut c = RawNbd::connect(addr, "v").expect("connect");
                let pat = vec![i as u8 + 1; 64 << 10];
                for k in 0..16u64 {
                    let off = (i * 16 + k) * (64 << 10);
                    assert_eq!(c.write(k, off, &pat).expect("write"), 0);
                }
                for k in 0..16u64 {
                    let off = (i * 16 + k) * (64 << 10);
                    assert_eq!(c.read(100 + k, off, 64 << 10).expect("read"), pat);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    assert!(Instant::now() < deadline);
    gw.qemu_io_ok("v", &["read -P 0x1 0 64k", "read -P 0x10 15M 1M"]);
}

/// Requests no library would send, on a simple-reply connection: each gets
/// the spec's error and the connection keeps working.
#[test]
fn raw_protocol_errors_keep_the_connection() {
    const EINVAL: u32 = 22;
    const ENOSPC: u32 = 28;
    let gw = Gateway::start();
    gw.create_volume("r", "1M");
    gw.snapshot("r", "s");
    let mut c = RawNbd::connect(gw.nbd_addr(), "r").expect("connect");
    assert_eq!(c.size, 1 << 20);
    assert_eq!(c.write(1, 0, &[0x42u8; 4096]).expect("write"), 0);
    let alive = |c: &mut RawNbd, h: u64| {
        let d = c.read(h, 0, 4096).expect("read after error");
        assert!(d.iter().all(|&b| b == 0x42), "data changed");
    };

    // Unknown command type.
    c.stream
        .write_all(&RawNbd::request(99, 10, 0, 0))
        .expect("send");
    assert_eq!(c.read_simple_reply().expect("reply"), (EINVAL, 10));
    alive(&mut c, 11);

    // Unknown flag on a read.
    let mut r = RawNbd::request(NBD_CMD_READ, 12, 0, 512);
    r[4..6].copy_from_slice(&0x0800u16.to_be_bytes());
    c.stream.write_all(&r).expect("send");
    assert_eq!(c.read_simple_reply().expect("reply"), (EINVAL, 12));
    alive(&mut c, 13);

    // Read past the end: error, no payload follows.
    c.stream
        .write_all(&RawNbd::request(NBD_CMD_READ, 14, 1 << 20, 4096))
        .expect("send");
    assert_eq!(c.read_simple_reply().expect("reply"), (EINVAL, 14));
    alive(&mut c, 15);

    // Write past the end: the payload is drained, then ENOSPC.
    assert_eq!(
        c.write(16, (1 << 20) - 512, &[1u8; 4096]).expect("write"),
        ENOSPC
    );
    alive(&mut c, 17);

    // A read larger than the 32 MiB maximum: an error, not a disconnect.
    c.stream
        .write_all(&RawNbd::request(NBD_CMD_READ, 18, 0, 64 << 20))
        .expect("send");
    let (err, h) = c.read_simple_reply().expect("reply to an oversized read");
    assert_eq!(h, 18);
    assert_ne!(err, 0, "64 MiB read on a 1 MiB export succeeded");
    alive(&mut c, 19);

    // Pipelined: errors and successes interleaved, every handle answered once.
    for h in 0..16u64 {
        let off = if h % 2 == 0 { 0 } else { 2 << 20 };
        c.stream
            .write_all(&RawNbd::request(NBD_CMD_READ, 100 + h, off, 4096))
            .expect("send");
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..16 {
        let (err, h) = c.read_simple_reply().expect("reply");
        assert!(seen.insert(h), "handle {h} answered twice");
        if (h - 100) % 2 == 0 {
            assert_eq!(err, 0);
            let mut d = vec![0u8; 4096];
            std::io::Read::read_exact(&mut c.stream, &mut d).expect("data");
        } else {
            assert_eq!(err, EINVAL);
        }
    }

    // The read-only export refuses writes with EPERM, payload drained.
    let mut s = RawNbd::connect(gw.nbd_addr(), "r@s").expect("connect snapshot");
    assert_ne!(s.flags & 2, 0, "snapshot export lacks NBD_FLAG_READ_ONLY");
    assert_eq!(
        s.write(1, 0, &[9u8; 4096]).expect("write"),
        1 /* EPERM */
    );
    // (taken before the 0x42 write: zeros, and still zeros)
    assert!(s.read(2, 0, 4096).expect("read").iter().all(|&b| b == 0));
}

/// Option haggling by hand ("Fixed newstyle negotiation"): unknown options,
/// payloads where none belong, unknown exports, LIST, INFO, ABORT.
#[test]
fn raw_handshake_options() {
    const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
    const ACK: u32 = 1;
    const SERVER: u32 = 2;
    const INFO: u32 = 3;
    const ERR: u32 = 1 << 31;
    const ERR_UNSUP: u32 = ERR + 1;
    const ERR_INVALID: u32 = ERR + 3;
    const ERR_UNKNOWN: u32 = ERR + 6;

    fn send_opt(s: &mut TcpStream, opt: u32, data: &[u8]) {
        let mut m = Vec::new();
        m.extend_from_slice(b"IHAVEOPT");
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        s.write_all(&m).expect("send option");
    }
    fn reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        std::io::Read::read_exact(s, &mut h).expect("option reply");
        assert_eq!(
            u64::from_be_bytes(h[..8].try_into().expect("8")),
            REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().expect("4"));
        let ty = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut d = vec![0u8; len as usize];
        std::io::Read::read_exact(s, &mut d).expect("reply data");
        (opt, ty, d)
    }
    fn name_req(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    let gw = Gateway::start();
    gw.create_volume("r", "2M");
    gw.snapshot("r", "p");
    let mut s = RawNbd::greet(gw.nbd_addr()).expect("greet");

    // Unknown option, with a payload that must be consumed.
    send_opt(&mut s, 0xdead, b"hello");
    let (o, t, _) = reply(&mut s);
    assert_eq!((o, t), (0xdead, ERR_UNSUP), "unknown option");

    // LIST with a payload is invalid; without, it lists every export.
    send_opt(&mut s, 3, b"x");
    assert_eq!(reply(&mut s).1, ERR_INVALID, "LIST with payload");
    send_opt(&mut s, 3, b"");
    let mut names = Vec::new();
    loop {
        let (o, t, d) = reply(&mut s);
        assert_eq!(o, 3);
        if t == ACK {
            break;
        }
        assert_eq!(t, SERVER, "LIST reply type");
        let n = u32::from_be_bytes(d[..4].try_into().expect("4")) as usize;
        names.push(String::from_utf8(d[4..4 + n].to_vec()).expect("utf-8 name"));
    }
    names.sort();
    assert_eq!(names, ["r", "r@p"], "LIST");

    // GO/INFO on an unknown export: ERR_UNKNOWN, negotiation goes on.
    send_opt(&mut s, 6, &name_req("nope"));
    assert_eq!(reply(&mut s).1, ERR_UNKNOWN, "INFO unknown export");
    send_opt(&mut s, 7, &name_req("nope"));
    assert_eq!(reply(&mut s).1, ERR_UNKNOWN, "GO unknown export");

    // INFO on a real export: NBD_INFO_EXPORT with size and flags, then ACK.
    send_opt(&mut s, 6, &name_req("r@p"));
    let mut saw_export = false;
    loop {
        let (o, t, d) = reply(&mut s);
        assert_eq!(o, 6);
        if t == ACK {
            break;
        }
        assert_eq!(t, INFO, "INFO reply type {t:#x}");
        if u16::from_be_bytes([d[0], d[1]]) == 0 {
            let size = u64::from_be_bytes(d[2..10].try_into().expect("8"));
            let flags = u16::from_be_bytes([d[10], d[11]]);
            assert_eq!(size, 2 << 20);
            assert_ne!(flags & 2, 0, "r@p not read-only in INFO");
            saw_export = true;
        }
    }
    assert!(saw_export, "INFO without NBD_INFO_EXPORT");

    // STRUCTURED_REPLY takes no payload.
    send_opt(&mut s, 8, b"zz");
    assert_eq!(
        reply(&mut s).1,
        ERR_INVALID,
        "STRUCTURED_REPLY with payload"
    );
    send_opt(&mut s, 8, b"");
    assert_eq!(reply(&mut s).1, ACK, "STRUCTURED_REPLY");

    // STARTTLS without TLS configured: an error, not a disconnect.
    send_opt(&mut s, 5, b"");
    let (_, t, _) = reply(&mut s);
    assert!(t & ERR != 0, "STARTTLS without TLS: {t:#x}");

    // ABORT: ACK (or a close), then the server is done with us.
    send_opt(&mut s, 2, b"");
    let mut b = [0u8; 20];
    if let Ok(()) = std::io::Read::read_exact(&mut s, &mut b) {
        assert_eq!(u32::from_be_bytes(b[12..16].try_into().expect("4")), ACK);
    }

    // EXPORT_NAME of an unknown export cannot return an error: hard close.
    let mut s = RawNbd::greet(gw.nbd_addr()).expect("greet");
    send_opt(&mut s, 1, b"nope");
    let mut buf = [0u8; 16];
    let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "EXPORT_NAME of an unknown export was answered");

    // After all that, normal clients are fine.
    assert_eq!(
        RawNbd::connect(gw.nbd_addr(), "r").expect("connect").size,
        2 << 20
    );
    assert!(gw.healthy());
}

/// Deleting a snapshot or a volume under an open connection: that
/// connection gets errors, never stale data and never a newer namesake's.
#[test]
fn delete_under_an_open_connection() {
    let gw = Gateway::start();
    gw.create_volume("v", "1M");
    let mut head = RawNbd::connect(gw.nbd_addr(), "v").expect("connect v");
    assert_eq!(head.write(1, 0, &[0x11u8; 4096]).expect("write"), 0);
    gw.snapshot("v", "s");
    let mut snap = RawNbd::connect(gw.nbd_addr(), "v@s").expect("connect v@s");
    assert!(snap
        .read(2, 0, 4096)
        .expect("read")
        .iter()
        .all(|&b| b == 0x11));

    gw.cli_ok(&["snapshot", "delete", "v", "s"]);
    assert!(
        snap.read(3, 0, 4096).is_err(),
        "deleted snapshot still readable"
    );

    gw.cli_ok(&["volume", "delete", "v"]);
    gw.create_volume("v", "1M");
    let mut fresh = RawNbd::connect(gw.nbd_addr(), "v").expect("connect new v");
    assert_eq!(fresh.write(1, 0, &[0x99u8; 4096]).expect("write"), 0);
    match head.read(4, 0, 4096) {
        Err(_) => {}
        Ok(d) => panic!("old connection to a deleted volume read {:#x}..", d[0]),
    }
    let err = head.write(5, 0, &[0x22u8; 4096]).expect("reply to write");
    assert_ne!(
        err, 0,
        "write through a deleted volume's connection succeeded"
    );
    assert!(fresh
        .read(6, 0, 4096)
        .expect("read")
        .iter()
        .all(|&b| b == 0x99));
}

/// `VmHWM` or `VmRSS` of a process, in bytes.
fn process_memory(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("a number of kB");
    kb << 10
}

#[test]
fn clients_that_never_read_their_replies_hold_bounded_memory() {
    let gw = Gateway::start();
    gw.create_volume("big", "64M");
    gw.create_volume("b", "16M");
    gw.qemu_io_ok("big", &["write -P 0x5a 0 64M"]);
    let pid = gw.pid().expect("gateway pid");
    let base = process_memory(pid, "VmRSS");
    // Three clients each ask for 12 reads of 32 MiB (384 MiB) and read
    // none of the replies: the gateway must not buffer them all.
    const READ: u32 = 32 << 20;
    const READS: u64 = 12;
    let mut hogs = Vec::new();
    for _ in 0..3 {
        let mut c = RawNbd::connect(gw.nbd_addr(), "big").expect("raw connect");
        for h in 0..READS {
            c.stream
                .write_all(&RawNbd::request(
                    NBD_CMD_READ,
                    h,
                    (h % 2) * u64::from(READ),
                    READ,
                ))
                .expect("send READ");
        }
        hogs.push(c);
    }
    // Until the gateway's memory stops growing (bounded wait).
    let mut last = 0;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(100));
        let now = process_memory(pid, "VmRSS");
        if now == last {
            break;
        }
        last = now;
    }
    let grown = process_memory(pid, "VmHWM").saturating_sub(base);
    eprintln!("gateway memory grew by {} MiB", grown >> 20);
    assert!(
        grown < 3 * (112 << 20),
        "the gateway grew by {} MiB for 3 clients that do not read their replies",
        grown >> 20
    );
    // Meanwhile other clients are served.
    other_client_round(&gw, 1);
    // Once the clients read, every reply is there (in any order) and right.
    for c in &mut hogs {
        let mut data = vec![0u8; READ as usize];
        let mut handles = Vec::new();
        for _ in 0..READS {
            let (err, handle) = c.read_simple_reply().expect("reply");
            assert_eq!(err, 0, "READ {handle} failed");
            std::io::Read::read_exact(&mut c.stream, &mut data).expect("reply data");
            assert!(
                data.iter().all(|&b| b == 0x5a),
                "READ {handle} returned wrong data"
            );
            handles.push(handle);
        }
        handles.sort_unstable();
        assert_eq!(handles, (0..READS).collect::<Vec<_>>());
    }
    other_client_round(&gw, 2);
}
