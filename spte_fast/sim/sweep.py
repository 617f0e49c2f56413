"""``spte-fast sweep GRID.toml -o DIR``: ``simulate`` over a parameter grid, on dask.distributed.

The grid file is TOML with two tables.  ``[grid]`` maps ``simulate`` options, spelled as on
its command line with ``_`` for ``-``, to lists of values; ``[fixed]`` gives options every
point shares.  Every combination of the lists (the Cartesian product, in the file's order)
is one point, and every point one task::

    [grid]
    layout = ["ept", "npt", "legacy"]
    root_level = [4, 5]
    workload = ["seq", "random"]

    [fixed]
    faults = "2M"            # counts: an int or "500k", "10M" (as simulate's --faults)
    guest_size = "1G"        # sizes: an int of bytes or "512M", "4G"

The options (``OPTIONS``): ``workload`` or ``trace`` (a path, relative to the grid file;
it must be readable where the workers run), ``faults``, ``guest_size``, ``mode``,
``layout``, ``root_level``, ``max_level``, ``vcpus``, ``zap_every``, ``zap_all_every``,
``seed``, ``chunk``; what a point leaves out takes ``simulate``'s default.

Each task builds a ``SimConfig`` and its source in the worker, runs ``engine.run`` and
returns one row of scalars: ``point`` (a stable hash of the point's options), the point's
options as ``point.<option>``, then the ``--json`` document flattened with dots
(``config.layout``, ``accesses``, ``faults``, ``results.hits``, ``hardware.hw_walks``,
``zaps.all``, ``stats.pt_pages_l1``, ``elapsed_s``, ...; no samples, no memslot list).  The
rows go to ``DIR/results.parquet`` and ``DIR/results.csv``, rewritten as each point
finishes; a point whose hash is in ``DIR/results.parquet`` already is skipped, so a sweep
that was stopped resumes where it was, and a grid that grew runs only its new points.
``DIR/summary.png`` plots one metric (``--metric``) per point when matplotlib is installed.

The engine is a ``LocalCluster`` of worker processes (``--workers``, one thread each, each
with ``--memory-limit``), or the cluster at ``--scheduler ADDRESS``.  dask, pyarrow, tqdm
and matplotlib are imported only when a sweep runs (the ``[sweep]`` extra).
"""
import hashlib
import itertools
import json
import os
import re
import sys
import time

from . import engine as _engine
from . import workloads as _workloads
from .errors import InputError, RunError, SimError

DEFAULT_FAULTS = 10_000_000         # simulate's default --faults
DEFAULT_WORKERS = 2
DEFAULT_MEMORY_LIMIT = "4GiB"
DEFAULT_METRIC = "accesses_per_s"
RESULTS = "results"                 # DIR/results.parquet, DIR/results.csv
PLOT = "summary.png"
EXTRA_HINT = "pip install 'spte_fast[sweep]'"

_SIZE = re.compile(r"^(\d+)\s*([kmgtp]?)(i?b)?$", re.I)
_COUNT = re.compile(r"^([\d_]+)\s*([kmg]?)$", re.I)


# ---------------------------------------------------------------------------------------
# Option values: what simulate's command line accepts, from TOML values
# ---------------------------------------------------------------------------------------

def _int(value, low, high=None):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"not an integer: {value!r}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{value} is not in [{low}, {high if high is not None else 'inf'}]")
    return value


def _count(value):
    """An int >= 1, or a string as simulate's counts: '10M', '500k', '10_000'."""
    if isinstance(value, str):
        m = _COUNT.match(value.strip())
        if not m or not m.group(1).strip("_"):
            raise ValueError(f"not a count: {value!r} (e.g. 1000000, \"10M\")")
        value = int(m.group(1).replace("_", "")) * 1000 ** "_KMG".find(
            m.group(2).upper() or "_")
    return _int(value, 1)


def _size(value):
    """Bytes, a positive multiple of 4 KiB: an int or a string as '4G', '512M', '64KiB'."""
    if isinstance(value, str):
        m = _SIZE.match(value.strip())
        if not m:
            raise ValueError(f"not a size: {value!r} (e.g. \"4G\", \"512M\")")
        value = int(m.group(1)) << (10 * "KMGTP".find(m.group(2).upper()) + 10
                                    if m.group(2) else 0)
    _int(value, 1)
    if value % 4096:
        raise ValueError(f"{value} bytes is not a multiple of 4 KiB")
    return value


def _choice(choices):
    def check(value):
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value
    return check


def _path(value):
    if not isinstance(value, str) or not value:
        raise ValueError(f"not a path: {value!r}")
    return value


#: simulate's options a grid may set (``_`` for ``-``), each with its check/conversion
OPTIONS = {
    "workload": _choice(list(_workloads.DEFAULT_GUEST_BYTES)),
    "trace": _path,
    "faults": _count,
    "guest_size": _size,
    "mode": _choice(list(_engine.MODES)),
    "layout": _choice(list(_engine.LAYOUTS)),
    "root_level": _choice([4, 5]),
    "max_level": _choice(list(_engine.MAX_LEVELS)),
    "vcpus": lambda v: _int(v, 1, _engine.MAX_VCPUS),
    "zap_every": _count,
    "zap_all_every": _count,
    "seed": lambda v: _int(v, 0),
    "chunk": _count,
}


# ---------------------------------------------------------------------------------------
# The grid file
# ---------------------------------------------------------------------------------------

def _toml():
    if sys.version_info >= (3, 11):
        import tomllib
        return tomllib
    try:
        import tomli
    except ImportError:
        raise InputError(f"reading a grid on Python < 3.11 needs tomli ({EXTRA_HINT})"
                         ) from None
    return tomli


def load_grid(path):
    """The points of the grid file ``path``: a list of dicts, option -> value (converted:
    counts and sizes as ints, a trace as an absolute path).  ``InputError`` names what is
    wrong: malformed TOML, a table or an option it does not know (listing the ones it
    does), a value the option refuses, an empty or repeating list, a point with both a
    workload and a trace.  A trace must exist (it is read where the point runs)."""
    toml = _toml()
    with open(path, "rb") as f:
        try:
            doc = toml.load(f)
        except toml.TOMLDecodeError as e:
            raise InputError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(doc) - {"grid", "fixed"})
    if unknown:
        raise InputError(f"{path}: unknown table or key {', '.join(map(repr, unknown))} "
                         f"(a grid file has [grid] and [fixed])")
    grid, fixed = doc.get("grid"), doc.get("fixed", {})
    if not isinstance(grid, dict) or not grid:
        raise InputError(f"{path}: no [grid] table, or it is empty (it maps simulate "
                         f"options to lists of values)")
    if not isinstance(fixed, dict):
        raise InputError(f"{path}: fixed must be a table ([fixed])")
    base = os.path.dirname(os.path.abspath(path))

    def convert(table, name, value):
        if name not in OPTIONS:
            hint = (f" (spell it {name.replace('-', '_')!r})"
                    if name.replace("-", "_") in OPTIONS else "")
            raise InputError(f"{path}: [{table}] unknown option {name!r}{hint}; the options "
                             f"are {', '.join(OPTIONS)}")
        try:
            value = OPTIONS[name](value)
        except ValueError as e:
            raise InputError(f"{path}: [{table}] {name}: {e}") from None
        if name == "trace":
            value = os.path.normpath(os.path.join(base, value))
            if not os.path.isfile(value):
                raise InputError(f"{path}: [{table}] trace {value}: no such file")
        return value

    both = sorted(set(grid) & set(fixed))
    if both:
        raise InputError(f"{path}: {', '.join(both)} in both [grid] and [fixed]")
    lists = {}
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise InputError(f"{path}: [grid] {name} must be a non-empty list of values "
                             f"(a single value goes in [fixed])")
        lists[name] = [convert("grid", name, v) for v in values]
        if len(set(map(repr, lists[name]))) < len(values):
            raise InputError(f"{path}: [grid] {name} lists a value twice")
    shared = {}
    for name, value in fixed.items():
        if isinstance(value, list):
            raise InputError(f"{path}: [fixed] {name} is a list (lists go in [grid])")
        shared[name] = convert("fixed", name, value)
    names = list(lists)
    if "workload" in names + list(shared) and "trace" in names + list(shared):
        raise InputError(f"{path}: a point has a workload or a trace, not both")
    return [{**shared, **dict(zip(names, combo))}
            for combo in itertools.product(*lists.values())]


def point_key(point):
    """A stable name for a point: the hash of its options (order and spelling free)."""
    text = json.dumps(point, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def grid_options(points):
    """The options that differ between points (what names a point in the plot)."""
    names = list(dict.fromkeys(k for p in points for k in p))
    return [n for n in names if len({repr(p.get(n)) for p in points}) > 1]


# ---------------------------------------------------------------------------------------
# One point: what a worker runs
# ---------------------------------------------------------------------------------------

def make_config(point):
    """The point's ``SimConfig`` (``InputError`` when the engine refuses it)."""
    level = point.get("max_level")
    return _engine.SimConfig(
        layout=point.get("layout", "ept"), root_level=point.get("root_level", 4),
        max_level=_engine.MAX_LEVELS[level] if level else None,
        vcpus=point.get("vcpus", 1), zap_every=point.get("zap_every"),
        zap_all_every=point.get("zap_all_every"), seed=point.get("seed", 0),
        chunk=point.get("chunk", _engine.DEFAULT_CHUNK), mode=point.get("mode", "access"))


def make_source(point):
    """The point's source, as ``simulate`` makes it (a trace is read here, once)."""
    if "trace" in point:
        return _workloads.trace_source(point["trace"], point.get("root_level", 4),
                                       faults=point.get("faults"),
                                       guest_bytes=point.get("guest_size"))
    return _workloads.workload(point.get("workload", "random"),
                               point.get("faults", DEFAULT_FAULTS), point.get("guest_size"),
                               point.get("seed", 0))


def check_point(point):
    """What can be checked without running: the configuration, and a workload's guest
    against the address width (a trace is checked when its point runs)."""
    config = make_config(point)
    if "trace" not in point:
        with make_source(point) as source:
            _engine.check(config, source)


def flatten(doc, prefix=""):
    """A nested dict as one level of scalars, keys joined with dots; lists are left out."""
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        elif v is None or isinstance(v, (bool, int, float, str)):
            out[f"{prefix}{k}"] = v
    return out


def result_row(point, result):
    """The table row of a point's ``SimResult``: its key, its options, the flat document."""
    doc = result.to_dict()
    doc.pop("samples", None)
    return {"point": point_key(point), **{f"point.{k}": v for k, v in point.items()},
            **flatten(doc)}


def run_point(point):
    """Run one point (in a worker); its row, or ``{"point": key, "error": message}`` when
    the simulator refuses the point or the run fails (``SimError``)."""
    try:
        config = make_config(point)
        with make_source(point) as source:
            res = _engine.run(config, source)
    except SimError as e:
        return {"point": point_key(point), "error": f"{type(e).__name__}: {e}"}
    return result_row(point, res)


def metric_columns():
    """The numeric columns a row has (what ``--metric`` may name), from a tiny real run."""
    point = {"workload": "seq", "faults": 1, "guest_size": 2 << 20}
    row = result_row(point, _engine.run(make_config(point), make_source(point)))
    return [k for k, v in row.items() if not k.startswith("point")
            and isinstance(v, (int, float)) and not isinstance(v, bool)]


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------

def _require(module):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise InputError(f"sweep needs dask.distributed and pyarrow, and {module} is not "
                         f"installed ({EXTRA_HINT})") from None


def read_rows(out_dir):
    """The rows of ``out_dir/results.parquet`` (none when it does not exist)."""
    path = os.path.join(out_dir, RESULTS + ".parquet")
    if not os.path.exists(path):
        return []
    pq = _require("pyarrow.parquet")
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:          # pyarrow raises its own ArrowInvalid, OSError, ...
        raise InputError(f"{path}: not a sweep's results ({e}); remove it or give "
                         f"another -o") from None
    if rows and "point" not in rows[0]:
        raise InputError(f"{path}: not a sweep's results (no 'point' column); remove it or "
                         f"give another -o")
    return rows


def write_rows(out_dir, rows):
    """``rows`` as ``out_dir/results.parquet`` and ``.csv`` (every column any row has;
    each file replaced whole, so a reader never sees half of one)."""
    pa = _require("pyarrow")
    pq = _require("pyarrow.parquet")
    pcsv = _require("pyarrow.csv")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = pa.table({c: pa.array([r.get(c) for r in rows]) for c in columns})
    for ext, write in (("parquet", pq.write_table), ("csv", pcsv.write_csv)):
        path = os.path.join(out_dir, f"{RESULTS}.{ext}")
        tmp = f"{path}.tmp"
        write(table, tmp)
        os.replace(tmp, path)


def plot(rows, points, metric, path):
    """A horizontal bar per point of ``metric``, named by the options that vary."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    by_key = {r["point"]: r for r in rows}
    names = grid_options(points)
    labels, values = [], []
    for p in points:
        row = by_key.get(point_key(p))
        if row is not None and row.get(metric) is not None:
            labels.append(", ".join(f"{n}={os.path.basename(str(p.get(n)))}" for n in names)
                          or point_key(p))
            values.append(row[metric])
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.3 * len(values)))
    ax.barh(range(len(values)), values)
    ax.set_yticks(range(len(values)), labels, fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel(metric)
    ax.set_title(f"spte-fast sweep: {metric} per point")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Running a sweep
# ---------------------------------------------------------------------------------------

class Summary:
    """What a sweep did: points run, skipped (already in the output) and failed."""

    def __init__(self, total, skipped):
        self.total, self.skipped, self.ran, self.failed = total, skipped, [], {}
        self.plot = None


def _client(scheduler, workers, memory_limit):
    distributed = _require("distributed")
    if scheduler:
        try:
            return distributed.Client(scheduler, timeout="10s"), None
        except (OSError, TimeoutError) as e:
            raise InputError(f"--scheduler {scheduler}: cannot connect ({e})") from None
    cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1,
                                       processes=True, memory_limit=memory_limit,
                                       dashboard_address=":0")
    return distributed.Client(cluster), cluster


def run_sweep(points, out_dir, scheduler=None, workers=DEFAULT_WORKERS,
              memory_limit=DEFAULT_MEMORY_LIMIT, metric=DEFAULT_METRIC, progress=None):
    """Run every point of ``points`` not yet in ``out_dir``; returns a ``Summary``.

    ``progress(n)``, when given, returns a progress bar (``update(k)``, ``close()``) for the
    ``n`` points to run.  The table is rewritten after every point, and once more when the
    sweep stops for any reason.
    """
    for p in points:
        check_point(p)
    rows = read_rows(out_dir)
    done = {r["point"] for r in rows}
    todo = [p for p in points if point_key(p) not in done]
    summary = Summary(len(points), len(points) - len(todo))
    if todo:
        _require("pyarrow")
        client, cluster = _client(scheduler, workers, memory_limit)
        distributed = _require("distributed")
        bar = progress(len(todo)) if progress is not None else None
        try:
            futures = {client.submit(run_point, p, key=f"spte-fast-sweep-{point_key(p)}",
                                     pure=False): p for p in todo}
            try:
                for fut in distributed.as_completed(futures):
                    p = futures[fut]
                    try:
                        row = fut.result()
                    except Exception as e:      # a worker that died (memory limit), ...
                        row = {"point": point_key(p), "error": f"{type(e).__name__}: {e}"}
                    if "error" in row:
                        summary.failed[row["point"]] = (p, row["error"])
                    else:
                        rows.append(row)
                        summary.ran.append(p)
                        write_rows(out_dir, rows)
                    if bar is not None:
                        bar.update(1)
            finally:
                if rows:
                    write_rows(out_dir, rows)
        finally:
            if bar is not None:
                bar.close()
            client.close()
            if cluster is not None:
                cluster.close()
    if rows and metric:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            pass
        else:
            summary.plot = os.path.join(out_dir, PLOT)
            plot(rows, points, metric, summary.plot)
    return summary


# ---------------------------------------------------------------------------------------
# The command line (spte_fast.cli calls add_parser)
# ---------------------------------------------------------------------------------------

def add_parser(subparsers):
    """Register ``sweep`` on ``subparsers`` (argparse's), with its options and handler."""
    import argparse

    def positive(text):
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
        return n

    s = subparsers.add_parser(
        "sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="simulate over a grid of options, on dask.distributed",
        description="Run 'simulate' for every point of a grid of options, each point a task "
                    "on\ndask.distributed, into one table (DIR/results.parquet and .csv) and "
                    "a plot.\nPoints already in DIR are skipped.  Needs the [sweep] extra ("
                    f"{EXTRA_HINT}).",
        epilog="grid file (TOML):\n" + "".join(
            f"  {line}\n" for line in __doc__.split("::\n\n", 1)[1].split("\n\n", 1)[0]
            .splitlines()) + f"\noptions: {', '.join(OPTIONS)}")
    s.add_argument("grid", metavar="GRID.toml", help="the grid: [grid] lists, [fixed] values")
    s.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="directory of results.parquet, results.csv, summary.png (made if "
                        "missing; the points already in it are skipped)")
    s.add_argument("--scheduler", metavar="ADDRESS",
                   help="an existing cluster's scheduler (e.g. tcp://host:8786; start one "
                        "with 'dask scheduler' and 'dask worker ADDRESS'); default: a "
                        "LocalCluster")
    s.add_argument("--workers", type=positive, default=DEFAULT_WORKERS, metavar="N",
                   help=f"LocalCluster worker processes, one thread each (default "
                        f"{DEFAULT_WORKERS})")
    s.add_argument("--memory-limit", default=DEFAULT_MEMORY_LIMIT, metavar="BYTES",
                   help=f"LocalCluster memory per worker, e.g. 2GiB (default "
                        f"{DEFAULT_MEMORY_LIMIT}); a worker beyond it is restarted and its "
                        f"point fails")
    s.add_argument("--metric", default=DEFAULT_METRIC, metavar="COLUMN",
                   help=f"the column summary.png shows per point (default {DEFAULT_METRIC})")
    s.set_defaults(func=cmd_sweep)
    return s


def cmd_sweep(args):
    """The ``sweep`` command: 0 when every point is in the table, 1 when one failed."""
    points = load_grid(args.grid)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise InputError(f"-o {args.output}: is not a directory")
    for p in points:
        check_point(p)
    if args.metric not in metric_columns():
        raise InputError(f"--metric {args.metric}: not a numeric column of the results "
                         f"(e.g. accesses_per_s, faults, results.hits, stats.pt_pages)")
    os.makedirs(args.output, exist_ok=True)
    t0 = time.perf_counter()
    s = run_sweep(points, args.output, scheduler=args.scheduler, workers=args.workers,
                  memory_limit=args.memory_limit, metric=args.metric, progress=_progress_bar)
    out = sys.stdout
    out.write(f"spte-fast sweep {args.grid}: {s.total} points: {len(s.ran)} run, "
              f"{s.skipped} skipped (already in {args.output}), {len(s.failed)} failed "
              f"[{time.perf_counter() - t0:.1f} s]\n")
    base = os.path.join(args.output, RESULTS)
    out.write(f"  results  {base}.parquet, {base}.csv\n")
    if s.plot:
        out.write(f"  plot     {s.plot} ({args.metric})\n")
    for key, (p, err) in s.failed.items():
        out.write(f"  failed   {key} {json.dumps(p)}: {err}\n")
    if s.failed:
        raise RunError(f"{len(s.failed)} of {s.total} points failed (listed on stdout); "
                       f"run the sweep again to retry them")
    return 0


def _progress_bar(total):
    """A tqdm bar of points on stderr when stderr is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="point", file=sys.stderr, leave=False)
