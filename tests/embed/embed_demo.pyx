# cython: language_level=3, boundscheck=False, wraparound=False
"""A tiny extension that embeds spte_fast at the C level (compiled by tests/test_embedding.py).

Everything below the Python entry points runs with the GIL released and calls only what
``spte_fast/_core.pxd`` declares: the inline SPTE constructors and predicates, the
``fill_pages_kernel`` / ``count_present_kernel`` kernels, the memory-cache top-up and
``kvm_tdp_mmu_page_fault``.

There is no cimportable handle on a Python ``Vm``'s ``mmu_t`` (``Vm`` is not declared in
the .pxd), so ``fault_gfns`` assembles its own pool, vCPU cache and ``mmu_t`` from the
declared structs, as ``Vm.__init__`` does, and drives the fault path on them.
"""
from libc.stdint cimport uint8_t, int8_t, int64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memset

from spte_fast._core cimport (
    ACC_ALL, PAGE_TABLE, RET_PF_RETRY, SPTE_ENT_PER_PAGE,
    count_present_kernel, fill_pages_kernel, gfn_t, is_last_spte, is_mmio_spte,
    is_shadow_present_pte, kvm_tdp_mmu_page_fault, make_nonleaf_spte, make_spte,
    mem_cache_t, memslot_t, mmu_memory_cache_alloc, mmu_read_lock, mmu_read_unlock, mmu_stats_t,
    mmu_t, mmu_topup_memory_cache, pool_t, pthread_mutex_init, pthread_mutex_lock,
    pthread_mutex_unlock, spte_index, spte_masks_t,
    spte_rwlock_init, spte_to_pfn, u64,
)


cdef spte_masks_t masks_of(layout):
    """The C masks of a Python SpteLayout (read once, from its documented attributes)."""
    cdef spte_masks_t m
    memset(&m, 0, sizeof(m))
    m.shadow_nonpresent_value = layout.nonpresent_value
    m.frozen_value = layout.frozen_value
    m.shadow_present_mask = layout.present_mask
    m.shadow_user_mask = layout.user_mask
    m.shadow_x_mask = layout.x_mask
    m.shadow_nx_mask = layout.nx_mask
    m.shadow_accessed_mask = layout.accessed_mask
    m.shadow_dirty_mask = layout.dirty_mask
    m.shadow_memtype_mask = layout.memtype_mask
    m.shadow_memtype_ram = layout.memtype_ram
    m.shadow_acc_track_mask = layout.acc_track_mask
    m.shadow_host_writable_mask = layout.host_writable_mask
    m.shadow_mmu_writable_mask = layout.mmu_writable_mask
    m.shadow_mmio_value = layout.mmio_value
    m.shadow_mmio_mask = layout.mmio_mask
    m.shadow_mmio_access_mask = layout.mmio_access_mask
    m.ept = layout.mode == "ept"
    m.ad_disabled = layout.default_ad_disabled
    return m


def build_table(layout, u64[:, ::1] pages, u64 first_pfn):
    """Fill every page with the non-present value, then make page 0 a 4K table of writable
    leaves for pfns first_pfn.. and entry 0 of page 1 a non-leaf to page 0; all in C.

    Returns (present entries per page, leaf 5, non-leaf)."""
    cdef spte_masks_t m = masks_of(layout)
    cdef int64_t n = pages.shape[0], i
    cdef bint wrprot
    cdef list counts = []
    cdef u64* base = &pages[0, 0]
    with nogil:
        fill_pages_kernel(base, n, m.shadow_nonpresent_value)
        for i in range(SPTE_ENT_PER_PAGE):
            base[i] = make_spte(&m, 1, ACC_ALL, first_pfn + i, m.shadow_nonpresent_value,
                                False, True, m.ad_disabled, False, False, &wrprot)
        base[SPTE_ENT_PER_PAGE] = make_nonleaf_spte(&m, 0, m.ad_disabled)
    for i in range(n):
        counts.append(count_present_kernel(base + i * SPTE_ENT_PER_PAGE, m.shadow_nonpresent_value))
    return counts, base[5], base[SPTE_ENT_PER_PAGE]


cdef u64 leaf_of(mmu_t* mmu, gfn_t gfn) noexcept nogil:
    """The entry where a walk from the root stops (the leaf, or a non-present/MMIO SPTE)."""
    cdef int level = mmu.root_level
    cdef u64* table = mmu.pages + mmu.root * SPTE_ENT_PER_PAGE
    cdef u64 spte
    while True:
        spte = table[spte_index(gfn, level)]
        if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
            return spte
        table = mmu.pages + spte_to_pfn(spte) * SPTE_ENT_PER_PAGE
        level -= 1


cdef void init_cache(mem_cache_t* mc, pool_t* pool, u64 init_value) noexcept nogil:
    """A vCPU-style cache (as MemoryCache): the GFP_ZERO path exactly when init_value is 0."""
    mc.pool = pool
    mc.init_value = init_value
    mc.gfp_zero = init_value == 0
    pthread_mutex_init(&mc.lock, NULL)


def fault_gfns(layout, int root_level, int max_level, u64 slot_npages, u64 slot_pfn,
               const u64[::1] gfns, const uint8_t[::1] access, u64[:, ::1] pages):
    """Fault every gfn (access bit 0 write, bit 1 exec) on a hand-built VM with one memslot
    [0, slot_npages) -> slot_pfn and its page tables in ``pages``; no Python in the loop.

    Returns (counts by RET_PF_*, the leaf each gfn's walk ends at afterwards, MMIO
    entries among those leaves)."""
    cdef int64_t cap = pages.shape[0]
    cdef Py_ssize_t i, n = gfns.shape[0]
    cdef pool_t pool
    cdef mem_cache_t root_mc, vcpu_mc
    cdef mmu_stats_t st
    cdef memslot_t slot
    cdef mmu_t* mmu = <mmu_t*>calloc(1, sizeof(mmu_t))     # large: not on the stack
    cdef int64_t counts[6]
    cdef int64_t root, mmio = 0
    cdef int r = 0
    cdef u64* leaves = <u64*>malloc(max(n, 1) * sizeof(u64))
    memset(&pool, 0, sizeof(pool))
    memset(&root_mc, 0, sizeof(root_mc))
    memset(&vcpu_mc, 0, sizeof(vcpu_mc))
    memset(&st, 0, sizeof(st))
    memset(&slot, 0, sizeof(slot))
    memset(counts, 0, sizeof(counts))
    # The pool (as PagePool): never-used pages lowest index first, zeroed memory is clean.
    pool.pages = &pages[0, 0]
    pool.capacity = cap
    pool.free_stack = <int64_t*>malloc(cap * sizeof(int64_t))
    pool.state = <uint8_t*>calloc(cap, 1)
    pool.clean = <uint8_t*>malloc(cap)
    pool.level = <int8_t*>calloc(cap, 1)
    pool.pflags = <uint8_t*>calloc(cap, 1)
    pool.gfn = <gfn_t*>calloc(cap, sizeof(gfn_t))
    memset(pool.clean, 1, cap)
    pool.fail_budget = -1
    pthread_mutex_init(&pool.lock, NULL)
    # The memslot and the mmu (as Vm.__init__ and add_memslot).
    slot.npages = slot_npages
    slot.pfn = slot_pfn
    slot.host_flags = <uint8_t*>calloc(slot_npages, 1)
    mmu.m = masks_of(layout)
    mmu.pool = &pool
    mmu.pages = pool.pages
    mmu.root_level = root_level
    mmu.max_level = max_level
    mmu.gfn_limit = (<u64>1) << (9 * root_level)
    mmu.slots = &slot
    mmu.nslots = 1
    mmu.epoch = 1
    mmu.mmio_gen = 1                # one memslot added, as in a Vm
    mmu.nvcpus = 1
    mmu.parked = <int64_t*>malloc(cap * sizeof(int64_t))
    mmu.parked_epoch = <u64*>malloc(cap * sizeof(u64))
    spte_rwlock_init(&mmu.mmu_lock)
    init_cache(&root_mc, &pool, mmu.m.shadow_nonpresent_value)
    init_cache(&vcpu_mc, &pool, mmu.m.shadow_nonpresent_value)
    try:
        with nogil:
            # The root: a page from a cache with the non-present init value.
            if mmu_topup_memory_cache(&root_mc, 1, 1) != 0:
                r = -1
            else:
                root = mmu_memory_cache_alloc(&root_mc)
                pool.state[root] = PAGE_TABLE
                pool.clean[root] = 0
                pool.level[root] = <int8_t>root_level
                mmu.root = root
                st.tables_allocated += 1
                st.pt_pages[root_level] += 1
                # The vCPU's faults: mmu_lock for read, the cache locked (as fault_batch).
                mmu_read_lock(mmu, 0)
                pthread_mutex_lock(&vcpu_mc.lock)
                for i in range(n):
                    while True:
                        r = kvm_tdp_mmu_page_fault(mmu, &st, &vcpu_mc, NULL, gfns[i],
                                                   access[i] & 1, (access[i] >> 1) & 1)
                        if r < 0 or r != RET_PF_RETRY:
                            break
                    if r < 0:
                        break
                    counts[r] += 1
                pthread_mutex_unlock(&vcpu_mc.lock)
                mmu_read_unlock(mmu, 0)
                for i in range(n):
                    leaves[i] = leaf_of(mmu, gfns[i])
                    mmio += is_mmio_spte(&mmu.m, leaves[i])
        if r < 0:
            raise MemoryError("the embedded pool ran out")
        return [counts[k] for k in range(6)], [leaves[i] for i in range(n)], mmio
    finally:
        free(pool.free_stack); free(pool.state); free(pool.clean); free(pool.level)
        free(pool.pflags); free(pool.gfn); free(slot.host_flags)
        free(mmu.parked); free(mmu.parked_epoch)
        free(root_mc.objects); free(vcpu_mc.objects); free(mmu); free(leaves)
