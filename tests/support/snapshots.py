"""Everything observable about a VM, or about a memory cache and its pool, for "nothing
changed" checks (docs/API.md: a refused call changes nothing), and counter deltas."""
import numpy as np

from support.tables import page_states


def snapshot(vm, vcpus=()):
    """Everything observable about a VM (for "nothing changed" checks)."""
    return dict(
        stats=dict(vm.stats),
        memslots=list(vm.memslots),
        generation=vm.mmio_generation,
        roots=list(vm.roots),
        vcpu_roots=[v.root for v in vcpus],
        states=page_states(vm),
        caches=[tuple(v.cache.objects) for v in vcpus],
        pages=vm.pool.pages.copy(),
    )


def cache_snapshot(cache, pool):
    """Everything observable about a cache and its pool."""
    return dict(
        nobjs=cache.nobjs,
        len=len(cache),
        capacity=cache.capacity,
        objects=cache.objects,
        warnings=cache.warnings,
        stats=dict(cache.stats),
        pool_stats=dict(pool.stats),
        nr_free=pool.nr_free,
        pages=pool.pages.copy(),
    )


def assert_same_snapshot(before, after):
    """Two snapshots (of either kind) are equal, page memory included."""
    pages_b, pages_a = before.pop("pages"), after.pop("pages")
    assert after == before
    assert np.array_equal(pages_a, pages_b)


def stat_delta(before, after):
    """{key: after - before} of the counters that changed."""
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}
