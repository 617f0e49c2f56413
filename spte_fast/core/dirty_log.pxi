# =====================================================================================
# core/dirty_log.pxi: the dirty bitmap's ioctls (≈ virt/kvm/kvm_main.c
# kvm_get_dirty_log_protect / kvm_clear_dirty_log_protect, Linux 6.10)
# =====================================================================================
# Called with mmu_lock held for write after kvm_arch_sync_dirty_log (every vCPU's PML
# buffer flushed); the slot is dirty-logged.  Each harvested 64-page word is re-protected
# by kvm_arch_mmu_enable_log_dirty_pt_masked, and one memslot TLB flush follows if any word
# had a bit (kvm_flush_remote_tlbs_memslot: counted as a ranged flush).

cdef void dirty_bitmap_set_all(u64* bm, u64 npages) noexcept nogil:
    """KVM_DIRTY_LOG_INITIALLY_SET: every page of the slot dirty (bitmap_set)."""
    cdef u64 i
    for i in range(npages >> 6):
        bitmap_store_word(bm + i, 0xFFFFFFFFFFFFFFFF)
    if npages & 63:
        bitmap_store_word(bm + (npages >> 6), ((<u64>1) << (npages & 63)) - 1)


cdef void kvm_get_dirty_log_protect(kvm_t* kvm, mmu_stats_t* st, kvm_memory_slot_t* slot,
                                    u64* out) noexcept nogil:
    """KVM_GET_DIRTY_LOG into `out`: with manual protect a copy; else each non-zero word is
    exchanged for 0 and its pages re-protected."""
    cdef u64 words = dirty_bitmap_words(slot.npages), i, mask
    cdef bint flush = False
    if kvm.manual_dirty_log_protect:
        memcpy(out, slot.dirty_bitmap, words * sizeof(u64))
        return
    for i in range(words):
        if u64_load_seq_cst(slot.dirty_bitmap + i) == 0:
            continue
        flush = True
        mask = bitmap_xchg_word(slot.dirty_bitmap + i, 0)
        bitmap_store_word(out + i, mask)
        kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, st, slot, i * 64, mask)
    if flush:
        st.tlb_flushes_ranged += 1


cdef void kvm_clear_dirty_log_protect(kvm_t* kvm, mmu_stats_t* st, kvm_memory_slot_t* slot,
                                      u64 first_page, u64 nwords,
                                      const u64* user) noexcept nogil:
    """KVM_CLEAR_DIRTY_LOG (arguments checked by the caller): of the bits userspace set,
    those still set in the log are cleared (fetch_andnot) and their pages re-protected."""
    cdef u64 k, mask, offset = first_page
    cdef u64* p = slot.dirty_bitmap + (first_page >> 6)
    cdef bint flush = False
    for k in range(nwords):
        mask = user[k]
        if mask:
            mask &= bitmap_fetch_andnot_word(p + k, mask)
            if mask:
                flush = True
                kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, st, slot, offset, mask)
        offset += 64
    if flush:
        st.tlb_flushes_ranged += 1
