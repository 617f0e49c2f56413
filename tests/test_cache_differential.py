"""Stateful differential test: the Cython engine and the reference model, driven in
lockstep through random memory-cache operations, never disagree (issue #2 point 6;
STYLE.md §3.7; KVM_MMU_SPEC.md §6 items 1-7).

Each side holds one PagePool and two MemoryCaches on it.  Every rule is applied to
both sides and must give the same return value or the same exception type; after
every rule the invariant compares all observable state, including the content of
every page held by a cache or handed out by one.
"""
import importlib

import numpy as np
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

NP63 = 1 << 63
POISON = 0xAAAA_AAAA_AAAA_AAAA
U64 = (1 << 64) - 1

init_values = st.one_of(st.just(0), st.just(NP63), st.integers(1, U64))
cache_configs = st.tuples(init_values, st.sampled_from([None, True, False]), st.integers(0, 8))
cache_ids = st.integers(0, 1)


class Outcome:
    """What one call did: a return value or an exception."""

    def __init__(self, fn):
        try:
            self.value, self.exc = fn(), None
        except Exception as e:  # noqa: BLE001 - compared below, never swallowed
            self.value, self.exc = None, e

    def key(self):
        return ("raised", type(self.exc)) if self.exc is not None else ("returned", self.value)


class Side:
    """One implementation's pool and caches."""

    def __init__(self, mod, pool_capacity, poisoned, configs):
        self.mod = mod
        self.pool = mod.PagePool(pool_capacity, poison=POISON if poisoned else None)
        self.caches = [
            mod.MemoryCache(self.pool, init_value=init, gfp_zero=gfp, capacity=cap) for init, gfp, cap in configs
        ]


class CacheDifferential(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        importlib.import_module("spte_fast._core")  # fail loudly if the engine is not built
        self.fast_mod = importlib.import_module("spte_fast")
        self.ref_mod = importlib.import_module("spte_fast.reference")
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
        self.fast = Side(self.fast_mod, pool_capacity, poisoned, configs)
        self.ref = Side(self.ref_mod, pool_capacity, poisoned, configs)

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
