# =====================================================================================
# core/x86.pxi: running a vCPU (≈ the page-fault side of arch/x86/kvm/x86.c's vcpu_run)
# =====================================================================================
# A batch of faults is what a vCPU thread does between two returns to its VMM: fault after
# fault with the GIL released, re-entering on RETRY as KVM re-enters the guest.  The lock
# order everywhere: the vCPU's mutex (its cache's lock), mmu_lock, pool.lock.

cdef enum:
    FAULT_CHUNK = 1024          # faults per read-side section: zaps get in between chunks
    RETRY_CHECK = 1 << 16       # RETRYs of one fault (or lost races of one zap) before the
                                # caller checks for signals
    BATCH_INTERRUPTIBLE = 1     # the batch stopped so that signals can be checked
    PREFETCH_DISTANCE = 12


cdef inline void _prefetch_leaf(kvm_t* kvm, gfn_t gfn) noexcept nogil:
    """Walk the upper levels (cache-resident) and prefetch the 4K entry of a later fault,
    so the leaf-table misses of a batch overlap instead of queueing one by one."""
    cdef int level = kvm.root_level
    cdef tdp_ptep_t table = kvm_root_pt(kvm)
    cdef u64 spte
    while level > 1:
        spte = kvm_tdp_mmu_read_spte(table + spte_index(gfn, level))
        if not is_shadow_present_pte(spte) or is_large_pte(spte):
            return
        table = spte_to_child_pt(kvm, spte)
        level -= 1
    spte_prefetch(table + spte_index(gfn, 1))


cdef int vcpu_fault(kvm_vcpu_t* vcpu, gfn_t gfn, bint write, bint exec) noexcept nogil:
    """One fault as Vcpu.fault makes it: the vCPU's mutex, mmu_lock for read, the fault."""
    cdef int r
    pthread_mutex_lock(&vcpu.mmu_shadow_page_cache.lock)
    kvm_mmu_read_lock(vcpu.kvm, vcpu.vcpu_idx)
    vcpu.hint.valid = False                 # a new entry to the read side
    r = kvm_mmu_do_page_fault(vcpu, gfn, fault_error_code(write, exec))
    kvm_mmu_read_unlock(vcpu.kvm, vcpu.vcpu_idx)
    pthread_mutex_unlock(&vcpu.mmu_shadow_page_cache.lock)
    rcu_reclaim_pending(vcpu.kvm)
    return r


cdef int vcpu_fault_batch(kvm_vcpu_t* vcpu, const gfn_t* gfns, const uint8_t* access,
                          int8_t* out, Py_ssize_t n, int64_t* counts,
                          Py_ssize_t* done) noexcept nogil:
    """The batch from ``done[0]`` on: fault, re-fault on RETRY.

    Returns 0 when every fault is done, -SPTE_ENOMEM / -SPTE_EIO from a fault,
    -SPTE_EINVAL for a gfn beyond the address width (the caller checked them, but another
    thread may rewrite the array meanwhile), or BATCH_INTERRUPTIBLE after RETRY_CHECK
    RETRYs of one fault: the caller checks for signals (Ctrl-C) before it resumes.

    Results are counted once, in the vCPU's stat.faults; ``counts`` (by RET_PF_*) receives
    what this batch added to them, read per read-side section while the vCPU's mutex keeps
    every other caller of this vCPU out.
    """
    cdef kvm_t* kvm = vcpu.kvm
    cdef kvm_mmu_memory_cache_t* mc = vcpu.mmu_shadow_page_cache
    cdef Py_ssize_t i = done[0], chunk_end
    cdef int r = 0, k
    cdef int64_t retries
    cdef int64_t before[6]
    cdef gfn_t gfn
    cdef u64 error_code = 0
    while i < n and r >= 0:
        chunk_end = min(n, i + FAULT_CHUNK)
        pthread_mutex_lock(&mc.lock)
        kvm_mmu_read_lock(kvm, vcpu.vcpu_idx)
        vcpu.hint.valid = False             # the hint lives only inside one read side
        memcpy(before, vcpu.stat.faults, sizeof(before))
        while i < chunk_end:
            # Prefetch only when a later fault enters another leaf table (random access).
            if i + PREFETCH_DISTANCE < n and \
                    (gfns[i + PREFETCH_DISTANCE] ^ gfns[i + PREFETCH_DISTANCE - 1]) >> 9:
                _prefetch_leaf(kvm, gfns[i + PREFETCH_DISTANCE])
            if access != NULL:
                error_code = fault_error_code(access[i] & 1, (access[i] >> 1) & 1)
            gfn = spte_load_acquire(<const u64*>&gfns[i])   # one read: the array is the caller's
            if gfn >= kvm.gfn_limit:
                r = -SPTE_EINVAL
                break
            retries = 0
            while True:
                r = kvm_mmu_do_page_fault(vcpu, gfn, error_code)
                if r != RET_PF_RETRY:
                    break
                retries += 1
                if retries == RETRY_CHECK:
                    break
            if r < 0 or r == RET_PF_RETRY:
                break
            if out != NULL:
                out[i] = <int8_t>r
            i += 1
        for k in range(6):
            counts[k] += vcpu.stat.faults[k] - before[k]
        kvm_mmu_read_unlock(kvm, vcpu.vcpu_idx)
        pthread_mutex_unlock(&mc.lock)
        rcu_reclaim_pending(kvm)
        if r == RET_PF_RETRY:
            done[0] = i
            return BATCH_INTERRUPTIBLE
    done[0] = i
    return r if r < 0 else 0
