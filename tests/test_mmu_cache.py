"""The memory caches: Linux 6.10 ``kvm_mmu_memory_cache`` (docs/API.md "MemoryCache";
KVM_MMU_SPEC.md §1.3 and §6 items 1-7; upstream ``__kvm_mmu_topup_memory_cache``,
``kvm_mmu_memory_cache_alloc``, ``kvm_mmu_free_memory_cache``, c23e2b710309), and the
configuration of the vCPU's shadow-page cache (spec §1.3 x86 caches, ``kvm_mmu_create``).

The two initialisation paths are told apart with a poisoned pool: the zero path
must zero what it cannot prove clean, the fill path must fill every page, and
the "not initialised" cache must hand pages out as they are.
"""
import numpy as np
import pytest

from support.layouts import NONPRESENT_VALUES, make_vm
from support.snapshots import assert_same_snapshot, cache_snapshot
from support.spec import NP63

PAGE_BYTES = 4096
STAT_KEYS = {"fills", "zero_inits", "zero_untouched", "init_bytes_written", "obtained", "warnings"}


def page_all(pool, index, value):
    return bool((pool.pages[index] == np.uint64(value)).all())


# ==========================================================================
# Construction
# ==========================================================================


def test_constructor_attributes_and_defaults(impl):
    pool = impl.PagePool(4)
    cache = impl.MemoryCache(pool)
    assert cache.init_value == 0 and cache.gfp_zero is True
    assert cache.default_capacity == 40 == impl.KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE
    assert cache.capacity == 0 and cache.nobjs == 0 and len(cache) == 0
    assert cache.objects == ()
    assert cache.warnings == 0
    assert cache.stats == dict.fromkeys(STAT_KEYS, 0)


@pytest.mark.parametrize(
    "init_value, gfp_zero, want",
    [(0, None, True), (NP63, None, False), (0, False, False), (0, True, True), (NP63, False, False),
     (NP63, True, True), (1, None, False)],
)
def test_gfp_zero_default_follows_init_value(impl, init_value, gfp_zero, want):
    """gfp_zero=None means init_value == 0; gfp_zero=True with init_value != 0 is accepted
    by the constructor (refused later, by the first real top-up)."""
    cache = impl.MemoryCache(impl.PagePool(1), init_value=init_value, gfp_zero=gfp_zero)
    assert cache.gfp_zero is want
    assert cache.init_value == init_value


def test_constructor_records_default_capacity(impl):
    cache = impl.MemoryCache(impl.PagePool(1), capacity=7)
    assert cache.default_capacity == 7 and cache.capacity == 0


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"init_value": -1}, ValueError),
        ({"init_value": 1 << 64}, ValueError),
        ({"init_value": 1.0}, TypeError),
        ({"init_value": "0"}, TypeError),
        ({"capacity": -1}, ValueError),
        ({"capacity": 4.0}, TypeError),
    ],
)
def test_constructor_argument_errors(impl, kwargs, exc):
    pool = impl.PagePool(2)
    with pytest.raises(exc):
        impl.MemoryCache(pool, **kwargs)
    assert pool.stats["allocated"] == 0


def test_constructor_accepts_capacity_zero(impl):
    """Capacity 0 is KVM's -EIO case of the first real top-up, not a constructor error."""
    cache = impl.MemoryCache(impl.PagePool(1), capacity=0)
    assert cache.default_capacity == 0


# ==========================================================================
# Spec §6 item 1: top-up with nobjs >= min does nothing
# ==========================================================================


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"init_value": NP63}, {"init_value": NP63, "gfp_zero": True}, {"capacity": 0}],
    ids=["zero", "fill", "broken-gfp-zero", "broken-capacity-0"],
)
def test_inv1_topup_noop_when_nobjs_ge_min(impl, kwargs):
    """min 0 on an empty cache: no allocation and no validation, even for a broken config."""
    pool = impl.PagePool(4)
    cache = impl.MemoryCache(pool, **kwargs)
    before = cache_snapshot(cache, pool)
    assert cache.topup(0) is None
    assert_same_snapshot(before, cache_snapshot(cache, pool))
    assert cache.capacity == 0 and cache.warnings == 0


def test_inv1_topup_noop_after_fill_skips_capacity_check(impl):
    """nobjs >= min returns before the capacity comparison (rule 1 before rule 3)."""
    pool = impl.PagePool(50)
    cache = impl.MemoryCache(pool, init_value=NP63)
    cache.topup(5)
    before = cache_snapshot(cache, pool)
    cache.topup(5)
    cache.topup(40)
    cache.topup(5, capacity=7)  # a different capacity, but nothing to do
    assert_same_snapshot(before, cache_snapshot(cache, pool))
    assert cache.warnings == 0


def test_topup_with_some_objects_left_refills_to_capacity(impl):
    pool = impl.PagePool(80)
    cache = impl.MemoryCache(pool, init_value=NP63)
    cache.topup(5)
    taken = [cache.alloc() for _ in range(36)]
    assert cache.nobjs == 4
    cache.topup(4)  # 4 >= 4: no-op
    assert cache.nobjs == 4 and cache.stats["obtained"] == 40
    cache.topup(5)
    assert cache.nobjs == 40 and cache.stats["obtained"] == 76
    assert not set(taken) & set(cache.objects)


# ==========================================================================
# Spec §6 item 2: first real top-up fills to capacity
# ==========================================================================


def test_inv2_first_topup_with_nonpresent_init_fills_40_pages(impl, poisoned_pool):
    pool = poisoned_pool(48)
    cache = impl.MemoryCache(pool, init_value=NP63)
    assert cache.gfp_zero is False
    cache.topup(5)
    assert cache.nobjs == 40 == len(cache) and cache.capacity == 40
    assert cache.objects == tuple(range(40))  # pool order, bottom first
    for index in cache.objects:
        assert page_all(pool, index, NP63), index
    for index in range(40, 48):  # the rest of the pool is untouched
        assert page_all(pool, index, 0xAAAA_AAAA_AAAA_AAAA)
    assert cache.stats == dict(fills=40, zero_inits=0, zero_untouched=0,
                               init_bytes_written=40 * PAGE_BYTES, obtained=40, warnings=0)
    assert pool.stats == {"allocated": 40, "freed": 0, "in_use": 40, "failed": 0,
                          "zero_inits": 0, "zero_untouched": 0, "fills": 40,
                          "init_bytes_written": 40 * 4096}
    assert pool.nr_free == 8


def test_topup_records_requested_capacity(impl):
    pool = impl.PagePool(10)
    cache = impl.MemoryCache(pool, init_value=NP63)
    cache.topup(2, capacity=3)
    assert cache.capacity == 3 and cache.nobjs == 3 and cache.default_capacity == 40


def test_topup_fill_path_with_random_nonzero_init(impl, poisoned_pool, seed):
    value = int(np.random.default_rng(seed).integers(1, 1 << 64, dtype=np.uint64))
    pool = poisoned_pool(5)
    cache = impl.MemoryCache(pool, init_value=value, capacity=5)
    cache.topup(1)
    assert all(page_all(pool, i, value) for i in cache.objects)


# ==========================================================================
# Spec §6 item 3: configuration errors (-EIO)
# ==========================================================================


def test_inv3_nonzero_init_with_gfp_zero_refused_nothing_allocated(impl):
    pool = impl.PagePool(50)
    cache = impl.MemoryCache(pool, init_value=NP63, gfp_zero=True)
    with pytest.raises(impl.CacheConfigError):
        cache.topup(1)
    assert cache.nobjs == 0 and cache.capacity == 0 and cache.objects == ()
    assert cache.warnings == 1 and cache.stats["warnings"] == 1
    assert cache.stats["obtained"] == 0 and cache.stats["fills"] == 0
    assert pool.stats["allocated"] == 0 and pool.nr_free == 50


def test_inv3_cache_config_error_is_a_value_error(impl):
    cache = impl.MemoryCache(impl.PagePool(2), init_value=1, gfp_zero=True, capacity=2)
    with pytest.raises(ValueError):
        cache.topup(2)


def test_inv3_capacity_zero_refused_nothing_allocated(impl):
    """Spec §6 item 3: the first real top-up with capacity 0 is KVM's WARN + -EIO:
    CacheConfigError, a warning counted, nothing allocated."""
    pool = impl.PagePool(4)
    cache = impl.MemoryCache(pool, capacity=0)
    with pytest.raises(impl.CacheConfigError):
        cache.topup(1)
    assert cache.nobjs == 0 and cache.capacity == 0 and cache.warnings == 1
    assert pool.stats["allocated"] == 0
    other = impl.MemoryCache(pool)
    with pytest.raises(impl.CacheConfigError):
        other.topup(1, capacity=0)
    assert other.warnings == 1 and pool.stats["allocated"] == 0


def test_inv3_different_capacity_later_refused(impl):
    pool = impl.PagePool(20)
    cache = impl.MemoryCache(pool, init_value=NP63, capacity=8)
    cache.topup(1)
    assert cache.capacity == 8
    for _ in range(8):
        cache.alloc()
    before = cache_snapshot(cache, pool)
    with pytest.raises(impl.CacheConfigError):
        cache.topup(1, capacity=4)
    after = cache_snapshot(cache, pool)
    assert after["warnings"] == before["warnings"] + 1
    assert after["stats"]["warnings"] == before["stats"]["warnings"] + 1
    for snap in (before, after):
        snap.pop("warnings"), snap["stats"].pop("warnings")
    assert_same_snapshot(before, after)
    assert cache.capacity == 8
    cache.topup(1)  # the recorded capacity still works
    assert cache.nobjs == 8


def test_free_forgets_capacity_so_a_new_one_is_accepted(impl):
    pool = impl.PagePool(20)
    cache = impl.MemoryCache(pool, capacity=8)
    cache.topup(1)
    cache.free()
    cache.topup(1, capacity=3)
    assert cache.capacity == 3 and cache.nobjs == 3 and cache.warnings == 0


# ==========================================================================
# Spec §6 item 4: allocation failure part-way
# ==========================================================================


@pytest.mark.parametrize("init_value", [NP63, 0], ids=["fill", "zero"])
def test_inv4_partial_failure_succeeds_when_nobjs_reaches_min(impl, poisoned_pool, init_value):
    pool = poisoned_pool(20)
    cache = impl.MemoryCache(pool, init_value=init_value, capacity=10)
    pool.fail_after(3)
    assert cache.topup(3) is None
    assert cache.nobjs == 3 and cache.capacity == 10
    assert all(page_all(pool, i, init_value) for i in cache.objects)
    assert cache.stats["obtained"] == 3
    if init_value:
        assert cache.stats["fills"] == 3
    else:
        assert cache.stats["zero_inits"] == 3
    assert cache.stats["init_bytes_written"] == 3 * PAGE_BYTES
    assert pool.stats["failed"] == 1  # the first refusal ends the top-up


@pytest.mark.parametrize("init_value", [NP63, 0], ids=["fill", "zero"])
def test_inv4_partial_failure_below_min_raises_and_keeps_pages(impl, poisoned_pool, init_value):
    pool = poisoned_pool(20)
    cache = impl.MemoryCache(pool, init_value=init_value, capacity=10)
    pool.fail_after(3)
    with pytest.raises(impl.OutOfMemory) as info:
        cache.topup(4)
    assert isinstance(info.value, MemoryError)
    assert cache.nobjs == 3 and cache.objects == (0, 1, 2)
    assert cache.capacity == 10  # recorded before the fill loop
    # the pages obtained before the failure were initialised (fill path: also on failure)
    assert all(page_all(pool, i, init_value) for i in cache.objects)
    assert cache.stats["init_bytes_written"] == 3 * PAGE_BYTES
    assert cache.stats["fills" if init_value else "zero_inits"] == 3
    assert {k: pool.stats[k] for k in ("allocated", "freed", "in_use", "failed")} == {"allocated": 3, "freed": 0, "in_use": 3, "failed": 1}
    # disarmed, the next top-up goes on to capacity
    pool.fail_after(None)
    cache.topup(4)
    assert cache.nobjs == 10 and cache.stats["obtained"] == 10


def test_inv4_pool_exhaustion_counts_like_fault_injection(impl):
    pool = impl.PagePool(6)
    cache = impl.MemoryCache(pool, init_value=NP63)  # wants 40
    cache.topup(6)
    assert cache.nobjs == 6 and pool.nr_free == 0
    cache2 = impl.MemoryCache(pool, init_value=NP63)
    with pytest.raises(impl.OutOfMemory):
        cache2.topup(1)
    assert cache2.nobjs == 0 and cache2.capacity == 40


def test_inv4_failure_with_no_page_obtained(impl):
    pool = impl.PagePool(4)
    cache = impl.MemoryCache(pool, init_value=NP63, capacity=4)
    pool.fail_after(0)
    with pytest.raises(impl.OutOfMemory):
        cache.topup(1)
    assert cache.nobjs == 0 and cache.stats["fills"] == 0 and cache.stats["obtained"] == 0


# ==========================================================================
# Spec §6 item 5: LIFO alloc, alloc on empty
# ==========================================================================


def test_inv5_alloc_pops_lifo(impl):
    pool = impl.PagePool(10)
    cache = impl.MemoryCache(pool, init_value=NP63, capacity=5)
    cache.topup(1)
    assert cache.objects == (0, 1, 2, 3, 4)
    assert cache.alloc() == 4
    assert cache.objects == (0, 1, 2, 3) and cache.nobjs == 4 == len(cache)
    assert [cache.alloc() for _ in range(4)] == [3, 2, 1, 0]
    assert cache.nobjs == 0 and cache.objects == ()
    assert cache.warnings == 0
    assert cache.capacity == 5  # emptying is not freeing


def test_alloc_next_is_objects_top(impl):
    pool = impl.PagePool(12)
    cache = impl.MemoryCache(pool, capacity=6)
    for i in range(3):
        pool.alloc()
    pool.free(1)  # a recycled page enters the cache first
    cache.topup(6)
    top = cache.objects[-1]
    assert cache.alloc() == top


def test_alloc_does_not_change_page_content_or_pool(impl):
    pool = impl.PagePool(4)
    cache = impl.MemoryCache(pool, init_value=NP63, capacity=2)
    cache.topup(2)
    stats = dict(cache.stats), dict(pool.stats)
    page = cache.alloc()
    assert page_all(pool, page, NP63)
    assert (dict(cache.stats), dict(pool.stats)) == stats


def test_inv5_alloc_on_empty_warns_and_returns_initialised_page(impl, poisoned_pool):
    pool = poisoned_pool(4)
    cache = impl.MemoryCache(pool, init_value=NP63, capacity=2)
    page = cache.alloc()
    assert page == 0
    assert cache.warnings == 1 and cache.stats["warnings"] == 1
    assert page_all(pool, page, NP63)
    assert cache.stats["fills"] == 1 and cache.stats["obtained"] == 1
    assert cache.nobjs == 0 and cache.capacity == 0  # no objects array was made
    assert pool.stats["allocated"] == 1
    # a second empty alloc warns again
    cache.alloc()
    assert cache.warnings == 2


def test_inv5_alloc_on_empty_zero_path_zeroes_poison(impl, poisoned_pool):
    pool = poisoned_pool(2)
    cache = impl.MemoryCache(pool)
    page = cache.alloc()
    assert page_all(pool, page, 0)
    assert cache.stats["zero_inits"] == 1 and cache.warnings == 1


def test_inv5_alloc_after_emptying_warns(impl):
    pool = impl.PagePool(4)
    cache = impl.MemoryCache(pool, init_value=NP63, capacity=1)
    cache.topup(1)
    cache.alloc()
    assert cache.warnings == 0
    page = cache.alloc()
    assert cache.warnings == 1 and page_all(pool, page, NP63)


def test_alloc_on_empty_cache_with_exhausted_pool_raises(impl):
    pool = impl.PagePool(1)
    pool.alloc()
    cache = impl.MemoryCache(pool, init_value=NP63)
    with pytest.raises(impl.OutOfMemory):
        cache.alloc()
    assert cache.warnings == 1  # KVM warns on the empty cache before trying the pool
    assert cache.stats["obtained"] == 0 and cache.stats["fills"] == 0


# ==========================================================================
# Spec §6 item 6: free
# ==========================================================================


def test_inv6_free_returns_pages_and_resets(impl):
    pool = impl.PagePool(45)
    cache = impl.MemoryCache(pool, init_value=NP63)
    cache.topup(5)
    held = [cache.alloc(), cache.alloc()]
    assert cache.free() is None
    assert cache.nobjs == 0 and cache.capacity == 0 and cache.objects == () and len(cache) == 0
    assert pool.nr_free == 45 - 2
    assert {k: pool.stats[k] for k in ("allocated", "freed", "in_use", "failed")} == {"allocated": 40, "freed": 38, "in_use": 2, "failed": 0}
    # the pages handed out stay allocated: their holder can still free them
    pool.free(held[0])
    assert pool.nr_free == 45 - 1
    assert cache.stats["obtained"] == 40  # counters are not reset


def test_inv6_free_on_empty_cache_is_harmless(impl):
    pool = impl.PagePool(2)
    cache = impl.MemoryCache(pool)
    cache.free()
    cache.free()
    assert cache.capacity == 0 and pool.stats["freed"] == 0


def test_freed_pages_go_back_lifo(impl):
    """free() releases bottom-up or top-down; either way the pool reuses them LIFO and
    a new top-up gets exactly the same pages back."""
    pool = impl.PagePool(5)
    cache = impl.MemoryCache(pool, init_value=NP63, capacity=5)
    cache.topup(5)
    cache.free()
    assert pool.nr_free == 5
    cache.topup(5)
    assert sorted(cache.objects) == [0, 1, 2, 3, 4]


# ==========================================================================
# Spec §6 item 7 and the two initialisation paths
# ==========================================================================


def test_zero_path_does_not_write_never_used_pages(impl):
    pool = impl.PagePool(40)
    cache = impl.MemoryCache(pool)
    cache.topup(1)
    assert cache.nobjs == 40
    assert cache.stats == dict(fills=0, zero_inits=0, zero_untouched=40, init_bytes_written=0,
                               obtained=40, warnings=0)
    assert not pool.pages.any()


def test_zero_path_zeroes_poisoned_pages(impl, poisoned_pool):
    pool = poisoned_pool(40)
    cache = impl.MemoryCache(pool)
    cache.topup(1)
    assert not pool.pages.any()
    assert cache.stats == dict(fills=0, zero_inits=40, zero_untouched=0,
                               init_bytes_written=40 * PAGE_BYTES, obtained=40, warnings=0)


def test_zero_path_zeroes_recycled_pages(impl):
    """A page that was filled with the non-present value and came back to the pool is
    zeroed by the next GFP_ZERO-path top-up (no poison needed to see it)."""
    pool = impl.PagePool(6)
    filler = impl.MemoryCache(pool, init_value=NP63, capacity=4)
    filler.topup(4)
    filler.free()
    zero = impl.MemoryCache(pool, capacity=6)
    zero.topup(6)
    assert sorted(zero.objects) == list(range(6))
    assert not pool.pages.any()
    assert zero.stats["zero_inits"] == 4 and zero.stats["zero_untouched"] == 2
    assert zero.stats["init_bytes_written"] == 4 * PAGE_BYTES


def test_zero_path_treats_pages_back_from_a_cache_as_recycled(impl):
    pool = impl.PagePool(3)
    cache = impl.MemoryCache(pool, capacity=3)
    cache.topup(3)
    assert cache.stats["zero_untouched"] == 3
    cache.free()
    cache.topup(3)
    assert cache.stats["zero_inits"] == 3 and cache.stats["zero_untouched"] == 3


def test_fill_path_fills_even_clean_pages(impl):
    pool = impl.PagePool(3)
    cache = impl.MemoryCache(pool, init_value=NP63, capacity=3)
    cache.topup(3)
    assert (pool.pages == np.uint64(NP63)).all()
    assert cache.stats["fills"] == 3 and cache.stats["zero_untouched"] == 0
    assert not any(pool.is_clean(i) for i in range(3))


def test_inv7_uninitialised_cache_hands_pages_out_as_is(impl, poisoned_pool, poison):
    """init_value 0 with gfp_zero=False is KVM's shadowed-info cache: never pre-filled."""
    pool = poisoned_pool(5)
    cache = impl.MemoryCache(pool, init_value=0, gfp_zero=False, capacity=5)
    assert cache.gfp_zero is False
    cache.topup(5)
    assert (pool.pages == np.uint64(poison)).all()
    page = cache.alloc()
    assert page_all(pool, page, poison)
    assert cache.stats == dict(fills=0, zero_inits=0, zero_untouched=0, init_bytes_written=0,
                               obtained=5, warnings=0)


def test_two_caches_on_one_pool_share_it(impl, poisoned_pool):
    pool = poisoned_pool(10)
    fill = impl.MemoryCache(pool, init_value=NP63, capacity=4)
    zero = impl.MemoryCache(pool, capacity=4)
    fill.topup(1)
    zero.topup(1)
    assert set(fill.objects) == {0, 1, 2, 3} and set(zero.objects) == {4, 5, 6, 7}
    assert all(page_all(pool, i, NP63) for i in fill.objects)
    assert all(page_all(pool, i, 0) for i in zero.objects)
    assert pool.nr_free == 2


# ==========================================================================
# The vCPU's shadow-page cache (spec §1.3 x86 caches: mmu_shadow_page_cache, kvm_mmu_create)
# ==========================================================================


def test_vcpu_owns_a_cache_with_the_nonpresent_init_value(impl):
    """Spec §1.3: each vCPU's SPTE-page cache has ``init_value = SHADOW_NONPRESENT_VALUE``
    (the layout's non-present value), ``__GFP_ZERO`` only when that value is 0, and the
    default capacity 40; every vCPU has its own (docs/API.md ``vm.vcpu()``)."""
    for nonpresent in NONPRESENT_VALUES:
        vm, layout = make_vm(impl, nonpresent=nonpresent, max_pt_pages=64)
        vcpu = vm.vcpu()
        cache = vcpu.cache
        assert cache.init_value == nonpresent
        assert cache.gfp_zero is (nonpresent == 0)
        assert cache.default_capacity == 40
        assert cache.nobjs == 0
        other = vm.vcpu()
        assert other.cache is not cache
        vm.audit()


# ==========================================================================
# Bad arguments change nothing (docs/API.md MemoryCache.topup: checked before KVM's rules)
# ==========================================================================


@pytest.mark.parametrize(
    "args, kwargs, exc",
    [
        ((-1,), {}, ValueError),
        ((1.0,), {}, TypeError),
        (("1",), {}, TypeError),
        ((None,), {}, TypeError),
        ((2**24 + 1,), {}, ValueError),
        ((1,), {"capacity": -1}, ValueError),
        ((1,), {"capacity": 2**24 + 1}, ValueError),
        ((1,), {"capacity": 2.0}, TypeError),
    ],
    ids=["min-neg", "min-float", "min-str", "min-none", "min-huge",
         "capacity-neg", "capacity-huge", "capacity-float"],
)
def test_topup_bad_arguments_change_nothing(impl, args, kwargs, exc):
    """API.md: min and capacity must be ints in [0, 2**24], else ValueError (TypeError if
    not an int), checked before KVM's rules, and nothing changes."""
    pool = impl.PagePool(50)
    cache = impl.MemoryCache(pool, init_value=NP63)
    before = cache_snapshot(cache, pool)
    with pytest.raises(exc):
        cache.topup(*args, **kwargs)
    assert_same_snapshot(before, cache_snapshot(cache, pool))


def test_topup_bad_arguments_on_filled_cache_change_nothing(impl):
    pool = impl.PagePool(50)
    cache = impl.MemoryCache(pool, init_value=NP63, capacity=10)
    cache.topup(1)
    cache.alloc()
    before = cache_snapshot(cache, pool)
    for bad in (-1, 2**24 + 1, 1.5):
        with pytest.raises((TypeError, ValueError)):
            cache.topup(bad)
    assert_same_snapshot(before, cache_snapshot(cache, pool))


def test_topup_min_above_capacity_fills_to_capacity_like_kvm(impl):
    """KVM's loop stops at capacity and returns 0 even when nobjs < min: no error."""
    pool = impl.PagePool(50)
    cache = impl.MemoryCache(pool, init_value=NP63, capacity=4)
    cache.topup(9)
    assert cache.nobjs == 4 and cache.capacity == 4
    cache.topup(9)                       # still below min: refills (nothing to add)
    assert cache.nobjs == 4 and pool.stats["allocated"] == 4


def test_topup_accepts_numpy_int_min(impl):
    pool = impl.PagePool(4)
    cache = impl.MemoryCache(pool, capacity=4)
    cache.topup(np.int64(2))
    assert cache.nobjs == 4


def test_stats_is_a_dict_with_exact_keys(impl):
    cache = impl.MemoryCache(impl.PagePool(1))
    assert isinstance(cache.stats, dict) and set(cache.stats) == STAT_KEYS
