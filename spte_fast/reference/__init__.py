"""Pure-Python oracle of spte_fast: the Linux KVM x86 TDP MMU's SPTEs, Linux v6.10.

This package is the slow, obviously-correct model that the Cython engine is tested
against.  It is written from the contract in ``docs/API.md`` and the semantics in
``KVM_MMU_SPEC.md`` (cited as "spec §n"), paraphrasing upstream Linux v6.10.  It shares no
code with the engine: every constant, mask and algorithm is defined here again, for
readability and not for speed (it imports only ``spte_fast.errors`` and ``spte_fast.pf``).

It is split the way KVM is:

=============  ==================================================================
``spte``       constants, ``SpteLayout`` (spte.h, spte.c)
``kernels``    memset64, scans, 64-bit atomics
``pool``       ``PagePool``: the page allocator of page tables
``mmu_cache``  ``MemoryCache``: kvm_mmu_memory_cache (kvm_main.c)
``kvm_host``   ``struct kvm`` / ``struct kvm_vcpu`` records, stats, WARN counting
``memslots``   memslot records and lookups, host page flags (kvm_main.c)
``tdp_iter``   the iterator and the SPTE read/write primitives (tdp_iter.c, .h)
``tdp_mmu``    kvm_mmu_page, setters, handle_changed_spte, map, zaps (tdp_mmu.c)
``tdp_mmu_roots`` the roots list, reference counts, invalidation, root zaps (tdp_mmu.c)
``mmu``        kvm_page_fault, the fault entry (error codes, MMIO, fast path), vCPU
               entry (kvm_mmu_load), huge-page adjust, NX list, zap_all_fast (mmu.c)
``hw``         the CPU: the hardware walk, A/D assists, VM exits (vmx.c, svm.c callers)
``audit``      ``vm.audit()``
``api``        ``Vm`` and ``Vcpu``: argument checks, then one call into the above
=============  ==================================================================

Module functions take the ``Kvm`` / ``KvmVcpu`` record first, as KVM's C takes
``struct kvm *``; KVM's ``__name`` is ``_name`` here (Python mangles ``__name`` inside a
class).  ``FROZEN_SPTE`` is the >= 6.11 name of v6.10's ``REMOVED_SPTE``; both names are
exported and mean the same value.  Places where API.md says nothing and a choice had to be
made are marked with a comment starting ``API.md is silent:``.
"""
from ..errors import AuditError, CacheConfigError, OutOfMemory, SpteError
from ..pf import PF
from .api import Vcpu, Vm
from .guest_walk import GUEST_PAGE_FAULT
from .hw import ACCESS_HIT
from .kernels import (atomic_and_not, atomic_or, cmpxchg, count_present, fill_pages,
                      scan_present, xchg)
from .mmu import (PFERR_FETCH_MASK, PFERR_PRESENT_MASK, PFERR_RSVD_MASK, PFERR_USER_MASK,
                  PFERR_WRITE_MASK)
from .mmu_cache import MemoryCache
from .pool import PagePool
from .spte import (ACC_ALL, ACC_EXEC_MASK, ACC_USER_MASK, ACC_WRITE_MASK,
                   DEFAULT_SPTE_HOST_WRITABLE, DEFAULT_SPTE_MMU_WRITABLE, EPT_SPTE_HOST_WRITABLE,
                   EPT_SPTE_MMU_WRITABLE, FROZEN_SPTE, FROZEN_SPTE_BITS,
                   KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE, MMIO_SPTE_GEN_HIGH_END,
                   MMIO_SPTE_GEN_HIGH_START, MMIO_SPTE_GEN_LOW_END, MMIO_SPTE_GEN_LOW_START,
                   MMIO_SPTE_GEN_MASK, NPT_MMIO_VALUE, PG_LEVEL_1G, PG_LEVEL_2M, PG_LEVEL_4K,
                   PT64_ROOT_MAX_LEVEL, PT_PAGE_SIZE_MASK, PT_PRESENT_MASK, PT_WRITABLE_MASK,
                   REMOVED_SPTE, SHADOW_ACC_TRACK_SAVED_BITS_MASK,
                   SHADOW_ACC_TRACK_SAVED_BITS_SHIFT, SHADOW_NONPRESENT_VALUE,
                   SPTE_BASE_ADDR_MASK, SPTE_ENT_PER_PAGE, SPTE_MMU_PRESENT_MASK,
                   SPTE_TDP_AD_DISABLED, SPTE_TDP_AD_ENABLED, SPTE_TDP_AD_MASK,
                   SPTE_TDP_AD_SHIFT, SPTE_TDP_AD_WRPROT_ONLY, VMX_EPT_MEMTYPE_WB_IPAT,
                   VMX_EPT_MISCONFIG_WX_VALUE, VMX_EPT_RWX_MASK, VMX_EPT_SUPPRESS_VE_BIT,
                   SpteLayout)

__all__ = [
    # constants
    "PG_LEVEL_4K", "PG_LEVEL_2M", "PG_LEVEL_1G", "PT64_ROOT_MAX_LEVEL",
    "SPTE_ENT_PER_PAGE", "KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE",
    "ACC_EXEC_MASK", "ACC_WRITE_MASK", "ACC_USER_MASK", "ACC_ALL",
    "SPTE_MMU_PRESENT_MASK", "SHADOW_NONPRESENT_VALUE",
    "FROZEN_SPTE", "REMOVED_SPTE", "FROZEN_SPTE_BITS",
    "SPTE_BASE_ADDR_MASK", "PT_PAGE_SIZE_MASK", "PT_WRITABLE_MASK", "PT_PRESENT_MASK",
    "SPTE_TDP_AD_SHIFT", "SPTE_TDP_AD_MASK", "SPTE_TDP_AD_ENABLED",
    "SPTE_TDP_AD_DISABLED", "SPTE_TDP_AD_WRPROT_ONLY",
    "SHADOW_ACC_TRACK_SAVED_BITS_MASK", "SHADOW_ACC_TRACK_SAVED_BITS_SHIFT",
    "EPT_SPTE_HOST_WRITABLE", "EPT_SPTE_MMU_WRITABLE",
    "DEFAULT_SPTE_HOST_WRITABLE", "DEFAULT_SPTE_MMU_WRITABLE",
    "VMX_EPT_SUPPRESS_VE_BIT", "VMX_EPT_RWX_MASK", "VMX_EPT_MISCONFIG_WX_VALUE",
    "VMX_EPT_MEMTYPE_WB_IPAT",
    "MMIO_SPTE_GEN_MASK", "MMIO_SPTE_GEN_LOW_START", "MMIO_SPTE_GEN_LOW_END",
    "MMIO_SPTE_GEN_HIGH_START", "MMIO_SPTE_GEN_HIGH_END", "NPT_MMIO_VALUE",
    "PFERR_PRESENT_MASK", "PFERR_WRITE_MASK", "PFERR_USER_MASK", "PFERR_RSVD_MASK",
    "PFERR_FETCH_MASK", "ACCESS_HIT", "GUEST_PAGE_FAULT",
    # page-fault results and errors
    "PF", "SpteError", "OutOfMemory", "CacheConfigError", "AuditError",
    # classes
    "SpteLayout", "PagePool", "MemoryCache", "Vm", "Vcpu",
    # kernels
    "fill_pages", "scan_present", "count_present",
    "cmpxchg", "xchg", "atomic_or", "atomic_and_not",
]
