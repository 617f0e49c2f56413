"""Run a configured simulation: a source of accesses -> the vCPU's hardware view -> stats.

``run(SimConfig(...), source)`` builds a new ``Vm`` sized for the source, adds its memslots,
runs the source's chunks through ``Vcpu.access_batch`` (split between ``vcpus`` threads,
each with its own ``Vcpu``): each record is an access the CPU makes, which either hits (the
page walk finds a permitting leaf and sets A/D) or exits to KVM (an EPT violation or
misconfiguration, handled by ``kvm_mmu_page_fault``).  ``mode="fault"`` delivers every
record as a not-present fault instead (``Vcpu.fault_batch``, the model before the hardware
view).  The periodic zaps run between segments; then the model is audited and a
``SimResult`` returned.  Sources come from ``spte_fast.sim.workloads`` (``workload(...)``,
``trace_source(...)``).  Python runs per segment, never per access.

A producer thread generates (or reads) the next chunks, and counts the working set of each,
while the vCPUs run the current one (numpy's generators, the trace readers, the
working-set pass and the batches release the GIL); the batches still run in the source's
order, so results do not depend on it.

Example::

    from spte_fast.sim import SimConfig, run, workload
    res = run(SimConfig(zap_every=10_000), workload("seq", 100_000, 16 << 20))
    res.results["hits"], res.results["fixed"], res.stats["pages_4k"]
    res.to_dict()            # the document ``spte-fast simulate --json`` prints
"""
import concurrent.futures
import contextlib
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np

import spte_fast as sf

from ._distinct import count_new, first_seen
from .errors import AuditFailed, HostMemoryError, InputError, RunError
from .report import format_bytes
from .workloads import PAGES_2M, pool_pages

DEFAULT_CHUNK = 1 << 17              # records per source chunk: 1 MiB of gfns, which the
                                     # producer's core writes and the vCPU's reads while
                                     # they are still cached (1 Mi chunks, 8 MiB each, went
                                     # through L3 and evicted the page tables from it)
SAMPLES = 200                        # samples per run unless stats_interval says otherwise
MAX_VCPUS = 256

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
MODES = {"access": "each record is an access of the CPU: a hit, or an exit to KVM",
         "fault": "each record is delivered to KVM as a not-present fault"}
#: the hardware view's counters of vm.stats a result reports
HW_STATS = ("hw_walks", "hw_ad_sets", "exits_ept_violation", "exits_misconfig")
LEVEL_NAMES = {v: k for k, v in MAX_LEVELS.items()}


@dataclass(frozen=True)
class SimConfig:
    """How to run a source.  Every field has the command line's default."""
    layout: str = "ept"              # a key of LAYOUTS
    root_level: int = 4              # 4 (gfn < 1 << 36) or 5 (gfn < 1 << 45)
    max_level: int = None            # largest mapping, 1..3 (PG_LEVEL_*); None: the source's
    vcpus: int = 1                   # threads, one Vcpu each; every chunk is split between them
    zap_every: int = None            # zap a random 2M-aligned range every N records
    zap_all_every: int = None        # zap_all every N records
    seed: int = 0                    # the zaps' random ranges (a workload has its own seed)
    chunk: int = DEFAULT_CHUNK       # records per source chunk
    mode: str = "access"             # a key of MODES
    stats_interval: int = None       # a sample every N accesses; None: about SAMPLES per run

    def __post_init__(self):
        def count(name, value, low=1, high=None, optional=False):
            if optional and value is None:
                return
            if (not isinstance(value, int) or isinstance(value, bool) or value < low
                    or (high is not None and value > high)):
                raise InputError(f"{name} must be an int in [{low}, {high or 'inf'}], "
                                 f"not {value!r}")
        if self.mode not in MODES:
            raise InputError(f"unknown mode {self.mode!r} (one of {', '.join(MODES)})")
        if self.layout not in LAYOUTS:
            raise InputError(f"unknown layout {self.layout!r} (one of {', '.join(LAYOUTS)})")
        if self.root_level not in (4, 5):
            raise InputError(f"root_level must be 4 or 5, not {self.root_level!r}")
        if self.max_level is not None and self.max_level not in LEVEL_NAMES:
            raise InputError(f"max_level must be 1, 2 or 3 (or None), not {self.max_level!r}")
        count("vcpus", self.vcpus, 1, MAX_VCPUS)
        count("zap_every", self.zap_every, optional=True)
        count("zap_all_every", self.zap_all_every, optional=True)
        count("chunk", self.chunk)
        count("stats_interval", self.stats_interval, optional=True)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise InputError(f"seed must be a non-negative int, not {self.seed!r}")

    @property
    def gfn_limit(self):
        """Every gfn of the guest must be below this (the address width of the root)."""
        return 1 << (9 * self.root_level)


@dataclass
class Sample:
    """The state after ``accesses`` records (every ``stats_interval``, and at the end)."""
    faults: int                      # faults (exits handled by KVM) so far
    seconds: float                   # since the run started
    faults_per_s: float              # since the previous sample, in the batch calls alone
    pt_pages: tuple                  # tables per level, L1 first (pt_pages_l1, ...)
    accesses: int = 0                # records done so far
    accesses_per_s: float = 0.0      # since the previous sample, in the batch calls alone
    results: dict = None             # hits, fixed, spurious, emulate, retry, fast so far
    leaves: tuple = (0, 0, 0)        # present leaves: 4K, 2M, 1G (pages_4k, ...)
    working_set: int = 0             # distinct 4K pages accessed so far

    @property
    def pt_bytes(self):
        return 4096 * sum(self.pt_pages)

    def to_dict(self):
        return {"accesses": self.accesses, "faults": self.faults, "seconds": self.seconds,
                "accesses_per_s": self.accesses_per_s, "faults_per_s": self.faults_per_s,
                "results": dict(self.results or {}),
                "leaves": {"4k": self.leaves[0], "2m": self.leaves[1], "1g": self.leaves[2]},
                "pt_pages": list(self.pt_pages), "pt_bytes": self.pt_bytes,
                "working_set": self.working_set}


class Distinct:
    """The distinct values (below ``limit``) of a stream of uint64 chunks: a byte per
    value when ``limit`` is at most ``DENSE_LIMIT`` (allocated lazily by the OS, so
    committed only where values fall; one C pass per chunk, ``_distinct.first_seen``),
    else a sorted array.  ``values()`` lists them in the order first seen (dense) or
    sorted (sparse).  ``ordered=False`` keeps only the count (and the set, as a bit per
    value, ``_distinct.count_new``): ``values()`` is then sorted."""

    DENSE_LIMIT = 1 << 30

    def __init__(self, limit, ordered=True):
        self._limit = limit
        self.count = 0
        self._bits = None
        if not ordered and limit <= self.DENSE_LIMIT:
            self._bits = np.zeros(-(-limit // 64), dtype=np.uint64)
            self._seen = None
            return
        self._seen = np.zeros(limit, dtype=np.uint8) if limit <= self.DENSE_LIMIT else None
        # Room for every value up to 16 Mi at once (uninitialised: the OS commits what is
        # written), so that the common run never copies it to grow.
        self._buf = np.empty(min(limit, 1 << 24) if self._seen is not None else 1024,
                             dtype=np.uint64)

    def _reserve(self, n):
        if self.count + n > self._buf.size:
            grown = np.empty(max(2 * self._buf.size, self.count + n), dtype=np.uint64)
            grown[:self.count] = self._buf[:self.count]
            self._buf = grown

    def add(self, x):
        if self._bits is not None:
            self.count += count_new(self._bits, x, self._limit)
            return
        if self._seen is not None:
            self._reserve(min(x.size, self._limit - self.count))
            self.count += first_seen(self._seen, x, self._buf[self.count:])
            return
        u = np.unique(x)
        have = self._buf[:self.count]
        pos = np.searchsorted(have, u)
        hit = pos < self.count
        hit[hit] = have[pos[hit]] == u[hit]
        if hit.all():
            return
        merged = np.insert(have, pos[~hit], u[~hit])
        self._buf, self.count = merged, merged.size

    def values(self):
        if self._bits is not None:
            bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
            return np.flatnonzero(bits).astype(np.uint64)
        return self._buf[:self.count]


@dataclass
class SimResult:
    """What a run did.  ``to_dict()`` is the ``--json`` document."""
    config: SimConfig                # max_level resolved (the source's default applied)
    source: dict                     # what ran: source/workload, trace details, memslots
    nonpresent_value: int            # of the layout
    max_pt_pages: int                # the page pool the VM got
    faults: int                      # faults: exits KVM handled (mode fault: every record)
    results: dict                    # hits (mode access), fixed, spurious, emulate, retry,
                                     # fast: summed over vCPUs
    elapsed_s: float                 # wall time of the loop, zaps included
    fault_s: float                   # in access_batch / fault_batch
    zap_s: float                     # in zaps
    faults_per_s: float              # faults / fault_s
    overall_faults_per_s: float      # faults / elapsed_s
    zaps: dict                       # gfn_range, gfn_range_flushed, all, all_flushed
    stats: dict                      # vm.stats at the end
    audit: str                       # "passed" (a failed audit raises AuditFailed)
    samples: list                    # [Sample], every stats_interval records and the end
    accesses: int = 0                # records run
    accesses_per_s: float = 0.0      # accesses / fault_s
    overall_accesses_per_s: float = 0.0
    stats_interval: int = 0          # the sampling period used, in accesses

    @property
    def hardware(self):
        """The hardware view's counters: walks, A/D sets, exits by reason."""
        return {k: self.stats.get(k, 0) for k in HW_STATS}

    def to_dict(self):
        """A JSON-ready dict: configuration, counts, rates, zaps, stats, audit, samples."""
        c = self.config
        return {
            "config": {
                **self.source,
                "layout": c.layout, "nonpresent_value": hex(self.nonpresent_value),
                "root_level": c.root_level, "max_level": LEVEL_NAMES[c.max_level],
                "vcpus": c.vcpus, "zap_every": c.zap_every, "zap_all_every": c.zap_all_every,
                "seed": c.seed, "chunk": c.chunk, "max_pt_pages": self.max_pt_pages,
                "mode": c.mode, "stats_interval": self.stats_interval,
            },
            "accesses": self.accesses,
            "faults": self.faults,
            "hardware": self.hardware,
            "accesses_per_s": self.accesses_per_s,
            "overall_accesses_per_s": self.overall_accesses_per_s,
            "results": dict(self.results),
            "elapsed_s": self.elapsed_s,
            "fault_s": self.fault_s,
            "zap_s": self.zap_s,
            "faults_per_s": self.faults_per_s,
            "overall_faults_per_s": self.overall_faults_per_s,
            "zaps": dict(self.zaps),
            "stats": dict(self.stats),
            "audit": self.audit,
            "samples": [s.to_dict() for s in self.samples],
        }


def describe(source):
    """The source part of a result's configuration."""
    return {
        "source": "trace" if source.name == "trace" else "workload",
        "workload": source.name, **source.extra,
        "faults": source.faults, "guest_bytes": source.guest_pages << 12,
        "memslots": [{"base_gfn": s.base_gfn, "npages": s.npages, "pfn": s.pfn,
                      "readonly": s.readonly} for s in source.slots],
    }


def check(config, source):
    """Raise ``InputError`` when ``source`` cannot run under ``config`` (run() calls it)."""
    if source.span > config.gfn_limit:
        raise InputError(f"a {format_bytes(source.guest_pages << 12)} guest does not fit the "
                         f"{config.root_level}-level address width "
                         f"({format_bytes(config.gfn_limit << 12)})")


def hw_access_codes(access):
    """A source's access bits (bit 0 write, bit 1 instruction fetch) as access_batch's
    kinds (0 read, 1 write, 2 fetch; a fetch is never a write)."""
    if access is None:
        return None
    return np.where(access & 2, np.uint8(2), access & np.uint8(1)).astype(np.uint8)


def _run_parallel(executor, vcpus, mode, gfns, access):
    """Split one segment between the vCPUs (contiguous slices), run them concurrently."""
    def batch(v):
        return v.access_batch if mode == "access" else v.fault_batch
    if executor is None:
        return [batch(vcpus[0])(gfns, access)]
    n, k = gfns.size, len(vcpus)
    edges = [n * i // k for i in range(k + 1)]
    futures = [executor.submit(batch(v), gfns[a:b], None if access is None else access[a:b])
               for v, a, b in zip(vcpus, edges, edges[1:]) if b > a]
    return [f.result() for f in futures]


def run(config, source, progress=None):
    """Run ``source`` (a ``workloads.Source``) through a new Vm under ``config``.

    Every ``zap_every`` records a random 2M-aligned range is zapped with ``zap_gfn_range``
    -- of the guest for a workload, among the 2M regions touched so far for a trace
    (``source.zap_touched``) -- and every ``zap_all_every`` records everything with
    ``zap_all`` (between segments, with no fault in flight).  A ``Sample`` is taken every
    ``stats_interval`` records (default: about ``SAMPLES`` per run) and at the end.  The
    records run must be the source's ``faults`` (else ``RunError``).  ``progress(n)`` is
    called per segment.
    Returns a ``SimResult``; raises ``InputError`` (nothing ran) or ``RunError``.
    """
    check(config, source)
    config = dataclasses.replace(config, max_level=config.max_level or source.max_level)
    try:
        return _run(config, source, progress)
    except sf.OutOfMemory as e:
        raise RunError(f"the page-table pool ran out: {e}") from e
    except MemoryError as e:        # the page-table pool, or a memslot's host page flags
        raise HostMemoryError(source.guest_pages << 12, source.faults) from e


def _new_vm(config, source):
    pt_pages = pool_pages(source, config.root_level, config.vcpus)
    try:
        vm = sf.Vm(LAYOUTS[config.layout][1](), root_level=config.root_level,
                   max_level=config.max_level, max_pt_pages=pt_pages)
        for s in source.slots:
            vm.add_memslot(s.base_gfn, s.npages, s.pfn, readonly=s.readonly)
    except ValueError as e:         # memslots that the engine refuses (width, pfn field)
        raise InputError(f"{e}{source.fit_hint}") from e
    return vm, pt_pages


class _Prefetch:
    """Iterate ``items`` on a producer thread, at most ``depth`` items ahead.  An exception
    of the producer is raised where the consumer would have received the item; ``close()``
    (also on leaving a ``with``) stops the producer and waits for it."""

    _END = object()

    def __init__(self, items, depth=2):
        self._q = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(iter(items),),
                                        name="source", daemon=True)
        self._thread.start()

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, it):
        try:
            for item in it:
                if not self._put((item, None)):
                    return
        except BaseException as e:          # noqa: BLE001 - handed to the consumer
            self._put((None, e))
            return
        self._put((self._END, None))

    def __iter__(self):
        while True:
            item, exc = self._q.get()
            if exc is not None:
                raise exc
            if item is self._END:
                return
            yield item

    def close(self, timeout=2.0):
        """Stop the producer.  One blocked in its source (a stalled pipe) is not waited for
        beyond ``timeout``: it is a daemon thread, and its next item is dropped."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            try:                            # unblock a producer waiting on a full queue
                self._q.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _working_set(chunks, touched, interval, marks):
    """The source's chunks, each followed by its working-set pass: ``marks`` gets, for each
    position in the stream that is a multiple of ``interval`` (where a sample can be taken)
    and each chunk's end, the number of distinct pages accessed up to it.  Runs on the
    producer thread, and a chunk is handed over before its pass, so that the pass overlaps
    the vCPUs' batches; every mark is in when the iteration ends."""
    pos = 0
    for gfns, access in chunks:
        yield gfns, access
        a, n = 0, gfns.size
        while a < n:
            b = min(n, a + interval - (pos + a) % interval)
            touched.add(gfns[a:b])
            marks[pos + b] = touched.count
            a = b
        pos += n


def _run(config, source, progress):
    c = config
    vm, pt_pages = _new_vm(c, source)
    cpus = [vm.vcpu() for _ in range(c.vcpus)]
    zap_rng = np.random.default_rng(np.random.SeedSequence(c.seed).spawn(2)[1])
    interval = c.stats_interval or max(1, -(-source.faults // SAMPLES))
    periods = [p for p in (c.zap_every, c.zap_all_every, interval) if p]
    zap_regions = max(1, -(-source.guest_pages // PAGES_2M))
    touched = Distinct(source.span, ordered=False)  # the working set, on the producer thread
    working_set = {0: 0}                # its marks by position (see _working_set)
    touched_2m = (Distinct(-(-source.span // PAGES_2M))
                  if source.zap_touched and c.zap_every else None)
    results = ({"hits": 0} if c.mode == "access" else {})
    results.update({"fixed": 0, "spurious": 0, "emulate": 0, "retry": 0, "fast": 0})
    zaps = {"gfn_range": 0, "gfn_range_flushed": 0, "all": 0, "all_flushed": 0}
    samples, done, fault_s, zap_s = [], 0, 0.0, 0.0
    last = {"accesses": 0, "faults": 0, "fault_s": 0.0}

    def sample():
        st = vm.stats
        dt = fault_s - last["fault_s"]
        faults = _exits(results)
        samples.append(Sample(
            faults=faults, seconds=time.perf_counter() - t_start,
            faults_per_s=(faults - last["faults"]) / dt if dt else 0.0,
            pt_pages=tuple(st[f"pt_pages_l{lvl}"] for lvl in range(1, c.root_level + 1)),
            accesses=done, accesses_per_s=(done - last["accesses"]) / dt if dt else 0.0,
            results=dict(results), leaves=(st["pages_4k"], st["pages_2m"], st["pages_1g"]),
            working_set=0))             # filled in from the marks at the end
        last.update(accesses=done, faults=faults, fault_s=fault_s)

    t_start = time.perf_counter()
    with (concurrent.futures.ThreadPoolExecutor(c.vcpus, thread_name_prefix="vcpu")
          if c.vcpus > 1 else contextlib.nullcontext()) as executor, \
            _Prefetch(_working_set(source.chunks(c.chunk), touched, interval,
                                   working_set)) as chunks:
        for gfns, access in chunks:
            if c.mode == "access":
                access = hw_access_codes(access)
            pos = 0
            while pos < gfns.size:
                # Segments end where a zap or a sample is due.
                end = min([gfns.size] + [pos + (done + p) // p * p - done for p in periods])
                seg = gfns[pos:end]
                t0 = time.perf_counter()
                for r in _run_parallel(executor, cpus, c.mode, seg,
                                       None if access is None else access[pos:end]):
                    for k in results:
                        results[k] += r[k]
                fault_s += time.perf_counter() - t0
                if progress:
                    progress(end - pos)
                if touched_2m is not None:
                    touched_2m.add(seg >> np.uint64(9))
                done += end - pos
                pos = end
                t0 = time.perf_counter()
                if c.zap_every and done % c.zap_every == 0:
                    if touched_2m is not None:
                        regions = touched_2m.values()
                        start = int(regions[zap_rng.integers(regions.size)]) * PAGES_2M
                    else:
                        start = int(zap_rng.integers(zap_regions)) * PAGES_2M
                    zaps["gfn_range"] += 1
                    zaps["gfn_range_flushed"] += vm.zap_gfn_range(start, start + PAGES_2M)
                if c.zap_all_every and done % c.zap_all_every == 0:
                    zaps["all"] += 1
                    zaps["all_flushed"] += vm.zap_all()
                zap_s += time.perf_counter() - t0
                if done % interval == 0:
                    sample()
    if not samples or samples[-1].accesses != done:
        sample()
    elapsed = time.perf_counter() - t_start
    for s in samples:
        s.working_set = working_set[s.accesses]
    if done != source.faults:
        raise RunError(f"replayed {done:,} records where the source had {source.faults:,}: "
                       f"the input changed under the run")
    try:
        vm.audit()
    except sf.AuditError as e:
        raise AuditFailed(f"audit failed ({e.invariant}): {e}", e.invariant) from e
    faults = _exits(results)
    return SimResult(
        config=c, source=describe(source), nonpresent_value=vm.layout.nonpresent_value,
        max_pt_pages=pt_pages, faults=faults, results=results, elapsed_s=elapsed,
        fault_s=fault_s, zap_s=zap_s, faults_per_s=faults / fault_s if fault_s else 0.0,
        overall_faults_per_s=faults / elapsed if elapsed else 0.0, zaps=zaps, stats=vm.stats,
        audit="passed", samples=samples, accesses=done,
        accesses_per_s=done / fault_s if fault_s else 0.0,
        overall_accesses_per_s=done / elapsed if elapsed else 0.0, stats_interval=interval)


def _exits(results):
    """The faults KVM handled: every result of kvm_mmu_page_fault (hits are not faults)."""
    return sum(v for k, v in results.items() if k not in ("hits", "fast"))
