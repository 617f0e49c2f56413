"""The page-fault entry, the vCPU's entry into the guest, huge-page level adjustment, the NX
huge-page list and the MMU's side of zaps and memslot changes.

Models Linux v6.10's ``arch/x86/kvm/mmu/mmu.c`` (``kvm_mmu_page_fault``,
``handle_mmio_page_fault`` with the vCPU's MMIO info cache, ``page_fault_can_be_fast``,
``fast_page_fault``, ``kvm_tdp_mmu_page_fault``, ``mmu_topup_memory_caches``,
``kvm_faultin_pfn``, ``kvm_handle_noslot_fault``, ``kvm_mmu_load`` and the freeing of
obsolete roots, ``kvm_mmu_hugepage_adjust``, ``disallowed_hugepage_adjust``,
``track_possible_nx_huge_page``, ``kvm_zap_gfn_range``, ``kvm_mmu_zap_all``,
``kvm_mmu_zap_all_fast``, ``kvm_mmu_invalidate_mmio_sptes``,
``kvm_arch_flush_shadow_memslot``) and ``mmu_internal.h`` (``struct kvm_page_fault``,
``kvm_mmu_do_page_fault``).  Spec §3.9.
"""
from ..errors import OutOfMemory
from ..pf import PF
from . import memslots
from . import tdp_mmu  # mmu.c and tdp_mmu.c call each other; resolved at call time
from . import tdp_mmu_roots
from .kvm_host import kvm_flush_remote_tlbs, kvm_flush_remote_tlbs_range
from .mmu_cache import kvm_mmu_topup_memory_cache
from .spte import (ACC_ALL, MMIO_SPTE_GEN_MASK, PG_LEVEL_4K, PT64_ROOT_MAX_LEVEL,
                   PT_PRESENT_MASK, PT_WRITABLE_MASK, get_mmio_spte_generation,
                   get_mmio_spte_gfn, gfn_round_for_level, is_large_pte, is_last_spte,
                   is_mmio_spte, is_shadow_present_pte, pages_per_hpage)

# Page-fault error code bits (arch/x86/include/asm/kvm_host.h).
PFERR_PRESENT_MASK = 1 << 0
PFERR_WRITE_MASK = 1 << 1
PFERR_USER_MASK = 1 << 2
PFERR_RSVD_MASK = 1 << 3
PFERR_FETCH_MASK = 1 << 4

#: vCPU stat counting each final fault result.
PF_STATS = {PF.FIXED: "faults_fixed", PF.SPURIOUS: "faults_spurious",
            PF.RETRY: "faults_retry", PF.EMULATE: "faults_emulate"}

#: fast_page_fault gives up after this many lost compare-and-exchanges (++retry_count > 4).
FAST_PF_MAX_RETRIES = 4


class KvmPageFault:
    """``struct kvm_page_fault``: one fault on its way from the entry to kvm_tdp_mmu_map.

    The entry fills the arguments (gfn, error_code and what derives from it, prefetch,
    max_level) and, for a direct MMU, the slot; kvm_faultin_pfn fills pfn and map_writable
    (and clears slot for a gfn in no memslot); kvm_mmu_hugepage_adjust fills req_level,
    goal_level and huge_page_disallowed, and disallowed_hugepage_adjust may lower the goal.
    """

    __slots__ = ("gfn", "error_code", "exec", "write", "present", "rsvd", "user", "prefetch",
                 "nx_huge_page_workaround_enabled", "max_level", "req_level", "goal_level",
                 "huge_page_disallowed", "slot", "pfn", "map_writable")

    def __init__(self, gfn, error_code, prefetch, max_level, nx_huge_page_workaround_enabled):
        self.gfn = gfn
        self.error_code = error_code
        self.exec = bool(error_code & PFERR_FETCH_MASK)
        self.write = bool(error_code & PFERR_WRITE_MASK)
        self.present = bool(error_code & PFERR_PRESENT_MASK)
        self.rsvd = bool(error_code & PFERR_RSVD_MASK)
        self.user = bool(error_code & PFERR_USER_MASK)
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


def pf_error_code(write, exec):  # noqa: A002 - KVM's field name
    """The error code of a not-present fault with these access flags."""
    return (PFERR_WRITE_MASK if write else 0) | (PFERR_FETCH_MASK if exec else 0)


# =================================================================================================
# Entering the guest: obsolete roots and kvm_mmu_reload (x86.c vcpu_enter_guest, mmu.c)
# =================================================================================================


def kvm_mmu_free_obsolete_roots(vcpu):
    """KVM_REQ_MMU_FREE_OBSOLETE_ROOTS: a vCPU whose root was invalidated drops it."""
    root = vcpu.root
    if root is not None and root.role.invalid:      # is_obsolete_root
        tdp_mmu_roots.kvm_tdp_mmu_put_root(vcpu.kvm, root)
        vcpu.root = None


def kvm_mmu_load(vcpu):
    """Top up the caches (OutOfMemory: no root, nothing else changed), then the root.  (KVM
    then flushes the vCPU's own TLB, which no counter reports.)"""
    mmu_topup_memory_caches(vcpu)
    tdp_mmu_roots.kvm_tdp_mmu_alloc_root(vcpu)


def kvm_mmu_reload(vcpu):
    if vcpu.root is None:
        kvm_mmu_load(vcpu)


def kvm_vcpu_enter_guest(vcpu):
    """What every entry into the guest does for the MMU, in vcpu_enter_guest's order."""
    kvm_mmu_free_obsolete_roots(vcpu)
    kvm_mmu_reload(vcpu)


# =================================================================================================
# The page-fault entry (kvm_mmu_page_fault -> kvm_mmu_do_page_fault -> kvm_tdp_mmu_page_fault)
# =================================================================================================


def kvm_mmu_page_fault(vcpu, gfn, error_code):
    """An EPT violation / misconfiguration or an #NPF, for the vCPU's root -> PF.

    A reserved-bit fault (an MMIO SPTE) goes to handle_mmio_page_fault first; its answers
    other than INVALID are final and no faults_* stat counts them.
    """
    r = PF.INVALID
    if error_code & PFERR_RSVD_MASK:
        r = handle_mmio_page_fault(vcpu, gfn)
        if r == PF.EMULATE:
            return r
    if r == PF.INVALID:
        r = kvm_mmu_do_page_fault(vcpu, gfn, error_code)
    return r


def kvm_mmu_do_page_fault(vcpu, gfn, error_code):
    """One fault -> PF; counts the result in the vCPU's stat."""
    kvm = vcpu.kvm
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


# --- the MMIO path (handle_mmio_page_fault) --------------------------------------------------


def vcpu_cache_mmio_info(vcpu, gfn):
    """Remember the gfn as MMIO for this memslots generation (the gva and the access are
    not modelled: a direct MMU caches gva 0)."""
    vcpu.mmio_gfn = gfn
    vcpu.mmio_gen = vcpu.kvm.memslots_generation


def mmio_info_in_cache(vcpu, gfn):
    """vcpu_match_mmio_gpa: the same gfn (never gfn 0) in the current generation."""
    return (vcpu.mmio_gen == vcpu.kvm.memslots_generation and vcpu.mmio_gfn != 0
            and vcpu.mmio_gfn == gfn)


def check_mmio_spte(vcpu, spte):
    """The MMIO SPTE is of the current generation (as far as the SPTE's 19 bits tell)."""
    return vcpu.kvm.memslots_generation & MMIO_SPTE_GEN_MASK == get_mmio_spte_generation(spte)


def handle_mmio_page_fault(vcpu, gfn):
    """A reserved-bit fault: EMULATE for a cached or current MMIO SPTE, INVALID (take the
    normal path) for a stale one, RETRY when the last SPTE is no MMIO SPTE (zapped
    meanwhile: let the guest fault again)."""
    if mmio_info_in_cache(vcpu, gfn):
        return PF.EMULATE
    kvm = vcpu.kvm
    _level, spte = tdp_mmu.kvm_tdp_mmu_get_walk(vcpu, gfn)[-1]   # get_mmio_spte
    if is_mmio_spte(kvm, spte):
        if not check_mmio_spte(vcpu, spte):
            return PF.INVALID
        vcpu_cache_mmio_info(vcpu, get_mmio_spte_gfn(kvm, spte))
        return PF.EMULATE
    return PF.RETRY


# --- the fast path (lockless) ----------------------------------------------------------------


def kvm_ad_enabled(kvm):
    """KVM uses hardware accessed/dirty bits (shadow_accessed_mask != 0)."""
    return kvm.layout.accessed_mask != 0


def page_fault_can_be_fast(kvm, fault):
    """No reserved-bit fault (MMIO generation refresh needs the slow path); a not-present
    fault only when KVM does not use A/D bits (it may be access tracking); a present one
    only for a write (write protection)."""
    if fault.rsvd:
        return False
    if not fault.present:
        return not kvm_ad_enabled(kvm)
    return fault.write


def is_access_allowed(layout, fault, spte):
    if fault.exec:
        return layout.is_executable_pte(spte)
    if fault.write:
        return bool(spte & PT_WRITABLE_MASK)
    return bool(spte & PT_PRESENT_MASK)


def fast_pf_fix_direct_spte(vcpu, fault, sptep, old_spte, new_spte):
    """The CAS; a W newly set marks the gfn dirty in the slot's bitmap
    (mark_page_dirty_in_slot): how dirty logging by write-protection learns of a write."""
    ok, _observed = tdp_mmu._try_cmpxchg64(vcpu.kvm, sptep, old_spte, new_spte)
    if ok and new_spte & PT_WRITABLE_MASK and not old_spte & PT_WRITABLE_MASK:
        memslots.mark_page_dirty_in_slot(vcpu.stat, fault.slot, fault.gfn)
    return ok


def fast_page_fault(vcpu, fault):
    """Fix the SPTE without mmu_lock: SPURIOUS if it already allows the access, FIXED after
    a successful CAS (access tracking undone, W set on an MMU-writable SPTE), INVALID to
    go on to the slow path.  No handle_changed_spte (6.10).  Counts faults_fast."""
    kvm = vcpu.kvm
    L = kvm.layout
    ret = PF.INVALID
    if not page_fault_can_be_fast(kvm, fault):
        return ret
    retry_count = 0
    while True:
        sptep, level, spte = tdp_mmu.kvm_tdp_mmu_fast_pf_get_last_spte(vcpu, fault.gfn)
        if not is_shadow_present_pte(spte) or not is_last_spte(spte, level):
            break
        # Upper levels are always ACC_ALL: only the leaf needs checking.
        if is_access_allowed(L, fault, spte):
            ret = PF.SPURIOUS
            break
        new_spte = spte
        if not kvm_ad_enabled(kvm) and L.is_access_track_spte(spte):
            new_spte = L.restore_acc_track_spte(new_spte)
        if fault.write and L.is_mmu_writable_spte(spte):
            new_spte |= PT_WRITABLE_MASK
            # Never a writable huge SPTE in a dirty-logged slot: only its first page would
            # be logged.  The slow path maps the page at 4K instead.
            if level > PG_LEVEL_4K and memslots.kvm_slot_dirty_track_enabled(fault.slot):
                break
        if new_spte == spte or not is_access_allowed(L, fault, new_spte):
            break
        if fast_pf_fix_direct_spte(vcpu, fault, sptep, spte, new_spte):
            ret = PF.FIXED
            break
        retry_count += 1
        if retry_count > FAST_PF_MAX_RETRIES:
            break
    if ret != PF.INVALID:
        vcpu.stat["faults_fast"] += 1
    return ret


def mmu_topup_memory_caches(vcpu):
    """The shadow-page cache: at least PT64_ROOT_MAX_LEVEL (5) pages, filled to 40."""
    kvm_mmu_topup_memory_cache(vcpu.cache, PT64_ROOT_MAX_LEVEL)


# --- the host page (kvm_faultin_pfn) ---------------------------------------------------------


def kvm_faultin_pfn(vcpu, fault, access):
    """Resolve the host page: pfn and map_writable.  A write to a read-only slot is
    emulated (KVM_PFN_ERR_RO_FAULT); a gfn in no slot is kvm_handle_noslot_fault's."""
    if fault.slot is None:
        return kvm_handle_noslot_fault(vcpu, fault, access)
    fault.pfn, fault.map_writable = memslots.gfn_to_pfn_memslot(fault.slot, fault.gfn,
                                                                fault.write)
    if memslots.is_error_pfn(fault.pfn):
        return kvm_handle_error_pfn(vcpu, fault)
    return PF.CONTINUE


def kvm_handle_noslot_fault(vcpu, fault, access):
    """Emulated MMIO: cache the MMIO info; EMULATE without touching the tables when MMIO
    caching is off or the gfn is above host.MAXPHYADDR, else go on to an MMIO SPTE."""
    kvm = vcpu.kvm
    vcpu_cache_mmio_info(vcpu, fault.gfn)
    fault.slot = None
    fault.pfn = memslots.KVM_PFN_NOSLOT
    fault.map_writable = False
    if not kvm.enable_mmio_caching:
        return PF.EMULATE
    if fault.gfn > kvm.max_gfn:
        return PF.EMULATE
    return PF.CONTINUE


def kvm_handle_error_pfn(vcpu, fault):
    # The only error pfn of the model: a write to a read-only memslot, emulated (and not
    # cached as MMIO).
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
    if memslots.kvm_slot_dirty_track_enabled(fault.slot):
        return                          # dirty logging tracks writes at 4K
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
    flush = tdp_mmu.kvm_tdp_mmu_zap_leafs(kvm, gfn_start, gfn_end, False)
    if flush:
        kvm_flush_remote_tlbs_range(kvm, gfn_start, gfn_end - gfn_start)
    return flush


def kvm_mmu_zap_all(kvm):
    """Zap every root, valid or not (exclusive).  No TLB flush (6.10: KVM zaps everything
    only when no vCPU will run again).  Returns whether anything was zapped."""
    return tdp_mmu_roots.kvm_tdp_mmu_zap_all(kvm)


def kvm_mmu_zap_all_fast(kvm):
    """Invalidate every root under mmu_lock for write (the vCPUs load new ones at their
    next entry), then zap the invalidated roots under mmu_lock for read.  No TLB flush is
    counted: each vCPU flushes its own TLB when it loads its new root."""
    tdp_mmu_roots.kvm_tdp_mmu_invalidate_all_roots(kvm)
    tdp_mmu_roots.kvm_tdp_mmu_zap_invalidated_roots(kvm)


def kvm_mmu_zap_sp_at(kvm, root, gfn, level):
    """Zap the level-`level` table on gfn's path below `root` as NX recovery zaps one
    table (kvm_tdp_mmu_zap_sp, then a full flush).  False, nothing done, if none is
    linked."""
    sp = tdp_mmu.tdp_mmu_find_sp(kvm, root, gfn, level)
    if sp is None or not tdp_mmu.kvm_tdp_mmu_zap_sp(kvm, sp):
        return False
    kvm_flush_remote_tlbs(kvm)
    return True


def kvm_arch_flush_shadow_memslot(kvm, slot):
    """A memslot is being deleted or moved: 6.10 zaps everything (kvm_mmu_zap_all_fast)."""
    kvm_mmu_zap_all_fast(kvm)


def kvm_mmu_invalidate_mmio_sptes(kvm, gen):
    """After each memslots swap: when the MMIO generation wraps (ignoring the address-space
    bit: generations step by 2), an MMIO SPTE from 2**18 swaps ago would look current
    again, so every root goes (kvm_mmu_zap_all_fast)."""
    gen &= MMIO_SPTE_GEN_MASK
    gen &= ~(memslots.KVM_ADDRESS_SPACE_NUM - 1)
    if gen == 0:
        kvm_mmu_zap_all_fast(kvm)


# =================================================================================================
# A batch of faults (the vCPU's run loop, exits delivered by the caller)
# =================================================================================================

#: A batch enters the guest (obsolete roots, kvm_mmu_reload) before every chunk of this many.
KVM_BATCH_CHUNK = 1024


def kvm_mmu_page_fault_batch(vcpu, gfns, error_codes, out):
    """Fault every gfn in order with its error code.  A RETRY is faulted again (the guest
    would fault again), counted in "retry"; "fast" counts the faults fast_page_fault
    resolved.  OutOfMemory carries .completed."""
    counts = {"fixed": 0, "spurious": 0, "retry": 0, "emulate": 0, "fast": 0}
    for k, (gfn, error_code) in enumerate(zip(gfns, error_codes)):
        try:
            if k % KVM_BATCH_CHUNK == 0:
                kvm_vcpu_enter_guest(vcpu)
            while True:
                fast_before = vcpu.stat["faults_fast"]
                ret = kvm_mmu_page_fault(vcpu, gfn, error_code)
                counts["fast"] += vcpu.stat["faults_fast"] - fast_before
                if ret != PF.RETRY:
                    break
                counts["retry"] += 1
        except OutOfMemory as e:
            raise OutOfMemory(f"page pool exhausted after {k} faults ({e})",
                              completed=k) from e
        counts[PF_STATS[ret][len("faults_"):]] += 1
        if out is not None:
            out[k] = int(ret)
    return counts
