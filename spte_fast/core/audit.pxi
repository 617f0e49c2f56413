# =====================================================================================
# core/audit.pxi: vm.audit(), the invariants of KVM_MMU_SPEC §6 checked on the whole VM
# =====================================================================================
# (≈ the old arch/x86/kvm/mmu/mmu_audit.c.)  Every failure is an AuditError whose
# `invariant` is one of spte_fast.errors.AUDIT_INVARIANTS, the same names the reference
# model uses.  It runs with every vCPU's mutex, mmu_lock for write and pool.lock held: a
# frozen page of the walk or a half-made table cannot be seen.

cdef int _audit_fail(str invariant, str what) except -1:
    raise AuditError(f"audit: {invariant}: {what}", invariant=invariant)


cdef int _audit_fail_at(str invariant, str what, gfn_t gfn, int level, u64 spte) except -1:
    return _audit_fail(invariant, f"{what} (gfn {gfn:#x}, level {level}, spte {spte:#018x})")


cdef int kvm_mmu_audit(Vm vm) except -1:
    cdef Vcpu v
    cdef list locked = []
    try:
        # The lock order of the fault path: every vCPU's mutex, mmu_lock, the pool's.
        for v in vm._vcpus:
            with nogil:
                pthread_mutex_lock(&v.cache.mc.lock)
            locked.append(v)
        with nogil:
            kvm_mmu_write_lock(&vm.kvm)
        try:
            with nogil:
                pthread_mutex_lock(&vm.pool.p.lock)
            try:
                _audit_locked(vm)
            finally:
                pthread_mutex_unlock(&vm.pool.p.lock)
        finally:
            kvm_mmu_write_unlock(&vm.kvm)
    finally:
        for v in locked:
            pthread_mutex_unlock(&v.cache.mc.lock)
    return 0


cdef int _audit_locked(Vm vm) except -1:
    cdef kvm_t* kvm = &vm.kvm
    cdef pool_t* p = kvm.pool
    cdef int64_t cap = p.capacity
    cdef cnp.ndarray seen_arr = np.zeros(cap, dtype=np.uint8)
    cdef uint8_t* seen = <uint8_t*>cnp.PyArray_DATA(seen_arr)
    cdef int64_t leaves[4]
    cdef int64_t tables[6]
    cdef vm_counters_t counters
    cdef mmu_stats_t* acc = &counters.st
    cdef int64_t i, idx, n_free, n_table = 0, linked = 0
    cdef Vcpu v
    vm._raise_fatal()
    memset(leaves, 0, sizeof(leaves))
    memset(tables, 0, sizeof(tables))
    _sum_counters(vm, &counters)
    _audit_roots(vm)
    for i in range(kvm.nr_roots):
        idx = kvm.roots[i]
        if p.sp[idx].ptep != NULL:
            _audit_fail("table-metadata", f"the root {idx} has a parent entry")
        _audit_table(kvm, idx, kvm.root_level, 0, seen, leaves, tables)
    for i in range(1, 4):
        if leaves[i] != acc.pages[i]:
            _audit_fail("page-stats", f"{leaves[i]} present leaves at level {i}, "
                        f"stats say {acc.pages[i]}")
    for i in range(1, 6):
        linked += tables[i]
        if tables[i] != acc.pt_pages[i]:
            _audit_fail("pt-pages", f"{tables[i]} linked tables at level {i}, "
                        f"stats say {acc.pt_pages[i]}")
    if acc.tables_allocated - acc.tables_freed != linked:
        _audit_fail("table-accounting", f"allocated {acc.tables_allocated} - freed "
                    f"{acc.tables_freed} != {linked} linked")
    _audit_possible_nx_huge_pages(kvm, seen)
    # Pool: every page exactly one of free, cached (one vCPU cache), linked once, parked.
    for i in range(cap):
        if p.state[i] == PAGE_TABLE and not seen[i] & 1:
            _audit_fail("pool-accounting", f"page {i} is a table but not linked")
    for i in range(p.free_top):
        idx = p.free_stack[i]
        if p.state[idx] != PAGE_FREE or seen[idx] & 2:
            _audit_fail("pool-accounting", f"free-list page {idx} is not free or listed twice")
        seen[idx] |= 2
    for i in range(p.next_fresh, cap):
        if p.state[i] != PAGE_FREE:
            _audit_fail("pool-accounting", f"never-used page {i} is not free")
    n_free = pool_nr_free(p)
    for v in vm._vcpus:
        for i in range(v.cache.mc.nobjs):
            idx = v.cache.mc.objects[i]
            if p.state[idx] != PAGE_CACHED or seen[idx] & 4:
                _audit_fail("pool-accounting", f"cached page {idx} is not in state cached "
                            "or is cached twice")
            seen[idx] |= 4
    for i in range(kvm.nr_rcu_pending):
        if p.state[kvm.rcu_pending[i]] != PAGE_PARKED:
            _audit_fail("pool-accounting", f"table {kvm.rcu_pending[i]} waiting for its "
                        "grace period is not in state parked")
    for i in range(cap):
        if p.state[i] == PAGE_FREE:
            n_free -= 1
        elif p.state[i] == PAGE_TABLE:
            n_table += 1
        elif p.state[i] == PAGE_RAW:
            _audit_fail("pool-accounting", f"page {i} was handed out by alloc(): neither "
                        "free, in a vCPU cache nor linked")
        elif p.state[i] == PAGE_CACHED and not seen[i] & 4:
            _audit_fail("pool-accounting", f"page {i} is held by a memory cache that is "
                        "not a vCPU's")
    if n_free != 0:
        _audit_fail("pool-accounting", "free list and page states disagree")
    return 0


cdef int _audit_roots(Vm vm) except -1:
    """Reference counts: one per vCPU using the root, plus the MMU's until invalidated; one
    valid root at most; every vCPU's root on the list; an invalid root that has been zapped
    holds only the non-present value."""
    cdef kvm_t* kvm = &vm.kvm
    cdef kvm_mmu_page_t* sp
    cdef int i, users, valid = 0
    cdef int64_t root
    cdef Vcpu v
    cdef list listed = [kvm.roots[i] for i in range(kvm.nr_roots)]
    for v in vm._vcpus:
        if v.vcpu.root >= 0 and v.vcpu.root not in listed:
            _audit_fail("roots", f"vCPU {v.vcpu.vcpu_idx}'s root {v.vcpu.root} is not on the "
                        "VM's list of roots")
    for i in range(kvm.nr_roots):
        root = kvm.roots[i]
        sp = pool_sp(kvm.pool, root)
        users = 0
        for v in vm._vcpus:
            users += v.vcpu.root == root
        valid += not sp.role_invalid
        if sp.root_count != users + (0 if sp.role_invalid else 1):
            _audit_fail("roots", f"root {root} ({'invalid' if sp.role_invalid else 'valid'}) "
                        f"has reference count {sp.root_count} with {users} vCPU(s) using it")
        if sp.role_invalid and not sp.scheduled_root_to_zap and \
                count_present_kernel(pool_page(kvm.pool, root),
                                     kvm.m.shadow_nonpresent_value) != 0:
            _audit_fail("roots", f"invalid root {root} was zapped but holds entries")
    if valid > 1:
        _audit_fail("roots", f"{valid} valid roots with the same role")
    return 0


cdef int _audit_possible_nx_huge_pages(kvm_t* kvm, uint8_t* seen) except -1:
    """The list holds exactly the linked tables marked as on it, each NX-disallowed, with
    consistent links, and its length is nx_lpage_splits."""
    cdef pool_t* p = kvm.pool
    cdef int64_t idx = kvm.possible_nx_head, prev = -1, n = 0, marked = 0, i
    cdef kvm_mmu_page_t* sp
    while idx >= 0:
        if idx >= p.capacity or n > p.capacity:
            _audit_fail("nx-huge-pages", "the possible-NX-huge-page list runs outside the "
                        "pool or loops")
        sp = &p.sp[idx]
        if not seen[idx] & 1 or not sp.nx_linked or not sp.nx_huge_page_disallowed or \
                sp.nx_prev != prev:
            _audit_fail_at("nx-huge-pages", f"table {idx} on the possible-NX-huge-page list is "
                        "not a linked NX-disallowed table, or its links are broken",
                        sp.gfn, sp.level, 0)
        prev = idx
        idx = sp.nx_next
        n += 1
    if prev != kvm.possible_nx_tail:
        _audit_fail("nx-huge-pages", "the list's tail is not its last table")
    for i in range(p.capacity):
        if p.state[i] == PAGE_TABLE and p.sp[i].nx_linked:
            marked += 1
    if n != kvm.nx_lpage_splits or marked != n:
        _audit_fail("nx-huge-pages", f"{n} tables on the list, {marked} marked, "
                    f"nx_lpage_splits {kvm.nx_lpage_splits}")
    return 0


cdef int _audit_table(kvm_t* kvm, int64_t t, int level, gfn_t base, uint8_t* seen,
                      int64_t* leaves, int64_t* tables) except -1:
    cdef pool_t* p = kvm.pool
    cdef const spte_masks_t* m = &kvm.m
    cdef kvm_mmu_page_t* sp = &p.sp[t]
    cdef tdp_ptep_t table = pool_page(p, t)
    cdef u64 e, child, expect
    cdef gfn_t g
    cdef int i
    cdef kvm_memory_slot_t* slot
    cdef bint ve = m.ept and (m.shadow_nonpresent_value & VMX_EPT_SUPPRESS_VE_BIT) != 0
    if seen[t] & 1:
        _audit_fail_at("linked-once", f"table {t} is linked twice", base, level, 0)
    seen[t] |= 1
    if p.state[t] != PAGE_TABLE or sp.level != level or sp.gfn != base or sp.spt != table:
        _audit_fail_at("table-metadata", f"table {t}: state {p.state[t]}, level {sp.level}, "
                    f"gfn {sp.gfn:#x}; expected a level-{level} table at", base, level, 0)
    tables[level] += 1
    for i in range(SPTE_ENT_PER_PAGE):
        e = table[i]
        g = base + <u64>i * pages_per_level(level)
        if e == m.shadow_nonpresent_value:
            continue
        if is_frozen_spte(m, e):
            _audit_fail_at("no-frozen-at-rest", "frozen SPTE left in a linked table", g, level, e)
        if is_mmio_spte(m, e):
            if level != 1:
                _audit_fail_at("mmio-level", "MMIO SPTE above 4K", g, level, e)
            if get_mmio_spte_gfn(m, e) != g:
                _audit_fail_at("mmio-gfn", "MMIO SPTE encodes another gfn", g, level, e)
            continue
        if not is_shadow_present_pte(e):
            _audit_fail_at("nonpresent-value", "non-present entry that is not the layout's "
                        f"non-present value {m.shadow_nonpresent_value:#x}", g, level, e)
        if ve and not (e & VMX_EPT_SUPPRESS_VE_BIT):
            _audit_fail_at("ept-suppress-ve", "present EPT SPTE without bit 63", g, level, e)
        if not is_last_spte(e, level):
            child = spte_to_pfn(e)
            expect = make_nonleaf_spte(m, child, m.ad_disabled)
            if e != expect:
                _audit_fail_at("nonleaf-encoding", f"expected {expect:#x}", g, level, e)
            if child >= <u64>p.capacity:
                _audit_fail_at("nonleaf-target", "child table outside the pool", g, level, e)
            if p.sp[child].ptep != table + i:
                _audit_fail_at("table-metadata", f"table {child}'s parent entry is not the entry "
                            "that links it", g, level, e)
            _audit_table(kvm, <int64_t>child, level - 1, g, seen, leaves, tables)
            continue
        if level > kvm.max_level:
            _audit_fail_at("leaf-level", f"leaf above max_level {kvm.max_level}", g, level, e)
        if not spte_writable_invariants_ok(m, e):
            _audit_fail_at("writable-state", "W without MMU-writable, or MMU-writable without "
                        "host-writable", g, level, e)
        slot = search_memslots(kvm, g)
        if slot == NULL or g + pages_per_level(level) > slot.base_gfn + slot.npages:
            _audit_fail_at("leaf-in-slot", "leaf outside every memslot", g, level, e)
        if spte_to_pfn(e) != gfn_to_pfn_memslot(slot, g):
            _audit_fail_at("leaf-pfn", f"pfn should be {gfn_to_pfn_memslot(slot, g):#x}",
                        g, level, e)
        if slot.flags & KVM_MEM_READONLY and (e & (PT_WRITABLE_MASK | m.shadow_host_writable_mask)):
            _audit_fail_at("readonly-slot", "writable leaf in a read-only slot", g, level, e)
        leaves[level] += 1
    return 0
