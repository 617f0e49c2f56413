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
    PREFETCH_EXIT_RATIO = 8     # access_batch prefetches while >= 1 in 8 accesses exits


cdef inline int vcpu_enter(kvm_vcpu_t* vcpu) noexcept nogil:
    """Enter the guest: the vCPU's mutex, mmu_lock for read, then the requests and the root
    (kvm_mmu_reload).  0, or the error (and then nothing is held)."""
    cdef int r
    pthread_mutex_lock(&vcpu.mmu_shadow_page_cache.lock)
    kvm_mmu_read_lock(vcpu.kvm, vcpu.vcpu_idx)
    vcpu.hint.valid = False                 # the hint lives only inside one read side
    r = kvm_mmu_reload(vcpu)
    if r < 0:
        vcpu_exit(vcpu)
    return r


cdef void vmx_flush_pml_buffer(kvm_vcpu_t* vcpu) noexcept nogil:
    """vmx_flush_pml_buffer: every logged gfn marked dirty (kvm_vcpu_mark_page_dirty, a
    no-op for a slot without dirty logging), the log emptied."""
    cdef int i
    cdef gfn_t gfn
    for i in range(vcpu.pml_count):
        gfn = vcpu.pml_buf[i]
        mark_page_dirty_in_slot(vcpu.kvm, &vcpu.stat, kvm_vcpu_gfn_to_memslot(vcpu, gfn), gfn)
    vcpu.pml_count = 0


cdef inline void vcpu_exit(kvm_vcpu_t* vcpu) noexcept nogil:
    """Leave: mmu_lock, the vCPU's mutex, then free what the grace period released.  A
    return to the VMM is a VM exit, which flushes the PML buffer (__vmx_handle_exit)."""
    if vcpu.pml_count:
        vmx_flush_pml_buffer(vcpu)
    kvm_mmu_read_unlock(vcpu.kvm, vcpu.vcpu_idx)
    pthread_mutex_unlock(&vcpu.mmu_shadow_page_cache.lock)
    rcu_reclaim_pending(vcpu.kvm)


cdef inline void _prefetch_ahead(const hw_tlb_fill_t* f, const gfn_t* gfns, Py_ssize_t i,
                                 Py_ssize_t n) noexcept nogil:
    """Prefetch the leaf of the item PREFETCH_DISTANCE ahead when it enters another leaf
    table than the one before it (random access; sequential access needs none)."""
    if i + PREFETCH_DISTANCE < n and \
            (gfns[i + PREFETCH_DISTANCE] ^ gfns[i + PREFETCH_DISTANCE - 1]) >> 9:
        hw_prefetch_leaf(f, gfns[i + PREFETCH_DISTANCE])


cdef int vcpu_fault_error_code(kvm_vcpu_t* vcpu, gfn_t gfn, u64 error_code) noexcept nogil:
    """One fault as Vcpu.fault makes it: enter, the fault, leave."""
    cdef int r = vcpu_enter(vcpu)
    if r == 0:
        r = kvm_mmu_page_fault(vcpu, gfn, error_code)
        vcpu_exit(vcpu)
    return r


cdef int vcpu_fault(kvm_vcpu_t* vcpu, gfn_t gfn, bint write, bint exec) noexcept nogil:
    """A not-present fault for a read, write or instruction fetch."""
    return vcpu_fault_error_code(vcpu, gfn, fault_error_code(write, exec))


cdef int vcpu_fault_batch(kvm_vcpu_t* vcpu, const gfn_t* gfns, const uint8_t* access,
                          const u64* error_codes, int8_t* out, Py_ssize_t n,
                          int64_t* counts, Py_ssize_t* done) noexcept nogil:
    """The batch from ``done[0]`` on: fault, re-fault on RETRY.

    Returns 0 when every fault is done, -SPTE_ENOMEM / -SPTE_EIO from a fault (or from
    loading the root), -SPTE_EINVAL for a gfn beyond the address width (the caller checked
    them, but another thread may rewrite the array meanwhile), or BATCH_INTERRUPTIBLE after
    RETRY_CHECK RETRYs of one fault: the caller checks for signals (Ctrl-C) before it
    resumes.

    ``counts`` (NR_BATCH_COUNTS, by RET_PF_*, then fast) counts every result of
    kvm_mmu_page_fault, including those of handle_mmio_page_fault that KVM's pf_* stats
    leave out; "fast" is what this batch added to pf_fast.
    """
    cdef kvm_t* kvm = vcpu.kvm
    cdef Py_ssize_t i = done[0], chunk_end
    cdef int r = 0
    cdef int64_t retries
    cdef int64_t fast_before
    cdef gfn_t gfn
    cdef u64 error_code = 0
    cdef hw_tlb_fill_t f
    while i < n and r >= 0:
        chunk_end = min(n, i + FAULT_CHUNK)
        r = vcpu_enter(vcpu)
        if r < 0:
            break
        hw_tlb_fill_setup(vcpu, &f)         # for the prefetch: the root stays for the section
        fast_before = vcpu.stat.faults_fast
        while i < chunk_end:
            _prefetch_ahead(&f, gfns, i, n)
            if error_codes != NULL:
                error_code = error_codes[i]
            elif access != NULL:
                error_code = fault_error_code(access[i] & 1, (access[i] >> 1) & 1)
            gfn = spte_load_acquire(<const u64*>&gfns[i])   # one read: the array is the caller's
            if gfn >= kvm.gfn_limit:
                r = -SPTE_EINVAL
                break
            retries = 0
            while True:
                r = kvm_mmu_page_fault(vcpu, gfn, error_code)
                if r < 0:
                    break
                counts[r] += 1              # every result, handle_mmio_page_fault's too
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
        counts[COUNT_FAST] += vcpu.stat.faults_fast - fast_before
        vcpu_exit(vcpu)
        if r == RET_PF_RETRY:
            done[0] = i
            return BATCH_INTERRUPTIBLE
    done[0] = i
    return r if r < 0 else 0


# -- the hardware view: accesses ----------------------------------------------------------

cdef enum:
    EXIT_PML_FULL = 1 << 9          # hw_vm_exit: a PML-full exit, nothing to do but re-execute


cdef inline int hw_vm_exit(kvm_vcpu_t* vcpu, gfn_t gfn, int ex, int acc, bint leaf_present,
                           u64 extra) noexcept nogil:
    """The VM exit the walker's verdict ``ex`` raises (not HW_HIT): the PML flush every exit
    starts with; a PML-full exit (handle_pml_full) does nothing else and returns
    EXIT_PML_FULL; else the exit is counted by reason and its error code (the exit
    handler's, | ``extra``) handed to kvm_mmu_page_fault: RET_PF_* or -SPTE_E*."""
    if vcpu.pml_count:
        vmx_flush_pml_buffer(vcpu)
    if ex == HW_PML_FULL:
        vcpu.stat.exits_pml_full += 1
        return EXIT_PML_FULL
    if ex == HW_VIOLATION:
        vcpu.stat.exits_ept_violation += 1
    else:
        vcpu.stat.exits_misconfig += 1
    return kvm_mmu_page_fault(vcpu, gfn,
                              tdp_exit_error_code(vcpu.kvm, ex, acc, leaf_present) | extra)


cdef int kvm_access_one(kvm_vcpu_t* vcpu, gfn_t gfn, int acc, int64_t* counts,
                        const hw_tlb_fill_t* f, int ex) noexcept nogil:
    """One access inside the read side, to completion: walk; on an exit hand the error code
    to kvm_mmu_page_fault and, unless it was emulated, let the guest re-execute (walk
    again).  0 (no exit) or the RET_PF_* of the last exit; -SPTE_E* from a fault;
    ACCESS_INTERRUPTED after RETRY_CHECK re-executions.

    ``ex``: the first walk's verdict from the hit walker, HW_VIOLATION (a not-present
    entry) or HW_UNDECIDED (walk in full).  ``f`` (NULL for none): the section's hit
    walker, which a re-execution tries first: its HW_HIT and HW_VIOLATION are
    hw_tdp_walk's (one walk counted, nothing set), anything else walks in full."""
    cdef int r = 0
    cdef int64_t reexec = 0
    cdef bint leaf_present = False
    cdef int x
    while True:
        if ex == HW_UNDECIDED:
            ex = hw_tdp_walk(vcpu, gfn, acc, &leaf_present)
            if ex == HW_HIT:
                return r
        else:
            vcpu.stat.hw_walks += 1
            leaf_present = False
        x = hw_vm_exit(vcpu, gfn, ex, acc, leaf_present, 0)
        if x == EXIT_PML_FULL:
            reexec += 1
            if reexec == RETRY_CHECK:
                return ACCESS_INTERRUPTED
            ex = HW_UNDECIDED
            continue
        if x < 0:
            return x
        r = x
        counts[r] += 1
        if r == RET_PF_EMULATE:
            return r                        # the emulator performs the access
        reexec += 1
        if reexec == RETRY_CHECK:
            return ACCESS_INTERRUPTED
        ex = hw_walk_hits(f, gfn, acc) if f != NULL else HW_UNDECIDED
        if ex == HW_HIT:
            vcpu.stat.hw_walks += 1
            return r


cdef int vcpu_access(kvm_vcpu_t* vcpu, gfn_t gfn, bint write, bint exec) noexcept nogil:
    cdef int64_t counts[NR_BATCH_COUNTS]
    cdef int r
    cdef int acc = ACC_WRITE if write else (ACC_FETCH if exec else ACC_READ)
    memset(counts, 0, sizeof(counts))
    r = vcpu_enter(vcpu)
    if r == 0:
        r = kvm_access_one(vcpu, gfn, acc, counts, NULL, HW_UNDECIDED)
        vcpu_exit(vcpu)
    return r


cdef int vcpu_tlb_fill(kvm_vcpu_t* vcpu, gfn_t gfn, int acc, int64_t* counts,
                       hw_tlb_entry_t* e) noexcept nogil:
    """A TLB miss of an emulated CPU: the access to completion, as access_batch runs one
    (the hit walker first), then the entry the TLB caches (hw_tlb_entry) -- none when the
    access was emulated.  The _core.pxd prototype documents the results."""
    cdef int r, ex
    cdef int64_t fast_before
    cdef hw_tlb_fill_t f
    e.level = 0
    e.perms = 0
    if gfn >= vcpu.kvm.gfn_limit or acc < ACC_READ or acc > ACC_FETCH:
        return -SPTE_EINVAL
    r = vcpu_enter(vcpu)
    if r < 0:
        return r
    hw_tlb_fill_setup(vcpu, &f)
    fast_before = vcpu.stat.faults_fast
    ex = hw_walk_hits(&f, gfn, acc)
    if ex == HW_HIT:
        vcpu.stat.hw_walks += 1
        r = 0
    else:
        r = kvm_access_one(vcpu, gfn, acc, counts, &f, ex)
    if r == 0:
        counts[0] += 1
    counts[COUNT_FAST] += vcpu.stat.faults_fast - fast_before
    if r >= 0 and r != RET_PF_EMULATE and r != ACCESS_INTERRUPTED:
        hw_tlb_entry(vcpu, gfn, e)
    vcpu_exit(vcpu)
    return r


cdef int vcpu_access_batch(kvm_vcpu_t* vcpu, const gfn_t* gfns, const uint8_t* access,
                           int8_t* out, Py_ssize_t n, int64_t* counts,
                           Py_ssize_t* done) noexcept nogil:
    """The accesses from ``done[0]`` on, as vcpu_fault_batch runs faults (chunks of
    FAULT_CHUNK per read-side section).  ``counts``: index 0 the accesses that caused no
    exit, RET_PF_* the exits' results, COUNT_FAST the exits fast_page_fault resolved.

    An access whose walk changes nothing and raises nothing (hw_walk_hits) is counted
    here; any other goes through kvm_access_one with the hit walker's verdict."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef Py_ssize_t i = done[0], chunk_end
    cdef int r = 0
    cdef gfn_t gfn
    cdef int acc = ACC_READ, ex
    cdef int64_t hits, fast_before
    cdef hw_tlb_fill_t f
    cdef Py_ssize_t chunk_start
    cdef bint prefetch = True
    while i < n and r >= 0:
        chunk_start = i
        chunk_end = min(n, i + FAULT_CHUNK)
        r = vcpu_enter(vcpu)
        if r < 0:
            break
        hw_tlb_fill_setup(vcpu, &f)         # the root stays for the whole section
        hits = 0
        fast_before = vcpu.stat.faults_fast
        while i < chunk_end:
            if prefetch:
                _prefetch_ahead(&f, gfns, i, n)
            if access != NULL:
                acc = access[i]
                if acc > ACC_FETCH:
                    r = -SPTE_EINVAL
                    break
            gfn = spte_load_acquire(<const u64*>&gfns[i])
            if gfn >= kvm.gfn_limit:
                r = -SPTE_EINVAL
                break
            ex = hw_walk_hits(&f, gfn, acc)
            if ex == HW_HIT:
                hits += 1
                r = 0
            else:
                r = kvm_access_one(vcpu, gfn, acc, counts, &f, ex)
                if r < 0 or r == ACCESS_INTERRUPTED:
                    break
                if r == 0:
                    counts[0] += 1
            if out != NULL:
                out[i] = <int8_t>r
            i += 1
        counts[0] += hits
        counts[COUNT_FAST] += vcpu.stat.faults_fast - fast_before
        vcpu.stat.hw_walks += hits
        prefetch = (i - chunk_start - hits) * PREFETCH_EXIT_RATIO >= i - chunk_start
        vcpu_exit(vcpu)
        if r == ACCESS_INTERRUPTED:
            done[0] = i
            return BATCH_INTERRUPTIBLE
    done[0] = i
    return r if r < 0 else 0


# -- dirty logging (x86.c) ---------------------------------------------------------------

cdef void kvm_arch_sync_dirty_log(kvm_t* kvm, kvm_vcpu_t** vcpus, int n) noexcept nogil:
    """kvm_arch_sync_dirty_log (mmu_lock held for write here): kicking every vCPU out of the
    guest flushes its PML buffer into the dirty bitmaps."""
    cdef int i
    if not kvm.enable_pml:
        return
    for i in range(n):
        if vcpus[i].pml_count:
            vmx_flush_pml_buffer(vcpus[i])


cdef void kvm_mmu_slot_apply_flags(kvm_t* kvm, mmu_stats_t* st, kvm_memory_slot_t* slot,
                                   bint log_dirty_pages) noexcept nogil:
    """kvm_mmu_slot_apply_flags for a KVM_MR_FLAGS_ONLY change that toggled dirty logging
    on a writable slot (the caller checked).  Takes mmu_lock for read as KVM does.

    Off: zap the collapsible SPTEs so that huge pages come back.  On: nothing with manual
    protect + initially-all-set; else eager split to 4K, then with PML clear D on the leaves
    and write-protect from 2M, without PML write-protect from 4K; then one memslot flush,
    unconditionally."""
    kvm_mmu_read_lock(kvm, VM_READER)
    if not log_dirty_pages:
        kvm_mmu_zap_collapsible_sptes(kvm, st, slot)
        kvm_mmu_read_unlock(kvm, VM_READER)
        rcu_reclaim_pending(kvm)
        return
    if kvm.manual_dirty_log_protect and kvm.dirty_log_initially_set:
        kvm_mmu_read_unlock(kvm, VM_READER)
        return
    if kvm.eager_page_split:
        kvm_mmu_try_split_huge_pages(kvm, st, slot.base_gfn, slot.base_gfn + slot.npages, 1,
                                     True)
    if kvm.enable_pml:
        kvm_mmu_slot_leaf_clear_dirty(kvm, st, slot)
        kvm_mmu_slot_remove_write_access(kvm, st, slot, 2)
    else:
        kvm_mmu_slot_remove_write_access(kvm, st, slot, 1)
    kvm_mmu_read_unlock(kvm, VM_READER)
    st.tlb_flushes_ranged += 1              # kvm_flush_remote_tlbs_memslot
