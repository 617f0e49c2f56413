"""What ``spte-fast demo`` shows: KVM 6.10's memory cache on both initialisation paths,
then a guest's first-touch faults through a VM on each layout.

Each function returns rows (dicts) for the command line to print.
"""
import time

import numpy as np

import spte_fast as sf

CACHE_PATHS = (("legacy (<= 6.9), init 0", 0),
               ("6.10+ x86-64, init 1<<63", sf.SHADOW_NONPRESENT_VALUE))
FIRST_TOUCH_LAYOUTS = (("ept, non-present 1<<63", lambda: sf.SpteLayout.ept()),
                       ("ept, non-present 0", lambda: sf.SpteLayout.ept(nonpresent_value=0)),
                       ("npt, non-present 1<<63", lambda: sf.SpteLayout.npt()))


def cache_paths(topup_min=5):
    """One memory cache per init value (capacity 40), topped up and one page taken."""
    rows = []
    for name, init in CACHE_PATHS:
        pool = sf.PagePool(256)
        cache = sf.MemoryCache(pool, init_value=init)
        cache.topup(topup_min)
        page = cache.alloc()
        rows.append({"name": name, "gfp_zero": cache.gfp_zero, "nobjs": cache.nobjs,
                     "stats": cache.stats, "page": page, "entry0": int(pool.pages[page][0])})
    return rows


def first_touch(npages=1 << 20):
    """``npages`` first-touch 4K faults through a fresh VM per layout, audited."""
    rows = []
    gfns = np.arange(npages, dtype=np.uint64)
    for name, layout in FIRST_TOUCH_LAYOUTS:
        vm = sf.Vm(layout(), root_level=4, max_level=sf.PG_LEVEL_4K, max_pt_pages=1 << 14)
        vm.add_memslot(0, npages, pfn=0x100000)
        t0 = time.perf_counter()
        res = vm.vcpu().fault_batch(gfns)
        dt = time.perf_counter() - t0
        vm.audit()
        spte, _ = vm.lookup(npages - 1)
        rows.append({"name": name, "results": res, "seconds": dt, "stats": vm.stats,
                     "last_leaf": spte})
    return rows
