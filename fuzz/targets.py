"""The fuzz targets: each takes one byte string and raises ``Finding`` on a defect.

* ``api``: the bytes choose a VM configuration and then a sequence of calls of the stable
  API (add_memslot, delete_memslot, vcpu, fault, fault_batch, the zaps, stats, walk,
  lookup, audit, and the kernels) with hostile arguments -- out-of-range and wrong-typed
  ints, numpy scalars and their subclasses, masked / byte-swapped / strided / read-only /
  lying-subclass arrays.  Engine (``spte_fast``) and reference (``spte_fast.reference``)
  run in lock step: each call must succeed in both with equal results or be refused by
  both with a boundary error (TypeError, ValueError, the SpteError family); after every
  call both pass ``audit()`` and their states compare equal (stats, warnings, memslots,
  vCPU counts, the walk of every gfn touched so far).
* ``trace``: the bytes are a binary trace (plain, gzip, xz, or a corrupt/cut compressed
  stream) for ``scan_trace``/``iter_records``, or a lackey log for ``convert_lackey``;
  results are checked against slow oracles, failures must be ``TraceError`` and must
  leave no output file or temporary behind.
* ``cli``: the bytes choose an argv from a vocabulary of options and hostile values
  (paths to a log, links to it, directories, missing files); ``cli.main`` must return a
  status (never raise), print one ``spte-fast: error:`` line for status 2, and leave every
  file that existed before as it was (unless it was a successful command's output).
"""
import contextlib
import gzip
import io
import lzma
import os
import re
import tempfile

import numpy as np

from .bytes_reader import Bytes


class Finding(AssertionError):
    """A defect found by a target (a crash is the other kind)."""


def _read(path, opener=open):
    with opener(path, "rb") as f:
        return f.read()


# ---------------------------------------------------------------------------------------
# API
# ---------------------------------------------------------------------------------------

def _impls():
    import spte_fast
    import spte_fast.reference
    return spte_fast, spte_fast.reference


class NpIntSub(np.int64):
    def __index__(self):
        raise Finding("a numpy integer subclass's __index__ ran")

    def __int__(self):
        raise Finding("a numpy integer subclass's __int__ ran")


class IntSub(int):
    def __index__(self):
        raise Finding("an int subclass's __index__ ran")

    def __int__(self):
        raise Finding("an int subclass's __int__ ran")


class LyingShape(np.ndarray):
    shape = property(lambda self: (1 << 20,))


class LyingMax(np.ndarray):
    def max(self, *a, **k):
        return 0

    def min(self, *a, **k):
        return 0


def _boundary():
    """What a call may raise: the boundary's TypeError / ValueError (CacheConfigError is
    one) and OutOfMemory.  AuditError and anything else is a finding."""
    from spte_fast.errors import OutOfMemory
    return (TypeError, ValueError, OutOfMemory)


def _int_value(r, hint):
    """A hostile int argument: mostly near ``hint`` and the interesting boundaries."""
    base = r.pick([hint, 0, 1, 5, 511, 512, 513, (1 << 18) - 1, 1 << 18, (1 << 27) + 3,
                   (1 << 36) - 1, 1 << 36, (1 << 45) - 1, 1 << 45, (1 << 40) - 1, 1 << 40,
                   (1 << 64) - 1, 1 << 64, -1, hint + 1, hint - 1])
    if r.below(4):
        base = hint + r.below(1024) if r.flag() else base
    kind = r.below(16)
    if kind < 10:
        return base
    if kind == 10:
        return np.int64(base) if -(1 << 63) <= base < 1 << 63 else base
    if kind == 11:
        return np.uint16(base & 0xFFFF)
    if kind == 12:
        return np.bool_(base & 1)
    if kind == 13:
        return IntSub(base)
    if kind == 14:
        return NpIntSub(base & 0xFFFF)
    return r.pick([1.0, None, "3", np.float32(1), np.array(3), np.array([3]), b"\x03"])


def _int_array(r, n, hi):
    """A hostile integer array of n entries below ``hi`` (or deliberately not)."""
    vals = [r.below(hi) for _ in range(n)]
    if r.below(8) == 0 and n:
        vals[r.below(n)] = r.pick([hi, hi + 7, 1 << 40, 255])
    dt = r.pick([np.uint64, np.int64, np.uint32, np.int16, np.uint8, ">u8", "<i4", ">i2"])
    try:
        a = np.array(vals, dtype=dt)
    except OverflowError:
        a = np.array(vals, dtype=np.uint64)
    if r.below(10) == 0 and n:
        a = -a.astype(np.int64) if r.flag() else a.astype(np.float64)
    k = r.below(12)
    if k == 0:
        a = np.ma.array(a, mask=[r.flag() for _ in range(n)])
    elif k == 1:
        a = a.view(LyingMax)
    elif k == 2:
        b = np.repeat(a, 2)
        a = b[::2]
    elif k == 3:
        a = a[::-1]
    elif k == 4:
        a = a.copy()
        a.flags.writeable = False
    elif k == 5:
        a = a.reshape(1, -1)
    elif k == 6:
        a = list(vals)
    return a


def _out_array(r, n):
    k = r.below(10)
    if k == 0:
        return None
    if k == 1:
        return np.zeros(n + r.pick([1, -1]) if n else 1, dtype=np.int8)
    if k == 2:
        return np.zeros(n, dtype=r.pick([np.uint8, np.int16, ">i2"]))
    if k == 3:
        return np.ma.array(np.zeros(n, np.int8), mask=False)
    if k == 4:
        # Both implementations judge it by its buffer: length 1 (fine when n == 1).
        return np.zeros(1, np.int8).view(LyingShape)
    if k == 5:
        a = np.zeros(n, np.int8)
        a.flags.writeable = False
        return a
    if k == 6:
        return np.full(2 * n + 1, 7, dtype=np.int8)[::-2][:n]
    return np.zeros(n, np.int8)


def _u64_array(r, shape):
    k = r.below(10)
    a = np.zeros(shape, dtype=np.uint64)
    if k == 0:
        return a.astype(">u8")
    if k == 1:
        return np.ma.array(a, mask=False)
    if k == 2:
        a.flags.writeable = False
        return a
    if k == 3:
        return np.zeros(shape, dtype=np.int64)
    if k == 4:
        return np.zeros(tuple(shape) + (2,), dtype=np.uint64)[..., 0]    # strided
    return a


class HostLimit(Exception):
    """The host could not give the engine the memory (a huge memslot's host page flags:
    calloc of one byte per page, issue 14 item 15, the lead's); the reference keeps them
    sparse.  The input ends there: it is not a finding of this target."""


class KnownIssue(Exception):
    """An input that reaches a defect already filed and owned elsewhere; the input ends."""


SKIPPED = {"host-limit": 0}


def _outcome(fn):
    from spte_fast.errors import OutOfMemory
    try:
        return ("ok", fn())
    except _boundary() as e:
        return ("refused", type(e).__name__, str(e))
    except MemoryError as e:
        if isinstance(e, OutOfMemory):
            raise
        raise HostLimit(str(e)) from None


def _plain(v):
    """Results as comparable plain data."""
    if isinstance(v, np.ndarray):
        return ("array", v.dtype.str, v.shape, v.tolist())
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    return v


def _state(vm, gfns):
    return {"stats": vm.stats, "warnings": vm.warnings_by_reason, "memslots": vm.memslots,
            "generation": vm.mmio_generation, "vcpus": [v.stats for v in vm.vcpus],
            "walks": {g: vm.walk(g) for g in sorted(gfns)}}


class _Pair:
    """Engine and reference built and driven alike."""

    def __init__(self, r):
        self.objs = []
        kind = r.below(4)
        nonpresent = r.pick([1 << 63, 0])
        root_level = r.pick([4, 4, 5])
        kw = dict(root_level=root_level, max_level=1 + r.below(3),
                  max_pt_pages=r.pick([4, 8, 16, 64, 256]), nx_huge_pages=r.below(4) == 0)
        for impl in _impls():
            L = impl.SpteLayout
            layout = (L.ept(ad=True, nonpresent_value=nonpresent) if kind == 0 else
                      L.ept(ad=False, nonpresent_value=nonpresent) if kind == 1 else
                      L.ept(exec_only=True, nonpresent_value=nonpresent) if kind == 2 else
                      L.npt(nonpresent_value=nonpresent))
            self.objs.append((impl, impl.Vm(layout, **kw)))
        self.gfn_limit = 1 << (9 * root_level)
        self.touched = set()

    def call(self, what, fn, check_state=True):
        """fn(impl, vm) in both; the outcomes must agree, then audit and compare."""
        results = [_outcome(lambda: fn(impl, vm)) for impl, vm in self.objs]
        (a, b) = results
        if a[0] != b[0]:
            raise Finding(f"{what}: engine {a[:2]} but reference {b[:2]}: {a[-1]!r} / {b[-1]!r}")
        if a[0] == "ok" and _plain(a[1]) != _plain(b[1]):
            raise Finding(f"{what}: results differ: {_plain(a[1])!r} != {_plain(b[1])!r}")
        if check_state:
            self.check()
        return results

    def check(self):
        states = []
        for impl, vm in self.objs:
            vm.audit()
            states.append(_plain(_state(vm, self.touched)))
        if states[0] != states[1]:
            diff = {k for k in states[0] if states[0][k] != states[1].get(k)}
            raise Finding(f"states differ in {sorted(diff)}")


_KERNELS = ("fill_pages", "scan_present", "count_present", "cmpxchg", "xchg", "atomic_or",
            "atomic_and_not")


def _kernel_op(r, pair):
    name = r.pick(_KERNELS)
    shape = (512,) if name == "scan_present" else (r.below(3), 512) if name in (
        "fill_pages", "count_present") else (r.below(6),)
    seed = r.uint(4)
    vals = [_int_value(r, 1) for _ in range(3)]

    def run(impl, vm):
        a = _u64_array(Bytes(seed.to_bytes(4, "big")), shape)
        if name in ("fill_pages",):
            getattr(impl, name)(a, vals[0])
        elif name in ("scan_present", "count_present"):
            return getattr(impl, name)(a, vals[0])
        elif name == "cmpxchg":
            out = impl.cmpxchg(a, vals[0], vals[1], vals[2])
            return out, np.asarray(a).tolist()
        else:
            out = getattr(impl, name)(a, vals[0], vals[1])
            return out, np.asarray(a).tolist()
        return np.asarray(a).tolist()
    pair.call(name, run, check_state=False)


def api(data):
    """The API target (see the module's docstring)."""
    try:
        _api(data)
    except HostLimit:
        SKIPPED["host-limit"] += 1
    except KnownIssue as e:
        SKIPPED[str(e)] += 1


def _api(data):
    r = Bytes(data)
    pair = _Pair(r)
    pair.check()
    for _ in range(48):
        if r.remaining() <= 0:
            break
        op = r.below(19)
        vcpu_i = r.below(4)

        def vcpu(vm, i=vcpu_i):
            vs = vm.vcpus
            if not vs:
                raise ValueError("no vCPU yet")          # the same refusal in both
            return vs[i % len(vs)]
        if op == 0:
            args = [_int_value(r, r.below(1 << 12)), _int_value(r, 1 + r.below(4096)),
                    _int_value(r, r.pick([0, 1 << 20, (1 << 20) + 1]) + r.below(1 << 12)),
                    r.flag()]
            pair.call("add_memslot", lambda impl, vm: vm.add_memslot(*args))
        elif op == 1:
            sid = _int_value(r, r.below(4))
            pair.call("delete_memslot", lambda impl, vm: vm.delete_memslot(sid))
        elif op == 2:
            pair.call("vcpu", lambda impl, vm: len(vm.vcpus) < 4 and vm.vcpu() and None)
        elif op in (3, 4, 5):
            g = _int_value(r, r.below(1 << 13))
            w, x = r.flag(), r.below(4) == 0
            if isinstance(g, int) and 0 <= g < pair.gfn_limit:
                pair.touched.add(g)
            pair.call("fault", lambda impl, vm: vcpu(vm).fault(g, write=w, exec=x))
        elif op == 6:
            n = r.below(24)
            gl = r.uint(3)
            acc_seed, out_seed, g_seed = r.uint(3), r.uint(2), r.uint(4)

            def batch(impl, vm):
                rg = Bytes(g_seed.to_bytes(4, "big") + gl.to_bytes(3, "big"))
                gfns = _int_array(rg, n, 1 << 13)
                acc = None if acc_seed & 1 else _int_array(Bytes(acc_seed.to_bytes(3, "big")), n, 4)
                out = _out_array(Bytes(out_seed.to_bytes(2, "big")), n)
                res = vcpu(vm).fault_batch(gfns, access=acc, out=out)
                return res, None if out is None else np.asarray(out).tolist()
            for v in np.asarray(_int_array(Bytes(g_seed.to_bytes(4, "big") + gl.to_bytes(3, "big")),
                                           n, 1 << 13), dtype=object).ravel().tolist():
                if isinstance(v, int) and 0 <= v < pair.gfn_limit:
                    pair.touched.add(v)
            pair.call("fault_batch", batch)
        elif op == 7:
            s, e = _int_value(r, r.below(1 << 13)), _int_value(r, r.below(1 << 14))
            pair.call("zap_gfn_range", lambda impl, vm: vm.zap_gfn_range(s, e))
        elif op == 8:
            pair.call("zap_all", lambda impl, vm: vm.zap_all())
        elif op == 9:
            g, lv = _int_value(r, r.below(1 << 13)), _int_value(r, 1 + r.below(4))
            pair.call("zap_sp", lambda impl, vm: vm.zap_sp(g, lv))
        elif op == 10:
            g, lv = _int_value(r, r.below(1 << 13)), _int_value(r, 1 + r.below(5))
            pair.call("zap_spte_atomic", lambda impl, vm: vm.zap_spte_atomic(g, lv))
        elif op == 11:
            g = _int_value(r, r.below(1 << 13))
            pair.call("walk/lookup", lambda impl, vm: (vm.walk(g), vm.lookup(g)))
        elif op == 12:                                  # the hardware view (issue 10)
            g, k = _int_value(r, r.below(1 << 13)), r.below(3)
            if isinstance(g, int) and 0 <= g < pair.gfn_limit:
                pair.touched.add(g)
            pair.call("access", lambda impl, vm: vcpu(vm).access(g, write=k == 1, exec=k == 2))
        elif op == 13:
            g, ec = _int_value(r, r.below(1 << 13)), _int_value(r, r.below(32))
            if isinstance(g, int) and 0 <= g < pair.gfn_limit:
                pair.touched.add(g)
            # An RSVD fault on a gfn without an MMIO SPTE answers RETRY for ever in a
            # batch, never in one fault: fault() is safe with any code.
            pair.call("fault(error_code)", lambda impl, vm: vcpu(vm).fault(g, error_code=ec))
        elif op == 14:
            pair.call("zap_all_fast", lambda impl, vm: vm.zap_all_fast())
        elif op == 15:
            sid, to = _int_value(r, r.below(4)), _int_value(r, r.below(1 << 13))
            pair.call("move_memslot", lambda impl, vm: vm.move_memslot(sid, to))
        elif op == 16:
            s, e, fl = _int_value(r, r.below(1 << 13)), _int_value(r, r.below(1 << 14)), r.flag()
            pair.call("age_gfn_range", lambda impl, vm: (vm.age_gfn_range(s, e, fl),
                                                         vm.test_age_gfn(s, e)))
        elif r.below(2):
            _kernel_op(r, pair)
        else:
            _dirty_op(r, pair)


def _dirty_op(r, pair):
    """Issue 11's calls with hostile arguments: dirty logging, notifiers, huge pages."""
    k = r.below(8)
    sid = _int_value(r, r.below(4))
    if k == 0:
        on = r.pick([True, False, 1, 0, 2.0, None])
        pair.call("set_memslot_flags", lambda impl, vm: vm.set_memslot_flags(sid, dirty_log=on))
    elif k == 1:
        pair.call("get_dirty_log", lambda impl, vm: vm.get_dirty_log(sid).tolist())
    elif k == 2:
        first, num = _int_value(r, r.below(4) * 64 + r.pick([0, 0, 1])), _int_value(r, r.below(300))
        words = [r.uint(8) for _ in range(r.below(6))]
        pair.call("clear_dirty_log", lambda impl, vm: vm.clear_dirty_log(
            sid, first, num, np.array(words, dtype=np.uint64)))
    elif k == 3:
        s, e, lv = _int_value(r, r.below(1 << 13)), _int_value(r, r.below(1 << 14)), \
            _int_value(r, 1 + r.below(3))
        pair.call("split_huge_pages", lambda impl, vm: vm.split_huge_pages(s, e, lv))
    elif k == 4:
        pair.call("recover_nx_huge_pages", lambda impl, vm: vm.recover_nx_huge_pages())
    elif k == 5:
        on = r.pick([True, False, "1"])
        pair.call("set_nx_huge_pages", lambda impl, vm: vm.set_nx_huge_pages(on))
    elif k == 6:
        s, e = _int_value(r, r.below(1 << 13)), _int_value(r, r.below(1 << 14))
        pair.call("unmap_gfn_range", lambda impl, vm: vm.unmap_gfn_range(s, e))
    else:
        g, lv = _int_value(r, r.below(1 << 13)), _int_value(r, 1 + r.below(4))
        pair.call("write_protect_gfn", lambda impl, vm: vm.write_protect_gfn(g, lv))


# ---------------------------------------------------------------------------------------
# Trace readers and the lackey converter
# ---------------------------------------------------------------------------------------

_LACKEY_LINE = re.compile(rb"(I | L| S| M) ([0-9a-fA-F]{1,16}),([0-9]+)")
_LACKEY_KIND = {b"I ": (2,), b" L": (0,), b" S": (1,), b" M": (0, 1)}  # M: load, store
_TEMPLATES = [b"I  04001000,3", b" L 1ffefff8a0,8", b" S 0804a010,4", b" M 0804a018,4",
              b"==42== Lackey", b"", b"I  ffffffffffffffff,1", b" L 0,0", b"I  1234,",
              b" X 1,1", b"I  12345678901234567,4", b"I 1,1", b" L 1,2,3"]


def _lackey_oracle(text, tlb):
    """The records of a lackey log, a line at a time; None if any line is invalid."""
    out = []
    for line in text.split(b"\n"):
        if not line or line.startswith(b"=="):
            continue
        m = _LACKEY_LINE.fullmatch(line)
        if not m:
            return None
        for kind in _LACKEY_KIND[m.group(1)]:
            rec = (int(m.group(2), 16) >> 12) << 2 | kind
            if not out or out[-1] != rec:
                out.append(rec)
    if tlb is None:
        return out
    fifo, kept = [], []
    for rec in out:
        if rec in fifo:
            continue
        kept.append(rec)
        fifo.append(rec)
        if len(fifo) > tlb:
            fifo.pop(0)
    return kept


def _compress(r, raw, suffix):
    if suffix == ".gz":
        blob = gzip.compress(raw, mtime=0)
    elif suffix == ".xz":
        blob = lzma.compress(raw)
    else:
        return raw, raw
    k = r.below(8)
    if k == 0:
        bad = blob[:r.below(len(blob) + 1)]                        # cut
    elif k == 1 and blob:
        i = r.below(len(blob))
        bad = blob[:i] + bytes([blob[i] ^ (1 + r.below(255))]) + blob[i + 1:]
    elif k == 2:
        bad = raw                                                  # not compressed at all
    else:
        return blob, raw
    try:        # what the standard library makes of it is the expected content, if any
        return bad, (gzip.decompress(bad) if suffix == ".gz" else lzma.decompress(bad))
    except (OSError, EOFError, lzma.LZMAError, ValueError, __import__("zlib").error):
        return bad, None


def _intact(content):
    return content is not None


def trace(data):
    """The trace target (see the module's docstring)."""
    from spte_fast.sim import trace as tr
    r = Bytes(data)
    mode, suffix = r.below(3), r.pick(["", ".gz", ".xz"])
    with tempfile.TemporaryDirectory(prefix="spte-fuzz-") as d:
        if mode < 2:                                   # a binary trace
            raw = r.rest() if r.flag() else b"".join(
                (int.from_bytes(r.take(2), "little") << 2 | r.below(4)).to_bytes(8, "little")
                for _ in range(r.below(64)))
            blob, content = _compress(r, raw, suffix)
            intact = content is not None
            raw = raw if content is None else content
            path = os.path.join(d, "t.bin" + suffix)
            with open(path, "wb") as f:
                f.write(blob)
            limit = r.pick([1 << 36, 1 << 45, 1 << 10])
            chunk = r.pick([1, 3, 1 << 20])
            try:
                with tempfile.TemporaryFile() as spool:
                    s = tr.scan_trace(path, limit, levels=4, chunk=chunk, spool=spool,
                                      format="binary")
                    back = np.concatenate(list(tr.read_spool(spool, chunk)) or [np.zeros(0, np.uint64)])
            except tr.TraceError:
                recs = np.frombuffer(raw[:len(raw) // 8 * 8], dtype="<u8")
                if intact and len(raw) % 8 == 0 and not ((recs & 3) == 3).any() and \
                        not ((recs >> 2) >= limit).any():
                    raise Finding("a valid trace was refused") from None
                return
            if not intact or len(raw) % 8:
                raise Finding("a corrupt or truncated trace was accepted")
            recs = np.frombuffer(raw, dtype="<u8")
            if ((recs & 3) == 3).any() or ((recs >> 2) >= limit).any():
                raise Finding("an invalid record was accepted")
            if s.records != recs.size or not np.array_equal(back, recs) or \
                    s.max_page != (int((recs >> 2).max()) if recs.size else -1):
                raise Finding(f"scan_trace summary wrong: {s}")
            pages = np.unique(recs >> 2)
            expect = tuple(int(np.unique(pages >> (9 * (lv + 1))).size) for lv in range(4))
            if s.regions != expect:
                raise Finding(f"regions {s.regions} != {expect}")
            return
        # a lackey log: template lines and raw bytes
        parts = []
        for _ in range(r.below(40)):
            parts.append(r.pick(_TEMPLATES) if r.below(4) else r.take(r.below(24)))
        text = b"\n".join(parts) + (b"\n" if r.flag() else b"")
        blob, content = _compress(r, text, suffix)
        intact = content is not None
        text = text if content is None else content
        src = os.path.join(d, "l.log" + suffix)
        with open(src, "wb") as f:
            f.write(blob)
        dst = os.path.join(d, "o.bin" + r.pick(["", ".gz", ".xz"]))
        if r.flag():
            with open(dst, "wb") as f:
                f.write(b"old")
        before = _read(dst) if os.path.exists(dst) else None
        tlb = r.pick([None, 1, 2, 4])
        block = r.pick([tr.LACKEY_BLOCK, 7, 64])
        want = _lackey_oracle(text, tlb) if intact else None
        try:
            tr.convert_lackey(src, dst, tlb=tlb, block=block)
        except tr.TraceError:
            if want is not None:
                raise Finding("a valid lackey log was refused") from None
            now = _read(dst) if os.path.exists(dst) else None
            if now != before:
                raise Finding("a failed conversion changed its output file")
            if [n for n in os.listdir(d) if n.endswith(".part")]:
                raise Finding("a failed conversion left a temporary file")
            return
        if want is None:
            raise Finding("an invalid lackey log was converted")
        got = np.frombuffer(_read(dst, tr.open_compressed), dtype="<u8").tolist()
        if got != want:
            raise Finding(f"converted records differ: {got[:8]} != {want[:8]}")


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------

_WORDS = ["simulate", "trace", "convert", "demo", "--workload", "--trace", "--faults",
          "--guest-size", "--layout", "--root-level", "--max-level", "--vcpus", "--zap-every",
          "--zap-all-every", "--seed", "--chunk", "--json", "--plot", "-o", "--output",
          "--tlb", "--bogus", "-h"]
_VALUES = ["0", "1", "-1", "7", "100", "1k", "10M", "1_000", "_", "4G", "4096", "5000",
           "16P", "4P", "64K", "2M", "x", "", "1e3", "256", "257", "4", "5", "3", "ept",
           "npt", "ept-noad", "4k", "2m", "1g", "seq", "random", "zipf", "hotcold", "huge",
           "mixed", "99999999999999999999", "\x00", "é", "LOG", "LINK", "HARD", "DIR",
           "NOPE", "OUT", "OUT.gz", "OUT.xz", "TRACE", "plot.txt", "noext", "DIR/x.bin",
           "NOPE/x.bin"]
_LOG = b"==1== Lackey\nI  04001000,3\n L 1ffefff8a0,8\n S 0804a010,4\n"


def _snapshot(d):
    out = {}
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        st = os.lstat(p)
        content = _read(p) if os.path.isfile(p) and not os.path.islink(p) else None
        out[name] = (st.st_ino, st.st_mode, content)
    return out


def cli(data):
    """The CLI target (see the module's docstring)."""
    from spte_fast import cli as c
    r = Bytes(data)
    with tempfile.TemporaryDirectory(prefix="spte-fuzz-") as d:
        paths = {"LOG": os.path.join(d, "l.log"), "LINK": os.path.join(d, "link"),
                 "HARD": os.path.join(d, "hard"), "DIR": os.path.join(d, "dir"),
                 "NOPE": os.path.join(d, "nope"), "OUT": os.path.join(d, "out.bin"),
                 "OUT.gz": os.path.join(d, "out.bin.gz"), "OUT.xz": os.path.join(d, "out.xz"),
                 "TRACE": os.path.join(d, "t.bin")}
        with open(paths["LOG"], "wb") as f:
            f.write(_LOG)
        os.symlink(paths["LOG"], paths["LINK"])
        os.link(paths["LOG"], paths["HARD"])
        os.mkdir(paths["DIR"])
        np.arange(0, 4000, 4, dtype="<u8").tofile(paths["TRACE"])
        argv = []
        for _ in range(r.below(12)):
            w = r.pick(_WORDS) if r.flag() else r.pick(_VALUES)
            for key, p in paths.items():
                if w == key or w.startswith(key + "/"):
                    w = p + w[len(key):]
                    break
            argv.append(w)
        if "simulate" in argv[:1]:
            argv += ["--faults", "100"] if "--faults" not in argv else []
            if "--plot" in argv:
                argv = [a for a in argv if a != "--plot"]      # matplotlib: too slow here
        before = _snapshot(d)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = c.main(argv)
            except SystemExit as e:                  # --help / -h only
                if e.code not in (0, None) or not ({"-h", "--help"} & set(argv)):
                    raise Finding(f"{argv}: SystemExit({e.code})") from None
                return
        if rc not in (0, 1, 2):
            raise Finding(f"{argv}: status {rc!r}")
        lines = err.getvalue().splitlines()
        # status 2: one error line, after the command's usage lines when the command line
        # itself was wrong
        usage_ok = not lines[:-1] or (lines[0].startswith("usage: spte-fast") and
                                      all(x.startswith(" ") for x in lines[1:-1]))
        if rc == 2 and (not lines or not usage_ok or
                        not lines[-1].startswith("spte-fast: error: ")):
            raise Finding(f"{argv}: status 2 with stderr {err.getvalue()!r}")
        if "Traceback" in err.getvalue():
            raise Finding(f"{argv}: a traceback")
        after = _snapshot(d)
        for name, (ino, mode, content) in before.items():
            if name not in after:
                raise Finding(f"{argv}: {name} was removed")
            changed = after[name] != (ino, mode, content)
            target = any(os.path.basename(paths.get(k, "")) == name for k in ("OUT", "OUT.gz",
                                                                              "OUT.xz"))
            if changed and not (rc == 0 and target):
                raise Finding(f"{argv}: {name} changed")
        if [n for n in after if n.endswith(".part")]:
            raise Finding(f"{argv}: a temporary file was left")


TARGETS = {"api": api, "trace": trace, "cli": cli}
