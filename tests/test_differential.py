"""Stateful differential tests: the Cython engine and the reference model, driven in
lockstep by hypothesis state machines, never disagree (STYLE.md §3.7 "Stateful differential
test"; docs/API.md "MemoryCache", "Vm, Vcpu").

* ``TestCacheDifferential``: random memory-cache operations (KVM_MMU_SPEC.md §1.3, §6 items
  1-7).  Each side holds one PagePool and two MemoryCaches on it.  Every rule is applied to
  both sides and must give the same return value or the same exception; after every rule
  the invariant compares all observable state, including the content of every page held
  by a cache or handed out by one.
* ``TestVmDifferential``: random faults, batches, memslot changes, zaps and injected CAS
  failures on the TDP MMU (spec §3.4-3.10).  Each side holds one Vm and two vCPUs built
  from the same drawn configuration (layout, non-present value, root level, max level, NX
  huge pages, poisoned pool, a small max_pt_pages so that OutOfMemory happens).  Every rule
  applies one call to both sides and requires the same return value or the same exception
  (and, for a batch, the same ``.completed`` and ``out``).  After every step the invariant
  compares the stats (every key), ``walk()`` of every touched gfn, the state of every pool
  page, the content of every table and cached page, both vCPU caches, the memslots, the
  MMIO generation and the host page flags of the touched pfns, then runs ``audit()`` on
  both.

Size: see the settings after each machine (for the VM machine, HYPOTHESIS_PROFILE unset:
quick, unshrunk; ``ci``: longer, shrunk).  ``--hypothesis-show-statistics`` lists what the
VM machine's rules ended in.
"""
import importlib
import os

import numpy as np
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from support.layouts import LAYOUT_KINDS, make_layout
from support.spec import NP63, PAGES_1G, PAGES_2M, POISON, U64, gfn_width


def normalise(value):
    """PF members and numpy scalars compare as plain ints."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, dict):
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):           # a dirty bitmap
        return (value.dtype.str, value.tolist())
    return value


class Outcome:
    """What one call did: a return value (numpy scalars and PF members as plain ints) or an
    exception, compared by its class and, for ``OutOfMemory`` from ``fault_batch``, by how
    many faults it completed."""

    def __init__(self, fn):
        try:
            self.value, self.exc = normalise(fn()), None
        except Exception as e:  # noqa: BLE001 - compared below, never swallowed
            self.value, self.exc = None, e

    def key(self):
        if self.exc is None:
            return ("returned", self.value)
        return ("raised", type(self.exc), getattr(self.exc, "completed", None))


# ==========================================================================================
# Memory caches (spec §1.3, §6 items 1-7)
# ==========================================================================================


init_values = st.one_of(st.just(0), st.just(NP63), st.integers(1, U64))


cache_configs = st.tuples(init_values, st.sampled_from([None, True, False]), st.integers(0, 8))


cache_ids = st.integers(0, 1)


class CacheSide:
    """One implementation's pool and caches."""

    def __init__(self, mod, pool_capacity, poisoned, configs):
        self.mod = mod
        self.pool = mod.PagePool(pool_capacity, poison=POISON if poisoned else None)
        self.caches = [
            mod.MemoryCache(self.pool, init_value=init, gfp_zero=gfp, capacity=cap) for init, gfp, cap in configs
        ]


def both_implementations():
    """(engine module, reference module); fails loudly if the engine is not built."""
    importlib.import_module("spte_fast._core")
    return importlib.import_module("spte_fast"), importlib.import_module("spte_fast.reference")


class CacheDifferential(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.fast_mod, self.ref_mod = both_implementations()
        self.fast = self.ref = None
        self.handed_out = []  # pages given out by cache.alloc(): (index, cache id)
        self.raw = []  # pages taken by pool.alloc()

    # ----------------------------------------------------------------- helpers

    def both(self, call):
        """Apply ``call(side)`` to both sides; they must agree.  Returns the outcome."""
        f = Outcome(lambda: call(self.fast))
        r = Outcome(lambda: call(self.ref))
        assert f.key() == r.key(), f"fast {f.key()} (exc {f.exc!r}) != reference {r.key()} (exc {r.exc!r})"
        if f.exc is not None:
            # only the documented exception types may escape
            assert isinstance(f.exc, (self.ref_mod.OutOfMemory, self.ref_mod.CacheConfigError,
                                      ValueError, TypeError)), repr(f.exc)
        return r

    # ----------------------------------------------------------------- set-up

    @initialize(
        pool_capacity=st.integers(1, 30),
        poisoned=st.booleans(),
        configs=st.tuples(cache_configs, cache_configs),
    )
    def build(self, pool_capacity, poisoned, configs):
        self.configs = configs
        self.fast = CacheSide(self.fast_mod, pool_capacity, poisoned, configs)
        self.ref = CacheSide(self.ref_mod, pool_capacity, poisoned, configs)

    # ----------------------------------------------------------------- rules

    @rule(c=cache_ids, min_=st.integers(0, 9), capacity=st.one_of(st.none(), st.integers(0, 9)))
    def topup(self, c, min_, capacity):
        if capacity is None:
            self.both(lambda s: s.caches[c].topup(min_))
        else:
            self.both(lambda s: s.caches[c].topup(min_, capacity=capacity))

    @rule(c=cache_ids)
    def alloc(self, c):
        out = self.both(lambda s: s.caches[c].alloc())
        if out.exc is None:
            self.handed_out.append((out.value, c))

    @rule(c=cache_ids)
    def free(self, c):
        self.both(lambda s: s.caches[c].free())

    @rule(k=st.one_of(st.none(), st.integers(0, 5)))
    def fail_after(self, k):
        self.both(lambda s: s.pool.fail_after(k))

    @rule()
    def pool_alloc(self):
        out = self.both(lambda s: s.pool.alloc())
        if out.exc is None:
            self.raw.append(out.value)

    @precondition(lambda self: self.handed_out or self.raw)
    @rule(data=st.data())
    def release(self, data):
        """The holder of a page (a page table being freed, say) gives it back to the pool."""
        pages = [p for p, _ in self.handed_out] + self.raw
        page = data.draw(st.sampled_from(pages))
        self.both(lambda s: s.pool.free(page))
        self.handed_out = [(p, c) for p, c in self.handed_out if p != page]
        self.raw = [p for p in self.raw if p != page]

    @rule(c=cache_ids, bad=st.sampled_from([-1, 1.5, "1", 10**30]))
    def topup_bad_argument(self, c, bad):
        out = self.both(lambda s: s.caches[c].topup(bad))
        assert isinstance(out.exc, (TypeError, ValueError))

    # ----------------------------------------------------------------- invariant

    @invariant()
    def same_state(self):
        if self.fast is None:
            return
        fp, rp = self.fast.pool, self.ref.pool
        assert fp.stats == rp.stats
        assert fp.nr_free == rp.nr_free
        assert [fp.is_clean(i) for i in range(fp.capacity)] == [rp.is_clean(i) for i in range(rp.capacity)]
        assert [fp.page_state(i) for i in range(fp.capacity)] == [rp.page_state(i) for i in range(rp.capacity)]
        for c, (fc, rc) in enumerate(zip(self.fast.caches, self.ref.caches)):
            assert fc.nobjs == rc.nobjs == len(fc) == len(rc), c
            assert fc.capacity == rc.capacity, c
            assert fc.objects == rc.objects, c
            assert fc.warnings == rc.warnings, c
            assert fc.warnings_by_reason == rc.warnings_by_reason, c
            assert fc.stats == rc.stats, c
            assert (fc.init_value, fc.gfp_zero, fc.default_capacity) == (rc.init_value, rc.gfp_zero,
                                                                        rc.default_capacity)
            for page in rc.objects:
                assert np.array_equal(fp.pages[page], rp.pages[page]), (c, page)
        for page, c in self.handed_out:
            assert np.array_equal(fp.pages[page], rp.pages[page]), ("handed out", c, page)

    @invariant()
    def cached_pages_are_initialised(self):
        """Beyond agreement: a page in a fill-path cache holds 512 x init_value and a page
        in a zero-path cache holds zeros (spec §6 item 2, §1.3 alloc_obj)."""
        if self.ref is None:
            return
        for side in (self.fast, self.ref):
            for cache in side.caches:
                if cache.gfp_zero and cache.init_value != 0:
                    continue  # refused configuration: top-up never fills it
                if cache.init_value != 0:
                    want = cache.init_value
                elif cache.gfp_zero:
                    want = 0
                else:
                    continue  # not initialised: content as is
                for page in cache.objects:
                    assert (side.pool.pages[page] == np.uint64(want)).all(), (side.mod.__name__, page)
                assert cache.nobjs <= cache.capacity


# three times the profile's examples: each one is a whole random program
CacheDifferential.TestCase.settings = settings(
    stateful_step_count=25, max_examples=3 * settings.default.max_examples
)


TestCacheDifferential = CacheDifferential.TestCase


# ==========================================================================================
# The TDP MMU: Vm and two vCPUs (spec §3.4-3.10)
# ==========================================================================================


PFN_BASE = 1 << 30


#: gfn anchors: 2M / 1G / 512G boundaries, the top of the 4-level and 5-level widths
ANCHORS = [0, PAGES_2M, 2 * PAGES_2M, PAGES_1G, 2 * PAGES_1G, 3 * PAGES_1G, 4 * PAGES_1G,
           1 << 27, (1 << 36) - PAGES_1G, 1 << 36, (1 << 45) - PAGES_2M]


OFFSETS = [-1, 0, 1, 2, 511, 513]


gfns = st.builds(lambda a, d: max(0, a + d), st.sampled_from(ANCHORS), st.sampled_from(OFFSETS))


vcpu_ids = st.integers(0, 1)

#: error codes an exit handler delivers (PFERR_*: P 1, W 2, U 4, RSVD 8, FETCH 16)
ERROR_CODES = [0, 2, 4, 16, 1, 1 | 2, 1 | 4, 1 | 16, 8, 1 | 2 | 4 | 8, 4 | 8]


INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


class VmSide:
    """One implementation's Vm and two vCPUs."""

    def __init__(self, mod, kind, nonpresent, root_level, max_level, nx, poisoned, pages,
                 host_maxphyaddr, dirty):
        self.mod = mod
        self.layout = make_layout(mod, kind, nonpresent)
        self.vm = mod.Vm(self.layout, root_level=root_level, max_level=max_level,
                         max_pt_pages=pages, nx_huge_pages=nx,
                         poison=POISON if poisoned else None, host_maxphyaddr=host_maxphyaddr,
                         **dirty)
        self.vcpus = [self.vm.vcpu(), self.vm.vcpu()]


class VmDifferential(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.fast_mod, self.ref_mod = both_implementations()
        self.sides = None
        self.touched = set()  # gfns faulted or zapped (valid ones)
        self.pfns = set()  # host pfns of slots, for the host-flag comparison
        self.slot_ids = []

    # ----------------------------------------------------------------- helpers

    def both(self, name, fn):
        """Apply fn(side) to (fast, reference); the outcomes must agree."""
        fast, ref = (Outcome(lambda s=s: fn(s)) for s in self.sides)
        assert fast.key() == ref.key(), (
            f"{name}: fast {fast.key()} ({fast.exc!r}) != reference {ref.key()} ({ref.exc!r})")
        # --hypothesis-show-statistics: what the rules ended in
        if ref.exc is not None:
            event(f"{name} -> {type(ref.exc).__name__}")
        elif name == "fault":
            event(f"fault -> {ref.value}")
        else:
            event(f"{name} -> {'ok' if not isinstance(ref.value, bool) else ref.value}")
        return ref

    @property
    def width(self):
        return gfn_width(self.root_level)

    def touch(self, gfn):
        """Remember a valid gfn for walk() comparisons, and the host pfns that back it and
        the heads of the 2M / 1G pages around it, for the host-flag comparisons."""
        if not 0 <= gfn < self.width:
            return
        self.touched.add(gfn)
        for _sid, base, npages, pfn, _ro in self.sides[1].vm.memslots:
            if base <= gfn < base + npages:
                for head in (gfn, gfn & ~(PAGES_2M - 1), gfn & ~(PAGES_1G - 1)):
                    if head >= base:
                        self.pfns.add(pfn + head - base)

    # ----------------------------------------------------------------- set-up

    @initialize(
        kind=st.sampled_from(LAYOUT_KINDS),
        nonpresent=st.sampled_from([NP63, 0]),
        root_level=st.sampled_from([4, 5]),
        max_level=st.integers(1, 3),
        nx=st.booleans(),
        poisoned=st.booleans(),
        pages=st.integers(16, 64),
        first_slot=st.sampled_from([True, True, True, False]),
        host_maxphyaddr=st.sampled_from([46, 46, 52, 39]),
        protect=st.sampled_from([(False, False), (True, False), (True, True)]),
        pml=st.sampled_from([None, None, False]),
        eager=st.booleans(),
        ratio=st.sampled_from([60, 1, 0]),
    )
    def setup(self, kind, nonpresent, root_level, max_level, nx, poisoned, pages, first_slot,
              host_maxphyaddr, protect, pml, eager, ratio):
        """The dirty-logging options too (issue 11): manual protect (and initially-set),
        PML on where the layout has it or off, eager split, the NX recovery ratio."""
        self.root_level = root_level
        self.manual = protect[0]
        dirty = dict(manual_dirty_log_protect=protect[0], dirty_log_initially_set=protect[1],
                     pml=pml, eager_page_split=eager, nx_huge_pages_recovery_ratio=ratio)
        self.sides = [VmSide(mod, kind, nonpresent, root_level, max_level, nx, poisoned, pages,
                             host_maxphyaddr, dirty)
                      for mod in (self.fast_mod, self.ref_mod)]
        if first_slot:
            # a 1G-aligned slot over [0, 2G), so that huge pages happen
            self.add_memslot_raw(0, 2 * PAGES_1G, PFN_BASE, False)

    def add_memslot_raw(self, base, npages, pfn, readonly, dirty_log=False):
        out = self.both("add_memslot", lambda s: s.vm.add_memslot(base, npages, pfn, readonly,
                                                                   dirty_log=dirty_log))
        if out.exc is None:
            self.slot_ids.append(out.value)
            for p in (pfn, pfn + 1, pfn + npages - 1, pfn + (npages // 2)):
                self.pfns.add(p)

    # ----------------------------------------------------------------- rules

    @rule(v=vcpu_ids, gfn=gfns, write=st.booleans(), exec_=st.booleans())
    def fault(self, v, gfn, write, exec_):
        self.touch(gfn)
        self.both("fault", lambda s: s.vcpus[v].fault(gfn, write=write, exec=exec_))

    @precondition(lambda self: self.sides is not None and self.sides[1].vm.memslots)
    @rule(v=vcpu_ids, data=st.data(), write=st.booleans(), exec_=st.booleans())
    def fault_in_slot(self, v, data, write, exec_):
        """A gfn inside a slot, near its ends and its 2M boundaries."""
        _sid, base, npages, _pfn, _ro = data.draw(st.sampled_from(self.sides[1].vm.memslots))
        offset = data.draw(st.sampled_from(
            [0, 1, 511, 512, 513, npages // 2, npages - 1, npages - 512]))
        gfn = base + min(max(offset, 0), npages - 1)
        self.touch(gfn)
        self.both("fault", lambda s: s.vcpus[v].fault(gfn, write=write, exec=exec_))

    @rule(v=vcpu_ids, gfn=gfns, ec=st.sampled_from(ERROR_CODES))
    def fault_error_code(self, v, gfn, ec):
        """An exit as a VMX/SVM handler delivers it (mmu.c kvm_mmu_page_fault)."""
        self.touch(gfn)
        self.both("fault", lambda s: s.vcpus[v].fault(gfn, error_code=ec))

    @rule(v=vcpu_ids, gfn=gfns, kind=st.integers(0, 2))
    def access(self, v, gfn, kind):
        self.touch(gfn)
        self.both("access", lambda s: s.vcpus[v].access(gfn, write=kind == 1, exec=kind == 2))

    @precondition(lambda self: self.sides is not None and self.sides[1].vm.memslots)
    @rule(v=vcpu_ids, data=st.data(), kind=st.integers(0, 2))
    def access_in_slot(self, v, data, kind):
        _sid, base, npages, _pfn, _ro = data.draw(st.sampled_from(self.sides[1].vm.memslots))
        gfn = base + min(data.draw(st.sampled_from([0, 1, 512, npages // 2])), npages - 1)
        self.touch(gfn)
        self.both("access", lambda s: s.vcpus[v].access(gfn, write=kind == 1, exec=kind == 2))

    @rule(v=vcpu_ids, batch=st.lists(st.tuples(gfns, st.integers(0, 2)), max_size=8),
          with_access=st.booleans(), with_out=st.booleans())
    def access_batch(self, v, batch, with_access, with_out):
        for g, _ in batch:
            self.touch(g)
        outs = []

        def call(s):
            g = np.array([x for x, _ in batch], dtype=np.uint64)
            acc = np.array([a for _, a in batch], dtype=np.uint8) if with_access else None
            out = np.full(len(batch), -1, dtype=np.int8) if with_out else None
            outs.append(out)
            return s.vcpus[v].access_batch(g, acc, out)

        self.both("access_batch", call)
        if with_out:
            assert outs[0].tolist() == outs[1].tolist()

    @rule(v=vcpu_ids, batch=st.lists(st.tuples(gfns, st.sampled_from(ERROR_CODES)), max_size=6))
    def fault_batch_error_codes(self, v, batch):
        """RSVD faults on a gfn without an MMIO SPTE would retry for ever: left out."""
        batch = [(g, e) for g, e in batch if not e & 8]
        for g, _ in batch:
            self.touch(g)
        self.both("fault_batch", lambda s: s.vcpus[v].fault_batch(
            np.array([g for g, _ in batch], dtype=np.uint64),
            error_codes=np.array([e for _, e in batch], dtype=np.uint32)))

    @rule(start=gfns, span=st.sampled_from([1, 512, PAGES_1G, 1 << 27]), flush=st.booleans())
    def age_gfn_range(self, start, span, flush):
        self.touch(start)
        end = min(start + span, self.width)
        self.both("age_gfn_range", lambda s: s.vm.age_gfn_range(start, max(start, end), flush))

    @rule(start=gfns, span=st.sampled_from([1, 512, PAGES_1G]))
    def test_age_gfn(self, start, span):
        end = min(start + span, self.width)
        self.both("test_age_gfn", lambda s: s.vm.test_age_gfn(start, max(start, end)))

    @rule()
    def zap_all_fast(self):
        self.both("zap_all_fast", lambda s: s.vm.zap_all_fast())

    @rule(data=st.data(), to=st.sampled_from(ANCHORS[:8] + [PAGES_2M + 1, 7 * PAGES_1G]))
    def move_memslot(self, data, to):
        sid = data.draw(st.sampled_from(self.slot_ids)) if self.slot_ids else 0
        self.both("move_memslot", lambda s: s.vm.move_memslot(sid, to))

    @rule(v=vcpu_ids, batch=st.lists(st.tuples(gfns, st.integers(0, 3)), max_size=8),
          dtype=st.sampled_from(INT_DTYPES), with_access=st.booleans(), with_out=st.booleans(),
          strided=st.booleans())
    def fault_batch(self, v, batch, dtype, with_access, with_out, strided):
        """strided: every array is a view with stride 2 (API.md asks for 1-D arrays only)."""
        info = np.iinfo(dtype)
        batch = [(g, a) for g, a in batch if g <= info.max]
        for g, _ in batch:
            self.touch(g)
        outs = []

        def arr(values, dt):
            if not strided:
                return np.array(values, dtype=dt)
            a = np.zeros(2 * len(values), dtype=dt)
            a[::2] = values
            return a[::2]

        def call(s):
            g = arr([x for x, _ in batch], dtype)
            acc = arr([a for _, a in batch], dtype) if with_access else None
            out = arr([-1] * len(batch), np.int8) if with_out else None
            outs.append(out)
            return s.vcpus[v].fault_batch(g, access=acc, out=out)

        self.both("fault_batch", call)
        if with_out:
            assert outs[0].tolist() == outs[1].tolist()

    @rule(anchor=st.sampled_from(ANCHORS[:8]), shift=st.sampled_from([0, 1, PAGES_2M]),
          npages=st.sampled_from([1, 511, 512, 513, 1024, PAGES_1G, PAGES_1G + PAGES_2M]),
          region=st.integers(0, 3), skew=st.sampled_from([0, 0, 1, PAGES_2M]),
          readonly=st.booleans(), dirty_log=st.booleans())
    def add_memslot(self, anchor, shift, npages, region, skew, readonly, dirty_log):
        base = anchor + shift
        pfn = (region + 2) * PFN_BASE + (base % PAGES_1G) + skew
        self.add_memslot_raw(base, npages, pfn, readonly, dirty_log)

    # --------------------------------------------- dirty logging, notifiers, huge pages

    def some_slot(self, data):
        """Mostly a live slot id, sometimes one that does not exist."""
        if self.slot_ids and data.draw(st.sampled_from([True, True, True, False])):
            return data.draw(st.sampled_from(self.slot_ids))
        return data.draw(st.integers(-1, 20))

    @rule(data=st.data(), on=st.booleans())
    def set_memslot_flags(self, data, on):
        sid = self.some_slot(data)
        self.both("set_memslot_flags", lambda s: s.vm.set_memslot_flags(sid, dirty_log=on))

    @precondition(lambda self: self.sides is not None and self.slot_ids)
    @rule(data=st.data(), v=vcpu_ids, offsets=st.lists(st.sampled_from(
        [0, 1, 2, 63, 64, 65, 511, 512, 513, 1023, 4096, PAGES_1G - 1]), max_size=6),
        clear=st.booleans())
    def dirty_log_round(self, data, v, offsets, clear):
        """What migration does, in one step: dirty logging on for a live slot, the guest
        writes some of its pages, the log is harvested (and, with manual protect, cleared)."""
        sid = data.draw(st.sampled_from(self.slot_ids))
        _sid, base, npages, _pfn, _ro = next(m for m in self.sides[1].vm.memslots
                                              if m[0] == sid)
        gfn_list = [base + o for o in offsets if o < npages]
        for g in gfn_list:
            self.touch(g)
        self.both("set_memslot_flags", lambda s: s.vm.set_memslot_flags(sid, dirty_log=True))
        self.both("access_batch", lambda s: s.vcpus[v].access_batch(
            np.array(gfn_list, dtype=np.uint64), np.ones(len(gfn_list), dtype=np.uint8)))
        out = self.both("get_dirty_log", lambda s: s.vm.get_dirty_log(sid))
        if clear and self.manual and out.exc is None:
            words = np.array(out.value[1], dtype=np.uint64)
            self.both("clear_dirty_log",
                      lambda s: s.vm.clear_dirty_log(sid, 0, npages, words))

    @rule(data=st.data())
    def get_dirty_log(self, data):
        sid = self.some_slot(data)
        self.both("get_dirty_log", lambda s: s.vm.get_dirty_log(sid))

    @rule(data=st.data(), first_word=st.integers(0, 9), words=st.integers(0, 4),
          masks=st.lists(st.sampled_from([0, 1, 1 << 63, (1 << 64) - 1, 0x8000000100000001,
                                          0x00FF00FF00FF00FF]), min_size=4, max_size=4),
          odd=st.sampled_from([0, 0, 0, 1, 63]))
    def clear_dirty_log(self, data, first_word, words, masks, odd):
        """Words of first_page / num_pages; ``odd`` makes them unaligned (-EINVAL)."""
        sid = self.some_slot(data)
        first, num = first_word * 64 + odd, words * 64
        self.both("clear_dirty_log", lambda s: s.vm.clear_dirty_log(
            sid, first, num, np.array(masks, dtype=np.uint64)))

    @rule(start=gfns, span=st.sampled_from([1, 512, PAGES_1G, 2 * PAGES_1G]),
          level=st.integers(1, 3))
    def split_huge_pages(self, start, span, level):
        self.touch(start)
        end = min(start + span, self.width)
        self.both("split_huge_pages",
                  lambda s: s.vm.split_huge_pages(start, max(start, end), level))

    @rule()
    def recover_nx_huge_pages(self):
        self.both("recover_nx_huge_pages", lambda s: s.vm.recover_nx_huge_pages())

    @rule(on=st.booleans())
    def set_nx_huge_pages(self, on):
        self.both("set_nx_huge_pages", lambda s: s.vm.set_nx_huge_pages(on))

    @rule(start=gfns, span=st.sampled_from([1, 512, PAGES_1G, 1 << 27]))
    def unmap_gfn_range(self, start, span):
        self.touch(start)
        end = min(start + span, self.width)
        self.both("unmap_gfn_range", lambda s: s.vm.unmap_gfn_range(start, max(start, end)))

    @rule(gfn=gfns, min_level=st.integers(1, 4))
    def write_protect_gfn(self, gfn, min_level):
        self.touch(gfn)
        self.both("write_protect_gfn", lambda s: s.vm.write_protect_gfn(gfn, min_level))

    @rule(data=st.data())
    def delete_memslot(self, data):
        if self.slot_ids and data.draw(st.sampled_from([True, True, True, False])):
            sid = data.draw(st.sampled_from(self.slot_ids))
        else:
            sid = data.draw(st.integers(-1, 20))
        out = self.both("delete_memslot", lambda s: s.vm.delete_memslot(sid))
        if out.exc is None:
            self.slot_ids.remove(sid)

    @rule(start=gfns, span=st.sampled_from([0, 1, 2, 511, 512, 513, PAGES_1G, 1 << 27]))
    def zap_gfn_range(self, start, span):
        self.touch(start)
        end = min(start + span, self.width + 1)
        self.both("zap_gfn_range", lambda s: s.vm.zap_gfn_range(start, end))

    @precondition(lambda self: self.sides is not None and self.sides[1].vm.stats["pt_pages"] > 1)
    @rule()
    def zap_all(self):
        self.both("zap_all", lambda s: s.vm.zap_all())

    @rule(gfn=gfns, level=st.integers(0, 5))
    def zap_sp(self, gfn, level):
        self.touch(gfn)
        self.both("zap_sp", lambda s: s.vm.zap_sp(gfn, level))

    @rule(gfn=gfns, level=st.integers(1, 5))
    def zap_spte_atomic(self, gfn, level):
        self.touch(gfn)
        self.both("zap_spte_atomic", lambda s: s.vm.zap_spte_atomic(gfn, level))

    @rule(n=st.integers(0, 3))
    def inject_cas_failures(self, n):
        self.both("inject_cas_failures", lambda s: s.vm.inject_cas_failures(n))

    # ----------------------------------------------------------------- comparison

    @invariant()
    def same_state(self):
        if self.sides is None:
            return
        fast, ref = self.sides
        fv, rv = fast.vm, ref.vm
        assert fv.stats == rv.stats
        assert fv.warnings_by_reason == rv.warnings_by_reason
        assert fv.memslots == rv.memslots
        assert fv.mmio_generation == rv.mmio_generation
        assert fv.root == rv.root
        assert fv.roots == rv.roots
        assert [c.root for c in fast.vcpus] == [c.root for c in ref.vcpus]
        assert [c.stats for c in fast.vcpus] == [c.stats for c in ref.vcpus]
        # The whole tree as the iterator visits it (tdp_iter.c's pre-order), then each walk.
        assert fv.tdp_iter(0, fv.gfn_limit) == rv.tdp_iter(0, rv.gfn_limit)
        for g in sorted(self.touched):
            assert fv.walk(g) == rv.walk(g), hex(g)
            assert fv.lookup(g) == rv.lookup(g), hex(g)
        cap = rv.pool.capacity
        fstates = [fv.pool.page_state(i) for i in range(cap)]
        rstates = [rv.pool.page_state(i) for i in range(cap)]
        assert fstates == rstates
        fpages, rpages = fv.pool.pages, rv.pool.pages
        for i, state in enumerate(rstates):
            if state in ("table", "cached"):
                assert np.array_equal(fpages[i], rpages[i]), (i, state)
        for fc, rc in zip(fast.vcpus, ref.vcpus):
            assert fc.cache.objects == rc.cache.objects
            assert fc.cache.stats == rc.cache.stats
        for pfn in sorted(self.pfns):
            for name in ("host_page_dirty", "host_page_accessed"):
                f = Outcome(lambda: getattr(fv, name)(pfn))
                r = Outcome(lambda: getattr(rv, name)(pfn))
                assert f.key() == r.key(), (name, hex(pfn))
        if self.manual:         # with manual protect a get is a copy: compare the logs
            for sid, *_ in rv.memslots:
                f = Outcome(lambda: fv.get_dirty_log(sid))
                r = Outcome(lambda: rv.get_dirty_log(sid))
                assert f.key() == r.key(), ("dirty log", sid)
        fv.audit()
        rv.audit()


# Size.  Unset HYPOTHESIS_PROFILE: a quick default (a few seconds when both sides agree),
# without the shrink phase, so that a disagreement fails in seconds with the steps as found
# (shrinking a stateful failure can take Hypothesis five minutes).  ``ci``: many more and
# longer runs, shrunk.  Other named profiles: their max_examples, shrunk.
_profile = os.environ.get("HYPOTHESIS_PROFILE")
if _profile is None:
    _examples, _steps, _phases = 150, 30, (Phase.explicit, Phase.reuse, Phase.generate)
elif _profile == "ci":
    _examples, _steps, _phases = 400, 60, tuple(Phase)
else:
    _examples, _steps, _phases = settings.get_profile(_profile).max_examples, 30, tuple(Phase)

VmDifferential.TestCase.settings = settings(
    settings.get_profile(_profile or "ci"),
    max_examples=_examples,
    stateful_step_count=_steps,
    phases=_phases,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestVmDifferential = VmDifferential.TestCase
