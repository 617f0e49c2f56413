"""KVM's own MMU selftests as scenarios on the model: ``spte-fast demand-paging``,
``spte-fast access-tracking-perf`` and ``spte-fast dirty-log-perf``.

Each command runs the phases of the Linux 6.10 selftest of the same name
(``tools/testing/selftests/kvm/demand_paging_test.c``, ``access_tracking_perf_test.c``,
``dirty_log_perf_test.c``, all on ``lib/memstress.c``) through the public API, with the
selftest's option letters and output lines, so that a run on real hardware can be put beside
one here line by line.  Under each timing line it prints what the model counted in that phase
(exits and faults by kind, hits and A/D assists of the CPU's walk, SPTEs changed, TLB flushes,
tables); ``--json`` prints one document holding all of it.

What memstress does, and what is modelled:

* The test region is one memslot (``-x``: several) of ``-v`` x ``-b`` bytes placed, as
  memstress places it, at the top of the guest physical address space
  (``(max_gfn - pages) & ~(backing page - 1)``, ``max_gfn`` from the host's 46 physical
  address bits), backed by host pages aligned to 1 GiB so that ``-s`` alone decides the largest
  mapping: ``anonymous``/``shmem`` 4K, ``anonymous_thp``/``anonymous_hugetlb``/
  ``shared_hugetlb`` 2M, ``anonymous_hugetlb_1gb`` 1G.
* Each vCPU is a Python thread with its own ``Vcpu``; one guest pass over its pages is one
  ``vcpu.access_batch(gfns, access)`` call (the GIL is released inside), timed as the selftest
  times it: from the start of the phase until every vCPU has finished.  With ``-o`` every vCPU
  covers the whole region.
* ``memstress_guest_code`` touches the first 8 bytes of each page in order (``-a``: a page
  drawn from the guest's pseudo-RNG) and writes when ``guest_random_u32() % 100 <
  write_percent``.  The same Park-Miller generator (``state = state * 48271 % (2**31 - 1)``),
  seeded ``guest_random_seed + vcpu_idx`` and kept across passes as the guest keeps it,
  decides which pages are written, so ``-w`` and ``-a`` pick the very pages a real run picks.
  The default seed is the selftests' (``random()``'s first value, 0x6b8b4567;
  ``dirty_log_perf_test`` overrides it to 1).
* Not modelled: the guest's own page tables and instructions, the host's page allocation and
  zeroing (the memslot's pages exist), userfaultfd (``demand_paging_test -u``), ``page_idle``'s
  rmap walk, the memstress arguments page the guest reads each pass, vCPU pinning (``-c``),
  nested mode (``-n``), guest modes (``-m``, always ``PA-bits:ANY, VA-bits:48,  4K pages``)
  and the GPA offset (``-p``).

Nothing here imports the command line; ``add_parsers(subparsers)`` adds the three commands to
the ``spte-fast`` parser and ``run_demand_paging`` / ``run_access_tracking`` /
``run_dirty_log`` return the result dict that ``--json`` prints.
"""
import argparse
import concurrent.futures
import json
import re
import sys
import threading
import time

import numpy as np

import spte_fast as sf

from . import engine as _engine
from .errors import AuditFailed, InputError, RunError

#: The host physical address width of the model's VM: the selftests' "PA-bits:ANY" resolves
#: to the host's, 46 on the machines the published numbers come from.
HOST_MAXPHYADDR = 46
GUEST_MODE = "PA-bits:ANY, VA-bits:48,  4K pages"
DEFAULT_PER_VCPU_MEM_SIZE = 1 << 30          # memstress.h
#: glibc random()'s first value with its default seed: kvm_selftest_init's guest_random_seed.
DEFAULT_RANDOM_SEED = 0x6B8B4567
PAGE_SIZE = 4096
#: The host pages behind the region start here: 1 GiB aligned, so a gfn and its pfn are
#: equally aligned and the backing alone bounds the mapping level.
HOST_PFN_BASE = 1 << 22

#: -s: backing source -> (host page size, largest mapping level) -- test_util.c's
#: vm_mem_backing_src_alias names; hugetlb's default size is 2 MiB on x86.
BACKING = {
    "anonymous": (4 << 10, sf.PG_LEVEL_4K),
    "anonymous_thp": (2 << 20, sf.PG_LEVEL_2M),
    "anonymous_hugetlb": (2 << 20, sf.PG_LEVEL_2M),
    "anonymous_hugetlb_2mb": (2 << 20, sf.PG_LEVEL_2M),
    "anonymous_hugetlb_1gb": (1 << 30, sf.PG_LEVEL_1G),
    "shmem": (4 << 10, sf.PG_LEVEL_4K),
    "shared_hugetlb": (2 << 20, sf.PG_LEVEL_2M),
}
DEFAULT_BACKING = "anonymous"                # DEFAULT_VM_MEM_SRC

#: Counters of vm.stats each phase reports as a difference, in the model line's order.
_STAT_KEYS = ("exits_ept_violation", "exits_misconfig", "faults_fixed", "faults_spurious",
              "faults_retry", "faults_emulate", "faults_fast", "hw_walks", "hw_ad_sets",
              "spte_changes", "tlb_flushes", "tlb_flushes_ranged", "tables_allocated",
              "tables_freed", "pages_4k", "pages_2m", "pages_1g", "pt_pages")
_RESULT_KEYS = ("hits", "fixed", "spurious", "retry", "emulate", "fast")


# ---------------------------------------------------------------------------------------
# Options as the selftests parse them
# ---------------------------------------------------------------------------------------

_NUMBER = re.compile(r"^(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)(.*)$", re.S)


def parse_size(text):
    """test_util.c ``parse_size``: a number as ``strtoull(s, &end, 0)`` reads it (decimal,
    ``0x`` hex, leading-0 octal), then one letter of scale -- t, g, m, k (binary units), b or
    nothing; what follows that letter is ignored, as the C code ignores it.  memstress also
    wants whole 4 KiB guest pages; zero is refused."""
    m = _NUMBER.match(text)
    if not m or not text[:1].isdigit():
        raise argparse.ArgumentTypeError(f"Need at least one digit in '{text}'")
    digits = m.group(1)
    base = int(digits, 16 if digits[:2].lower() == "0x" else 8 if digits[0] == "0" else 10)
    scale = m.group(2)[:1].lower()
    shifts = {"t": 40, "g": 30, "m": 20, "k": 10, "b": 0, "": 0}
    if scale not in shifts:
        raise argparse.ArgumentTypeError(f"Unknown size letter {m.group(2)[:1]}")
    size = base << shifts[scale]
    if size >= 1 << 64:
        raise argparse.ArgumentTypeError("Overflow scaling size!")
    if size == 0 or size % PAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"'{text}' is {size} bytes: guest memory size is not guest page size "
            f"({PAGE_SIZE}) aligned")
    return size


def _atoi(text, name):
    """test_util.c ``atoi_paranoid``: the whole string as ``strtol(s, &end, 0)``."""
    t = text.strip()
    try:
        n = int(t, 0) if not re.fullmatch(r"[+-]?0[0-7]+", t) else int(t, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"strtol(\"{text}\") failed to parse trailing characters") from None
    return n


def _positive(name, high=None):
    def parse(text):
        n = _atoi(text, name)
        if n <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be greater than 0, got '{text}'")
        if high is not None and n > high:
            raise argparse.ArgumentTypeError(f"{name} must be between 1 and {high}, "
                                             f"got {n}")
        return n
    parse.__name__ = name
    return parse


def _iterations(text):
    n = _positive("Number of iterations")(text)
    if n < 2:
        raise argparse.ArgumentTypeError("The test should have at least two iterations")
    return n


def _write_percent(text):
    n = _atoi(text, "Write percentage")
    if not 0 <= n <= 100:
        raise argparse.ArgumentTypeError("Write percentage must be between 0 and 100")
    return n


def _on_off(text):
    t = text.strip().lower()
    if t in ("on", "y", "yes", "1", "true"):
        return True
    if t in ("off", "n", "no", "0", "false"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, not {text!r}")


# ---------------------------------------------------------------------------------------
# The guest's pseudo-RNG (test_util.c guest_random_u32), vectorised
# ---------------------------------------------------------------------------------------

_PM_MOD = (1 << 31) - 1
_PM_MUL = 48271
_BLOCK = 1024


def _powers(base, n):
    """base**1 .. base**n mod (2**31 - 1), as uint64."""
    out = np.empty(n, np.uint64)
    x = 1
    for i in range(n):
        x = x * base % _PM_MOD
        out[i] = x
    return out


_SMALL = _powers(_PM_MUL, _BLOCK)                   # a**1 .. a**B
_A_BLOCK = int(_SMALL[-1])                          # a**B


class GuestRandom:
    """``struct guest_random_state``: ``take(n)`` returns the next n ``guest_random_u32``
    values (uint64 array) and advances the state, as n calls in the guest would."""

    def __init__(self, seed):
        self.seed = seed & 0xFFFFFFFF

    def take(self, n):
        if n == 0:
            return np.empty(0, np.uint64)
        blocks = -(-n // _BLOCK)
        starts = np.empty(blocks, np.uint64)        # state * a**(q*B), q = 0 .. blocks-1
        x = self.seed % _PM_MOD if self.seed != _PM_MOD else 0
        # The C code multiplies the 32-bit seed itself the first time: seed * a % m.  A seed
        # >= m is reduced by that first multiplication, so reducing it first is the same.
        for q in range(blocks):
            starts[q] = x
            x = x * _A_BLOCK % _PM_MOD
        vals = (starts[:, None] * _SMALL[None, :]) % np.uint64(_PM_MOD)
        vals = vals.reshape(-1)[:n]
        self.seed = int(vals[-1])
        return vals


# ---------------------------------------------------------------------------------------
# memstress on the model
# ---------------------------------------------------------------------------------------

def _ts(ns):
    """A time as the selftests print a timespec: ``%ld.%.9lds``."""
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}s"


def _pool_pages(pages, vcpus, slots):
    """Tables for every page mapped at 4K (eager split and dirty logging can get there), the
    paths above them, the root, and each vCPU's cache of 40; generous by a few tables."""
    tables, n = 0, pages
    for _ in range(3):
        n = -(-n // 512)
        tables += n + 2 * slots + 2
    return tables + 8 + 41 * vcpus


class Memstress:
    """``memstress_create_vm`` and ``memstress_setup_vcpus`` on the model: the VM, the test
    memslots, one Vcpu per vCPU and the gfns each vCPU covers."""

    def __init__(self, vcpus, vcpu_bytes, backing, partition=True, slots=1, layout="ept",
                 seed=DEFAULT_RANDOM_SEED, vm_options=None):
        self.nr_vcpus, self.vcpu_bytes, self.backing = vcpus, vcpu_bytes, backing
        self.partition, self.seed = partition, seed
        backing_bytes, self.max_level = BACKING[backing]
        self.pages = vcpus * vcpu_bytes // PAGE_SIZE
        if self.pages % slots:
            raise InputError(f"Guest memory cannot be evenly divided into {slots} slots.")
        region_end_gfn = (1 << (HOST_MAXPHYADDR - 12))       # vm->max_gfn + 1
        if self.pages >= region_end_gfn:
            raise InputError("Requested more guest memory than address space allows.")
        align = backing_bytes // PAGE_SIZE
        self.base_gfn = (region_end_gfn - self.pages - 1) // align * align
        self.layout = layout
        self.preamble = [f"Testing guest mode: {GUEST_MODE}",
                         f"Random seed: {seed:#x}",
                         f"guest physical test memory: [{self.base_gfn * PAGE_SIZE:#x}, "
                         f"{(self.base_gfn + self.pages) * PAGE_SIZE:#x})"]
        try:
            self.vm = sf.Vm(_engine.LAYOUTS[layout][1](), root_level=4,
                            max_level=self.max_level,
                            max_pt_pages=_pool_pages(self.pages, vcpus, slots),
                            host_maxphyaddr=HOST_MAXPHYADDR, **(vm_options or {}))
        except TypeError as e:
            raise RunError(f"this build's Vm does not take {sorted(vm_options or {})}: {e}"
                           ) from None
        except MemoryError as e:
            raise RunError(f"not enough host memory for the VM's page-table pool: {e}"
                           ) from None
        per_slot = self.pages // slots
        self.slots = []
        for i in range(slots):
            base = self.base_gfn + i * per_slot
            try:
                sid = self.vm.add_memslot(base, per_slot, HOST_PFN_BASE + i * per_slot)
            except MemoryError as e:
                raise RunError(f"not enough host memory for the memslot: {e}") from None
            self.slots.append((sid, base, per_slot))
        self.vcpus = [self.vm.vcpu() for _ in range(vcpus)]
        self.rng = [GuestRandom(seed + i) for i in range(vcpus)]
        per_vcpu = vcpu_bytes // PAGE_SIZE
        if partition:
            self.ranges = [(self.base_gfn + i * per_vcpu, per_vcpu) for i in range(vcpus)]
        else:
            self.ranges = [(self.base_gfn, self.pages)] * vcpus
        self.pool = concurrent.futures.ThreadPoolExecutor(vcpus, thread_name_prefix="vcpu")
        self.phases = []

    def close(self):
        self.pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # One pass of memstress_guest_code per vCPU ---------------------------------------

    def guest_pass(self, write_percent=100, random_access=False, wr_fract=None):
        """The gfns and access kinds of one pass of each vCPU's guest code (the RNG
        advances as the guest's does).  ``wr_fract`` is the guest code before 6.3
        (perf_test_util, ``-f``): page i is written when ``i % wr_fract == 0``, in order."""
        out = []
        for (start, pages), rng in zip(self.ranges, self.rng):
            if wr_fract:
                page = np.arange(pages, dtype=np.uint64)
                out.append((page + np.uint64(start),
                            (page % np.uint64(wr_fract) == 0).astype(np.uint8)))
                continue
            if random_access:
                r = rng.take(2 * pages).reshape(pages, 2)
                page, decide = r[:, 0] % np.uint64(pages), r[:, 1]
            else:
                page, decide = np.arange(pages, dtype=np.uint64), rng.take(pages)
            gfns = page + np.uint64(start)
            access = (decide % np.uint64(100) < np.uint64(write_percent)).astype(np.uint8)
            out.append((gfns, access))
        return out

    # Phases ---------------------------------------------------------------------------

    def snapshot(self):
        return self.vm.stats

    def run_vcpus(self, work):
        """Run ``work(vcpu_idx, vcpu)`` on every vCPU thread at once; (ns, results summed)."""
        t0 = time.perf_counter_ns()
        futures = [self.pool.submit(work, i, v) for i, v in enumerate(self.vcpus)]
        results = [f.result() for f in futures]
        ns = time.perf_counter_ns() - t0
        total = {k: 0 for k in _RESULT_KEYS}
        for r in results:
            for k, v in (r or {}).items():
                if k in total:
                    total[k] += v
        return ns, total

    def access_phase(self, passes):
        """Each vCPU runs its pass (gfns, access) through access_batch."""
        def work(i, vcpu):
            gfns, access = passes[i]
            return vcpu.access_batch(gfns, access)
        return self.run_vcpus(work)

    def record(self, name, ns, line, before, results=None, **extra):
        after = self.vm.stats
        delta = {k: after[k] - before.get(k, 0) for k in after
                 if isinstance(after[k], int)}
        phase = {"name": name, "ns": ns, "seconds": ns / 1e9, "line": line,
                 "results": results, "stats": delta, **extra}
        self.phases.append(phase)
        return phase

    def audit(self):
        try:
            self.vm.audit()
        except sf.AuditError as e:
            raise AuditFailed(f"audit failed ({e.invariant}): {e}", e.invariant) from e
        return "passed"

    def config(self):
        return {"vcpus": self.nr_vcpus, "vcpu_bytes": self.vcpu_bytes,
                "pages": self.pages, "pages_per_vcpu": self.ranges[0][1],
                "partition": self.partition, "backing": self.backing,
                "max_level": _engine.LEVEL_NAMES[self.max_level], "layout": self.layout,
                "random_seed": self.seed, "host_maxphyaddr": HOST_MAXPHYADDR,
                "base_gfn": self.base_gfn,
                "memslots": [{"slot": s, "base_gfn": b, "npages": n} for s, b, n in self.slots]}


def model_line(phase):
    """The model's counts of one phase, one indented line under the selftest's line."""
    d, r = phase["stats"], phase["results"]
    parts = []
    if r is not None:
        parts.append(f"accesses {phase.get('accesses', 0)} (hits {r['hits']})")
    exits = d.get("exits_ept_violation", 0) + d.get("exits_misconfig", 0)
    parts.append(f"exits {exits}")
    parts.append("faults fixed {} spurious {} retry {} emulate {} fast {}".format(
        *(d.get(k, 0) for k in ("faults_fixed", "faults_spurious", "faults_retry",
                                "faults_emulate", "faults_fast"))))
    parts.append(f"A/D assists {d.get('hw_ad_sets', 0)}")
    parts.append(f"SPTEs changed {d.get('spte_changes', 0)}")
    parts.append(f"flushes {d.get('tlb_flushes', 0)} + {d.get('tlb_flushes_ranged', 0)} "
                 f"ranged")
    parts.append(f"tables +{d.get('tables_allocated', 0)} -{d.get('tables_freed', 0)}")
    leaves = [f"{name} {d.get(k, 0):+d}" for name, k in
              (("4K", "pages_4k"), ("2M", "pages_2m"), ("1G", "pages_1g")) if d.get(k, 0)]
    if leaves:
        parts.append("leaves " + " ".join(leaves))
    known = set(_STAT_KEYS) | {"cache_fills", "cache_zero_inits", "init_bytes_written",
                               "warnings", "cas_failures", "nx_lpage_splits",
                               "mmio_sptes_created"} | {f"pt_pages_l{i}" for i in range(1, 6)}
    other = [f"{k} {v:+d}" for k, v in d.items() if v and k not in known]
    if d.get("warnings"):
        other.insert(0, f"warnings {d['warnings']:+d}")
    if other:
        parts.append(", ".join(other))
    for key, label in phase.get("notes", ()):
        parts.append(f"{label} {phase[key]}")
    return "    [model] " + "; ".join(parts)


def _public(phases):
    """The phases as the result reports them (without the model line's display hints)."""
    return [{k: v for k, v in p.items() if k != "notes"} for p in phases]


def _printer(out):
    """(lines, say): a command's printed lines, kept for --json and written to ``out`` (if
    any) as they come."""
    lines = []

    def say(line):
        lines.append(line)
        if out:
            out.write(line + "\n")
    return lines, say


# ---------------------------------------------------------------------------------------
# demand_paging_test
# ---------------------------------------------------------------------------------------

def run_demand_paging(vcpus=1, vcpu_bytes=DEFAULT_PER_VCPU_MEM_SIZE, backing=DEFAULT_BACKING,
                      partition=True, layout="ept", out=None):
    """demand_paging_test without -u: every vCPU writes each page of its range once
    (``memstress_guest_code`` at 100 % writes, one pass: the vCPU worker runs the guest to
    its first GUEST_SYNC).  Returns the result dict; ``out`` gets the lines as they come."""
    lines, say = _printer(out)
    with Memstress(vcpus, vcpu_bytes, backing, partition, layout=layout) as ms:
        for line in ms.preamble:
            say(line)
        passes = ms.guest_pass(100)
        touched = int(np.unique(np.concatenate([g for g, _ in passes])).size)
        say("Finished creating vCPUs and starting uffd threads")
        before = ms.snapshot()
        ns, res = ms.access_phase(passes)
        say("Started all vCPUs")
        say("All vCPU threads joined")
        line = f"Total guest execution time:\t{_ts(ns)}"
        phase = ms.record("Total guest execution time", ns, line, before, res,
                          accesses=sum(g.size for g, _ in passes), pages_touched=touched,
                          notes=(("pages_touched", "pages touched"),))
        say(line)
        say(model_line(phase))
        secs = ns / 1e9
        per_vcpu = ms.ranges[0][1] / secs if secs else float("inf")
        say(f"Per-vcpu demand paging rate:\t{per_vcpu:f} pgs/sec/vcpu")
        say(f"Overall demand paging rate:\t{per_vcpu * vcpus:f} pgs/sec")
        audit = ms.audit()
        return {"test": "demand_paging_test", "command": "demand-paging",
                "config": ms.config(), "lines": lines, "phases": _public(ms.phases),
                "total_ns": ns, "per_vcpu_pages_per_s": per_vcpu,
                "overall_pages_per_s": per_vcpu * vcpus, "pages_touched": touched,
                "stats": ms.vm.stats, "audit": audit}


# ---------------------------------------------------------------------------------------
# access_tracking_perf_test
# ---------------------------------------------------------------------------------------

def leaf_counts(vm, start, end):
    """(present leaves, accessed leaves) mapping [start, end): tdp_iter's entries that are
    present and last-level, and of those the ones ``is_accessed_spte`` calls young."""
    lay = vm.layout
    present = accessed = 0
    for level, _gfn, spte in vm.tdp_iter(start, end):
        if lay.is_shadow_present_pte(spte) and lay.is_last_spte(spte, level):
            present += 1
            accessed += lay.is_accessed_spte(spte)
    return present, accessed


def run_access_tracking(vcpus=1, vcpu_bytes=DEFAULT_PER_VCPU_MEM_SIZE, backing=DEFAULT_BACKING,
                        partition=True, layout="ept", out=None):
    """access_tracking_perf_test (6.10): populate by writing; write, read populated memory;
    mark it idle; write idle memory; mark idle again; read idle memory.  Marking idle is
    what writing ``/sys/kernel/mm/page_idle/bitmap`` does: ``page_idle_clear_pte_refs`` ->
    ``mmu_notifier_clear_young`` -> ``kvm_mmu_notifier_clear_young`` -> ``kvm_age_gfn`` with
    no TLB flush, here ``vm.age_gfn_range`` over each vCPU's range from its thread (with -o
    only vCPU 0 marks, as ``mark_vcpu_memory_idle`` returns early for the others)."""
    lines, say = _printer(out)
    with Memstress(vcpus, vcpu_bytes, backing, partition, layout=layout) as ms:
        for line in ms.preamble:
            say(line)
        say("")
        total_accesses = sum(n for _, n in ms.ranges)

        def access(description, write):
            passes = ms.guest_pass(100 if write else 0)
            before = ms.snapshot()
            ns, res = ms.access_phase(passes)
            line = f"{description:<30}: {_ts(ns)}"
            phase = ms.record(description, ns, line, before, res, accesses=total_accesses,
                              kind="write" if write else "read")
            say(line)
            say(model_line(phase))

        def mark_idle():
            region = (ms.base_gfn, ms.base_gfn + ms.pages)
            present, young_before = leaf_counts(ms.vm, *region)
            marking = [(s, s + n) if partition or i == 0 else None
                       for i, (s, n) in enumerate(ms.ranges)]

            def work(i, vcpu):
                if marking[i] is not None:
                    young[i] = ms.vm.age_gfn_range(*marking[i])
                return None
            young = [False] * vcpus
            before = ms.snapshot()
            ns, _ = ms.run_vcpus(work)
            line = f"{'Mark memory idle':<30}: {_ts(ns)}"
            _, young_after = leaf_counts(ms.vm, *region)
            phase = ms.record("Mark memory idle", ns, line, before, None,
                              leaves=present, young_before=young_before,
                              young_after=young_after, aged=young_before - young_after,
                              young_returned=sum(bool(y) for y in young),
                              notes=(("leaves", "leaves"), ("aged", "aged"),
                                     ("young_after", "still young")))
            say(line)
            say(model_line(phase))

        access("Populating memory", True)
        access("Writing to populated memory", True)
        access("Reading from populated memory", False)
        mark_idle()
        access("Writing to idle memory", True)
        mark_idle()
        access("Reading from idle memory", False)
        audit = ms.audit()
        return {"test": "access_tracking_perf_test", "command": "access-tracking-perf",
                "config": ms.config(), "lines": lines, "phases": _public(ms.phases),
                "stats": ms.vm.stats, "audit": audit}


# ---------------------------------------------------------------------------------------
# dirty_log_perf_test
# ---------------------------------------------------------------------------------------

def _popcount(bitmap):
    return int(np.unpackbits(np.ascontiguousarray(bitmap).view(np.uint8)).sum())


def _written_bitmap(passes, base, npages):
    """The slot's bitmap (KVM's layout: page i is bit i % 64 of word i // 64) of the pages
    the passes wrote."""
    bits = np.zeros(-(-npages // 64) * 64, np.uint8)
    for gfns, access in passes:
        idx = gfns[access.astype(bool)].astype(np.int64) - base
        idx = idx[(idx >= 0) & (idx < npages)]
        bits[idx] = 1
    return np.packbits(bits, bitorder="little").view(np.uint64)


def run_dirty_log(vcpus=1, vcpu_bytes=DEFAULT_PER_VCPU_MEM_SIZE, backing=DEFAULT_BACKING,
                  partition=True, iterations=2, write_percent=100, random_access=False,
                  seed=1, slots=1, manual_protect=True, run_while_disabling=False,
                  eager_split=True, pml=None, layout="ept", wr_fract=None, out=None):
    """dirty_log_perf_test (6.10): populate (100 % writes, in order), enable dirty logging,
    ``iterations`` x (dirty memory, KVM_GET_DIRTY_LOG, KVM_CLEAR_DIRTY_LOG with manual
    protect), disable dirty logging.  ``manual_protect`` (no -g) enables
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE |
    KVM_DIRTY_LOG_INITIALLY_SET, as the test does on x86.  ``eager_split`` is KVM's
    ``eager_page_split`` module parameter, ``pml`` VMX's ``enable_pml`` (None: the model's
    default for the layout); ``run_while_disabling`` is -e; ``wr_fract`` (-f) replaces
    ``write_percent`` by the pre-6.3 rule (every wr_fract-th page written)."""
    if not hasattr(sf.Vm, "get_dirty_log"):
        raise RunError("dirty-log-perf needs the dirty-log API (Vm.set_memslot_flags, "
                       "get_dirty_log, clear_dirty_log), which this build does not have yet")
    lines, say = _printer(out)
    say(f"Test iterations: {iterations}")
    opts = {"manual_dirty_log_protect": manual_protect,
            "dirty_log_initially_set": manual_protect, "eager_page_split": eager_split}
    if pml is not None:
        opts["pml"] = pml
    with Memstress(vcpus, vcpu_bytes, backing, partition, slots=slots, layout=layout,
                   seed=seed, vm_options=opts) as ms:
        vm = ms.vm
        for line in ms.preamble:
            say(line)

        # Populate: 100 % writes, in order (the RNG still advances once per page).
        passes = ms.guest_pass(100)
        before = ms.snapshot()
        ns, res = ms.access_phase(passes)
        line = f"Populate memory time: {_ts(ns)}"
        phase = ms.record("Populate memory", ns, line, before, res,
                          accesses=sum(g.size for g, _ in passes))
        say(line)
        say(model_line(phase))

        def slot_phase(name, fmt, fn):
            before = ms.snapshot()
            t0 = time.perf_counter_ns()
            value = [fn(sid, base, n) for sid, base, n in ms.slots]
            ns = time.perf_counter_ns() - t0
            return value, ns, before

        _, ns, before = slot_phase("enable", None,
                                   lambda s, b, n: vm.set_memslot_flags(s, dirty_log=True))
        line = f"Enabling dirty logging time: {_ts(ns)}"
        phase = ms.record("Enabling dirty logging", ns, line, before)
        say(line)
        say(model_line(phase))
        say("")

        get_total = clear_total = 0
        for it in range(1, iterations + 1):
            passes = ms.guest_pass(write_percent, random_access, wr_fract)
            written = [_written_bitmap(passes, b, n) for _, b, n in ms.slots]
            if it == 1 and manual_protect:       # KVM_DIRTY_LOG_INITIALLY_SET
                expect = [_all_set(n) for _, _, n in ms.slots]
            else:
                expect = written
            before = ms.snapshot()
            ns, res = ms.access_phase(passes)
            line = f"Iteration {it} dirty memory time: {_ts(ns)}"
            nwritten = sum(_popcount(w) for w in written)
            phase = ms.record(f"Iteration {it} dirty memory", ns, line, before, res,
                              accesses=sum(g.size for g, _ in passes), pages_written=nwritten,
                              notes=(("pages_written", "pages written"),))
            say(line)
            say(model_line(phase))

            bitmaps, ns, before = slot_phase("get", None,
                                             lambda s, b, n: vm.get_dirty_log(s))
            get_total += ns
            logged = sum(_popcount(bm) for bm in bitmaps)
            match = all(np.array_equal(np.asarray(bm, np.uint64), e)
                        for bm, e in zip(bitmaps, expect))
            line = f"Iteration {it} get dirty log time: {_ts(ns)}"
            phase = ms.record(f"Iteration {it} get dirty log", ns, line, before,
                              dirty_pages=logged, expected_dirty_pages=sum(
                                  _popcount(e) for e in expect), log_as_expected=match,
                              notes=(("dirty_pages", "pages in the log"),
                                     ("log_as_expected", "log as expected")))
            say(line)
            say(model_line(phase))

            if manual_protect:
                _, ns, before = slot_phase(
                    "clear", None,
                    lambda s, b, n, _bm=dict(zip((x[0] for x in ms.slots), bitmaps)):
                    vm.clear_dirty_log(s, 0, n, _bm[s]))
                clear_total += ns
                line = f"Iteration {it} clear dirty log time: {_ts(ns)}"
                phase = ms.record(f"Iteration {it} clear dirty log", ns, line, before)
                say(line)
                say(model_line(phase))

        # Disable, with -e while the vCPUs keep running the guest.
        stop = threading.Event()
        busy = None
        if run_while_disabling:
            passes = ms.guest_pass(write_percent, random_access, wr_fract)

            def spin(i, vcpu, _p=passes):
                gfns, access = _p[i]
                total = {k: 0 for k in _RESULT_KEYS}
                total["accesses"] = 0
                running[i].set()
                while True:         # the guest is in a pass when the disabling starts
                    for a in range(0, gfns.size, 4096):
                        r = vcpu.access_batch(gfns[a:a + 4096], access[a:a + 4096])
                        for k in _RESULT_KEYS:
                            total[k] += r[k]
                        total["accesses"] += min(4096, gfns.size - a)
                        if stop.is_set():
                            break
                    if stop.is_set():
                        break
                return total
            running = [threading.Event() for _ in ms.vcpus]
            busy = [ms.pool.submit(spin, i, v) for i, v in enumerate(ms.vcpus)]
            for r in running:
                r.wait()
        before = ms.snapshot()
        t0 = time.perf_counter_ns()
        for sid, _, _ in ms.slots:
            vm.set_memslot_flags(sid, dirty_log=False)
        ns = time.perf_counter_ns() - t0
        res, accesses = None, 0
        if busy:
            stop.set()
            res = {k: 0 for k in _RESULT_KEYS}
            for f in busy:
                r = f.result()
                accesses += r["accesses"]
                for k in _RESULT_KEYS:
                    res[k] += r[k]
        line = f"Disabling dirty logging time: {_ts(ns)}"
        phase = ms.record("Disabling dirty logging", ns, line, before, res,
                          accesses=accesses)
        say(line)
        say(model_line(phase))

        say(f"Get dirty log over {iterations} iterations took {_ts(get_total)}. "
            f"(Avg {_ts(get_total // iterations)}/iteration)")
        if manual_protect:
            say(f"Clear dirty log over {iterations} iterations took {_ts(clear_total)}. "
                f"(Avg {_ts(clear_total // iterations)}/iteration)")
        audit = ms.audit()
        cfg = ms.config()
        cfg.update(iterations=iterations, write_percent=write_percent,
                   random_access=random_access, wr_fract=wr_fract,
                   manual_protect=manual_protect,
                   dirty_log_initially_set=manual_protect, eager_page_split=eager_split,
                   pml=pml, run_vcpus_while_disabling=run_while_disabling)
        return {"test": "dirty_log_perf_test", "command": "dirty-log-perf", "config": cfg,
                "lines": lines, "phases": _public(ms.phases), "get_dirty_log_ns": get_total,
                "clear_dirty_log_ns": clear_total if manual_protect else None,
                "stats": vm.stats, "audit": audit}


def _all_set(npages):
    """A bitmap with the slot's npages bits set (KVM_DIRTY_LOG_INITIALLY_SET)."""
    bits = np.zeros(-(-npages // 64) * 64, np.uint8)
    bits[:npages] = 1
    return np.packbits(bits, bitorder="little").view(np.uint64)


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------

def _with_usage(parser):
    """Errors of these commands show their usage: the CLI's parser class prints it before
    the error line (cli.CliError), as for every other command."""
    return parser


class _NotModelled(argparse.Action):
    """A selftest option the model has no counterpart for: refused with the usage."""

    def __init__(self, *args, what, **kwargs):
        super().__init__(*args, **kwargs)
        self.what = what

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} ({self.what}) is not modelled")


def _not_modelled(p, options):
    for opt, nargs, what in options:
        p.add_argument(opt, nargs=nargs, action=_NotModelled, what=what,
                       help=argparse.SUPPRESS)


def _unknown_with_usage(p):
    """Unknown options are refused by this command's parser (with its usage), not by the
    top-level one: parse_args of a sub-parser collects extras into the namespace."""
    parse_known = p.parse_known_args

    def parse_known_args(args=None, namespace=None):
        ns, extras = parse_known(args, namespace)
        if extras:
            p.error(f"unrecognized arguments: {' '.join(extras)}")
        return ns, extras
    p.parse_known_args = parse_known_args


def _common(p, what):
    p.add_argument("-v", dest="vcpus", type=_positive("Number of vCPUs", _engine.MAX_VCPUS),
                   default=1, metavar="vcpus",
                   help="the number of vCPUs to run (threads, one Vcpu each; default 1)")
    p.add_argument("-b", dest="vcpu_bytes", type=parse_size,
                   default=DEFAULT_PER_VCPU_MEM_SIZE, metavar="vcpu bytes",
                   help=f"the size of the memory region which should be {what} by each "
                        "vCPU, e.g. 10M or 3G (default: 1G)")
    p.add_argument("-o", dest="partition", action="store_false",
                   help="overlap guest memory accesses instead of partitioning them into "
                        "a separate region of memory for each vCPU")
    p.add_argument("-s", dest="backing", choices=list(BACKING), default=DEFAULT_BACKING,
                   metavar="mem type",
                   help="backing source: " + ", ".join(
                       f"{k} ({_engine.LEVEL_NAMES[v[1]]})" for k, v in BACKING.items()) +
                        f" -> the largest mapping (default {DEFAULT_BACKING})")
    p.add_argument("--layout", choices=list(_engine.LAYOUTS), default="ept",
                   help="SPTE layout (default ept: EPT with A/D bits; ept-noad for eptad=N)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON document (configuration, lines, per-phase counts, "
                        "final stats) instead of the lines")


def _finish(doc, args):
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=1, default=_jsonable) + "\n")
    return 0


def _jsonable(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.bool_):
        return bool(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def cmd_demand_paging(args):
    doc = run_demand_paging(args.vcpus, args.vcpu_bytes, args.backing, args.partition,
                            args.layout, out=None if args.json else sys.stdout)
    return _finish(doc, args)


def cmd_access_tracking(args):
    doc = run_access_tracking(args.vcpus, args.vcpu_bytes, args.backing, args.partition,
                              args.layout, out=None if args.json else sys.stdout)
    return _finish(doc, args)


def cmd_dirty_log(args):
    doc = run_dirty_log(args.vcpus, args.vcpu_bytes, args.backing, args.partition,
                        args.iterations, args.write_percent, args.random_access, args.seed,
                        args.slots, not args.no_manual_protect, args.evil, args.eager_split,
                        args.pml, args.layout, wr_fract=args.wr_fract,
                        out=None if args.json else sys.stdout)
    return _finish(doc, args)


_EPILOG = ("The selftest's lines are printed as it prints them; each '[model]' line under a "
           "timing line\nholds the model's counts for that phase.  Not modelled: guest "
           "execution, host page\nallocation, userfaultfd, pinning (-c), nested (-n), guest "
           "modes (-m), the GPA offset (-p).")


def add_parsers(subparsers):
    """Add demand-paging, access-tracking-perf and dirty-log-perf to ``spte-fast``."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = _with_usage(subparsers.add_parser(
        "demand-paging", formatter_class=fmt, epilog=_EPILOG,
        help="KVM's demand_paging_test on the model",
        description="demand_paging_test (Linux 6.10, without -u): each vCPU writes every "
                    "page of its\nregion once; the total time and the per-vCPU and overall "
                    "demand paging rates."))
    _common(p, "demand paged")
    _not_modelled(p, [("-u", 1, "userfaultfd"), ("-a", 0, "a single userfaultfd"),
                      ("-d", 1, "the userfaultfd delay"),
                      ("-r", 1, "userfaultfd reader threads"), ("-c", 1, "vCPU pinning"),
                      ("-m", 1, "guest modes")])
    _unknown_with_usage(p)
    p.set_defaults(func=cmd_demand_paging)

    p = _with_usage(subparsers.add_parser(
        "access-tracking-perf", formatter_class=fmt, epilog=_EPILOG,
        help="KVM's access_tracking_perf_test on the model",
        description="access_tracking_perf_test (Linux 6.10): populate, write and read "
                    "populated memory,\nmark it idle (the clear_young notifier: "
                    "vm.age_gfn_range), write idle memory,\nmark idle again, read idle "
                    "memory."))
    _common(p, "dirtied")
    _not_modelled(p, [("-m", 1, "guest modes")])
    _unknown_with_usage(p)
    p.set_defaults(func=cmd_access_tracking)

    p = _with_usage(subparsers.add_parser(
        "dirty-log-perf", formatter_class=fmt, epilog=_EPILOG,
        help="KVM's dirty_log_perf_test on the model",
        description="dirty_log_perf_test (Linux 6.10): populate, enable dirty logging, N "
                    "iterations of\ndirty memory / get dirty log / clear dirty log, "
                    "disable dirty logging."))
    _common(p, "dirtied")
    p.add_argument("-i", dest="iterations", type=_iterations, default=2, metavar="iterations",
                   help="iteration count, at least 2 (default: 2)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("-w", dest="write_percent", type=_write_percent, default=100,
                   metavar="percentage",
                   help="the percentage of pages which should be written to, 0-100; "
                        "probabilistic, from the guest's RNG (default: 100)")
    w.add_argument("-f", dest="wr_fract", type=_positive("Write fraction"), default=None,
                   metavar="fraction",
                   help="the option before Linux 6.3 (replaced there by -w): write every "
                        "fraction-th page, i.e. 1/fraction of the pages, in order")
    p.add_argument("-a", dest="random_access", action="store_true",
                   help="access memory randomly rather than in order")
    p.add_argument("-r", dest="seed", type=_positive("Random seed"), default=1,
                   metavar="random seed", help="the starting random seed (default: 1)")
    p.add_argument("-x", dest="slots", type=_positive("Number of slots"), default=1,
                   metavar="memslots",
                   help="split the memory region into this number of memslots (default: 1)")
    p.add_argument("-g", dest="no_manual_protect", action="store_true",
                   help="do not enable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: KVM_GET_DIRTY_LOG "
                        "clears the log, and writes are tracked as soon as dirty logging is "
                        "enabled (no KVM_DIRTY_LOG_INITIALLY_SET)")
    p.add_argument("-e", dest="evil", action="store_true",
                   help="run vCPUs while dirty logging is being disabled")
    p.add_argument("--eager-split", type=_on_off, default=True, metavar="on|off",
                   help="KVM's eager_page_split module parameter (default on); not a letter "
                        "of the selftest, where -e is the option above")
    p.add_argument("--pml", type=_on_off, default=None, metavar="on|off",
                   help="VMX's enable_pml (default: the model's, on where the layout has "
                        "A/D bits)")
    _not_modelled(p, [("-c", 1, "vCPU pinning"), ("-m", 1, "guest modes"),
                      ("-n", 0, "nested mode"), ("-p", 1, "the GPA offset")])
    _unknown_with_usage(p)
    p.set_defaults(func=cmd_dirty_log)
