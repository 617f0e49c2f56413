"""Memslots: the guest-physical to host-page map, and host page accessed/dirty flags.

Models Linux v6.10's ``struct kvm_memory_slot`` (``include/linux/kvm_host.h``) and the
memslot code of ``virt/kvm/kvm_main.c``: creating, deleting and moving a slot
(``__kvm_set_memory_region`` with its overlap check, ``kvm_set_memslot`` with
``kvm_invalidate_memslot``, ``kvm_swap_active_memslots`` stepping the generation),
``gfn_to_memslot``, ``__gfn_to_pfn_memslot`` and ``kvm_set_pfn_accessed`` /
``kvm_set_pfn_dirty``; and x86's ``kvm_arch_prepare_memory_region`` check against
``kvm_mmu_max_gfn()``.  A slot here maps its gfns to host pfns directly (``pfn`` is the host
page of ``base_gfn``) instead of through a userspace address.

The MMU's side of a memslot change (zap all roots for a delete or move, invalidate MMIO
SPTEs when the generation wraps) is in ``mmu.py``, as ``kvm_arch_flush_shadow_memslot`` and
``kvm_mmu_invalidate_mmio_sptes`` are in ``arch/x86/kvm/mmu/mmu.c``.
"""
from . import mmu  # kvm_main.c calls the arch hooks of mmu.c; resolved at call time

#: kvm_arch_nr_memslot_as_ids() on x86 with SMM: address spaces 0 and 1 split the
#: generations (0, 2, 4, ... and 1, 3, 5, ...); the model has address space 0 only.
KVM_ADDRESS_SPACE_NUM = 2

# Error and no-slot pfns (include/linux/kvm_host.h): never a real pfn (< 1 << 40).
KVM_PFN_ERR_MASK = 0x7FF << 52
KVM_PFN_ERR_RO_FAULT = KVM_PFN_ERR_MASK + 2   # write fault on a read-only slot
KVM_PFN_NOSLOT = 1 << 63                      # gfn in no memslot (emulated MMIO)


def is_error_pfn(pfn):
    return bool(pfn & KVM_PFN_ERR_MASK)


def is_error_noslot_pfn(pfn):
    return bool(pfn & (KVM_PFN_ERR_MASK | KVM_PFN_NOSLOT))


class KvmMemorySlot:
    """``struct kvm_memory_slot``: gfns [base_gfn, base_gfn + npages) backed by host pfns
    [pfn, pfn + npages); ``readonly`` is KVM_MEM_READONLY.  ``dirty_bitmap`` is None, or
    (KVM_MEM_LOG_DIRTY_PAGES) a list of 64-page words: page i is bit i % 64 of word i // 64."""

    __slots__ = ("id", "base_gfn", "npages", "pfn", "readonly", "dirty_bitmap")

    def __init__(self, slot_id, base_gfn, npages, pfn, readonly):
        self.id = slot_id
        self.base_gfn = base_gfn
        self.npages = npages
        self.pfn = pfn
        self.readonly = readonly
        self.dirty_bitmap = None

    def has_gfn(self, gfn):
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def has_pfn(self, pfn):
        return self.pfn <= pfn < self.pfn + self.npages

    def gfn_to_pfn(self, gfn):
        return self.pfn + (gfn - self.base_gfn)

    def as_tuple(self):
        """The documented form of ``vm.memslots`` entries."""
        return (self.id, self.base_gfn, self.npages, self.pfn, self.readonly)


# --- lookups ---------------------------------------------------------------------------------


def gfn_to_memslot(kvm, gfn):
    """The slot holding gfn, or None."""
    for slot in kvm.memslots.values():
        if slot.has_gfn(gfn):
            return slot
    return None


def pfn_to_memslot(kvm, pfn):
    """The slot whose host pages include pfn, or None (each host page backs one gfn)."""
    for slot in kvm.memslots.values():
        if slot.has_pfn(pfn):
            return slot
    return None


def kvm_memslots_sorted(kvm):
    """The slots by base_gfn (``vm.memslots``)."""
    return sorted(kvm.memslots.values(), key=lambda slot: slot.base_gfn)


def gfn_to_pfn_memslot(slot, gfn, write_fault):
    """KVM's __gfn_to_pfn_memslot -> (pfn, writable): a write to a read-only slot gives
    KVM_PFN_ERR_RO_FAULT; the mapping is writable unless the slot is read-only."""
    if slot.readonly and write_fault:
        return KVM_PFN_ERR_RO_FAULT, False
    return slot.gfn_to_pfn(gfn), not slot.readonly


# --- dirty bitmaps (kvm_main.c; the MMU's side of dirty logging is dirty_log.py)

#: Bits of a bitmap word (unsigned long).
BITS_PER_LONG = 64


def dirty_bitmap_words(npages):
    return (npages + BITS_PER_LONG - 1) // BITS_PER_LONG


def kvm_alloc_dirty_bitmap(kvm, npages):
    """A zeroed bitmap, or under manual protect + initially-set every page of the slot set
    (bitmap_set of npages bits: none beyond the slot's end)."""
    words = [0] * dirty_bitmap_words(npages)
    if kvm.manual_dirty_log_protect and kvm.dirty_log_initially_set:
        full, rest = divmod(npages, BITS_PER_LONG)
        words[:full] = [(1 << BITS_PER_LONG) - 1] * full
        if rest:
            words[full] = (1 << rest) - 1
    return words


def kvm_slot_dirty_track_enabled(slot):
    """KVM_MEM_LOG_DIRTY_PAGES (no external page-track users in this model)."""
    return slot is not None and slot.dirty_bitmap is not None


def mark_page_dirty_in_slot(stat, slot, gfn):
    """Set the gfn's bit in the slot's bitmap (no dirty ring); nothing for a slot without a
    dirty log.  ``stat``: the counters of the vCPU that dirtied the page."""
    if not kvm_slot_dirty_track_enabled(slot) or not slot.has_gfn(gfn):
        return
    page = gfn - slot.base_gfn
    slot.dirty_bitmap[page // BITS_PER_LONG] |= 1 << (page % BITS_PER_LONG)
    stat["dirty_pages_marked"] += 1


# --- host page flags -------------------------------------------------------------------------
# Accessed/dirty are flags of host pages (struct page in KVM), not of memslots: they outlive
# the slot that set them, and a slot that maps the page again sees them.


def kvm_set_pfn_accessed(kvm, pfn):
    kvm.host_accessed.add(pfn)


def kvm_set_pfn_dirty(kvm, pfn):
    kvm.host_dirty.add(pfn)


def host_page_accessed(kvm, pfn):
    """The caller checked that a slot backs pfn."""
    return pfn in kvm.host_accessed


def host_page_dirty(kvm, pfn):
    return pfn in kvm.host_dirty


# --- creating, deleting and moving slots (__kvm_set_memory_region, kvm_set_memslot) ----------


def _check_new_range(kvm, base_gfn, npages, slot_id=None):
    """kvm_set_memory_region's checks of a created or moved slot's gfns: inside the
    address width and overlapping no other slot (-EEXIST)."""
    end = base_gfn + npages
    if end > kvm.gfn_limit:
        raise ValueError(f"gfn range [{base_gfn:#x}, {end:#x}) exceeds the address width "
                         f"({kvm.gfn_limit:#x})")
    for slot in kvm.memslots.values():
        if slot.id != slot_id and base_gfn < slot.base_gfn + slot.npages and slot.base_gfn < end:
            raise ValueError(f"gfn range overlaps memslot {slot.id}")


def _check_max_gfn(kvm, base_gfn, npages):
    """kvm_arch_prepare_memory_region: -EINVAL for a slot ending above kvm_mmu_max_gfn()."""
    end = base_gfn + npages
    if end - 1 > kvm.max_gfn:
        raise ValueError(f"gfn range [{base_gfn:#x}, {end:#x}) exceeds the host's "
                         f"MAXPHYADDR (max gfn {kvm.max_gfn:#x})")


def kvm_create_memslot(kvm, base_gfn, npages, pfn, readonly, dirty_log=False):
    """KVM_MR_CREATE -> the new slot's id: one swap.  ValueError before anything changes
    when the gfn range is refused, when the host has no such pfns (pfn + npages above
    1 << (host_maxphyaddr - 12)), or when the pfns overlap another slot's.  With
    `dirty_log` the slot gets its bitmap (kvm_alloc_dirty_bitmap) and counts in
    nr_memslots_dirty_logging; no SPTE exists yet, so nothing else is done."""
    _check_new_range(kvm, base_gfn, npages)
    _check_max_gfn(kvm, base_gfn, npages)
    host_pfn_limit = 1 << (kvm.host_maxphyaddr - 12)
    if pfn + npages > host_pfn_limit:
        raise ValueError(f"pfn range [{pfn:#x}, {pfn + npages:#x}) exceeds the host's "
                         f"physical addresses (1 << {kvm.host_maxphyaddr - 12})")
    for slot in kvm.memslots.values():
        if pfn < slot.pfn + slot.npages and slot.pfn < pfn + npages:
            raise ValueError(f"pfn range overlaps memslot {slot.id}")
    slot_id = kvm.next_slot_id
    kvm.next_slot_id += 1
    slot = KvmMemorySlot(slot_id, base_gfn, npages, pfn, readonly)
    if dirty_log:
        slot.dirty_bitmap = kvm_alloc_dirty_bitmap(kvm, npages)
    kvm.memslots[slot_id] = slot
    kvm_swap_active_memslots(kvm)
    if dirty_log:                   # kvm_commit_memory_region
        kvm.nr_memslots_dirty_logging += 1
    return slot_id


def kvm_invalidate_memslot(kvm, slot):
    """The first half of a delete or move: the slot is published as INVALID (a swap; a
    fault on it would RETRY, which single-threaded nothing can observe), then the MMU
    drops every SPTE (kvm_arch_flush_shadow_memslot)."""
    kvm_swap_active_memslots(kvm)
    mmu.kvm_arch_flush_shadow_memslot(kvm, slot)


def kvm_delete_memslot(kvm, slot_id):
    """KVM_MR_DELETE: invalidate (swap, zap all), then remove the slot (swap): +4.
    ValueError if no slot has this id."""
    slot = kvm.memslots.get(slot_id)
    if slot is None:
        raise ValueError(f"no memslot {slot_id}")
    kvm_invalidate_memslot(kvm, slot)
    del kvm.memslots[slot_id]
    kvm_swap_active_memslots(kvm)
    if slot.dirty_bitmap is not None:
        kvm.nr_memslots_dirty_logging -= 1


def kvm_move_memslot(kvm, slot_id, new_base_gfn):
    """KVM_MR_MOVE: the same pages at another gfn range.  Width and overlap are checked
    before anything changes; then invalidate (swap, zap all) and move (swap): +4.  The
    max-gfn check is kvm_prepare_memory_region's, which kvm_set_memslot runs only after
    the invalidation: a move past it has swapped and zapped, swaps the slot back (+4 in
    all) and fails.  The same base is no change at all (KVM returns 0 before any swap)."""
    slot = kvm.memslots.get(slot_id)
    if slot is None:
        raise ValueError(f"no memslot {slot_id}")
    if new_base_gfn == slot.base_gfn:
        return
    _check_new_range(kvm, new_base_gfn, slot.npages, slot_id)
    kvm_invalidate_memslot(kvm, slot)
    if new_base_gfn + slot.npages - 1 > kvm.max_gfn:
        kvm_swap_active_memslots(kvm)       # kvm_activate_memslot(invalid -> old)
        _check_max_gfn(kvm, new_base_gfn, slot.npages)
    slot.base_gfn = new_base_gfn
    kvm_swap_active_memslots(kvm)


def kvm_swap_active_memslots(kvm):
    """Publish a new memslot set: the generation steps by the number of address spaces,
    and kvm_arch_memslots_updated (before the new generation is published, as in KVM)
    checks for an MMIO generation wrap."""
    gen = kvm.memslots_generation + KVM_ADDRESS_SPACE_NUM
    mmu.kvm_mmu_invalidate_mmio_sptes(kvm, gen)
    kvm.memslots_generation = gen
