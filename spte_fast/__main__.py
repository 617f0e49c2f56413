"""``python -m spte_fast``: a short demonstration of the two initialisation paths.

KVM 6.10's memory cache fills new page-table pages with the non-present SPTE
value: zero-fill (GFP_ZERO) when that value is 0, a memset64 fill when it is
bit 63.  This tops up one cache on each path, then faults a guest through a
VM on each layout, and prints what each did.
"""
import sys
import time

import numpy as np

import spte_fast as sf


def _cache_demo(out):
    out.write("memory caches (capacity 40, top-up min 5):\n")
    for name, init in (("legacy (<= 6.9), init 0", 0),
                       ("6.10+ x86-64, init 1<<63", sf.SHADOW_NONPRESENT_VALUE)):
        pool = sf.PagePool(256)
        cache = sf.MemoryCache(pool, init_value=init)
        cache.topup(5)
        page = cache.alloc()
        st = cache.stats
        out.write(f"  {name:26s} path={'GFP_ZERO' if cache.gfp_zero else 'memset64 fill':13s} "
                  f"nobjs={cache.nobjs:2d} fills={st['fills']:2d} zero_inits={st['zero_inits']} "
                  f"untouched={st['zero_untouched']:2d} bytes_written={st['init_bytes_written']:6d} "
                  f"page[{page}][0]={int(pool.pages[page][0]):#x}\n")


def _fault_demo(out, npages=1 << 20):
    out.write(f"\nfirst-touch 4K faults over {npages * 4 >> 10} MiB of guest memory:\n")
    gfns = np.arange(npages, dtype=np.uint64)
    for name, layout in (("ept, non-present 1<<63", sf.SpteLayout.ept()),
                         ("ept, non-present 0", sf.SpteLayout.ept(nonpresent_value=0)),
                         ("npt, non-present 1<<63", sf.SpteLayout.npt())):
        vm = sf.Vm(layout, root_level=4, max_level=sf.PG_LEVEL_4K, max_pt_pages=1 << 14)
        vm.add_memslot(0, npages, pfn=0x100000)
        vcpu = vm.vcpu()
        t0 = time.perf_counter()
        res = vcpu.fault_batch(gfns)
        dt = time.perf_counter() - t0
        vm.audit()
        st = vm.stats
        spte, level = vm.lookup(npages - 1)
        out.write(f"  {name:24s} {res['fixed'] / dt / 1e6:6.1f} M faults/s  pt_pages={st['pt_pages']} "
                  f"cache_fills={st['cache_fills']} zero_inits={st['cache_zero_inits']} "
                  f"last leaf={spte:#x}\n")


def main(argv=None):
    out = sys.stdout
    out.write(f"spte_fast {sf.__version__}: KVM x86 TDP MMU model (Linux 6.10)\n\n")
    _cache_demo(out)
    _fault_demo(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
