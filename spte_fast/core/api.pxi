# =====================================================================================
# core/api.pxi: the Python face of the lower layers -- constants, SpteLayout, the kernels,
# PagePool and MemoryCache
# =====================================================================================
# Each def validates its arguments (core/boundary.pxi), calls one kernel, and maps the
# kernel's return code in _check_rc.  The cdef class layouts are declared in _core.pxd.

__all__ = [
    "PG_LEVEL_4K", "PG_LEVEL_2M", "PG_LEVEL_1G", "PT64_ROOT_MAX_LEVEL", "SPTE_ENT_PER_PAGE",
    "KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE", "ACC_EXEC_MASK", "ACC_WRITE_MASK", "ACC_USER_MASK",
    "ACC_ALL", "SPTE_MMU_PRESENT_MASK", "SHADOW_NONPRESENT_VALUE", "FROZEN_SPTE", "REMOVED_SPTE",
    "FROZEN_SPTE_BITS", "SPTE_BASE_ADDR_MASK", "PT_PAGE_SIZE_MASK", "PT_WRITABLE_MASK",
    "PT_PRESENT_MASK", "SPTE_TDP_AD_SHIFT", "SPTE_TDP_AD_MASK", "SPTE_TDP_AD_ENABLED",
    "SPTE_TDP_AD_DISABLED", "SPTE_TDP_AD_WRPROT_ONLY", "SHADOW_ACC_TRACK_SAVED_BITS_MASK",
    "SHADOW_ACC_TRACK_SAVED_BITS_SHIFT", "EPT_SPTE_HOST_WRITABLE", "EPT_SPTE_MMU_WRITABLE",
    "DEFAULT_SPTE_HOST_WRITABLE", "DEFAULT_SPTE_MMU_WRITABLE", "VMX_EPT_SUPPRESS_VE_BIT",
    "VMX_EPT_RWX_MASK", "VMX_EPT_MISCONFIG_WX_VALUE", "VMX_EPT_MEMTYPE_WB_IPAT",
    "MMIO_SPTE_GEN_MASK", "MMIO_SPTE_GEN_LOW_START", "MMIO_SPTE_GEN_LOW_END",
    "MMIO_SPTE_GEN_HIGH_START", "MMIO_SPTE_GEN_HIGH_END", "NPT_MMIO_VALUE",
    "PFERR_PRESENT_MASK", "PFERR_WRITE_MASK", "PFERR_USER_MASK", "PFERR_RSVD_MASK",
    "PFERR_FETCH_MASK", "ACCESS_HIT", "GUEST_PAGE_FAULT",
    "SpteLayout", "PagePool", "MemoryCache", "Vm", "Vcpu",
    "fill_pages", "scan_present", "count_present", "cmpxchg", "xchg", "atomic_or",
    "atomic_and_not",
]

# Python-visible copies of the C constants (one source: include/spte_defs.h).
globals().update(dict(
    PT64_ROOT_MAX_LEVEL=PT64_ROOT_MAX_LEVEL,
    SPTE_ENT_PER_PAGE=SPTE_ENT_PER_PAGE,
    KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE,
    ACC_EXEC_MASK=ACC_EXEC_MASK,
    ACC_WRITE_MASK=ACC_WRITE_MASK,
    ACC_USER_MASK=ACC_USER_MASK,
    ACC_ALL=ACC_ALL,
    SPTE_MMU_PRESENT_MASK=SPTE_MMU_PRESENT_MASK,
    SHADOW_NONPRESENT_VALUE=SHADOW_NONPRESENT_VALUE,
    FROZEN_SPTE_BITS=FROZEN_SPTE_BITS,
    SPTE_BASE_ADDR_MASK=SPTE_BASE_ADDR_MASK,
    PT_PAGE_SIZE_MASK=PT_PAGE_SIZE_MASK,
    PT_WRITABLE_MASK=PT_WRITABLE_MASK,
    PT_PRESENT_MASK=PT_PRESENT_MASK,
    SPTE_TDP_AD_SHIFT=SPTE_TDP_AD_SHIFT,
    SPTE_TDP_AD_MASK=SPTE_TDP_AD_MASK,
    SPTE_TDP_AD_ENABLED=SPTE_TDP_AD_ENABLED,
    SPTE_TDP_AD_DISABLED=SPTE_TDP_AD_DISABLED,
    SPTE_TDP_AD_WRPROT_ONLY=SPTE_TDP_AD_WRPROT_ONLY,
    SHADOW_ACC_TRACK_SAVED_BITS_MASK=SHADOW_ACC_TRACK_SAVED_BITS_MASK,
    SHADOW_ACC_TRACK_SAVED_BITS_SHIFT=SHADOW_ACC_TRACK_SAVED_BITS_SHIFT,
    EPT_SPTE_HOST_WRITABLE=EPT_SPTE_HOST_WRITABLE,
    EPT_SPTE_MMU_WRITABLE=EPT_SPTE_MMU_WRITABLE,
    DEFAULT_SPTE_HOST_WRITABLE=DEFAULT_SPTE_HOST_WRITABLE,
    DEFAULT_SPTE_MMU_WRITABLE=DEFAULT_SPTE_MMU_WRITABLE,
    VMX_EPT_SUPPRESS_VE_BIT=VMX_EPT_SUPPRESS_VE_BIT,
    VMX_EPT_RWX_MASK=VMX_EPT_RWX_MASK,
    VMX_EPT_MISCONFIG_WX_VALUE=VMX_EPT_MISCONFIG_WX_VALUE,
    VMX_EPT_MEMTYPE_WB_IPAT=VMX_EPT_MEMTYPE_WB_IPAT,
    MMIO_SPTE_GEN_MASK=MMIO_SPTE_GEN_MASK,
    MMIO_SPTE_GEN_LOW_START=MMIO_SPTE_GEN_LOW_START,
    MMIO_SPTE_GEN_LOW_END=MMIO_SPTE_GEN_LOW_END,
    MMIO_SPTE_GEN_HIGH_START=MMIO_SPTE_GEN_HIGH_START,
    MMIO_SPTE_GEN_HIGH_END=MMIO_SPTE_GEN_HIGH_END,
    NPT_MMIO_VALUE=NPT_MMIO_VALUE,
    PFERR_PRESENT_MASK=PFERR_PRESENT_MASK,
    PFERR_WRITE_MASK=PFERR_WRITE_MASK,
    PFERR_USER_MASK=PFERR_USER_MASK,
    PFERR_RSVD_MASK=PFERR_RSVD_MASK,
    PFERR_FETCH_MASK=PFERR_FETCH_MASK,
))
ACCESS_HIT = 0      # access_batch's per-access code of an access that caused no exit
GUEST_PAGE_FAULT = ACCESS_GUEST_PAGE_FAULT  # an access with guest paging: the guest's #PF
PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | FROZEN_SPTE_BITS   # v6.10: REMOVED_SPTE
REMOVED_SPTE = FROZEN_SPTE

cdef object _LAYOUT_TOKEN = object()


cdef class SpteLayout:
    """The SPTE encoding of one paging mode (EPT with/without A/D, exec-only; NPT).

    Build with ``SpteLayout.ept(ad=True, exec_only=False, nonpresent_value=1 << 63)``
    or ``SpteLayout.npt(nonpresent_value=1 << 63)``; ``nonpresent_value=0`` models
    kernels up to 6.9.

    >>> SpteLayout.ept().make_spte(0x1234)[1] == 0x8600_0000_0000_0b77 | 0x1234 << 12
    True
    """

    def __cinit__(self, *args):
        # Only ept()/npt() pass the token: a layout whose masks were never set up would
        # look valid to the kernels (all masks 0, frozen == non-present: endless RETRY).
        if len(args) != 1 or args[0] is not _LAYOUT_TOKEN:
            raise TypeError("use SpteLayout.ept(...) or SpteLayout.npt(...)")

    @staticmethod
    def ept(ad=True, exec_only=False, nonpresent_value=SHADOW_NONPRESENT_VALUE):
        """Intel EPT masks (kvm_mmu_set_ept_masks)."""
        cdef u64 v = _as_u64(nonpresent_value, "nonpresent_value")
        cdef SpteLayout self = SpteLayout.__new__(SpteLayout, _LAYOUT_TOKEN)
        masks_init_ept(&self.m, bool(ad), bool(exec_only), v)
        self.exec_only = bool(exec_only)
        self._validate()
        return self

    @staticmethod
    def npt(nonpresent_value=SHADOW_NONPRESENT_VALUE):
        """AMD NPT / shadow paging masks (kvm_mmu_reset_all_pte_masks)."""
        cdef u64 v = _as_u64(nonpresent_value, "nonpresent_value")
        cdef SpteLayout self = SpteLayout.__new__(SpteLayout, _LAYOUT_TOKEN)
        masks_init_npt(&self.m, v)
        self.exec_only = False
        self._validate()
        return self

    cdef _validate(self):
        cdef u64 v = self.m.shadow_nonpresent_value
        if is_shadow_present_pte(v):
            raise ValueError(f"nonpresent_value {v:#x} is shadow-present (bit 11 set)")
        if is_mmio_spte(&self.m, v):
            raise ValueError(f"nonpresent_value {v:#x} is an MMIO SPTE of this layout")
        if v == self.m.frozen_value:
            raise ValueError(f"nonpresent_value {v:#x} equals its frozen value (bits 0x5a0 set)")
        if is_mmio_spte(&self.m, self.m.frozen_value):
            raise ValueError(f"frozen value {self.m.frozen_value:#x} would be an MMIO SPTE")

    # -- attributes ------------------------------------------------------------------
    @property
    def mode(self): return "ept" if self.m.ept else "npt"
    @property
    def ad_enabled(self): return self.m.shadow_accessed_mask != 0
    @property
    def default_ad_disabled(self): return bool(self.m.ad_disabled)
    @property
    def nonpresent_value(self): return self.m.shadow_nonpresent_value
    @property
    def frozen_value(self): return self.m.frozen_value
    @property
    def present_mask(self): return self.m.shadow_present_mask
    @property
    def user_mask(self): return self.m.shadow_user_mask
    @property
    def writable_mask(self): return PT_WRITABLE_MASK
    @property
    def x_mask(self): return self.m.shadow_x_mask
    @property
    def nx_mask(self): return self.m.shadow_nx_mask
    @property
    def accessed_mask(self): return self.m.shadow_accessed_mask
    @property
    def dirty_mask(self): return self.m.shadow_dirty_mask
    @property
    def memtype_mask(self): return self.m.shadow_memtype_mask
    @property
    def memtype_ram(self): return self.m.shadow_memtype_ram
    @property
    def acc_track_mask(self): return self.m.shadow_acc_track_mask
    @property
    def host_writable_mask(self): return self.m.shadow_host_writable_mask
    @property
    def mmu_writable_mask(self): return self.m.shadow_mmu_writable_mask
    @property
    def mmio_value(self): return self.m.shadow_mmio_value
    @property
    def mmio_mask(self): return self.m.shadow_mmio_mask
    @property
    def mmio_access_mask(self): return self.m.shadow_mmio_access_mask
    @property
    def pfn_mask(self): return SPTE_BASE_ADDR_MASK
    @property
    def large_page_mask(self): return PT_PAGE_SIZE_MASK

    cdef tuple _key(self):
        return (self.m.ept, self.exec_only, self.m.ad_disabled, self.m.shadow_nonpresent_value)

    def __eq__(self, other):
        if not isinstance(other, SpteLayout):
            return NotImplemented
        return self._key() == (<SpteLayout>other)._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        if self.m.ept:
            return (f"SpteLayout.ept(ad={self.ad_enabled}, exec_only={self.exec_only}, "
                    f"nonpresent_value={self.m.shadow_nonpresent_value:#x})")
        return f"SpteLayout.npt(nonpresent_value={self.m.shadow_nonpresent_value:#x})"

    def __reduce__(self):
        if self.m.ept:
            return (_layout_ept, (self.ad_enabled, self.exec_only, self.nonpresent_value))
        return (_layout_npt, (self.nonpresent_value,))

    # -- predicates --------------------------------------------------------------------
    def is_shadow_present_pte(self, spte):
        return is_shadow_present_pte(_as_u64(spte, "spte"))

    def is_last_spte(self, spte, level):
        cdef u64 s = _as_u64(spte, "spte")
        return is_last_spte(s, <int>_as_int(level, "level", 1, 5))

    def is_large_pte(self, spte):
        return is_large_pte(_as_u64(spte, "spte"))

    def is_mmio_spte(self, spte):
        return is_mmio_spte(&self.m, _as_u64(spte, "spte"))

    def is_frozen_spte(self, spte):
        return is_frozen_spte(&self.m, _as_u64(spte, "spte"))

    def spte_to_pfn(self, spte):
        return spte_to_pfn(_as_u64(spte, "spte"))

    def spte_ad_enabled(self, spte):
        return spte_ad_enabled(_as_u64(spte, "spte"))

    def spte_ad_need_write_protect(self, spte):
        return spte_ad_need_write_protect(_as_u64(spte, "spte"))

    def is_access_track_spte(self, spte):
        return is_access_track_spte(&self.m, _as_u64(spte, "spte"))

    def is_accessed_spte(self, spte):
        return is_accessed_spte(&self.m, _as_u64(spte, "spte"))

    def is_dirty_spte(self, spte):
        return is_dirty_spte(&self.m, _as_u64(spte, "spte"))

    def is_writable_pte(self, spte):
        return is_writable_pte(_as_u64(spte, "spte"))

    def is_mmu_writable_spte(self, spte):
        return is_mmu_writable_spte(&self.m, _as_u64(spte, "spte"))

    def is_executable_pte(self, spte):
        return is_executable_pte(&self.m, _as_u64(spte, "spte"))

    def spte_has_volatile_bits(self, spte):
        return spte_has_volatile_bits(&self.m, _as_u64(spte, "spte"))

    # -- constructors ------------------------------------------------------------------
    def make_spte(self, pfn, level=1, access=ACC_ALL, *, prefetch=False, host_writable=True,
                  ad_disabled=None, nx_huge_pages=False, old_spte=None, write_tracked=False):
        """v6.10 make_spte → (wrprot, spte). See docs/API.md for the algorithm."""
        cdef u64 p = _as_u64(pfn, "pfn")
        cdef int lvl = <int>_as_int(level, "level", 1, 3)
        cdef unsigned int acc = <unsigned int>_as_int(access, "access", 0, 7)
        cdef u64 old = self.m.shadow_nonpresent_value if old_spte is None else \
            _as_u64(old_spte, "old_spte")
        cdef bint add = self.m.ad_disabled if ad_disabled is None else bool(ad_disabled)
        cdef bint wrprot = False
        cdef u64 spte
        if p >= PFN_LIMIT:
            raise ValueError(f"pfn {p:#x} does not fit the PFN field (bits 12..51)")
        spte = make_spte(&self.m, lvl, acc, p, old, bool(prefetch), bool(host_writable), add,
                         bool(nx_huge_pages), bool(write_tracked), &wrprot)
        return (bool(wrprot), spte)

    def make_nonleaf_spte(self, child_pfn, ad_disabled=None):
        cdef u64 p = _as_u64(child_pfn, "child_pfn")
        if p >= PFN_LIMIT:
            raise ValueError(f"child_pfn {p:#x} does not fit the PFN field (bits 12..51)")
        return make_nonleaf_spte(&self.m, p,
                                 self.m.ad_disabled if ad_disabled is None else bool(ad_disabled))

    def make_mmio_spte(self, gfn, access=0, generation=0):
        cdef u64 g = _as_u64(gfn, "gfn")
        cdef unsigned int acc = <unsigned int>_as_int(access, "access", 0, 7)
        cdef u64 gen = <u64>_as_int(generation, "generation", 0, MMIO_SPTE_GEN_MASK)
        if g >= ((<u64>1) << 52):
            raise ValueError(f"gfn {g:#x} is beyond a 64-bit GPA space")
        return make_mmio_spte(&self.m, g, acc, gen)

    cdef u64 _mmio_arg(self, spte) except? 0:
        cdef u64 s = _as_u64(spte, "spte")
        if not is_mmio_spte(&self.m, s):
            raise ValueError(f"{s:#x} is not an MMIO SPTE of this layout")
        return s

    def get_mmio_spte_gfn(self, spte):
        return get_mmio_spte_gfn(&self.m, self._mmio_arg(spte))

    def get_mmio_spte_generation(self, spte):
        return get_mmio_spte_generation(self._mmio_arg(spte))

    def get_mmio_spte_access(self, spte):
        return self._mmio_arg(spte) & self.m.shadow_mmio_access_mask

    def make_huge_page_split_spte(self, huge_spte, child_level, index, nx_huge_pages=False):
        cdef u64 h = _as_u64(huge_spte, "huge_spte")
        cdef int cl = <int>_as_int(child_level, "child_level", 1, 2)
        cdef int i = <int>_as_int(index, "index", 0, SPTE_ENT_PER_PAGE - 1)
        if not is_shadow_present_pte(h) or not is_large_pte(h):
            raise ValueError(f"{h:#x} is not a present huge SPTE")
        return make_huge_page_split_spte(&self.m, h, cl, i, bool(nx_huge_pages))

    def mark_spte_for_access_track(self, spte):
        return mark_spte_for_access_track(&self.m, _as_u64(spte, "spte"))

    def restore_acc_track_spte(self, spte):
        return restore_acc_track_spte(&self.m, _as_u64(spte, "spte"))


def _layout_ept(ad, exec_only, nonpresent_value):
    return SpteLayout.ept(ad=ad, exec_only=exec_only, nonpresent_value=nonpresent_value)


def _layout_npt(nonpresent_value):
    return SpteLayout.npt(nonpresent_value=nonpresent_value)


# -- kernels, Python side -------------------------------------------------------------

def fill_pages(pages, value):
    """memset64: fill whole pages with ``value``.

    ``pages``: writable C-contiguous uint64 array of shape (n, 512) or (512,).
    Runs with the GIL released.
    """
    cdef cnp.ndarray arr = _pages_array(pages, "pages", True)
    cdef u64 v = _as_u64(value, "value")
    cdef u64* p = <u64*>cnp.PyArray_DATA(arr)
    cdef int64_t n = cnp.PyArray_SIZE(arr) // SPTE_ENT_PER_PAGE
    if n <= 16:
        fill_pages_kernel(p, n, v)     # shorter than releasing the GIL
    else:
        with nogil:
            fill_pages_kernel(p, n, v)


def scan_present(page, nonpresent_value):
    """sync_page scan: indices of the entries that differ from ``nonpresent_value``."""
    cdef cnp.ndarray arr = _u64_array(page, "page", False)
    if arr.ndim != 1 or arr.shape[0] != SPTE_ENT_PER_PAGE:
        raise ValueError(f"page must have shape (512,), not {(<object>arr).shape}")
    cdef u64 v = _as_u64(nonpresent_value, "nonpresent_value")
    cdef const u64* p = <const u64*>cnp.PyArray_DATA(arr)
    cdef cnp.ndarray out = np.empty(SPTE_ENT_PER_PAGE, dtype=np.intp)
    cdef Py_ssize_t* o = <Py_ssize_t*>cnp.PyArray_DATA(out)
    cdef Py_ssize_t n
    with nogil:
        n = scan_present_kernel(p, v, o)
    return out[:n].copy()


def count_present(pages, nonpresent_value):
    """Per page, how many entries differ from ``nonpresent_value`` (int64 array)."""
    cdef cnp.ndarray arr = _pages_array(pages, "pages", False)
    cdef u64 v = _as_u64(nonpresent_value, "nonpresent_value")
    cdef int64_t n = arr.size // SPTE_ENT_PER_PAGE
    cdef cnp.ndarray out = np.empty(n, dtype=np.int64)
    cdef int64_t* o = <int64_t*>cnp.PyArray_DATA(out)
    cdef const u64* p = <const u64*>cnp.PyArray_DATA(arr)
    cdef int64_t i
    with nogil:
        for i in range(n):
            o[i] = count_present_kernel(p + i * SPTE_ENT_PER_PAGE, v)
    return out


def cmpxchg(array, index, expected, new):
    """A real 64-bit compare-and-exchange on ``array.flat[index]`` → (ok, observed)."""
    cdef int64_t i = _as_int(index, "index", 0, INT64_MAX)
    cdef u64 old = _as_u64(expected, "expected")
    cdef u64 nv = _as_u64(new, "new")
    cdef u64* p = _elem(array, i)
    cdef bint ok
    with nogil:
        ok = spte_try_cmpxchg_seq_cst(p, &old, nv)
    return (bool(ok), old)


cdef enum:
    RMW_XCHG = 0
    RMW_OR = 1
    RMW_AND_NOT = 2


cdef u64 _atomic_rmw(object array, object index, object value, str name, int op) except? 0:
    """One atomic read-modify-write on ``array.flat[index]``; returns the old value."""
    cdef int64_t i = _as_int(index, "index", 0, INT64_MAX)
    cdef u64 v = _as_u64(value, name)
    cdef u64* p = _elem(array, i)
    cdef u64 old
    with nogil:
        if op == RMW_XCHG:
            old = spte_xchg_seq_cst(p, v)
        elif op == RMW_OR:
            old = spte_fetch_or_seq_cst(p, v)
        else:
            old = spte_fetch_and_seq_cst(p, ~v)
    return old


def xchg(array, index, new):
    """Atomic exchange; returns the old value."""
    return _atomic_rmw(array, index, new, "new", RMW_XCHG)


def atomic_or(array, index, mask):
    """Atomic fetch-or; returns the old value."""
    return _atomic_rmw(array, index, mask, "mask", RMW_OR)


def atomic_and_not(array, index, mask):
    """Atomic fetch-and of ``~mask`` (tdp_mmu_clear_spte_bits); returns the old value."""
    return _atomic_rmw(array, index, mask, "mask", RMW_AND_NOT)


cdef class PagePool:
    """Page-table pages: one contiguous uint64 array, shape (capacity, 512).

    The memory is ``numpy.zeros`` (a page never touched costs nothing) unless
    ``poison`` fills it with garbage, for tests that must not rely on zero.
    """

    def __cinit__(self, capacity, poison=None):
        cdef int64_t cap = _as_int(capacity, "capacity", 1, 1 << 40)
        cdef u64 pv = 0
        memset(&self.p, 0, sizeof(pool_t))
        if poison is not None:
            pv = _as_u64(poison, "poison")
        self.poison = poison
        # C memory that only read-only arrays show (core/boundary.pxi _PageArena): a
        # Python store into a linked table would bypass the setters (a non-leaf pointing
        # outside the pool crashes the next fault; a planted frozen entry makes a zap
        # wait forever), so nothing reachable from ``pages`` may be writable.
        self._arr = _new_page_arena(cap, poison is not None, pv)
        self._ro = _arena_view(<_PageArena>self._arr)
        self.p.pages = (<_PageArena>self._arr).pages
        self.p.capacity = cap
        self.p.free_stack = <int64_t*>PyMem_RawMalloc(cap * sizeof(int64_t))
        self.p.state = <uint8_t*>PyMem_RawCalloc(cap, 1)
        self.p.clean = <uint8_t*>PyMem_RawMalloc(cap)
        self.p.sp = <kvm_mmu_page_t*>PyMem_RawCalloc(cap, sizeof(kvm_mmu_page_t))
        if not (self.p.free_stack and self.p.state and self.p.clean and self.p.sp):
            raise MemoryError("PagePool metadata")
        memset(self.p.clean, 1 if poison is None else 0, cap)
        self.p.fail_budget = -1
        pthread_mutex_init(&self.p.lock, NULL)

    def __dealloc__(self):
        PyMem_RawFree(self.p.free_stack)
        PyMem_RawFree(self.p.state)
        PyMem_RawFree(self.p.clean)
        PyMem_RawFree(self.p.sp)
        pthread_mutex_destroy(&self.p.lock)

    @property
    def capacity(self):
        return self.p.capacity

    def __len__(self):
        return self.p.capacity

    @property
    def pages(self):
        """Read-only view of all pages (index = host frame of the table); a fresh view
        each time, so that reshaping one cannot change what the next caller sees."""
        return self._ro.view()

    @property
    def nr_free(self):
        return pool_nr_free(&self.p)

    def alloc(self):
        """A raw page (content unspecified) -> index; OutOfMemory when none is left."""
        cdef int64_t idx
        with nogil:
            idx = pool_alloc(&self.p)
        _check_rc(-SPTE_ENOMEM if idx < 0 else 0, "PagePool.alloc()")
        return idx

    cdef int64_t _index(self, index) except -1:
        return _as_int(index, "index", 0, self.p.capacity - 1)

    def free(self, index):
        """Give back a page obtained with ``alloc()``."""
        cdef int64_t idx = self._index(index)
        with nogil:
            pthread_mutex_lock(&self.p.lock)
        try:
            if self.p.state[idx] != PAGE_RAW:
                raise ValueError(f"page {idx} was not handed out by alloc() "
                                 f"(state {_PAGE_STATES[self.p.state[idx]]})")
            pool_free_locked(&self.p, idx)
        finally:
            pthread_mutex_unlock(&self.p.lock)

    def fail_after(self, n):
        """Fault injection: the next ``n`` allocations succeed, then all fail. None: off."""
        cdef int64_t budget = -1 if n is None else _as_int(n, "n", 0, 1 << 62)
        with nogil:
            pthread_mutex_lock(&self.p.lock)
            self.p.fail_budget = budget
            pthread_mutex_unlock(&self.p.lock)

    def is_clean(self, index):
        return bool(self.p.clean[self._index(index)])

    def page_state(self, index):
        """'free', 'raw', 'cached', 'table' or 'parked'."""
        return _PAGE_STATES[self.p.state[self._index(index)]]

    @property
    def stats(self):
        """Allocator counts, and the initialisation work of every cache on this pool
        (each counted once, by the cache that did it)."""
        cdef cache_init_stats_t init
        with nogil:
            pool_init_stats(&self.p, &init)
        return {"allocated": self.p.allocated, "freed": self.p.freed,
                "in_use": self.p.capacity - pool_nr_free(&self.p), "failed": self.p.failed,
                "zero_inits": init.zero_inits, "zero_untouched": init.zero_untouched,
                "fills": init.fills, "init_bytes_written": init.init_bytes_written}

    def __repr__(self):
        return f"PagePool(capacity={self.p.capacity}, free={pool_nr_free(&self.p)})"


_PAGE_STATES = ("free", "raw", "cached", "table", "parked")


cdef dict _cache_warnings(const kvm_mmu_memory_cache_t* mc):
    return {name: mc.warn[i] for i, name in enumerate(CACHE_WARN_REASONS)}


cdef class MemoryCache:
    """KVM's ``kvm_mmu_memory_cache`` over a PagePool (Linux 6.10 rules).

    ``init_value`` 0 picks the GFP_ZERO-equivalent path (never-used pages are
    already zero; recycled pages are zeroed); anything else is the fill path
    (memset64 at top-up time).
    """

    def __cinit__(self, PagePool pool not None, init_value=0,
                  capacity=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE, gfp_zero=None):
        cdef u64 iv = _as_u64(init_value, "init_value")
        cdef int cap = <int>_as_int(capacity, "capacity", 0, 1 << 24)
        self.default_capacity = cap
        self.pool = pool
        mmu_memory_cache_setup(&self.mc, &pool.p, iv,
                               (iv == 0) if gfp_zero is None else bool(gfp_zero))

    def __dealloc__(self):
        # Cached pages go back to the pool (no_gc_clear: self.pool is still set).
        if self.pool is not None and self.mc.pool != NULL:
            mmu_memory_cache_teardown(&self.mc)

    @property
    def init_value(self): return self.mc.init_value
    @property
    def gfp_zero(self): return bool(self.mc.gfp_zero)
    @property
    def capacity(self): return self.mc.capacity
    @property
    def nobjs(self): return self.mc.nobjs
    def __len__(self): return self.mc.nobjs

    @property
    def warnings(self):
        """How many warnings (KVM's WARN_ON_ONCE sites) this cache counted."""
        return sum(self.warnings_by_reason.values())

    @property
    def warnings_by_reason(self):
        """{reason: count} for every reason of ``spte_fast.errors.CACHE_WARN_REASONS``."""
        return _cache_warnings(&self.mc)

    @property
    def objects(self):
        cdef int i
        with nogil:
            pthread_mutex_lock(&self.mc.lock)
        try:
            return tuple(self.mc.objects[i] for i in range(self.mc.nobjs))
        finally:
            pthread_mutex_unlock(&self.mc.lock)

    @property
    def stats(self):
        return {"fills": self.mc.init.fills, "zero_inits": self.mc.init.zero_inits,
                "zero_untouched": self.mc.init.zero_untouched,
                "init_bytes_written": self.mc.init.init_bytes_written,
                "obtained": self.mc.obtained, "warnings": self.warnings}

    def topup(self, min, capacity=None):
        """Top up to capacity when fewer than ``min`` pages are cached (KVM 6.10 rules)."""
        cdef int cap = self.default_capacity if capacity is None else \
            <int>_as_int(capacity, "capacity", 0, 1 << 24)
        cdef int mn = <int>_as_int(min, "min", 0, 1 << 24)
        cdef int rc
        with nogil:
            pthread_mutex_lock(&self.mc.lock)
            rc = kvm_mmu_topup_memory_cache(&self.mc, cap, mn)
            pthread_mutex_unlock(&self.mc.lock)
        _check_rc(rc, f"topup(min={mn}, capacity={cap}) with {self.mc.nobjs} pages cached",
                  self.mc.last_warn)

    def alloc(self):
        """Pop the most recently cached page (LIFO); an empty cache warns and allocates."""
        cdef int64_t idx
        with nogil:
            pthread_mutex_lock(&self.mc.lock)
            idx = kvm_mmu_memory_cache_alloc(&self.mc)
            pthread_mutex_unlock(&self.mc.lock)
        _check_rc(-SPTE_ENOMEM if idx < 0 else 0, "alloc() from an empty memory cache")
        return idx

    def free(self):
        """Return every cached page to the pool; objects, capacity and nobjs reset."""
        with nogil:
            pthread_mutex_lock(&self.mc.lock)
            kvm_mmu_free_memory_cache(&self.mc)
            pthread_mutex_unlock(&self.mc.lock)

    def __repr__(self):
        return (f"MemoryCache(init_value={self.mc.init_value:#x}, gfp_zero={self.gfp_zero}, "
                f"capacity={self.mc.capacity}, nobjs={self.mc.nobjs})")
