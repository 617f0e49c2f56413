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
from libc.string cimport memmove


cdef void _leaf_templates(kvm_t* kvm) noexcept nogil:
    """make_spte(level 1, ACC_ALL, pfn 0, not prefetch, over a non-writable old SPTE) for
    each host_writable: the fault path ORs the pfn in.  They depend on nx_huge_pages."""
    cdef bint wrprot
    cdef int w
    for w in range(2):
        kvm.leaf_4k_template[w] = make_spte(&kvm.m, 1, ACC_ALL, 0, kvm.m.shadow_nonpresent_value,
                                            False, w, kvm.m.ad_disabled, kvm.nx_huge_pages,
                                            False, &wrprot)


cdef class Vm:
    """A VM's TDP MMU: roots, memslots, vCPUs, zaps, stats and an audit.

    >>> import spte_fast as sf
    >>> vm = sf.Vm(sf.SpteLayout.ept(), root_level=4, max_pt_pages=64)
    >>> vm.add_memslot(0, 1024, pfn=0x100000)
    0
    >>> v = vm.vcpu()
    >>> v.fault(5, write=True)
    <PF.FIXED: 4>
    >>> v.access(5, write=True) is None     # the CPU's walk finds the leaf: no exit
    True
    """

    def __cinit__(self, SpteLayout layout not None, root_level=4, max_level=PG_LEVEL_1G,
                  max_pt_pages=1 << 20, nx_huge_pages=False, poison=None,
                  host_maxphyaddr=46, *, manual_dirty_log_protect=False,
                  dirty_log_initially_set=False, pml=None, eager_page_split=True,
                  nx_huge_pages_recovery_ratio=60):
        cdef int rl = <int>_as_int(root_level, "root_level", 4, 5)
        cdef int ml = <int>_as_int(max_level, "max_level", 1, 3)
        cdef int64_t cap = _as_int(max_pt_pages, "max_pt_pages", 2, 1 << 32)
        cdef int hpa = <int>_as_int(host_maxphyaddr, "host_maxphyaddr", 36, 52)
        cdef bint wrprot
        cdef int ratio = <int>_as_int(nx_huge_pages_recovery_ratio,
                                      "nx_huge_pages_recovery_ratio", 0, 3600)
        cdef bint has_pml = layout.m.ept and layout.m.shadow_accessed_mask != 0
        if bool(dirty_log_initially_set) and not bool(manual_dirty_log_protect):
            raise ValueError("dirty_log_initially_set needs manual_dirty_log_protect "
                             "(KVM_DIRTY_LOG_INITIALLY_SET is a flag of "
                             "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)")
        if pml is None:
            pml = has_pml
        elif bool(pml) and not has_pml:
            raise ValueError("pml=True needs an EPT layout with A/D bits (PML is a VMX "
                             "feature that logs the D bits the CPU sets)")
        memset(&self.kvm, 0, sizeof(kvm_t))
        memset(&self.st, 0, sizeof(mmu_stats_t))
        self.st.rcu_reader = VM_READER  # its own read-side slot (shared operations)
        spte_rwlock_init(&self.kvm.mmu_lock)
        pthread_mutex_init(&self.kvm.tdp_mmu_pages_lock, NULL)
        pthread_mutex_init(&self.kvm.guest_mem.lock, NULL)
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
        masks_set_host_phys_bits(&self.kvm.m, hpa)     # kvm->arch.shadow_mmio_value
        self.kvm.pool = &self.pool.p
        self.kvm.root_level = rl
        self.kvm.max_level = ml
        self.kvm.nx_huge_pages = bool(nx_huge_pages)
        self.kvm.manual_dirty_log_protect = bool(manual_dirty_log_protect)
        self.kvm.dirty_log_initially_set = bool(dirty_log_initially_set)
        self.kvm.enable_pml = bool(pml)
        self.kvm.eager_page_split = bool(eager_page_split)
        self.kvm.nx_huge_pages_recovery_ratio = ratio
        self.kvm.gfn_limit = (<u64>1) << (9 * rl)
        self.kvm.host_phys_bits = hpa
        self.kvm.max_gfn = ((<u64>1) << (hpa - 12)) - 1
        self.kvm.rsvd_pa_mask = (((<u64>1) << 52) - ((<u64>1) << hpa)) if hpa < 52 else 0
        self.kvm.ad_enabled = self.kvm.m.shadow_accessed_mask != 0
        hw_setup(&self.kvm)
        _leaf_templates(&self.kvm)
        self.kvm.rcu_pending = <int64_t*>malloc(cap * sizeof(int64_t))
        self.kvm.rcu_pending_seq = <u64*>malloc(cap * sizeof(u64))
        if self.kvm.rcu_pending == NULL or self.kvm.rcu_pending_seq == NULL:
            raise MemoryError()
        # No root yet: the first vCPU to enter the guest loads one (kvm_mmu_load).

    def __dealloc__(self):
        cdef int i
        for i in range(self.kvm.nslots):
            host_flags_free(self.kvm.slots[i].host_flags, self.kvm.slots[i].npages)
            PyMem_RawFree(self.kvm.slots[i].host_flags_touched)
            PyMem_RawFree(self.kvm.slots[i].dirty_bitmap)
        PyMem_RawFree(self.kvm.slots)
        free(self.kvm.rcu_pending)
        free(self.kvm.rcu_pending_seq)
        guest_mem_destroy(&self.kvm.guest_mem)
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
    def mmio_generation(self):
        """The memslots generation (kvm_memslots()->generation): +2 per swap."""
        return self.kvm.generation
    @property
    def gfn_limit(self): return self.kvm.gfn_limit
    @property
    def host_maxphyaddr(self): return self.kvm.host_phys_bits
    @property
    def max_gfn(self):
        """kvm_mmu_max_gfn(): the last gfn a host with host_maxphyaddr bits can address."""
        return self.kvm.max_gfn

    @property
    def root(self):
        """Pool index of the valid root, or None before a vCPU has loaded one."""
        cdef int64_t r
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            r = kvm_valid_root(&self.kvm)
            kvm_mmu_write_unlock(&self.kvm)
        return None if r < 0 else r

    @property
    def roots(self):
        """[(pool_index, refcount, invalid)] of kvm->arch.tdp_mmu_roots, newest first."""
        cdef int i
        cdef kvm_mmu_page_t* sp
        out = []
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
        try:
            for i in range(self.kvm.nr_roots - 1, -1, -1):
                sp = pool_sp(self.kvm.pool, self.kvm.roots[i])
                out.append((self.kvm.roots[i], sp.root_count, bool(sp.role_invalid)))
        finally:
            kvm_mmu_write_unlock(&self.kvm)
        return out

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

    def read_guest(self, gpa, count=None):
        """The VMM reads guest memory (host side, the MMU is not involved): the 8-byte word
        at gpa as an int, or with ``count`` a uint64 array of that many words."""
        return guest_read(self, gpa, count)

    def write_guest(self, gpa, value):
        """The VMM writes guest memory (host side: no SPTE, exit or dirty log sees it): an
        int, or a 1-D array of words from gpa on.  Nothing is written on an error."""
        guest_write(self, gpa, value)

    cdef gfn_t _gfn(self, v, str name) except? 0xFFFFFFFFFFFFFFFF:
        cdef u64 g = _as_u64(v, name)
        if g >= self.kvm.gfn_limit:
            raise ValueError(f"{name} {g:#x} is beyond the {self.kvm.root_level}-level address "
                             f"width (gfn < {self.kvm.gfn_limit:#x})")
        return g

    # -- memslots (kvm_set_memslot) ---------------------------------------------------
    cdef int _swap_memslots(self, kvm_memory_slot_t* slots, int n, int mark_invalid,
                            int clear_invalid) except -1:
        """kvm_swap_active_memslots (slots_lock held): under mmu_lock for write publish
        `slots` (NULL: the same array) after marking slot index `mark_invalid` (or clearing
        `clear_invalid`: the swap back of a failed change) KVM_MEMSLOT_INVALID, and move the
        generation by 2 (one per address space); then kvm_arch_memslots_updated, which zaps
        everything fast when the MMIO generation wrapped."""
        cdef bint wrapped
        cdef kvm_memory_slot_t* old = NULL
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            if slots != NULL:
                old = self.kvm.slots
                self.kvm.slots = slots
                self.kvm.nslots = n
            if mark_invalid >= 0:
                self.kvm.slots[mark_invalid].flags |= KVM_MEMSLOT_INVALID
            if clear_invalid >= 0:
                self.kvm.slots[clear_invalid].flags &= ~KVM_MEMSLOT_INVALID
            self.kvm.generation += KVM_ADDRESS_SPACE_NUM
            wrapped = kvm_mmu_invalidate_mmio_sptes(&self.kvm, self.kvm.generation)
            kvm_mmu_write_unlock(&self.kvm)
        PyMem_RawFree(old)
        if wrapped:
            self._zap_all_fast()
        return 0

    cdef int _zap_all_fast(self) except -1:
        """kvm_mmu_zap_all_fast: invalidate every root (vCPUs load a new one on their next
        entry), then zap the invalidated roots and put the MMU's references.  No TLB flush
        is counted (6.10: each vCPU flushes its own when it loads the new root)."""
        cdef int r = -SPTE_EBUSY
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            kvm_tdp_mmu_invalidate_all_roots(&self.kvm)
            kvm_mmu_write_unlock(&self.kvm)
        # KVM zaps them holding mmu_lock for read, with atomic setters; here the VM holds it
        # for write (same result: no fault can run on an invalid root), and only injected
        # CAS failures can make a pass retry -- then signals are checked between tries.
        while r == -SPTE_EBUSY:
            with nogil:
                kvm_mmu_write_lock(&self.kvm)
                r = kvm_tdp_mmu_zap_invalidated_roots(&self.kvm, &self.st, RETRY_CHECK)
                kvm_mmu_write_unlock(&self.kvm)
            if r == -SPTE_EBUSY:
                PyErr_CheckSignals()
        self._raise_fatal()
        return 0

    cdef int _check_slot_range(self, gfn_t base, u64 n, int64_t skip_id) except -1:
        """kvm_set_memory_region's checks of a slot's gfns (besides kvm_mmu_max_gfn)."""
        cdef kvm_memory_slot_t* s
        cdef int i
        if n == 0:
            raise ValueError("npages must be >= 1")
        if n > self.kvm.gfn_limit - base:
            raise ValueError(f"slot [{base:#x}, {base + n:#x}) is beyond the address width "
                             f"(gfn < {self.kvm.gfn_limit:#x})")
        for i in range(self.kvm.nslots):
            s = &self.kvm.slots[i]
            if s.id != skip_id and base < s.base_gfn + s.npages and s.base_gfn < base + n:
                raise ValueError(f"gfns [{base:#x}, {base + n:#x}) overlap slot {s.id}")
        return 0

    cdef int _check_max_gfn(self, gfn_t base, u64 n) except -1:
        """kvm_arch_prepare_memory_region: -EINVAL past kvm_mmu_max_gfn()."""
        if base + n - 1 > self.kvm.max_gfn:
            raise ValueError(f"slot [{base:#x}, {base + n:#x}) is beyond the host's "
                             f"MAXPHYADDR ({self.kvm.host_phys_bits} bits: gfn <= "
                             f"{self.kvm.max_gfn:#x})")
        return 0

    def add_memslot(self, base_gfn, npages, pfn, readonly=False, dirty_log=False):
        """Map gfns [base_gfn, base_gfn + npages) to host pfns from ``pfn``. Returns the slot
        id.  ``dirty_log``: KVM_MEM_LOG_DIRTY_PAGES from the start (a bitmap, no huge pages;
        all set with dirty_log_initially_set)."""
        cdef gfn_t base = self._gfn(base_gfn, "base_gfn")
        cdef u64 n = _as_u64(npages, "npages")
        cdef u64 p = _as_u64(pfn, "pfn")
        with self._slots_lock:          # KVM's slots_lock: the checks below stay true
            return self._add_memslot(base, n, p, bool(readonly), bool(dirty_log))

    cdef u64* _alloc_dirty_bitmap(self, u64 n) except NULL:
        """kvm_alloc_dirty_bitmap, all ones for the slot's pages under initially-set."""
        cdef u64* bm = <u64*>PyMem_RawCalloc(max(dirty_bitmap_words(n), 1), sizeof(u64))
        if bm == NULL:
            raise MemoryError(f"dirty bitmap of a {n}-page memslot")
        if self.kvm.manual_dirty_log_protect and self.kvm.dirty_log_initially_set:
            dirty_bitmap_set_all(bm, n)
        return bm

    cdef object _add_memslot(self, gfn_t base, u64 n, u64 p, bint readonly, bint dirty_log):
        cdef kvm_memory_slot_t* s
        cdef kvm_memory_slot_t* slots
        cdef int i, at, nslots = self.kvm.nslots
        cdef uint8_t* flags
        cdef u64* touched
        cdef u64 host_pfns = (<u64>1) << (self.kvm.host_phys_bits - 12)
        self._check_slot_range(base, n, -1)
        if p >= host_pfns or n > host_pfns - p:
            raise ValueError(f"pfns [{p:#x}, {p + n:#x}) are beyond the host's MAXPHYADDR "
                             f"({self.kvm.host_phys_bits} bits: pfn < {host_pfns:#x})")
        for i in range(nslots):
            s = &self.kvm.slots[i]
            if p < s.pfn + s.npages and s.pfn < p + n:
                raise ValueError(f"pfns [{p:#x}, {p + n:#x}) overlap those of slot {s.id}")
        self._check_max_gfn(base, n)
        flags = host_flags_alloc(n)                 # untouched pages cost nothing
        touched = <u64*>PyMem_RawCalloc(_touched_words(n), sizeof(u64))
        slots = <kvm_memory_slot_t*>PyMem_RawMalloc((nslots + 1) * sizeof(kvm_memory_slot_t))
        if flags == NULL or slots == NULL or touched == NULL:
            host_flags_free(flags, n)
            PyMem_RawFree(touched)
            PyMem_RawFree(slots)
            raise MemoryError(f"host page flags of a {n}-page memslot")
        # Accessed/dirty are flags of host pages (struct page in KVM), not of memslots: a
        # page that a deleted slot marked keeps its flags when a new slot maps it again.
        # The new slot owns them from now on (until it is deleted in turn).
        rp = self._retired_pfns
        lo, hi = np.searchsorted(rp, np.array([p, p + n], dtype=np.uint64))
        if lo < hi:
            offs = (rp[lo:hi] - np.uint64(p)).astype(np.intp)
            _host_flags_array(flags, n)[offs] = self._retired_bits[lo:hi]
            chunks = np.unique(offs >> HOST_FLAGS_CHUNK_SHIFT)
            words = np.zeros(_touched_words(n), dtype=np.uint64)
            np.bitwise_or.at(words, chunks >> 6,
                             np.left_shift(np.uint64(1), (chunks & 63).astype(np.uint64)))
            memcpy(touched, cnp.PyArray_DATA(<cnp.ndarray>words), _touched_words(n) * sizeof(u64))
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
        s.host_flags_touched = touched
        s.dirty_bitmap = NULL
        if dirty_log:
            try:
                s.dirty_bitmap = self._alloc_dirty_bitmap(n)
            except MemoryError:
                host_flags_free(flags, n)
                PyMem_RawFree(touched)
                PyMem_RawFree(slots)
                raise
            s.flags |= KVM_MEM_LOG_DIRTY_PAGES
        self._next_slot_id += 1
        self._swap_memslots(slots, nslots + 1, -1, -1)     # kvm_create_memslot
        if dirty_log:                   # kvm_commit_memory_region
            self.kvm.nr_memslots_dirty_logging += 1
        return self._next_slot_id - 1

    cdef int _slot_index(self, int64_t sid_wanted) except -1:
        cdef int i
        for i in range(self.kvm.nslots):
            if self.kvm.slots[i].id == sid_wanted:
                return i
        raise ValueError(f"no memslot with id {sid_wanted!r}")

    cdef int _invalidate_memslot(self, int at) except -1:
        """kvm_invalidate_memslot: the slot swapped for an invalid copy (faults on it now
        retry), then kvm_arch_flush_shadow_memslot, which is kvm_mmu_zap_all_fast in 6.10.
        Interrupted (Ctrl-C during injected CAS failures): swapped back, as KVM's failure
        path does, and the exception propagates."""
        self._swap_memslots(NULL, 0, at, -1)
        try:
            self._zap_all_fast()
        except BaseException:
            self._swap_memslots(NULL, 0, -1, at)
            raise
        return 0

    def delete_memslot(self, slot_id):
        """KVM_MR_DELETE: invalidate the slot, zap all roots fast, remove it (two swaps)."""
        cdef int64_t sid_wanted = _as_int(slot_id, "slot_id", INT64_MIN, INT64_MAX)
        with self._slots_lock:
            self._delete_memslot(sid_wanted)

    cdef int _delete_memslot(self, int64_t sid_wanted) except -1:
        cdef int at = self._slot_index(sid_wanted), nslots = self.kvm.nslots
        cdef kvm_memory_slot_t gone
        cdef kvm_memory_slot_t* slots
        slots = <kvm_memory_slot_t*>PyMem_RawMalloc(max(nslots - 1, 1) * sizeof(kvm_memory_slot_t))
        if slots == NULL:
            raise MemoryError()
        try:
            self._invalidate_memslot(at)
        except BaseException:
            PyMem_RawFree(slots)
            raise
        gone = self.kvm.slots[at]
        memcpy(slots, self.kvm.slots, at * sizeof(kvm_memory_slot_t))
        memcpy(slots + at, self.kvm.slots + at + 1, (nslots - at - 1) * sizeof(kvm_memory_slot_t))
        self._swap_memslots(slots, nslots - 1, -1, -1)     # kvm_delete_memslot
        # Keep the host page flags that are set (no live or retired entry covers these pfns).
        marked, bits = _set_host_flags_of_slot(&gone)
        at_r = np.searchsorted(self._retired_pfns, np.uint64(gone.pfn))
        self._retired_pfns = np.concatenate((self._retired_pfns[:at_r],
                                             marked.astype(np.uint64) + np.uint64(gone.pfn),
                                             self._retired_pfns[at_r:]))
        self._retired_bits = np.concatenate((self._retired_bits[:at_r], bits,
                                             self._retired_bits[at_r:]))
        del bits
        host_flags_free(gone.host_flags, gone.npages)
        PyMem_RawFree(gone.host_flags_touched)
        if gone.flags & KVM_MEM_LOG_DIRTY_PAGES:
            self.kvm.nr_memslots_dirty_logging -= 1
        PyMem_RawFree(gone.dirty_bitmap)
        self._raise_fatal()
        return 0

    def move_memslot(self, slot_id, new_base_gfn):
        """KVM_MR_MOVE: the slot's gfns start at ``new_base_gfn`` (same pfns, size, flags).
        Invalidate, zap all roots fast, move (two swaps).  The same base is no change."""
        cdef int64_t sid_wanted = _as_int(slot_id, "slot_id", INT64_MIN, INT64_MAX)
        cdef gfn_t base = self._gfn(new_base_gfn, "new_base_gfn")
        with self._slots_lock:
            self._move_memslot(sid_wanted, base)

    cdef int _move_memslot(self, int64_t sid_wanted, gfn_t base) except -1:
        cdef int at = self._slot_index(sid_wanted), nslots = self.kvm.nslots, to
        cdef kvm_memory_slot_t moved = self.kvm.slots[at]
        cdef kvm_memory_slot_t* slots
        if base == moved.base_gfn:
            return 0                        # KVM_MR_FLAGS_ONLY with no flag change: nothing
        self._check_slot_range(base, moved.npages, moved.id)
        slots = <kvm_memory_slot_t*>PyMem_RawMalloc(nslots * sizeof(kvm_memory_slot_t))
        if slots == NULL:
            raise MemoryError()
        try:
            self._invalidate_memslot(at)
        except BaseException:
            PyMem_RawFree(slots)
            raise
        if base + moved.npages - 1 > self.kvm.max_gfn:
            # kvm_prepare_memory_region fails only now, after the invalidation: the slot is
            # swapped back (a third swap) with everything already zapped.
            PyMem_RawFree(slots)
            self._swap_memslots(NULL, 0, -1, at)
            self._check_max_gfn(base, moved.npages)
        # The slots without it, then it again at its sorted place.
        memcpy(slots, self.kvm.slots, at * sizeof(kvm_memory_slot_t))
        memcpy(slots + at, self.kvm.slots + at + 1, (nslots - at - 1) * sizeof(kvm_memory_slot_t))
        to = 0
        while to < nslots - 1 and slots[to].base_gfn < base:
            to += 1
        memmove(slots + to + 1, slots + to, (nslots - 1 - to) * sizeof(kvm_memory_slot_t))
        moved.base_gfn = base
        moved.flags &= ~KVM_MEMSLOT_INVALID
        slots[to] = moved
        self._swap_memslots(slots, nslots, -1, -1)         # kvm_move_memslot
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

    # -- dirty logging (kvm_main.c KVM_SET_USER_MEMORY_REGION flags, KVM_GET/CLEAR_DIRTY_LOG;
    #    x86.c kvm_mmu_slot_apply_flags) -------------------------------------------------
    @property
    def manual_dirty_log_protect(self): return bool(self.kvm.manual_dirty_log_protect)
    @property
    def dirty_log_initially_set(self): return bool(self.kvm.dirty_log_initially_set)
    @property
    def pml(self): return bool(self.kvm.enable_pml)
    @property
    def eager_page_split(self): return bool(self.kvm.eager_page_split)
    @property
    def nx_huge_pages_recovery_ratio(self): return self.kvm.nx_huge_pages_recovery_ratio

    def set_memslot_flags(self, slot_id, dirty_log):
        """KVM_MR_FLAGS_ONLY: turn KVM_MEM_LOG_DIRTY_PAGES on or off (one memslot swap),
        then kvm_mmu_slot_apply_flags.  Unchanged flags: nothing happens."""
        cdef int64_t sid_wanted = _as_int(slot_id, "slot_id", INT64_MIN, INT64_MAX)
        if not isinstance(dirty_log, int):     # bool is an int; a float is not
            raise TypeError(f"dirty_log must be a bool, not {type(dirty_log).__name__}")
        with self._slots_lock:
            self._set_memslot_flags(sid_wanted, bool(dirty_log))

    cdef int _set_memslot_flags(self, int64_t sid_wanted, bint log) except -1:
        cdef int at = self._slot_index(sid_wanted), nslots = self.kvm.nslots
        cdef kvm_memory_slot_t* slots
        cdef kvm_memory_slot_t* s
        cdef u64* old_bitmap = self.kvm.slots[at].dirty_bitmap
        cdef u64* bm = NULL
        cdef bint was = (self.kvm.slots[at].flags & KVM_MEM_LOG_DIRTY_PAGES) != 0
        if was == log:
            return 0                        # kvm_set_memory_region: no change, no swap
        if log:
            bm = self._alloc_dirty_bitmap(self.kvm.slots[at].npages)   # kvm_prepare_memory_region
        slots = <kvm_memory_slot_t*>PyMem_RawMalloc(nslots * sizeof(kvm_memory_slot_t))
        if slots == NULL:
            PyMem_RawFree(bm)
            raise MemoryError()
        memcpy(slots, self.kvm.slots, nslots * sizeof(kvm_memory_slot_t))
        if log:
            slots[at].flags |= KVM_MEM_LOG_DIRTY_PAGES
            slots[at].dirty_bitmap = bm
        else:
            slots[at].flags &= ~KVM_MEM_LOG_DIRTY_PAGES
            slots[at].dirty_bitmap = NULL
        self._swap_memslots(slots, nslots, -1, -1)         # kvm_update_flags_memslot
        # kvm_commit_memory_region
        self.kvm.nr_memslots_dirty_logging += 1 if log else -1
        s = &self.kvm.slots[at]
        if not (s.flags & KVM_MEM_READONLY):
            with nogil:
                kvm_mmu_slot_apply_flags(&self.kvm, &self.st, s, log)
        if not log:
            # The swap ran under mmu_lock for write: no vCPU can still reach the old bitmap.
            PyMem_RawFree(old_bitmap)       # kvm_destroy_dirty_bitmap
        self._raise_fatal()
        return 0

    cdef kvm_memory_slot_t* _dirty_logged_slot(self, int64_t sid_wanted) except NULL:
        cdef kvm_memory_slot_t* s = &self.kvm.slots[self._slot_index(sid_wanted)]
        if s.dirty_bitmap == NULL:
            raise ValueError(f"memslot {sid_wanted} has no dirty log (-ENOENT): enable "
                             f"dirty logging with set_memslot_flags(slot_id, dirty_log=True)")
        return s

    cdef int _vcpu_handles(self, kvm_vcpu_t** out) except -1:
        """The vCPUs' structs (they live as long as the Vm: vCPUs are never removed)."""
        cdef Vcpu v
        cdef int n = 0
        with self._vcpu_lock:
            for v in self._vcpus:
                out[n] = &v.vcpu
                n += 1
        return n

    def get_dirty_log(self, slot_id):
        """KVM_GET_DIRTY_LOG -> numpy uint64 bitmap, bit i%64 of word i//64 for page i.

        Without manual protect each non-zero word is taken (and cleared) and its pages
        re-protected (kvm_arch_mmu_enable_log_dirty_pt_masked), then one memslot TLB flush
        if any was; with manual protect the bitmap is only copied."""
        cdef int64_t sid_wanted = _as_int(slot_id, "slot_id", INT64_MIN, INT64_MAX)
        cdef kvm_memory_slot_t* s
        cdef cnp.ndarray out
        cdef u64* o
        cdef u64 words
        cdef kvm_vcpu_t* vcpus[MAX_VCPUS]
        cdef int nv
        with self._slots_lock:
            s = self._dirty_logged_slot(sid_wanted)
            words = dirty_bitmap_words(s.npages)
            out = np.zeros(words, dtype=np.uint64)
            o = <u64*>cnp.PyArray_DATA(out)
            nv = self._vcpu_handles(vcpus)
            with nogil:
                kvm_mmu_write_lock(&self.kvm)
                kvm_arch_sync_dirty_log(&self.kvm, vcpus, nv)
                kvm_get_dirty_log_protect(&self.kvm, &self.st, s, o)
                kvm_mmu_write_unlock(&self.kvm)
            self._raise_fatal()
        return out

    def clear_dirty_log(self, slot_id, first_page, num_pages, bitmap):
        """KVM_CLEAR_DIRTY_LOG: for pages [first_page, first_page + num_pages), clear the
        bits set in ``bitmap`` (uint64 words from first_page) that are set in the dirty log
        and re-protect those pages; one memslot TLB flush if any.  6.10 does not require
        manual protect for it (kvm_clear_dirty_log_protect checks only the arguments)."""
        cdef int64_t sid_wanted = _as_int(slot_id, "slot_id", INT64_MIN, INT64_MAX)
        cdef u64 first = _as_u64(first_page, "first_page")
        cdef u64 num = _as_u64(num_pages, "num_pages")
        cdef kvm_memory_slot_t* s
        cdef cnp.ndarray words_in
        cdef const u64* user
        cdef u64 n
        cdef kvm_vcpu_t* vcpus[MAX_VCPUS]
        cdef int nv
        words_in = np.ascontiguousarray(_int_array(bitmap, "bitmap"), dtype=np.uint64)
        if first & 63:                      # checked before the slot, as 6.10 does
            raise ValueError(f"first_page {first} is not a multiple of 64 (-EINVAL)")
        with self._slots_lock:
            s = self._dirty_logged_slot(sid_wanted)
            if first > s.npages or num > s.npages - first or \
                    (num < s.npages - first and (num & 63)):
                raise ValueError(f"pages [{first}, {first + num}) do not fit the "
                                 f"{s.npages}-page slot in 64-page words (-EINVAL)")
            n = (num + 63) >> 6
            if <u64>words_in.shape[0] < n:
                raise ValueError(f"bitmap has {words_in.shape[0]} words, {n} needed")
            user = <const u64*>cnp.PyArray_DATA(words_in)
            nv = self._vcpu_handles(vcpus)
            with nogil:
                kvm_mmu_write_lock(&self.kvm)
                kvm_arch_sync_dirty_log(&self.kvm, vcpus, nv)
                kvm_clear_dirty_log_protect(&self.kvm, &self.st, s, first, n, user)
                kvm_mmu_write_unlock(&self.kvm)
            self._raise_fatal()

    # -- MMU notifiers, page tracking, huge pages ------------------------------------------
    def unmap_gfn_range(self, start, end):
        """MMU notifier invalidate_range_start (kvm_unmap_gfn_range): zap the leaves in
        [start, end) of every memslot it intersects, in every root; True if a flush was
        needed, and then one full TLB flush is done."""
        cdef gfn_t st, e, lo, hi
        cdef kvm_memory_slot_t* sl
        cdef bint flush = False
        cdef int i
        st, e = self._gfn_range(start, end)
        with self._slots_lock:
            with nogil:
                kvm_mmu_write_lock(&self.kvm)
                for i in range(self.kvm.nslots):
                    sl = &self.kvm.slots[i]
                    lo = max(st, sl.base_gfn)
                    hi = min(e, sl.base_gfn + sl.npages)
                    if lo < hi:
                        flush |= kvm_tdp_mmu_unmap_gfn_range(&self.kvm, &self.st, lo, hi)
                if flush:
                    self.st.tlb_flushes += 1            # kvm_flush_remote_tlbs
                kvm_mmu_write_unlock(&self.kvm)
            self._raise_fatal()
        return bool(flush)

    def write_protect_gfn(self, gfn, min_level=1):
        """kvm_mmu_slot_gfn_write_protect (as page tracking calls it): W and MMU-writable
        cleared on the leaf mapping gfn at >= min_level; True if one changed, and then one
        full TLB flush is done (kvm_flush_remote_tlbs, before mmu_lock is dropped)."""
        cdef gfn_t g = self._gfn(gfn, "gfn")
        cdef int lvl = <int>_as_int(min_level, "min_level", 1, PG_LEVEL_1G)
        cdef bint changed
        with self._slots_lock:
            if search_memslots(&self.kvm, g) == NULL:
                raise ValueError(f"gfn {g:#x} is in no memslot")
            with nogil:
                kvm_mmu_write_lock(&self.kvm)
                changed = kvm_mmu_slot_gfn_write_protect(&self.kvm, &self.st, g, lvl)
                if changed:
                    self.st.tlb_flushes += 1
                kvm_mmu_write_unlock(&self.kvm)
            self._raise_fatal()
        return bool(changed)

    def split_huge_pages(self, start, end, target_level=1):
        """Eager split (kvm_tdp_mmu_try_split_huge_pages, mmu_lock held for read): every
        huge leaf in [start, end) above target_level becomes 512 smaller ones, with tables
        taken from the host, not a vCPU cache; no TLB flush.  Returns the huge SPTEs split
        (a 1G page split to 4K counts 1 + 512).  Running out of table memory stops it there
        (KVM's try: no error)."""
        cdef gfn_t st, e
        cdef int lvl = <int>_as_int(target_level, "target_level", 1, PG_LEVEL_2M)
        cdef int64_t r, before
        st, e = self._gfn_range(start, end)
        with self._slots_lock:
            before = self.st.huge_pages_split
            with nogil:
                kvm_mmu_read_lock(&self.kvm, VM_READER)
                r = kvm_mmu_try_split_huge_pages(&self.kvm, &self.st, st, e, lvl, True)
                kvm_mmu_read_unlock(&self.kvm, VM_READER)
                rcu_reclaim_pending(&self.kvm)
            self._raise_fatal()
        return self.st.huge_pages_split - before

    def recover_nx_huge_pages(self):
        """One run of the NX recovery thread (kvm_recover_nx_huge_pages): zap
        ceil(nx_lpage_splits / nx_huge_pages_recovery_ratio) tables from the head of the
        possible-NX list, only unaccounting those in dirty-logged slots; one full flush if
        any was zapped.  Returns the tables zapped."""
        cdef int64_t z
        with self._slots_lock:
            with nogil:
                kvm_mmu_write_lock(&self.kvm)
                z = kvm_recover_nx_huge_pages(&self.kvm, &self.st)
                kvm_mmu_write_unlock(&self.kvm)
            self._raise_fatal()
        return z

    def set_nx_huge_pages(self, on):
        """The nx_huge_pages module parameter at run time (set_nx_huge_pages): a change zaps
        everything fast, so later faults map with the new setting."""
        cdef bint v
        if not isinstance(on, (bool, int)):
            raise TypeError(f"on must be a bool, not {type(on).__name__}")
        v = bool(on)
        with self._slots_lock:
            if v == self.kvm.nx_huge_pages:
                return
            with nogil:
                kvm_mmu_write_lock(&self.kvm)
                self.kvm.nx_huge_pages = v
                _leaf_templates(&self.kvm)
                kvm_mmu_write_unlock(&self.kvm)
            self._zap_all_fast()

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
        if not path:
            return None
        level, spte = path[len(path) - 1]
        if is_shadow_present_pte(spte) and is_last_spte(spte, level):
            return (spte, level)
        return None

    def tdp_iter(self, start, end, min_level=1):
        """[(level, gfn, spte), ...]: the entries for_each_tdp_pte_min_level(min_level,
        start, end) visits, in its (pre-)order."""
        cdef gfn_t s, e
        s, e = self._gfn_range(start, end)
        return self._tdp_iter(s, e, <int>_as_int(min_level, "min_level", 1, self.kvm.root_level))

    cdef list _tdp_iter(self, gfn_t start, gfn_t end, int min_level):
        """The walk over the valid root (none yet: nothing to visit)."""
        cdef tdp_iter_t it
        cdef int64_t root
        out = []
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
        try:
            root = kvm_valid_root(&self.kvm)
            if root < 0:
                return out
            tdp_iter_start(&it, self.kvm.pool.pages, root_pt(&self.kvm, root),
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
            "faults_fast": c.st.faults_fast,
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
            "hw_walks": c.st.hw_walks, "hw_ad_sets": c.st.hw_ad_sets,
            "exits_ept_violation": c.st.exits_ept_violation,
            "exits_misconfig": c.st.exits_misconfig,
            "exits_pml_full": c.st.exits_pml_full, "pml_logged": c.st.pml_logged,
            "dirty_pages_marked": c.st.dirty_pages_marked,
            "huge_pages_split": c.st.huge_pages_split,
            "nx_huge_pages_recovered": c.st.nx_huge_pages_recovered,
            "guest_walks": c.st.guest_walks, "guest_walk_refs": c.st.guest_walk_refs,
            "guest_faults": c.st.guest_faults, "guest_ad_sets": c.st.guest_ad_sets,
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
        cdef gfn_t s, e
        cdef bint flush
        s, e = self._gfn_range(start, end)
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            flush = kvm_tdp_mmu_zap_leafs(&self.kvm, &self.st, s, e) if s < e else False
            if flush:
                self.st.tlb_flushes_ranged += 1
            kvm_mmu_write_unlock(&self.kvm)
        self._raise_fatal()
        return bool(flush)

    cdef tuple _gfn_range(self, start, end):
        """(start, end) checked: ints, start <= end <= the address width."""
        cdef gfn_t s = _as_u64(start, "start")
        cdef gfn_t e = _as_u64(end, "end")
        if e > self.kvm.gfn_limit:
            raise ValueError(f"end {e:#x} is beyond the address width ({self.kvm.gfn_limit:#x})")
        if s > e:
            raise ValueError(f"start {s:#x} > end {e:#x}")
        return s, e

    def age_gfn_range(self, start, end, flush=False):
        """MMU notifier clear_young (``flush=False``) / clear_flush_young: age the present
        leaves intersecting [start, end) in every root -- clear A where A/D bits are used,
        else mark for access tracking after pushing W to the host page's dirty flag.  True
        if any was young (then, with ``flush``, one full TLB flush)."""
        cdef gfn_t s, e
        cdef bint young, fl = bool(flush)
        s, e = self._gfn_range(start, end)
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            young = kvm_tdp_mmu_handle_gfn(&self.kvm, s, e, True)
            if young and fl:
                self.st.tlb_flushes += 1
            kvm_mmu_write_unlock(&self.kvm)
        return bool(young)

    def test_age_gfn(self, start, end):
        """MMU notifier test_young: is any present leaf in [start, end) accessed?"""
        cdef gfn_t s, e
        cdef bint young
        s, e = self._gfn_range(start, end)
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            young = kvm_tdp_mmu_handle_gfn(&self.kvm, s, e, False)
            kvm_mmu_write_unlock(&self.kvm)
        return bool(young)

    def zap_all(self):
        """kvm_mmu_zap_all: every root, valid or invalid, zapped by 4K, 2M, 1G and
        root-level passes; the roots stay.  No TLB flush (6.10).  True if anything was
        zapped."""
        cdef int zapped
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            zapped = kvm_tdp_mmu_zap_all(&self.kvm, &self.st)
            kvm_mmu_write_unlock(&self.kvm)
        self._raise_fatal()
        return zapped > 0

    def zap_all_fast(self):
        """kvm_mmu_zap_all_fast: invalidate every root, zap them (shared), drop the MMU's
        references; each vCPU loads a new root on its next entry."""
        with self._slots_lock:          # KVM asserts slots_lock
            self._zap_all_fast()

    def zap_sp(self, gfn, level):
        """Zap the level-``level`` table on gfn's path (its parent entry -> non-present)."""
        cdef gfn_t g = self._gfn(gfn, "gfn")
        cdef int lvl = <int>_as_int(level, "level", 1, self.kvm.root_level - 1)
        cdef bint done
        cdef int64_t root
        with nogil:
            kvm_mmu_write_lock(&self.kvm)
            root = kvm_valid_root(&self.kvm)
            done = root >= 0 and tdp_mmu_zap_sp_at(&self.kvm, &self.st, root, g, lvl)
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
        cdef int64_t root
        while r == -SPTE_EBUSY:
            with nogil:
                kvm_mmu_write_lock(&self.kvm)
                root = kvm_valid_root(&self.kvm)
                r = 0 if root < 0 else \
                    tdp_mmu_zap_spte_atomic_at(&self.kvm, &self.st, root, g, lvl, RETRY_CHECK)
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
