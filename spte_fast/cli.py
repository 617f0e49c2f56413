"""The ``spte-fast`` command (also ``python -m spte_fast``).

``spte-fast simulate``       push millions of guest faults through the TDP MMU model, from a
                             built-in workload (``spte_fast.sim.workloads``) or a binary trace,
                             with optional interleaved zaps and vCPU threads; print a summary
                             table or (``--json``) one JSON document; ``--plot`` draws the run.
``spte-fast trace convert``  turn a valgrind lackey log into the binary trace format
                             (``spte_fast.sim.trace``).
``spte-fast demo``           the two initialisation paths of KVM 6.10's memory cache, side by
                             side (also what ``python -m spte_fast`` alone runs).

Bad input (an unknown option value, a missing or malformed file, a trace beyond the address
width) prints one line ``spte-fast: error: ...`` on stderr and exits with status 2.  Faults
run in ``fault_batch`` chunks of numpy arrays; Python only runs per chunk.
"""
import argparse
import concurrent.futures
import contextlib
import json
import os
import re
import sys
import time

import numpy as np

import spte_fast as sf

from .sim import trace as _trace
from .sim import workloads as _workloads
from .sim.workloads import PAGES_2M

PROG = "spte-fast"
DEFAULT_FAULTS = 10_000_000
DEFAULT_CHUNK = 1 << 20

LAYOUTS = {
    "ept": ("Intel EPT with A/D bits, non-present SPTE = bit 63 (Linux 6.10+ x86-64)",
            lambda: sf.SpteLayout.ept(ad=True)),
    "ept-noad": ("Intel EPT without A/D bits (access tracking through RWX), non-present = "
                 "bit 63", lambda: sf.SpteLayout.ept(ad=False)),
    "npt": ("AMD NPT, non-present = bit 63", lambda: sf.SpteLayout.npt()),
    "tdx": ("the Intel TDX configuration: EPT + A/D, non-present = bit 63 (suppress #VE);\n"
            "            for now the same SPTEs as ept", lambda: sf.SpteLayout.ept(ad=True)),
    "legacy": ("EPT with A/D, non-present = 0: kernels up to 6.9 (GFP_ZERO tables)",
               lambda: sf.SpteLayout.ept(ad=True, nonpresent_value=0)),
}
MAX_LEVELS = {"4k": sf.PG_LEVEL_4K, "2m": sf.PG_LEVEL_2M, "1g": sf.PG_LEVEL_1G}
LEVEL_NAMES = {v: k.upper() for k, v in MAX_LEVELS.items()}


class CliError(Exception):
    """Bad input: reported as one line, exit status 2."""


class RunError(Exception):
    """The run itself failed (pool exhausted, audit): one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``spte-fast: error: ...``, status 2."""

    def error(self, message):
        raise CliError(message)


# ---------------------------------------------------------------------------------------
# Argument types
# ---------------------------------------------------------------------------------------

_SIZE = re.compile(r"^(\d+)\s*([kmgtp]?)(i?b)?$", re.I)
_COUNT = re.compile(r"^([\d_]+)\s*([kmg]?)$", re.I)


def parse_size(text):
    """'4G', '512M', '64KiB', '4096' (bytes) -> bytes; binary units; whole 4 KiB pages."""
    m = _SIZE.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4G, 512M)")
    n = int(m.group(1)) << (10 * "KMGTP".find(m.group(2).upper()) + 10 if m.group(2) else 0)
    if n <= 0 or n % 4096:
        raise argparse.ArgumentTypeError(f"size {text!r} must be a positive multiple of 4 KiB")
    return n


def parse_count(text):
    """'10000000', '10_000_000', '10M', '500k' -> int >= 1 (decimal units)."""
    m = _COUNT.match(text.strip())
    if not m or not m.group(1).strip("_"):
        raise argparse.ArgumentTypeError(f"not a count: {text!r} (e.g. 1000000, 10M)")
    n = int(m.group(1).replace("_", "")) * 1000 ** "_KMG".find(m.group(2).upper() or "_")
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return n


def _vcpus(text):
    n = parse_count(text)
    if n > 256:
        raise argparse.ArgumentTypeError(f"at most 256 vCPUs, not {n}")
    return n


def doc_section(doc, title):
    """The body of the section ``title`` (a line followed by a ---- line) of a docstring."""
    m = re.search(rf"^{re.escape(title)}\n-+\n(.*?)(?=^[^\n]+\n-+\n|\Z)", doc, re.M | re.S)
    return m.group(1).strip() if m else ""


# ---------------------------------------------------------------------------------------
# The simulation
# ---------------------------------------------------------------------------------------

def _fault_parallel(executor, vcpus, gfns, access):
    """Split one segment between the vCPUs (contiguous slices), fault them concurrently."""
    if executor is None:
        return [vcpus[0].fault_batch(gfns, access)]
    n, k = gfns.size, len(vcpus)
    edges = [n * i // k for i in range(k + 1)]
    futures = [executor.submit(v.fault_batch, gfns[a:b], None if access is None else access[a:b])
               for v, a, b in zip(vcpus, edges, edges[1:]) if b > a]
    return [f.result() for f in futures]


def run(source, *, layout="ept", root_level=4, max_level=None, vcpus=1, zap_every=None,
        zap_all_every=None, seed=0, chunk=DEFAULT_CHUNK, progress=None):
    """Run ``source`` (a ``workloads.Source``) through a new Vm; return the result dict.

    Every ``zap_every`` faults a random 2M-aligned range of the guest is zapped with
    ``zap_gfn_range``, every ``zap_all_every`` faults everything with ``zap_all`` (between
    fault segments, with no fault in flight).  ``progress(n)`` is called per segment.
    """
    max_level = max_level or source.max_level
    pt_pages = _workloads.pool_pages(source, root_level, vcpus)
    vm = sf.Vm(LAYOUTS[layout][1](), root_level=root_level, max_level=max_level,
               max_pt_pages=pt_pages)
    for s in source.slots:
        vm.add_memslot(s.base_gfn, s.npages, s.pfn, readonly=s.readonly)
    cpus = [vm.vcpu() for _ in range(vcpus)]
    zap_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(2)[1])
    periods = [p for p in (zap_every, zap_all_every) if p]
    zap_regions = max(1, -(-source.guest_pages // PAGES_2M))
    results = {"fixed": 0, "spurious": 0, "emulate": 0, "retry": 0}
    zaps = {"gfn_range": 0, "gfn_range_flushed": 0, "all": 0, "all_flushed": 0}
    samples, done, fault_s, zap_s = [], 0, 0.0, 0.0
    t_start = time.perf_counter()
    with (concurrent.futures.ThreadPoolExecutor(vcpus, thread_name_prefix="vcpu")
          if vcpus > 1 else contextlib.nullcontext()) as executor:
        for gfns, access in source.chunks(chunk):
            chunk_fault_s, pos = 0.0, 0
            while pos < gfns.size:
                # Segments end where a zap is due.
                end = min([gfns.size] + [(done + pos) // p * p + p - done for p in periods])
                t0 = time.perf_counter()
                for r in _fault_parallel(executor, cpus, gfns[pos:end],
                                         None if access is None else access[pos:end]):
                    for k in results:
                        results[k] += r[k]
                chunk_fault_s += time.perf_counter() - t0
                if progress:
                    progress(end - pos)
                pos = end
                t0 = time.perf_counter()
                if zap_every and (done + pos) % zap_every == 0:
                    start = int(zap_rng.integers(zap_regions)) * PAGES_2M
                    zaps["gfn_range"] += 1
                    zaps["gfn_range_flushed"] += vm.zap_gfn_range(start, start + PAGES_2M)
                if zap_all_every and (done + pos) % zap_all_every == 0:
                    zaps["all"] += 1
                    zaps["all_flushed"] += vm.zap_all()
                zap_s += time.perf_counter() - t0
            done += gfns.size
            fault_s += chunk_fault_s
            st = vm.stats
            samples.append({"faults": done, "seconds": time.perf_counter() - t_start,
                            "faults_per_s": gfns.size / chunk_fault_s if chunk_fault_s else 0.0,
                            "pt_pages": [st[f"pt_pages_l{l}"] for l in range(1, root_level + 1)]})
    elapsed = time.perf_counter() - t_start
    try:
        vm.audit()
    except sf.AuditError as e:
        raise RunError(f"audit failed ({e.invariant}): {e}") from None
    layout_obj = vm.layout
    return {
        "config": {
            "source": "trace" if source.name == "trace" else "workload",
            "workload": source.name, **source.extra,
            "faults": source.faults, "guest_bytes": source.guest_pages << 12,
            "memslots": [{"base_gfn": s.base_gfn, "npages": s.npages, "pfn": s.pfn,
                          "readonly": s.readonly} for s in source.slots],
            "layout": layout, "nonpresent_value": hex(layout_obj.nonpresent_value),
            "root_level": root_level, "max_level": LEVEL_NAMES[max_level].lower(),
            "vcpus": vcpus, "zap_every": zap_every, "zap_all_every": zap_all_every,
            "seed": seed, "chunk": chunk, "max_pt_pages": pt_pages,
        },
        "faults": done,
        "results": results,
        "elapsed_s": elapsed,
        "fault_s": fault_s,
        "zap_s": zap_s,
        "faults_per_s": done / fault_s if fault_s else 0.0,
        "overall_faults_per_s": done / elapsed if elapsed else 0.0,
        "zaps": zaps,
        "stats": vm.stats,
        "audit": "passed",
        "samples": samples,
    }


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------

def _bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def summary(res):
    """The human summary table of a run."""
    c, st, r, z = res["config"], res["stats"], res["results"], res["zaps"]
    what = f"trace {c['trace']}" if c["source"] == "trace" else f"{c['workload']} workload"
    rows = [
        ("throughput", f"{res['faults_per_s'] / 1e6:.2f} M faults/s in the fault path "
                       f"({res['fault_s']:.3f} s); {res['overall_faults_per_s'] / 1e6:.2f} M/s "
                       f"overall ({res['elapsed_s']:.3f} s wall)"),
        ("results", f"fixed {r['fixed']:,}   spurious {r['spurious']:,}   "
                    f"emulate {r['emulate']:,}   retries {r['retry']:,}"),
        ("leaves", f"4K {st['pages_4k']:,}   2M {st['pages_2m']:,}   1G {st['pages_1g']:,}   "
                   f"MMIO SPTEs created {st['mmio_sptes_created']:,}"),
    ]
    levels = range(c["root_level"], 0, -1)
    rows.append(("page tables", f"{'level':>5} {'pages':>12} {'bytes':>11}"))
    for lvl in levels:
        n = st[f"pt_pages_l{lvl}"]
        rows.append(("", f"{'L' + str(lvl):>5} {n:>12,} {_bytes(n * 4096):>11}"))
    rows.append(("", f"{'total':>5} {st['pt_pages']:>12,} {_bytes(st['pt_pages'] * 4096):>11}"
                     f"   (allocated {st['tables_allocated']:,}, freed {st['tables_freed']:,})"))
    rows += [
        ("table init", f"cache fills {st['cache_fills']:,} (memset64)   zero-inits "
                       f"{st['cache_zero_inits']:,}   bytes written "
                       f"{_bytes(st['init_bytes_written'])}"),
        ("TLB flushes", f"full {st['tlb_flushes']:,}   ranged {st['tlb_flushes_ranged']:,}"),
        ("zaps", f"2M ranges {z['gfn_range']:,} ({z['gfn_range_flushed']:,} flushed)   "
                 f"zap_all {z['all']:,} ({z['all_flushed']:,} flushed)"),
        ("audit", res["audit"]),
    ]
    head = (f"{PROG} simulate: {what}, {res['faults']:,} faults, "
            f"{_bytes(c['guest_bytes'])} guest in {len(c['memslots'])} memslot(s)\n"
            f"layout {c['layout']} (non-present {c['nonpresent_value']}), {c['root_level']}-level "
            f"root, max level {c['max_level'].upper()}, {c['vcpus']} vCPU(s), seed {c['seed']}\n")
    return head + "\n" + "".join(f"  {k:<13}{v}\n" for k, v in rows)


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("--plot needs matplotlib, which is not installed "
                       "(pip install 'spte_fast[plot]')") from None


def plot(res, path):
    """Page-table pages per level and the fault rate, per chunk, over the run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = res["samples"]
    x = [p["faults"] for p in s]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    for i in range(res["config"]["root_level"] - 1, -1, -1):
        top.plot(x, [p["pt_pages"][i] for p in s], marker=".", label=f"L{i + 1}")
    top.set_yscale("symlog")
    top.set_ylabel("page-table pages")
    top.legend(loc="lower right", ncol=5, fontsize="small")
    bottom.plot(x, [p["faults_per_s"] / 1e6 for p in s], marker=".")
    bottom.set_ylabel("M faults/s (per chunk)")
    bottom.set_xlabel("faults")
    bottom.set_ylim(bottom=0)
    c = res["config"]
    fig.suptitle(f"spte-fast: {c['workload']} ({c['layout']}, {c['root_level']}-level, "
                 f"max {c['max_level'].upper()}, {c['vcpus']} vCPU)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------

def _check_input(path):
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CliError(f"{path}: is a directory")


def cmd_simulate(args):
    if args.plot:
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.plot))):
            raise CliError(f"{args.plot}: its directory does not exist")
        _require_matplotlib()
    gfn_limit = 1 << (9 * args.root_level)
    if args.trace:
        _check_input(args.trace)
        source = _workloads.trace_source(args.trace, gfn_limit, args.root_level - 1,
                                         faults=args.faults, guest_bytes=args.guest_size)
    else:
        source = _workloads.workload(args.workload or "random", args.faults or DEFAULT_FAULTS,
                                     args.guest_size, args.seed)
        if source.span > gfn_limit:
            raise CliError(f"a {_bytes(source.guest_pages << 12)} guest does not fit the "
                           f"{args.root_level}-level address width ({_bytes(gfn_limit << 12)})")
    bar = _progress_bar(source.faults)
    try:
        res = run(source, layout=args.layout, root_level=args.root_level,
                  max_level=MAX_LEVELS[args.max_level] if args.max_level else None,
                  vcpus=args.vcpus, zap_every=args.zap_every, zap_all_every=args.zap_all_every,
                  seed=args.seed, chunk=args.chunk, progress=bar.update if bar else None)
    except sf.OutOfMemory as e:
        raise RunError(f"the page-table pool ran out: {e}") from None
    except ValueError as e:         # memslots that the engine refuses (width, pfn field)
        raise CliError(str(e)) from None
    except MemoryError:             # the page-table pool, or a memslot's host page flags
        raise RunError(f"not enough host memory to simulate a "
                       f"{_bytes(source.guest_pages << 12)} guest with "
                       f"{source.faults:,} faults; give a smaller --guest-size") from None
    finally:
        if bar:
            bar.close()
    if args.plot:
        plot(res, args.plot)
        res["plot"] = args.plot
    if args.json:
        json.dump({k: v for k, v in res.items() if k != "samples"}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(summary(res))
        if args.plot:
            sys.stdout.write(f"  {'plot':<13}{args.plot}\n")
    return 0


def _progress_bar(total):
    """A tqdm bar on stderr when stderr is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="fault", unit_scale=True, file=sys.stderr, leave=False)


def cmd_trace_convert(args):
    _check_input(args.log)
    if os.path.abspath(args.log) == os.path.abspath(args.output):
        raise CliError("the output would overwrite the log")
    t0 = time.perf_counter()
    try:
        st = _trace.convert_lackey(args.log, args.output, tlb=args.tlb)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(args.output)          # never leave a partial trace behind
        raise
    dt = time.perf_counter() - t0
    sys.stdout.write(f"{args.log}: {st.lines:,} lines, {st.accesses:,} accesses -> "
                     f"{st.records:,} records ({_bytes(st.bytes_out)} uncompressed, "
                     f"{os.path.getsize(args.output):,} bytes on disk) in {args.output} "
                     f"[{dt:.2f} s, {st.lines / dt / 1e6 if dt else 0:.1f} M lines/s]\n")
    return 0


def cmd_demo(args):
    """KVM 6.10's memory cache on both initialisation paths, then a VM on each layout."""
    out = sys.stdout
    out.write(f"spte_fast {sf.__version__}: KVM x86 TDP MMU model (Linux 6.10)\n\n")
    out.write("memory caches (capacity 40, top-up min 5):\n")
    for name, init in (("legacy (<= 6.9), init 0", 0),
                       ("6.10+ x86-64, init 1<<63", sf.SHADOW_NONPRESENT_VALUE)):
        pool = sf.PagePool(256)
        cache = sf.MemoryCache(pool, init_value=init)
        cache.topup(5)
        page = cache.alloc()
        st = cache.stats
        out.write(f"  {name:26s} path={'GFP_ZERO' if cache.gfp_zero else 'memset64 fill':13s} "
                  f"nobjs={cache.nobjs:2d} fills={st['fills']:2d} zero_inits={st['zero_inits']} "
                  f"untouched={st['zero_untouched']:2d} "
                  f"bytes_written={st['init_bytes_written']:6d} "
                  f"page[{page}][0]={int(pool.pages[page][0]):#x}\n")
    npages = 1 << 20
    out.write(f"\nfirst-touch 4K faults over {npages * 4 >> 10} MiB of guest memory:\n")
    gfns = np.arange(npages, dtype=np.uint64)
    for name, layout in (("ept, non-present 1<<63", sf.SpteLayout.ept()),
                         ("ept, non-present 0", sf.SpteLayout.ept(nonpresent_value=0)),
                         ("npt, non-present 1<<63", sf.SpteLayout.npt())):
        vm = sf.Vm(layout, root_level=4, max_level=sf.PG_LEVEL_4K, max_pt_pages=1 << 14)
        vm.add_memslot(0, npages, pfn=0x100000)
        t0 = time.perf_counter()
        res = vm.vcpu().fault_batch(gfns)
        dt = time.perf_counter() - t0
        vm.audit()
        st = vm.stats
        spte, _ = vm.lookup(npages - 1)
        out.write(f"  {name:24s} {res['fixed'] / dt / 1e6:6.1f} M faults/s  "
                  f"pt_pages={st['pt_pages']} cache_fills={st['cache_fills']} "
                  f"zero_inits={st['cache_zero_inits']} "
                  f"last leaf={spte:#x}\n")
    return 0


def build_parser():
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog=PROG, formatter_class=fmt,
                description="A fast model of Linux 6.10 KVM's x86 TDP MMU. "
                            "With no command: the demo.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser(
        "simulate", formatter_class=fmt, help="push faults through the model",
        description="Fault a guest through a new VM from a built-in workload (default: "
                    f"random,\n{DEFAULT_FAULTS:,} faults) or a binary trace, then print a "
                    "summary table (or --json)\nand audit the model (vm.audit()).",
        epilog="workloads:\n" + _indent(doc_section(_workloads.__doc__, "Workloads")) +
               "\n\nlayouts:\n" + "".join(f"  {k:<9} {v[0]}\n" for k, v in LAYOUTS.items()) +
               "\ntrace format: see 'spte-fast trace convert --help'.")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--workload", choices=list(_workloads.DEFAULT_GUEST_BYTES),
                     help="built-in workload (default random; see below)")
    src.add_argument("--trace", metavar="FILE",
                     help="replay a binary trace (plain, .gz or .xz) in chunks")
    s.add_argument("--faults", type=parse_count, metavar="N",
                   help=f"number of faults (default {DEFAULT_FAULTS:,}; for a trace: its "
                        "first N records, default all); 10M, 500k accepted")
    s.add_argument("--guest-size", type=parse_size, metavar="SIZE",
                   help="guest RAM, e.g. 4G (default: 4G, 64G for huge, a trace's highest "
                        "page rounded up to 2M)")
    s.add_argument("--layout", choices=list(LAYOUTS), default="ept",
                   help="SPTE layout (default ept; see below)")
    s.add_argument("--root-level", type=int, choices=(4, 5), default=4,
                   help="paging levels: 4 (48-bit GPA, gfn < 1<<36) or 5 (57-bit)")
    s.add_argument("--max-level", choices=list(MAX_LEVELS),
                   help="largest mapping (default: 1g for huge, else 4k)")
    s.add_argument("--vcpus", type=_vcpus, default=1, metavar="N",
                   help="vCPU threads, one Vcpu each; every chunk is split between them")
    s.add_argument("--zap-every", type=parse_count, metavar="N",
                   help="every N faults zap a random 2M-aligned range (zap_gfn_range)")
    s.add_argument("--zap-all-every", type=parse_count, metavar="N",
                   help="every N faults zap everything (zap_all)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--chunk", type=parse_count, default=DEFAULT_CHUNK, metavar="N",
                   help=f"faults per fault_batch call (default {DEFAULT_CHUNK:,})")
    s.add_argument("--json", action="store_true",
                   help="print one JSON document (configuration, results, rates, stats) "
                        "instead of the table")
    s.add_argument("--plot", metavar="FILE.png",
                   help="plot page-table pages per level and the fault rate over the run "
                        "(needs matplotlib: pip install 'spte_fast[plot]')")
    s.set_defaults(func=cmd_simulate)

    t = sub.add_parser("trace", help="trace tools", formatter_class=fmt)
    tsub = t.add_subparsers(dest="trace_command", metavar="COMMAND", parser_class=_Parser,
                            required=True)
    c = tsub.add_parser(
        "convert", formatter_class=fmt, help="lackey log -> binary trace",
        description="Convert a 'valgrind --tool=lackey --trace-mem=yes' log (plain, .gz or "
                    ".xz)\ninto the binary trace format, streaming.",
        epilog="binary trace format:\n" +
               _indent(doc_section(_trace.__doc__, "Binary trace format")) +
               "\n\nlackey logs:\n" +
               _indent(doc_section(_trace.__doc__,
                                   "Converting a lackey log (``valgrind --tool=lackey "
                                   "--trace-mem=yes``)")))
    c.add_argument("log", metavar="LOG", help="lackey log (plain, .gz, .xz)")
    c.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="binary trace to write (.gz, .xz or plain, by its name)")
    c.add_argument("--tlb", type=parse_count, metavar="N",
                   help="keep only the misses of an N-entry FIFO TLB")
    c.set_defaults(func=cmd_trace_convert)

    d = sub.add_parser("demo", help="the two cache initialisation paths, side by side")
    d.set_defaults(func=cmd_demo)
    return p


def _indent(text):
    return "".join(f"  {line}\n" for line in text.splitlines()).rstrip("\n")


def main(argv=None):
    try:
        args = build_parser().parse_args(argv)
        return (getattr(args, "func", None) or cmd_demo)(args)
    except (CliError, _trace.TraceError) as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
    except OSError as e:
        sys.stderr.write(f"{PROG}: error: {e.filename + ': ' if e.filename else ''}"
                         f"{e.strerror or e}\n")
        return 2
    except RunError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 130
