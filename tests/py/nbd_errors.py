"""Spec-correct errors, survival after each error, and deep pipelining.

Driven by tests/tests/nbdsh.rs with /usr/bin/python3 (python3-libnbd).
usage: nbd_errors.py HEAD_URI SNAP_URI
  HEAD_URI  read-write export of a volume of at least 64 MiB
  SNAP_URI  a read-only snapshot export of the same volume

libnbd's strict mode is turned off so that out-of-range and read-only
requests are really sent to the server instead of being refused locally.
Prints "ALL OK" at the end; any failed check raises (exit status 1).
"""
import os
import sys
import errno

import nbd

head_uri, snap_uri = sys.argv[1], sys.argv[2]
checks = 0


def check(cond, msg):
    global checks
    checks += 1
    if not cond:
        raise AssertionError(msg)


def errname(e):
    v = e.errno
    if isinstance(v, int):
        return errno.errorcode.get(v, str(v))
    return v


def expect_err(what, fn, allowed):
    """fn must fail with a server error whose errno is in `allowed`."""
    try:
        fn()
    except nbd.Error as e:
        name = errname(e)
        check(name in allowed, f"{what}: expected {allowed}, got {name} ({e.string})")
        print(f"ok   {what}: {name}")
        return name
    raise AssertionError(f"{what}: expected {allowed}, but the request succeeded")


def expect_ok_or(what, fn, allowed):
    """Unspecified by the protocol: success, or one of `allowed` — never a disconnect."""
    try:
        fn()
        print(f"ok   {what}: success")
    except nbd.Error as e:
        name = errname(e)
        check(name in allowed, f"{what}: expected success or {allowed}, got {name} ({e.string})")
        print(f"ok   {what}: {name}")


h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context("base:allocation")
h.connect_uri(head_uri)
size = h.get_size()
print(f"head size {size}")
check(size >= 64 << 20, f"head export too small: {size}")
check(not h.is_read_only(), "head export must be read-write")
for cap in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"]:
    check(getattr(h, cap)(), f"server does not advertise {cap}")
check(h.can_meta_context("base:allocation"), "base:allocation not negotiated")
check(h.get_structured_replies_negotiated(), "structured replies not negotiated")

pattern = bytes((i * 7 + 3) & 0xFF for i in range(65536))
h.pwrite(pattern, 0)


def alive(what):
    got = h.pread(len(pattern), 0)
    check(bytes(got) == pattern, f"after {what}: data at 0 changed or connection broken")


alive("first write")

# --- out of range -------------------------------------------------------
expect_err("read past end", lambda: h.pread(4096, size), {"EINVAL"})
alive("read past end")
expect_err("read straddling end", lambda: h.pread(8192, size - 4096), {"EINVAL"})
alive("read straddling end")
expect_err("write past end", lambda: h.pwrite(b"\x01" * 4096, size), {"ENOSPC"})
alive("write past end")
expect_err("write straddling end", lambda: h.pwrite(b"\x01" * 8192, size - 4096), {"ENOSPC"})
alive("write straddling end")
# The straddling write must not have been applied partially.
check(bytes(h.pread(4096, size - 4096)) != b"\x01" * 4096,
      "rejected straddling write was partially applied")
expect_err("trim past end", lambda: h.trim(4096, size), {"EINVAL"})
alive("trim past end")
expect_err("write_zeroes past end", lambda: h.zero(4096, size), {"ENOSPC"})
alive("write_zeroes past end")
expect_err("block_status past end",
           lambda: h.block_status(4096, size, lambda *a: 0), {"EINVAL"})
alive("block_status past end")
expect_err("cache past end", lambda: h.cache(4096, size), {"EINVAL"})
alive("cache past end")

# --- offset + length wrapping around 2^64 --------------------------------
big = (1 << 64) - 512
expect_err("read offset+len overflow", lambda: h.pread(4096, big), {"EINVAL"})
alive("read overflow")
expect_err("trim offset+len overflow", lambda: h.trim(4096, big), {"EINVAL"})
alive("trim overflow")
# A wrapped write is also "past the end": ENOSPC (nbdkit) or EINVAL.
expect_err("write offset+len overflow", lambda: h.pwrite(b"\x02" * 4096, big),
           {"EINVAL", "ENOSPC"})
alive("write overflow")
expect_err("write_zeroes offset+len overflow", lambda: h.zero(4096, big),
           {"EINVAL", "ENOSPC"})
alive("write_zeroes overflow")

# --- zero-length requests: unspecified, but never a disconnect ------------
expect_ok_or("zero-length read", lambda: h.pread(0, 4096), {"EINVAL"})
alive("zero-length read")
expect_ok_or("zero-length write", lambda: h.pwrite(b"", 4096), {"EINVAL", "ENOSPC"})
alive("zero-length write")
expect_ok_or("zero-length trim", lambda: h.trim(0, 4096), {"EINVAL"})
alive("zero-length trim")

# --- unknown flag -> EINVAL ------------------------------------------------
expect_err("read with unknown flag", lambda: h.pread(512, 0, flags=1 << 12), {"EINVAL"})
alive("unknown flag")

# --- flags that must be accepted ----------------------------------------
h.pwrite(b"\xfa" * 4096, 1 << 20, flags=nbd.CMD_FLAG_FUA)
check(bytes(h.pread(4096, 1 << 20)) == b"\xfa" * 4096, "FUA write not readable")
got = h.pread(4096, 1 << 20, flags=nbd.CMD_FLAG_FUA)
check(bytes(got) == b"\xfa" * 4096, "read with FUA flag returned wrong data")
print("ok   FUA on write and read")
h.zero(4096, 1 << 20, flags=nbd.CMD_FLAG_NO_HOLE)
check(bytes(h.pread(4096, 1 << 20)) == b"\0" * 4096, "zero NO_HOLE did not zero")
h.pwrite(b"\xfb" * 4096, 1 << 20)
expect_ok_or("write_zeroes FAST_ZERO", lambda: h.zero(4096, 1 << 20, flags=nbd.CMD_FLAG_FAST_ZERO),
             {"ENOTSUP"})
h.flush()
h.cache(4096, 0)
print("ok   NO_HOLE, FAST_ZERO, FLUSH, CACHE")

# --- unaligned I/O ------------------------------------------------------
h.pwrite(b"\x55" * 3000, 2 * (1 << 20) + 1000)
check(bytes(h.pread(3000, 2 * (1 << 20) + 1000)) == b"\x55" * 3000, "unaligned write/read")
check(bytes(h.pread(1000, 2 * (1 << 20))) == b"\0" * 1000, "bytes before unaligned write changed")
h.pwrite(b"\x66\x67", 2 * (1 << 20) + 4095)
check(bytes(h.pread(4, 2 * (1 << 20) + 4094)) == b"\0\x66\x67\0", "2-byte write across a 4 KiB edge")
print("ok   unaligned read/write")

# --- big requests (32 MiB payloads are normal) ----------------------------
big_buf = os.urandom(32 << 20)
h.pwrite(big_buf, 8 << 20)
check(bytes(h.pread(32 << 20, 8 << 20)) == big_buf, "32 MiB write/read mismatch")
print("ok   32 MiB write and read")

# --- structured reads: chunks cover the request exactly, holes read as zeros
h.trim(1 << 20, 4 << 20)
h.pwrite(b"\x5d" * 8192, (4 << 20) + 8192)
chunks = []


def on_chunk(subbuf, off, status, err):
    chunks.append((off, len(subbuf), status, bytes(subbuf)))
    return 0


got = h.pread_structured(1 << 20, 4 << 20, on_chunk)
want = bytearray(1 << 20)
want[8192:16384] = b"\x5d" * 8192
check(bytes(got) == bytes(want), "structured read returned wrong data")
covered = sorted((o, n) for o, n, _, _ in chunks)
pos = 4 << 20
for o, n in covered:
    check(o == pos and n > 0, f"structured read chunks overlap or leave gaps: {covered}")
    pos += n
check(pos == 5 << 20, f"structured read chunks do not cover the request: {covered}")
for o, n, st, data in chunks:
    if st == nbd.READ_HOLE:
        check(data == bytes(n), "hole chunk not zero")
print(f"ok   structured read: {len(chunks)} chunks, "
      f"{sum(1 for c in chunks if c[2] == nbd.READ_HOLE)} holes")

# --- many requests in flight --------------------------------------------
N = 128
blocks = {}
cookies = []
base = 48 << 20
for i in range(N):
    off = base + i * 4096 * 2  # leave gaps between blocks
    data = os.urandom(4096)
    blocks[off] = data
    b = nbd.Buffer.from_bytearray(bytearray(data))
    cookies.append((h.aio_pwrite(b, off), b))
max_in_flight = h.aio_in_flight()
check(max_in_flight >= 64, f"only {max_in_flight} writes in flight")
while h.aio_in_flight() > 0:
    h.poll(-1)
for c, _ in cookies:
    check(h.aio_command_completed(c), "aio write not completed")
reads = []
for off in blocks:
    b = nbd.Buffer(4096)
    reads.append((off, b, h.aio_pread(b, off)))
check(h.aio_in_flight() >= 64, "reads not in flight")
while h.aio_in_flight() > 0:
    h.poll(-1)
for off, b, c in reads:
    check(h.aio_command_completed(c), "aio read not completed")
    check(bytes(b.to_bytearray()) == blocks[off], f"aio read at {off} returned wrong data")
# Mixed: overwrite and read the gaps concurrently.
mixed = []
for i in range(N):
    off = base + i * 4096 * 2
    nb = nbd.Buffer.from_bytearray(bytearray(b"\x77" * 4096))
    mixed.append(("w", off, nb, h.aio_pwrite(nb, off + 4096)))
    rb = nbd.Buffer(4096)
    mixed.append(("r", off, rb, h.aio_pread(rb, off)))
while h.aio_in_flight() > 0:
    h.poll(-1)
for kind, off, b, c in mixed:
    check(h.aio_command_completed(c), "mixed aio not completed")
    if kind == "r":
        check(bytes(b.to_bytearray()) == blocks[off], f"mixed aio read at {off} wrong")
check(bytes(h.pread(4096, base + 4096)) == b"\x77" * 4096, "mixed aio write missing")
print(f"ok   {N} aio writes + {N} aio reads + {2 * N} mixed in flight (max {max_in_flight})")
h.flush()

# --- read-only snapshot export ------------------------------------------
s = nbd.NBD()
s.set_strict_mode(0)
s.connect_uri(snap_uri)
check(s.is_read_only(), "snapshot export does not advertise READ_ONLY")
snap0 = bytes(s.pread(4096, 0))
expect_err("write on snapshot", lambda: s.pwrite(b"\x09" * 4096, 0), {"EPERM"})
expect_err("write FUA on snapshot",
           lambda: s.pwrite(b"\x09" * 4096, 0, flags=nbd.CMD_FLAG_FUA), {"EPERM"})
expect_err("trim on snapshot", lambda: s.trim(4096, 0), {"EPERM"})
expect_err("write_zeroes on snapshot", lambda: s.zero(4096, 0), {"EPERM"})
check(bytes(s.pread(4096, 0)) == snap0, "snapshot changed after refused writes")
expect_err("read past end on snapshot", lambda: s.pread(4096, s.get_size()), {"EINVAL"})
check(bytes(s.pread(4096, 0)) == snap0, "snapshot connection broken after errors")
print("ok   snapshot export refuses writes with EPERM")
s.shutdown()

alive("everything")
h.shutdown()
print(f"ALL OK ({checks} checks)")

# --- multi-conn: a flush on one connection makes writes visible on another --
a = nbd.NBD()
a.connect_uri(head_uri)
b = nbd.NBD()
b.connect_uri(head_uri)
for i in range(16):
    data = os.urandom(65536)
    off = (40 << 20) + i * 65536
    a.pwrite(data, off)
    a.flush()
    if bytes(b.pread(65536, off)) != data:
        raise AssertionError("write flushed on one connection not visible on another")
    b.pwrite(data[::-1], off, flags=nbd.CMD_FLAG_FUA)
    if bytes(a.pread(65536, off)) != data[::-1]:
        raise AssertionError("FUA write on one connection not visible on another")
a.shutdown()
b.shutdown()
print("ok   multi-conn visibility after FLUSH / FUA")
print("ALL OK (multi-conn)")
