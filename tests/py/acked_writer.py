"""Acknowledged writes survive a shutdown in the middle of a write stream.

usage: acked_writer.py write URI ACKFILE   stream 4 KiB writes (32 in flight),
                                           print READY, record every acked
                                           block index in ACKFILE until the
                                           server goes away (at most 60 s)
       acked_writer.py check URI ACKFILE   every acked block holds its data;
                                           every other block is its data or
                                           zeros, never anything else
Block i holds i as 8 bytes big-endian, then byte (i % 251) + 1 repeated.
"""
import sys
import time

import nbd

BS = 4096


def block(i):
    return i.to_bytes(8, "big") + bytes([(i % 251) + 1]) * (BS - 8)


mode, uri, ackfile = sys.argv[1:4]
h = nbd.NBD()
h.connect_uri(uri)
nblocks = h.get_size() // BS

if mode == "write":
    acked = []
    pending = {}
    i = 0
    ready = False
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and (i < nblocks or pending):
            while len(pending) < 32 and i < nblocks:
                buf = nbd.Buffer.from_bytearray(bytearray(block(i)))
                pending[h.aio_pwrite(buf, i * BS)] = (i, buf)
                i += 1
            h.poll(-1)
            for c in list(pending):
                if h.aio_command_completed(c):
                    acked.append(pending.pop(c)[0])
            if not ready and len(acked) >= 256:
                print("READY", flush=True)
                ready = True
    except nbd.Error as e:
        print(f"stopped: {e.string}", flush=True)
    with open(ackfile, "w") as f:
        f.write("\n".join(map(str, acked)))
    print(f"acked {len(acked)} of {i} issued", flush=True)
elif mode == "check":
    acked = set(int(x) for x in open(ackfile).read().split())
    zero = bytes(BS)
    chunk = 256
    bad = []
    for start in range(0, nblocks, chunk):
        n = min(chunk, nblocks - start)
        data = bytes(h.pread(n * BS, start * BS))
        for k in range(n):
            idx = start + k
            got = data[k * BS:(k + 1) * BS]
            if got == block(idx):
                continue
            if idx in acked or got != zero:
                bad.append(idx)
    if bad:
        raise SystemExit(f"{len(bad)} bad blocks, first {bad[:10]} (acked {len(acked)})")
    print(f"ALL OK: {len(acked)} acked blocks intact")
