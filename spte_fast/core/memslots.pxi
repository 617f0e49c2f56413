# =====================================================================================
# core/memslots.pxi: memslot lookups and host page flags (≈ include/linux/kvm_host.h,
# virt/kvm/kvm_main.c)
# =====================================================================================
# kvm.slots is the active memslot set, sorted by base_gfn; kvm_main.pxi replaces it under
# mmu_lock for write.  Accessed/dirty are flags of host pages (struct page), which the
# slot backing a pfn keeps one byte each of; they only ever get set here.

cdef uint8_t* host_flags_alloc(u64 npages) noexcept nogil:
    """A slot's host page flags: address space only (MAP_NORESERVE, no huge pages), so a
    page of flags takes memory when a flag in it is first set, and a 2**35-page slot can
    exist at all.  NULL if the host refuses the mapping."""
    cdef void* p = mmap(NULL, <size_t>npages, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    if p == MAP_FAILED:
        return NULL
    madvise(p, <size_t>npages, MADV_NOHUGEPAGE)    # one touched byte = one 4 KiB page
    return <uint8_t*>p


cdef void host_flags_free(uint8_t* flags, u64 npages) noexcept nogil:
    if flags != NULL:
        munmap(flags, <size_t>npages)


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
    cdef u64 chunk
    if s != NULL:
        f = &s.host_flags[pfn - s.pfn]
        if not (f[0] & flag):          # flags only ever get set: skip the locked op
            u8_or_relaxed(f, flag)
            chunk = (pfn - s.pfn) >> HOST_FLAGS_CHUNK_SHIFT
            u64_or_relaxed(&s.host_flags_touched[chunk >> 6], (<u64>1) << (chunk & 63))


cdef inline void kvm_set_pfn_dirty(kvm_t* kvm, pfn_t pfn) noexcept nogil:
    _set_host_page_flag(kvm, pfn, HOST_DIRTY)


cdef inline void kvm_set_pfn_accessed(kvm_t* kvm, pfn_t pfn) noexcept nogil:
    _set_host_page_flag(kvm, pfn, HOST_ACCESSED)
