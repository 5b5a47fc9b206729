"""Step-by-step handshake: LIST, INFO, LIST_META_CONTEXT, GO, ABORT.

usage: opt_mode.py URI_WITHOUT_EXPORT VOLUME SNAPSHOT VOLUME_SIZE
Prints "ALL OK" at the end; any failed check raises.
"""
import sys

import nbd

base, vol, snap, vol_size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
point = f"{vol}@{snap}"

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(base)
assert h.aio_is_negotiating(), "not in option mode after connect"

names = []
h.opt_list(lambda name, desc: names.append(name) or 0)
print("exports:", names)
assert vol in names, f"{vol} missing from NBD_OPT_LIST {names}"
assert point in names, f"{point} missing from NBD_OPT_LIST {names}"

h.set_export_name(vol)
h.opt_info()
assert h.get_size() == vol_size, f"opt_info size {h.get_size()} != {vol_size}"
assert not h.is_read_only(), "head reported read-only"
print(f"ok   opt_info {vol}: {h.get_size()}")

h.set_export_name(point)
h.opt_info()
assert h.is_read_only(), f"{point} not read-only in opt_info"
print(f"ok   opt_info {point}: read-only")

h.set_export_name("no-such-volume")
try:
    h.opt_info()
    raise AssertionError("opt_info on an unknown export succeeded")
except nbd.Error as e:
    print(f"ok   unknown export refused: {e.string}")
assert h.aio_is_negotiating(), "connection left option mode after an error"

ctx = []
h.set_export_name(vol)
h.opt_list_meta_context(lambda name: ctx.append(name) or 0)
print("meta contexts:", ctx)
assert "base:allocation" in ctx, f"base:allocation not listed: {ctx}"

# Unknown namespaces are ignored, not errors.
h.add_meta_context("nosuchns:whatever")
h.add_meta_context("base:allocation")
got = []
h.opt_list_meta_context(lambda name: got.append(name) or 0)
assert got == ["base:allocation"], f"query with unknown namespace returned {got}"
print("ok   list_meta_context")

h.opt_go()
assert h.aio_is_ready(), "not ready after opt_go"
assert h.can_meta_context("base:allocation"), "base:allocation not active after go"
ext = []
h.block_status(1 << 20, 0, lambda meta, off, entries, err: ext.append((meta, entries)) or 0)
assert ext and ext[0][0] == "base:allocation", f"block status: {ext}"
h.pread(512, 0)
h.shutdown()
print("ok   opt_go + block_status")

# ABORT ends negotiation cleanly.
a = nbd.NBD()
a.set_opt_mode(True)
a.connect_uri(base)
a.opt_abort()
assert a.aio_is_closed(), "not closed after opt_abort"
print("ok   opt_abort")

# A plain connect to an unknown export fails.
u = nbd.NBD()
try:
    u.connect_uri(base.rstrip("/") + "/no-such-volume")
    raise AssertionError("connect to unknown export succeeded")
except nbd.Error as e:
    print(f"ok   connect unknown export: {e.string}")

print("ALL OK")
