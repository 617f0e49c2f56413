# =====================================================================================
# core/kvm_stats.pxi: a VM's counters summed over its contexts (vm.stats, the audit)
# =====================================================================================
# Each context counts on its own (the VM's operations, every vCPU), so vCPU threads never
# share a counter; a reader sums them under mmu_lock for write (kvm_vm_stats / debugfs in
# KVM sum the per-vCPU counters the same way).


cdef inline void _stats_add(mmu_stats_t* acc, const mmu_stats_t* s) noexcept nogil:
    cdef int i
    for i in range(6):
        acc.faults[i] += s.faults[i]
        acc.pt_pages[i] += s.pt_pages[i]
    for i in range(4):
        acc.pages[i] += s.pages[i]
    for i in range(NR_MMU_WARN):
        acc.warn[i] += s.warn[i]
    acc.tables_allocated += s.tables_allocated
    acc.tables_freed += s.tables_freed
    acc.tlb_flushes += s.tlb_flushes
    acc.tlb_flushes_ranged += s.tlb_flushes_ranged
    acc.cas_failures += s.cas_failures
    acc.spte_changes += s.spte_changes
    acc.mmio_sptes_created += s.mmio_sptes_created
    acc.faults_fast += s.faults_fast
    acc.hw_walks += s.hw_walks
    acc.hw_ad_sets += s.hw_ad_sets
    acc.exits_ept_violation += s.exits_ept_violation
    acc.exits_misconfig += s.exits_misconfig
    acc.exits_pml_full += s.exits_pml_full
    acc.pml_logged += s.pml_logged
    acc.dirty_pages_marked += s.dirty_pages_marked
    acc.huge_pages_split += s.huge_pages_split
    acc.nx_huge_pages_recovered += s.nx_huge_pages_recovered
    acc.guest_walks += s.guest_walks
    acc.guest_walk_refs += s.guest_walk_refs
    acc.guest_faults += s.guest_faults
    acc.guest_ad_sets += s.guest_ad_sets


ctypedef struct vm_counters_t:
    mmu_stats_t st                      # the VM's own context plus every vCPU's
    cache_init_stats_t init             # every vCPU cache
    int64_t cache_warn[NR_CACHE_WARN]   # the same caches' warnings
    int64_t nx_lpage_splits


cdef void _sum_counters(Vm vm, vm_counters_t* c):
    """Every counter of the VM, summed over its contexts and caches (mmu_lock held)."""
    cdef Vcpu v
    cdef int i
    memset(c, 0, sizeof(vm_counters_t))
    _stats_add(&c.st, &vm.st)
    for v in vm._vcpus:
        _stats_add(&c.st, &v.vcpu.stat)
        _init_stats_add(&c.init, &v.cache.mc.init)
        for i in range(NR_CACHE_WARN):
            c.cache_warn[i] += v.cache.mc.warn[i]
    c.nx_lpage_splits = vm.kvm.nx_lpage_splits


cdef int _read_counters(Vm vm, vm_counters_t* c) except -1:
    """_sum_counters under mmu_lock for write: a consistent snapshot of every vCPU's."""
    with nogil:
        kvm_mmu_write_lock(&vm.kvm)
    try:
        _sum_counters(vm, c)
    finally:
        kvm_mmu_write_unlock(&vm.kvm)
    return 0
