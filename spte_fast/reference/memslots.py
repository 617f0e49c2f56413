"""Memslots: the guest-physical to host-page map, and host page accessed/dirty flags.

Models Linux v6.10's ``struct kvm_memory_slot`` (``include/linux/kvm_host.h``) and the
memslot code of ``virt/kvm/kvm_main.c``: creating and deleting a slot
(``__kvm_set_memory_region`` with its overlap check, ``kvm_swap_active_memslots`` bumping
the generation), ``gfn_to_memslot``, ``__gfn_to_pfn_memslot`` and
``kvm_set_pfn_accessed`` / ``kvm_set_pfn_dirty``.  A slot here maps its gfns to host pfns
directly (``pfn`` is the host page of ``base_gfn``) instead of through a userspace address.

The MMU's side of a memslot change (zap the slot's range, invalidate MMIO SPTEs when the
generation wraps) is in ``mmu.py``, as ``kvm_arch_flush_shadow_memslot`` and
``kvm_mmu_invalidate_mmio_sptes`` are in ``arch/x86/kvm/mmu/mmu.c``.
"""
from . import mmu  # kvm_main.c calls the arch hooks of mmu.c; resolved at call time
from .spte import MMIO_SPTE_GEN_MASK, PFN_LIMIT

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
    [pfn, pfn + npages); ``readonly`` is KVM_MEM_READONLY."""

    __slots__ = ("id", "base_gfn", "npages", "pfn", "readonly")

    def __init__(self, slot_id, base_gfn, npages, pfn, readonly):
        self.id = slot_id
        self.base_gfn = base_gfn
        self.npages = npages
        self.pfn = pfn
        self.readonly = readonly

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


# --- creating and deleting slots (__kvm_set_memory_region) -----------------------------------


def kvm_create_memslot(kvm, base_gfn, npages, pfn, readonly):
    """A new slot -> its id.  ValueError (KVM's -EINVAL / -EEXIST) before anything changes
    when the ranges leave the address width or the PFN field, or overlap another slot."""
    if base_gfn + npages > kvm.gfn_limit:
        raise ValueError(f"gfn range [{base_gfn:#x}, {base_gfn + npages:#x}) exceeds the "
                         f"address width ({kvm.gfn_limit:#x})")
    if pfn + npages > PFN_LIMIT:
        raise ValueError(f"pfn range [{pfn:#x}, {pfn + npages:#x}) exceeds 1 << 40")
    for slot in kvm.memslots.values():
        if base_gfn < slot.base_gfn + slot.npages and slot.base_gfn < base_gfn + npages:
            raise ValueError(f"gfn range overlaps memslot {slot.id}")
        if pfn < slot.pfn + slot.npages and slot.pfn < pfn + npages:
            raise ValueError(f"pfn range overlaps memslot {slot.id}")
    slot_id = kvm.next_slot_id
    kvm.next_slot_id += 1
    kvm.memslots[slot_id] = KvmMemorySlot(slot_id, base_gfn, npages, pfn, readonly)
    kvm_memslots_updated(kvm)
    return slot_id


def kvm_delete_memslot(kvm, slot_id):
    """Zap the slot's range, remove the slot, bump the generation.  ValueError if no slot
    has this id."""
    slot = kvm.memslots.get(slot_id)
    if slot is None:
        raise ValueError(f"no memslot {slot_id}")
    mmu.kvm_arch_flush_shadow_memslot(kvm, slot)
    del kvm.memslots[slot_id]
    kvm_memslots_updated(kvm)


def kvm_memslots_updated(kvm):
    """A new memslots generation (kvm_swap_active_memslots -> kvm_arch_memslots_updated).

    The model steps the generation by 1 (KVM by 2, with an update-in-progress bit).
    """
    kvm.mmio_generation = (kvm.mmio_generation + 1) & MMIO_SPTE_GEN_MASK
    mmu.kvm_mmu_invalidate_mmio_sptes(kvm, kvm.mmio_generation)
