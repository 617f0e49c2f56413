"""Dirty logging: the memslot's dirty bitmap, the PML buffer, write-protection and D-bit
clearing of the TDP MMU, and the dirty-log ioctls.

Models Linux v6.10 (spec §3.12, §3.14):

* ``virt/kvm/kvm_main.c``: ``kvm_alloc_dirty_bitmap`` (all ones under
  KVM_DIRTY_LOG_INITIALLY_SET), ``mark_page_dirty_in_slot``, ``kvm_get_dirty_log_protect``
  (KVM_GET_DIRTY_LOG), ``kvm_clear_dirty_log_protect`` (KVM_CLEAR_DIRTY_LOG), and the
  KVM_MR_FLAGS_ONLY change of ``__kvm_set_memory_region`` (one memslot swap);
* ``arch/x86/kvm/x86.c``: ``kvm_mmu_slot_apply_flags``, ``kvm_arch_sync_dirty_log``;
* ``arch/x86/kvm/mmu/mmu.c``: ``kvm_arch_mmu_enable_log_dirty_pt_masked`` and
  ``kvm_mmu_slot_gfn_write_protect``;
* ``arch/x86/kvm/mmu/tdp_mmu.c``: ``wrprot_gfn_range``, ``clear_dirty_gfn_range``,
  ``clear_dirty_pt_masked``;
* ``arch/x86/kvm/vmx/vmx.c``: ``vmx_flush_pml_buffer`` (the CPU's side of PML is in
  ``hw.py``).

Bitmaps are lists of 64-page words (page i of a slot is bit i % 64 of word i // 64), as
``unsigned long`` words in KVM.
"""
from . import aging, huge_pages, memslots, notifiers, tdp_mmu, tdp_mmu_roots
from .kvm_host import kvm_flush_remote_tlbs_range
from .memslots import BITS_PER_LONG, kvm_alloc_dirty_bitmap, mark_page_dirty_in_slot
from .spte import (PG_LEVEL_2M, PG_LEVEL_4K, PT_WRITABLE_MASK, is_last_spte,
                   is_shadow_present_pte, spte_to_pfn)
from .tdp_iter import for_each_tdp_pte, for_each_tdp_pte_min_level

#: Entries of a vCPU's page-modification log (PML_ENTITY_NUM in vmx.h).
PML_ENTITY_NUM = 512


# --- PML (vmx.c) -----------------------------------------------------------------------------


def vmx_flush_pml_buffer(vcpu):
    """Every gfn the CPU logged is marked dirty in its slot (kvm_vcpu_mark_page_dirty); the
    log is emptied.  Every VM exit does this first."""
    kvm = vcpu.kvm
    for gfn in vcpu.pml_buf:
        mark_page_dirty_in_slot(vcpu.stat, memslots.gfn_to_memslot(kvm, gfn), gfn)
    vcpu.pml_buf = []


def kvm_arch_sync_dirty_log(kvm):
    """Before a bitmap is read: kick every vCPU out of the guest, which flushes its PML
    buffer (only when PML is in use: cpu_dirty_log_size)."""
    if not kvm.enable_pml:
        return
    for vcpu in kvm.vcpus:
        if vcpu.pml_buf:
            vmx_flush_pml_buffer(vcpu)


# --- the TDP MMU's side (tdp_mmu.c) ------------------------------------------------------------


def _ad_enabled(kvm):
    """kvm_ad_enabled(): KVM uses hardware A/D bits (shadow_accessed_mask != 0)."""
    return kvm.layout.accessed_mask != 0


def _clear_leaf_bit(kvm, root, start, end, min_level, bit):
    """Shared: present leaves at >= min_level in [start, end) that have `bit` lose it (CAS,
    retried on the value found, through handle_changed_spte).  Returns changed."""
    changed = False
    end = min(end, tdp_mmu.tdp_mmu_max_gfn_exclusive(kvm))
    if start >= end:
        return False
    for it in for_each_tdp_pte_min_level(kvm.pool, root, min_level, start, end):
        while (is_shadow_present_pte(it.old_spte) and is_last_spte(it.old_spte, it.level)
               and it.old_spte & bit):
            if tdp_mmu.tdp_mmu_set_spte_atomic(kvm, it, it.old_spte & ~bit):
                changed = True
                break
    return changed


def wrprot_gfn_range(kvm, root, start, end, min_level):
    """Clear only W on leaves at >= min_level.  MMU-writable stays, so the next write is a
    fast page fault that logs it."""
    return _clear_leaf_bit(kvm, root, start, end, min_level, PT_WRITABLE_MASK)


def clear_dirty_gfn_range(kvm, root, start, end):
    """Leaves of any level lose the dirty bit -- D with A/D bits, else W."""
    dbit = kvm.layout.dirty_mask if _ad_enabled(kvm) else PT_WRITABLE_MASK
    return _clear_leaf_bit(kvm, root, start, end, PG_LEVEL_4K, dbit)


def clear_dirty_pt_masked(kvm, root, gfn, mask, wrprot):
    """Exclusive: for each set bit of `mask`, the 4K leaf of gfn + bit loses the dirty bit
    (W when `wrprot` or without A/D bits, else D) by an atomic AND -- only a tracepoint,
    no handle_changed_spte -- and its old pfn is marked dirty.  Bits are crossed off as
    their leaves are seen; the walk stops when none is left."""
    dbit = PT_WRITABLE_MASK if (wrprot or not _ad_enabled(kvm)) else kvm.layout.dirty_mask
    start = gfn + ((mask & -mask).bit_length() - 1)              # gfn + __ffs(mask)
    end = min(gfn + BITS_PER_LONG, tdp_mmu.tdp_mmu_max_gfn_exclusive(kvm))
    for it in for_each_tdp_pte(kvm.pool, root, start, end):
        if not mask:
            break
        if not is_shadow_present_pte(it.old_spte) or not is_last_spte(it.old_spte, it.level):
            continue
        if it.level > PG_LEVEL_4K:         # a huge leaf: its gfn may lie below gfn
            continue
        bit = 1 << (it.gfn - gfn)
        if not mask & bit:
            continue
        mask &= ~bit
        if not it.old_spte & dbit:
            continue
        it.old_spte = aging.tdp_mmu_clear_spte_bits(kvm, it.sptep, it.old_spte, dbit, it.level)
        memslots.kvm_set_pfn_dirty(kvm, spte_to_pfn(it.old_spte))


def kvm_mmu_slot_remove_write_access(kvm, slot, start_level):
    """kvm_tdp_mmu_wrprot_slot over the valid roots (mmu_lock for read)."""
    changed = False
    for root in tdp_mmu_roots.kvm_tdp_mmu_valid_roots(kvm):
        changed |= wrprot_gfn_range(kvm, root, slot.base_gfn, slot.base_gfn + slot.npages,
                                    start_level)
    return changed


def kvm_mmu_slot_leaf_clear_dirty(kvm, slot):
    """kvm_tdp_mmu_clear_dirty_slot over the valid roots (mmu_lock for read)."""
    changed = False
    for root in tdp_mmu_roots.kvm_tdp_mmu_valid_roots(kvm):
        changed |= clear_dirty_gfn_range(kvm, root, slot.base_gfn, slot.base_gfn + slot.npages)
    return changed


def kvm_mmu_slot_gfn_write_protect(kvm, gfn, min_level):
    """kvm_tdp_mmu_write_protect_gfn over the valid roots: W and MMU-writable cleared."""
    changed = False
    for root in tdp_mmu_roots.kvm_tdp_mmu_valid_roots(kvm):
        changed |= notifiers.write_protect_gfn(kvm, root, gfn, min_level)
    return changed


def _align_2m_up(gfn):
    """ALIGN(gfn << PAGE_SHIFT, PMD_SIZE) >> PAGE_SHIFT: rounded *up* to a 2M boundary."""
    return -(-gfn // 512) * 512


def kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, slot, gfn_offset, mask):
    """Re-protect the pages of one harvested 64-page word (mmu_lock for write).

    Under manual protect + initially-set the slot's huge pages were never protected, so
    the huge pages at the first and last set bit are split first (eager_page_split) and
    write-protected at >= 2M.  6.10 decides "cross two large pages?" by comparing the two
    gfns rounded *up* to 2M (ALIGN): a last bit on the first page of the next 2M page
    rounds to the same boundary as a first bit below it, so that huge page is not
    write-protected (a quirk kept here).  Then the 4K leaves lose D (PML) or W."""
    if kvm.manual_dirty_log_protect and kvm.dirty_log_initially_set:
        start = slot.base_gfn + gfn_offset + ((mask & -mask).bit_length() - 1)   # __ffs
        end = slot.base_gfn + gfn_offset + (mask.bit_length() - 1)               # __fls
        if kvm.eager_page_split:
            huge_pages.kvm_mmu_try_split_huge_pages(kvm, start, end + 1, PG_LEVEL_4K)
        kvm_mmu_slot_gfn_write_protect(kvm, start, PG_LEVEL_2M)
        if _align_2m_up(start) != _align_2m_up(end):
            kvm_mmu_slot_gfn_write_protect(kvm, end, PG_LEVEL_2M)
    for root in tdp_mmu_roots.kvm_tdp_mmu_valid_roots(kvm):
        clear_dirty_pt_masked(kvm, root, slot.base_gfn + gfn_offset, mask,
                              wrprot=not kvm.enable_pml)


# --- the ioctls (kvm_main.c) -----------------------------------------------------------------


def kvm_flush_remote_tlbs_memslot(kvm, slot):
    """A memslot-wide flush: kvm_flush_remote_tlbs_range over the slot (counted ranged)."""
    kvm_flush_remote_tlbs_range(kvm, slot.base_gfn, slot.npages)


def kvm_get_dirty_log_protect(kvm, slot):
    """KVM_GET_DIRTY_LOG -> the words.  PML buffers drained first.  With manual protect a
    copy; else each non-zero word is exchanged for 0 and its pages re-protected, and one
    memslot flush follows if any word was."""
    kvm_arch_sync_dirty_log(kvm)
    if kvm.manual_dirty_log_protect:
        return list(slot.dirty_bitmap)
    out = [0] * len(slot.dirty_bitmap)
    flush = False
    for i, word in enumerate(slot.dirty_bitmap):
        if not word:
            continue
        flush = True
        slot.dirty_bitmap[i] = 0            # xchg(&dirty_bitmap[i], 0)
        out[i] = word
        kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, slot, i * BITS_PER_LONG, word)
    if flush:
        kvm_flush_remote_tlbs_memslot(kvm, slot)
    return out


def kvm_clear_dirty_log_protect(kvm, slot, first_page, user_words):
    """KVM_CLEAR_DIRTY_LOG on the words from first_page (arguments checked by the caller):
    of the bits userspace set, those still set in the log are cleared (fetch_andnot) and
    their pages re-protected; one memslot flush if any was."""
    kvm_arch_sync_dirty_log(kvm)
    flush = False
    for k, user in enumerate(user_words):
        if not user:
            continue
        i = first_page // BITS_PER_LONG + k
        mask = user & slot.dirty_bitmap[i]
        slot.dirty_bitmap[i] &= ~user
        if mask:
            flush = True
            kvm_arch_mmu_enable_log_dirty_pt_masked(kvm, slot, first_page + k * BITS_PER_LONG,
                                                    mask)
    if flush:
        kvm_flush_remote_tlbs_memslot(kvm, slot)


def kvm_mmu_slot_apply_flags(kvm, slot, log_dirty_pages):
    """x86's reaction to KVM_MEM_LOG_DIRTY_PAGES toggled on a writable slot (mmu_lock for
    read).  Off: zap the collapsible SPTEs so huge pages come back.  On: nothing under
    manual protect + initially-set; else eager split to 4K, then with PML clear D on the
    leaves and write-protect from 2M, without PML write-protect from 4K; then one memslot
    flush, unconditionally."""
    if not log_dirty_pages:
        huge_pages.kvm_mmu_zap_collapsible_sptes(kvm, slot)
        return
    if kvm.manual_dirty_log_protect and kvm.dirty_log_initially_set:
        return
    if kvm.eager_page_split:
        huge_pages.kvm_mmu_try_split_huge_pages(kvm, slot.base_gfn,
                                                slot.base_gfn + slot.npages, PG_LEVEL_4K)
    if kvm.enable_pml:
        kvm_mmu_slot_leaf_clear_dirty(kvm, slot)
        kvm_mmu_slot_remove_write_access(kvm, slot, PG_LEVEL_2M)
    else:
        kvm_mmu_slot_remove_write_access(kvm, slot, PG_LEVEL_4K)
    kvm_flush_remote_tlbs_memslot(kvm, slot)


def kvm_set_memslot_flags(kvm, slot, log):
    """KVM_MR_FLAGS_ONLY toggling KVM_MEM_LOG_DIRTY_PAGES: no change, nothing at all; else
    the bitmap is allocated (on) or dropped (off), one memslot swap, the count of
    dirty-logged slots, then kvm_mmu_slot_apply_flags (not for a read-only slot)."""
    if (slot.dirty_bitmap is not None) == log:
        return
    slot.dirty_bitmap = kvm_alloc_dirty_bitmap(kvm, slot.npages) if log else None
    memslots.kvm_swap_active_memslots(kvm)
    kvm.nr_memslots_dirty_logging += 1 if log else -1
    if not slot.readonly:
        kvm_mmu_slot_apply_flags(kvm, slot, log)
