# =====================================================================================
# core/guest_memory.pxi: guest memory as the VMM sees it (≈ kvm_read_guest /
# kvm_write_guest in virt/kvm/kvm_main.c, and the VMM's own mapping of its memslots)
# =====================================================================================
# A memslot maps guest-physical pages onto host pages (slot.pfn + gfn - base_gfn).  The
# words a guest page holds live with the host page, so two slots backed by the same host
# pages alias, a moved slot keeps its contents, and a deleted one's come back when the
# host pages are mapped again.  Only pages that were written are kept; the rest read 0
# (fresh anonymous host memory).  The store is a hash from host pfn to a page of 512
# words, guarded by its mutex; a page, once made, lives as long as the VM.

cdef enum:
    GUEST_MEM_MIN_BITS = 6
    GUEST_READ_MAX = 1 << 24        # words per read_guest call


cdef inline u64 _guest_mem_slot(const guest_mem_t* g, pfn_t pfn) noexcept nogil:
    return ((pfn + 1) * <u64>0x9E3779B97F4A7C15) >> (64 - g.bits)


cdef u64* guest_mem_lookup(guest_mem_t* g, pfn_t pfn) noexcept nogil:
    """The page of host pfn, or NULL (g.lock held)."""
    cdef u64 i, mask
    if g.bits == 0:
        return NULL
    mask = (<u64>1 << g.bits) - 1
    i = _guest_mem_slot(g, pfn)
    while g.keys[i]:
        if g.keys[i] == pfn + 1:
            return g.pages[i]
        i = (i + 1) & mask
    return NULL


cdef int _guest_mem_grow(guest_mem_t* g) noexcept nogil:
    """Double the table (or make the first one); -SPTE_ENOMEM and nothing changed."""
    cdef int bits = g.bits + 1 if g.bits else GUEST_MEM_MIN_BITS
    cdef u64 cap = <u64>1 << bits, i, j, old_cap = (<u64>1 << g.bits) if g.bits else 0
    cdef u64* new_keys = <u64*>calloc(cap, sizeof(u64))
    cdef u64** new_pages = <u64**>calloc(cap, sizeof(u64*))
    cdef u64* old_keys = g.keys
    cdef u64** old_pages = g.pages
    if new_keys == NULL or new_pages == NULL:
        free(new_keys)
        free(new_pages)
        return -SPTE_ENOMEM
    g.keys, g.pages, g.bits = new_keys, new_pages, bits
    for i in range(old_cap):
        if old_keys[i]:
            j = _guest_mem_slot(g, old_keys[i] - 1)
            while new_keys[j]:
                j = (j + 1) & (cap - 1)
            new_keys[j] = old_keys[i]
            new_pages[j] = old_pages[i]
    free(old_keys)
    free(old_pages)
    return 0


cdef u64* guest_mem_page(guest_mem_t* g, pfn_t pfn) noexcept nogil:
    """The page of host pfn, made (zeroed) when missing (g.lock held); NULL: no memory."""
    cdef u64* page = guest_mem_lookup(g, pfn)
    cdef u64 i
    if page != NULL:
        return page
    if 2 * (g.count + 1) > ((<u64>1 << g.bits) if g.bits else 0) and _guest_mem_grow(g) < 0:
        return NULL
    page = <u64*>calloc(SPTE_ENT_PER_PAGE, sizeof(u64))
    if page == NULL:
        return NULL
    i = _guest_mem_slot(g, pfn)
    while g.keys[i]:
        i = (i + 1) & ((<u64>1 << g.bits) - 1)
    g.keys[i] = pfn + 1
    g.pages[i] = page
    g.count += 1
    return page


cdef void guest_mem_destroy(guest_mem_t* g) noexcept nogil:
    cdef u64 i
    if g.bits:
        for i in range(<u64>1 << g.bits):
            if g.keys[i]:
                free(g.pages[i])
    free(g.keys)
    free(g.pages)
    g.keys, g.pages, g.bits, g.count = NULL, NULL, 0, 0
    pthread_mutex_destroy(&g.lock)


# -- the Vm methods' bodies (read_guest / write_guest) -----------------------------------

cdef int _guest_pfns(Vm vm, gfn_t first, u64 n, pfn_t* out) except -1:
    """The host pfn of each of n gfns from first (vm._slots_lock held): ValueError naming
    the first gfn in no memslot (kvm_read_guest's -EFAULT)."""
    cdef u64 i
    cdef kvm_memory_slot_t* slot
    for i in range(n):
        slot = search_memslots(&vm.kvm, first + i)
        if slot == NULL:
            raise ValueError(f"gpa {(first + i) << 12:#x} is in no memslot: the VMM has no "
                             f"host memory there")
        out[i] = slot.pfn + (first + i - slot.base_gfn)
    return 0


cdef tuple _guest_range(Vm vm, gpa, u64 n):
    cdef u64 g = _as_u64(gpa, "gpa")
    if g & 7:
        raise ValueError(f"gpa {g:#x} is not 8-byte aligned (guest memory is read and "
                         "written in 64-bit words)")
    if (g >> 3) + n > (vm.kvm.gfn_limit << 9):
        raise ValueError(f"gpa {g:#x} + {n} words is beyond the guest's "
                         f"{vm.kvm.root_level}-level address width")
    return g, (g >> 12), ((g + 8 * n - 1) >> 12) - (g >> 12) + 1


cdef object guest_read(Vm vm, gpa, count):
    cdef u64 n = 1 if count is None else <u64>_as_int(count, "count", 1, GUEST_READ_MAX)
    cdef u64 g, first, npages, i, w, at
    cdef pfn_t* pfns
    cdef u64* page
    g, first, npages = _guest_range(vm, gpa, n)
    out = np.zeros(n, dtype=np.uint64)
    cdef u64[::1] o = out
    pfns = <pfn_t*>PyMem_RawMalloc(npages * sizeof(pfn_t))
    if pfns == NULL:
        raise MemoryError()
    try:
        with vm._slots_lock:
            _guest_pfns(vm, first, npages, pfns)
            with nogil:
                pthread_mutex_lock(&vm.kvm.guest_mem.lock)
                at = (g >> 3) & 511
                w = 0
                for i in range(npages):
                    page = guest_mem_lookup(&vm.kvm.guest_mem, pfns[i])
                    while w < n and at < 512:
                        if page != NULL:
                            o[w] = page[at]
                        w += 1
                        at += 1
                    at = 0
                pthread_mutex_unlock(&vm.kvm.guest_mem.lock)
    finally:
        PyMem_RawFree(pfns)
    return int(out[0]) if count is None else out


cdef int guest_write(Vm vm, gpa, value) except -1:
    cdef cnp.ndarray words
    cdef u64 one
    if isinstance(value, cnp.ndarray):
        words = _u64_array(value, "value", False)
        if words.ndim != 1 or words.shape[0] == 0:
            raise ValueError("value must be an int or a non-empty 1-D uint64 array of words")
    else:
        one = _as_u64(value, "value")               # the API's ints (TypeError otherwise)
        words = np.array([one], dtype=np.uint64)
    cdef u64 n = words.shape[0]
    cdef const u64[::1] src = words
    cdef u64 g, first, npages, i, w, at
    cdef pfn_t* pfns
    cdef u64* words_                # a guest page's words (data, not a page table)
    cdef bint oom = False
    g, first, npages = _guest_range(vm, gpa, n)
    pfns = <pfn_t*>PyMem_RawMalloc(npages * sizeof(pfn_t))
    if pfns == NULL:
        raise MemoryError()
    try:
        with vm._slots_lock:
            _guest_pfns(vm, first, npages, pfns)       # every page checked before a write
            with nogil:
                pthread_mutex_lock(&vm.kvm.guest_mem.lock)
                for i in range(npages):                # every page made before a write
                    if guest_mem_page(&vm.kvm.guest_mem, pfns[i]) == NULL:
                        oom = True
                        break
                if not oom:
                    at = (g >> 3) & 511
                    w = 0
                    for i in range(npages):
                        words_ = guest_mem_lookup(&vm.kvm.guest_mem, pfns[i])
                        while w < n and at < 512:
                            words_[at] = src[w]
                            w += 1
                            at += 1
                        at = 0
                pthread_mutex_unlock(&vm.kvm.guest_mem.lock)
    finally:
        PyMem_RawFree(pfns)
    if oom:
        raise OutOfMemory("no host memory for guest memory pages")
    return 0
