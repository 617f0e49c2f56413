# =====================================================================================
# core/kvm_main.pxi: the VM and its vCPUs as Python objects (≈ virt/kvm/kvm_main.c's
# ioctl surface: create a VM, set memory regions, create vCPUs; plus inspection)
# =====================================================================================
# Each method validates, takes the lock KVM's ioctl would (slots_lock for memslot
# changes, mmu_lock for write for zaps and inspection, a vCPU's mutex for its faults),
# always with the GIL released while it waits, runs kernels, and maps their codes.

import threading as _threading

from cpython.exc cimport PyErr_CheckSignals
from libc.stdint cimport INT64_MAX, INT64_MIN


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


cdef object _host_flags_array(uint8_t* flags, u64 npages):
    """A memslot's host page flags as a numpy view (no copy; valid while the slot's are)."""
    cdef cnp.npy_intp dims[1]
    dims[0] = <cnp.npy_intp>npages
    return cnp.PyArray_SimpleNewFromData(1, dims, cnp.NPY_UINT8, flags)


ctypedef struct vm_counters_t:
    mmu_stats_t st                      # the VM's own context plus every vCPU's
    cache_init_stats_t init             # the root's cache plus every vCPU cache
    int64_t cache_warn[NR_CACHE_WARN]   # the same caches' warnings
    int64_t nx_lpage_splits


cdef void _sum_counters(Vm vm, vm_counters_t* c):
    """Every counter of the VM, summed over its contexts and caches (mmu_lock held)."""
    cdef Vcpu v
    cdef int i
    memset(c, 0, sizeof(vm_counters_t))
    _stats_add(&c.st, &vm.st)
    _init_stats_add(&c.init, &vm.root_mc.init)
    for i in range(NR_CACHE_WARN):
        c.cache_warn[i] += vm.root_mc.warn[i]
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


cdef class Vm:
    """A VM's TDP MMU: one root, memslots, vCPUs, zaps, stats and an audit.

    >>> import spte_fast as sf
    >>> vm = sf.Vm(sf.SpteLayout.ept(), root_level=4, max_pt_pages=64)
    >>> vm.add_memslot(0, 1024, pfn=0x100000)
    0
    >>> vm.vcpu().fault(5, write=True)
    <PF.FIXED: 4>
    """

    def __cinit__(self, SpteLayout layout not None, root_level=4, max_level=PG_LEVEL_1G,
                  max_pt_pages=1 << 20, nx_huge_pages=False, poison=None):
        cdef int rl = <int>_as_int(root_level, "root_level", 4, 5)
        cdef int ml = <int>_as_int(max_level, "max_level", 1, 3)
        cdef int64_t cap = _as_int(max_pt_pages, "max_pt_pages", 2, 1 << 32)
        cdef int64_t root
        cdef u64 nonpresent = layout.m.shadow_nonpresent_value
        memset(&self.kvm, 0, sizeof(kvm_t))
        memset(&self.st, 0, sizeof(mmu_stats_t))
        self.st.rcu_reader = -1         # the VM's own operations hold mmu_lock for write
        spte_rwlock_init(&self.kvm.mmu_lock)
        pthread_mutex_init(&self.kvm.tdp_mmu_pages_lock, NULL)
        self.kvm.rcu_gp_seq = 1
        self.kvm.possible_nx_head = -1
        self.kvm.possible_nx_tail = -1
        self.layout = layout
        self.pool = PagePool(cap, poison=poison)
        self._retired_pfns = np.empty(0, dtype=np.uint64)
        self._retired_bits = np.empty(0, dtype=np.uint8)
        self._slots_lock = _threading.Lock()
        self._vcpu_lock = _threading.Lock()
        self._vcpus = []
        self.kvm.m = layout.m
        self.kvm.pool = &self.pool.p
        self.kvm.root_level = rl
        self.kvm.max_level = ml
        self.kvm.nx_huge_pages = bool(nx_huge_pages)
        self.kvm.gfn_limit = (<u64>1) << (9 * rl)
        self.kvm.rcu_pending = <int64_t*>malloc(cap * sizeof(int64_t))
        self.kvm.rcu_pending_seq = <u64*>malloc(cap * sizeof(u64))
        if self.kvm.rcu_pending == NULL or self.kvm.rcu_pending_seq == NULL:
            raise MemoryError()
        # kvm_tdp_mmu_alloc_root: the root is a page initialised as a vCPU cache would.
        mmu_memory_cache_setup(&self.root_mc, &self.pool.p, nonpresent, nonpresent == 0)
        root = mmu_memory_cache_alloc_obj(&self.root_mc)
        _check_rc(-SPTE_ENOMEM if root < 0 else 0, "Vm(): a page for the root")
        tdp_mmu_init_sp(&self.kvm, root, NULL, 0, rl, False)
        self.kvm.root = root
        self.st.tables_allocated += 1
        tdp_account_mmu_page(&self.st, pool_sp(&self.pool.p, root))

    def __dealloc__(self):
        cdef int i
        for i in range(self.kvm.nslots):
            PyMem_RawFree(self.kvm.slots[i].host_flags)
        PyMem_RawFree(self.kvm.slots)
        free(self.kvm.rcu_pending)
        free(self.kvm.rcu_pending_seq)
        if self.root_mc.pool != NULL:
            mmu_memory_cache_teardown(&self.root_mc)
        pthread_rwlock_destroy(&self.kvm.mmu_lock)
        pthread_mutex_destroy(&self.kvm.tdp_mmu_pages_lock)

    cdef int _raise_fatal(self) except -1:
        if self.kvm.fatal:
            raise AuditError(
                f"BUG: present leaf replaced by a present leaf with another pfn at gfn "
                f"{self.kvm.fatal_gfn:#x} level {self.kvm.fatal_level}: "
                f"{self.kvm.fatal_old:#x} -> {self.kvm.fatal_new:#x}",
                invariant="present-leaf-pfn-change")
        return 0

    # -- attributes ------------------------------------------------------------------
    @property
    def root_level(self): return self.kvm.root_level
    @property
    def max_level(self): return self.kvm.max_level
    @property
    def nx_huge_pages(self): return bool(self.kvm.nx_huge_pages)
    @property
    def root(self): return self.kvm.root
    @property
    def mmio_generation(self): return self.kvm.mmio_gen
    @property
    def gfn_limit(self): return self.kvm.gfn_limit

    @property
    def memslots(self):
        """[(slot_id, base_gfn, npages, pfn, readonly)] sorted by base_gfn."""
        cdef kvm_memory_slot_t* s
        cdef int i
        out = []
        with self._slots_lock:
            for i in range(self.kvm.nslots):
                s = &self.kvm.slots[i]
                out.append((s.id, s.base_gfn, s.npages, s.pfn,
                            bool(s.flags & KVM_MEM_READONLY)))
        return out

    cdef gfn_t _gfn(self, v, str name) except? 0xFFFFFFFFFFFFFFFF:
        cdef u64 g = _as_u64(v, name)
        if g >= self.kvm.gfn_limit:
            raise ValueError(f"{name} {g:#x} is beyond the {self.kvm.root_level}-level address "
                             f"width (gfn < {self.kvm.gfn_limit:#x})")
        return g

    # -- memslots (kvm_set_memslot) ---------------------------------------------------
    cdef int _install_memslots(self, kvm_memory_slot_t* slots, int n) except -1:
        """Make `slots` the active set (caller holds slots_lock and mmu_lock for write) and
        bump the generation; an MMIO SPTE of the old generation no longer matches."""
        PyMem_RawFree(self.kvm.slots)
        self.kvm.slots = slots
        self.kvm.nslots = n
        with nogil:
            kvm_mmu_invalidate_mmio_sptes(&self.kvm, &self.st)
        return 0

    def add_memslot(self, base_gfn, npages, pfn, readonly=False):
        """Map gfns [base_gfn, base_gfn + npages) to host pfns from ``pfn``. Returns the slot id."""
        cdef gfn_t base = self._gfn(base_gfn, "base_gfn")
        cdef u64 n = _as_u64(npages, "npages")
        cdef u64 p = _as_u64(pfn, "pfn")
        with self._slots_lock:          # KVM's slots_lock: the checks below stay true
            return self._add_memslot(base, n, p, bool(readonly))

    cdef object _add_memslot(self, gfn_t base, u64 n, u64 p, bint readonly):
        cdef kvm_memory_slot_t* s
        cdef kvm_memory_slot_t* slots
        cdef int i, at, nslots = self.kvm.nslots
        cdef uint8_t* flags
        if n == 0:
            raise ValueError("npages must be >= 1")
        if n > self.kvm.gfn_limit - base:
            raise ValueError(f"slot [{base:#x}, {base + n:#x}) is beyond the address width "
                             f"(gfn < {self.kvm.gfn_limit:#x})")
        if p >= PFN_LIMIT or n > PFN_LIMIT - p:
            raise ValueError(f"pfns [{p:#x}, {p + n:#x}) do not fit the PFN field (< 1 << 40)")
        for i in range(nslots):
            s = &self.kvm.slots[i]
            if base < s.base_gfn + s.npages and s.base_gfn < base + n:
                raise ValueError(f"gfns [{base:#x}, {base + n:#x}) overlap slot {s.id}")
            if p < s.pfn + s.npages and s.pfn < p + n:
                raise ValueError(f"pfns [{p:#x}, {p + n:#x}) overlap those of slot {s.id}")
        flags = <uint8_t*>PyMem_RawCalloc(n, 1)     # calloc: untouched pages cost nothing
        slots = <kvm_memory_slot_t*>PyMem_RawMalloc((nslots + 1) * sizeof(kvm_memory_slot_t))
        if flags == NULL or slots == NULL:
            PyMem_RawFree(flags)
            PyMem_RawFree(slots)
            raise MemoryError(f"host page flags of a {n}-page memslot")
        # Accessed/dirty are flags of host pages (struct page in KVM), not of memslots: a
        # page that a deleted slot marked keeps its flags when a new slot maps it again.
        # The new slot owns them from now on (until it is deleted in turn).
        rp = self._retired_pfns
        lo, hi = np.searchsorted(rp, np.array([p, p + n], dtype=np.uint64))
        if lo < hi:
            _host_flags_array(flags, n)[(rp[lo:hi] - np.uint64(p)).astype(np.intp)] = \
                self._retired_bits[lo:hi]
            self._retired_pfns = np.concatenate((rp[:lo], rp[hi:]))
            self._retired_bits = np.concatenate((self._retired_bits[:lo], self._retired_bits[hi:]))
        at = 0
        while at < nslots and self.kvm.slots[at].base_gfn < base:
            at += 1
        memcpy(slots, self.kvm.slots, at * sizeof(kvm_memory_slot_t))
        memcpy(slots + at + 1, self.kvm.slots + at, (nslots - at) * sizeof(kvm_memory_slot_t))
        s = &slots[at]
        s.base_gfn = base
        s.npages = n
        s.pfn = p
        s.flags = KVM_MEM_READONLY if readonly else 0
        s.id = self._next_slot_id
        s.host_flags = flags
        self._next_slot_id += 1
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
        try:
            self._install_memslots(slots, nslots + 1)
        finally:
            kvm_mmu_write_unlock(&self.kvm)
        return s.id

    def delete_memslot(self, slot_id):
        """Zap the slot's range, remove it, bump the MMIO generation."""
        cdef int64_t sid_wanted = _as_int(slot_id, "slot_id", INT64_MIN, INT64_MAX)
        with self._slots_lock:
            self._delete_memslot(sid_wanted)

    cdef int _delete_memslot(self, int64_t sid_wanted) except -1:
        cdef int i, at = -1, nslots = self.kvm.nslots
        cdef kvm_memory_slot_t gone
        cdef kvm_memory_slot_t* slots
        cdef bint flush
        for i in range(nslots):
            if self.kvm.slots[i].id == sid_wanted:
                at = i
        if at < 0:
            raise ValueError(f"no memslot with id {sid_wanted!r}")
        gone = self.kvm.slots[at]
        slots = <kvm_memory_slot_t*>PyMem_RawMalloc(max(nslots - 1, 1) * sizeof(kvm_memory_slot_t))
        if slots == NULL:
            raise MemoryError()
        memcpy(slots, self.kvm.slots, at * sizeof(kvm_memory_slot_t))
        memcpy(slots + at, self.kvm.slots + at + 1, (nslots - at - 1) * sizeof(kvm_memory_slot_t))
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            flush = tdp_mmu_zap_leafs(&self.kvm, &self.st, gone.base_gfn,
                                      gone.base_gfn + gone.npages)
            if flush:
                self.st.tlb_flushes_ranged += 1
        try:
            self._install_memslots(slots, nslots - 1)
        finally:
            kvm_mmu_write_unlock(&self.kvm)
        # Keep the host page flags that are set (no live or retired entry covers these pfns).
        flags = _host_flags_array(gone.host_flags, gone.npages)
        marked = np.flatnonzero(flags)
        at_r = np.searchsorted(self._retired_pfns, np.uint64(gone.pfn))
        self._retired_pfns = np.concatenate((self._retired_pfns[:at_r],
                                             marked.astype(np.uint64) + np.uint64(gone.pfn),
                                             self._retired_pfns[at_r:]))
        self._retired_bits = np.concatenate((self._retired_bits[:at_r], flags[marked],
                                             self._retired_bits[at_r:]))
        del flags
        PyMem_RawFree(gone.host_flags)
        self._raise_fatal()
        return 0

    def host_page_accessed(self, pfn):
        return bool(self._host_flags(pfn) & HOST_ACCESSED)

    def host_page_dirty(self, pfn):
        return bool(self._host_flags(pfn) & HOST_DIRTY)

    cdef int _host_flags(self, pfn) except -1:
        cdef u64 p = _as_u64(pfn, "pfn")
        cdef kvm_memory_slot_t* s
        with self._slots_lock:
            s = _memslot_for_pfn(&self.kvm, p)
            if s == NULL:
                raise ValueError(f"no memslot backs pfn {p:#x}")
            return s.host_flags[p - s.pfn]

    # -- vCPUs -------------------------------------------------------------------------
    def vcpu(self):
        """A new vCPU with its own shadow-page cache (init_value = the non-present value).

        Each vCPU may fault from its own thread: faults run with the GIL released and
        mmu_lock held for read, as KVM's TDP MMU faults do.
        """
        return Vcpu(self)

    cdef int _register_vcpu(self, Vcpu v) except -1:
        """Give ``v`` its vcpu_idx (its reader slot in the grace period)."""
        with self._vcpu_lock:               # the limit check and the registration, together
            if self.kvm.nvcpus >= MAX_VCPUS:
                raise ValueError(f"at most {MAX_VCPUS} vCPUs per Vm")
            with nogil:
                kvm_mmu_write_lock(&self.kvm)
                v.vcpu.vcpu_idx = self.kvm.nvcpus
                v.vcpu.stat.rcu_reader = v.vcpu.vcpu_idx
                self.kvm.rcu_reader_seq[v.vcpu.vcpu_idx] = 0
                self.kvm.nvcpus += 1
                kvm_mmu_write_unlock(&self.kvm)
            self._vcpus.append(v)
        return 0

    @property
    def vcpus(self):
        return tuple(self._vcpus)

    # -- inspection --------------------------------------------------------------------
    def walk(self, gfn):
        """[(level, spte), ...] from the root down to the first entry that is not a
        present non-leaf."""
        cdef gfn_t g = self._gfn(gfn, "gfn")
        return [(level, spte) for level, _, spte in self._tdp_iter(g, g + 1, 1)]

    def lookup(self, gfn):
        """(spte, level) of the present leaf that maps gfn, or None."""
        path = self.walk(gfn)
        level, spte = path[len(path) - 1]
        if is_shadow_present_pte(spte) and is_last_spte(spte, level):
            return (spte, level)
        return None

    def tdp_iter(self, start, end, min_level=1):
        """[(level, gfn, spte), ...]: the entries for_each_tdp_pte_min_level(min_level,
        start, end) visits, in its (pre-)order."""
        cdef gfn_t s = _as_u64(start, "start")
        cdef gfn_t e = _as_u64(end, "end")
        cdef int ml = <int>_as_int(min_level, "min_level", 1, self.kvm.root_level)
        if e > self.kvm.gfn_limit:
            raise ValueError(f"end {e:#x} is beyond the address width ({self.kvm.gfn_limit:#x})")
        if s > e:
            raise ValueError(f"start {s:#x} > end {e:#x}")
        return self._tdp_iter(s, e, ml)

    cdef list _tdp_iter(self, gfn_t start, gfn_t end, int min_level):
        cdef tdp_iter_t it
        out = []
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
        try:
            tdp_iter_start(&it, self.kvm.pool.pages, kvm_root_pt(&self.kvm),
                           self.kvm.root_level, min_level, start)
            while it.valid and it.gfn < end:
                out.append((it.level, it.gfn, it.old_spte))
                tdp_iter_next(&it)
        finally:
            kvm_mmu_write_unlock(&self.kvm)
        return out

    @property
    def stats(self):
        """The counters of docs/API.md (KVM's stat names in its table)."""
        cdef vm_counters_t c
        _read_counters(self, &c)
        d = {
            "faults_fixed": c.st.faults[RET_PF_FIXED],
            "faults_spurious": c.st.faults[RET_PF_SPURIOUS],
            "faults_retry": c.st.faults[RET_PF_RETRY],
            "faults_emulate": c.st.faults[RET_PF_EMULATE],
            "pages_4k": c.st.pages[1], "pages_2m": c.st.pages[2], "pages_1g": c.st.pages[3],
            "pt_pages": sum(c.st.pt_pages[i] for i in range(1, 6)),
        }
        for i in range(1, 6):
            d[f"pt_pages_l{i}"] = c.st.pt_pages[i]
        d.update({
            "tables_allocated": c.st.tables_allocated, "tables_freed": c.st.tables_freed,
            "cache_fills": c.init.fills, "cache_zero_inits": c.init.zero_inits,
            "init_bytes_written": c.init.init_bytes_written,
            "tlb_flushes": c.st.tlb_flushes, "tlb_flushes_ranged": c.st.tlb_flushes_ranged,
            "cas_failures": c.st.cas_failures,
            "warnings": sum(c.st.warn[i] for i in range(NR_MMU_WARN)) +
                        sum(c.cache_warn[i] for i in range(NR_CACHE_WARN)),
            "spte_changes": c.st.spte_changes, "nx_lpage_splits": c.nx_lpage_splits,
            "mmio_sptes_created": c.st.mmio_sptes_created,
        })
        return d

    @property
    def warnings_by_reason(self):
        """{reason: count} for every reason of ``spte_fast.errors.WARN_REASONS``: the VM's
        own warnings, every vCPU's, and their memory caches'."""
        cdef vm_counters_t c
        _read_counters(self, &c)
        counts = [c.st.warn[i] for i in range(NR_MMU_WARN)] + \
            [c.cache_warn[i] for i in range(NR_CACHE_WARN)]
        names = _MMU_WARN_NAMES + CACHE_WARN_REASONS
        by_name = dict(zip(names, counts))
        return {name: by_name[name] for name in WARN_REASONS}

    # -- zaps (exclusive unless noted) ---------------------------------------------------
    def zap_gfn_range(self, start, end):
        """Zap present leaves intersecting [start, end); True if a TLB flush was needed
        (the VM then performs one ranged flush)."""
        cdef gfn_t s = _as_u64(start, "start")
        cdef gfn_t e = _as_u64(end, "end")
        cdef bint flush
        if e > self.kvm.gfn_limit:
            raise ValueError(f"end {e:#x} is beyond the address width ({self.kvm.gfn_limit:#x})")
        if s > e:
            raise ValueError(f"start {s:#x} > end {e:#x}")
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            flush = tdp_mmu_zap_leafs(&self.kvm, &self.st, s, e) if s < e else False
            if flush:
                self.st.tlb_flushes_ranged += 1
            kvm_mmu_write_unlock(&self.kvm)
        self._raise_fatal()
        return bool(flush)

    def zap_all(self):
        """Zap everything (4K, 2M, 1G, root-level passes); only the root stays."""
        cdef bint zapped
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            zapped = tdp_mmu_zap_root(&self.kvm, &self.st)
            if zapped:
                self.st.tlb_flushes += 1
            kvm_mmu_write_unlock(&self.kvm)
        self._raise_fatal()
        return bool(zapped)

    def zap_sp(self, gfn, level):
        """Zap the level-``level`` table on gfn's path (its parent entry -> non-present)."""
        cdef gfn_t g = self._gfn(gfn, "gfn")
        cdef int lvl = <int>_as_int(level, "level", 1, self.kvm.root_level - 1)
        cdef bint done
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            done = tdp_mmu_zap_sp_at(&self.kvm, &self.st, g, lvl)
            if done:
                self.st.tlb_flushes += 1    # kvm_mmu_remote_flush_or_zap
            kvm_mmu_write_unlock(&self.kvm)
        self._raise_fatal()
        return bool(done)

    def zap_spte_atomic(self, gfn, level):
        """Shared-mode atomic zap of the present entry at ``level`` on gfn's path."""
        cdef gfn_t g = self._gfn(gfn, "gfn")
        cdef int lvl = <int>_as_int(level, "level", 1, self.kvm.root_level)
        cdef int r = -SPTE_EBUSY
        while r == -SPTE_EBUSY:
            with nogil:
                kvm_mmu_write_lock(&self.kvm)
                r = tdp_mmu_zap_spte_atomic_at(&self.kvm, &self.st, g, lvl, RETRY_CHECK)
                kvm_mmu_write_unlock(&self.kvm)
            if r == -SPTE_EBUSY:
                PyErr_CheckSignals()        # lost RETRY_CHECK races in a row: Ctrl-C works
        self._raise_fatal()
        return r == 1

    def inject_cas_failures(self, n):
        """Test aid: the next ``n`` compare-and-exchanges of the engine lose their race."""
        cdef int64_t k = _as_int(n, "n", 0, 1 << 62)
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            self.kvm.inject_cas_fail = k
            kvm_mmu_write_unlock(&self.kvm)

    def audit(self):
        """Check the invariants (spec §6 items 9-13, 16, 22 and the accounting).

        Raises AuditError naming the invariant (one of spte_fast.errors.AUDIT_INVARIANTS)
        and the entry (gfn, level, value).
        """
        kvm_mmu_audit(self)


cdef class Vcpu:
    """A vCPU: its own shadow-page cache (topped up before every fault) and counters."""

    def __cinit__(self, Vm vm not None):
        self.vm = vm
        self.cache = MemoryCache(vm.pool, init_value=vm.layout.m.shadow_nonpresent_value,
                                 capacity=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE)
        memset(&self.vcpu, 0, sizeof(kvm_vcpu_t))
        self.vcpu.kvm = &vm.kvm
        self.vcpu.mmu_shadow_page_cache = &self.cache.mc
        self.vcpu.stat.rcu_reader = -1
        vm._register_vcpu(self)         # Vcpu(vm) and vm.vcpu() are the same thing

    def fault(self, gfn, write=False, exec=False):
        """One guest page fault -> PF.FIXED / SPURIOUS / RETRY / EMULATE."""
        cdef gfn_t g = self.vm._gfn(gfn, "gfn")
        cdef bint w = bool(write)
        cdef bint x = bool(exec)
        cdef int r
        with nogil:
            r = vcpu_fault(&self.vcpu, g, w, x)
        self.vm._raise_fatal()
        _check_rc(r, f"fault(gfn={g:#x})", self.cache.mc.last_warn)
        return PF(r)

    def fault_batch(self, gfns, access=None, out=None):
        """Fault every gfn in order, in C with the GIL released.

        ``gfns``: 1-D integer array; ``access``: None or 1-D integers (bit 0 write,
        bit 1 exec); ``out``: None or a writable int8 array receiving each final PF.
        RETRY results are faulted again (counted in "retry").  Returns the counts.
        """
        cdef cnp.ndarray g_arr = _gfn_array(gfns, "gfns", self.vm.kvm.gfn_limit)
        cdef Py_ssize_t n = g_arr.shape[0]
        cdef cnp.ndarray a_arr = None
        cdef cnp.ndarray o_arr = None
        cdef int8_t[:] o_view = None
        cdef const uint8_t* a = NULL
        cdef int8_t* o = NULL
        if access is not None:
            a_arr = _access_array(access, n)
            a = <const uint8_t*>cnp.PyArray_DATA(a_arr)
        if out is not None:
            o_view = _out_view(out, n)      # length, strides from the buffer protocol
            o_arr = _out_scratch(o_view)    # a strided view: filled here, copied back below
            o = <int8_t*>cnp.PyArray_DATA(o_arr) if o_arr is not None else _out_ptr(o_view)
        cdef const gfn_t* g = <const gfn_t*>cnp.PyArray_DATA(g_arr)
        cdef int64_t counts[6]
        cdef Py_ssize_t done = 0
        cdef int rc = BATCH_INTERRUPTIBLE
        memset(counts, 0, sizeof(counts))
        try:
            while rc == BATCH_INTERRUPTIBLE:
                with nogil:
                    rc = vcpu_fault_batch(&self.vcpu, g, a, o, n, counts, &done)
                if rc == BATCH_INTERRUPTIBLE:
                    PyErr_CheckSignals()    # KeyboardInterrupt propagates from here
        finally:
            if o_arr is not None:
                _out_copy_back(o_view, o_arr, done)
        self.vm._raise_fatal()
        _check_rc(rc, f"fault_batch: stopped after {done} of {n} faults",
                  self.cache.mc.last_warn, done,
                  f"gfns[{done}] changed under the batch to a gfn beyond the address width")
        return {"fixed": counts[RET_PF_FIXED], "spurious": counts[RET_PF_SPURIOUS],
                "retry": counts[RET_PF_RETRY], "emulate": counts[RET_PF_EMULATE]}

    @property
    def stats(self):
        """This vCPU's own counters (faults by result)."""
        return {"faults_fixed": self.vcpu.stat.faults[RET_PF_FIXED],
                "faults_spurious": self.vcpu.stat.faults[RET_PF_SPURIOUS],
                "faults_retry": self.vcpu.stat.faults[RET_PF_RETRY],
                "faults_emulate": self.vcpu.stat.faults[RET_PF_EMULATE]}


cdef kvm_vcpu_t* vcpu_handle(object vcpu) except NULL:
    """The kvm_vcpu_t of a Python Vcpu (the embedding API; see README "Embedding")."""
    if not isinstance(vcpu, Vcpu):
        raise TypeError(f"expected a spte_fast.Vcpu, not {type(vcpu).__name__}")
    return &(<Vcpu>vcpu).vcpu
