"""The page pool: page-table pages, free list, fault injection, page states and counters,
on both implementations (docs/API.md "PagePool"; KVM_MMU_SPEC.md §1.3 the page allocator
behind the caches, STYLE.md §3.7 poisoned memory).

KVM's page-table pages are whole 4 KiB host pages handed out by the page allocator
(``kmem_cache == NULL`` in ``kvm_mmu_memory_cache``); the pool models that allocator and
counts the initialisation work of every cache on it.
"""
import numpy as np
import pytest

from support.layouts import make_vm
from support.spec import NP63, PFN0


def test_capacity_len_and_pages_view_shape(impl):
    pool = impl.PagePool(5)
    assert pool.capacity == 5 and len(pool) == 5
    assert isinstance(pool.pages, np.ndarray)
    assert pool.pages.shape == (5, 512) and pool.pages.dtype == np.uint64
    assert pool.pages.flags.c_contiguous
    assert pool.nr_free == 5


@pytest.mark.parametrize("capacity", [1, 3, 64, 1000])
@pytest.mark.parametrize("poison", [None, 0xDEAD_BEEF_0BAD_F00D], ids=["zero", "poison"])
def test_every_page_starts_on_a_4k_boundary(impl, capacity, poison):
    """Like real page-table pages: a table never straddles two host pages."""
    pool = impl.PagePool(capacity, poison=poison)
    assert pool.pages.ctypes.data % 4096 == 0
    assert pool.pages.strides == (4096, 8)
    expect = 0 if poison is None else poison
    assert (pool.pages == np.uint64(expect)).all()


def test_pages_view_is_read_only(impl):
    pool = impl.PagePool(2)
    assert not pool.pages.flags.writeable
    with pytest.raises(ValueError):
        pool.pages[0, 0] = 1
    with pytest.raises(ValueError):
        pool.pages[1].fill(7)
    assert not pool.pages.any()


@pytest.mark.parametrize("owner", ["pool", "vm.pool"])
def test_pool_pages_cannot_be_made_writable(impl, owner):
    """API.md: ``pool.pages`` is a read-only view.  ``pages.flags.writeable = True`` (or
    ``setflags``) raises ValueError, on the view and on any ndarray it is a view of (of a
    bare pool and of a VM's); the pool content is unchanged."""
    if owner == "pool":
        pool = impl.PagePool(4, poison=0x1234)
    else:
        vm = make_vm(impl, max_pt_pages=64)[0]
        vm.add_memslot(0, 1024, PFN0)
        vm.vcpu().fault(5, write=True)
        pool = vm.pool
    pages = pool.pages
    before = np.array(pages, copy=True)
    base = pages
    while isinstance(base, np.ndarray):
        with pytest.raises(ValueError):
            base.flags.writeable = True
        with pytest.raises(ValueError):
            base.setflags(write=True)
        base = base.base
    with pytest.raises(ValueError):
        pages[0, 0] = 1
    assert not pool.pages.flags.writeable
    assert np.array_equal(pool.pages, before)


def test_fresh_pool_is_zero_and_clean(impl):
    pool = impl.PagePool(4)
    assert not pool.pages.any()
    assert all(pool.is_clean(i) for i in range(4))


def test_poisoned_pool_pages_hold_poison_and_are_not_clean(impl, poisoned_pool, poison):
    pool = poisoned_pool(3)
    assert (pool.pages == np.uint64(poison)).all()
    assert not any(pool.is_clean(i) for i in range(3))
    other = impl.PagePool(2, poison=NP63)
    assert (other.pages == np.uint64(NP63)).all()


def test_poison_zero_still_counts_as_not_known_zero(impl):
    """API.md: with ``poison`` given every page "counts as not known to be zero"."""
    pool = impl.PagePool(2, poison=0)
    assert not pool.pages.any()
    assert not pool.is_clean(0) and not pool.is_clean(1)


def test_pages_view_sees_content_written_by_the_pool_users(impl):
    """The view is live, not a snapshot: a cache fill shows through it."""
    pool = impl.PagePool(2)
    view = pool.pages
    cache = impl.MemoryCache(pool, init_value=NP63, capacity=1)
    cache.topup(1)
    assert (view[cache.objects[0]] == np.uint64(NP63)).all()


def test_alloc_hands_out_never_used_pages_lowest_first(impl):
    pool = impl.PagePool(6)
    assert [pool.alloc() for _ in range(6)] == [0, 1, 2, 3, 4, 5]
    assert pool.nr_free == 0


def test_alloc_on_exhausted_pool_raises_out_of_memory(impl):
    pool = impl.PagePool(2)
    pool.alloc(), pool.alloc()
    with pytest.raises(impl.OutOfMemory):
        pool.alloc()
    with pytest.raises(MemoryError):  # OutOfMemory is a MemoryError
        pool.alloc()
    assert {k: pool.stats[k] for k in ("allocated", "freed", "in_use", "failed")} == {"allocated": 2, "freed": 0, "in_use": 2, "failed": 2}
    assert pool.nr_free == 0


def test_freed_pages_are_reused_lifo(impl):
    pool = impl.PagePool(5)
    for _ in range(5):
        pool.alloc()
    for index in (1, 4, 2):
        pool.free(index)
    assert pool.nr_free == 3
    assert [pool.alloc(), pool.alloc(), pool.alloc()] == [2, 4, 1]
    with pytest.raises(impl.OutOfMemory):
        pool.alloc()


def test_free_then_alloc_returns_the_same_page(impl):
    pool = impl.PagePool(3)
    a = pool.alloc()
    pool.free(a)
    assert pool.alloc() == a


@pytest.mark.parametrize("case", ["double-free", "never-allocated", "negative", "too-big"])
def test_bad_free_raises_value_error_and_changes_nothing(impl, case):
    pool = impl.PagePool(4)
    a, b = pool.alloc(), pool.alloc()
    pool.free(a)
    before = (pool.nr_free, dict(pool.stats))
    index = {"double-free": a, "never-allocated": 3, "negative": -1, "too-big": 4}[case]
    with pytest.raises(ValueError):
        pool.free(index)
    assert (pool.nr_free, pool.stats) == before
    assert pool.alloc() == a  # the free list is intact: a is still on top


def test_free_rejects_non_int(impl):
    pool = impl.PagePool(2)
    pool.alloc()
    with pytest.raises(TypeError):
        pool.free(0.0)
    with pytest.raises(TypeError):
        pool.free("0")
    assert pool.stats["freed"] == 0


def test_free_accepts_numpy_int(impl):
    pool = impl.PagePool(2)
    a = pool.alloc()
    pool.free(np.int64(a))
    assert pool.stats["freed"] == 1


def test_fail_after_n_then_every_allocation_fails_until_disarmed(impl):
    pool = impl.PagePool(10)
    pool.fail_after(2)
    assert [pool.alloc(), pool.alloc()] == [0, 1]
    for _ in range(3):
        with pytest.raises(impl.OutOfMemory):
            pool.alloc()
    assert pool.stats["failed"] == 3 and pool.stats["allocated"] == 2
    assert pool.nr_free == 8  # refusals take nothing
    pool.fail_after(None)
    assert pool.alloc() == 2


def test_fail_after_zero_fails_the_next_allocation(impl):
    pool = impl.PagePool(3)
    pool.fail_after(0)
    with pytest.raises(impl.OutOfMemory):
        pool.alloc()
    pool.fail_after(None)
    assert pool.alloc() == 0


def test_fail_after_is_rearmed_by_a_new_call(impl):
    pool = impl.PagePool(10)
    pool.fail_after(1)
    pool.alloc()
    pool.fail_after(3)
    assert [pool.alloc() for _ in range(3)] == [1, 2, 3]
    with pytest.raises(impl.OutOfMemory):
        pool.alloc()


def test_frees_do_not_count_against_the_fail_budget(impl):
    pool = impl.PagePool(4)
    pool.fail_after(2)
    a = pool.alloc()
    pool.free(a)
    pool.alloc()
    with pytest.raises(impl.OutOfMemory):
        pool.alloc()


@pytest.mark.parametrize("n, exc", [(-1, ValueError), (1.0, TypeError), ("2", TypeError)])
def test_fail_after_argument_errors(impl, n, exc):
    pool = impl.PagePool(2)
    with pytest.raises(exc):
        pool.fail_after(n)
    assert pool.alloc() == 0 and pool.alloc() == 1  # nothing armed


def test_stats_count_allocations_frees_and_refusals(impl):
    pool = impl.PagePool(3)
    assert {k: pool.stats[k] for k in ("allocated", "freed", "in_use", "failed")} == {"allocated": 0, "freed": 0, "in_use": 0, "failed": 0}
    a, b = pool.alloc(), pool.alloc()
    pool.free(a)
    pool.alloc()
    pool.alloc()
    with pytest.raises(impl.OutOfMemory):
        pool.alloc()
    assert {k: pool.stats[k] for k in ("allocated", "freed", "in_use", "failed")} == {"allocated": 4, "freed": 1, "in_use": 3, "failed": 1}
    assert pool.nr_free == pool.capacity - pool.stats["in_use"]


def test_stats_is_a_snapshot_dict(impl):
    pool = impl.PagePool(2)
    s = pool.stats
    assert isinstance(s, dict)
    pool.alloc()
    assert s["allocated"] == 0 and pool.stats["allocated"] == 1


def test_freed_page_is_no_longer_clean(impl):
    """A page that was handed out and came back may hold anything."""
    pool = impl.PagePool(3)
    a = pool.alloc()
    pool.free(a)
    assert not pool.is_clean(a)
    assert pool.is_clean(1) and pool.is_clean(2)


@pytest.mark.parametrize("index, exc", [(-1, ValueError), (3, ValueError), (1.0, TypeError)])
def test_is_clean_argument_errors(impl, index, exc):
    pool = impl.PagePool(3)
    with pytest.raises(exc):
        pool.is_clean(index)


@pytest.mark.parametrize(
    "args, kwargs, exc",
    [
        ((0,), {}, ValueError),
        ((-3,), {}, ValueError),
        ((2.0,), {}, TypeError),
        (("2",), {}, TypeError),
        ((2,), {"poison": -1}, ValueError),
        ((2,), {"poison": 1 << 64}, ValueError),
        ((2,), {"poison": 1.0}, TypeError),
    ],
)
def test_pool_constructor_argument_errors(impl, args, kwargs, exc):
    with pytest.raises(exc):
        impl.PagePool(*args, **kwargs)


def test_pool_accepts_numpy_capacity_and_poison(impl):
    pool = impl.PagePool(np.int64(2), poison=np.uint64(0xAAAA_AAAA_AAAA_AAAA))
    assert pool.capacity == 2 and pool.pages[1, 511] == 0xAAAA_AAAA_AAAA_AAAA


def test_alloc_does_not_touch_page_content(impl, poisoned_pool, poison):
    """A raw alloc() hands the page out as is: content unspecified, here the poison."""
    pool = poisoned_pool(2)
    a = pool.alloc()
    assert (pool.pages[a] == np.uint64(poison)).all()


# ==========================================================================
# page_state and is_clean (API.md "PagePool")
# ==========================================================================


def test_page_state_follows_the_page_through_pool_and_cache(impl):
    pool = impl.PagePool(6)
    assert [pool.page_state(i) for i in range(6)] == ["free"] * 6
    raw = pool.alloc()
    assert pool.page_state(raw) == "raw"
    cache = impl.MemoryCache(pool, init_value=NP63, capacity=3)
    cache.topup(3)
    assert [pool.page_state(i) for i in cache.objects] == ["cached"] * 3
    page = cache.alloc()
    assert pool.page_state(page) == "raw"
    remaining = cache.objects
    cache.free()
    assert [pool.page_state(i) for i in remaining] == ["free"] * 2
    pool.free(page)
    pool.free(raw)
    assert [pool.page_state(i) for i in range(6)] == ["free"] * 6


def test_page_state_of_alloc_on_empty_cache_is_raw(impl):
    pool = impl.PagePool(2)
    cache = impl.MemoryCache(pool)
    page = cache.alloc()
    assert pool.page_state(page) == "raw"


@pytest.mark.parametrize("index, exc", [(-1, ValueError), (3, ValueError), (0.0, TypeError)])
def test_page_state_argument_errors(impl, index, exc):
    with pytest.raises(exc):
        impl.PagePool(3).page_state(index)


def test_page_zeroed_by_gfp_zero_cache_is_clean_again(impl, poisoned_pool):
    """is_clean: "never used and no poison, or zeroed by a GFP_ZERO cache since"."""
    pool = poisoned_pool(3)
    cache = impl.MemoryCache(pool, capacity=2)
    cache.topup(2)
    assert [pool.is_clean(i) for i in cache.objects] == [True, True]
    assert cache.objects == (0, 1)
    page = cache.alloc()
    assert page == 1 and pool.is_clean(page)  # handing it out writes nothing
    assert not pool.is_clean(2)  # never touched: still poison
    cache.free()  # page 0 goes back to the pool
    assert not pool.is_clean(0)
    pool.free(page)
    assert not pool.is_clean(page)  # back in the pool: no longer known to be zero


def test_filled_and_uninitialised_pages_are_not_clean(impl, poisoned_pool):
    pool = impl.PagePool(4)
    fill = impl.MemoryCache(pool, init_value=NP63, capacity=2)
    fill.topup(2)
    assert not any(pool.is_clean(i) for i in fill.objects)
    ppool = poisoned_pool(2)
    raw = impl.MemoryCache(ppool, init_value=0, gfp_zero=False, capacity=2)
    raw.topup(2)
    assert not any(ppool.is_clean(i) for i in raw.objects)


def test_pool_stats_count_initialisation_by_its_caches(impl):
    """API.md ``pool.stats``: the pool counts the initialisation work of every cache on it:
    pages zero-initialised, used untouched, filled, and bytes written."""
    pool = impl.PagePool(8)
    zero = impl.MemoryCache(pool, init_value=0, capacity=2)
    fill = impl.MemoryCache(pool, init_value=1 << 63, capacity=2)
    zero.topup(1)                          # two never-used pages: no write
    fill.topup(1)                          # two pages filled
    recycled = zero.alloc()
    zero.free()                            # one cached page back (now dirty), one raw
    pool.free(recycled)
    zero.topup(2)                          # both recycled: zeroed
    st = pool.stats
    assert (st["zero_untouched"], st["zero_inits"], st["fills"]) == (2, 2, 2)
    assert st["init_bytes_written"] == 4 * 4096
