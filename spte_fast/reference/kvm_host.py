"""The state of one VM and of its vCPUs: ``struct kvm`` and ``struct kvm_vcpu``.

Models the parts of Linux v6.10's ``include/linux/kvm_host.h`` and
``arch/x86/include/asm/kvm_host.h`` (``struct kvm_arch``, ``struct kvm_vcpu_arch``, the VM
and vCPU stats) that the TDP MMU model uses.  These are plain records: the functions of
the other modules take one as their first argument, as KVM's C does, and ``api.py`` wraps
them in the public ``Vm`` / ``Vcpu``.

Counters: each event is counted once, where KVM counts it.  Fault results are per-vCPU
(``vcpu->stat.pf_*``), page-initialisation work belongs to the memory cache that did it,
everything else is VM-wide (``kvm->stat``); ``vm.stats`` sums them when read.
"""
from ..errors import WARN_REASONS
from .mmu_cache import MemoryCache
from .pool import PagePool
from .spte import (KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE, gfn_round_for_level,
                   kvm_mmu_init_mmio_masks, pages_per_hpage)

#: gfn bits of the guest physical address width: 48-bit (4 levels) and 57-bit (5 levels).
GPA_WIDTH_GFN_BITS = {4: 36, 5: 45}

#: VM-wide counters (``kvm->stat`` and the model's own accounting), in ``vm.stats`` order.
KVM_STATS = (
    "pages_4k", "pages_2m", "pages_1g",
    "pt_pages", "pt_pages_l1", "pt_pages_l2", "pt_pages_l3", "pt_pages_l4", "pt_pages_l5",
    "tables_allocated", "tables_freed",
    "tlb_flushes", "tlb_flushes_ranged", "cas_failures",
    "spte_changes", "nx_lpage_splits", "mmio_sptes_created",
    "huge_pages_split", "nx_huge_pages_recovered",
)

#: Per-vCPU counters, in ``vcpu.stats`` order: the result of every fault (KVM's
#: ``vcpu->stat.pf_fixed`` etc.), the faults fast_page_fault resolved (``pf_fast``), and the
#: hardware's work: walks, accessed/dirty bits it set, and its exits by reason.
VCPU_STATS = ("faults_fixed", "faults_spurious", "faults_retry", "faults_emulate",
              "faults_fast", "hw_walks", "hw_ad_sets", "exits_ept_violation",
              "exits_misconfig", "exits_pml_full", "pml_logged", "dirty_pages_marked",
              "guest_walks", "guest_walk_refs", "guest_faults", "guest_ad_sets")

KVM_MAX_VCPUS = 256


class Kvm:
    """``struct kvm`` with its ``kvm_arch``: the TDP MMU roots over a pool of page tables.

    Built empty by ``api.Vm``: there is no root until a vCPU enters the guest
    (``mmu.kvm_mmu_load`` -> ``tdp_mmu_roots.kvm_tdp_mmu_alloc_root``).
    """

    def __init__(self, layout, root_level, max_level, max_pt_pages, nx_huge_pages, poison,
                 host_maxphyaddr, manual_dirty_log_protect=False, dirty_log_initially_set=False,
                 enable_pml=False, eager_page_split=True, nx_huge_pages_recovery_ratio=60):
        self.layout = layout                  # the SPTE masks of the paging mode
        self.root_level = root_level          # 4 or 5 (the roots' role.level)
        self.max_level = max_level            # KVM_MAX_HUGEPAGE_LEVEL of this model
        self.nx_huge_pages = nx_huge_pages    # is_nx_huge_page_enabled(kvm)
        self.gfn_limit = 1 << GPA_WIDTH_GFN_BITS[root_level]  # exclusive bound on gfns
        # shadow_phys_bits (host MAXPHYADDR) and kvm_mmu_max_gfn() with TDP enabled.
        self.host_maxphyaddr = host_maxphyaddr
        self.max_gfn = (1 << (host_maxphyaddr - 12)) - 1
        # shadow_mmio_value / _mask / _access_mask, enable_mmio_caching, and the lower-gfn
        # mask of get_mmio_spte_gfn (spte.kvm_mmu_init_mmio_masks sets them).
        self.enable_mmio_caching = False
        self.shadow_mmio_value = 0
        self.shadow_mmio_mask = 0
        self.shadow_mmio_access_mask = 0
        self.mmio_gfn_mask = 0
        kvm_mmu_init_mmio_masks(self)
        self.pool = PagePool(max_pt_pages, poison=poison)
        self.tdp_mmu_roots = []               # kvm->arch.tdp_mmu_roots, newest first
        self.mmu_pages = {}                   # pool index -> kvm_mmu_page (page_private)
        self.possible_nx_huge_pages = []      # kvm->arch.possible_nx_huge_pages, FIFO
        self.memslots = {}                    # slot id -> KvmMemorySlot
        self.host_memory = {}                 # host pfn -> its 512 words, once written
        self.next_slot_id = 0
        # kvm_memslots(kvm)->generation of address space 0: +2 per swap (two address
        # spaces on x86 with SMM); MMIO SPTEs carry it & MMIO_SPTE_GEN_MASK.
        self.memslots_generation = 0
        self.host_accessed = set()            # host pfns whose "accessed" flag KVM set
        self.host_dirty = set()               # host pfns whose "dirty" flag KVM set
        self.vcpus = []                       # KvmVcpu, in creation order
        self.stat = dict.fromkeys(KVM_STATS, 0)
        self.warnings = dict.fromkeys(WARN_REASONS, 0)  # the VM's own WARN_ON_ONCEs
        self.cas_failures_to_inject = 0       # test hook: CASes that lose their race
        # Dirty logging (spec §3.12): KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and its
        # KVM_DIRTY_LOG_INITIALLY_SET flag (kvm->manual_dirty_log_protect), the enable_pml,
        # eager_page_split and nx_huge_pages_recovery_ratio module parameters, and
        # kvm->nr_memslots_dirty_logging (which turns the CPU's PML on while non-zero).
        self.manual_dirty_log_protect = manual_dirty_log_protect
        self.dirty_log_initially_set = dirty_log_initially_set
        self.enable_pml = enable_pml
        self.eager_page_split = eager_page_split
        self.nx_huge_pages_recovery_ratio = nx_huge_pages_recovery_ratio
        self.nr_memslots_dirty_logging = 0


class KvmVcpu:
    """``struct kvm_vcpu``: its shadow-page memory cache, its root, its MMIO info cache
    and its counters."""

    def __init__(self, kvm):
        self.kvm = kvm
        # mmu_shadow_page_cache: init_value = the non-present value; gfp_zero only when
        # that value is 0 (spec §1.3).
        self.cache = MemoryCache(kvm.pool, init_value=kvm.layout.nonpresent_value,
                                 capacity=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE)
        self.root = None                      # vcpu->arch.mmu->root: a kvm_mmu_page or None
        self.mmio_gfn = 0                     # vcpu->arch.mmio_gfn (0: nothing cached)
        self.mmio_gen = 0                     # vcpu->arch.mmio_gen
        self.pml_buf = []                     # the page-modification log: gfns, <= 512
        self.guest_cr3 = None                 # the guest's CR3 (None: paging off)
        self.guest_levels = 4                 # 4- or 5-level guest paging (CR4.LA57)
        self.stat = dict.fromkeys(VCPU_STATS, 0)


def kvm_vm_ioctl_create_vcpu(kvm):
    """A new vCPU of `kvm` (the caller checked KVM_MAX_VCPUS)."""
    vcpu = KvmVcpu(kvm)
    kvm.vcpus.append(vcpu)
    return vcpu


def kvm_warn(kvm, reason):
    """WARN_ON_ONCE in the MMU: counted under its reason (``errors.WARN_REASONS``)."""
    kvm.warnings[reason] += 1


def kvm_flush_remote_tlbs(kvm):
    """A full remote TLB flush (counted; there is no TLB to flush)."""
    kvm.stat["tlb_flushes"] += 1


def kvm_flush_remote_tlbs_range(kvm, start_gfn, pages):
    """A ranged remote TLB flush of [start_gfn, start_gfn + pages) (counted)."""
    kvm.stat["tlb_flushes_ranged"] += 1


def kvm_flush_remote_tlbs_gfn(kvm, gfn, level):
    """Flush the page (huge or not) that maps gfn at `level`."""
    kvm_flush_remote_tlbs_range(kvm, gfn_round_for_level(gfn, level), pages_per_hpage(level))


def kvm_caches(kvm):
    """Every memory cache of the VM: each vCPU's (roots come from them too)."""
    return [vcpu.cache for vcpu in kvm.vcpus]


def kvm_stats(kvm):
    """vm.stats: the VM's counters, the vCPUs' fault counts, the caches' work, warnings."""
    stats = {key: sum(vcpu.stat[key] for vcpu in kvm.vcpus) for key in VCPU_STATS}
    stats.update(kvm.stat)
    caches = [cache.stats for cache in kvm_caches(kvm)]
    stats["cache_fills"] = sum(s["fills"] for s in caches)
    stats["cache_zero_inits"] = sum(s["zero_inits"] for s in caches)
    stats["init_bytes_written"] = sum(s["init_bytes_written"] for s in caches)
    stats["warnings"] = sum(kvm_warnings_by_reason(kvm).values())
    return {key: stats[key] for key in STATS_ORDER}


def kvm_warnings_by_reason(kvm):
    """Every reason of ``errors.WARN_REASONS``, in order: the VM's own count plus those of
    every vCPU cache."""
    counts = dict(kvm.warnings)
    for cache in kvm_caches(kvm):
        for reason, n in cache.warnings_by_reason.items():
            counts[reason] += n
    return counts


#: The keys of vm.stats, in the order docs/API.md lists them.
STATS_ORDER = (
    "faults_fixed", "faults_spurious", "faults_retry", "faults_emulate", "faults_fast",
    "pages_4k", "pages_2m", "pages_1g",
    "pt_pages", "pt_pages_l1", "pt_pages_l2", "pt_pages_l3", "pt_pages_l4", "pt_pages_l5",
    "tables_allocated", "tables_freed",
    "cache_fills", "cache_zero_inits", "init_bytes_written",
    "tlb_flushes", "tlb_flushes_ranged", "cas_failures", "warnings",
    "spte_changes", "nx_lpage_splits", "mmio_sptes_created",
    "hw_walks", "hw_ad_sets", "exits_ept_violation", "exits_misconfig",
    "exits_pml_full", "pml_logged", "dirty_pages_marked", "huge_pages_split",
    "nx_huge_pages_recovered",
    "guest_walks", "guest_walk_refs", "guest_faults", "guest_ad_sets",
)
