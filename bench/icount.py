"""Instruction counts per item under callgrind: a regression gate that machine noise cannot move.

    python bench/icount.py                              # the table of every item
    python bench/icount.py --save base.json             # ... and write it as a baseline
    python bench/icount.py --compare base.json --fail 2%    # exit 1 on a regression > 2 %
    python bench/icount.py --items fill,zap_range --repeat 2  # two runs each: exact?

Each item runs in its own process under ``valgrind --tool=callgrind --collect-atstart=no
--toggle-collect=FUNCTION``: only the instructions executed inside one call of the measured
function -- the Cython wrapper of the public method, so the whole call, argument checks
included -- are counted, not the interpreter's start nor the setup (building and
populating the VM).  The count is divided by the items that call handles.  The child gets
a fixed environment (``PYTHONHASHSEED=0``, no other ``PYTHON*`` variable but
``PYTHONPATH``) and an empty working directory, so the Python-side allocations around the
call, and with them the count, repeat exactly from run to run; they still change with
the Python, numpy, compiler and valgrind versions, so compare against a baseline taken on
the same machine kind.  valgrind emulates no AVX-512: the fill is the SSE2 code the
default build has.

``--slow ITEM=FACTOR`` is for testing this gate only: the item does FACTOR times its
work in the measured call while still being divided by its nominal item count, as a kernel
made that much slower would be.
"""
import argparse
import json
import os
import platform
import re
import runpy
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.abspath(__file__)
N = 1 << 16                  # faults, accesses, leaves (a 256 MiB guest of 4K pages)
FILL_PAGES, FILL_REPS = 64, 16
SEED = 12345


def _vm(npages, populate=False):
    import numpy as np
    import spte_fast as sf
    vm = sf.Vm(sf.SpteLayout.ept(), root_level=4, max_level=sf.PG_LEVEL_4K,
               max_pt_pages=npages // 512 + 256)
    vm.add_memslot(0, npages, pfn=0x100000)
    vcpu = vm.vcpu()
    if populate:
        res = vcpu.fault_batch(np.arange(npages, dtype=np.uint64))
        assert res["fixed"] == npages, res
    return vm, vcpu


def _fill(n):
    import numpy as np
    import spte_fast as sf
    from spte_fast import _bench
    # 4 KiB-aligned pages (as pool pages are): the kernel's prologue up to a 64-byte
    # boundary then costs the same in every run, wherever numpy's buffer lands.
    buf = np.ones((FILL_PAGES + 1) * 512, dtype=np.uint64)
    skip = (-buf.ctypes.data % 4096) // 8
    pages = buf[skip:skip + FILL_PAGES * 512].reshape(FILL_PAGES, 512)
    reps = -(-n // FILL_PAGES)

    def run():
        _bench.fill_repeat(pages, sf.SHADOW_NONPRESENT_VALUE, reps)
        assert int(pages[-1, -1]) == sf.SHADOW_NONPRESENT_VALUE
    return run


def _fault_seq(n):
    import numpy as np
    _, vcpu = _vm(n)
    gfns = np.arange(n, dtype=np.uint64)

    def run():
        assert vcpu.fault_batch(gfns)["fixed"] == n
    return run


def _fault_random(n):
    import numpy as np
    npages = 16 * N
    _, vcpu = _vm(npages)
    gfns = np.random.default_rng(SEED).permutation(npages)[:n].astype(np.uint64)

    def run():
        assert vcpu.fault_batch(gfns)["fixed"] == n
    return run


def _access_hits(n):
    import numpy as np
    _, vcpu = _vm(n, populate=True)
    gfns = np.arange(n, dtype=np.uint64)
    vcpu.access_batch(gfns)                  # the first accesses set D-less leaves' A/D

    def run():
        assert vcpu.access_batch(gfns)["hits"] == n
    return run


def _access_first_touch(n):
    import numpy as np
    npages = 16 * N
    _, vcpu = _vm(npages)
    gfns = np.random.default_rng(SEED).permutation(npages)[:n].astype(np.uint64)

    def run():
        res = vcpu.access_batch(gfns)
        assert res["fixed"] == n and res["hits"] == 0, res
    return run


def _zap_range(n):
    vm, _ = _vm(n, populate=True)

    def run():
        vm.zap_gfn_range(0, n)
        assert vm.stats["pages_4k"] == 0
    return run


def _dirty_vm(n):
    import numpy as np
    import spte_fast as sf
    vm = sf.Vm(sf.SpteLayout.ept(), max_level=sf.PG_LEVEL_4K, max_pt_pages=n // 512 + 256,
               pml=False)
    slot = vm.add_memslot(0, n, pfn=0x100000)
    vcpu = vm.vcpu()
    gfns = np.arange(n, dtype=np.uint64)
    writes = np.ones(n, dtype=np.uint8)
    vcpu.fault_batch(gfns, writes)
    return vm, slot, vcpu, gfns, writes


def _wrprot_slot(n):
    vm, slot, *_ = _dirty_vm(n)

    def run():
        vm.set_memslot_flags(slot, dirty_log=True)
        assert not vm.lookup(n - 1)[0] & 2
    return run


def _fast_pf_wrprot(n):
    vm, slot, vcpu, gfns, writes = _dirty_vm(n)
    vm.set_memslot_flags(slot, dirty_log=True)

    def run():
        vcpu.access_batch(gfns, writes)
        assert vm.stats["faults_fast"] == n
    return run


#: name -> (callgrind function pattern, nominal items, unit, what, prepare(items of work))
ITEMS = {
    "fill": ("__pyx_pw_9spte_fast_6_bench_*fill_repeat", FILL_PAGES * FILL_REPS, "page",
             f"memset64 of {FILL_PAGES} cache-hot pages with 1<<63, {FILL_REPS} times "
             f"(_bench.fill_repeat: the kernel, no call per page)", _fill),
    "fault_seq": ("__pyx_pw_9spte_fast_5_core_4Vcpu_*fault_batch", N, "fault",
                  f"Vcpu.fault_batch: {N} sequential first touches, 4K", _fault_seq),
    "fault_random": ("__pyx_pw_9spte_fast_5_core_4Vcpu_*fault_batch", N, "fault",
                     f"Vcpu.fault_batch: {N} first touches in random order over "
                     f"{16 * N * 4 >> 20} MiB", _fault_random),
    "access_hits": ("__pyx_pw_9spte_fast_5_core_4Vcpu_*access_batch", N, "access",
                    f"Vcpu.access_batch: {N} accesses that hit (A/D already set)",
                    _access_hits),
    "access_first_touch": ("__pyx_pw_9spte_fast_5_core_4Vcpu_*access_batch", N, "access",
                           f"Vcpu.access_batch: {N} first touches in random order over "
                           f"{16 * N * 4 >> 20} MiB (EPT violation, fault, re-walk)",
                           _access_first_touch),
    "zap_range": ("__pyx_pw_9spte_fast_5_core_2Vm_*zap_gfn_range", N, "leaf",
                  f"Vm.zap_gfn_range over {N} 4K leaves", _zap_range),
    "wrprot_slot": ("__pyx_pw_9spte_fast_5_core_2Vm_*set_memslot_flags", N, "leaf",
                    f"Vm.set_memslot_flags(dirty_log=True) without PML: {N} writable 4K "
                    f"leaves write-protected", _wrprot_slot),
    "fast_pf_wrprot": ("__pyx_pw_9spte_fast_5_core_4Vcpu_*access_batch", N, "write",
                       f"Vcpu.access_batch: {N} writes to write-protected 4K leaves, each "
                       f"fixed by the fast page fault", _fast_pf_wrprot),
}


class GateError(Exception):
    """Bad input or a measurement that did not happen: one line, exit status 2."""


# ---------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------

def worker(item, factor):
    """In the child, under callgrind: prepare the item, then make the one measured call."""
    pattern, n, *_, prepare = ITEMS[item]
    prepare(max(1, round(n * factor)))()


def _child_env():
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONHASHSEED": "0",
           "LC_ALL": "C"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return env


def measure(item, factor=1.0, python=sys.executable):
    """Instructions callgrind counts in ``item``'s measured call (a fresh process)."""
    pattern = ITEMS[item][0]
    with tempfile.TemporaryDirectory(prefix="icount-") as tmp:
        cwd = os.path.join(tmp, "cwd")
        os.mkdir(cwd)
        out = os.path.join(tmp, "callgrind.out")
        code = (f"import runpy, sys; sys.argv = ['icount', '--worker', {item!r}, "
                f"'--factor', {str(factor)!r}]; runpy.run_path({HERE!r}, run_name='__main__')")
        cmd = ["valgrind", "--tool=callgrind", "--collect-atstart=no",
               f"--toggle-collect={pattern}", f"--callgrind-out-file={out}",
               python, "-c", code]
        p = subprocess.run(cmd, cwd=cwd, env=_child_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            tail = "\n".join(p.stderr.splitlines()[-15:])
            raise GateError(f"{item}: the measured process failed (status {p.returncode}):"
                            f"\n{tail}")
        with open(out) as f:
            m = re.search(r"^summary:\s+(\d+)", f.read(), re.M)
    if not m or int(m.group(1)) == 0:
        raise GateError(f"{item}: callgrind counted nothing in {pattern} (was the function "
                        f"renamed?  nm spte_fast/*.so | grep __pyx_pw)")
    return int(m.group(1))


def run_items(items, repeat=1, slow=None, log=sys.stderr):
    """{item: {instructions, items, per_item, unit, function, runs}} for ``items``."""
    slow = slow or {}
    res = {}
    for item in items:
        pattern, n, unit, what, _ = ITEMS[item]
        runs = [measure(item, slow.get(item, 1.0)) for _ in range(repeat)]
        res[item] = {"instructions": runs[0], "items": n, "unit": unit,
                     "per_item": runs[0] / n, "function": pattern, "what": what,
                     "runs": runs}
        if log:
            log.write(f"  {item:<13} {runs[0] / n:12.2f} instructions/{unit}"
                      f"{'  (' + ', '.join(map(str, runs)) + ')' if repeat > 1 else ''}\n")
    return res


# ---------------------------------------------------------------------------------------
# Baselines
# ---------------------------------------------------------------------------------------

def _machine():
    try:
        valgrind = subprocess.run(["valgrind", "--version"], stdout=subprocess.PIPE,
                                  text=True).stdout.strip()
    except OSError:
        valgrind = None
    import numpy
    return {"python": platform.python_version(), "numpy": numpy.__version__,
            "valgrind": valgrind, "machine": platform.machine()}


def save(path, res):
    doc = {"tool": "bench/icount.py", "environment": _machine(),
           "items": {k: {f: v[f] for f in ("instructions", "items", "unit", "per_item",
                                           "function", "what")} for k, v in res.items()}}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def load(path):
    try:
        with open(path) as f:
            doc = json.load(f)
        items = doc["items"]
        for k, v in items.items():
            float(v["per_item"])
    except OSError as e:
        raise GateError(f"--compare {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise GateError(f"--compare {path}: not a baseline of bench/icount.py ({e!r})"
                        ) from None
    return doc


def compare(base, res, fail):
    """(table lines, regressed item names): each item's change against the baseline."""
    lines = [f"{'item':<13} {'baseline':>14} {'now':>14} {'change':>9}  verdict",
             f"{'':<13} {'(instr/item)':>14} {'(instr/item)':>14}"]
    regressed = []
    for item, now in res.items():
        old = base["items"].get(item)
        if old is None:
            lines.append(f"{item:<13} {'-':>14} {now['per_item']:14.2f} {'':>9}  new")
            continue
        change = now["per_item"] / old["per_item"] - 1 if old["per_item"] else float("inf")
        verdict = "ok"
        if change > fail:
            verdict = f"REGRESSION (> {fail:.1%})"
            regressed.append(item)
        elif change < -fail:
            verdict = "faster"
        lines.append(f"{item:<13} {old['per_item']:14.2f} {now['per_item']:14.2f} "
                     f"{change:+9.2%}  {verdict}")
    return lines, regressed


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------

def _percent(text):
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t) / 100
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a percentage: {text!r} (e.g. 2%)") from None
    if not 0 <= v < 10:
        raise argparse.ArgumentTypeError(f"not a sensible threshold: {text!r}")
    return v


def _items(text):
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in ITEMS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown item {', '.join(bad) or repr(text)} "
                                         f"(the items: {', '.join(ITEMS)})")
    return list(dict.fromkeys(names))


def _slow(text):
    item, _, factor = text.partition("=")
    if item not in ITEMS:
        raise argparse.ArgumentTypeError(f"unknown item {item!r} (the items: "
                                         f"{', '.join(ITEMS)})")
    try:
        f = float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--slow ITEM=FACTOR, e.g. fill=1.05, not "
                                         f"{text!r}") from None
    if not 0.5 <= f <= 16:
        raise argparse.ArgumentTypeError(f"factor {f} out of [0.5, 16]")
    return item, f


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise GateError(message)


def build_parser():
    p = _Parser(prog="bench/icount.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="items:\n" + "".join(f"  {k:<13} {v[3]}\n" for k, v in ITEMS.items()))
    p.add_argument("--items", type=_items, default=list(ITEMS), metavar="A,B",
                   help="the items to measure (default all)")
    p.add_argument("--save", metavar="BASE.json", help="write the counts as a baseline")
    p.add_argument("--compare", metavar="BASE.json", help="compare with a saved baseline")
    p.add_argument("--fail", type=_percent, default=0.02, metavar="PCT",
                   help="with --compare: exit 1 when an item needs more than PCT more "
                        "instructions per item (default 2%%)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="measure each item N times and say whether the counts are equal")
    p.add_argument("--slow", type=_slow, action="append", default=[], metavar="ITEM=F",
                   help="testing the gate only: ITEM does F times its work")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--factor", type=float, default=1.0, help=argparse.SUPPRESS)
    return p


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        if args.worker:
            worker(args.worker, args.factor)
            return 0
        if args.repeat < 1:
            raise GateError("--repeat must be at least 1")
        if shutil.which("valgrind") is None:
            raise GateError("valgrind is not installed (apt-get install valgrind)")
        base = load(args.compare) if args.compare else None
        sys.stderr.write(f"callgrind: {len(args.items)} items, each in its own process\n")
        res = run_items(args.items, args.repeat, dict(args.slow))
        out = sys.stdout
        if args.repeat > 1:
            same = all(len(set(v["runs"])) == 1 for v in res.values())
            out.write(f"repeat x{args.repeat}: " + ("every count identical\n" if same else
                      "counts DIFFER: " + ", ".join(f"{k} {v['runs']}" for k, v in
                                                    res.items() if len(set(v["runs"])) > 1)
                      + "\n"))
        if base is None:
            out.write(f"{'item':<13} {'instructions':>14} {'items':>7} {'per item':>10}\n")
            for k, v in res.items():
                out.write(f"{k:<13} {v['instructions']:14d} {v['items']:7d} "
                          f"{v['per_item']:10.2f}  /{v['unit']}\n")
        if args.save:
            save(args.save, res)
            out.write(f"baseline written: {args.save}\n")
        if base is not None:
            lines, regressed = compare(base, res, args.fail)
            out.write("\n".join(lines) + "\n")
            if regressed:
                out.write(f"FAIL: {', '.join(regressed)} regressed by more than "
                          f"{args.fail:.1%}\n")
                return 1
            out.write(f"PASS: no item regressed by more than {args.fail:.1%}\n")
        return 0
    except GateError as e:
        sys.stderr.write(f"icount: error: {e}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
