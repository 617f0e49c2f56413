"""spte_fast._core: the Cython engine, one extension assembled from the parts below.

A model of the Linux KVM x86 MMU's shadow page-table entries as of Linux v6.10.  Each part
is named after the KVM source that holds the same concept; the C structs are in _core.pxd,
the SPTE layer in spte.pxd, the C helpers in include/.  Kernels are ``noexcept nogil`` and
never touch Python objects; the def layer validates arguments, calls kernels, and maps
their return codes in core/boundary.pxi.  Compiler directives live in setup.py only.
``FROZEN_SPTE`` is the >= 6.11 name of v6.10's ``REMOVED_SPTE``; both names are exported.
"""

cimport cython

include "core/spte.pxi"          # masks of a paging mode            (spte.c)
include "core/kernels.pxi"       # memset64 fill, sync_page scan
include "core/pool.pxi"          # page-table memory                 (the host's pages)
include "core/mmu_cache.pxi"     # kvm_mmu_memory_cache              (kvm_main.c)
include "core/memslots.pxi"      # memslot lookups, host page flags  (kvm_host.h)
include "core/locking.pxi"       # mmu_lock and the RCU grace period
include "core/mmu_page.pxi"      # struct kvm_mmu_page               (mmu_internal.h)
include "core/tdp_iter.pxi"      # SPTE reads/writes, the iterator   (tdp_iter.[ch])
include "core/tdp_mmu.pxi"       # setters, bookkeeping, map, zaps   (tdp_mmu.c)
include "core/mmu.pxi"           # page-fault entry, huge-page level (mmu.c)
include "core/hw.pxi"            # the CPU: EPT/NPT walker, exit codes (SDM, APM)
include "core/x86.pxi"           # a vCPU's faults and accesses     (x86.c)
include "core/dirty_log.pxi"     # KVM_GET/CLEAR_DIRTY_LOG           (kvm_main.c)
include "core/boundary.pxi"      # argument checks, _check_rc
include "core/api.pxi"           # constants, SpteLayout, kernels, PagePool, MemoryCache
include "core/guest_memory.pxi"  # guest memory as the VMM sees it    (kvm_main.c guest access)
include "core/guest_walk.pxi"    # the CPU: two-dimensional walks    (SDM §4.5, paging_tmpl.h)
include "core/kvm_stats.pxi"     # counters summed over contexts
include "core/kvm_main.pxi"      # Vm                                (kvm_main.c ioctls)
include "core/kvm_vcpu.pxi"      # Vcpu                              (kvm_main.c vCPU ioctls)
include "core/audit.pxi"         # vm.audit()                        (mmu_audit.c)
