"""Dirty logging under concurrency: the property live migration rests on.

Two vCPU threads write (and read) random guest pages of one dirty-logged slot with
``access_batch`` (the GIL released, so they really run in parallel) while a third thread
harvests the dirty log over and over, as a VMM's migration thread does; after the writers
stop, a final round (the VMM's pause-and-copy) writes a reserved range and harvests twice.
Then, from what the threads recorded:

* **no write is missing** from the union of the harvested bitmaps;
* **no write is late** (the strong, per-round form): every write is reported by a harvest
  that ended after the write's batch started and that is no later than the first harvest
  started after the batch had finished (see ``check_dirty_log`` for the exact rule and
  why it is sound for Linux 6.10);
* **nothing is reported that nobody dirtied**: a page reported by a harvest was dirtied
  (written, or read-faulted into a writable SPTE, which 6.10's ``make_spte`` logs too)
  by a batch that started before that harvest ended and finished after the previous
  harvest reporting that page began.  Pages that were mapped before dirty logging was
  enabled and only read are never reported; pages nobody touches are never reported;
* no page-table page is leaked: ``vm.audit()``, exact pool accounting, the tables per
  level are those of the mapped pages, and disabling dirty logging then deleting the slot
  frees every table but the (new) root.

Parametrised over EPT with A/D and PML, EPT with A/D without PML (write-protection),
EPT without A/D, and NPT; and over the three ways of harvesting: KVM_GET_DIRTY_LOG
(get-and-clear), manual protect (KVM_GET_DIRTY_LOG then KVM_CLEAR_DIRTY_LOG with that
bitmap), and manual protect with KVM_DIRTY_LOG_INITIALLY_SET.  Negative controls show the
checker catches a harvest that lost pages, so the property tests cannot pass vacuously.

Seeded and bounded in time (each run writes for ``DURATION`` seconds); what is asserted
does not depend on timing.  Time is a global event counter (``itertools.count``: atomic
under the GIL), read just before and just after every ``access_batch`` and every harvest,
so each recorded interval contains the real one.

The engine only: the reference model is a single-threaded oracle (docs/API.md
"Concurrency (engine)", "Dirty logging, MMU notifiers, huge pages").
"""
import itertools
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest

import spte_fast as sf
from support.tables import assert_pool_accounting
from support.threads import run_threads

BASE_GFN = 1 << 18          # 1G-aligned guest frame of the slot
PFN0 = 0x100000             # 1G-aligned host frame: huge pages possible before logging
NPAGES = 4096               # the slot: 16 MiB, eight 2M pages

# Page offsets inside the slot (all 2M-aligned ranges but the last two):
W_RANGE = (0, 2048)         # the writers' range: written and read at random
W_PREFAULT = (0, 1024)      # its first half is mapped (by writes, as 2M pages) beforehand
R_RANGE = (2048, 3072)      # mapped (by reads, as 2M pages) beforehand, then only read
L_RANGE = (3072, 3136)      # written only in the final round, after the writers stopped
#                             [3136, 4096) is never touched

WRITE, READ = 1, 0          # access_batch codes
BATCH_WRITES, BATCH_W_READS, BATCH_R_READS = 40, 12, 12
BATCH = BATCH_WRITES + BATCH_W_READS + BATCH_R_READS
NBATCHES = 4096             # pre-generated batches per writer, used round-robin
DURATION = 0.1              # seconds of concurrent writing per run
MIN_NONEMPTY_HARVESTS = 8   # and at least this many harvests that reported something
HARD_LIMIT = 30.0           # seconds: give up (and fail) rather than hang

LAYOUTS = {
    # name: (layout factory, pml)
    "ept-ad-pml": (lambda: sf.SpteLayout.ept(), True),
    "ept-ad-wrprot": (lambda: sf.SpteLayout.ept(), False),
    "ept-noad": (lambda: sf.SpteLayout.ept(ad=False), None),
    "npt": (lambda: sf.SpteLayout.npt(), None),
}
PROTECT = {
    # name: (manual_dirty_log_protect, dirty_log_initially_set)
    "get-and-clear": (False, False),
    "manual": (True, False),
    "manual-initially-set": (True, True),
}


# ==========================================================================================
# Recording a run
# ==========================================================================================


@dataclass
class Batch:
    """One ``access_batch`` call as a vCPU thread recorded it: [start, end] (event counter
    read before the call and after it returned), the slot page offsets and access codes."""
    thread: int
    start: int
    end: int
    pages: np.ndarray
    access: np.ndarray


@dataclass
class Harvest:
    """One harvest (get, or get then clear): [start, end] and the bitmap it returned."""
    start: int
    end: int
    bitmap: np.ndarray


@dataclass
class Run:
    vm: object
    slot: int
    vcpus: list
    manual: bool
    initially_set: bool
    prefaulted: np.ndarray          # page offsets mapped before dirty logging was enabled
    batches: list = field(default_factory=list)
    harvests: list = field(default_factory=list)
    stats_before: dict = field(default_factory=dict)


def harvest(vm, slot, manual):
    """What a VMM's migration thread does per round: KVM_GET_DIRTY_LOG, and with manual
    protect KVM_CLEAR_DIRTY_LOG with the bitmap it just got (the pages it will send)."""
    bitmap = vm.get_dirty_log(slot)
    if manual:
        vm.clear_dirty_log(slot, 0, NPAGES, bitmap)
    return bitmap


def bitmap_pages(bitmap, npages=NPAGES):
    """Page offsets whose bit is set (bit i % 64 of word i // 64)."""
    bits = np.unpackbits(np.ascontiguousarray(bitmap, dtype=np.uint64).view(np.uint8),
                         bitorder="little")[:npages]
    return np.flatnonzero(bits)


def pages_bitmap(pages, npages=NPAGES):
    """The inverse of ``bitmap_pages``."""
    bits = np.zeros(((npages + 63) // 64) * 64, dtype=np.uint8)
    bits[np.asarray(pages, dtype=np.int64)] = 1
    return np.packbits(bits, bitorder="little").view(np.uint64).copy()


def _writer_batches(rng):
    """NBATCHES batches of one writer: writes and reads at random in W_RANGE (the threads
    overlap: same range, different orders) and reads in R_RANGE, shuffled together."""
    pages = np.concatenate([
        rng.integers(*W_RANGE, (NBATCHES, BATCH_WRITES)),
        rng.integers(*W_RANGE, (NBATCHES, BATCH_W_READS)),
        rng.integers(*R_RANGE, (NBATCHES, BATCH_R_READS))], axis=1)
    access = np.concatenate([
        np.full((NBATCHES, BATCH_WRITES), WRITE),
        np.full((NBATCHES, BATCH_W_READS + BATCH_R_READS), READ)], axis=1)
    order = rng.permuted(np.tile(np.arange(BATCH), (NBATCHES, 1)), axis=1)
    pages = np.take_along_axis(pages, order, axis=1).astype(np.uint64)
    access = np.take_along_axis(access, order, axis=1).astype(np.uint8)
    return pages, access


def run_stress(layout_name, protect, seed, eager_split=True, duration=DURATION):
    """Build the VM, run the writers and the harvester, then the final round; return the
    recorded ``Run`` (the checks are the caller's)."""
    make_layout, pml = LAYOUTS[layout_name]
    manual, initially_set = PROTECT[protect]
    vm = sf.Vm(make_layout(), root_level=4, max_level=sf.PG_LEVEL_2M, max_pt_pages=1 << 10,
               manual_dirty_log_protect=manual, dirty_log_initially_set=initially_set,
               pml=pml, eager_page_split=eager_split)
    slot = vm.add_memslot(BASE_GFN, NPAGES, PFN0)
    vcpus = [vm.vcpu(), vm.vcpu()]

    # Before logging: map W_PREFAULT by writes and R_RANGE by reads, as 2M pages; enabling
    # dirty logging (or, under initially-set, the first clear) protects them, split to 4K
    # with eager split (later writes there take the fast page fault or, with PML, the CPU
    # logs them), else at 2M (the first write to each is a fault that splits it).  Writes
    # in the other half of W_RANGE take the slow path.
    pre_w = np.arange(*W_PREFAULT, dtype=np.uint64)
    pre_r = np.arange(*R_RANGE, dtype=np.uint64)
    vcpus[0].access_batch(BASE_GFN + pre_w, np.full(pre_w.size, WRITE, dtype=np.uint8))
    vcpus[1].access_batch(BASE_GFN + pre_r)
    assert vm.stats["pages_2m"] == (pre_w.size + pre_r.size) // 512
    vm.set_memslot_flags(slot, dirty_log=True)
    run = Run(vm, slot, vcpus, manual, initially_set,
              prefaulted=np.concatenate([pre_w, pre_r]).astype(np.int64))

    clock = itertools.count(1)
    # The first harvest, before any writer runs: empty, or under initially-set every page
    # (the VMM sends all of memory in its first round; its clear protects everything).
    s = next(clock)
    run.harvests.append(Harvest(s, next(clock), harvest(vm, slot, manual)))
    run.stats_before = vm.stats

    stop = threading.Event()
    finished = []               # writers that returned (or raised)
    plans = [_writer_batches(np.random.default_rng([seed, t])) for t in range(2)]

    def writer(t):
        v, (pages, access) = vcpus[t], plans[t]
        gfns = BASE_GFN + pages
        k = 0
        try:
            while not stop.is_set():
                i = k % NBATCHES
                s = next(clock)
                v.access_batch(gfns[i], access[i])
                run.batches.append(Batch(t, s, next(clock), pages[i], access[i]))
                k += 1
        finally:
            finished.append(t)

    def harvester():
        rng = np.random.default_rng([seed, 2])
        deadline = time.monotonic() + duration
        nonempty = 0
        try:
            while True:
                now = time.monotonic()
                if now > deadline and nonempty >= MIN_NONEMPTY_HARVESTS:
                    break
                if now > deadline + HARD_LIMIT or len(finished) == 2:
                    break       # a writer failed, or hung: the checks below fail
                s = next(clock)
                bitmap = harvest(vm, slot, manual)
                run.harvests.append(Harvest(s, next(clock), bitmap))
                nonempty += bool(bitmap.any())
                time.sleep(float(rng.uniform(0, 0.0005)))   # a VMM's round takes a while
        finally:
            stop.set()

    results = run_threads([lambda: writer(0), lambda: writer(1), harvester], timeout=120)
    for _, error in results:
        if error is not None:
            raise error

    # The final round, writers stopped: write L_RANGE, harvest, write it again, harvest.
    # (The controls drop these last harvests: the second write is then reported by no
    # harvest, although the union still holds its pages.)
    final = np.arange(*L_RANGE, dtype=np.uint64)
    writes = np.full(final.size, WRITE, dtype=np.uint8)
    for _ in range(2):
        s = next(clock)
        vcpus[0].access_batch(BASE_GFN + final, writes)
        run.batches.append(Batch(0, s, next(clock), final, writes))
        s = next(clock)
        run.harvests.append(Harvest(s, next(clock), harvest(vm, slot, manual)))
    return run


# ==========================================================================================
# The checker
# ==========================================================================================


@dataclass
class Report:
    missing: np.ndarray         # pages written but in no harvest at all
    late: list                  # (page, batch start): a write no harvest reported in time
    late_strict: list           # the same without the in-flight allowance (see below)
    spurious: list              # (page, harvest index): reported though nobody dirtied it
    n_writes: int
    n_harvests: int


def _window_has_page(keys, k, pages, lo, hi):
    """For each query, whether some harvest j with lo <= j <= hi reported ``pages``;
    ``keys`` = sorted page * k + harvest index of every (page, harvest) report."""
    needles = pages * k + lo
    order = np.argsort(needles, kind="stable")      # sorted needles search much faster
    i = np.empty(pages.size, dtype=np.int64)
    i[order] = np.searchsorted(keys, needles[order], side="left")
    found = np.zeros(pages.size, dtype=bool)
    inside = i < keys.size
    found[inside] = keys[i[inside]] <= pages[inside] * k + hi[inside]
    return found & (lo <= hi)


def check_dirty_log(batches, harvests, may_dirty, skip_harvests=()):
    """Check the harvests against the recorded batches.

    ``may_dirty(pages, access)`` → bool per access: whether it can set a dirty bit (every
    write; a read only where it may fault a page in).  ``skip_harvests``: harvest indices
    exempt from the "spurious" check (the first one under initially-set: all ones).

    Lower bound ("late").  For a write of page p in batch b = [s_b, e_b], let T_b be e_b,
    or the end of any other thread's batch that overlaps b if later; the write must be
    reported by some harvest j with end_j > s_b and j <= D_b, the first harvest that
    started after T_b (the last harvest if none did).  Sound for Linux 6.10 KVM:

    * the bit is set either by this write (slow path ``make_spte``, fast page fault, or the
      CPU's PML log, flushed at the batch's end at the latest: before T_b), and the first
      harvest taking it (xchg, or get then clear) ends after it was set, after s_b; or
    * the write found the page already writable (with PML: D set).  Then the event that
      made it so (CAS by a fault or D by the CPU) came after the last re-protection of p,
      and its bit was set after it, but possibly later: 6.10's fast page fault marks the
      page dirty *after* its cmpxchg, lockless, and PML entries sit in the vCPU's buffer
      until its next exit (the harvest's ``kvm_vcpu_kick`` does not wait).  That other
      batch overlaps b (it was in flight when this write hit), so its bit is set before
      T_b; and a harvest taking that bit ends after s_b: one that ended before s_b would
      have re-protected p after the event, and the write could not have hit.

    ``late_strict`` uses T_b = e_b (no allowance for another vCPU's in-flight fault).  The
    engine meets that too, more than 6.10 promises: its fast page faults and PML flushes
    happen inside the vCPU's mmu_lock read side (docs/API.md "Concurrency (engine)"), and
    get_dirty_log / clear_dirty_log drain the PML buffers and work with mmu_lock held for
    write, so no fault or buffer is half done while a harvest runs.

    Upper bound ("spurious").  A page p reported by harvest j, whose previous report of p
    was harvest i, was dirtied by a batch that started before end_j and ended after
    start_i (the bit was set after harvest i cleared it and before harvest j read it).
    """
    nh = len(harvests)
    h_start = np.array([h.start for h in harvests], dtype=np.int64)
    h_end = np.array([h.end for h in harvests], dtype=np.int64)
    assert np.all(np.diff(h_start) > 0), "harvests must be recorded in order"

    # Every (page, harvest) report, sorted by page then harvest: key = page * k + j.
    k = nh + 1
    rep_pages = [bitmap_pages(h.bitmap) for h in harvests]
    keys = np.sort(np.concatenate(
        [p.astype(np.int64) * k + j for j, p in enumerate(rep_pages)] + [np.zeros(0, np.int64)]))

    # Per-batch arrays; each thread's batches are sequential, in order.
    nb = len(batches)
    b_thread = np.array([b.thread for b in batches], dtype=np.int64)
    b_start = np.array([b.start for b in batches], dtype=np.int64)
    b_end = np.array([b.end for b in batches], dtype=np.int64)
    deadline_strict = b_end.copy()
    deadline = b_end.copy()
    for u in np.unique(b_thread):
        mine = b_thread == u
        us, ue = b_start[mine], b_end[mine]
        assert np.all(np.diff(us) > 0) and np.all(ue > us)
        # the last batch of thread u starting before e_b; it overlaps b if it ends after s_b
        last = np.searchsorted(us, b_end, side="left") - 1
        ok = (last >= 0) & ~mine
        ok[ok] &= ue[last[ok]] > b_start[ok]
        deadline[ok] = np.maximum(deadline[ok], ue[last[ok]])

    sizes = np.array([b.pages.size for b in batches], dtype=np.int64)
    which = np.repeat(np.arange(nb), sizes)
    pages = np.concatenate([b.pages for b in batches] + [np.zeros(0, np.uint64)]).astype(np.int64)
    access = np.concatenate([b.access for b in batches] + [np.zeros(0, np.uint8)])

    # -- lower bound -------------------------------------------------------------------------
    wr = access == WRITE
    w_pages, w_batch = pages[wr], which[wr]
    first_ok = np.searchsorted(h_end, b_start[w_batch], side="right")   # end_j > s_b
    late = {}
    for name, dl in (("late", deadline), ("late_strict", deadline_strict)):
        last_ok = np.minimum(np.searchsorted(h_start, dl[w_batch], side="right"), nh - 1)
        bad = ~_window_has_page(keys, k, w_pages, first_ok, last_ok)
        late[name] = sorted(set(zip(w_pages[bad].tolist(), b_start[w_batch[bad]].tolist())))
    union = np.zeros(NPAGES, dtype=bool)
    for p in rep_pages:
        union[p] = True
    missing = np.setdiff1d(np.unique(w_pages), np.flatnonzero(union))

    # -- upper bound -------------------------------------------------------------------------
    dirt = may_dirty(pages, access)
    t_pages, t_batch = pages[dirt], which[dirt]
    big = int(max(b_end.max(initial=0), h_end.max(initial=0))) + 1
    order = np.lexsort((b_start[t_batch], t_pages))
    t_pages, t_batch = t_pages[order], t_batch[order]
    t_keys = t_pages * big + b_start[t_batch]
    # running max of (page, batch end) over the touches sorted by (page, batch start):
    # per page, the latest end among the touches that started before a given time
    t_max_end = np.maximum.accumulate(t_pages * big + b_end[t_batch]) if t_pages.size else t_pages
    r_pages = keys // k
    r_harvest = keys % k
    r_prev = np.where(np.r_[False, r_pages[1:] == r_pages[:-1]], np.r_[0, r_harvest[:-1]], -1)
    prev_start = np.where(r_prev >= 0, h_start[r_prev], -1)
    i = np.searchsorted(t_keys, r_pages * big + h_end[r_harvest], side="left") - 1
    explained = np.zeros(keys.size, dtype=bool)
    has = i >= 0
    has[has] &= t_pages[i[has]] == r_pages[has]
    explained[has] = t_max_end[i[has]] - r_pages[has] * big > prev_start[has]
    exempt = np.isin(r_harvest, np.asarray(skip_harvests, dtype=np.int64))
    bad = ~explained & ~exempt
    spurious = sorted(zip(r_pages[bad].tolist(), r_harvest[bad].tolist()))

    return Report(missing=missing, late=late["late"], late_strict=late["late_strict"],
                  spurious=spurious, n_writes=int(wr.sum()), n_harvests=nh)


def check_run(run, harvests=None):
    """``check_dirty_log`` for a recorded run (optionally with doctored harvests)."""
    prefaulted = np.zeros(NPAGES, dtype=bool)
    prefaulted[run.prefaulted] = True

    def may_dirty(pages, access):
        # A write may always log.  A read only when it faults a page in (6.10's make_spte
        # makes the SPTE writable and marks the page dirty for a read fault too): never
        # for a page mapped before logging began, as nothing zaps here.
        return (access == WRITE) | ~prefaulted[pages]

    return check_dirty_log(run.batches, run.harvests if harvests is None else harvests,
                           may_dirty, skip_harvests=(0,) if run.initially_set else ())


def _distinct(pages, shift):
    return np.unique((BASE_GFN + pages) >> shift).size


# ==========================================================================================
# The property
# ==========================================================================================


# Every layout and harvest mode with eager split (the default), and without it for the
# PML layout and the one without A/D bits (huge pages protected, split by the first write).
CASES = [pytest.param(lay, prot, True, id=f"{lay}-{prot}") for lay in LAYOUTS for prot in PROTECT]
CASES += [pytest.param(lay, prot, False, id=f"{lay}-{prot}-no-eager-split")
          for lay in ("ept-ad-pml", "ept-noad") for prot in PROTECT]


@pytest.mark.parametrize("layout_name, protect, eager_split", CASES)
def test_no_write_is_missing_from_the_harvested_dirty_log(layout_name, protect, eager_split,
                                                          seed):
    run = run_stress(layout_name, protect, seed, eager_split=eager_split)
    vm, slot = run.vm, run.slot
    report = check_run(run)

    # The run did what it claims: harvests that reported writes interleaved with the
    # writers (the harvester waits for them), both vCPUs wrote, the first harvest was
    # empty (or everything, under initially-set).
    assert sum(h.bitmap.any() for h in run.harvests[1:-2]) >= MIN_NONEMPTY_HARVESTS
    assert {b.thread for b in run.batches} == {0, 1}
    first = bitmap_pages(run.harvests[0].bitmap)
    assert first.size == (NPAGES if run.initially_set else 0)

    # The property.
    assert report.missing.size == 0, f"writes missing from every harvest: {report.missing}"
    assert report.late == [], f"{len(report.late)} writes reported late: {report.late[:10]}"
    assert report.late_strict == [], report.late_strict[:10]
    assert report.spurious == [], f"reported but never dirtied: {report.spurious[:10]}"
    # The reads of pages mapped beforehand and the pages nobody touched: never reported
    # (already implied by the upper bound, spelled out).
    for h in run.harvests[1:]:
        reported = bitmap_pages(h.bitmap)
        assert not np.any((reported >= R_RANGE[0]) & (reported < R_RANGE[1]))
        assert not np.any(reported >= L_RANGE[1])

    # The ways a write gets logged were all taken: after the first harvest protected
    # every page, writes to mapped pages are logged by the CPU (PML) or by the fast page
    # fault that restores W, the other half of W_RANGE by the slow path.
    st, st0 = vm.stats, run.stats_before
    if vm.pml:
        assert st["pml_logged"] > st0["pml_logged"]
    else:
        assert st["faults_fast"] > st0["faults_fast"]
    assert st["dirty_pages_marked"] > st0["dirty_pages_marked"]

    # No table leaked, and the tables are exactly those of the mapped pages: every page
    # touched or prefaulted is mapped, at 4K (dirty-logged slots get no new huge pages),
    # except with eager split off a prefaulted 2M page that was only read (protected, never
    # split).  With eager split every huge page was split.
    vm.audit()
    assert_pool_accounting(vm)
    mapped = np.unique(np.concatenate([run.prefaulted] + [b.pages.astype(np.int64)
                                                          for b in run.batches]))
    levels = np.array([vm.lookup(BASE_GFN + int(p))[1] for p in mapped])
    small = mapped[levels == 1]
    assert set(levels.tolist()) <= ({1} if eager_split else {1, 2})
    assert np.all(np.isin(mapped[levels == 2], run.prefaulted))
    assert st["pages_4k"] == small.size
    assert st["pages_2m"] == (0 if levels.size == small.size else _distinct(mapped[levels == 2], 9))
    assert st["pt_pages_l1"] == _distinct(small, 9)
    assert st["pt_pages_l2"] == _distinct(mapped, 18)
    assert st["pt_pages_l3"] == _distinct(mapped, 27)
    assert st["pt_pages_l4"] == 1

    # Disabling dirty logging zaps the collapsible 4K tables (huge pages may come back):
    # every 2M range of the slot could be huge, so no 4K table survives.
    vm.set_memslot_flags(slot, dirty_log=False)
    vm.audit()
    assert_pool_accounting(vm)
    st = vm.stats
    assert st["pt_pages_l1"] == 0 and st["pages_4k"] == 0
    # Deleting the slot zaps every root fast; once each vCPU has entered again (dropping
    # its reference to the invalid root) only the new root is left.
    vm.delete_memslot(slot)
    for v in run.vcpus:
        assert v.fault(BASE_GFN, error_code=sf.PFERR_RSVD_MASK) == sf.PF.RETRY
    vm.audit()
    assert_pool_accounting(vm)
    st = vm.stats
    assert st["pt_pages"] == 1 and len(vm.roots) == 1
    assert st["pages_4k"] == st["pages_2m"] == st["pages_1g"] == 0


# ==========================================================================================
# Negative controls: the checker catches a harvester that loses pages
# ==========================================================================================


@pytest.mark.parametrize("protect", ["get-and-clear", "manual"])
def test_checker_catches_lost_and_invented_pages(protect, seed):
    """Negative controls on a real (short) run: the genuine harvests pass, and the checker
    reports exactly what a harvester that drops a round, loses a page or invents one got
    wrong; dropping only the last round shows the per-round check catching a lost write
    that the union check cannot see."""
    run = run_stress("ept-ad-pml", protect, seed, duration=0.05)
    genuine = check_run(run)                         # the genuine run is clean
    assert (genuine.missing.size, genuine.late, genuine.spurious) == (0, [], [])
    final = list(range(*L_RANGE))
    second_write = run.batches[-1].start             # the final round's second write

    # Drop the very last harvest: the second write of L_RANGE is reported by no harvest
    # (late), although the union still holds its pages from the harvest before.
    report = check_run(run, run.harvests[:-1])
    assert report.missing.size == 0
    assert report.late == report.late_strict == [(p, second_write) for p in final]

    # Drop both final harvests: L_RANGE, written by nobody else, is missing altogether.
    report = check_run(run, run.harvests[:-2])
    assert report.missing.tolist() == final

    # Lose one page from every harvest: all its writes are missing.
    page = int(run.batches[0].pages[run.batches[0].access == WRITE][0])
    harvests = [Harvest(h.start, h.end, pages_bitmap(np.setdiff1d(bitmap_pages(h.bitmap), page)))
                for h in run.harvests]
    assert check_run(run, harvests).missing.tolist() == [page]

    # Invent a page nobody dirtied (one only read, mapped beforehand): spurious.
    harvests = list(run.harvests)
    h = harvests[1]
    harvests[1] = Harvest(h.start, h.end, pages_bitmap(np.union1d(bitmap_pages(h.bitmap),
                                                                  [R_RANGE[0]])))
    assert check_run(run, harvests).spurious == [(R_RANGE[0], 1)]


def test_checker_on_a_hand_made_history():
    """The checker's rules on a history small enough to read (no VM), times 1..23:

        thread 0:  A [1, 4] writes 5, 6        C [9, 11] writes 8
        thread 1:  B [3, 14] writes 7 (in flight during A, C and harvest 1)
        harvests:  0 [5, 6]    1 [12, 13]    2 [15, 16]
    """
    u8 = lambda *a: np.array(a, dtype=np.uint8)      # noqa: E731
    pg = lambda *a: np.array(a, dtype=np.uint64)     # noqa: E731
    batches = [Batch(0, 1, 4, pg(5, 6), u8(WRITE, WRITE)), Batch(1, 3, 14, pg(7), u8(WRITE)),
               Batch(0, 9, 11, pg(8), u8(WRITE))]
    always = lambda pages, access: np.ones(pages.size, dtype=bool)   # noqa: E731

    def harvests(*reports):
        times = [(5, 6), (12, 13), (15, 16), (17, 18), (22, 23)]
        return [Harvest(s, e, pages_bitmap(r)) for (s, e), r in zip(times, reports)]

    # Page 8 reported by harvest 2 although C ended before harvest 1 started: allowed, as
    # B was in flight (its fault may have made 8 writable and not yet logged it), but not
    # without the allowance.
    r = check_dirty_log(batches, harvests([5, 6], [], [7, 8]), always)
    assert (r.missing.size, r.late, r.spurious) == (0, [], [])
    assert r.late_strict == [(8, 9)]
    r = check_dirty_log(batches, harvests([5, 6], [8], [7]), always)
    assert (r.late, r.late_strict) == ([], [])
    # Page 6 never reported: missing and late; page 5 only by harvest 2: within the
    # allowance (B overlaps A), not without.
    r = check_dirty_log(batches, harvests([], [], [5, 7, 8]), always)
    assert r.missing.tolist() == [6] and r.late == [(6, 1)]
    assert r.late_strict == [(5, 1), (6, 1), (8, 9)]
    # Page 5 reported again by harvest 3 with no write since harvest 0: spurious.
    r = check_dirty_log(batches, harvests([5, 6], [], [7, 8], [5]), always)
    assert r.spurious == [(5, 3)] and r.late == []
    # A write of 5 in D [20, 21]: harvest 3 ended before D started and cannot report it
    # (and is spurious itself); harvest 4 has to.
    d = batches + [Batch(0, 20, 21, pg(5), u8(WRITE))]
    r = check_dirty_log(d, harvests([5, 6], [], [7, 8], [5], []), always)
    assert r.late == [(5, 20)] and r.spurious == [(5, 3)] and r.missing.size == 0
    r = check_dirty_log(d, harvests([5, 6], [], [7, 8], [], [5]), always)
    assert (r.late, r.spurious) == ([], [])
    # A read that cannot dirty (may_dirty False) does not explain a report.
    reads = [Batch(0, 1, 4, pg(9), u8(READ))]
    never_reads = lambda pages, access: access == WRITE   # noqa: E731
    r = check_dirty_log(reads, harvests([9]), never_reads)
    assert r.spurious == [(9, 0)] and r.n_writes == 0
    assert check_dirty_log(reads, harvests([9]), always).spurious == []


@pytest.mark.parametrize("eager_split", [False, True], ids=["no-eager-split", "eager-split"])
def test_checker_sees_the_write_610_loses_to_its_align_quirk(eager_split):
    """A real lost write, made by the engine as Linux 6.10 makes it (docs/API.md
    clear_dirty_log: "Kept as 6.10 has it"): under initially-set, a slot that is not
    2M-aligned has 64-page words straddling 2M boundaries; clearing a word whose last bit
    is the first page of the next 2M page B (and nothing else of B) leaves B a writable
    huge page, since ``ALIGN(start, 2M) == ALIGN(end, 2M)`` rounds both up to B.  Without
    eager split nothing splits B, so the next write to that page is logged nowhere: the
    checker reports it late.  With eager split B was split first, and nothing is lost."""
    vm = sf.Vm(sf.SpteLayout.ept(), max_level=sf.PG_LEVEL_2M, manual_dirty_log_protect=True,
               dirty_log_initially_set=True, pml=False, eager_page_split=eager_split)
    b_gfn = BASE_GFN                     # 2M-aligned: B, slot page 32
    npages = 32 + 1024
    slot = vm.add_memslot(b_gfn - 32, npages, PFN0 - 32)     # gfn and pfn equally misaligned
    v = vm.vcpu()
    write = np.array([WRITE], dtype=np.uint8)
    v.access_batch(np.array([b_gfn], dtype=np.uint64), write)   # B mapped as a 2M page
    assert vm.lookup(b_gfn)[1] == sf.PG_LEVEL_2M
    vm.set_memslot_flags(slot, dirty_log=True)                 # initially-set: nothing done

    clock = itertools.count(1)
    batches, harvests = [], []
    # Round 0: the VMM gets the log (all ones) and sends and clears pages 0 and 32 only.
    s = next(clock)
    assert bitmap_pages(vm.get_dirty_log(slot)).size == npages
    sent = pages_bitmap([0, 32])
    vm.clear_dirty_log(slot, 0, npages, sent)
    harvests.append(Harvest(s, next(clock), sent))
    assert vm.lookup(b_gfn)[1] == (sf.PG_LEVEL_2M if not eager_split else sf.PG_LEVEL_4K)
    # The guest writes page 32 again; round 1 gets and clears the whole log.
    s = next(clock)
    v.access_batch(np.array([b_gfn], dtype=np.uint64), write)
    batches.append(Batch(0, s, next(clock), np.array([32], dtype=np.uint64), write))
    s = next(clock)
    got = vm.get_dirty_log(slot)
    vm.clear_dirty_log(slot, 0, npages, got)
    harvests.append(Harvest(s, next(clock), got))
    vm.audit()

    # Both rounds report pages nobody wrote (initially-set): no upper-bound check here.
    report = check_dirty_log(batches, harvests, lambda p, a: a == WRITE, skip_harvests=(0, 1))
    assert report.missing.size == 0                  # page 32 was sent in round 0 ...
    if eager_split:
        assert report.late == [] and report.late_strict == []
    else:                                            # ... but its second write never
        assert report.late == [(32, batches[0].start)]
