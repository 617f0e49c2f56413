"""The ``spte-fast`` command (also ``python -m spte_fast``): parsing and printing only.

``spte-fast simulate``       push millions of guest faults through the TDP MMU model, from a
                             built-in workload (``spte_fast.sim.workloads``) or a binary trace,
                             with optional interleaved zaps and vCPU threads; print a summary
                             table or (``--json``) one JSON document; ``--plot`` draws the run.
``spte-fast trace convert``  turn a valgrind lackey log into the binary trace format
                             (``spte_fast.sim.trace``).
``spte-fast demo``           the two initialisation paths of KVM 6.10's memory cache, side by
                             side (also what ``python -m spte_fast`` alone runs).

The work is done by ``spte_fast.sim`` (``engine.run``, ``report``, ``demo``).  Bad input (an
unknown option value, a missing or malformed file, a trace beyond the address width: the
parser's errors, ``sim.InputError``, ``OSError``) prints one line ``spte-fast: error: ...``
on stderr and exits with status 2; a run that fails (``sim.RunError``: the page-table pool
ran out, not enough host memory, the audit) prints one such line and exits with status 1.
"""
import argparse
import contextlib
import errno
import os
import re
import signal
import sys
import threading
import time

import spte_fast as sf

from .sim import demo as _demo
from .sim import engine as _engine
from .sim import report as _report
from .sim import selftests
from .sim import trace as _trace
from .sim import workloads as _workloads
from .sim.errors import HostMemoryError, InputError, RunError

PROG = "spte-fast"
DEFAULT_FAULTS = 10_000_000
DEFAULT_CHUNK = _engine.DEFAULT_CHUNK
LAYOUTS = _engine.LAYOUTS
MAX_LEVELS = _engine.MAX_LEVELS
_bytes = _report.format_bytes


class CliError(Exception):
    """Bad input found by the command line itself: one line, exit status 2."""


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the cleanup of a half-written -o runs."""


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


def parse_seed(text):
    """A seed: a decimal int >= 0."""
    try:
        n = int(text.strip(), 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {n}")
    return n


def _vcpus(text):
    n = parse_count(text)
    if n > _engine.MAX_VCPUS:
        raise argparse.ArgumentTypeError(f"at most {_engine.MAX_VCPUS} vCPUs, not {n}")
    return n


def doc_section(doc, title):
    """The body of the section ``title`` (a line followed by a ---- line) of a docstring."""
    m = re.search(rf"^{re.escape(title)}\n-+\n(.*?)(?=^[^\n]+\n-+\n|\Z)", doc, re.M | re.S)
    return m.group(1).strip() if m else ""


# ---------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------

def _check_input(path, option=None):
    """An input file that exists and is not a directory (``option`` names it in errors)."""
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
        raise CliError("--plot needs matplotlib, which is not installed "
                       "(pip install 'spte_fast[plot]')") from None


def _check_plot(path):
    """--plot: a writable file name whose extension matplotlib can write (checked before the
    run, which may take minutes; without an extension matplotlib would add .png)."""
    _check_output_dir(path, "--plot")
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


def cmd_simulate(args):
    if args.plot:
        _check_plot(args.plot)
    try:
        config = _engine.SimConfig(
            layout=args.layout, root_level=args.root_level,
            max_level=MAX_LEVELS[args.max_level] if args.max_level else None, vcpus=args.vcpus,
            zap_every=args.zap_every, zap_all_every=args.zap_all_every, seed=args.seed,
            chunk=args.chunk, mode=args.mode)
    except InputError as e:         # the parser's types already refuse these; to be sure
        raise CliError(f"{e} (check the options)") from None
    if args.trace:
        _check_input(args.trace, "--trace")
        source = _workloads.trace_source(args.trace, args.root_level, faults=args.faults,
                                         guest_bytes=args.guest_size)
    else:
        source = _workloads.workload(args.workload or "random", args.faults or DEFAULT_FAULTS,
                                     args.guest_size, args.seed)
    with source:
        _engine.check(config, source)       # before the progress bar draws
        _check_pfns(source, args)
        bar = _progress_bar(source.faults)
        try:
            res = _engine.run(config, source, progress=bar.update if bar else None)
        except HostMemoryError as e:
            raise RunError(f"not enough host memory to simulate a {_bytes(e.guest_bytes)} "
                           f"guest with {e.faults:,} faults; give a smaller --guest-size"
                           ) from None
        finally:
            if bar:
                bar.close()
    if args.plot:
        _report.plot(res, args.plot)
    if args.json:
        sys.stdout.write(_report.to_json(res, **({"plot": args.plot} if args.plot else {})))
        sys.stdout.write("\n")
    else:
        sys.stdout.write(_report.summary(res))
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
    return tqdm(total=total, unit="rec", unit_scale=True, file=sys.stderr, leave=False)


def _same_file(a, b):
    """Whether paths a and b are one file (by device and inode: symbolic and hard links,
    ``..`` and ``/proc/self/fd`` aliases included); False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def cmd_trace_convert(args):
    _check_input(args.log)
    if _same_file(args.log, args.output):
        raise CliError(f"-o {args.output}: is the log itself; the output would overwrite it")
    if not os.path.exists(args.output):
        _check_output_dir(args.output, "-o")
    elif os.path.isdir(args.output):
        raise CliError(f"-o {args.output}: is a directory")
    t0 = time.perf_counter()
    st = _trace.convert_lackey(args.log, args.output, tlb=args.tlb)
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
                   help=f"number of records: accesses, or faults with --mode fault (default "
                        f"{DEFAULT_FAULTS:,}; for a trace: its first N records, default all); "
                        "10M, 500k accepted")
    s.add_argument("--guest-size", type=parse_size, metavar="SIZE",
                   help="guest RAM, e.g. 4G (default: 4G, 64G for huge, a trace's highest "
                        "page rounded up to 2M)")
    s.add_argument("--mode", choices=list(_engine.MODES), default="access",
                   help="access (default): each record is an access of the CPU, which hits "
                        "or exits to KVM (Vcpu.access_batch); fault: each record is a "
                        "not-present fault (Vcpu.fault_batch)")
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
    s.add_argument("--seed", type=parse_seed, default=0, metavar="N",
                   help="random seed, an integer >= 0 (default 0)")
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


def main(argv=None):
    """Run the command; returns the exit status (0 ok, 1 the run failed, 2 bad input,
    130 interrupted, 143 terminated).  A closed stdout (EPIPE) ends the output normally."""
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    in_main = in_main and old_term is not None     # a handler set outside Python: keep it
    try:
        try:
            args = build_parser().parse_args(argv)
            rc = (getattr(args, "func", None) or cmd_demo)(args)
            sys.stdout.flush()
            return rc
        except BrokenPipeError:
            _stdout_closed()
            return 0
        except (CliError, InputError) as e:
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
