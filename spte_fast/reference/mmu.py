"""The page-fault entry, huge-page level adjustment, the NX huge-page list and the MMU's
side of zaps and memslot changes.

Models Linux v6.10's ``arch/x86/kvm/mmu/mmu.c`` (``kvm_tdp_mmu_page_fault``,
``fast_page_fault``, ``mmu_topup_memory_caches``, ``kvm_faultin_pfn``,
``kvm_mmu_hugepage_adjust``, ``disallowed_hugepage_adjust``,
``track_possible_nx_huge_page``, ``kvm_zap_gfn_range``, ``kvm_mmu_invalidate_mmio_sptes``,
``kvm_arch_flush_shadow_memslot``) and ``mmu_internal.h`` (``struct kvm_page_fault``,
``kvm_mmu_do_page_fault``).  Spec §3.9.
"""
from ..errors import OutOfMemory
from ..pf import PF
from . import memslots
from . import tdp_mmu  # mmu.c and tdp_mmu.c call each other; resolved at call time
from .kvm_host import kvm_flush_remote_tlbs, kvm_flush_remote_tlbs_range
from .mmu_cache import kvm_mmu_topup_memory_cache
from .spte import (ACC_ALL, PG_LEVEL_4K, PT64_ROOT_MAX_LEVEL, PT_PRESENT_MASK,
                   PT_WRITABLE_MASK, gfn_round_for_level, is_large_pte, is_last_spte,
                   is_shadow_present_pte, pages_per_hpage)

# Page-fault error code bits (arch/x86/include/asm/kvm_host.h); the model sets only these.
PFERR_WRITE_MASK = 1 << 1
PFERR_FETCH_MASK = 1 << 4

#: vCPU stat counting each final fault result.
PF_STATS = {PF.FIXED: "faults_fixed", PF.SPURIOUS: "faults_spurious",
            PF.RETRY: "faults_retry", PF.EMULATE: "faults_emulate"}


class KvmPageFault:
    """``struct kvm_page_fault``: one fault on its way from the entry to kvm_tdp_mmu_map.

    The entry fills the arguments (gfn, error_code and what derives from it, prefetch,
    max_level) and, for a direct MMU, the slot; kvm_faultin_pfn fills pfn and map_writable
    (and clears slot for a gfn in no memslot); kvm_mmu_hugepage_adjust fills req_level,
    goal_level and huge_page_disallowed, and disallowed_hugepage_adjust may lower the goal.
    """

    __slots__ = ("gfn", "error_code", "write", "exec", "prefetch",
                 "nx_huge_page_workaround_enabled", "max_level", "req_level", "goal_level",
                 "huge_page_disallowed", "slot", "pfn", "map_writable")

    def __init__(self, gfn, error_code, prefetch, max_level, nx_huge_page_workaround_enabled):
        self.gfn = gfn
        self.error_code = error_code
        self.write = bool(error_code & PFERR_WRITE_MASK)
        self.exec = bool(error_code & PFERR_FETCH_MASK)
        self.prefetch = prefetch
        self.nx_huge_page_workaround_enabled = nx_huge_page_workaround_enabled
        self.max_level = max_level          # the largest mapping this fault may create
        self.req_level = PG_LEVEL_4K        # what the memslot allows (max_mapping_level)
        self.goal_level = PG_LEVEL_4K       # what the fault will map
        self.huge_page_disallowed = False   # exec fault under the NX huge-page mitigation
        self.slot = None                    # the memslot of gfn, or None (MMIO)
        self.pfn = None                     # the host page (aligned to goal_level)
        self.map_writable = False           # the host page may be mapped writable

    def __repr__(self):
        return "KvmPageFault(" + ", ".join(f"{name}={getattr(self, name)!r}"
                                           for name in self.__slots__) + ")"


# =================================================================================================
# The page-fault entry (kvm_mmu_do_page_fault -> kvm_tdp_mmu_page_fault)
# =================================================================================================


def kvm_mmu_do_page_fault(vcpu, gfn, write, exec):  # noqa: A002 - KVM's field name
    """One guest fault -> PF; counts the result in the vCPU's stat."""
    kvm = vcpu.kvm
    error_code = (PFERR_WRITE_MASK if write else 0) | (PFERR_FETCH_MASK if exec else 0)
    fault = KvmPageFault(gfn, error_code, prefetch=False, max_level=kvm.max_level,
                         nx_huge_page_workaround_enabled=kvm.nx_huge_pages)
    # A direct (TDP) MMU: the gfn is the address, and its slot is looked up here.
    fault.slot = memslots.gfn_to_memslot(kvm, gfn)
    ret = kvm_tdp_mmu_page_fault(vcpu, fault)
    vcpu.stat[PF_STATS[ret]] += 1
    return ret


def kvm_tdp_mmu_page_fault(vcpu, fault):
    """KVM's order: fast path, then the cache top-up, then the pfn, then the map."""
    ret = fast_page_fault(vcpu, fault)
    if ret != PF.INVALID:
        return ret
    mmu_topup_memory_caches(vcpu)       # OutOfMemory here leaves the page tables untouched
    ret = kvm_faultin_pfn(vcpu, fault, ACC_ALL)
    if ret != PF.CONTINUE:
        return ret
    return tdp_mmu.kvm_tdp_mmu_map(vcpu, fault)


def is_access_allowed(layout, fault, spte):
    if fault.exec:
        return layout.is_executable_pte(spte)
    if fault.write:
        return bool(spte & PT_WRITABLE_MASK)
    return bool(spte & PT_PRESENT_MASK)


def fast_page_fault(vcpu, fault):
    """The part of fast_page_fault the model has: the last SPTE on the walk is a present
    leaf that already allows the access -> SPURIOUS; anything else -> INVALID (go on)."""
    level, spte = tdp_mmu.kvm_tdp_mmu_fast_pf_get_last_spte(vcpu.kvm, fault.gfn)
    if not is_shadow_present_pte(spte) or not is_last_spte(spte, level):
        return PF.INVALID
    if is_access_allowed(vcpu.kvm.layout, fault, spte):
        return PF.SPURIOUS
    return PF.INVALID


def mmu_topup_memory_caches(vcpu):
    """The shadow-page cache: at least PT64_ROOT_MAX_LEVEL (5) pages, filled to 40."""
    kvm_mmu_topup_memory_cache(vcpu.cache, PT64_ROOT_MAX_LEVEL)


def kvm_faultin_pfn(vcpu, fault, access):
    """Resolve the host page: pfn and map_writable.  A write to a read-only slot is
    emulated (KVM_PFN_ERR_RO_FAULT); a gfn in no slot goes on as MMIO."""
    if fault.slot is None:
        return kvm_handle_noslot_fault(vcpu, fault, access)
    fault.pfn, fault.map_writable = memslots.gfn_to_pfn_memslot(fault.slot, fault.gfn,
                                                                fault.write)
    if memslots.is_error_pfn(fault.pfn):
        return kvm_handle_error_pfn(vcpu, fault)
    return PF.CONTINUE


def kvm_handle_noslot_fault(vcpu, fault, access):
    fault.slot = None
    fault.pfn = memslots.KVM_PFN_NOSLOT
    fault.map_writable = False
    return PF.CONTINUE


def kvm_handle_error_pfn(vcpu, fault):
    # The only error pfn of the model: a write to a read-only memslot, emulated.
    assert fault.pfn == memslots.KVM_PFN_ERR_RO_FAULT
    return PF.EMULATE


# =================================================================================================
# Huge pages: the mapping level and the NX huge-page mitigation
# =================================================================================================


def kvm_mmu_max_mapping_level(kvm, slot, gfn, max_level):
    """The largest level <= max_level whose aligned range lies inside the slot, with gfn
    and pfn equally aligned (KVM's disallow_lpage); the host mapping never limits it."""
    for level in range(max_level, PG_LEVEL_4K, -1):
        pages = pages_per_hpage(level)
        start = gfn_round_for_level(gfn, level)
        inside = slot.base_gfn <= start and start + pages <= slot.base_gfn + slot.npages
        if inside and (slot.pfn - slot.base_gfn) % pages == 0:
            return level
    return PG_LEVEL_4K


def kvm_mmu_hugepage_adjust(vcpu, fault):
    """req_level and goal_level from the slot; the pfn aligned down to the goal level."""
    # Set first: an exec fault on a gfn with no memslot marks its tables all the same.
    fault.huge_page_disallowed = fault.exec and fault.nx_huge_page_workaround_enabled
    if fault.max_level == PG_LEVEL_4K:
        return
    if memslots.is_error_noslot_pfn(fault.pfn):
        return
    # (Dirty logging, which would force 4K, is not modelled.)
    fault.req_level = kvm_mmu_max_mapping_level(vcpu.kvm, fault.slot, fault.gfn,
                                                fault.max_level)
    if fault.req_level == PG_LEVEL_4K or fault.huge_page_disallowed:
        return
    fault.goal_level = fault.req_level
    mask = pages_per_hpage(fault.goal_level) - 1
    assert fault.gfn & mask == fault.pfn & mask
    fault.pfn &= ~mask


def disallowed_hugepage_adjust(kvm, fault, spte, cur_level):
    """A huge page cannot replace a table that the NX mitigation split: go one level lower
    (and patch the next 9 bits of the gfn back into the pfn)."""
    if (cur_level > PG_LEVEL_4K and cur_level == fault.goal_level
            and is_shadow_present_pte(spte) and not is_large_pte(spte)
            and tdp_mmu.spte_to_child_sp(kvm, spte, cur_level).nx_huge_page_disallowed):
        page_mask = pages_per_hpage(cur_level) - pages_per_hpage(cur_level - 1)
        fault.pfn |= fault.gfn & page_mask
        fault.goal_level -= 1


def track_possible_nx_huge_page(kvm, sp):
    """Append `sp` to the possible-NX-huge-page list (once) and count it."""
    if sp.possible_nx_huge_page_linked:
        return
    kvm.stat["nx_lpage_splits"] += 1
    sp.possible_nx_huge_page_linked = True
    kvm.possible_nx_huge_pages.append(sp)


def untrack_possible_nx_huge_page(kvm, sp):
    if not sp.possible_nx_huge_page_linked:
        return
    kvm.stat["nx_lpage_splits"] -= 1
    sp.possible_nx_huge_page_linked = False
    kvm.possible_nx_huge_pages.remove(sp)


# =================================================================================================
# Zaps with their TLB flushes, and the MMU's side of memslot changes
# =================================================================================================


def kvm_zap_gfn_range(kvm, gfn_start, gfn_end):
    """Zap the leaves intersecting [gfn_start, gfn_end); one ranged flush if needed.
    Returns whether a flush was needed.  An empty range intersects nothing (KVM WARNs on
    one and never passes it)."""
    if gfn_start >= gfn_end:
        return False
    flush = tdp_mmu.tdp_mmu_zap_leafs(kvm, gfn_start, gfn_end)
    if flush:
        kvm_flush_remote_tlbs_range(kvm, gfn_start, gfn_end - gfn_start)
    return flush


def kvm_mmu_zap_all(kvm):
    """Zap everything; one full TLB flush if anything was zapped.  Returns that."""
    zapped = tdp_mmu.kvm_tdp_mmu_zap_all(kvm)
    if zapped:
        kvm_flush_remote_tlbs(kvm)
    return zapped


def kvm_mmu_zap_sp_at(kvm, gfn, level):
    """Zap the level-`level` table on gfn's path as NX recovery zaps one table
    (kvm_tdp_mmu_zap_sp, then a full flush).  False, nothing done, if none is linked."""
    sp = tdp_mmu.tdp_mmu_find_sp(kvm, gfn, level)
    if sp is None or not tdp_mmu.kvm_tdp_mmu_zap_sp(kvm, sp):
        return False
    kvm_flush_remote_tlbs(kvm)
    return True


def kvm_arch_flush_shadow_memslot(kvm, slot):
    """A memslot goes away: zap its range (6.10 zaps everything; the range form is the
    >= 6.12 one without KVM_X86_QUIRK_SLOT_ZAP_ALL)."""
    kvm_zap_gfn_range(kvm, slot.base_gfn, slot.base_gfn + slot.npages)


def kvm_mmu_invalidate_mmio_sptes(kvm, gen):
    """After a wrap of the generation an MMIO SPTE from 2**19 changes ago would look
    current again, so every SPTE goes (KVM: kvm_mmu_zap_all_fast)."""
    if gen == 0:
        kvm_mmu_zap_all(kvm)


# =================================================================================================
# A batch of faults (the vCPU's run loop)
# =================================================================================================


def kvm_mmu_page_fault_batch(vcpu, gfns, accesses, out):
    """Fault every gfn in order (access bit 0 write, bit 1 exec).  A RETRY is faulted again
    (the guest would fault again), counted in "retry".  OutOfMemory carries .completed."""
    counts = {"fixed": 0, "spurious": 0, "retry": 0, "emulate": 0}
    for k, (gfn, access) in enumerate(zip(gfns, accesses)):
        while True:
            try:
                ret = kvm_mmu_do_page_fault(vcpu, gfn, bool(access & 1), bool(access & 2))
            except OutOfMemory as e:
                raise OutOfMemory(f"page pool exhausted after {k} faults ({e})",
                                  completed=k) from e
            if ret != PF.RETRY:
                break
            counts["retry"] += 1
        counts[PF_STATS[ret][len("faults_"):]] += 1
        if out is not None:
            out[k] = int(ret)
    return counts
