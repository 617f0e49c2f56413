"""The ``spte-fast`` command (also ``python -m spte_fast``): parsing and printing only.

``spte-fast simulate``       run guest accesses through the TDP MMU model, from a built-in
                             workload (``spte_fast.sim.workloads``) or a trace of any format
                             (``spte_fast.sim.readers``; ``-`` for stdin), with optional
                             interleaved zaps and vCPU threads, under one layout or several
                             (``--layout a,b``: one comparison table); print a summary table or
                             (``--json``) one JSON document; ``-o DIR`` writes stats.json and
                             samples.csv, ``--plot`` draws the run.
``spte-fast trace convert``  any trace -> the binary trace format (file or stdout).
``spte-fast trace info``     what a trace holds: records, kinds, pages, regions, reuse.
``spte-fast emulate``        run x86-64 code (a bundled routine or a flat binary) under
                             unicorn with spte_fast as its MMU (``spte_fast.sim.emulate``;
                             needs the ``[unicorn]`` extra) and print the run's report.
``spte-fast demo``           the two initialisation paths of KVM 6.10's memory cache.

A bare ``spte-fast`` prints the help on stdout and exits 0; ``--version`` prints the version.
The work is done by ``spte_fast.sim``.  A wrong command line (the parser's errors, a missing
file: ``CliError``) prints the command's usage and one line ``spte-fast: error: ...`` on
stderr, status 2; bad input content (``sim.InputError``, ``OSError``) prints the line alone,
status 2; a run that fails (``sim.RunError``: the page-table pool ran out, not enough host
memory, the audit, records lost) prints one such line and exits with status 1.
"""
import argparse
import contextlib
import errno
import json
import os
import re
import signal
import sys
import threading
import time

import spte_fast as sf

from .sim import demo as _demo
from .sim import emulate as _emulate
from .sim import engine as _engine
from .sim import info as _info
from .sim import readers as _readers
from .sim import report as _report
from .sim import selftests
from .sim import sweep as _sweep
from .sim import trace as _trace
from .sim import workloads as _workloads
from .sim.errors import HostMemoryError, InputError, RunError

PROG = "spte-fast"
PLOT_EXTRA = "spte_fast[plot]"       # the optional extra of pyproject.toml that has matplotlib
DEFAULT_FAULTS = 10_000_000
DEFAULT_CHUNK = _engine.DEFAULT_CHUNK
LAYOUTS = _engine.LAYOUTS
MAX_LEVELS = _engine.MAX_LEVELS
_bytes = _report.format_bytes


class CliError(Exception):
    """Bad input found by the command line itself: the usage of the command, one error
    line, exit status 2."""

    def __init__(self, message, usage=None):
        super().__init__(message)
        self.usage = usage


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the cleanup of a half-written -o runs."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors print the usage and ``spte-fast: error: ...``, status 2."""

    def error(self, message):
        raise CliError(message, self.format_usage())


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


def parse_seed(text):
    """A seed: a decimal int >= 0."""
    try:
        n = int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {n}")
    return n


def parse_seconds(text):
    """A duration in seconds: a finite decimal >= 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= x < 1e9:
        raise argparse.ArgumentTypeError(f"seconds must be >= 0 (and finite), not {text!r}")
    return x


def _vcpus(text):
    n = parse_count(text)
    if n > _engine.MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"at most {_engine.MAX_VCPUS} vCPUs, not {n}")
    return n


def parse_layouts(text):
    """'ept' or 'ept,npt,legacy' -> a list of distinct layout names."""
    names = [n.strip() for n in text.split(",")]
    for n in names:
        if n not in LAYOUTS:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {n!r} (choose from {', '.join(LAYOUTS)}; several "
                f"separated by commas)")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a layout named twice: {text!r}")
    return names


def doc_section(doc, title):
    """The body of the section ``title`` (a line followed by a ---- line) of a docstring."""
    m = re.search(rf"^{re.escape(title)}\n-+\n(.*?)(?=^[^\n]+\n-+\n|\Z)", doc, re.M | re.S)
    return m.group(1).strip() if m else ""


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------

def _check_input(path, option=None):
    """An input file that exists and is not a directory (``-``: stdin; ``option`` names it
    in errors)."""
    if path == "-":
        return
    name = f"{option} {path}" if option else path
    if not os.path.exists(path):
        raise CliError(f"{name}: no such file")
    if os.path.isdir(path):
        raise CliError(f"{name}: is a directory")


def _check_output_dir(path, option):
    """The directory an output goes to exists and is writable; ``path`` is no directory."""
    if os.path.isdir(path):
        raise CliError(f"{option} {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise CliError(f"{option} {path}: its directory does not exist "
                       f"(No such file or directory)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CliError(f"{option} {path}: its directory is not writable")


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError(f"--plot needs matplotlib, which is not installed "
                       f"(pip install '{PLOT_EXTRA}', or pip install matplotlib)") from None


def _check_plot(path, output_dir=False):
    """--plot: a writable file name whose extension matplotlib can write (checked before the
    run, which may take minutes; without an extension matplotlib would add .png).  With
    ``output_dir`` the directory may be made by -o yet."""
    if not output_dir:
        _check_output_dir(path, "--plot")
    elif os.path.isdir(path):
        raise CliError(f"--plot {path}: is a directory")
    _require_matplotlib()
    from matplotlib.figure import Figure
    formats = Figure().canvas.get_supported_filetypes()
    ext = os.path.splitext(path)[1][1:].lower()
    if ext not in formats:
        raise CliError(f"--plot {path}: " +
                       (f"unsupported format {ext!r}" if ext else "no file extension") +
                       " (use .png, .svg or .pdf)")


def _check_pfns(source, args):
    """The guest's memslots must fit the engine's PFN field: say which option to change."""
    end = max(s.pfn + s.npages for s in source.slots)
    if end > 1 << 40:
        room = ((1 << 40) - min(s.pfn for s in source.slots)) << 12
        what = "--guest-size" if args.guest_size else (
            "the trace's highest page" if args.trace else "the workload's guest size")
        raise CliError(f"{what}: a {_bytes(source.guest_pages << 12)} guest needs host pages "
                       f"beyond the PFN field (at most {room >> 30:,} GiB); "
                       f"give a smaller --guest-size")


def _plot_paths(args, layouts):
    """{layout: the image --plot writes} (empty without --plot)."""
    if args.plot is None:
        return {}
    if args.plot == "":                           # bare --plot: plot.png in -o DIR
        if not args.output:
            raise CliError("--plot without a file name needs -o DIR (it writes DIR/plot.png)")
        return {lay: os.path.join(_run_dir(args, layouts, lay), "plot.png") for lay in layouts}
    if len(layouts) == 1:
        return {layouts[0]: args.plot}
    root, ext = os.path.splitext(args.plot)
    return {lay: f"{root}-{lay}{ext}" for lay in layouts}


def _run_dir(args, layouts, layout):
    """Where -o puts a run's files: DIR, or DIR/LAYOUT when several layouts run."""
    return args.output if len(layouts) == 1 else os.path.join(args.output, layout)


def _prepare_output(args, layouts):
    """Create -o DIR (and its per-layout directories) before the run."""
    if not args.output:
        return
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise CliError(f"-o {args.output}: exists and is not a directory")
    parent = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(parent):
        raise CliError(f"-o {args.output}: its parent directory does not exist")
    try:
        for lay in layouts:
            os.makedirs(_run_dir(args, layouts, lay), exist_ok=True)
    except OSError as e:
        raise CliError(f"-o {args.output}: {e.strerror}") from None


def _source(args):
    if args.trace:
        _check_input(args.trace, "--trace")
        return _workloads.trace_source(args.trace, args.root_level, faults=args.faults,
                                       guest_bytes=args.guest_size, format=args.trace_format,
                                       allow_partial=args.allow_partial)
    return _workloads.workload(args.workload or "random", args.faults or DEFAULT_FAULTS,
                               args.guest_size, args.seed)


def cmd_simulate(args):
    layouts = args.layout
    plots = _plot_paths(args, layouts)
    for path in dict.fromkeys(plots.values()):
        _check_plot(path, output_dir=bool(args.output))
    configs = {}
    for lay in layouts:
        try:
            configs[lay] = _engine.SimConfig(
                layout=lay, root_level=args.root_level,
                max_level=MAX_LEVELS[args.max_level] if args.max_level else None,
                vcpus=args.vcpus, zap_every=args.zap_every, zap_all_every=args.zap_all_every,
                seed=args.seed, chunk=args.chunk, mode=args.mode,
                stats_interval=args.stats_interval)
        except InputError as e:     # the parser's types already refuse these; to be sure
            raise CliError(f"{e} (check the options)") from None
    _prepare_output(args, layouts)
    results = []
    source = _source(args)           # a trace is read once; its spool serves every layout
    try:
        for i, lay in enumerate(layouts):
            if i and not args.trace:
                source.close()
                source = _source(args)  # a workload again from its seed: the same records
            _engine.check(configs[lay], source)    # before the progress bar draws
            _check_pfns(source, args)
            bar = _progress_bar(source.faults, lay if len(layouts) > 1 else None)
            try:
                res = _engine.run(configs[lay], source, progress=bar.update if bar else None)
            except HostMemoryError as e:
                raise RunError(f"not enough host memory to simulate a "
                               f"{_bytes(e.guest_bytes)} guest with {e.faults:,} records; "
                               f"give a smaller --guest-size") from None
            finally:
                if bar:
                    bar.close()
            results.append(res)
    finally:
        source.close()
    docs = []
    for res in results:
        lay = res.config.layout
        extra = {"plot": plots[lay]} if lay in plots else {}
        if lay in plots:
            _report.plot(res, plots[lay])
        if args.output:
            d = _run_dir(args, layouts, lay)
            with open(os.path.join(d, "stats.json"), "w") as f:
                f.write(_report.to_json(res, **extra) + "\n")
            with open(os.path.join(d, "samples.csv"), "w") as f:
                _report.samples_csv(res, f)
            extra["output"] = d
        docs.append({**res.to_dict(), **extra})
    if len(results) > 1 and args.output:
        with open(os.path.join(args.output, "comparison.txt"), "w") as f:
            f.write(_report.comparison(results))
    if args.json:
        doc = docs[0] if len(docs) == 1 else {"runs": docs}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0
    if len(results) == 1:
        sys.stdout.write(_report.summary(results[0]))
    else:
        sys.stdout.write(_report.comparison(results))
    for doc in docs:
        if "plot" in doc:
            sys.stdout.write(f"  {'plot':<13}{doc['plot']}\n")
        if "output" in doc:
            sys.stdout.write(f"  {'output':<13}{doc['output']}/ (stats.json, samples.csv)\n")
    return 0


def _progress_bar(total, desc=None, unit="rec"):
    """A tqdm bar on stderr when stderr is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit=unit, unit_scale=True, file=sys.stderr, leave=False,
                desc=desc)


def _same_file(a, b):
    """Whether paths a and b are one file (by device and inode: symbolic and hard links,
    ``..`` and ``/proc/self/fd`` aliases included); False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _byte_progress(reader):
    """(update(raw_bytes), close()) of a tqdm bar over the input's bytes, on a terminal."""
    bar = _progress_bar(reader.size, unit="B")
    if bar is None:
        return None, lambda: None
    seen = [0]

    def update(n):
        bar.update(n - seen[0])
        seen[0] = n
    return update, bar.close


def cmd_trace_convert(args):
    _check_input(args.input)
    if args.input != "-" and args.output != "-" and _same_file(args.input, args.output):
        raise CliError(f"-o {args.output}: is the input itself; the output would overwrite it")
    if args.output != "-":
        if not os.path.exists(args.output):
            _check_output_dir(args.output, "-o")
        elif os.path.isdir(args.output):
            raise CliError(f"-o {args.output}: is a directory")
    t0 = time.perf_counter()
    with _trace.open_trace(args.input, args.trace_format, args.allow_partial) as reader:
        update, close = _byte_progress(reader)
        try:
            with _trace.output_file(args.output) as fout:
                st = _trace.convert(reader, fout, tlb=args.tlb, progress=update)
        finally:
            close()
    dt = time.perf_counter() - t0
    out = sys.stderr if args.output == "-" else sys.stdout    # stdout may be the trace
    on_disk = ("" if args.output == "-" else
               f", {os.path.getsize(args.output):,} bytes on disk")
    out.write(f"{reader.name} ({st.format}): {st.lines:,} {st.unit}, {st.accesses:,} "
              f"accesses -> {st.records:,} records ({_bytes(st.bytes_out)} uncompressed"
              f"{on_disk}) in {'<stdout>' if args.output == '-' else args.output} "
              f"[{dt:.2f} s, {st.lines / dt / 1e6 if dt else 0:.1f} M {st.unit}/s]\n")
    if st.partial:
        out.write(f"{PROG}: warning: --allow-partial dropped the cut-off end: {st.partial}\n")
    return 0


def cmd_trace_info(args):
    _check_input(args.input)
    t0 = time.perf_counter()
    with _trace.open_trace(args.input, args.trace_format, args.allow_partial) as reader:
        update, close = _byte_progress(reader)
        try:
            info = _info.trace_info(reader, progress=update)
        finally:
            close()
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return 0
    sys.stdout.write(_info.format_info(info, time.perf_counter() - t0))
    return 0


def cmd_emulate(args):
    if args.guest_paging == "shadow":
        raise CliError("--guest-paging shadow needs the shadow MMU (shadow pages, unsync, "
                       "sync_page), which spte_fast does not have yet; 'tdp' runs the guest "
                       "with paging on under TDP (two-dimensional walks)")
    if args.output:
        _check_output_dir(args.output, "-o")
    config = _emulate.EmulateConfig(
        program=args.program, size=args.size, seed=args.seed, layout=args.layout,
        root_level=args.root_level, max_level=MAX_LEVELS[args.max_level],
        callback=args.callback, guest_bytes=args.guest_size, timeout_s=args.timeout,
        count_instructions=not args.no_count, guest_paging=args.guest_paging)
    res = _emulate.run(config)
    doc = res.to_dict()
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "stats.json"), "w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return 0
    sys.stdout.write(_emulate.summary(res))
    if args.output:
        sys.stdout.write(f"  {'output':<13}{args.output}/ (stats.json)\n")
    return 0


def cmd_demo(args):
    """KVM 6.10's memory cache on both initialisation paths, then a VM on each layout."""
    out = sys.stdout
    out.write(f"spte_fast {sf.__version__}: KVM x86 TDP MMU model (Linux 6.10)\n\n")
    out.write("memory caches (capacity 40, top-up min 5):\n")
    for row in _demo.cache_paths(5):
        st = row["stats"]
        out.write(f"  {row['name']:26s} "
                  f"path={'GFP_ZERO' if row['gfp_zero'] else 'memset64 fill':13s} "
                  f"nobjs={row['nobjs']:2d} fills={st['fills']:2d} "
                  f"zero_inits={st['zero_inits']} untouched={st['zero_untouched']:2d} "
                  f"bytes_written={st['init_bytes_written']:6d} "
                  f"page[{row['page']}][0]={row['entry0']:#x}\n")
    npages = 1 << 20
    out.write(f"\nfirst-touch 4K faults over {npages * 4 >> 10} MiB of guest memory:\n")
    for row in _demo.first_touch(npages):
        st = row["stats"]
        out.write(f"  {row['name']:24s} "
                  f"{row['results']['fixed'] / row['seconds'] / 1e6:6.1f} M faults/s  "
                  f"pt_pages={st['pt_pages']} cache_fills={st['cache_fills']} "
                  f"zero_inits={st['cache_zero_inits']} "
                  f"last leaf={row['last_leaf']:#x}\n")
    return 0


def _add_trace_input(p, partial_help):
    """--trace-format and --allow-partial, shared by every command that reads a trace."""
    p.add_argument("--trace-format", choices=list(_readers.FORMATS), metavar="FORMAT",
                   help="the input's format, when detection by content should not decide: "
                        + ", ".join(_readers.FORMATS))
    p.add_argument("--allow-partial", action="store_true", help=partial_help)


def build_parser():
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog=PROG, formatter_class=fmt,
                description="A fast model of Linux 6.10 KVM's x86 TDP MMU: simulate guest "
                            "accesses from\nbuilt-in workloads or traces, and inspect or "
                            "convert traces.",
                epilog="With no command: this help (exit status 0).  Exit status 2: bad "
                       "input (the usage\nand one error line on stderr); 1: the run "
                       "failed.")
    p.add_argument("--version", action="version", version=f"{PROG} {sf.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser(
        "simulate", formatter_class=fmt, help="push guest accesses through the model",
        description="Run a guest's accesses through a new VM from a built-in workload "
                    f"(default: random,\n{DEFAULT_FAULTS:,} accesses) or a trace, then print "
                    "a summary table (or --json)\nand audit the model (vm.audit()).",
        epilog="workloads:\n" + _indent(doc_section(_workloads.__doc__, "Workloads")) +
               "\n\nlayouts:\n" + "".join(f"  {k:<9} {v[0]}\n" for k, v in LAYOUTS.items()) +
               "\ntrace formats (detected by content; gzip or xz by magic):\n" +
               "".join(f"  {k:<10} {v}\n" for k, v in _readers.FORMATS.items()) +
               "\n-o DIR writes stats.json (the --json document), samples.csv (the time "
               "series:\n" + _indent(", ".join(_report.csv_columns(4))) +
               "; one row per\n--stats-interval records) and, with --plot, plot.png.")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--workload", choices=list(_workloads.DEFAULT_GUEST_BYTES),
                     help="built-in workload (default random; see below)")
    src.add_argument("--trace", metavar="FILE",
                     help="replay a trace of any known format (see below); - reads stdin")
    _add_trace_input(s, "keep the records before a cut-off end of the trace (a last line "
                        "without its newline, a cut compressed stream) instead of failing")
    s.add_argument("--faults", type=parse_count, metavar="N",
                   help=f"number of records: accesses, or faults with --mode fault (default "
                        f"{DEFAULT_FAULTS:,}; for a trace: its first N records, default all); "
                        "10M, 500k accepted")
    s.add_argument("--guest-size", type=parse_size, metavar="SIZE",
                   help="guest RAM, e.g. 4G (default: 4G, 64G for huge, a trace's highest "
                        "page rounded up to 2M); a trace's pages above it fault as MMIO")
    s.add_argument("--mode", choices=list(_engine.MODES), default="access",
                   help="access (default): each record is an access of the CPU, which hits "
                        "or exits to KVM (Vcpu.access_batch); fault: each record is a "
                        "not-present fault (Vcpu.fault_batch)")
    s.add_argument("--layout", type=parse_layouts, default=["ept"], metavar="L[,L...]",
                   help="SPTE layout (default ept; see below); several, comma-separated, "
                        "run the same input under each and print one comparison table")
    s.add_argument("--root-level", type=int, choices=(4, 5), default=4,
                   help="paging levels: 4 (48-bit GPA, gfn < 1<<36) or 5 (57-bit)")
    s.add_argument("--max-level", choices=list(MAX_LEVELS),
                   help="largest mapping (default: 1g for huge, else 4k)")
    s.add_argument("--vcpus", type=_vcpus, default=1, metavar="N",
                   help="vCPU threads, one Vcpu each; every segment is split between them")
    s.add_argument("--zap-every", type=parse_count, metavar="N",
                   help="every N records zap a 2M-aligned range (zap_gfn_range): a random "
                        "one of the guest, or of a trace's touched 2M regions so far")
    s.add_argument("--zap-all-every", type=parse_count, metavar="N",
                   help="every N records zap everything (zap_all)")
    s.add_argument("--seed", type=parse_seed, default=0, metavar="N",
                   help="random seed, an integer >= 0 (default 0)")
    s.add_argument("--chunk", type=parse_count, default=DEFAULT_CHUNK, metavar="N",
                   help=f"records per batch call at most (default {DEFAULT_CHUNK:,})")
    s.add_argument("--stats-interval", type=parse_count, metavar="N",
                   help=f"a sample every N records (default: about {_engine.SAMPLES} per run)")
    s.add_argument("--json", action="store_true",
                   help="print one JSON document (configuration, results, rates, stats, "
                        "samples) instead of the table; {\"runs\": [...]} for several layouts")
    s.add_argument("-o", "--output", metavar="DIR",
                   help="write stats.json, samples.csv (and plot.png with --plot) into DIR, "
                        "made if missing; DIR/LAYOUT/ for each of several layouts")
    s.add_argument("--plot", metavar="FILE", nargs="?", const="",
                   help="draw the run's growth (working set, leaves, tables per level, "
                        "rates): to FILE (.png, .svg, .pdf), or DIR/plot.png with -o "
                        f"(needs matplotlib: pip install '{PLOT_EXTRA}')")
    s.set_defaults(func=cmd_simulate)
    _sweep.add_parser(sub)

    t = sub.add_parser("trace", help="trace tools: convert, info", formatter_class=fmt)
    tsub = t.add_subparsers(dest="trace_command", metavar="COMMAND", parser_class=_Parser,
                            required=True)
    c = tsub.add_parser(
        "convert", formatter_class=fmt, help="any trace -> compact binary trace",
        description="Convert a trace of any known format (a valgrind lackey log, Pin "
                    "pinatrace, ChampSim,\nbinary records; plain, gzip or xz) into the "
                    "binary trace format, streaming.\nA progress bar shows on a terminal.",
        epilog="binary trace format:\n" +
               _indent(doc_section(_trace.__doc__, "Binary trace format")) +
               "\n\nconverting:\n" +
               _indent(doc_section(_trace.__doc__, "Converting (``spte-fast trace convert``)")))
    c.add_argument("input", metavar="INPUT", help="the trace to read (- for stdin)")
    c.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="binary trace to write (.gz, .xz or plain, by its name; - for "
                        "stdout, plain)")
    c.add_argument("--tlb", type=parse_count, metavar="N",
                   help="keep only the misses of an N-entry FIFO TLB")
    _add_trace_input(c, "keep what precedes a cut-off end (valgrind or Pin killed) "
                        "instead of failing; a warning says what was dropped")
    c.set_defaults(func=cmd_trace_convert)

    i = tsub.add_parser(
        "info", formatter_class=fmt, help="what a trace holds: records, pages, reuse",
        description="Read a trace once and print its records (reads, writes, fetches), "
                    "distinct 4K pages,\n2M and 1G regions, address span and a reuse "
                    "summary.",
        epilog="reuse:\n" + _indent(doc_section(_info.__doc__, "Reuse")))
    i.add_argument("input", metavar="FILE", help="the trace (any known format; - for stdin)")
    i.add_argument("--json", action="store_true", help="print one JSON document")
    _add_trace_input(i, "summarise what precedes a cut-off end instead of failing")
    i.set_defaults(func=cmd_trace_info)

    from .integrations import routines as _routines
    e = sub.add_parser(
        "emulate", formatter_class=fmt,
        help="run x86-64 code under unicorn with spte_fast as the MMU",
        description="Run PROGRAM under the unicorn CPU emulator with a vCPU's hardware view "
                    "answering\nevery TLB fill (spte_fast.integrations.unicorn), then print "
                    "the run's report\n(or --json) and audit the model.  Needs the [unicorn] "
                    "extra and, for the bundled\nroutines, a C compiler (they are built on "
                    "first use and cached).",
        epilog="bundled routines (default size):\n" + "".join(
            f"  {k:<8} {v:,}\n" for k, v in _routines.ROUTINES.items()) +
               "\nA flat binary is loaded at 0x1000 and entered there (rdi = 0x8000, rsp = "
               "0x80000);\nit runs until it executes hlt.  Guest paging is off: addresses "
               "are guest-physical.\n\nlayouts:\n" +
               "".join(f"  {k:<9} {v[0]}\n" for k, v in LAYOUTS.items()))
    e.add_argument("program", metavar="PROGRAM",
                   help="a bundled routine's name, or the path of a flat x86-64 binary")
    e.add_argument("--size", type=parse_count, metavar="N",
                   help="the routine's size (integers, keys, N of NxN, nodes, pages)")
    e.add_argument("--seed", type=parse_seed, default=0, metavar="N",
                   help="seed of the routine's input (default 0)")
    e.add_argument("--layout", choices=list(LAYOUTS), default="ept",
                   help="SPTE layout (default ept; see below)")
    e.add_argument("--root-level", type=int, choices=(4, 5), default=4,
                   help="EPT/NPT paging levels (default 4)")
    e.add_argument("--max-level", choices=list(MAX_LEVELS), default="1g",
                   help="largest mapping (default 1g, KVM's)")
    e.add_argument("--callback", choices=("c", "python"), default="c",
                   help="the TLB-fill callback: c (default: GIL-free, no Python per fill) or "
                        "python (the public API per fill)")
    e.add_argument("--guest-paging", choices=("none", "tdp", "shadow"), default="none",
                   help="none (default): the guest runs with paging off; tdp: its own page "
                        "tables map all memory with 2M pages and every fill is a "
                        "two-dimensional walk; shadow: not built yet")
    e.add_argument("--guest-size", type=parse_size, metavar="SIZE",
                   help="guest RAM for a flat binary (default 64M; a routine sizes its own)")
    e.add_argument("--timeout", type=parse_seconds, default=60.0, metavar="S",
                   help="stop a flat binary after S seconds (default 60; 0: no limit)")
    e.add_argument("--no-count", action="store_true",
                   help="do not count instructions (a second run of the program on unicorn "
                        "alone)")
    e.add_argument("--json", action="store_true",
                   help="print one JSON document instead of the report")
    e.add_argument("-o", "--output", metavar="DIR", help="write stats.json into DIR")
    e.set_defaults(func=cmd_emulate)

    d = sub.add_parser("demo", help="the two cache initialisation paths, side by side")
    d.set_defaults(func=cmd_demo)
    selftests.add_parsers(sub)
    return p


def _indent(text):
    return "".join(f"  {line}\n" for line in text.splitlines()).rstrip("\n")


def _on_sigterm(signum, frame):
    raise _Terminated()


def _stdout_closed():
    """stdout's reader went away (EPIPE): a normal end of output.  Later writes, and the
    interpreter's final flush, go to /dev/null instead of raising again."""
    with contextlib.suppress(OSError, ValueError):
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)


def _usage(argv):
    """The usage line(s) of the command ``argv`` names (for errors found after parsing)."""
    argv = sys.argv[1:] if argv is None else list(map(str, argv))
    parser = build_parser()
    words = [a for a in argv if not a.startswith("-")][:2]
    for action in parser._subparsers._group_actions:
        sub = action.choices.get(words[0]) if words else None
        if sub is not None:
            for a2 in (sub._subparsers._group_actions if sub._subparsers else []):
                if len(words) > 1 and words[1] in a2.choices:
                    return a2.choices[words[1]].format_usage()
            return sub.format_usage()
    return parser.format_usage()


def main(argv=None):
    """Run the command; returns the exit status (0 ok, 1 the run failed, 2 bad input,
    130 interrupted, 143 terminated).  A closed stdout (EPIPE) ends the output normally."""
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    in_main = in_main and old_term is not None     # a handler set outside Python: keep it
    try:
        try:
            parser = build_parser()
            args = parser.parse_args(argv)
            func = getattr(args, "func", None)
            if func is None:                        # a bare spte-fast: the help, status 0
                parser.print_help(sys.stdout)
                return 0
            rc = func(args)
            sys.stdout.flush()
            return rc
        except BrokenPipeError:
            _stdout_closed()
            return 0
        except CliError as e:
            sys.stderr.write(f"{e.usage or _usage(argv)}{PROG}: error: {e}\n")
            return 2
        except InputError as e:
            sys.stderr.write(f"{PROG}: error: {e}\n")
            return 2
        except OSError as e:
            if e.errno == errno.EPIPE and e.filename is None:
                _stdout_closed()
                return 0
            sys.stderr.write(f"{PROG}: error: {f'{e.filename}: ' if e.filename else ''}"
                             f"{e.strerror or e}\n")
            return 2
        except RunError as e:
            sys.stderr.write(f"{PROG}: error: {e}\n")
            return 1
        except KeyboardInterrupt:
            sys.stderr.write(f"{PROG}: interrupted\n")
            return 130
        except _Terminated:
            sys.stderr.write(f"{PROG}: terminated\n")
            return 143
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
