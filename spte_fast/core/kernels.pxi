# =====================================================================================
# core/kernels.pxi: page fill and the sync_page scan over raw pages
# =====================================================================================
# memset64 is the 6.10 memory cache's init_value fill (mmu_memory_cache_alloc_obj); the
# count is the scan kvm_sync_page makes (entries that are not the never-used value).
# The C is in include/spte_memset64.h.  No checks here: the def layer checked the arrays.

cdef void fill_pages_kernel(u64* pages, int64_t n, u64 value) noexcept nogil:
    """memset64 over n whole pages."""
    spte_memset64(pages, value, <size_t>n * SPTE_ENT_PER_PAGE)


cdef int64_t count_present_kernel(const u64* page, u64 nonpresent_value) noexcept nogil:
    """sync_page-style scan: entries that are not the never-used value."""
    return spte_count_ne(page, nonpresent_value, SPTE_ENT_PER_PAGE)


cdef Py_ssize_t scan_present_kernel(const u64* page, u64 nonpresent_value,
                                    Py_ssize_t* out) noexcept nogil:
    """The indices of the entries that are not the never-used value, ascending."""
    cdef Py_ssize_t n = 0
    cdef int i
    for i in range(SPTE_ENT_PER_PAGE):
        if page[i] != nonpresent_value:
            out[n] = i
            n += 1
    return n
