"""Keep many large writes in flight until killed (or for at most 60 s).

usage: aio_writer.py URI
Prints "READY" once the first writes completed; the test then SIGKILLs it,
usually in the middle of a 1 MiB payload.
"""
import sys
import time

import nbd

h = nbd.NBD()
h.connect_uri(sys.argv[1])
size = h.get_size()
chunk = 1 << 20
bufs = [nbd.Buffer.from_bytearray(bytearray([i & 0xFF]) * chunk) for i in range(16)]
deadline = time.monotonic() + 60
n = 0
ready = False
while time.monotonic() < deadline:
    while h.aio_in_flight() < 16:
        h.aio_pwrite(bufs[n % 16], (n * chunk) % (size - chunk + 1))
        n += 1
    h.poll(-1)
    if not ready and n > 32:
        print("READY", flush=True)
        ready = True
print("TIMEOUT", flush=True)
sys.exit(2)
