# =====================================================================================
# core/locking.pxi: mmu_lock and the grace period that stands for RCU
# =====================================================================================
# mmu_lock is a reader-writer lock (KVM's rwlock_t for the TDP MMU): faults hold it for
# read and change SPTEs only by compare-and-exchange; zaps and memslot changes hold it for
# write.  KVM frees a table removed under the read lock only after an RCU grace period,
# because another vCPU may still be walking it.  Here every vCPU publishes, while it is
# inside the read side, the grace-period sequence number it saw on entry
# (rcu_reader_seq[vcpu_idx], 0 outside); a removed table waits on kvm.rcu_pending with a
# new sequence number and goes back to the pool once every reader inside entered after
# it (core/mmu_page.pxi).  Taking mmu_lock for write (no readers at all) ends every grace
# period.  Lock order everywhere: a vCPU's mutex (its cache's lock), mmu_lock, pool.lock.

cdef inline void rcu_read_lock(kvm_t* kvm, int reader) noexcept nogil:
    u64_store_seq_cst(&kvm.rcu_reader_seq[reader], u64_load_seq_cst(&kvm.rcu_gp_seq))


cdef inline void rcu_read_unlock(kvm_t* kvm, int reader) noexcept nogil:
    u64_store_seq_cst(&kvm.rcu_reader_seq[reader], 0)


cdef bint rcu_other_readers(kvm_t* kvm, int self_reader) noexcept nogil:
    """Is another vCPU (or the VM's own read-side operation) inside the read side?  One
    entering after this check cannot reach a table unlinked before it: its walk starts
    after it publishes."""
    cdef int i
    if self_reader != VM_READER and u64_load_seq_cst(&kvm.rcu_reader_seq[VM_READER]) != 0:
        return True
    for i in range(kvm.nvcpus):
        if i != self_reader and u64_load_seq_cst(&kvm.rcu_reader_seq[i]) != 0:
            return True
    return False


cdef u64 rcu_oldest_reader_seq(kvm_t* kvm) noexcept nogil:
    """The smallest sequence number a reader inside the read side entered with (or ~0)."""
    cdef u64 oldest = 0xFFFFFFFFFFFFFFFF, e
    cdef int i
    for i in range(kvm.nvcpus + 1):
        e = u64_load_seq_cst(&kvm.rcu_reader_seq[VM_READER if i == kvm.nvcpus else i])
        if e != 0 and e < oldest:
            oldest = e
    return oldest


cdef void kvm_mmu_read_lock(kvm_t* kvm, int reader) noexcept nogil:
    """read_lock(&kvm->mmu_lock) plus rcu_read_lock for the vCPU `reader`."""
    pthread_rwlock_rdlock(&kvm.mmu_lock)
    rcu_read_lock(kvm, reader)


cdef void kvm_mmu_read_unlock(kvm_t* kvm, int reader) noexcept nogil:
    rcu_read_unlock(kvm, reader)
    pthread_rwlock_unlock(&kvm.mmu_lock)


cdef void kvm_mmu_write_lock(kvm_t* kvm) noexcept nogil:
    pthread_rwlock_wrlock(&kvm.mmu_lock)
    rcu_reclaim_pending(kvm)        # no reader is inside: every grace period has ended


cdef void kvm_mmu_write_unlock(kvm_t* kvm) noexcept nogil:
    pthread_rwlock_unlock(&kvm.mmu_lock)
