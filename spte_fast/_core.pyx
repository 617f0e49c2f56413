"""spte_fast._core: the Cython engine.

A model of the Linux KVM x86 MMU's shadow page-table entries as of Linux v6.10:
SPTE layouts (EPT, NPT), the memset64 page fill, 64-bit atomics, the page pool,
KVM's memory caches (with 6.10's ``init_value``), and the TDP MMU (faults,
zaps, handle_changed_spte, the frozen-SPTE protocol, audit).  ``FROZEN_SPTE``
is the >= 6.11 name of v6.10's ``REMOVED_SPTE``; both names are exported.

Sections (fixed order): masks init; constructors; write primitives; kernels;
pool and memory caches; bookkeeping; iterator; operations; Python classes;
bench hooks.  Kernels are ``noexcept nogil`` and never touch Python objects;
the ``def`` layer validates arguments, calls one kernel, and maps its return
code to an exception.  Compiler directives live in setup.py only.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.stdint cimport INT64_MAX, INT64_MIN, int8_t, int64_t, uint8_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

import numpy as np

cimport numpy as cnp

from .errors import AuditError, CacheConfigError, OutOfMemory, SpteError
from .pf import PF

cnp.import_array()

__all__ = [
    "PG_LEVEL_4K", "PG_LEVEL_2M", "PG_LEVEL_1G", "PT64_ROOT_MAX_LEVEL", "SPTE_ENT_PER_PAGE",
    "KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE", "ACC_EXEC_MASK", "ACC_WRITE_MASK", "ACC_USER_MASK",
    "ACC_ALL", "SPTE_MMU_PRESENT_MASK", "SHADOW_NONPRESENT_VALUE", "FROZEN_SPTE", "REMOVED_SPTE",
    "FROZEN_SPTE_BITS", "SPTE_BASE_ADDR_MASK", "PT_PAGE_SIZE_MASK", "PT_WRITABLE_MASK",
    "PT_PRESENT_MASK", "SPTE_TDP_AD_SHIFT", "SPTE_TDP_AD_MASK", "SPTE_TDP_AD_ENABLED",
    "SPTE_TDP_AD_DISABLED", "SPTE_TDP_AD_WRPROT_ONLY", "SHADOW_ACC_TRACK_SAVED_BITS_MASK",
    "SHADOW_ACC_TRACK_SAVED_BITS_SHIFT", "EPT_SPTE_HOST_WRITABLE", "EPT_SPTE_MMU_WRITABLE",
    "DEFAULT_SPTE_HOST_WRITABLE", "DEFAULT_SPTE_MMU_WRITABLE", "VMX_EPT_SUPPRESS_VE_BIT",
    "VMX_EPT_RWX_MASK", "VMX_EPT_MISCONFIG_WX_VALUE", "VMX_EPT_MEMTYPE_WB_IPAT",
    "MMIO_SPTE_GEN_MASK", "MMIO_SPTE_GEN_LOW_START", "MMIO_SPTE_GEN_LOW_END",
    "MMIO_SPTE_GEN_HIGH_START", "MMIO_SPTE_GEN_HIGH_END", "NPT_MMIO_VALUE",
    "SpteLayout", "PagePool", "MemoryCache", "Vm", "Vcpu",
    "fill_pages", "scan_present", "count_present", "cmpxchg", "xchg", "atomic_or",
    "atomic_and_not",
]

# Python-visible copies of the C constants (one source: the verbatim block in _core.pxd).
globals().update(dict(
    PT64_ROOT_MAX_LEVEL=PT64_ROOT_MAX_LEVEL,
    SPTE_ENT_PER_PAGE=SPTE_ENT_PER_PAGE,
    KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE,
    ACC_EXEC_MASK=ACC_EXEC_MASK,
    ACC_WRITE_MASK=ACC_WRITE_MASK,
    ACC_USER_MASK=ACC_USER_MASK,
    ACC_ALL=ACC_ALL,
    SPTE_MMU_PRESENT_MASK=SPTE_MMU_PRESENT_MASK,
    SHADOW_NONPRESENT_VALUE=SHADOW_NONPRESENT_VALUE,
    FROZEN_SPTE_BITS=FROZEN_SPTE_BITS,
    SPTE_BASE_ADDR_MASK=SPTE_BASE_ADDR_MASK,
    PT_PAGE_SIZE_MASK=PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK=PT_WRITABLE_MASK,
    PT_PRESENT_MASK=PT_PRESENT_MASK,
    SPTE_TDP_AD_SHIFT=SPTE_TDP_AD_SHIFT,
    SPTE_TDP_AD_MASK=SPTE_TDP_AD_MASK,
    SPTE_TDP_AD_ENABLED=SPTE_TDP_AD_ENABLED,
    SPTE_TDP_AD_DISABLED=SPTE_TDP_AD_DISABLED,
    SPTE_TDP_AD_WRPROT_ONLY=SPTE_TDP_AD_WRPROT_ONLY,
    SHADOW_ACC_TRACK_SAVED_BITS_MASK=SHADOW_ACC_TRACK_SAVED_BITS_MASK,
    SHADOW_ACC_TRACK_SAVED_BITS_SHIFT=SHADOW_ACC_TRACK_SAVED_BITS_SHIFT,
    EPT_SPTE_HOST_WRITABLE=EPT_SPTE_HOST_WRITABLE,
    EPT_SPTE_MMU_WRITABLE=EPT_SPTE_MMU_WRITABLE,
    DEFAULT_SPTE_HOST_WRITABLE=DEFAULT_SPTE_HOST_WRITABLE,
    DEFAULT_SPTE_MMU_WRITABLE=DEFAULT_SPTE_MMU_WRITABLE,
    VMX_EPT_SUPPRESS_VE_BIT=VMX_EPT_SUPPRESS_VE_BIT,
    VMX_EPT_RWX_MASK=VMX_EPT_RWX_MASK,
    VMX_EPT_MISCONFIG_WX_VALUE=VMX_EPT_MISCONFIG_WX_VALUE,
    VMX_EPT_MEMTYPE_WB_IPAT=VMX_EPT_MEMTYPE_WB_IPAT,
    MMIO_SPTE_GEN_MASK=MMIO_SPTE_GEN_MASK,
    MMIO_SPTE_GEN_LOW_START=MMIO_SPTE_GEN_LOW_START,
    MMIO_SPTE_GEN_LOW_END=MMIO_SPTE_GEN_LOW_END,
    MMIO_SPTE_GEN_HIGH_START=MMIO_SPTE_GEN_HIGH_START,
    MMIO_SPTE_GEN_HIGH_END=MMIO_SPTE_GEN_HIGH_END,
    NPT_MMIO_VALUE=NPT_MMIO_VALUE,
))
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | FROZEN_SPTE_BITS   # v6.10: REMOVED_SPTE
REMOVED_SPTE = FROZEN_SPTE

cdef u64 U64_MAX = 0xFFFFFFFFFFFFFFFF
cdef u64 PFN_LIMIT = (<u64>1) << 40       # pfns that fit SPTE_BASE_ADDR_MASK


# =====================================================================================
# Masks init
# =====================================================================================
# kvm_mmu_set_ept_masks / kvm_mmu_reset_all_pte_masks, into a per-layout struct.
# 6.10: bit 63 (suppress #VE) joins the EPT present mask and MMIO mask exactly when
# the non-present value carries it.

cdef void masks_init_ept(spte_masks_t* m, bint has_ad_bits, bint has_exec_only,
                         u64 nonpresent) noexcept nogil:
    cdef u64 ve = nonpresent & VMX_EPT_SUPPRESS_VE_BIT
    memset(m, 0, sizeof(spte_masks_t))
    m.ept = True
    m.ad_disabled = not has_ad_bits
    m.shadow_nonpresent_value = nonpresent
    m.frozen_value = nonpresent | FROZEN_SPTE_BITS
    m.shadow_present_mask = (0 if has_exec_only else 1) | ve
    m.shadow_user_mask = 1
    m.shadow_x_mask = 4
    m.shadow_nx_mask = 0
    m.shadow_accessed_mask = ((<u64>1) << 8) if has_ad_bits else 0
    m.shadow_dirty_mask = ((<u64>1) << 9) if has_ad_bits else 0
    m.shadow_memtype_mask = VMX_EPT_MEMTYPE_MASK
    m.shadow_memtype_ram = VMX_EPT_MEMTYPE_WB_IPAT
    m.shadow_acc_track_mask = VMX_EPT_RWX_MASK
    m.shadow_host_writable_mask = EPT_SPTE_HOST_WRITABLE
    m.shadow_mmu_writable_mask = EPT_SPTE_MMU_WRITABLE
    m.shadow_mmio_value = VMX_EPT_MISCONFIG_WX_VALUE
    m.shadow_mmio_mask = VMX_EPT_RWX_MASK | ve
    m.shadow_mmio_access_mask = 0


cdef void masks_init_npt(spte_masks_t* m, u64 nonpresent) noexcept nogil:
    memset(m, 0, sizeof(spte_masks_t))
    m.ept = False
    m.ad_disabled = False
    m.shadow_nonpresent_value = nonpresent
    m.frozen_value = nonpresent | FROZEN_SPTE_BITS
    m.shadow_present_mask = 1
    m.shadow_user_mask = 4
    m.shadow_x_mask = 0
    m.shadow_nx_mask = (<u64>1) << 63
    m.shadow_accessed_mask = (<u64>1) << 5
    m.shadow_dirty_mask = (<u64>1) << 6
    m.shadow_memtype_mask = 0
    m.shadow_memtype_ram = 0
    m.shadow_acc_track_mask = 0
    m.shadow_host_writable_mask = DEFAULT_SPTE_HOST_WRITABLE
    m.shadow_mmu_writable_mask = DEFAULT_SPTE_MMU_WRITABLE
    m.shadow_mmio_value = NPT_MMIO_VALUE
    m.shadow_mmio_mask = NPT_MMIO_VALUE
    m.shadow_mmio_access_mask = ACC_WRITE_MASK | ACC_USER_MASK


# =====================================================================================
# Constructors (spec §2.5): pure, never store
# =====================================================================================
# make_spte, make_nonleaf_spte, make_mmio_spte, make_huge_page_split_spte, access
# tracking and spte_has_volatile_bits are `cdef inline` in _core.pxd beside the
# predicates, so a module that cimports spte_fast inlines them too.


# =====================================================================================
# Write primitives: the only code that stores into page-table memory
# =====================================================================================
# _spte_store (plain), _spte_xchg, _spte_cmpxchg, plus _mc_fill_page for fresh pages.
# KVM: __kvm_tdp_mmu_write_spte, kvm_tdp_mmu_write_spte_atomic, try_cmpxchg64.

cdef inline void _spte_store(tdp_ptep_t sptep, u64 v) noexcept nogil:
    spte_write_once(sptep, v)


cdef inline u64 _spte_xchg(tdp_ptep_t sptep, u64 v) noexcept nogil:
    return spte_xchg64(sptep, v)


cdef inline bint _spte_cmpxchg(tdp_ptep_t sptep, u64* old, u64 new) noexcept nogil:
    """try_cmpxchg64: on failure *old is refreshed with the value found."""
    return spte_try_cmpxchg64(sptep, old, new)


cdef inline u64 _tdp_mmu_write_spte(const spte_masks_t* m, tdp_ptep_t sptep, u64 old_spte,
                                    u64 new_spte, int level) noexcept nogil:
    """kvm_tdp_mmu_write_spte: xchg when volatile bits of a present leaf could be lost."""
    if is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level) and \
            spte_has_volatile_bits(m, old_spte):
        return _spte_xchg(sptep, new_spte)
    _spte_store(sptep, new_spte)
    return old_spte


# =====================================================================================
# Kernels
# =====================================================================================

cdef void fill_pages_kernel(u64* pages, int64_t n, u64 value) noexcept nogil:
    """memset64 over n whole pages."""
    spte_memset64(pages, value, <size_t>n * SPTE_ENT_PER_PAGE)


cdef inline void _mc_fill_page(u64* page, u64 value) noexcept nogil:
    spte_memset64(page, value, SPTE_ENT_PER_PAGE)


cdef int64_t count_present_kernel(const u64* page, u64 nonpresent_value) noexcept nogil:
    """sync_page-style scan: entries that are not the never-used value."""
    return spte_count_ne(page, nonpresent_value, SPTE_ENT_PER_PAGE)


# =====================================================================================
# Pool and memory caches
# =====================================================================================
# The pool hands out page indices; never-used pages come lowest-first (their memory is
# untouched numpy.zeros memory, so they cost no write on the zero path), freed pages
# are reused LIFO before them.  Every pool operation runs under pool.lock so that
# vCPU threads can top up their caches concurrently.

cdef int64_t pool_alloc_locked(pool_t* p) noexcept nogil:
    cdef int64_t idx
    if p.fail_budget == 0:
        p.failed += 1
        return -1
    if p.free_top > 0:
        p.free_top -= 1
        idx = p.free_stack[p.free_top]
    elif p.next_fresh < p.capacity:
        idx = p.next_fresh
        p.next_fresh += 1
    else:
        p.failed += 1
        return -1
    if p.fail_budget > 0:
        p.fail_budget -= 1
    p.state[idx] = PAGE_RAW
    p.allocated += 1
    return idx


cdef void pool_free_locked(pool_t* p, int64_t idx) noexcept nogil:
    p.state[idx] = PAGE_FREE
    p.clean[idx] = 0
    p.level[idx] = 0
    p.pflags[idx] = 0
    p.gfn[idx] = 0
    p.free_stack[p.free_top] = idx
    p.free_top += 1
    p.freed += 1


cdef inline int64_t pool_alloc(pool_t* p) noexcept nogil:
    cdef int64_t idx
    pthread_mutex_lock(&p.lock)
    idx = pool_alloc_locked(p)
    pthread_mutex_unlock(&p.lock)
    return idx


cdef inline void pool_free(pool_t* p, int64_t idx) noexcept nogil:
    pthread_mutex_lock(&p.lock)
    pool_free_locked(p, idx)
    pthread_mutex_unlock(&p.lock)


cdef void mc_init_page(mem_cache_t* mc, int64_t idx) noexcept nogil:
    """mmu_memory_cache_alloc_obj's initialisation: GFP_ZERO or the 6.10 init_value fill."""
    cdef pool_t* p = mc.pool
    cdef u64* page = p.pages + idx * SPTE_ENT_PER_PAGE
    # __GFP_ZERO first (only reachable together with init_value through an alloc from an
    # empty cache: top-up refuses that combination), then the 6.10 memset64 fill.
    if mc.gfp_zero:
        if p.clean[idx]:
            mc.zero_untouched += 1          # never-used memory is already zero
            spte_add64(&p.zero_untouched, 1)
        else:
            _mc_fill_page(page, 0)
            mc.zero_inits += 1
            mc.init_bytes_written += 4096
            spte_add64(&p.zero_inits, 1)
            spte_add64(&p.init_bytes_written, 4096)
            p.clean[idx] = 1
    if mc.init_value != 0:
        _mc_fill_page(page, mc.init_value)
        mc.fills += 1
        mc.init_bytes_written += 4096
        spte_add64(&p.fills, 1)
        spte_add64(&p.init_bytes_written, 4096)
        p.clean[idx] = 0
    # init_value 0 without gfp_zero: KVM's uninitialised cache, page handed out as is.


cdef int64_t mc_alloc_obj(mem_cache_t* mc) noexcept nogil:
    cdef int64_t idx = pool_alloc(mc.pool)
    if idx < 0:
        return -1
    mc.obtained += 1
    mc_init_page(mc, idx)
    return idx


cdef int mmu_topup_memory_cache(mem_cache_t* mc, int capacity, int min) noexcept nogil:
    """__kvm_mmu_topup_memory_cache (6.10). Returns 0, -SPTE_EIO or -SPTE_ENOMEM."""
    cdef int64_t idx
    if mc.nobjs >= min:
        return 0
    if mc.objects == NULL:
        if capacity == 0:
            mc.warnings += 1
            return -SPTE_EIO
        if mc.init_value != 0 and mc.gfp_zero:
            mc.warnings += 1
            return -SPTE_EIO
        mc.objects = <int64_t*>malloc(capacity * sizeof(int64_t))
        if mc.objects == NULL:
            return -SPTE_ENOMEM
        mc.capacity = capacity
    if mc.capacity != capacity:
        mc.warnings += 1
        return -SPTE_EIO
    while mc.nobjs < mc.capacity:
        idx = mc_alloc_obj(mc)
        if idx < 0:
            return 0 if mc.nobjs >= min else -SPTE_ENOMEM
        mc.pool.state[idx] = PAGE_CACHED
        mc.objects[mc.nobjs] = idx
        mc.nobjs += 1
    return 0


cdef int64_t mmu_memory_cache_alloc(mem_cache_t* mc) noexcept nogil:
    """kvm_mmu_memory_cache_alloc: LIFO pop; empty → warning and a direct allocation."""
    cdef int64_t idx
    if mc.nobjs == 0:
        mc.warnings += 1
        return mc_alloc_obj(mc)
    mc.nobjs -= 1
    idx = mc.objects[mc.nobjs]
    mc.pool.state[idx] = PAGE_RAW
    return idx


cdef void mmu_free_memory_cache(mem_cache_t* mc) noexcept nogil:
    cdef int i
    pthread_mutex_lock(&mc.pool.lock)
    for i in range(mc.nobjs - 1, -1, -1):      # objects[--nobjs] first, as KVM frees
        pool_free_locked(mc.pool, mc.objects[i])
    pthread_mutex_unlock(&mc.pool.lock)
    mc.nobjs = 0
    mc.capacity = 0
    if mc.objects != NULL:
        free(mc.objects)
        mc.objects = NULL


# =====================================================================================
# Bookkeeping: handle_changed_spte, handle_removed_pt (spec §3.7, §3.8)
# =====================================================================================
# Every change of an SPTE ends here.  Counters go to the caller's context (a vCPU's
# or the VM's own mmu_stats_t), summed when read, so vCPU threads never share a
# counter.  Host page flags are bytes per slot page, set with an atomic OR.

cdef memslot_t* _slot_for_pfn(mmu_t* mmu, pfn_t pfn) noexcept nogil:
    cdef int i
    cdef memslot_t* s
    for i in range(mmu.nslots):
        s = &mmu.slots[i]
        if pfn >= s.pfn and pfn - s.pfn < s.npages:
            return s
    return NULL


cdef inline void _mark_host_page(mmu_t* mmu, pfn_t pfn, uint8_t flag) noexcept nogil:
    cdef memslot_t* s = _slot_for_pfn(mmu, pfn)
    cdef uint8_t* f
    if s != NULL:
        f = &s.host_flags[pfn - s.pfn]
        if not (f[0] & flag):          # flags only ever get set: skip the locked op
            spte_byte_or(f, flag)


cdef inline tdp_ptep_t spte_to_child_pt(mmu_t* mmu, u64 spte) noexcept nogil:
    return mmu.pages + spte_to_pfn(spte) * SPTE_ENT_PER_PAGE


cdef void handle_removed_pt(mmu_t* mmu, mmu_stats_t* st, int64_t pt, bint shared) noexcept nogil:
    """The table `pt` was unlinked by the caller: freeze its entries, recurse, free it.

    Shared: every entry is exchanged with FROZEN, spinning while another thread's
    frozen operation is in flight, so any later CAS on it fails.  Exclusive: only
    present entries are frozen.  Each change goes through handle_changed_spte.
    """
    cdef pool_t* p = mmu.pool
    cdef int level = p.level[pt]
    cdef gfn_t base_gfn = p.gfn[pt]
    cdef tdp_ptep_t table = mmu.pages + pt * SPTE_ENT_PER_PAGE
    cdef tdp_ptep_t sptep
    cdef u64 old_spte
    cdef u64 frozen = mmu.m.frozen_value
    cdef int i
    st.pt_pages[level] -= 1
    if p.pflags[pt] & SP_NX_TRACKED:
        st.nx_lpage_splits -= 1
    for i in range(SPTE_ENT_PER_PAGE):
        sptep = table + i
        if shared:
            while True:
                old_spte = _spte_xchg(sptep, frozen)
                if not is_frozen_spte(&mmu.m, old_spte):
                    break
                spte_cpu_relax()
        else:
            old_spte = spte_read_once(sptep)
            if not is_shadow_present_pte(old_spte):
                continue
            old_spte = _tdp_mmu_write_spte(&mmu.m, sptep, old_spte, frozen, level)
        handle_changed_spte(mmu, st, base_gfn + <u64>i * pages_per_level(level),
                            old_spte, frozen, level, shared)
    st.tables_freed += 1
    spte_inc_return(&mmu.removals)
    if shared and _other_readers(mmu, st.slot):
        _park_table(mmu, pt)        # another vCPU may still be walking it: free after it
    else:
        pool_free(p, pt)            # nobody else can reach the unlinked table


# -- grace period ------------------------------------------------------------------------
# KVM frees a table removed under the read lock only after an RCU grace period.  Here
# every vCPU publishes, while it holds mmu_lock for read, the epoch it saw on entry;
# a removed table is stamped with a new epoch and goes back to the pool once every
# vCPU is outside the read side or entered after the stamp.  Taking mmu_lock for
# write (no readers at all) returns every parked table.

cdef bint _other_readers(mmu_t* mmu, int self_slot) noexcept nogil:
    """Is another vCPU inside the read side?  A vCPU entering after this check cannot
    reach a table that was unlinked before it (its walk starts after it publishes)."""
    cdef int i
    for i in range(mmu.nvcpus):
        if i != self_slot and spte_load_acq(&mmu.reader_epoch[i]) != 0:
            return True
    return False


cdef void _park_table(mmu_t* mmu, int64_t pt) noexcept nogil:
    cdef u64 stamp = spte_inc_return(&mmu.epoch)
    pthread_mutex_lock(&mmu.pool.lock)
    mmu.pool.state[pt] = PAGE_PARKED
    mmu.parked[mmu.nparked] = pt
    mmu.parked_epoch[mmu.nparked] = stamp
    mmu.nparked += 1
    pthread_mutex_unlock(&mmu.pool.lock)


cdef void _reclaim_parked(mmu_t* mmu) noexcept nogil:
    """Return the parked tables that no reader can still be walking."""
    cdef u64 oldest = U64_MAX, e
    cdef int i
    cdef int64_t j, kept = 0
    if spte_load64(&mmu.nparked) == 0:
        return
    for i in range(mmu.nvcpus):
        e = spte_load_acq(&mmu.reader_epoch[i])
        if e != 0 and e < oldest:
            oldest = e
    pthread_mutex_lock(&mmu.pool.lock)
    for j in range(mmu.nparked):
        if mmu.parked_epoch[j] <= oldest:
            mmu.pool.state[mmu.parked[j]] = PAGE_RAW
            pool_free_locked(mmu.pool, mmu.parked[j])
        else:
            mmu.parked[kept] = mmu.parked[j]
            mmu.parked_epoch[kept] = mmu.parked_epoch[j]
            kept += 1
    mmu.nparked = kept
    pthread_mutex_unlock(&mmu.pool.lock)


cdef void mmu_read_lock(mmu_t* mmu, int vcpu_slot) noexcept nogil:
    pthread_rwlock_rdlock(&mmu.mmu_lock)
    spte_store_rel(&mmu.reader_epoch[vcpu_slot], spte_load_acq(&mmu.epoch))


cdef void mmu_read_unlock(mmu_t* mmu, int vcpu_slot) noexcept nogil:
    spte_store_rel(&mmu.reader_epoch[vcpu_slot], 0)
    pthread_rwlock_unlock(&mmu.mmu_lock)


cdef void mmu_write_lock(mmu_t* mmu) noexcept nogil:
    pthread_rwlock_wrlock(&mmu.mmu_lock)
    _reclaim_parked(mmu)            # no reader is inside: every parked table is free


cdef inline void handle_changed_spte(mmu_t* mmu, mmu_stats_t* st, gfn_t gfn, u64 old_spte,
                                     u64 new_spte, int level, bint shared) noexcept nogil:
    """Bookkeeping for one SPTE change (spec §3.7).

    The common fault case — the non-present value becomes a present entry — needs
    only the counters; it is decided here, inline, and everything else goes to
    _handle_changed_spte_slow.
    """
    if old_spte == mmu.m.shadow_nonpresent_value and is_shadow_present_pte(new_spte) and \
            level >= 1 and level <= PT64_ROOT_MAX_LEVEL and \
            not (gfn & (pages_per_level(level) - 1)):
        st.spte_changes += 1
        if is_last_spte(new_spte, level):
            if not _writable_invariants_ok(&mmu.m, new_spte):
                st.warnings += 1
            st.pages[level] += 1
        return
    _handle_changed_spte_slow(mmu, st, gfn, old_spte, new_spte, level, shared)


cdef void _handle_changed_spte_slow(mmu_t* mmu, mmu_stats_t* st, gfn_t gfn, u64 old_spte,
                                    u64 new_spte, int level, bint shared) noexcept nogil:
    cdef const spte_masks_t* m = &mmu.m
    cdef bint was_present = is_shadow_present_pte(old_spte)
    cdef bint is_present = is_shadow_present_pte(new_spte)
    cdef bint was_leaf = was_present and is_last_spte(old_spte, level)
    cdef bint is_leaf = is_present and is_last_spte(new_spte, level)
    cdef bint pfn_changed = spte_to_pfn(old_spte) != spte_to_pfn(new_spte)
    st.spte_changes += 1
    if level < 1 or level > PT64_ROOT_MAX_LEVEL or (gfn & (pages_per_level(level) - 1)):
        st.warnings += 1
    # A present leaf must be zapped (and flushed) before it may map another pfn: BUG().
    if was_leaf and is_leaf and pfn_changed:
        if not mmu.fatal:
            mmu.fatal = 1
            mmu.fatal_gfn = gfn
            mmu.fatal_level = level
            mmu.fatal_old = old_spte
            mmu.fatal_new = new_spte
        return
    if old_spte == new_spte:
        return
    if is_leaf and not _writable_invariants_ok(m, new_spte):
        st.warnings += 1
    if not was_present and not is_present:
        # Only MMIO and frozen transitions are expected between non-present values.
        if not is_mmio_spte(m, old_spte) and not is_mmio_spte(m, new_spte) and \
                not is_frozen_spte(m, new_spte):
            st.warnings += 1
        return
    if is_leaf != was_leaf:
        st.pages[level] += 1 if is_leaf else -1
    if was_leaf and is_dirty_spte(m, old_spte) and \
            (not is_present or not is_dirty_spte(m, new_spte) or pfn_changed):
        _mark_host_page(mmu, spte_to_pfn(old_spte), HOST_DIRTY)
    # A table goes away when its parent entry becomes a leaf or non-present.
    if was_present and not was_leaf and (is_leaf or not is_present or pfn_changed):
        if not is_leaf and is_present:
            st.warnings += 1       # non-leaf → other non-leaf: unexpected
        handle_removed_pt(mmu, st, <int64_t>spte_to_pfn(old_spte), shared)
    if was_leaf and is_accessed_spte(m, old_spte) and \
            (not is_present or not is_accessed_spte(m, new_spte) or pfn_changed):
        _mark_host_page(mmu, spte_to_pfn(old_spte), HOST_ACCESSED)


cdef inline bint _writable_invariants_ok(const spte_masks_t* m, u64 spte) noexcept nogil:
    """check_spte_writable_invariants: W ⇒ MMU-writable ⇒ host-writable."""
    if spte & m.shadow_mmu_writable_mask:
        return (spte & m.shadow_host_writable_mask) != 0
    return not is_writable_pte(spte)


cdef u64 tdp_mmu_set_spte(mmu_t* mmu, mmu_stats_t* st, tdp_ptep_t sptep, u64 old_spte,
                          u64 new_spte, gfn_t gfn, int level) noexcept nogil:
    """Exclusive-mode setter: write (xchg if volatile), then bookkeeping. Returns old."""
    old_spte = _tdp_mmu_write_spte(&mmu.m, sptep, old_spte, new_spte, level)
    handle_changed_spte(mmu, st, gfn, old_spte, new_spte, level, False)
    return old_spte


cdef inline void tdp_mmu_iter_set_spte(mmu_t* mmu, mmu_stats_t* st, tdp_iter_t* it,
                                       u64 new_spte) noexcept nogil:
    it.old_spte = tdp_mmu_set_spte(mmu, st, it.sptep, it.old_spte, new_spte, it.gfn, it.level)


cdef inline bint _cas(mmu_t* mmu, mmu_stats_t* st, tdp_ptep_t sptep, u64* old, u64 new) noexcept nogil:
    """The engine's compare-and-exchange, with the test hook that loses races on demand."""
    if mmu.inject_cas_fail > 0 and spte_take_one(&mmu.inject_cas_fail):
        old[0] = spte_read_once(sptep)
        st.cas_failures += 1
        return False
    if not _spte_cmpxchg(sptep, old, new):
        st.cas_failures += 1
        return False
    return True


cdef int tdp_mmu_set_spte_atomic(mmu_t* mmu, mmu_stats_t* st, tdp_iter_t* it,
                                 u64 new_spte) noexcept nogil:
    """Shared-mode setter (spec §3.4).

    Returns 0, or -SPTE_EBUSY when the CAS lost: then memory is untouched by us,
    it.old_spte holds the value found, and no bookkeeping ran.
    """
    cdef u64 old_spte = it.old_spte
    if not _cas(mmu, st, it.sptep, &it.old_spte, new_spte):
        return -SPTE_EBUSY
    handle_changed_spte(mmu, st, it.gfn, old_spte, new_spte, it.level, True)
    return 0


cdef int tdp_mmu_zap_spte_atomic(mmu_t* mmu, mmu_stats_t* st, tdp_iter_t* it) noexcept nogil:
    """Freeze → ranged TLB flush → store non-present → bookkeeping (6.10, aca48556c592)."""
    cdef u64 old_spte = it.old_spte
    if not _cas(mmu, st, it.sptep, &it.old_spte, mmu.m.frozen_value):
        return -SPTE_EBUSY
    st.tlb_flushes_ranged += 1
    # Nobody else writes a frozen SPTE, so a plain store finishes the zap.
    _spte_store(it.sptep, mmu.m.shadow_nonpresent_value)
    handle_changed_spte(mmu, st, it.gfn, old_spte, mmu.m.shadow_nonpresent_value, it.level, True)
    it.old_spte = mmu.m.shadow_nonpresent_value
    return 0


# =====================================================================================
# Iterator (tdp_iter.c): pre-order over the entries intersecting [start, end)
# =====================================================================================
# Idiom used everywhere:
#     tdp_iter_start(&it, pages, root, root_level, min_level, start)
#     while it.valid and it.gfn < end:
#         ...body...
#         tdp_iter_next(&it)

cdef inline void tdp_iter_refresh_sptep(tdp_iter_t* it) noexcept nogil:
    it.sptep = it.pt_path[it.level - 1] + spte_index(it.gfn, it.level)
    it.old_spte = spte_read_once(it.sptep)


cdef void tdp_iter_restart(tdp_iter_t* it) noexcept nogil:
    it.yielded = False
    it.yielded_gfn = it.next_last_level_gfn
    it.level = it.root_level
    it.gfn = gfn_round_for_level(it.next_last_level_gfn, it.level)
    tdp_iter_refresh_sptep(it)
    it.valid = True


cdef void tdp_iter_start(tdp_iter_t* it, u64* pages, int64_t root, int root_level,
                         int min_level, gfn_t gfn) noexcept nogil:
    it.pages = pages
    it.next_last_level_gfn = gfn
    it.root_level = root_level
    it.min_level = min_level
    it.pt_path[root_level - 1] = pages + root * SPTE_ENT_PER_PAGE
    tdp_iter_restart(it)


cdef inline bint _iter_at_nonleaf(tdp_iter_t* it) noexcept nogil:
    """The current entry (as last read) is a present non-leaf: there is a table below."""
    return is_shadow_present_pte(it.old_spte) and not is_last_spte(it.old_spte, it.level)


cdef inline void _iter_descend(tdp_iter_t* it) noexcept nogil:
    """Step into the table the current entry (a present non-leaf, just read) points to."""
    it.level -= 1
    it.pt_path[it.level - 1] = it.pages + spte_to_pfn(it.old_spte) * SPTE_ENT_PER_PAGE
    it.gfn = gfn_round_for_level(it.next_last_level_gfn, it.level)
    tdp_iter_refresh_sptep(it)


cdef bint _try_step_down(tdp_iter_t* it) noexcept nogil:
    if it.level == it.min_level:
        return False
    # Re-read: the entry may have changed since the snapshot (another vCPU, a zap).
    it.old_spte = spte_read_once(it.sptep)
    if not _iter_at_nonleaf(it):
        return False
    _iter_descend(it)
    return True


cdef inline bint _try_step_side(tdp_iter_t* it) noexcept nogil:
    if spte_index(it.gfn, it.level) == SPTE_ENT_PER_PAGE - 1:
        return False
    it.gfn += pages_per_level(it.level)
    it.next_last_level_gfn = it.gfn
    it.sptep += 1
    it.old_spte = spte_read_once(it.sptep)
    return True


cdef inline bint _try_step_up(tdp_iter_t* it) noexcept nogil:
    if it.level == it.root_level:
        return False
    it.level += 1
    it.gfn = gfn_round_for_level(it.gfn, it.level)
    tdp_iter_refresh_sptep(it)
    return True


cdef void tdp_iter_next(tdp_iter_t* it) noexcept nogil:
    if it.yielded:
        tdp_iter_restart(it)
        return
    if _try_step_down(it):
        return
    while True:
        if _try_step_side(it):
            return
        if not _try_step_up(it):
            break
    it.valid = False


# =====================================================================================
# Operations: the fault path (spec §3.9) and zaps (spec §3.10)
# =====================================================================================
# Callers hold mmu_lock: faults (and the atomic zap) run in "shared" mode and change
# SPTEs only by compare-and-exchange; the other zaps are exclusive.  Nothing here
# raises: results are RET_PF_* codes, flush flags, or negative SPTE_E* codes.

cdef enum:
    VCPU_CACHE_MIN = 5          # mmu_topup_memory_caches: 1 + PT64_ROOT_MAX_LEVEL - 1


cdef memslot_t* _gfn_to_memslot(mmu_t* mmu, gfn_t gfn, int* last) noexcept nogil:
    """The slot holding gfn, trying the caller's last-used slot first (per vCPU)."""
    cdef int i = last[0] if last != NULL else 0
    cdef memslot_t* s
    if i < mmu.nslots:
        s = &mmu.slots[i]
        if gfn >= s.base_gfn and gfn - s.base_gfn < s.npages:
            return s
    for i in range(mmu.nslots):
        s = &mmu.slots[i]
        if gfn >= s.base_gfn and gfn - s.base_gfn < s.npages:
            if last != NULL:
                last[0] = i
            return s
    return NULL


cdef int _max_mapping_level(mmu_t* mmu, memslot_t* slot, gfn_t gfn) noexcept nogil:
    """The largest level <= max_level whose aligned range lies in the slot with gfn and
    pfn equally aligned (KVM's disallow_lpage); host backing never limits it."""
    cdef int level
    cdef u64 n
    cdef gfn_t base
    for level in range(mmu.max_level, 1, -1):
        n = pages_per_level(level)
        base = gfn & ~(n - 1)
        if base >= slot.base_gfn and base + n <= slot.base_gfn + slot.npages and \
                ((slot.pfn - slot.base_gfn) & (n - 1)) == 0:
            return level
    return 1


cdef inline bint _is_access_allowed(const spte_masks_t* m, u64 spte, bint write,
                                    bint exec) noexcept nogil:
    if exec:
        return is_executable_pte(m, spte)
    if write:
        return is_writable_pte(spte)
    return (spte & PT_PRESENT_MASK) != 0


cdef int _tdp_mmu_link_sp(mmu_t* mmu, mmu_stats_t* st, tdp_iter_t* it, int64_t sp) noexcept nogil:
    cdef u64 new_spte = make_nonleaf_spte(&mmu.m, <pfn_t>sp, mmu.m.ad_disabled)
    cdef int r = tdp_mmu_set_spte_atomic(mmu, st, it, new_spte)
    if r:
        return r
    st.pt_pages[it.level - 1] += 1      # tdp_account_mmu_page
    return 0


cdef int _tdp_mmu_split_huge_page(mmu_t* mmu, mmu_stats_t* st, tdp_iter_t* it,
                                  int64_t sp) noexcept nogil:
    """Fill the unlinked table with the 512 pieces of the huge SPTE, then link it."""
    cdef tdp_ptep_t table = mmu.pages + sp * SPTE_ENT_PER_PAGE
    cdef u64 huge_spte = it.old_spte
    cdef int i, r
    for i in range(SPTE_ENT_PER_PAGE):
        _spte_store(table + i, make_huge_page_split_spte(&mmu.m, huge_spte, it.level - 1, i,
                                                         mmu.nx_huge_pages))
    r = _tdp_mmu_link_sp(mmu, st, it, sp)
    if r:
        return r
    st.pages[it.level - 1] += SPTE_ENT_PER_PAGE
    return 0


cdef inline void _iter_step_into(tdp_iter_t* it) noexcept nogil:
    """Step down after a re-read: the entry is a present non-leaf."""
    it.old_spte = spte_read_once(it.sptep)
    _iter_descend(it)


cdef int _tdp_mmu_map(mmu_t* mmu, mmu_stats_t* st, mem_cache_t* mc, memslot_t* slot,
                      gfn_t gfn, bint write, bint exec, tdp_iter_t* walk) noexcept nogil:
    """kvm_tdp_mmu_map (6.10) with kvm_mmu_hugepage_adjust folded in.

    `walk` is the fast path's walk from the root, stopped at the first entry that is
    not a present non-leaf.  Every level above both that entry and the goal level
    holds a present non-leaf, where KVM's loop would only step down; the loop below
    therefore resumes at the deeper of the two, re-reading the entry first.
    """
    cdef tdp_iter_t* it = walk
    cdef int goal_level = 1
    cdef int req_level = 1
    cdef bint huge_page_disallowed = False
    cdef int64_t sp
    cdef int r
    cdef pool_t* p = mmu.pool
    # kvm_mmu_hugepage_adjust sets this before it looks for a slot: an exec fault
    # on a gfn with no memslot (an MMIO SPTE) marks its tables all the same.
    huge_page_disallowed = exec and mmu.nx_huge_pages
    if slot != NULL:
        req_level = _max_mapping_level(mmu, slot, gfn)
        goal_level = 1 if huge_page_disallowed else req_level
    if it.level < goal_level:
        it.level = goal_level
        it.gfn = gfn_round_for_level(gfn, goal_level)
    tdp_iter_refresh_sptep(it)
    while True:
        # disallowed_hugepage_adjust: keep the table an exec fault had to create.
        if mmu.nx_huge_pages and it.level > 1 and it.level == goal_level and \
                is_shadow_present_pte(it.old_spte) and not is_large_pte(it.old_spte) and \
                p.pflags[spte_to_pfn(it.old_spte)] & SP_NX_HUGE_PAGE_DISALLOWED:
            goal_level -= 1
        # Another thread froze the entry: give up before allocating anything.
        if is_frozen_spte(&mmu.m, it.old_spte):
            return RET_PF_RETRY
        if it.level == goal_level:
            break
        if is_shadow_present_pte(it.old_spte) and not is_large_pte(it.old_spte):
            _iter_step_into(it)
            continue
        # Non-present, or a huge page that must be split: a new table from the cache.
        sp = mmu_memory_cache_alloc(mc)
        if sp < 0:
            return -SPTE_ENOMEM
        st.tables_allocated += 1
        p.level[sp] = <int8_t>(it.level - 1)
        p.gfn[sp] = it.gfn
        p.pflags[sp] = SP_NX_HUGE_PAGE_DISALLOWED if huge_page_disallowed else 0
        p.state[sp] = PAGE_TABLE
        p.clean[sp] = 0                 # the VM writes into its tables
        if is_shadow_present_pte(it.old_spte):
            r = _tdp_mmu_split_huge_page(mmu, st, it, sp)
        else:
            r = _tdp_mmu_link_sp(mmu, st, it, sp)
        if r:
            # Lost the race: the page goes back to the allocator, not the cache.
            st.tables_freed += 1
            pool_free(p, sp)
            return RET_PF_RETRY
        if huge_page_disallowed and req_level >= it.level:
            p.pflags[sp] |= SP_NX_TRACKED
            st.nx_lpage_splits += 1
        _iter_step_into(it)
    return _tdp_mmu_map_handle_target_level(mmu, st, slot, it, write)


cdef int _tdp_mmu_map_handle_target_level(mmu_t* mmu, mmu_stats_t* st, memslot_t* slot,
                                          tdp_iter_t* it, bint write) noexcept nogil:
    cdef u64 new_spte
    cdef bint wrprot = False
    cdef int ret = RET_PF_FIXED
    cdef pfn_t pfn
    if slot == NULL:
        new_spte = make_mmio_spte(&mmu.m, it.gfn, ACC_ALL, mmu.mmio_gen)
    else:
        pfn = slot.pfn + (it.gfn - slot.base_gfn)
        new_spte = make_spte(&mmu.m, it.level, ACC_ALL, pfn, it.old_spte, False,
                             not slot.readonly, mmu.m.ad_disabled, mmu.nx_huge_pages,
                             False, &wrprot)
    if new_spte == it.old_spte:
        ret = RET_PF_SPURIOUS
    elif tdp_mmu_set_spte_atomic(mmu, st, it, new_spte):
        return RET_PF_RETRY
    else:
        if slot == NULL:
            st.mmio_sptes_created += 1
        elif is_shadow_present_pte(it.old_spte) and not is_last_spte(it.old_spte, it.level):
            # A table was replaced by a huge page: flush the range it covered.
            st.tlb_flushes_ranged += 1
    if wrprot and write:
        ret = RET_PF_EMULATE
    if slot == NULL:
        ret = RET_PF_EMULATE       # MMIO is emulated
    return ret


cdef inline bint _walk_from_hint(mmu_t* mmu, walk_hint_t* hint, tdp_iter_t* it,
                                 gfn_t gfn) noexcept nogil:
    """Resume at the 4K table of the last walk if the entry linking it is unchanged."""
    if hint == NULL or not hint.valid or (gfn >> 9) != hint.region or \
            spte_load_acq(&mmu.removals) != hint.removals or \
            spte_read_once(hint.l2_sptep) != hint.l2_spte:
        return False
    memcpy(it.pt_path, hint.pt_path, sizeof(hint.pt_path))
    it.pages = mmu.pages
    it.root_level = mmu.root_level
    it.min_level = 1
    it.next_last_level_gfn = gfn
    it.yielded_gfn = gfn
    it.yielded = False
    it.valid = True
    it.level = 1
    it.gfn = gfn
    tdp_iter_refresh_sptep(it)
    return True


cdef inline void _save_hint(mmu_t* mmu, walk_hint_t* hint, tdp_iter_t* it, gfn_t gfn) noexcept nogil:
    cdef tdp_ptep_t l2 = it.pt_path[1] + spte_index(gfn, 2)
    cdef u64 v = spte_read_once(l2)
    hint.valid = is_shadow_present_pte(v) and not is_large_pte(v) and \
        spte_to_child_pt(mmu, v) == it.pt_path[0]
    hint.region = gfn >> 9
    hint.removals = spte_load_acq(&mmu.removals)
    hint.l2_sptep = l2
    hint.l2_spte = v
    memcpy(hint.pt_path, it.pt_path, sizeof(hint.pt_path))


cdef int kvm_tdp_mmu_page_fault(mmu_t* mmu, mmu_stats_t* st, mem_cache_t* mc,
                                walk_hint_t* hint, gfn_t gfn, bint write,
                                bint exec) noexcept nogil:
    """One guest fault (kvm_tdp_mmu_page_fault, 6.10). Caller holds mmu_lock and mc.lock.

    Order as in KVM: the fast path's question (does the last SPTE already allow the
    access?), then the vCPU cache top-up, then the pfn (a write to a read-only slot
    is emulated), then kvm_tdp_mmu_map.  Returns RET_PF_* or -SPTE_ENOMEM.
    """
    cdef memslot_t* slot
    cdef tdp_iter_t it
    cdef int r
    if not _walk_from_hint(mmu, hint, &it, gfn):
        tdp_iter_start(&it, mmu.pages, mmu.root, mmu.root_level, 1, gfn)
        while _iter_at_nonleaf(&it):
            _iter_descend(&it)
    if is_shadow_present_pte(it.old_spte) and _is_access_allowed(&mmu.m, it.old_spte, write, exec):
        r = RET_PF_SPURIOUS
    else:
        if mc.nobjs < VCPU_CACHE_MIN:
            r = mmu_topup_memory_cache(mc, KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE, VCPU_CACHE_MIN)
            if r == -SPTE_ENOMEM and mmu.nparked:
                _reclaim_parked(mmu)        # removed tables may be reusable by now
                r = mmu_topup_memory_cache(mc, KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE,
                                           VCPU_CACHE_MIN)
            if r < 0:
                return r
        slot = _gfn_to_memslot(mmu, gfn, &hint.last_slot if hint != NULL else NULL)
        if slot != NULL and write and slot.readonly:
            r = RET_PF_EMULATE      # KVM_PFN_ERR_RO_FAULT: emulate, install nothing
        else:
            r = _tdp_mmu_map(mmu, st, mc, slot, gfn, write, exec, &it)
            if r < 0:
                return r
    if hint != NULL and it.level == 1:
        _save_hint(mmu, hint, &it, gfn)
    st.faults[r] += 1
    return r


cdef bint _zap_leafs(mmu_t* mmu, mmu_stats_t* st, gfn_t start, gfn_t end) noexcept nogil:
    """tdp_mmu_zap_leafs (exclusive): present leaves in [start, end); no table is freed."""
    cdef tdp_iter_t it
    cdef bint flush = False
    tdp_iter_start(&it, mmu.pages, mmu.root, mmu.root_level, 1, start)
    while it.valid and it.gfn < end:
        if is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level):
            tdp_mmu_iter_set_spte(mmu, st, &it, mmu.m.shadow_nonpresent_value)
            flush = True
        tdp_iter_next(&it)
    return flush


cdef bint _zap_root_pass(mmu_t* mmu, mmu_stats_t* st, int zap_level) noexcept nogil:
    """__tdp_mmu_zap_root (exclusive): every present entry at zap_level."""
    cdef tdp_iter_t it
    cdef bint zapped = False
    tdp_iter_start(&it, mmu.pages, mmu.root, mmu.root_level, zap_level, 0)
    while it.valid and it.gfn < mmu.gfn_limit:
        if is_shadow_present_pte(it.old_spte) and it.level <= zap_level:
            tdp_mmu_iter_set_spte(mmu, st, &it, mmu.m.shadow_nonpresent_value)
            zapped = True
        tdp_iter_next(&it)
    return zapped


cdef bint _zap_root(mmu_t* mmu, mmu_stats_t* st) noexcept nogil:
    """4K → 2M → 1G → root-level passes, so no single removal recurses deeply."""
    cdef bint zapped = False
    zapped |= _zap_root_pass(mmu, st, 1)
    zapped |= _zap_root_pass(mmu, st, 2)
    zapped |= _zap_root_pass(mmu, st, 3)
    zapped |= _zap_root_pass(mmu, st, mmu.root_level)
    return zapped


cdef bint _iter_seek(mmu_t* mmu, tdp_iter_t* it, gfn_t gfn, int level) noexcept nogil:
    """Position the iterator on the entry at `level` on gfn's path, if the path exists."""
    tdp_iter_start(it, mmu.pages, mmu.root, mmu.root_level, level, gfn)
    while it.level > level:
        if not _iter_at_nonleaf(it):
            return False
        _iter_descend(it)
    return True


cdef bint _zap_sp(mmu_t* mmu, mmu_stats_t* st, gfn_t gfn, int level) noexcept nogil:
    """kvm_tdp_mmu_zap_sp: the parent entry of the level-`level` table becomes non-present."""
    cdef tdp_iter_t it
    if not _iter_seek(mmu, &it, gfn, level + 1):
        return False
    if not is_shadow_present_pte(it.old_spte) or is_last_spte(it.old_spte, it.level):
        return False
    tdp_mmu_iter_set_spte(mmu, st, &it, mmu.m.shadow_nonpresent_value)
    return True


cdef bint _zap_spte_atomic_at(mmu_t* mmu, mmu_stats_t* st, gfn_t gfn, int level) noexcept nogil:
    cdef tdp_iter_t it
    if not _iter_seek(mmu, &it, gfn, level):
        return False
    while is_shadow_present_pte(it.old_spte):
        if tdp_mmu_zap_spte_atomic(mmu, st, &it) == 0:
            return True
        # Lost the race: it.old_spte is fresh; retry at the same position.
    return False


# =====================================================================================
# Python classes: validate, call one kernel, map the return code
# =====================================================================================

import operator as _operator
import threading as _threading

# What the API calls an int: Python ints (bool included) and numpy integer
# scalars; not any object with __index__ (whose code could run mid-call).
_INT_TYPES = (int, np.integer)

cdef extern from "Python.h":
    # Declared without an exception spec: the callers test PyErr_Occurred
    # themselves and fall back to the slow path, which words the error.
    bint PyLong_CheckExact(object o)
    unsigned long long _pylong_as_ull "PyLong_AsUnsignedLongLong"(object o)
    long long _pylong_as_ll "PyLong_AsLongLong"(object o)
    void* PyErr_Occurred()
    void PyErr_Clear()


cdef u64 _as_u64(object v, str name) except? 0xFFFFFFFFFFFFFFFF:
    """An int in [0, 2**64) or TypeError/ValueError naming the argument."""
    cdef unsigned long long r
    if PyLong_CheckExact(v):            # the common case, without Python-level calls
        r = _pylong_as_ull(v)
        if r != <unsigned long long>-1 or PyErr_Occurred() == NULL:
            return r
        PyErr_Clear()                   # negative or too wide: worded below
    if not isinstance(v, _INT_TYPES):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    iv = _operator.index(v)
    if iv < 0 or iv > U64_MAX:
        raise ValueError(f"{name} must be in [0, 2**64), got {iv:#x}" if iv >= 0
                         else f"{name} must be in [0, 2**64), got {iv}")
    return <u64>iv


cdef int64_t _as_int(object v, str name, int64_t lo, int64_t hi) except? -1:
    """An int in [lo, hi] or TypeError/ValueError."""
    cdef long long r
    if PyLong_CheckExact(v):
        r = _pylong_as_ll(v)
        if r != -1 or PyErr_Occurred() == NULL:
            if lo <= r <= hi:
                return r
        else:
            PyErr_Clear()               # wider than 64 bits: worded below
    if not isinstance(v, _INT_TYPES):
        raise TypeError(f"{name} must be an int, not {type(v).__name__}")
    iv = _operator.index(v)
    if iv < lo or iv > hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {iv}")
    return <int64_t>iv


cdef int _check_rc(int rc, str what) except -1:
    """The one place where kernel return codes become exceptions."""
    if rc >= 0:
        return rc
    if rc == -SPTE_ENOMEM:
        raise OutOfMemory(f"{what}: out of page-table pages (-ENOMEM)")
    if rc == -SPTE_EIO:
        raise CacheConfigError(f"{what}: refused by KVM's rules (-EIO)")
    if rc == -SPTE_EINVAL:
        raise ValueError(f"{what}: invalid argument")
    raise SpteError(f"{what}: error {rc}")


cdef object _LAYOUT_TOKEN = object()


@cython.final
cdef class SpteLayout:
    """The SPTE encoding of one paging mode (EPT with/without A/D, exec-only; NPT).

    Build with ``SpteLayout.ept(ad=True, exec_only=False, nonpresent_value=1 << 63)``
    or ``SpteLayout.npt(nonpresent_value=1 << 63)``; ``nonpresent_value=0`` models
    kernels up to 6.9.

    >>> SpteLayout.ept().make_spte(0x1234)[1] == 0x8600_0000_0000_0b77 | 0x1234 << 12
    True
    """
    cdef spte_masks_t m
    cdef readonly bint exec_only

    def __cinit__(self, *args):
        # Only ept()/npt() pass the token: a layout whose masks were never set up would
        # look valid to the kernels (all masks 0, frozen == non-present: endless RETRY).
        if len(args) != 1 or args[0] is not _LAYOUT_TOKEN:
            raise TypeError("use SpteLayout.ept(...) or SpteLayout.npt(...)")

    @staticmethod
    def ept(ad=True, exec_only=False, nonpresent_value=SHADOW_NONPRESENT_VALUE):
        """Intel EPT masks (kvm_mmu_set_ept_masks)."""
        cdef u64 v = _as_u64(nonpresent_value, "nonpresent_value")
        cdef SpteLayout self = SpteLayout.__new__(SpteLayout, _LAYOUT_TOKEN)
        masks_init_ept(&self.m, bool(ad), bool(exec_only), v)
        self.exec_only = bool(exec_only)
        self._validate()
        return self

    @staticmethod
    def npt(nonpresent_value=SHADOW_NONPRESENT_VALUE):
        """AMD NPT / shadow paging masks (kvm_mmu_reset_all_pte_masks)."""
        cdef u64 v = _as_u64(nonpresent_value, "nonpresent_value")
        cdef SpteLayout self = SpteLayout.__new__(SpteLayout, _LAYOUT_TOKEN)
        masks_init_npt(&self.m, v)
        self.exec_only = False
        self._validate()
        return self

    cdef _validate(self):
        cdef u64 v = self.m.shadow_nonpresent_value
        if is_shadow_present_pte(v):
            raise ValueError(f"nonpresent_value {v:#x} is shadow-present (bit 11 set)")
        if is_mmio_spte(&self.m, v):
            raise ValueError(f"nonpresent_value {v:#x} is an MMIO SPTE of this layout")
        if v == self.m.frozen_value:
            raise ValueError(f"nonpresent_value {v:#x} equals its frozen value (bits 0x5a0 set)")
        if is_mmio_spte(&self.m, self.m.frozen_value):
            raise ValueError(f"frozen value {self.m.frozen_value:#x} would be an MMIO SPTE")

    # -- attributes ------------------------------------------------------------------
    @property
    def mode(self): return "ept" if self.m.ept else "npt"
    @property
    def ad_enabled(self): return self.m.shadow_accessed_mask != 0
    @property
    def default_ad_disabled(self): return bool(self.m.ad_disabled)
    @property
    def nonpresent_value(self): return self.m.shadow_nonpresent_value
    @property
    def frozen_value(self): return self.m.frozen_value
    @property
    def present_mask(self): return self.m.shadow_present_mask
    @property
    def user_mask(self): return self.m.shadow_user_mask
    @property
    def writable_mask(self): return PT_WRITABLE_MASK
    @property
    def x_mask(self): return self.m.shadow_x_mask
    @property
    def nx_mask(self): return self.m.shadow_nx_mask
    @property
    def accessed_mask(self): return self.m.shadow_accessed_mask
    @property
    def dirty_mask(self): return self.m.shadow_dirty_mask
    @property
    def memtype_mask(self): return self.m.shadow_memtype_mask
    @property
    def memtype_ram(self): return self.m.shadow_memtype_ram
    @property
    def acc_track_mask(self): return self.m.shadow_acc_track_mask
    @property
    def host_writable_mask(self): return self.m.shadow_host_writable_mask
    @property
    def mmu_writable_mask(self): return self.m.shadow_mmu_writable_mask
    @property
    def mmio_value(self): return self.m.shadow_mmio_value
    @property
    def mmio_mask(self): return self.m.shadow_mmio_mask
    @property
    def mmio_access_mask(self): return self.m.shadow_mmio_access_mask
    @property
    def pfn_mask(self): return SPTE_BASE_ADDR_MASK
    @property
    def large_page_mask(self): return PT_PAGE_SIZE_MASK

    cdef tuple _key(self):
        return (self.m.ept, self.exec_only, self.m.ad_disabled, self.m.shadow_nonpresent_value)

    def __eq__(self, other):
        if not isinstance(other, SpteLayout):
            return NotImplemented
        return self._key() == (<SpteLayout>other)._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        if self.m.ept:
            return (f"SpteLayout.ept(ad={self.ad_enabled}, exec_only={self.exec_only}, "
                    f"nonpresent_value={self.m.shadow_nonpresent_value:#x})")
        return f"SpteLayout.npt(nonpresent_value={self.m.shadow_nonpresent_value:#x})"

    def __reduce__(self):
        if self.m.ept:
            return (_layout_ept, (self.ad_enabled, self.exec_only, self.nonpresent_value))
        return (_layout_npt, (self.nonpresent_value,))

    # -- predicates --------------------------------------------------------------------
    def is_shadow_present_pte(self, spte):
        return is_shadow_present_pte(_as_u64(spte, "spte"))

    def is_last_spte(self, spte, level):
        cdef u64 s = _as_u64(spte, "spte")
        return is_last_spte(s, <int>_as_int(level, "level", 1, 5))

    def is_large_pte(self, spte):
        return is_large_pte(_as_u64(spte, "spte"))

    def is_mmio_spte(self, spte):
        return is_mmio_spte(&self.m, _as_u64(spte, "spte"))

    def is_frozen_spte(self, spte):
        return is_frozen_spte(&self.m, _as_u64(spte, "spte"))

    def spte_to_pfn(self, spte):
        return spte_to_pfn(_as_u64(spte, "spte"))

    def spte_ad_enabled(self, spte):
        return spte_ad_enabled(_as_u64(spte, "spte"))

    def spte_ad_need_write_protect(self, spte):
        return spte_ad_need_write_protect(_as_u64(spte, "spte"))

    def is_access_track_spte(self, spte):
        return is_access_track_spte(&self.m, _as_u64(spte, "spte"))

    def is_accessed_spte(self, spte):
        return is_accessed_spte(&self.m, _as_u64(spte, "spte"))

    def is_dirty_spte(self, spte):
        return is_dirty_spte(&self.m, _as_u64(spte, "spte"))

    def is_writable_pte(self, spte):
        return is_writable_pte(_as_u64(spte, "spte"))

    def is_mmu_writable_spte(self, spte):
        return is_mmu_writable_spte(&self.m, _as_u64(spte, "spte"))

    def is_executable_pte(self, spte):
        return is_executable_pte(&self.m, _as_u64(spte, "spte"))

    def spte_has_volatile_bits(self, spte):
        return spte_has_volatile_bits(&self.m, _as_u64(spte, "spte"))

    # -- constructors ------------------------------------------------------------------
    def make_spte(self, pfn, level=1, access=ACC_ALL, *, prefetch=False, host_writable=True,
                  ad_disabled=None, nx_huge_pages=False, old_spte=None, write_tracked=False):
        """v6.10 make_spte → (wrprot, spte). See docs/API.md for the algorithm."""
        cdef u64 p = _as_u64(pfn, "pfn")
        cdef int lvl = <int>_as_int(level, "level", 1, 3)
        cdef unsigned int acc = <unsigned int>_as_int(access, "access", 0, 7)
        cdef u64 old = self.m.shadow_nonpresent_value if old_spte is None else \
            _as_u64(old_spte, "old_spte")
        cdef bint add = self.m.ad_disabled if ad_disabled is None else bool(ad_disabled)
        cdef bint wrprot = False
        cdef u64 spte
        if p >= PFN_LIMIT:
            raise ValueError(f"pfn {p:#x} does not fit the PFN field (bits 12..51)")
        spte = make_spte(&self.m, lvl, acc, p, old, bool(prefetch), bool(host_writable), add,
                         bool(nx_huge_pages), bool(write_tracked), &wrprot)
        return (bool(wrprot), spte)

    def make_nonleaf_spte(self, child_pfn, ad_disabled=None):
        cdef u64 p = _as_u64(child_pfn, "child_pfn")
        if p >= PFN_LIMIT:
            raise ValueError(f"child_pfn {p:#x} does not fit the PFN field (bits 12..51)")
        return make_nonleaf_spte(&self.m, p,
                                 self.m.ad_disabled if ad_disabled is None else bool(ad_disabled))

    def make_mmio_spte(self, gfn, access=0, generation=0):
        cdef u64 g = _as_u64(gfn, "gfn")
        cdef unsigned int acc = <unsigned int>_as_int(access, "access", 0, 7)
        cdef u64 gen = <u64>_as_int(generation, "generation", 0, MMIO_SPTE_GEN_MASK)
        if g >= ((<u64>1) << 52):
            raise ValueError(f"gfn {g:#x} is beyond a 64-bit GPA space")
        return make_mmio_spte(&self.m, g, acc, gen)

    cdef u64 _mmio_arg(self, spte) except? 0:
        cdef u64 s = _as_u64(spte, "spte")
        if not is_mmio_spte(&self.m, s):
            raise ValueError(f"{s:#x} is not an MMIO SPTE of this layout")
        return s

    def get_mmio_spte_gfn(self, spte):
        return get_mmio_spte_gfn(&self.m, self._mmio_arg(spte))

    def get_mmio_spte_generation(self, spte):
        return get_mmio_spte_generation(self._mmio_arg(spte))

    def get_mmio_spte_access(self, spte):
        return self._mmio_arg(spte) & self.m.shadow_mmio_access_mask

    def make_huge_page_split_spte(self, huge_spte, child_level, index, nx_huge_pages=False):
        cdef u64 h = _as_u64(huge_spte, "huge_spte")
        cdef int cl = <int>_as_int(child_level, "child_level", 1, 2)
        cdef int i = <int>_as_int(index, "index", 0, SPTE_ENT_PER_PAGE - 1)
        if not is_shadow_present_pte(h) or not is_large_pte(h):
            raise ValueError(f"{h:#x} is not a present huge SPTE")
        return make_huge_page_split_spte(&self.m, h, cl, i, bool(nx_huge_pages))

    def mark_spte_for_access_track(self, spte):
        return mark_spte_for_access_track(&self.m, _as_u64(spte, "spte"))

    def restore_acc_track_spte(self, spte):
        return restore_acc_track_spte(&self.m, _as_u64(spte, "spte"))


def _layout_ept(ad, exec_only, nonpresent_value):
    return SpteLayout.ept(ad=ad, exec_only=exec_only, nonpresent_value=nonpresent_value)


def _layout_npt(nonpresent_value):
    return SpteLayout.npt(nonpresent_value=nonpresent_value)


# -- kernels, Python side -------------------------------------------------------------

cdef cnp.ndarray _u64_array(object a, str name, bint writable):
    """Check with numpy's C API (no attribute lookups: this runs on every kernel call)."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray of uint64, not {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != cnp.NPY_UINT64:
        raise TypeError(f"{name} must have dtype uint64, not {arr.dtype}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only")
    return arr


cdef cnp.ndarray _pages_array(object a, str name, bint writable):
    cdef cnp.ndarray arr = _u64_array(a, name, writable)
    cdef int nd = cnp.PyArray_NDIM(arr)
    cdef cnp.npy_intp* shape = cnp.PyArray_DIMS(arr)
    if not ((nd == 2 and shape[1] == SPTE_ENT_PER_PAGE) or
            (nd == 1 and shape[0] == SPTE_ENT_PER_PAGE)):
        raise ValueError(f"{name} must have shape (n, 512) or (512,), not {(<object>arr).shape}")
    return arr


def fill_pages(pages, value):
    """memset64: fill whole pages with ``value``.

    ``pages``: writable C-contiguous uint64 array of shape (n, 512) or (512,).
    Runs with the GIL released.
    """
    cdef cnp.ndarray arr = _pages_array(pages, "pages", True)
    cdef u64 v = _as_u64(value, "value")
    cdef u64* p = <u64*>cnp.PyArray_DATA(arr)
    cdef int64_t n = cnp.PyArray_SIZE(arr) // SPTE_ENT_PER_PAGE
    if n <= 16:
        fill_pages_kernel(p, n, v)     # shorter than releasing the GIL
    else:
        with nogil:
            fill_pages_kernel(p, n, v)


def scan_present(page, nonpresent_value):
    """sync_page scan: indices of the entries that differ from ``nonpresent_value``."""
    cdef cnp.ndarray arr = _u64_array(page, "page", False)
    if arr.ndim != 1 or arr.shape[0] != SPTE_ENT_PER_PAGE:
        raise ValueError(f"page must have shape (512,), not {(<object>arr).shape}")
    cdef u64 v = _as_u64(nonpresent_value, "nonpresent_value")
    cdef const u64* p = <const u64*>cnp.PyArray_DATA(arr)
    cdef cnp.ndarray out = np.empty(SPTE_ENT_PER_PAGE, dtype=np.intp)
    cdef Py_ssize_t* o = <Py_ssize_t*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t n = 0
    cdef int i
    with nogil:
        for i in range(SPTE_ENT_PER_PAGE):
            if p[i] != v:
                o[n] = i
                n += 1
    return out[:n].copy()


def count_present(pages, nonpresent_value):
    """Per page, how many entries differ from ``nonpresent_value`` (int64 array)."""
    cdef cnp.ndarray arr = _pages_array(pages, "pages", False)
    cdef u64 v = _as_u64(nonpresent_value, "nonpresent_value")
    cdef int64_t n = arr.size // SPTE_ENT_PER_PAGE
    cdef cnp.ndarray out = np.empty(n, dtype=np.int64)
    cdef int64_t* o = <int64_t*>cnp.PyArray_DATA(out)
    cdef const u64* p = <const u64*>cnp.PyArray_DATA(arr)
    cdef int64_t i
    with nogil:
        for i in range(n):
            o[i] = count_present_kernel(p + i * SPTE_ENT_PER_PAGE, v)
    return out


cdef u64* _elem(object array, int64_t i) except NULL:
    """&array.flat[i]; called after every scalar argument is converted, so that
    nothing can run between taking the pointer and using it."""
    cdef cnp.ndarray arr = _u64_array(array, "array", True)
    if arr.size == 0:
        raise ValueError("array is empty")
    if i >= arr.size:
        raise ValueError(f"index must be in [0, {arr.size - 1}], got {i}")
    return (<u64*>cnp.PyArray_DATA(arr)) + i


def cmpxchg(array, index, expected, new):
    """A real 64-bit compare-and-exchange on ``array.flat[index]`` → (ok, observed)."""
    cdef int64_t i = _as_int(index, "index", 0, INT64_MAX)
    cdef u64 old = _as_u64(expected, "expected")
    cdef u64 nv = _as_u64(new, "new")
    cdef u64* p = _elem(array, i)
    cdef bint ok
    with nogil:
        ok = spte_try_cmpxchg64(p, &old, nv)
    return (bool(ok), old)


cdef enum:
    RMW_XCHG = 0
    RMW_OR = 1
    RMW_AND_NOT = 2


cdef u64 _atomic_rmw(object array, object index, object value, str name, int op) except? 0:
    """One atomic read-modify-write on ``array.flat[index]``; returns the old value."""
    cdef int64_t i = _as_int(index, "index", 0, INT64_MAX)
    cdef u64 v = _as_u64(value, name)
    cdef u64* p = _elem(array, i)
    cdef u64 old
    with nogil:
        if op == RMW_XCHG:
            old = spte_xchg64(p, v)
        elif op == RMW_OR:
            old = spte_fetch_or64(p, v)
        else:
            old = spte_fetch_and64(p, ~v)
    return old


def xchg(array, index, new):
    """Atomic exchange; returns the old value."""
    return _atomic_rmw(array, index, new, "new", RMW_XCHG)


def atomic_or(array, index, mask):
    """Atomic fetch-or; returns the old value."""
    return _atomic_rmw(array, index, mask, "mask", RMW_OR)


def atomic_and_not(array, index, mask):
    """Atomic fetch-and of ``~mask`` (tdp_mmu_clear_spte_bits); returns the old value."""
    return _atomic_rmw(array, index, mask, "mask", RMW_AND_NOT)


cdef object _page_arena(int64_t cap, object poison):
    """``cap`` pages as a (cap, 512) uint64 array aligned to 4 KiB, like real
    page-table pages: numpy.zeros (or full of ``poison``) with one spare page,
    viewed from the first page boundary.  numpy's own blocks are only 16-byte
    aligned, which would make every table straddle two host pages and split
    cache lines under the fill's wide stores."""
    cdef int64_t n = (cap + 1) * SPTE_ENT_PER_PAGE
    raw = (np.zeros(n, dtype=np.uint64) if poison is None
           else np.full(n, poison, dtype=np.uint64))
    cdef size_t page_bytes = SPTE_ENT_PER_PAGE * sizeof(u64)
    cdef size_t addr = <size_t>cnp.PyArray_DATA(<cnp.ndarray>raw)
    cdef int64_t off = <int64_t>(((page_bytes - addr % page_bytes) % page_bytes) // sizeof(u64))
    return raw[off:off + cap * SPTE_ENT_PER_PAGE].reshape(cap, SPTE_ENT_PER_PAGE)


@cython.final
@cython.no_gc_clear      # __dealloc__ needs its attributes (the pool's memory)
cdef class PagePool:
    """Page-table pages: one contiguous uint64 array, shape (capacity, 512).

    The memory is ``numpy.zeros`` (a page never touched costs nothing) unless
    ``poison`` fills it with garbage, for tests that must not rely on zero.
    """
    cdef pool_t p
    cdef object _arr
    cdef object _ro                 # _arr seen through a read-only buffer (``pages``)
    cdef readonly object poison

    def __cinit__(self, capacity, poison=None):
        cdef int64_t cap = _as_int(capacity, "capacity", 1, 1 << 40)
        cdef u64 pv = 0
        memset(&self.p, 0, sizeof(pool_t))
        if poison is not None:
            pv = _as_u64(poison, "poison")
        self.poison = poison
        self._arr = _page_arena(cap, None if poison is None else pv)
        # Built on a read-only buffer, so ``flags.writeable = True`` is refused: a Python
        # store into a linked table would bypass the setters (and could plant a frozen
        # entry that a zap then waits on forever).
        self._ro = np.asarray(memoryview(self._arr).toreadonly())
        self.p.pages = <u64*>cnp.PyArray_DATA(<cnp.ndarray>self._arr)
        self.p.capacity = cap
        self.p.free_stack = <int64_t*>PyMem_RawMalloc(cap * sizeof(int64_t))
        self.p.state = <uint8_t*>PyMem_RawCalloc(cap, 1)
        self.p.clean = <uint8_t*>PyMem_RawMalloc(cap)
        self.p.level = <int8_t*>PyMem_RawCalloc(cap, 1)
        self.p.pflags = <uint8_t*>PyMem_RawCalloc(cap, 1)
        self.p.gfn = <gfn_t*>PyMem_RawCalloc(cap, sizeof(gfn_t))
        if not (self.p.free_stack and self.p.state and self.p.clean and self.p.level and
                self.p.pflags and self.p.gfn):
            raise MemoryError("PagePool metadata")
        memset(self.p.clean, 1 if poison is None else 0, cap)
        self.p.fail_budget = -1
        pthread_mutex_init(&self.p.lock, NULL)

    def __dealloc__(self):
        PyMem_RawFree(self.p.free_stack)
        PyMem_RawFree(self.p.state)
        PyMem_RawFree(self.p.clean)
        PyMem_RawFree(self.p.level)
        PyMem_RawFree(self.p.pflags)
        PyMem_RawFree(self.p.gfn)
        pthread_mutex_destroy(&self.p.lock)

    @property
    def capacity(self):
        return self.p.capacity

    def __len__(self):
        return self.p.capacity

    @property
    def pages(self):
        """Read-only view of all pages (index = host frame of the table); a fresh view
        each time, so that reshaping one cannot change what the next caller sees."""
        return self._ro.view()

    @property
    def nr_free(self):
        return self.p.free_top + (self.p.capacity - self.p.next_fresh)

    def alloc(self):
        """A raw page (content unspecified) → index; OutOfMemory when none is left."""
        cdef int64_t idx
        with nogil:
            idx = pool_alloc(&self.p)
        if idx < 0:
            raise OutOfMemory("page pool exhausted")
        return idx

    cdef int64_t _index(self, index) except -1:
        return _as_int(index, "index", 0, self.p.capacity - 1)

    def free(self, index):
        """Give back a page obtained with ``alloc()``."""
        cdef int64_t idx = self._index(index)
        with nogil:
            pthread_mutex_lock(&self.p.lock)
        try:
            if self.p.state[idx] != PAGE_RAW:
                raise ValueError(f"page {idx} was not handed out by alloc() "
                                 f"(state {('free', 'raw', 'cached', 'table', 'parked')[self.p.state[idx]]})")
            pool_free_locked(&self.p, idx)
        finally:
            pthread_mutex_unlock(&self.p.lock)

    def fail_after(self, n):
        """Fault injection: the next ``n`` allocations succeed, then all fail. None: off."""
        cdef int64_t budget = -1 if n is None else _as_int(n, "n", 0, 1 << 62)
        with nogil:
            pthread_mutex_lock(&self.p.lock)
            self.p.fail_budget = budget
            pthread_mutex_unlock(&self.p.lock)

    def is_clean(self, index):
        return bool(self.p.clean[self._index(index)])

    def page_state(self, index):
        """'free', 'raw', 'cached' or 'table'."""
        return ("free", "raw", "cached", "table", "parked")[self.p.state[self._index(index)]]

    @property
    def stats(self):
        return {"allocated": self.p.allocated, "freed": self.p.freed,
                "in_use": self.p.capacity - self.nr_free, "failed": self.p.failed,
                "zero_inits": self.p.zero_inits, "zero_untouched": self.p.zero_untouched,
                "fills": self.p.fills, "init_bytes_written": self.p.init_bytes_written}

    def __repr__(self):
        return f"PagePool(capacity={self.p.capacity}, free={self.nr_free})"


@cython.final
@cython.no_gc_clear      # __dealloc__ needs its attributes (the pool's memory)
cdef class MemoryCache:
    """KVM's ``kvm_mmu_memory_cache`` over a PagePool (Linux 6.10 rules).

    ``init_value`` 0 picks the GFP_ZERO-equivalent path (never-used pages are
    already zero; recycled pages are zeroed); anything else is the fill path
    (memset64 at top-up time).
    """
    cdef mem_cache_t mc
    cdef readonly PagePool pool
    cdef readonly int default_capacity

    def __cinit__(self, PagePool pool not None, init_value=0, capacity=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE,
                  gfp_zero=None):
        memset(&self.mc, 0, sizeof(mem_cache_t))
        self.mc.init_value = _as_u64(init_value, "init_value")
        self.default_capacity = <int>_as_int(capacity, "capacity", 0, 1 << 24)
        self.mc.gfp_zero = (self.mc.init_value == 0) if gfp_zero is None else bool(gfp_zero)
        self.pool = pool
        self.mc.pool = &pool.p
        pthread_mutex_init(&self.mc.lock, NULL)

    def __dealloc__(self):
        # Cached pages go back to the pool if the pool is still alive.
        if self.pool is not None:
            mmu_free_memory_cache(&self.mc)
        elif self.mc.objects != NULL:
            free(self.mc.objects)
        pthread_mutex_destroy(&self.mc.lock)

    cdef inline void _lock(self) noexcept nogil:
        pthread_mutex_lock(&self.mc.lock)

    cdef inline void _unlock(self) noexcept nogil:
        pthread_mutex_unlock(&self.mc.lock)

    @property
    def init_value(self): return self.mc.init_value
    @property
    def gfp_zero(self): return bool(self.mc.gfp_zero)
    @property
    def capacity(self): return self.mc.capacity
    @property
    def nobjs(self): return self.mc.nobjs
    def __len__(self): return self.mc.nobjs
    @property
    def warnings(self): return self.mc.warnings

    @property
    def objects(self):
        cdef int i
        with nogil:
            self._lock()
        try:
            return tuple(self.mc.objects[i] for i in range(self.mc.nobjs))
        finally:
            self._unlock()

    @property
    def stats(self):
        return {"fills": self.mc.fills, "zero_inits": self.mc.zero_inits,
                "zero_untouched": self.mc.zero_untouched,
                "init_bytes_written": self.mc.init_bytes_written,
                "obtained": self.mc.obtained, "warnings": self.mc.warnings}

    def topup(self, min, capacity=None):
        """Top up to capacity when fewer than ``min`` pages are cached (KVM 6.10 rules)."""
        cdef int cap = self.default_capacity if capacity is None else \
            <int>_as_int(capacity, "capacity", 0, 1 << 24)
        cdef int mn = <int>_as_int(min, "min", 0, 1 << 24)
        cdef int rc
        with nogil:
            self._lock()
            rc = mmu_topup_memory_cache(&self.mc, cap, mn)
            self._unlock()
        if rc == -SPTE_EIO:
            raise CacheConfigError(self._eio_reason(cap))
        if rc == -SPTE_ENOMEM:
            raise OutOfMemory(f"topup(min={mn}): only {self.mc.nobjs} pages could be had")
        return None

    cdef str _eio_reason(self, int cap):
        if self.mc.objects == NULL and cap == 0:
            return "memory cache capacity 0 (-EIO)"
        if self.mc.objects == NULL:
            return "init_value with zero-fill (gfp_zero): mutually exclusive (-EIO)"
        return f"capacity {cap} differs from the first top-up's {self.mc.capacity} (-EIO)"

    def alloc(self):
        """Pop the most recently cached page (LIFO); an empty cache warns and allocates."""
        cdef int64_t idx
        with nogil:
            self._lock()
            idx = mmu_memory_cache_alloc(&self.mc)
            self._unlock()
        if idx < 0:
            raise OutOfMemory("memory cache empty and page pool exhausted")
        return idx

    def free(self):
        """Return every cached page to the pool; objects, capacity and nobjs reset."""
        with nogil:
            self._lock()
            mmu_free_memory_cache(&self.mc)
            self._unlock()

    def __repr__(self):
        return (f"MemoryCache(init_value={self.mc.init_value:#x}, gfp_zero={self.gfp_zero}, "
                f"capacity={self.mc.capacity}, nobjs={self.mc.nobjs})")


cdef inline void _stats_add(mmu_stats_t* acc, const mmu_stats_t* s) noexcept nogil:
    cdef int i
    for i in range(6):
        acc.faults[i] += s.faults[i]
        acc.pt_pages[i] += s.pt_pages[i]
    for i in range(4):
        acc.pages[i] += s.pages[i]
    acc.tables_allocated += s.tables_allocated
    acc.tables_freed += s.tables_freed
    acc.tlb_flushes += s.tlb_flushes
    acc.tlb_flushes_ranged += s.tlb_flushes_ranged
    acc.cas_failures += s.cas_failures
    acc.warnings += s.warnings
    acc.spte_changes += s.spte_changes
    acc.nx_lpage_splits += s.nx_lpage_splits
    acc.mmio_sptes_created += s.mmio_sptes_created


@cython.final
cdef class Vm:
    """A VM's TDP MMU: one root, memslots, vCPUs, zaps, stats and an audit.

    >>> import spte_fast as sf
    >>> vm = sf.Vm(sf.SpteLayout.ept(), root_level=4, max_pt_pages=64)
    >>> vm.add_memslot(0, 1024, pfn=0x100000)
    0
    >>> vm.vcpu().fault(5, write=True)
    <PF.FIXED: 4>
    """
    cdef mmu_t mmu
    cdef mmu_stats_t st             # the VM's own operations (zaps, memslot changes)
    cdef mem_cache_t root_mc        # initialises the root like a vCPU cache would
    cdef readonly SpteLayout layout
    cdef readonly PagePool pool
    cdef list _slots                # [(id, base_gfn, npages, pfn, readonly, flags ndarray)]
    cdef object _retired_pfns       # sorted uint64: host pages of deleted slots with flags set
    cdef object _retired_bits       # uint8: their accessed/dirty flags (host pages keep them)
    cdef object _slots_lock         # slots_lock: one memslot change at a time
    cdef list _vcpus
    cdef int _next_slot_id

    def __cinit__(self, SpteLayout layout not None, root_level=4, max_level=PG_LEVEL_1G,
                  max_pt_pages=1 << 20, nx_huge_pages=False, poison=None):
        cdef int rl = <int>_as_int(root_level, "root_level", 4, 5)
        cdef int ml = <int>_as_int(max_level, "max_level", 1, 3)
        cdef int64_t cap = _as_int(max_pt_pages, "max_pt_pages", 2, 1 << 32)
        cdef int64_t root
        memset(&self.mmu, 0, sizeof(mmu_t))
        memset(&self.st, 0, sizeof(mmu_stats_t))
        self.st.slot = -1               # the VM's own operations hold mmu_lock for write
        memset(&self.root_mc, 0, sizeof(mem_cache_t))
        spte_rwlock_init(&self.mmu.mmu_lock)
        self.mmu.epoch = 1
        pthread_mutex_init(&self.root_mc.lock, NULL)
        self.layout = layout
        self.pool = PagePool(cap, poison=poison)
        self._slots = []
        self._retired_pfns = np.empty(0, dtype=np.uint64)
        self._retired_bits = np.empty(0, dtype=np.uint8)
        self._slots_lock = _threading.Lock()
        self._vcpus = []
        self.mmu.m = layout.m
        self.mmu.pool = &self.pool.p
        self.mmu.pages = self.pool.p.pages
        self.mmu.root_level = rl
        self.mmu.max_level = ml
        self.mmu.nx_huge_pages = bool(nx_huge_pages)
        self.mmu.gfn_limit = (<u64>1) << (9 * rl)
        self.mmu.parked = <int64_t*>malloc(cap * sizeof(int64_t))
        self.mmu.parked_epoch = <u64*>malloc(cap * sizeof(u64))
        if self.mmu.parked == NULL or self.mmu.parked_epoch == NULL:
            raise MemoryError()
        self.root_mc.pool = &self.pool.p
        self.root_mc.init_value = layout.m.shadow_nonpresent_value
        self.root_mc.gfp_zero = layout.m.shadow_nonpresent_value == 0
        root = mc_alloc_obj(&self.root_mc)
        if root < 0:
            raise OutOfMemory("no page for the root")
        self.pool.p.state[root] = PAGE_TABLE
        self.pool.p.clean[root] = 0
        self.pool.p.level[root] = <int8_t>rl
        self.pool.p.gfn[root] = 0
        self.mmu.root = root
        self.st.tables_allocated += 1
        self.st.pt_pages[rl] += 1

    def __dealloc__(self):
        PyMem_RawFree(self.mmu.slots)
        free(self.mmu.parked)
        free(self.mmu.parked_epoch)
        pthread_rwlock_destroy(&self.mmu.mmu_lock)
        pthread_mutex_destroy(&self.root_mc.lock)

    # -- locking: always taken with the GIL released (no deadlock with fault threads) ---
    cdef inline void _wrlock(self) noexcept nogil:
        mmu_write_lock(&self.mmu)

    cdef inline void _unlock(self) noexcept nogil:
        pthread_rwlock_unlock(&self.mmu.mmu_lock)

    cdef int _raise_fatal(self) except -1:
        if self.mmu.fatal:
            raise AuditError(
                f"BUG: present leaf replaced by a present leaf with another pfn at gfn "
                f"{self.mmu.fatal_gfn:#x} level {self.mmu.fatal_level}: "
                f"{self.mmu.fatal_old:#x} -> {self.mmu.fatal_new:#x}",
                invariant="present-leaf-pfn-change")
        return 0

    # -- attributes ------------------------------------------------------------------
    @property
    def root_level(self): return self.mmu.root_level
    @property
    def max_level(self): return self.mmu.max_level
    @property
    def nx_huge_pages(self): return bool(self.mmu.nx_huge_pages)
    @property
    def root(self): return self.mmu.root
    @property
    def mmio_generation(self): return self.mmu.mmio_gen
    @property
    def gfn_limit(self): return self.mmu.gfn_limit

    @property
    def memslots(self):
        return [s[:5] for s in self._slots]

    cdef gfn_t _gfn(self, v, str name) except? 0xFFFFFFFFFFFFFFFF:
        cdef u64 g = _as_u64(v, name)
        if g >= self.mmu.gfn_limit:
            raise ValueError(f"{name} {g:#x} is beyond the {self.mmu.root_level}-level address "
                             f"width (gfn < {self.mmu.gfn_limit:#x})")
        return g

    # -- memslots ----------------------------------------------------------------------
    cdef void _sync_slots(self):
        """Rebuild the C slot array from self._slots (caller holds mmu_lock)."""
        cdef int n = len(self._slots)
        cdef memslot_t* arr = <memslot_t*>PyMem_RawRealloc(self.mmu.slots, max(n, 1) * sizeof(memslot_t))
        cdef int i
        cdef cnp.ndarray flags
        if arr == NULL:
            raise MemoryError()
        for i in range(n):
            sid, base, npages, pfn, ro, flags = self._slots[i]
            arr[i].id = sid
            arr[i].base_gfn = base
            arr[i].npages = npages
            arr[i].pfn = pfn
            arr[i].readonly = ro
            arr[i].host_flags = <uint8_t*>cnp.PyArray_DATA(flags)
        self.mmu.slots = arr
        self.mmu.nslots = n

    cdef void _bump_generation(self) noexcept nogil:
        self.mmu.mmio_gen = (self.mmu.mmio_gen + 1) & MMIO_SPTE_GEN_MASK
        if self.mmu.mmio_gen == 0:
            # Wrapped: an old MMIO SPTE could look current again (kvm_mmu_invalidate_mmio_sptes).
            if _zap_root(&self.mmu, &self.st):
                self.st.tlb_flushes += 1

    def add_memslot(self, base_gfn, npages, pfn, readonly=False):
        """Map gfns [base_gfn, base_gfn + npages) to host pfns from ``pfn``. Returns the slot id."""
        cdef gfn_t base = self._gfn(base_gfn, "base_gfn")
        cdef u64 n = _as_u64(npages, "npages")
        cdef u64 p = _as_u64(pfn, "pfn")
        with self._slots_lock:          # KVM's slots_lock: the checks below stay true
            return self._add_memslot(base, n, p, bool(readonly))

    cdef object _add_memslot(self, gfn_t base, u64 n, u64 p, bint readonly):
        if n == 0:
            raise ValueError("npages must be >= 1")
        if n > self.mmu.gfn_limit - base:
            raise ValueError(f"slot [{base:#x}, {base + n:#x}) is beyond the address width "
                             f"(gfn < {self.mmu.gfn_limit:#x})")
        if p >= PFN_LIMIT or n > PFN_LIMIT - p:
            raise ValueError(f"pfns [{p:#x}, {p + n:#x}) do not fit the PFN field (< 1 << 40)")
        for s in self._slots:
            if base < s[1] + s[2] and s[1] < base + n:
                raise ValueError(f"gfns [{base:#x}, {base + n:#x}) overlap slot {s[0]}")
            if p < s[3] + s[2] and s[3] < p + n:
                raise ValueError(f"pfns [{p:#x}, {p + n:#x}) overlap those of slot {s[0]}")
        flags = np.zeros(n, dtype=np.uint8)
        # Accessed/dirty are flags of host pages (struct page in KVM), not of memslots: a
        # page that a deleted slot marked keeps its flags when a new slot maps it again.
        # The new slot owns them from now on (until it is deleted in turn).
        rp = self._retired_pfns
        lo, hi = np.searchsorted(rp, np.array([p, p + n], dtype=np.uint64))
        if lo < hi:
            flags[(rp[lo:hi] - np.uint64(p)).astype(np.intp)] = self._retired_bits[lo:hi]
            self._retired_pfns = np.concatenate((rp[:lo], rp[hi:]))
            self._retired_bits = np.concatenate((self._retired_bits[:lo], self._retired_bits[hi:]))
        sid = self._next_slot_id
        with nogil:
            self._wrlock()
        try:
            self._slots.append((sid, base, n, p, readonly, flags))
            self._slots.sort(key=lambda s: s[1])
            self._sync_slots()
            self._next_slot_id += 1
            self._bump_generation()
        finally:
            self._unlock()
        return sid

    def delete_memslot(self, slot_id):
        """Zap the slot's range, remove it, bump the MMIO generation."""
        cdef int64_t sid_wanted = _as_int(slot_id, "slot_id", INT64_MIN, INT64_MAX)
        with self._slots_lock:
            self._delete_memslot(sid_wanted)

    cdef int _delete_memslot(self, int64_t sid_wanted) except -1:
        cdef int i
        cdef bint flush
        for i in range(len(self._slots)):
            if self._slots[i][0] == sid_wanted:
                break
        else:
            raise ValueError(f"no memslot with id {sid_wanted!r}")
        sid, base, n, p, ro, flags = self._slots[i]
        cdef gfn_t start = base
        cdef gfn_t end = base + n
        with nogil:
            self._wrlock()
            flush = _zap_leafs(&self.mmu, &self.st, start, end)
            if flush:
                self.st.tlb_flushes_ranged += 1
        try:
            del self._slots[i]
            # Keep the flags that are set (no live or retired entry covers these pfns).
            marked = np.flatnonzero(flags)
            at = np.searchsorted(self._retired_pfns, np.uint64(p))
            self._retired_pfns = np.concatenate((self._retired_pfns[:at],
                                                 marked.astype(np.uint64) + np.uint64(p),
                                                 self._retired_pfns[at:]))
            self._retired_bits = np.concatenate((self._retired_bits[:at], flags[marked],
                                                 self._retired_bits[at:]))
            self._sync_slots()
            with nogil:
                self._bump_generation()
        finally:
            self._unlock()
        self._raise_fatal()

    # -- vCPUs -------------------------------------------------------------------------
    def vcpu(self):
        """A new vCPU with its own shadow-page cache (init_value = the non-present value).

        Each vCPU may fault from its own thread: faults run with the GIL released and
        mmu_lock held for read, as KVM's TDP MMU faults do.
        """
        return Vcpu(self)

    cdef int _register_vcpu(self, Vcpu v) except -1:
        """Give ``v`` a reader-epoch slot and count it in the VM's stats."""
        if self.mmu.nvcpus >= MAX_VCPUS:
            raise ValueError(f"at most {MAX_VCPUS} vCPUs per Vm")
        with nogil:
            self._wrlock()
            v.slot = self.mmu.nvcpus
            v.st.slot = v.slot
            self.mmu.reader_epoch[v.slot] = 0
            self.mmu.nvcpus += 1
            self._unlock()
        self._vcpus.append(v)
        return 0

    @property
    def vcpus(self):
        return tuple(self._vcpus)

    # -- inspection --------------------------------------------------------------------
    def walk(self, gfn):
        """[(level, spte), ...] from the root down to the first entry that is not a
        present non-leaf."""
        cdef gfn_t g = self._gfn(gfn, "gfn")
        cdef tdp_iter_t it
        cdef u64 out[5]
        cdef int n = 0
        with nogil:
            self._wrlock()
            tdp_iter_start(&it, self.mmu.pages, self.mmu.root, self.mmu.root_level, 1, g)
            out[n] = it.old_spte
            n += 1
            while _iter_at_nonleaf(&it):
                _iter_descend(&it)
                out[n] = it.old_spte
                n += 1
            self._unlock()
        return [(self.mmu.root_level - i, out[i]) for i in range(n)]

    def lookup(self, gfn):
        """(spte, level) of the present leaf that maps gfn, or None."""
        path = self.walk(gfn)
        level, spte = path[len(path) - 1]
        if is_shadow_present_pte(spte) and is_last_spte(spte, level):
            return (spte, level)
        return None

    def host_page_accessed(self, pfn):
        return bool(self._host_flags(pfn) & HOST_ACCESSED)

    def host_page_dirty(self, pfn):
        return bool(self._host_flags(pfn) & HOST_DIRTY)

    cdef int _host_flags(self, pfn) except -1:
        cdef u64 p = _as_u64(pfn, "pfn")
        for s in self._slots:
            if s[3] <= p < s[3] + s[2]:
                return s[5][p - s[3]]
        raise ValueError(f"no memslot backs pfn {p:#x}")

    @property
    def stats(self):
        cdef mmu_stats_t acc
        cdef mem_cache_t* mc
        cdef Vcpu v
        cdef int64_t fills = self.root_mc.fills
        cdef int64_t zinit = self.root_mc.zero_inits
        cdef int64_t bytes_ = self.root_mc.init_bytes_written
        cdef int64_t warns = self.root_mc.warnings
        memset(&acc, 0, sizeof(acc))
        with nogil:
            self._wrlock()          # a consistent snapshot of every vCPU's counters
        try:
            _stats_add(&acc, &self.st)
            for v in self._vcpus:
                _stats_add(&acc, &v.st)
                mc = &v.cache.mc
                fills += mc.fills
                zinit += mc.zero_inits
                bytes_ += mc.init_bytes_written
                warns += mc.warnings
        finally:
            self._unlock()
        d = {
            "faults_fixed": acc.faults[RET_PF_FIXED],
            "faults_spurious": acc.faults[RET_PF_SPURIOUS],
            "faults_retry": acc.faults[RET_PF_RETRY],
            "faults_emulate": acc.faults[RET_PF_EMULATE],
            "pages_4k": acc.pages[1], "pages_2m": acc.pages[2], "pages_1g": acc.pages[3],
            "pt_pages": sum(acc.pt_pages[i] for i in range(1, 6)),
        }
        for i in range(1, 6):
            d[f"pt_pages_l{i}"] = acc.pt_pages[i]
        d.update({
            "tables_allocated": acc.tables_allocated, "tables_freed": acc.tables_freed,
            "cache_fills": fills, "cache_zero_inits": zinit, "init_bytes_written": bytes_,
            "tlb_flushes": acc.tlb_flushes, "tlb_flushes_ranged": acc.tlb_flushes_ranged,
            "cas_failures": acc.cas_failures, "warnings": acc.warnings + warns,
            "spte_changes": acc.spte_changes, "nx_lpage_splits": acc.nx_lpage_splits,
            "mmio_sptes_created": acc.mmio_sptes_created,
        })
        return d

    # -- zaps (exclusive unless noted) ---------------------------------------------------
    def zap_gfn_range(self, start, end):
        """Zap present leaves intersecting [start, end); True if a TLB flush was needed
        (the VM then performs one ranged flush)."""
        cdef gfn_t s = _as_u64(start, "start")
        cdef gfn_t e = _as_u64(end, "end")
        cdef bint flush
        if e > self.mmu.gfn_limit:
            raise ValueError(f"end {e:#x} is beyond the address width ({self.mmu.gfn_limit:#x})")
        if s > e:
            raise ValueError(f"start {s:#x} > end {e:#x}")
        with nogil:
            self._wrlock()
            flush = _zap_leafs(&self.mmu, &self.st, s, e) if s < e else False
            if flush:
                self.st.tlb_flushes_ranged += 1
            self._unlock()
        self._raise_fatal()
        return bool(flush)

    def zap_all(self):
        """Zap everything (4K, 2M, 1G, root-level passes); only the root stays."""
        cdef bint zapped
        with nogil:
            self._wrlock()
            zapped = _zap_root(&self.mmu, &self.st)
            if zapped:
                self.st.tlb_flushes += 1
            self._unlock()
        self._raise_fatal()
        return bool(zapped)

    def zap_sp(self, gfn, level):
        """Zap the level-``level`` table on gfn's path (its parent entry → non-present)."""
        cdef gfn_t g = self._gfn(gfn, "gfn")
        cdef int lvl = <int>_as_int(level, "level", 1, self.mmu.root_level - 1)
        cdef bint done
        with nogil:
            self._wrlock()
            done = _zap_sp(&self.mmu, &self.st, g, lvl)
            if done:
                self.st.tlb_flushes += 1
            self._unlock()
        self._raise_fatal()
        return bool(done)

    def zap_spte_atomic(self, gfn, level):
        """Shared-mode atomic zap of the present entry at ``level`` on gfn's path."""
        cdef gfn_t g = self._gfn(gfn, "gfn")
        cdef int lvl = <int>_as_int(level, "level", 1, self.mmu.root_level)
        cdef bint done
        with nogil:
            self._wrlock()
            done = _zap_spte_atomic_at(&self.mmu, &self.st, g, lvl)
            self._unlock()
        self._raise_fatal()
        return bool(done)

    def inject_cas_failures(self, n):
        """Test aid: the next ``n`` compare-and-exchanges of the engine lose their race."""
        cdef int64_t k = _as_int(n, "n", 0, 1 << 62)
        with nogil:
            self._wrlock()
            self.mmu.inject_cas_fail = k
            self._unlock()

    # -- audit -------------------------------------------------------------------------
    def audit(self):
        """Check the invariants (spec §6 items 9-13, 16, 22 and the accounting).

        Raises AuditError naming the invariant and the entry (gfn, level, value).
        """
        cdef Vcpu v
        cdef list locked = []
        try:
            # The lock order of the fault path: every vCPU's lock, mmu_lock, the pool's.
            for v in self._vcpus:
                with nogil:
                    pthread_mutex_lock(&v.cache.mc.lock)
                locked.append(v)
            with nogil:
                self._wrlock()
            try:
                with nogil:
                    pthread_mutex_lock(&self.pool.p.lock)
                try:
                    self._audit()
                finally:
                    pthread_mutex_unlock(&self.pool.p.lock)
            finally:
                self._unlock()
        finally:
            for v in locked:
                pthread_mutex_unlock(&v.cache.mc.lock)

    def _fail(self, invariant, what, gfn=None, level=None, spte=None, entry=True):
        if entry:
            what = f"{what} (gfn {gfn:#x}, level {level}, spte {spte:#018x})"
        raise AuditError(f"audit: {invariant}: {what}", invariant=invariant)

    cdef _audit(self):
        cdef pool_t* p = &self.pool.p
        cdef int64_t cap = p.capacity
        cdef cnp.ndarray seen_arr = np.zeros(cap, dtype=np.uint8)
        cdef uint8_t* seen = <uint8_t*>cnp.PyArray_DATA(seen_arr)
        cdef int64_t leaves[4]
        cdef int64_t tables[6]
        cdef mmu_stats_t acc
        cdef int64_t i, idx, n_free = 0, n_cached = 0, n_table = 0
        cdef Vcpu v
        self._raise_fatal()
        memset(leaves, 0, sizeof(leaves))
        memset(tables, 0, sizeof(tables))
        memset(&acc, 0, sizeof(acc))
        _stats_add(&acc, &self.st)
        for v in self._vcpus:
            _stats_add(&acc, &v.st)
        self._audit_table(self.mmu.root, self.mmu.root_level, 0, seen, leaves, tables)
        for i in range(1, 4):
            if leaves[i] != acc.pages[i]:
                self._fail("page-stats", f"{leaves[i]} present leaves at level {i}, "
                           f"stats say {acc.pages[i]}", entry=False)
        for i in range(1, 6):
            if tables[i] != acc.pt_pages[i]:
                self._fail("pt-pages", f"{tables[i]} linked tables at level {i}, "
                           f"stats say {acc.pt_pages[i]}", entry=False)
        if acc.tables_allocated - acc.tables_freed != sum(tables[i] for i in range(1, 6)):
            self._fail("table-accounting", f"allocated {acc.tables_allocated} - freed "
                       f"{acc.tables_freed} != {sum(tables[i] for i in range(1, 6))} linked",
                       entry=False)
        # Pool: every page exactly one of free, cached (one vCPU cache), linked once.
        for i in range(cap):
            if p.state[i] == PAGE_TABLE and not seen[i]:
                self._fail("pool-accounting", f"page {i} is a table but not linked", entry=False)
        for i in range(p.free_top):
            idx = p.free_stack[i]
            if p.state[idx] != PAGE_FREE or seen[idx] & 2:
                self._fail("pool-accounting", f"free-list page {idx} is not free or listed twice",
                           entry=False)
            seen[idx] |= 2
        for i in range(p.next_fresh, cap):
            if p.state[i] != PAGE_FREE:
                self._fail("pool-accounting", f"never-used page {i} is not free", entry=False)
        n_free = p.free_top + cap - p.next_fresh
        for v in self._vcpus:
            for i in range(v.cache.mc.nobjs):
                idx = v.cache.mc.objects[i]
                if p.state[idx] != PAGE_CACHED or seen[idx] & 4:
                    self._fail("pool-accounting", f"cached page {idx} is not in state cached "
                               "or is cached twice", entry=False)
                seen[idx] |= 4
                n_cached += 1
        for i in range(self.mmu.nparked):
            if p.state[self.mmu.parked[i]] != PAGE_PARKED:
                self._fail("pool-accounting", f"parked table {self.mmu.parked[i]} is not in "
                           "state parked", entry=False)
        for i in range(cap):
            if p.state[i] == PAGE_FREE:
                n_free -= 1
            elif p.state[i] == PAGE_TABLE:
                n_table += 1
            elif p.state[i] == PAGE_RAW:
                self._fail("pool-accounting", f"page {i} was handed out by alloc(): neither "
                           "free, in a vCPU cache nor linked", entry=False)
            elif p.state[i] == PAGE_CACHED and not seen[i] & 4:
                self._fail("pool-accounting", f"page {i} is held by a memory cache that is "
                           "not a vCPU's", entry=False)
        if n_free != 0:
            self._fail("pool-accounting", "free list and page states disagree", entry=False)

    cdef int _audit_table(self, int64_t t, int level, gfn_t base, uint8_t* seen,
                          int64_t* leaves, int64_t* tables) except -1:
        cdef pool_t* p = &self.pool.p
        cdef const spte_masks_t* m = &self.mmu.m
        cdef tdp_ptep_t table = self.mmu.pages + t * SPTE_ENT_PER_PAGE
        cdef u64 e, child, expect
        cdef gfn_t g
        cdef int i
        cdef memslot_t* slot
        cdef bint ve = m.ept and (m.shadow_nonpresent_value & VMX_EPT_SUPPRESS_VE_BIT) != 0
        if seen[t] & 1:
            self._fail("linked-once", f"table {t} is linked twice", base, level, 0)
        seen[t] |= 1
        if p.state[t] != PAGE_TABLE or p.level[t] != level or p.gfn[t] != base:
            self._fail("table-metadata", f"table {t}: state {p.state[t]}, level {p.level[t]}, "
                       f"gfn {p.gfn[t]:#x}; expected a level-{level} table at", base, level, 0)
        tables[level] += 1
        for i in range(SPTE_ENT_PER_PAGE):
            e = table[i]
            g = base + <u64>i * pages_per_level(level)
            if e == m.shadow_nonpresent_value:
                continue
            if is_frozen_spte(m, e):
                self._fail("no-frozen-at-rest", "frozen SPTE left in a linked table", g, level, e)
            if is_mmio_spte(m, e):
                if level != 1:
                    self._fail("mmio-level", "MMIO SPTE above 4K", g, level, e)
                if get_mmio_spte_gfn(m, e) != (g & ((SPTE_BASE_ADDR_MASK & ~m.shadow_mmio_mask) >> 12)):
                    self._fail("mmio-gfn", "MMIO SPTE encodes another gfn", g, level, e)
                continue
            if not is_shadow_present_pte(e):
                self._fail("nonpresent-value", "non-present entry that is not the layout's "
                           f"non-present value {m.shadow_nonpresent_value:#x}", g, level, e)
            if ve and not (e & VMX_EPT_SUPPRESS_VE_BIT):
                self._fail("ept-suppress-ve", "present EPT SPTE without bit 63", g, level, e)
            if not is_last_spte(e, level):
                child = spte_to_pfn(e)
                expect = make_nonleaf_spte(m, child, m.ad_disabled)
                if e != expect:
                    self._fail("nonleaf-encoding", f"expected {expect:#x}", g, level, e)
                if child >= <u64>p.capacity:
                    self._fail("nonleaf-target", "child table outside the pool", g, level, e)
                self._audit_table(<int64_t>child, level - 1, g, seen, leaves, tables)
                continue
            if level > 3:
                self._fail("leaf-level", "leaf above 1G", g, level, e)
            if not _writable_invariants_ok(m, e):
                self._fail("writable-state", "W without MMU-writable, or MMU-writable without "
                           "host-writable", g, level, e)
            slot = _gfn_to_memslot(&self.mmu, g, NULL)
            if slot == NULL or g + pages_per_level(level) > slot.base_gfn + slot.npages:
                self._fail("leaf-in-slot", "leaf outside every memslot", g, level, e)
            if spte_to_pfn(e) != slot.pfn + (g - slot.base_gfn):
                self._fail("leaf-pfn", f"pfn should be {slot.pfn + (g - slot.base_gfn):#x}",
                           g, level, e)
            if slot.readonly and (e & (PT_WRITABLE_MASK | m.shadow_host_writable_mask)):
                self._fail("readonly-slot", "writable leaf in a read-only slot", g, level, e)
            leaves[level] += 1
        return 0


@cython.final
cdef class Vcpu:
    """A vCPU: its own shadow-page cache (topped up before every fault) and counters."""
    cdef readonly Vm vm
    cdef readonly MemoryCache cache
    cdef mmu_stats_t st
    cdef int slot                   # index of this vCPU's reader epoch in the mmu

    def __cinit__(self, Vm vm not None):
        self.vm = vm
        self.cache = MemoryCache(vm.pool, init_value=vm.layout.m.shadow_nonpresent_value,
                                 capacity=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE)
        memset(&self.st, 0, sizeof(mmu_stats_t))
        self.st.slot = -1
        vm._register_vcpu(self)         # Vcpu(vm) and vm.vcpu() are the same thing

    def fault(self, gfn, write=False, exec=False):
        """One guest page fault → PF.FIXED / SPURIOUS / RETRY / EMULATE."""
        cdef gfn_t g = self.vm._gfn(gfn, "gfn")
        cdef bint w = bool(write)
        cdef bint x = bool(exec)
        cdef int r
        cdef vcpu_ref_t ref
        vcpu_ref(self, &ref)
        with nogil:
            r = vcpu_fault(&ref, g, w, x)
        self.vm._raise_fatal()
        _check_rc(r, f"fault(gfn={g:#x})")
        return PF(r)

    def fault_batch(self, gfns, access=None, out=None):
        """Fault every gfn in order, in C with the GIL released.

        ``gfns``: 1-D integer array; ``access``: None or 1-D integers (bit 0 write,
        bit 1 exec); ``out``: None or a writable int8 array receiving each final PF.
        RETRY results are faulted again (counted in "retry").  Returns the counts.
        """
        cdef cnp.ndarray g_arr = _gfn_array(gfns, "gfns", self.vm.mmu.gfn_limit)
        cdef Py_ssize_t n = g_arr.shape[0]
        cdef cnp.ndarray a_arr = None
        cdef cnp.ndarray o_arr = None
        cdef const uint8_t* a = NULL
        cdef int8_t* o = NULL
        if access is not None:
            a_arr = _access_array(access, n)
            a = <const uint8_t*>cnp.PyArray_DATA(a_arr)
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError("out must be a numpy.ndarray of int8")
            if out.dtype != np.int8:
                raise TypeError(f"out must have dtype int8, not {out.dtype}")
            if out.ndim != 1 or out.shape[0] != n:
                raise ValueError(f"out must have shape ({n},), not {out.shape}")
            if not out.flags.writeable:
                raise ValueError("out is read-only")
            # A strided view is filled through a contiguous buffer, copied back below.
            o_arr = out if out.flags.c_contiguous else np.empty(n, dtype=np.int8)
            o = <int8_t*>cnp.PyArray_DATA(o_arr)
        cdef const gfn_t* g = <const gfn_t*>cnp.PyArray_DATA(g_arr)
        cdef int64_t counts[6]
        cdef Py_ssize_t done = 0
        cdef int rc = BATCH_INTERRUPTIBLE
        memset(counts, 0, sizeof(counts))
        try:
            while rc == BATCH_INTERRUPTIBLE:
                with nogil:
                    rc = _fault_batch(&self.vm.mmu, &self.st, &self.cache.mc, self.slot, g, a,
                                      o, n, counts, &done)
                if rc == BATCH_INTERRUPTIBLE:
                    PyErr_CheckSignals()    # KeyboardInterrupt propagates from here
        finally:
            if o_arr is not None and o_arr is not out:
                out[:done] = o_arr[:done]
        self.vm._raise_fatal()
        if rc == -SPTE_ENOMEM:
            raise OutOfMemory(f"fault_batch: page pool exhausted after {done} of {n} faults",
                              completed=done)
        if rc == -SPTE_EINVAL:
            raise ValueError(f"fault_batch: gfns[{done}] changed under the batch to a gfn "
                             f"beyond the address width; {done} faults were made")
        _check_rc(rc, f"fault_batch (after {done} of {n} faults)")
        return {"fixed": counts[RET_PF_FIXED], "spurious": counts[RET_PF_SPURIOUS],
                "retry": counts[RET_PF_RETRY], "emulate": counts[RET_PF_EMULATE]}

    @property
    def stats(self):
        """This vCPU's own counters (faults by result)."""
        return {"faults_fixed": self.st.faults[RET_PF_FIXED],
                "faults_spurious": self.st.faults[RET_PF_SPURIOUS],
                "faults_retry": self.st.faults[RET_PF_RETRY],
                "faults_emulate": self.st.faults[RET_PF_EMULATE]}


cdef inline void _prefetch_leaf(mmu_t* mmu, gfn_t gfn) noexcept nogil:
    """Walk the upper levels (cache-resident) and prefetch the 4K entry of a later fault,
    so the leaf-table misses of a batch overlap instead of queueing one by one."""
    cdef int level = mmu.root_level
    cdef tdp_ptep_t table = mmu.pages + mmu.root * SPTE_ENT_PER_PAGE
    cdef u64 spte
    while level > 1:
        spte = spte_read_once(table + spte_index(gfn, level))
        if not is_shadow_present_pte(spte) or is_large_pte(spte):
            return
        table = spte_to_child_pt(mmu, spte)
        level -= 1
    spte_prefetch(table + spte_index(gfn, 1))


cdef enum:
    PREFETCH_DISTANCE = 12


# -- embedding: a C-level handle on a Python Vcpu ------------------------------------------

cdef int vcpu_ref(object vcpu, vcpu_ref_t* out) except -1:
    """Fill ``out`` from a Python Vcpu (the embedding API; see README "Embedding")."""
    if not isinstance(vcpu, Vcpu):
        raise TypeError(f"expected a spte_fast.Vcpu, not {type(vcpu).__name__}")
    cdef Vcpu v = <Vcpu>vcpu
    out.mmu = &v.vm.mmu
    out.st = &v.st
    out.mc = &v.cache.mc
    out.slot = v.slot
    return 0


cdef int vcpu_fault(vcpu_ref_t* v, gfn_t gfn, bint write, bint exec) noexcept nogil:
    """One fault as Vcpu.fault does it, GIL-free: mmu_lock for read, the vCPU's cache,
    RET_PF_* or -SPTE_ENOMEM.  The gfn must be below the VM's address width."""
    cdef int r
    pthread_mutex_lock(&v.mc.lock)          # the vCPU's own lock (vcpu->mutex), then mmu_lock
    mmu_read_lock(v.mmu, v.slot)
    r = kvm_tdp_mmu_page_fault(v.mmu, v.st, v.mc, NULL, gfn, write, exec)
    mmu_read_unlock(v.mmu, v.slot)
    pthread_mutex_unlock(&v.mc.lock)
    _reclaim_parked(v.mmu)
    return r


cdef enum:
    FAULT_CHUNK = 1024          # faults per read-side section: zaps get in between chunks
    RETRY_CHECK = 1 << 16       # RETRYs of one fault before the caller checks for signals
    BATCH_INTERRUPTIBLE = 1     # _fault_batch stopped so that signals can be checked


cdef int _fault_batch(mmu_t* mmu, mmu_stats_t* st, mem_cache_t* mc, int slot,
                      const gfn_t* gfns, const uint8_t* access, int8_t* out, Py_ssize_t n,
                      int64_t* counts, Py_ssize_t* done) noexcept nogil:
    """The batch loop from ``done[0]`` on: fault, re-fault on RETRY.

    Returns 0 when every fault is done, -SPTE_ENOMEM / -SPTE_EIO from a fault,
    -SPTE_EINVAL for a gfn beyond the address width (the caller checked them, but
    another thread may rewrite the array meanwhile), or BATCH_INTERRUPTIBLE after
    RETRY_CHECK RETRYs of one fault: KVM re-enters the guest forever on RETRY, and
    the caller checks for signals (Ctrl-C) before it resumes the batch.

    mmu_lock is held for read FAULT_CHUNK faults at a time; between chunks the vCPU
    leaves the read side (the walk hint is dropped with it) and parked tables whose
    readers are gone return to the pool.
    """
    cdef Py_ssize_t i = done[0], chunk_end
    cdef int r = 0
    cdef int64_t retries
    cdef gfn_t gfn
    cdef bint w = False, x = False
    cdef walk_hint_t hint
    hint.last_slot = 0
    while i < n and r >= 0:
        chunk_end = min(n, i + FAULT_CHUNK)
        hint.valid = False
        # Lock order everywhere: the vCPU's cache lock (it stands for vcpu->mutex: one
        # thread at a time runs a vCPU), mmu_lock, the pool's lock.
        pthread_mutex_lock(&mc.lock)
        mmu_read_lock(mmu, slot)
        while i < chunk_end:
            # Prefetch only when a later fault enters another leaf table (random access).
            if i + PREFETCH_DISTANCE < n and \
                    (gfns[i + PREFETCH_DISTANCE] ^ gfns[i + PREFETCH_DISTANCE - 1]) >> 9:
                _prefetch_leaf(mmu, gfns[i + PREFETCH_DISTANCE])
            if access != NULL:
                w = access[i] & 1
                x = (access[i] >> 1) & 1
            gfn = spte_read_once(<const u64*>&gfns[i])   # one read: the array is the caller's
            if gfn >= mmu.gfn_limit:
                r = -SPTE_EINVAL
                break
            retries = 0
            while True:
                r = kvm_tdp_mmu_page_fault(mmu, st, mc, &hint, gfn, w, x)
                if r < 0:
                    break
                counts[r] += 1
                if r != RET_PF_RETRY:
                    break
                retries += 1
                if retries == RETRY_CHECK:
                    break
            if r < 0 or r == RET_PF_RETRY:
                break
            if out != NULL:
                out[i] = <int8_t>r
            i += 1
        mmu_read_unlock(mmu, slot)
        pthread_mutex_unlock(&mc.lock)
        _reclaim_parked(mmu)
        if r == RET_PF_RETRY:
            done[0] = i
            return BATCH_INTERRUPTIBLE
    done[0] = i
    return r if r < 0 else 0


cdef cnp.ndarray _int_array(object a, str name):
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray, not {type(a).__name__}")
    arr = a                             # untyped: the Python attributes below
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integers, not {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, not shape {arr.shape}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise ValueError(f"{name} holds negative values")
    return arr


cdef cnp.ndarray _gfn_array(object a, str name, u64 limit):
    arr = _int_array(a, name)
    if arr.size and int(arr.max()) >= limit:
        raise ValueError(f"{name} holds gfns beyond the address width (< {limit:#x})")
    return np.ascontiguousarray(arr, dtype=np.uint64)


cdef cnp.ndarray _access_array(object a, Py_ssize_t n):
    arr = _int_array(a, "access")
    if arr.shape[0] != n:
        raise ValueError(f"access has {arr.shape[0]} entries, gfns has {n}")
    if arr.size and int(arr.max()) > 3:
        raise ValueError("access values must be 0..3 (bit 0 write, bit 1 exec)")
    return np.ascontiguousarray(arr, dtype=np.uint8)


# =====================================================================================
# Bench hooks: C loops under nogil, so benchmarks can separate kernel cost from calls
# =====================================================================================
# Not part of the public API (leading underscore); bench/ uses them for baselines.

cdef extern from *:
    """
    /* C baselines for bench/: a plain (not vectorised) store loop and libc memset. */
    #if defined(__GNUC__) && !defined(__clang__)
    __attribute__((noinline, optimize("no-tree-vectorize")))
    #else
    __attribute__((noinline))
    #endif
    static void spte_bench_store_loop(uint64_t *p, uint64_t v, size_t n) {
        for (size_t i = 0; i < n; i++) p[i] = v;
        __asm__ volatile("" : : "r"(p) : "memory");
    }
    __attribute__((noinline)) static void spte_bench_memset(uint64_t *p, size_t n) {
        memset(p, 0, n * sizeof(uint64_t));
        __asm__ volatile("" : : "r"(p) : "memory");
    }
    """
    void spte_bench_store_loop(u64* p, u64 v, size_t n) noexcept nogil
    void spte_bench_memset(u64* p, size_t n) noexcept nogil


def _bench_fill_repeat(page, value, int64_t reps):
    """memset64 (the engine's fill) of one page, ``reps`` times (cache-hot)."""
    cdef cnp.ndarray arr = _pages_array(page, "page", True)
    cdef u64* p = <u64*>cnp.PyArray_DATA(arr)
    cdef u64 v = _as_u64(value, "value")
    cdef int64_t n = arr.size // SPTE_ENT_PER_PAGE
    cdef int64_t i
    with nogil:
        for i in range(reps):
            fill_pages_kernel(p, n, v)


def _bench_store_loop_repeat(page, value, int64_t reps):
    """C baseline: a plain 8-byte store loop over one page, ``reps`` times."""
    cdef cnp.ndarray arr = _pages_array(page, "page", True)
    cdef u64* p = <u64*>cnp.PyArray_DATA(arr)
    cdef u64 v = _as_u64(value, "value")
    cdef int64_t i
    with nogil:
        for i in range(reps):
            spte_bench_store_loop(p, v, arr.size)


def _bench_memset_repeat(page, int64_t reps):
    """C baseline: libc memset(0) of one page, ``reps`` times."""
    cdef cnp.ndarray arr = _pages_array(page, "page", True)
    cdef u64* p = <u64*>cnp.PyArray_DATA(arr)
    cdef int64_t i
    with nogil:
        for i in range(reps):
            spte_bench_memset(p, arr.size)


def _bench_cmpxchg(array, int64_t n):
    """n compare-and-exchanges (old → old ^ 1) at a large odd stride; returns a checksum."""
    cdef cnp.ndarray arr = _u64_array(array, "array", True)
    cdef u64* p = <u64*>cnp.PyArray_DATA(arr)
    cdef int64_t size = arr.size
    cdef int64_t i, j = 0
    cdef u64 old, acc = 0
    with nogil:
        for i in range(n):
            old = spte_read_once(p + j)
            spte_try_cmpxchg64(p + j, &old, old ^ 1)
            acc += old
            j = (j + <int64_t>2654435761) % size
    return acc


def _bench_plain_rmw(array, int64_t n):
    """Control for _bench_cmpxchg: the same loop with a plain read-modify-write."""
    cdef cnp.ndarray arr = _u64_array(array, "array", True)
    cdef u64* p = <u64*>cnp.PyArray_DATA(arr)
    cdef int64_t size = arr.size
    cdef int64_t i, j = 0
    cdef u64 old, acc = 0
    with nogil:
        for i in range(n):
            old = spte_read_once(p + j)
            spte_write_once(p + j, old ^ 1)
            acc += old
            j = (j + <int64_t>2654435761) % size
    return acc


def _bench_scan(pages, nonpresent_value, int64_t reps):
    """count_present over every page, ``reps`` times; returns the total."""
    cdef cnp.ndarray arr = _pages_array(pages, "pages", False)
    cdef const u64* p = <const u64*>cnp.PyArray_DATA(arr)
    cdef u64 v = _as_u64(nonpresent_value, "nonpresent_value")
    cdef int64_t n = arr.size // SPTE_ENT_PER_PAGE
    cdef int64_t i, r, total = 0
    with nogil:
        for r in range(reps):
            for i in range(n):
                total += count_present_kernel(p + i * SPTE_ENT_PER_PAGE, v)
    return total


@cython.final
cdef class _BareTdp:
    """Bench baseline: the physical limit the engine is measured against.

    A minimal 4-level radix tree of 512-entry tables in one arena: a walk, a
    bump-allocated table filled with the non-present value (memset64), linked
    and installed with compare-and-exchange — no slots, no stats, no bookkeeping.
    """
    cdef object _arr
    cdef u64* pages
    cdef int64_t capacity
    cdef int64_t next_free
    cdef u64 nonpresent

    def __cinit__(self, int64_t capacity, nonpresent=SHADOW_NONPRESENT_VALUE):
        self._arr = _page_arena(capacity, None)
        self.pages = <u64*>cnp.PyArray_DATA(<cnp.ndarray>self._arr)
        self.capacity = capacity
        self.nonpresent = _as_u64(nonpresent, "nonpresent")
        self.reset()

    def reset(self):
        """Forget every table (the arena's memory is reused: already faulted in)."""
        spte_memset64(self.pages, self.nonpresent, SPTE_ENT_PER_PAGE)
        self.next_free = 1

    def insert(self, gfns):
        """Install a 4K leaf for every gfn (gfn < 2**36); returns how many were new."""
        cdef cnp.ndarray g_arr = np.ascontiguousarray(gfns, dtype=np.uint64)
        cdef const u64* g = <const u64*>cnp.PyArray_DATA(g_arr)
        cdef Py_ssize_t n = g_arr.shape[0]
        cdef int64_t added = 0
        with nogil:
            added = self._insert(g, n)
        if added < 0:
            raise OutOfMemory("bare arena exhausted")
        return added

    cdef int64_t _insert(self, const u64* g, Py_ssize_t n) noexcept nogil:
        cdef Py_ssize_t i
        cdef int level
        cdef u64* table
        cdef u64* e
        cdef u64 old, nl
        cdef int64_t child, added = 0
        for i in range(n):
            table = self.pages
            for level in range(4, 1, -1):
                e = table + ((g[i] >> (9 * (level - 1))) & 511)
                old = spte_read_once(e)
                if not (old & SPTE_MMU_PRESENT_MASK):
                    if self.next_free >= self.capacity:
                        return -1
                    child = self.next_free
                    self.next_free += 1
                    spte_memset64(self.pages + child * SPTE_ENT_PER_PAGE, self.nonpresent,
                                  SPTE_ENT_PER_PAGE)
                    nl = self.nonpresent | SPTE_MMU_PRESENT_MASK | (<u64>child << 12) | 0x107
                    if spte_try_cmpxchg64(e, &old, nl):
                        old = nl
                table = self.pages + ((old & SPTE_BASE_ADDR_MASK) >> 12) * SPTE_ENT_PER_PAGE
            e = table + (g[i] & 511)
            old = self.nonpresent
            if spte_try_cmpxchg64(e, &old, self.nonpresent | SPTE_MMU_PRESENT_MASK |
                                  ((g[i] + 0x100000) << 12) | 0x377):
                added += 1
        return added

    def walk(self, gfns):
        """Walk to the leaf of every gfn; returns the sum of the leaves (a checksum)."""
        cdef cnp.ndarray g_arr = np.ascontiguousarray(gfns, dtype=np.uint64)
        cdef const u64* g = <const u64*>cnp.PyArray_DATA(g_arr)
        cdef Py_ssize_t n = g_arr.shape[0], i
        cdef int level
        cdef u64* table
        cdef u64 e, acc = 0
        with nogil:
            for i in range(n):
                table = self.pages
                for level in range(4, 0, -1):
                    e = spte_read_once(table + ((g[i] >> (9 * (level - 1))) & 511))
                    if level == 1 or not (e & SPTE_MMU_PRESENT_MASK):
                        break
                    table = self.pages + ((e & SPTE_BASE_ADDR_MASK) >> 12) * SPTE_ENT_PER_PAGE
                acc += e
        return acc
