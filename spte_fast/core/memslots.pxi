# =====================================================================================
# core/memslots.pxi: memslot lookups and host page flags (≈ include/linux/kvm_host.h,
# virt/kvm/kvm_main.c)
# =====================================================================================
# kvm.slots is the active memslot set, sorted by base_gfn; kvm_main.pxi replaces it under
# mmu_lock for write.  Accessed/dirty are flags of host pages (struct page), which the
# slot backing a pfn keeps one byte each of; they only ever get set here.

cdef inline bint memslot_has_gfn(const kvm_memory_slot_t* s, gfn_t gfn) noexcept nogil:
    return gfn >= s.base_gfn and gfn - s.base_gfn < s.npages


cdef inline pfn_t gfn_to_pfn_memslot(const kvm_memory_slot_t* s, gfn_t gfn) noexcept nogil:
    return s.pfn + (gfn - s.base_gfn)


cdef kvm_memory_slot_t* search_memslots(kvm_t* kvm, gfn_t gfn) noexcept nogil:
    cdef int i
    for i in range(kvm.nslots):
        if memslot_has_gfn(&kvm.slots[i], gfn):
            return &kvm.slots[i]
    return NULL


cdef kvm_memory_slot_t* kvm_vcpu_gfn_to_memslot(kvm_vcpu_t* vcpu, gfn_t gfn) noexcept nogil:
    """The slot holding gfn, trying the vCPU's last-used slot first (vcpu->last_used_slot)."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef int i = vcpu.last_used_slot
    if i < kvm.nslots and memslot_has_gfn(&kvm.slots[i], gfn):
        return &kvm.slots[i]
    for i in range(kvm.nslots):
        if memslot_has_gfn(&kvm.slots[i], gfn):
            vcpu.last_used_slot = i
            return &kvm.slots[i]
    return NULL


cdef kvm_memory_slot_t* _memslot_for_pfn(kvm_t* kvm, pfn_t pfn) noexcept nogil:
    cdef int i
    cdef kvm_memory_slot_t* s
    for i in range(kvm.nslots):
        s = &kvm.slots[i]
        if pfn >= s.pfn and pfn - s.pfn < s.npages:
            return s
    return NULL


cdef inline void _set_host_page_flag(kvm_t* kvm, pfn_t pfn, uint8_t flag) noexcept nogil:
    cdef kvm_memory_slot_t* s = _memslot_for_pfn(kvm, pfn)
    cdef uint8_t* f
    if s != NULL:
        f = &s.host_flags[pfn - s.pfn]
        if not (f[0] & flag):          # flags only ever get set: skip the locked op
            u8_or_relaxed(f, flag)


cdef inline void kvm_set_pfn_dirty(kvm_t* kvm, pfn_t pfn) noexcept nogil:
    _set_host_page_flag(kvm, pfn, HOST_DIRTY)


cdef inline void kvm_set_pfn_accessed(kvm_t* kvm, pfn_t pfn) noexcept nogil:
    _set_host_page_flag(kvm, pfn, HOST_ACCESSED)
