# cython: language_level=3, boundscheck=False, wraparound=False
"""A tiny extension that embeds spte_fast at the C level (compiled by tests/test_embedding.py).

Everything below the Python entry points runs with the GIL released and calls only what
``spte_fast/_core.pxd`` (and the ``spte.pxd`` it re-exports) declares: the inline SPTE
constructors and predicates, the ``fill_pages_kernel`` / ``count_present_kernel``
kernels, the fault path through a vCPU's ``kvm_vcpu_t``, mmu_lock, and the
``kvm_mmu_page`` of a table.

``fault_gfns`` takes a Python ``Vcpu``, gets its ``kvm_vcpu_t`` once (with the GIL), then
faults through ``vcpu_fault`` in a GIL-free loop; ``table_levels`` reads the cdef class
layout of a ``Vm`` directly.
"""
from libc.stdint cimport int64_t, uint8_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset

from spte_fast._core cimport (
    ACC_ALL, ACCESS_INTERRUPTED, NR_BATCH_COUNTS, RET_PF_RETRY, SPTE_ENT_PER_PAGE, Vm,
    count_present_kernel, fill_pages_kernel, gfn_t, hw_tlb_entry_t, is_last_spte,
    is_mmio_spte, is_shadow_present_pte, kvm_mmu_read_lock, kvm_mmu_read_unlock, kvm_t,
    kvm_vcpu_t, make_nonleaf_spte, make_spte, spte_index, spte_masks_t, spte_to_pfn, u64,
    vcpu_access, vcpu_fault, vcpu_handle, vcpu_tlb_fill,
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


cdef u64 leaf_of(kvm_t* kvm, int64_t root, gfn_t gfn) noexcept nogil:
    """The entry where a walk from `root` stops (the leaf, or a non-present/MMIO SPTE)."""
    cdef int level = kvm.root_level
    cdef u64* table = kvm.pool.pages + root * SPTE_ENT_PER_PAGE
    cdef u64 spte
    while True:
        spte = table[spte_index(gfn, level)]
        if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
            return spte
        table = kvm.pool.pages + spte_to_pfn(spte) * SPTE_ENT_PER_PAGE
        level -= 1


cdef int64_t valid_root(kvm_t* kvm) noexcept nogil:
    """The VM's valid root: the root on kvm.roots (tdp_mmu_roots) whose kvm_mmu_page is not
    role.invalid, or -1 before any vCPU has loaded one."""
    cdef int i
    for i in range(kvm.nr_roots):
        if not kvm.pool.sp[kvm.roots[i]].role_invalid:
            return kvm.roots[i]
    return -1


def table_levels(Vm vm, gfn):
    """(level, gfn) of the kvm_mmu_page of every table on gfn's path from the valid root,
    read from the Vm's cdef class layout: vm.kvm, its roots, its pool, and the pool's
    per-page kvm_mmu_page array.  [] while the VM has no valid root."""
    cdef kvm_t* kvm = &vm.kvm
    cdef int level = kvm.root_level
    cdef int64_t root = valid_root(kvm)
    cdef u64 idx
    cdef u64 spte
    out = []
    if root < 0:
        return out
    idx = <u64>root
    while True:
        out.append((kvm.pool.sp[idx].level, kvm.pool.sp[idx].gfn))
        spte = kvm.pool.pages[idx * SPTE_ENT_PER_PAGE + spte_index(gfn, level)]
        if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
            return out
        idx = spte_to_pfn(spte)
        level -= 1


def fault_gfns(vcpu, const u64[::1] gfns, const uint8_t[::1] access):
    """Fault every gfn (access bit 0 write, bit 1 exec) through a Python Vcpu's C handle;
    the loop runs without the GIL and without Python objects.

    Returns (counts by RET_PF_*, the entry each gfn's walk ends at afterwards, MMIO
    entries among those)."""
    cdef kvm_vcpu_t* v = vcpu_handle(vcpu)
    cdef Py_ssize_t i, n = gfns.shape[0]
    cdef int64_t counts[6]
    cdef int64_t mmio = 0
    cdef int r = 0
    cdef u64* leaves = <u64*>malloc(max(n, 1) * sizeof(u64))
    memset(counts, 0, sizeof(counts))
    try:
        with nogil:
            for i in range(n):
                while True:                     # a RETRY is faulted again, as fault_batch does
                    r = vcpu_fault(v, gfns[i], access[i] & 1, (access[i] >> 1) & 1)
                    if r < 0 or r != RET_PF_RETRY:
                        break
                if r < 0:
                    break
                counts[r] += 1
            if r >= 0:
                kvm_mmu_read_lock(v.kvm, v.vcpu_idx)
                for i in range(n):
                    leaves[i] = leaf_of(v.kvm, v.root, gfns[i])
                    mmio += is_mmio_spte(&v.kvm.m, leaves[i])
                kvm_mmu_read_unlock(v.kvm, v.vcpu_idx)
        if r < 0:
            raise MemoryError("the VM's page pool ran out")
        return [counts[k] for k in range(6)], [leaves[i] for i in range(n)], mmio
    finally:
        free(leaves)


def access_gfns(vcpu, const u64[::1] gfns, const uint8_t[::1] kind):
    """The hardware view from C: one vcpu_access per gfn (kind 0 read, 1 write, 2 fetch),
    without the GIL.  Returns the per-access codes (0: no exit, else the last exit's PF)."""
    cdef kvm_vcpu_t* v = vcpu_handle(vcpu)
    cdef Py_ssize_t i, n = gfns.shape[0]
    cdef int r = 0
    cdef int* codes = <int*>malloc(max(n, 1) * sizeof(int))
    try:
        with nogil:
            for i in range(n):
                while True:
                    r = vcpu_access(v, gfns[i], kind[i] == 1, kind[i] == 2)
                    if r != 1 << 8:             # re-executed 2**16 times: call again
                        break
                if r < 0:
                    break
                codes[i] = r
        if r < 0:
            raise MemoryError("the VM's page pool ran out")
        return [codes[i] for i in range(n)]
    finally:
        free(codes)


def tlb_fill_gfns(vcpu, const u64[::1] gfns, const uint8_t[::1] kind):
    """An emulator's TLB misses from C: one vcpu_tlb_fill per gfn (kind 0 read, 1 write,
    2 fetch), without the GIL.  Returns per gfn (code, level, host pfn, perms) and the
    summed access counts (NR_BATCH_COUNTS)."""
    cdef kvm_vcpu_t* v = vcpu_handle(vcpu)
    cdef Py_ssize_t i, n = gfns.shape[0]
    cdef int r = 0
    cdef int64_t counts[NR_BATCH_COUNTS]
    cdef hw_tlb_entry_t* e = <hw_tlb_entry_t*>malloc(max(n, 1) * sizeof(hw_tlb_entry_t))
    cdef int* codes = <int*>malloc(max(n, 1) * sizeof(int))
    memset(counts, 0, sizeof(counts))
    try:
        with nogil:
            for i in range(n):
                while True:
                    r = vcpu_tlb_fill(v, gfns[i], kind[i], counts, &e[i])
                    if r != ACCESS_INTERRUPTED:
                        break
                if r < 0:
                    break
                codes[i] = r
        if r < 0:
            raise MemoryError(f"vcpu_tlb_fill failed: {r}")
        return ([(codes[i], e[i].level, e[i].pfn if e[i].level else None, e[i].perms)
                 for i in range(n)], [counts[k] for k in range(NR_BATCH_COUNTS)])
    finally:
        free(e)
        free(codes)
