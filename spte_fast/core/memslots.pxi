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


cdef inline kvm_memory_slot_t* kvm_vcpu_gfn_to_memslot(kvm_vcpu_t* vcpu, gfn_t gfn) noexcept nogil:
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


# -- dirty logging: the slot's bitmap (virt/kvm/kvm_main.c) --------------------------------

cdef inline bint kvm_slot_dirty_track_enabled(const kvm_memory_slot_t* s) noexcept nogil:
    """KVM_MEM_LOG_DIRTY_PAGES (no page-track-external users here)."""
    return s != NULL and (s.flags & KVM_MEM_LOG_DIRTY_PAGES) != 0


cdef inline u64 dirty_bitmap_words(u64 npages) noexcept nogil:
    """kvm_dirty_bitmap_bytes / 8: whole 64-page words."""
    return (npages + 63) >> 6


cdef inline void mark_page_dirty_in_slot(kvm_t* kvm, mmu_stats_t* st,
                                         kvm_memory_slot_t* s, gfn_t gfn) noexcept nogil:
    """mark_page_dirty_in_slot: set_bit_le in the slot's dirty bitmap (no dirty ring here);
    nothing for a slot without dirty logging."""
    cdef u64 rel
    if s == NULL or s.dirty_bitmap == NULL or not memslot_has_gfn(s, gfn):
        return
    rel = gfn - s.base_gfn
    u64_or_relaxed(&s.dirty_bitmap[rel >> 6], (<u64>1) << (rel & 63))
    st.dirty_pages_marked += 1


# -- host page flags as numpy views (for a memslot's delete) ------------------------------

cdef object _host_flags_array(uint8_t* flags, u64 npages):
    """A memslot's host page flags as a numpy view (no copy; valid while the slot's are)."""
    cdef cnp.npy_intp dims[1]
    dims[0] = <cnp.npy_intp>npages
    return cnp.PyArray_SimpleNewFromData(1, dims, cnp.NPY_UINT8, flags)


cdef inline u64 _touched_words(u64 npages) noexcept nogil:
    return (((npages - 1) >> HOST_FLAGS_CHUNK_SHIFT) >> 6) + 1


cdef object _touched_array(kvm_memory_slot_t* s):
    """The slot's host_flags_touched bitmap as a numpy uint64 view."""
    cdef cnp.npy_intp dims[1]
    dims[0] = <cnp.npy_intp>_touched_words(s.npages)
    return cnp.PyArray_SimpleNewFromData(1, dims, cnp.NPY_UINT64, s.host_flags_touched)


cdef object _set_host_flags_of_slot(kvm_memory_slot_t* s):
    """(page offsets, flags) of the slot's pages whose host flags are set, reading only the
    chunks marked touched: the cost follows what was touched, not the slot's size."""
    flags = _host_flags_array(s.host_flags, s.npages)
    bits = np.unpackbits(_touched_array(s).view(np.uint8), bitorder="little")
    offsets = [np.flatnonzero(flags[c << HOST_FLAGS_CHUNK_SHIFT:(c + 1) << HOST_FLAGS_CHUNK_SHIFT])
               + (c << HOST_FLAGS_CHUNK_SHIFT) for c in np.flatnonzero(bits).tolist()]
    marked = np.concatenate(offsets) if offsets else np.empty(0, dtype=np.intp)
    return marked, flags[marked]
