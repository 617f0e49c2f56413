# =====================================================================================
# core/kvm_vcpu.pxi: the vCPU as a Python object (≈ kvm_main.c's vCPU ioctls: KVM_RUN
# stands for a batch of faults or accesses)
# =====================================================================================

cdef cnp.ndarray _error_code_array(object a, Py_ssize_t n):
    """fault_batch's ``error_codes``: 1-D integers of n entries, each a 32-bit error code."""
    arr = _int_array(a, "error_codes")
    if arr.shape[0] != n:
        raise ValueError(f"error_codes has {arr.shape[0]} entries, gfns has {n}")
    if arr.size and int(arr.max()) > 0xFFFFFFFF:
        raise ValueError("error_codes values must be 32-bit error codes (0 .. 2**32 - 1)")
    return np.ascontiguousarray(arr, dtype=np.uint64)


cdef cnp.ndarray _hw_access_array(object a, Py_ssize_t n):
    """access_batch's ``access``: 0 read, 1 write, 2 instruction fetch."""
    arr = _int_array(a, "access")
    if arr.shape[0] != n:
        raise ValueError(f"access has {arr.shape[0]} entries, gfns has {n}")
    if arr.size and int(arr.max()) > ACC_FETCH:
        raise ValueError("access values must be 0..2 (0 read, 1 write, 2 fetch; a fetch is "
                         "never a write)")
    return np.ascontiguousarray(arr, dtype=np.uint8)


@cython.final
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
        self.vcpu.root = -1                 # INVALID_PAGE until its first entry
        self.vcpu.guest_levels = 4
        vm._register_vcpu(self)         # Vcpu(vm) and vm.vcpu() are the same thing

    @property
    def root(self):
        """Pool index of the root this vCPU has loaded (mmu->root.hpa), or None."""
        return None if self.vcpu.root < 0 else self.vcpu.root

    def fault(self, gfn, write=False, exec=False, *, error_code=None):
        """One exit delivered to the MMU (kvm_mmu_page_fault) -> PF.FIXED / SPURIOUS /
        RETRY / EMULATE.  ``write``/``exec`` alone: a not-present fault; ``error_code``: the
        full PFERR_* error code instead (then write and exec must be False)."""
        cdef gfn_t g = self.vm._gfn(gfn, "gfn")
        cdef bint w = bool(write)
        cdef bint x = bool(exec)
        cdef u64 ec
        cdef int r
        if error_code is None:
            ec = fault_error_code(w, x)
        else:
            ec = <u64>_as_int(error_code, "error_code", 0, 0xFFFFFFFF)
            if w or x:
                raise ValueError("pass either write/exec or error_code, not both")
        with nogil:
            r = vcpu_fault_error_code(&self.vcpu, g, ec)
        self.vm._raise_fatal()
        _check_rc(r, f"fault(gfn={g:#x})", self.cache.mc.last_warn)
        return PF(r)

    def fault_batch(self, gfns, access=None, out=None, *, error_codes=None):
        """Fault every gfn in order, in C with the GIL released.

        ``gfns``: 1-D integer array; ``access``: None or 1-D integers (bit 0 write,
        bit 1 exec); ``error_codes``: None or 1-D 32-bit error codes (instead of
        ``access``); ``out``: None or a writable int8 array receiving each final PF.
        RETRY results are faulted again (counted in "retry").  Returns the counts.
        """
        cdef cnp.ndarray g_arr = _gfn_array(gfns, "gfns", self.vm.kvm.gfn_limit)
        cdef Py_ssize_t n = g_arr.shape[0]
        cdef cnp.ndarray a_arr = None
        cdef cnp.ndarray e_arr = None
        cdef cnp.ndarray o_arr = None
        cdef int8_t[:] o_view = None
        cdef const uint8_t* a = NULL
        cdef const u64* e = NULL
        cdef int8_t* o = NULL
        if access is not None and error_codes is not None:
            raise ValueError("pass either access or error_codes, not both")
        if access is not None:
            a_arr = _access_array(access, n)
            a = <const uint8_t*>cnp.PyArray_DATA(a_arr)
        if error_codes is not None:
            e_arr = _error_code_array(error_codes, n)
            e = <const u64*>cnp.PyArray_DATA(e_arr)
        if out is not None:
            o_view = _out_view(out, n)      # length, strides from the buffer protocol
            o_arr = _out_scratch(o_view)    # a strided view: filled here, copied back below
            o = <int8_t*>cnp.PyArray_DATA(o_arr) if o_arr is not None else _out_ptr(o_view)
        cdef const gfn_t* g = <const gfn_t*>cnp.PyArray_DATA(g_arr)
        cdef int64_t counts[NR_BATCH_COUNTS]
        cdef Py_ssize_t done = 0
        cdef int rc = BATCH_INTERRUPTIBLE
        memset(counts, 0, sizeof(counts))
        try:
            while rc == BATCH_INTERRUPTIBLE:
                with nogil:
                    rc = vcpu_fault_batch(&self.vcpu, g, a, e, o, n, counts, &done)
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
                "retry": counts[RET_PF_RETRY], "emulate": counts[RET_PF_EMULATE],
                "fast": counts[COUNT_FAST]}

    @property
    def cr3(self):
        """The guest's CR3 (a gpa), or None while the guest runs with paging off."""
        return self.vcpu.guest_cr3 if self.vcpu.guest_paging else None

    @property
    def guest_levels(self):
        return self.vcpu.guest_levels

    def set_cr3(self, gpa, *, levels=4):
        """The guest loads CR3 (long mode, CR0.WP=1, EFER.NX=1, no PCID): from now on
        ``access`` takes guest-virtual addresses.  None turns guest paging off.  Under TDP
        no exit happens (CR3 loads are not intercepted) and no MMU state changes."""
        cdef u64 g
        cdef int lv
        if gpa is None:
            self.vcpu.guest_paging = False
            return
        g = _as_u64(gpa, "gpa")
        lv = <int>_as_int(levels, "levels", 0, 1 << 30)
        if lv != 4 and lv != 5:
            raise ValueError(f"levels must be 4 or 5, not {lv}")
        if g & 0xFFF:
            raise ValueError(f"CR3 {g:#x} must be 4K-aligned (no PCID or flag bits here)")
        if (g >> 12) >= self.vm.kvm.gfn_limit or (g >> self.vm.kvm.host_phys_bits):
            raise ValueError(f"CR3 {g:#x} is beyond the guest's physical address width")
        with nogil:                         # not under a running access of this vCPU
            pthread_mutex_lock(&self.vcpu.mmu_shadow_page_cache.lock)
            self.vcpu.guest_cr3 = g
            self.vcpu.guest_levels = lv
            self.vcpu.guest_paging = True
            pthread_mutex_unlock(&self.vcpu.mmu_shadow_page_cache.lock)

    def invlpg(self, gva):
        """The guest invalidates gva's translation.  Under TDP INVLPG is not intercepted
        (no exit) and the model keeps no guest TLB: nothing changes."""
        if not self.vcpu.guest_paging:
            raise ValueError("the guest runs with paging off: INVLPG has no translation")
        _canonical_gva(&self.vcpu, gva)

    def walk(self, gva):
        """[(level, entry)] of the guest's page tables for gva, from CR3 down to the first
        entry that is not a present table (read as the VMM reads guest memory)."""
        if not self.vcpu.guest_paging:
            raise ValueError("the guest runs with paging off: vm.walk(gfn) lists the SPTEs")
        cdef u64 g = _canonical_gva(&self.vcpu, gva)
        cdef u64 table = self.vcpu.guest_cr3
        out = []
        for level in range(self.vcpu.guest_levels, 0, -1):
            try:
                pte = self.vm.read_guest(table + 8 * ((g >> (12 + 9 * (level - 1))) & 511))
            except ValueError:
                break
            out.append((level, pte))
            if not pte & 1 or level == 1 or (level in (2, 3) and pte & 0x80):
                break
            table = pte & GPTE_FRAME
        return out

    def access(self, addr, write=False, exec=False, user=True):
        """One guest access as the CPU makes it, with its exits until it completes.  Paging
        off: ``addr`` is a gfn; the EPT/NPT walk (setting A, and D on a write); None if no
        exit happened, else the PF of the last exit (EMULATE: the emulator did the access).
        Paging on: ``addr`` is a guest-virtual address; the two-dimensional walk; None,
        GUEST_PAGE_FAULT, or the PF of the first exit."""
        cdef bint w = bool(write)
        cdef bint x = bool(exec)
        cdef bint u = bool(user)
        cdef int r = ACCESS_INTERRUPTED
        cdef u64 gva
        cdef int64_t counts[NR_BATCH_COUNTS]
        if w and x:
            raise ValueError("an access is a read, a write or an instruction fetch, not both")
        if self.vcpu.guest_paging:
            gva = _canonical_gva(&self.vcpu, addr)
            memset(counts, 0, sizeof(counts))
            while r == ACCESS_INTERRUPTED:
                with nogil:
                    r = vcpu_guest_access(&self.vcpu, gva,
                                          ACC_WRITE if w else (ACC_FETCH if x else ACC_READ),
                                          u, counts)
                if r == ACCESS_INTERRUPTED:
                    PyErr_CheckSignals()
            self.vm._raise_fatal()
            _check_rc(r, f"access(gva={gva:#x})", self.cache.mc.last_warn)
            if r == ACCESS_GUEST_PAGE_FAULT:
                return GUEST_PAGE_FAULT
            return None if r == 0 else PF(r)
        cdef gfn_t g = self.vm._gfn(addr, "gfn")
        while r == ACCESS_INTERRUPTED:
            with nogil:
                r = vcpu_access(&self.vcpu, g, w, x)
            if r == ACCESS_INTERRUPTED:
                PyErr_CheckSignals()
        self.vm._raise_fatal()
        _check_rc(r, f"access(gfn={g:#x})", self.cache.mc.last_warn)
        return None if r == 0 else PF(r)

    def store(self, addr, value):
        """A user-mode 8-byte MOV to ``addr`` (guest-virtual with paging on, else a gpa):
        the access with every exit it takes, then the value lands in guest memory.  Returns
        what ``access`` returns; nothing is written on GUEST_PAGE_FAULT or EMULATE (the
        MMIO write goes to a device, and there is none)."""
        return _vcpu_mov(self, addr, True, value)

    def load(self, addr):
        """A user-mode 8-byte MOV from ``addr``: ``(value, result)``, result as ``access``
        returns it; value None when no RAM was read (a guest page fault, or MMIO)."""
        return _vcpu_mov(self, addr, False, None)

    def access_batch(self, gfns, access=None, out=None):
        """The CPU's accesses to ``gfns`` in order, in C with the GIL released (with guest
        paging on: to guest-virtual addresses, a uint64 array; user-mode accesses; the
        results also count "guest_faults").

        ``access``: None (reads) or 1-D integers 0 read, 1 write, 2 fetch; ``out``: None or
        a writable int8 array receiving per access ACCESS_HIT (0) or the PF of its last
        exit.  Returns {"hits", "fixed", "spurious", "retry", "emulate", "fast"}: accesses
        without an exit, then the exits by result.
        """
        cdef bint paging = self.vcpu.guest_paging
        cdef cnp.ndarray g_arr = (_gva_array(&self.vcpu, gfns) if paging else
                                  _gfn_array(gfns, "gfns", self.vm.kvm.gfn_limit))
        cdef Py_ssize_t n = g_arr.shape[0]
        cdef cnp.ndarray a_arr = None
        cdef cnp.ndarray o_arr = None
        cdef int8_t[:] o_view = None
        cdef const uint8_t* a = NULL
        cdef int8_t* o = NULL
        if access is not None:
            a_arr = _hw_access_array(access, n)
            a = <const uint8_t*>cnp.PyArray_DATA(a_arr)
        if out is not None:
            o_view = _out_view(out, n)
            o_arr = _out_scratch(o_view)
            o = <int8_t*>cnp.PyArray_DATA(o_arr) if o_arr is not None else _out_ptr(o_view)
        cdef const u64* g = <const u64*>cnp.PyArray_DATA(g_arr)
        cdef int64_t counts[NR_BATCH_COUNTS]
        cdef int64_t guest_faults = 0
        cdef Py_ssize_t done = 0
        cdef int rc = BATCH_INTERRUPTIBLE
        memset(counts, 0, sizeof(counts))
        try:
            while rc == BATCH_INTERRUPTIBLE:
                with nogil:
                    if paging:
                        rc = vcpu_guest_access_batch(&self.vcpu, g, a, True, o, n, counts,
                                                     &guest_faults, &done)
                    else:
                        rc = vcpu_access_batch(&self.vcpu, g, a, o, n, counts, &done)
                if rc == BATCH_INTERRUPTIBLE:
                    PyErr_CheckSignals()
        finally:
            if o_arr is not None:
                _out_copy_back(o_view, o_arr, done)
        self.vm._raise_fatal()
        _check_rc(rc, f"access_batch: stopped after {done} of {n} accesses",
                  self.cache.mc.last_warn, done,
                  f"gfns[{done}] or access[{done}] changed under the batch to a bad value")
        res = {"hits": counts[0], "fixed": counts[RET_PF_FIXED],
               "spurious": counts[RET_PF_SPURIOUS], "retry": counts[RET_PF_RETRY],
               "emulate": counts[RET_PF_EMULATE], "fast": counts[COUNT_FAST]}
        if paging:
            res.update(guest_faults=guest_faults)
        return res

    @property
    def stats(self):
        """This vCPU's own counters: faults by result and its hardware view."""
        cdef mmu_stats_t* st = &self.vcpu.stat
        return {"faults_fixed": st.faults[RET_PF_FIXED],
                "faults_spurious": st.faults[RET_PF_SPURIOUS],
                "faults_retry": st.faults[RET_PF_RETRY],
                "faults_emulate": st.faults[RET_PF_EMULATE],
                "faults_fast": st.faults_fast, "hw_walks": st.hw_walks,
                "hw_ad_sets": st.hw_ad_sets, "exits_ept_violation": st.exits_ept_violation,
                "exits_misconfig": st.exits_misconfig, "exits_pml_full": st.exits_pml_full,
                "pml_logged": st.pml_logged, "dirty_pages_marked": st.dirty_pages_marked,
                "guest_walks": st.guest_walks, "guest_walk_refs": st.guest_walk_refs,
                "guest_faults": st.guest_faults, "guest_ad_sets": st.guest_ad_sets}


cdef cnp.ndarray _gva_array(kvm_vcpu_t* vcpu, gvas):
    """access_batch's addresses with guest paging: a 1-D uint64 array of canonical gvas."""
    cdef cnp.ndarray g_arr = _u64_array(gvas, "gvas", False)
    if g_arr.ndim != 1:
        raise ValueError(f"gvas must be 1-D, not of {g_arr.ndim} dimensions")
    cdef int bits = 48 if vcpu.guest_levels == 4 else 57
    top = g_arr >> np.uint64(bits - 1)
    bad = np.flatnonzero((top != 0) & (top != np.uint64((1 << (65 - bits)) - 1)))
    if bad.size:
        raise ValueError(f"gvas[{bad[0]}] = {int(g_arr[bad[0]]):#x} is not canonical for "
                         f"{vcpu.guest_levels}-level paging (the access would #GP)")
    return g_arr


cdef object _vcpu_mov(Vcpu self, addr, bint write, value):
    """vcpu.load / vcpu.store: the access (vcpu_guest_tlb_fill or vcpu_tlb_fill, which
    also give the host page that backs it), then the word in guest memory."""
    cdef u64 a, v = 0
    cdef hw_tlb_entry_t e
    cdef int r = ACCESS_INTERRUPTED
    cdef int acc = ACC_WRITE if write else ACC_READ
    cdef int64_t counts[NR_BATCH_COUNTS]
    cdef u64* words_
    cdef bint paging = self.vcpu.guest_paging
    if write:
        v = _as_u64(value, "value")
    a = _canonical_gva(&self.vcpu, addr) if paging else _as_u64(addr, "gpa")
    if a & 7:
        raise ValueError(f"{'gva' if paging else 'gpa'} {a:#x} is not 8-byte aligned")
    if not paging and (a >> 12) >= self.vm.kvm.gfn_limit:
        raise ValueError(f"gpa {a:#x} is beyond the {self.vm.kvm.root_level}-level address "
                         "width")
    memset(counts, 0, sizeof(counts))
    while r == ACCESS_INTERRUPTED:
        with nogil:
            if paging:
                r = vcpu_guest_tlb_fill(&self.vcpu, a, acc, True, counts, &e)
            else:
                r = vcpu_tlb_fill(&self.vcpu, a >> 12, acc, counts, &e)
        if r == ACCESS_INTERRUPTED:
            PyErr_CheckSignals()
    self.vm._raise_fatal()
    _check_rc(r, f"{'store' if write else 'load'}({a:#x})", self.cache.mc.last_warn)
    res = None if r == 0 else (GUEST_PAGE_FAULT if r == ACCESS_GUEST_PAGE_FAULT else PF(r))
    if e.level == 0:                        # no RAM behind it: nothing moves
        return res if write else (None, res)
    with nogil:
        pthread_mutex_lock(&self.vm.kvm.guest_mem.lock)
        if write:
            words_ = guest_mem_page(&self.vm.kvm.guest_mem, e.pfn)
            if words_ != NULL:
                words_[(a >> 3) & 511] = v
        else:
            words_ = guest_mem_lookup(&self.vm.kvm.guest_mem, e.pfn)
            v = words_[(a >> 3) & 511] if words_ != NULL else 0
        pthread_mutex_unlock(&self.vm.kvm.guest_mem.lock)
    if write and words_ == NULL:
        raise OutOfMemory("no host memory for a guest memory page")
    return res if write else (v, res)


cdef u64 _canonical_gva(kvm_vcpu_t* vcpu, gva) except? 0xFFFFFFFFFFFFFFFF:
    """A guest-virtual address of the vCPU's paging mode: bits 63..47 (56 with 5 levels)
    equal, else ValueError (the access would #GP, not #PF)."""
    cdef u64 g = _as_u64(gva, "gva")
    cdef int bits = 48 if vcpu.guest_levels == 4 else 57
    cdef u64 top = g >> (bits - 1)
    if top != 0 and top != (<u64>1 << (65 - bits)) - 1:
        raise ValueError(f"gva {g:#x} is not canonical for {vcpu.guest_levels}-level paging "
                         "(the access would #GP)")
    return g


cdef kvm_vcpu_t* vcpu_handle(object vcpu) except NULL:
    """The kvm_vcpu_t of a Python Vcpu (the embedding API; see README "Embedding")."""
    if not isinstance(vcpu, Vcpu):
        raise TypeError(f"expected a spte_fast.Vcpu, not {type(vcpu).__name__}")
    return &(<Vcpu>vcpu).vcpu
