# =====================================================================================
# core/guest_walk.pxi: the CPU's two-dimensional walk -- a guest-virtual access of a
# guest with paging on, under TDP (Intel SDM vol. 3 §4.5, §4.6, §4.8, §29.3.2; AMD APM
# vol. 2 §5.3, §15.25)
# =====================================================================================
# Not KVM code: each guest paging-structure entry is read at a guest-physical address that
# the TDP tables translate first (an EPT violation / #NPF there is a real exit), then the
# final guest-physical address is translated for the access itself.  The choices the
# manuals leave open follow KVM's own model of this walk, FNAME(walk_addr_generic) in
# paging_tmpl.h: paging-structure accesses go through the TDP tables as user writes
# (nested_access = PFERR_WRITE_MASK | PFERR_USER_MASK: x86-64 guest entries have A/D bits)
# with PFERR_GUEST_PAGE_MASK in the exit's error code, the final access as itself with
# PFERR_GUEST_FINAL_MASK; the entries are read top down, the access rights checked
# (CR0.WP=1, EFER.NX=1, no SMEP/SMAP), the final address translated, and only then A set
# in every entry and D in the leaf on a write -- none on a guest page fault.  After an exit
# KVM handled, the guest re-executes the access from the start; KVM emulating a
# paging-structure access (no memslot behind it) ends it with a guest page fault.  Guest
# entries are words of guest memory (core/guest_memory.pxi), read with atomic loads and
# OR-ed with atomic ORs through the vCPU's cache of page pointers.

cdef extern from *:
    """
    #define SF_PFERR_GUEST_FINAL_MASK (1ULL << 32)
    #define SF_PFERR_GUEST_PAGE_MASK (1ULL << 33)
    #define SF_GPTE_FRAME (((1ULL << 52) - 1) & ~0xFFFULL)
    #define SF_GPTE_NX (1ULL << 63)
    """
    u64 PFERR_GUEST_FINAL_MASK "SF_PFERR_GUEST_FINAL_MASK"
    u64 PFERR_GUEST_PAGE_MASK "SF_PFERR_GUEST_PAGE_MASK"
    u64 GPTE_FRAME "SF_GPTE_FRAME"
    u64 GPTE_NX "SF_GPTE_NX"

cdef enum:
    GPTE_P = 1 << 0
    GPTE_W = 1 << 1
    GPTE_U = 1 << 2
    GPTE_A = 1 << 5
    GPTE_D = 1 << 6
    GPTE_PS = 1 << 7
    # one execution of the access:
    GW_OK = 0
    GW_RESTART = 1                  # an exit was handled: re-execute
    GW_GUEST_FAULT = 2              # the guest takes a page fault
    GW_EMULATED = 3                 # KVM emulated the final access


ctypedef struct guest_walk_t:
    int64_t refs                    # memory references: guest entries and TDP entries read
    int first                       # RET_PF_* of the first exit, -1 before any
    int64_t* counts                 # NR_BATCH_COUNTS, as vcpu_tlb_fill's
    # what the last complete walk found (for a TLB entry):
    u64 final_gpa
    int guest_perms                 # HW_PERM_*: what the guest's entries allow


cdef inline u64* _gm_cached(kvm_vcpu_t* vcpu, pfn_t pfn) noexcept nogil:
    """The guest-memory page of pfn from the vCPU's cache, else looked up under the lock
    and cached when it exists (pages are never freed before the VM: a cached pointer stays
    right; an absent page is not cached, so a later write_guest is seen)."""
    cdef int k = <int>(pfn & (GM_CACHE - 1))
    cdef u64* words_
    if vcpu.gm_page[k] != NULL and vcpu.gm_pfn[k] == pfn:
        return vcpu.gm_page[k]
    pthread_mutex_lock(&vcpu.kvm.guest_mem.lock)
    words_ = guest_mem_lookup(&vcpu.kvm.guest_mem, pfn)
    pthread_mutex_unlock(&vcpu.kvm.guest_mem.lock)
    if words_ != NULL:
        vcpu.gm_pfn[k] = pfn
        vcpu.gm_page[k] = words_
    return words_


cdef u64 guest_mem_read_word(kvm_vcpu_t* vcpu, pfn_t pfn, int index) noexcept nogil:
    """A guest entry, as the CPU reads it (an 8-byte aligned load: atomic on x86)."""
    cdef u64* words_ = _gm_cached(vcpu, pfn)
    return i64_load_relaxed(<const int64_t*>&words_[index]) if words_ != NULL else 0


cdef int guest_mem_or_word(kvm_vcpu_t* vcpu, pfn_t pfn, int index, u64 bits) noexcept nogil:
    """The CPU's locked OR into a guest entry (0, or -SPTE_ENOMEM).  The entry was read
    present, so its page exists."""
    cdef u64* words_ = _gm_cached(vcpu, pfn)
    if words_ == NULL:
        return -SPTE_ENOMEM
    u64_or_relaxed(&words_[index], bits)
    return 0


cdef int _tdp_translate(kvm_vcpu_t* vcpu, u64 gpa, int acc, u64 extra, guest_walk_t* w,
                        pfn_t* pfn) noexcept nogil:
    """The TDP walk of one guest-physical address: GW_OK with the host pfn, GW_RESTART after
    an exit KVM handled, GW_GUEST_FAULT / GW_EMULATED when KVM emulated it, or -SPTE_E*."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef gfn_t gfn = gpa >> 12
    cdef bint leaf_present = False
    cdef hw_tlb_entry_t e
    cdef int ex, r, level
    cdef int64_t fast_before
    cdef u64 spte
    if gfn >= kvm.gfn_limit:
        return GW_GUEST_FAULT
    level = hw_walk_last(vcpu, gfn, &spte)
    w.refs += kvm.root_level - level + 1
    if hw_entry_usable(kvm, spte) and (spte & kvm.hw_hit_check[acc]) == kvm.hw_hit_need[acc]:
        vcpu.stat.hw_walks += 1                 # the common case: a walk that sets nothing
        pfn[0] = hw_leaf_pfn(spte, level, gfn)
        return GW_OK
    ex = hw_tdp_walk(vcpu, gfn, acc, &leaf_present)
    if ex == HW_HIT:
        hw_tlb_entry(vcpu, gfn, &e)
        pfn[0] = e.pfn
        return GW_OK
    fast_before = vcpu.stat.faults_fast
    r = hw_vm_exit(vcpu, gfn, ex, acc, leaf_present, extra)
    if r == EXIT_PML_FULL:
        return GW_RESTART
    if r < 0:
        return r
    w.counts[r] += 1
    w.counts[COUNT_FAST] += vcpu.stat.faults_fast - fast_before
    if w.first < 0:
        w.first = r
    if r == RET_PF_EMULATE:
        return GW_GUEST_FAULT if extra == PFERR_GUEST_PAGE_MASK else GW_EMULATED
    return GW_RESTART


cdef inline bint _gpte_reserved(kvm_t* kvm, u64 pte, int level) noexcept nogil:
    """Reserved bits of a present entry: address bits at or above MAXPHYADDR (the guest's =
    the host's), PS at levels 4 and 5, the low frame bits of a 2M / 1G page (not PAT)."""
    cdef u64 low
    if pte & GPTE_FRAME & ~((<u64>1 << kvm.host_phys_bits) - 1):
        return True
    if level >= 4 and (pte & GPTE_PS):
        return True
    if (level == 2 or level == 3) and (pte & GPTE_PS):
        low = ((<u64>1 << (9 * (level - 1))) - 1) << 12
        return (pte & low & ~(<u64>1 << 12)) != 0
    return False


cdef int _guest_walk_once(kvm_vcpu_t* vcpu, u64 gva, int acc, bint user,
                          guest_walk_t* w) noexcept nogil:
    """One execution of the access (inside the read side): GW_* or -SPTE_E*."""
    cdef kvm_t* kvm = vcpu.kvm
    cdef u64 table = vcpu.guest_cr3 & GPTE_FRAME, gpa, pte = 0, final, want, size
    cdef pfn_t pfn
    cdef pfn_t pfns[5]
    cdef int idx[5]
    cdef u64 ptes[5]
    cdef int level, n = 0, r, i
    cdef bint w_ok = True, u_ok = True, xd = False
    vcpu.stat.guest_walks += 1
    level = vcpu.guest_levels
    while level >= 1:
        gpa = table + 8 * ((gva >> (12 + 9 * (level - 1))) & 511)
        r = _tdp_translate(vcpu, gpa, ACC_WRITE, PFERR_GUEST_PAGE_MASK, w, &pfn)
        if r != GW_OK:
            return r
        pte = guest_mem_read_word(vcpu, pfn, <int>((gpa >> 3) & 511))
        w.refs += 1
        pfns[n] = pfn
        idx[n] = <int>((gpa >> 3) & 511)
        ptes[n] = pte
        n += 1
        if not (pte & GPTE_P) or _gpte_reserved(kvm, pte, level):
            return GW_GUEST_FAULT
        w_ok = w_ok and (pte & GPTE_W) != 0
        u_ok = u_ok and (pte & GPTE_U) != 0
        xd = xd or (pte & GPTE_NX) != 0
        if level == 1 or ((level == 2 or level == 3) and (pte & GPTE_PS)):
            break
        table = pte & GPTE_FRAME
        level -= 1
    if (user and not u_ok) or (acc == ACC_WRITE and not w_ok) or (acc == ACC_FETCH and xd):
        return GW_GUEST_FAULT
    size = <u64>1 << (12 + 9 * (level - 1))
    final = (pte & GPTE_FRAME & ~(size - 1)) | (gva & (size - 1))
    r = _tdp_translate(vcpu, final, acc, PFERR_GUEST_FINAL_MASK, w, &pfn)
    if r != GW_OK and r != GW_EMULATED:
        return r
    for i in range(n):
        want = GPTE_A | (GPTE_D if acc == ACC_WRITE and i == n - 1 else 0)
        if (ptes[i] & want) != want:
            if guest_mem_or_word(vcpu, pfns[i], idx[i], want) < 0:
                return -SPTE_ENOMEM
            vcpu.stat.guest_ad_sets += 1
    # A TLB entry may then read always, write only with the rights and D in the leaf (a
    # clean entry walks again on the first write), fetch without XD.
    w.final_gpa = final
    w.guest_perms = HW_PERM_READ | (0 if xd else HW_PERM_EXEC)
    if w_ok and (acc == ACC_WRITE or (ptes[n - 1] & GPTE_D)):
        w.guest_perms |= HW_PERM_WRITE
    return r


cdef inline int _guest_result(kvm_vcpu_t* vcpu, int r, const guest_walk_t* w,
                              int64_t* counts) noexcept nogil:
    """What an access that stopped re-executing returns (r: GW_OK, GW_GUEST_FAULT or
    GW_EMULATED): ACCESS_GUEST_PAGE_FAULT, 0 when it made no exit, else the first exit's
    RET_PF_*."""
    if r == GW_GUEST_FAULT:
        vcpu.stat.guest_faults += 1
        return ACCESS_GUEST_PAGE_FAULT
    if w.first < 0:
        counts[0] += 1
        return 0
    return w.first


cdef int vcpu_guest_access_batch(kvm_vcpu_t* vcpu, const u64* gvas, const uint8_t* access,
                                 bint user, int8_t* out, Py_ssize_t n, int64_t* counts,
                                 int64_t* guest_faults, Py_ssize_t* done) noexcept nogil:
    """The accesses from ``done[0]`` on, FAULT_CHUNK per read-side section as
    vcpu_access_batch runs them, each re-executed inside the section until it completes.
    0, -SPTE_E*, -SPTE_EINVAL for a kind that changed under the batch, or
    BATCH_INTERRUPTIBLE after RETRY_CHECK re-executions of one access."""
    cdef guest_walk_t w
    cdef Py_ssize_t i = done[0], chunk_end
    cdef int r = 0, acc = ACC_READ, code
    cdef int64_t reexec
    w.counts = counts
    while i < n and r >= 0:
        chunk_end = min(n, i + FAULT_CHUNK)
        r = vcpu_enter(vcpu)
        if r < 0:
            break
        while i < chunk_end:
            if access != NULL:
                acc = access[i]
                if acc > ACC_FETCH:
                    r = -SPTE_EINVAL
                    break
            w.refs = 0
            w.first = -1
            reexec = 0
            while True:
                r = _guest_walk_once(vcpu, gvas[i], acc, user, &w)
                if r != GW_RESTART:
                    break
                reexec += 1
                if reexec == RETRY_CHECK:
                    r = ACCESS_INTERRUPTED
                    break
            vcpu.stat.guest_walk_refs += w.refs
            if r < 0 or r == ACCESS_INTERRUPTED:
                break
            code = _guest_result(vcpu, r, &w, counts)
            if code == ACCESS_GUEST_PAGE_FAULT:
                guest_faults[0] += 1
            r = 0
            if out != NULL:
                out[i] = <int8_t>code
            i += 1
        vcpu_exit(vcpu)
        if r == ACCESS_INTERRUPTED:
            done[0] = i
            return BATCH_INTERRUPTIBLE
    done[0] = i
    return r if r < 0 else 0


cdef int vcpu_guest_access(kvm_vcpu_t* vcpu, u64 gva, int acc, bint user,
                           int64_t* counts) noexcept nogil:
    """The guest's access to gva, re-executed after every exit KVM handled (see _core.pxd)."""
    return _guest_access(vcpu, gva, acc, user, counts, NULL)


cdef int vcpu_guest_tlb_fill(kvm_vcpu_t* vcpu, u64 gva, int acc, bint user, int64_t* counts,
                             hw_tlb_entry_t* e) noexcept nogil:
    """vcpu_guest_access, then the TLB entry for gva's page (see _core.pxd)."""
    e.level = 0
    e.perms = 0
    return _guest_access(vcpu, gva, acc, user, counts, e)


cdef int _guest_access(kvm_vcpu_t* vcpu, u64 gva, int acc, bint user, int64_t* counts,
                       hw_tlb_entry_t* e) noexcept nogil:
    cdef guest_walk_t w
    cdef int r
    cdef int64_t reexec = 0
    w.refs = 0
    w.first = -1
    w.counts = counts
    while True:
        r = vcpu_enter(vcpu)
        if r < 0:
            break
        r = _guest_walk_once(vcpu, gva, acc, user, &w)
        if r == GW_OK and e != NULL:        # the entry, in the section the walk ran in
            hw_tlb_entry(vcpu, w.final_gpa >> 12, e)
            e.perms &= w.guest_perms
        vcpu_exit(vcpu)
        if r != GW_RESTART:
            break
        reexec += 1
        if reexec == RETRY_CHECK:
            r = ACCESS_INTERRUPTED
            break
    vcpu.stat.guest_walk_refs += w.refs
    if r < 0 or r == ACCESS_INTERRUPTED:
        return r
    return _guest_result(vcpu, r, &w, counts)
