# spte_fast._core: C-level declarations (the embedding API).
#
# Another Cython extension can `cimport spte_fast._core` and use the
# structs, the inline predicates and constructors below, and the kernels
# declared at the end, with no Python in the loop.  Semantics: Linux v6.10
# (arch/x86/kvm/mmu/spte.h, spte.c, tdp_iter.c, tdp_mmu.c, virt/kvm/kvm_main.c).
# FROZEN_SPTE is the >= 6.11 name of v6.10's REMOVED_SPTE.

from libc.stdint cimport uint8_t, int8_t, int64_t, uint64_t

ctypedef uint64_t u64
ctypedef uint64_t gfn_t
ctypedef uint64_t pfn_t
ctypedef uint64_t* tdp_ptep_t


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <pthread.h>

    /* Fixed SPTE constants (v6.10 arch/x86/kvm/mmu/spte.h), one place. */
    #define SPTE_MMU_PRESENT_MASK        (1ULL << 11)  /* KVM "shadow-present": the only bit is_shadow_present_pte tests */
    #define SHADOW_NONPRESENT_VALUE      (1ULL << 63)  /* EPT suppress-#VE; NPT ignores it when P=0 */
    #define FROZEN_SPTE_BITS             0x5a0ULL      /* bits 5,7,8,10: no RWX/P, no PFN, not bit 11 */
    #define SPTE_BASE_ADDR_MASK          (((1ULL << 52) - 1) & ~0xfffULL)  /* PFN field, bits 12..51 */
    #define PT_PRESENT_MASK              (1ULL << 0)
    #define PT_WRITABLE_MASK             (1ULL << 1)
    #define PT_PAGE_SIZE_MASK            (1ULL << 7)
    #define SPTE_TDP_AD_SHIFT            52
    #define SPTE_TDP_AD_MASK             (3ULL << 52)  /* A/D type of a present TDP SPTE */
    #define SPTE_TDP_AD_ENABLED          0ULL          /* must be 0: bits 52-62 reserved in PAE */
    #define SPTE_TDP_AD_DISABLED         (1ULL << 52)  /* access tracking through RWX */
    #define SPTE_TDP_AD_WRPROT_ONLY      (2ULL << 52)  /* dirty tracking through write-protection */
    #define SHADOW_ACC_TRACK_SAVED_BITS_MASK  5ULL     /* R|X; W is never saved */
    #define SHADOW_ACC_TRACK_SAVED_BITS_SHIFT 54       /* saved R at 54, saved X at 56 */
    #define EPT_SPTE_HOST_WRITABLE       (1ULL << 57)
    #define EPT_SPTE_MMU_WRITABLE        (1ULL << 58)
    #define DEFAULT_SPTE_HOST_WRITABLE   (1ULL << 9)
    #define DEFAULT_SPTE_MMU_WRITABLE    (1ULL << 10)
    #define VMX_EPT_SUPPRESS_VE_BIT      (1ULL << 63)
    #define VMX_EPT_RWX_MASK             7ULL
    #define VMX_EPT_MISCONFIG_WX_VALUE   6ULL          /* W|X without R: EPT misconfiguration */
    #define VMX_EPT_MEMTYPE_WB_IPAT      0x70ULL       /* WB (6 << 3) | IPAT (bit 6): normal RAM */
    #define VMX_EPT_MEMTYPE_MASK         0x78ULL
    #define NPT_MMIO_VALUE               ((1ULL << 51) | 1ULL)  /* reserved PA bit 51 + P */
    #define MMIO_SPTE_GEN_MASK           0x7ffffULL    /* 19-bit memslot generation */
    #define MMIO_SPTE_GEN_LOW_START      3
    #define MMIO_SPTE_GEN_LOW_END        10
    #define MMIO_SPTE_GEN_HIGH_START     52
    #define MMIO_SPTE_GEN_HIGH_END       62
    #define MMIO_SPTE_GEN_LOW_MASK       (((1ULL << (MMIO_SPTE_GEN_LOW_END + 1)) - 1) & ~((1ULL << MMIO_SPTE_GEN_LOW_START) - 1))
    #define MMIO_SPTE_GEN_HIGH_MASK      (((1ULL << (MMIO_SPTE_GEN_HIGH_END + 1)) - 1) & ~((1ULL << MMIO_SPTE_GEN_HIGH_START) - 1))
    #define MMIO_SPTE_GEN_LOW_BITS       (MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1)
    #define MMIO_SPTE_GEN_HIGH_SHIFT     (MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS)
    #define SPTE_ENT_PER_PAGE            512
    #define PT64_ROOT_MAX_LEVEL          5
    #define KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE 40
    #define ACC_EXEC_MASK                1
    #define ACC_WRITE_MASK               2
    #define ACC_USER_MASK                4
    #define ACC_ALL                      7

    _Static_assert(!(SHADOW_NONPRESENT_VALUE & SPTE_MMU_PRESENT_MASK), "non-present value must not be MMU-present");
    _Static_assert(!((SHADOW_NONPRESENT_VALUE | FROZEN_SPTE_BITS) & (SPTE_MMU_PRESENT_MASK | 7ULL)), "frozen must not be present");
    _Static_assert(!(SPTE_TDP_AD_MASK & (SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)), "A/D type vs saved bits");
    _Static_assert(!(SPTE_TDP_AD_MASK & (EPT_SPTE_HOST_WRITABLE | EPT_SPTE_MMU_WRITABLE)), "A/D type vs writable bits");
    _Static_assert(!((MMIO_SPTE_GEN_LOW_MASK | MMIO_SPTE_GEN_HIGH_MASK) & (SPTE_MMU_PRESENT_MASK | SPTE_BASE_ADDR_MASK)), "MMIO gen bits");

    /* The three primitives that store into page-table memory (plus the
     * memset64 page fill).  Real 64-bit atomics: vCPU threads run them with
     * the GIL released. */
    /* Acquire: a table linked by another vCPU (CAS, seq_cst) was filled before the link. On
     * x86 this is the same plain load as READ_ONCE; it tells the C memory model (and TSan). */
    static inline uint64_t spte_read_once(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
    static inline void spte_write_once(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
    static inline uint64_t spte_xchg64(uint64_t *p, uint64_t v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
    static inline int spte_try_cmpxchg64(uint64_t *p, uint64_t *old, uint64_t new_) {
        return __atomic_compare_exchange_n(p, old, new_, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    }
    static inline uint64_t spte_fetch_or64(uint64_t *p, uint64_t m) { return __atomic_fetch_or(p, m, __ATOMIC_SEQ_CST); }
    static inline uint64_t spte_fetch_and64(uint64_t *p, uint64_t m) { return __atomic_fetch_and(p, m, __ATOMIC_SEQ_CST); }
    static inline void spte_byte_or(uint8_t *p, uint8_t m) { __atomic_fetch_or(p, m, __ATOMIC_RELAXED); }
    static inline void spte_add64(int64_t *p, int64_t v) { __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    static inline uint64_t spte_load_acq(const uint64_t *p) { return __atomic_load_n(p, __ATOMIC_SEQ_CST); }
    static inline void spte_store_rel(uint64_t *p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_SEQ_CST); }
    static inline uint64_t spte_inc_return(uint64_t *p) { return __atomic_add_fetch(p, 1, __ATOMIC_SEQ_CST); }
    static inline int64_t spte_load64(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
    static inline int spte_take_one(int64_t *p) {   /* decrement if positive; 1 if taken */
        int64_t v = __atomic_load_n(p, __ATOMIC_RELAXED);
        while (v > 0)
            if (__atomic_compare_exchange_n(p, &v, v - 1, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                return 1;
        return 0;
    }
    static inline void spte_prefetch(const void *p) { __builtin_prefetch(p, 1, 3); }
    /* mmu_lock prefers writers, so zaps are not starved by a stream of fault chunks. */
    static inline int spte_rwlock_init(pthread_rwlock_t *l) {
        pthread_rwlockattr_t a;
        pthread_rwlockattr_init(&a);
    #if defined(__GLIBC__)
        pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    #endif
        int r = pthread_rwlock_init(l, &a);
        pthread_rwlockattr_destroy(&a);
        return r;
    }
    static inline void spte_cpu_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #endif
    }

    /* memset64: zero goes to libc memset (it picks the best store width at
     * run time); any other pattern uses a loop that GCC/Clang clone for
     * AVX2 with run-time dispatch, so portable builds still get wide stores.
     * The head is stored 8 bytes at a time up to a 64-byte boundary: numpy and
     * malloc hand out 16-byte-aligned blocks, and there every other 32-byte
     * store splits a cache line, which costs ~40% of store bandwidth. */
    #if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
    __attribute__((target_clones("avx512f", "avx2", "default")))
    #endif
    static void spte_memset64_pattern(uint64_t *p, uint64_t v, size_t n) {
        while (n && ((uintptr_t)p & 63)) { *p++ = v; n--; }
        uint64_t *a = (uint64_t *)__builtin_assume_aligned(p, 64);
        for (size_t i = 0; i < n; i++) a[i] = v;
    }
    /* The sync_page scan's count: entries that differ from the never-used value (cloned
     * for wide vectors like the fill). */
    #if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
    __attribute__((target_clones("avx512f", "avx2", "default")))
    #endif
    static int64_t spte_count_ne(const uint64_t *p, uint64_t v, size_t n) {
        int64_t c = 0;
        for (size_t i = 0; i < n; i++) c += p[i] != v;
        return c;
    }
    static inline void spte_memset64(uint64_t *p, uint64_t v, size_t n) {
        if (v == 0) memset(p, 0, n * sizeof(uint64_t));
        else spte_memset64_pattern(p, v, n);
    }
    """
    const u64 SPTE_MMU_PRESENT_MASK
    const u64 SHADOW_NONPRESENT_VALUE
    const u64 FROZEN_SPTE_BITS
    const u64 SPTE_BASE_ADDR_MASK
    const u64 PT_PRESENT_MASK
    const u64 PT_WRITABLE_MASK
    const u64 PT_PAGE_SIZE_MASK
    const int SPTE_TDP_AD_SHIFT
    const u64 SPTE_TDP_AD_MASK
    const u64 SPTE_TDP_AD_ENABLED
    const u64 SPTE_TDP_AD_DISABLED
    const u64 SPTE_TDP_AD_WRPROT_ONLY
    const u64 SHADOW_ACC_TRACK_SAVED_BITS_MASK
    const int SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    const u64 EPT_SPTE_HOST_WRITABLE
    const u64 EPT_SPTE_MMU_WRITABLE
    const u64 DEFAULT_SPTE_HOST_WRITABLE
    const u64 DEFAULT_SPTE_MMU_WRITABLE
    const u64 VMX_EPT_SUPPRESS_VE_BIT
    const u64 VMX_EPT_RWX_MASK
    const u64 VMX_EPT_MISCONFIG_WX_VALUE
    const u64 VMX_EPT_MEMTYPE_WB_IPAT
    const u64 VMX_EPT_MEMTYPE_MASK
    const u64 NPT_MMIO_VALUE
    const u64 MMIO_SPTE_GEN_MASK
    const int MMIO_SPTE_GEN_LOW_START
    const int MMIO_SPTE_GEN_LOW_END
    const int MMIO_SPTE_GEN_HIGH_START
    const int MMIO_SPTE_GEN_HIGH_END
    const u64 MMIO_SPTE_GEN_LOW_MASK
    const u64 MMIO_SPTE_GEN_HIGH_MASK
    const int MMIO_SPTE_GEN_LOW_BITS
    const int MMIO_SPTE_GEN_HIGH_SHIFT
    const int SPTE_ENT_PER_PAGE
    const int PT64_ROOT_MAX_LEVEL
    const int KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE
    const int ACC_EXEC_MASK
    const int ACC_WRITE_MASK
    const int ACC_USER_MASK
    const int ACC_ALL

    u64 spte_read_once(const u64 *p) noexcept nogil
    void spte_write_once(u64 *p, u64 v) noexcept nogil
    u64 spte_xchg64(u64 *p, u64 v) noexcept nogil
    bint spte_try_cmpxchg64(u64 *p, u64 *old, u64 new_) noexcept nogil
    u64 spte_fetch_or64(u64 *p, u64 m) noexcept nogil
    u64 spte_fetch_and64(u64 *p, u64 m) noexcept nogil
    void spte_byte_or(uint8_t *p, uint8_t m) noexcept nogil
    void spte_add64(int64_t *p, int64_t v) noexcept nogil
    u64 spte_load_acq(const u64 *p) noexcept nogil
    void spte_store_rel(u64 *p, u64 v) noexcept nogil
    u64 spte_inc_return(u64 *p) noexcept nogil
    int64_t spte_load64(const int64_t *p) noexcept nogil
    bint spte_take_one(int64_t *p) noexcept nogil
    void spte_cpu_relax() noexcept nogil
    void spte_prefetch(const void* p) noexcept nogil
    void spte_memset64(u64 *p, u64 v, size_t n) noexcept nogil
    int64_t spte_count_ne(const u64 *p, u64 v, size_t n) noexcept nogil

    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr) nogil
    int pthread_mutex_destroy(pthread_mutex_t *m) nogil
    int pthread_mutex_lock(pthread_mutex_t *m) nogil
    int pthread_mutex_unlock(pthread_mutex_t *m) nogil
    ctypedef struct pthread_rwlock_t:
        pass
    int pthread_rwlock_init(pthread_rwlock_t *l, void *attr) nogil
    int pthread_rwlock_destroy(pthread_rwlock_t *l) nogil
    int pthread_rwlock_rdlock(pthread_rwlock_t *l) nogil
    int pthread_rwlock_wrlock(pthread_rwlock_t *l) nogil
    int pthread_rwlock_unlock(pthread_rwlock_t *l) nogil
    int spte_rwlock_init(pthread_rwlock_t *l) nogil


# Status codes: kernels return 0 or a negative code, as KVM does.
cdef enum:
    SPTE_OK = 0
    SPTE_EBUSY = 16
    SPTE_ENOMEM = 12
    SPTE_EIO = 5
    SPTE_EINVAL = 22

# RET_PF_* (arch/x86/kvm/mmu/mmu_internal.h)
cdef enum:
    RET_PF_CONTINUE = 0
    RET_PF_RETRY = 1
    RET_PF_EMULATE = 2
    RET_PF_INVALID = 3
    RET_PF_FIXED = 4
    RET_PF_SPURIOUS = 5

# Page states in the pool (audit: every page is exactly one of these).
cdef enum:
    PAGE_FREE = 0     # on the free list
    PAGE_RAW = 1      # handed out by pool_alloc / cache alloc, owner unknown
    PAGE_CACHED = 2   # held by a memory cache
    PAGE_TABLE = 3    # a page table of a Vm (linked, or the root)
    PAGE_PARKED = 4   # a removed table waiting for the readers that may still walk it

# Concurrency limits
cdef enum:
    MAX_VCPUS = 256

# Per-table flags (pool.pflags)
cdef enum:
    SP_NX_HUGE_PAGE_DISALLOWED = 1   # allocated by a fault that could not use a huge page
    SP_NX_TRACKED = 2                # on the possible-NX-huge-page list (nx_lpage_splits)


# The masks of one paging mode (kvm_mmu_set_ept_masks / kvm_mmu_reset_all_pte_masks),
# per layout instead of KVM's globals so EPT and NPT models coexist.
ctypedef struct spte_masks_t:
    u64 shadow_nonpresent_value   # fills new tables, written back by every zap
    u64 frozen_value              # nonpresent | 0x5a0: the frozen (removed) SPTE
    u64 shadow_present_mask       # EPT: R (unless exec-only) | bit 63 if nonpresent has it; NPT: P
    u64 shadow_user_mask          # EPT: R; NPT: U
    u64 shadow_x_mask             # EPT: X (bit 2); NPT: 0
    u64 shadow_nx_mask            # EPT: 0; NPT: NX (bit 63)
    u64 shadow_accessed_mask      # EPT: bit 8 with A/D, else 0; NPT: bit 5
    u64 shadow_dirty_mask         # EPT: bit 9 with A/D, else 0; NPT: bit 6
    u64 shadow_memtype_mask       # EPT: bits 3..6; NPT: 0
    u64 shadow_memtype_ram        # EPT: WB | IPAT = 0x70; NPT: 0
    u64 shadow_acc_track_mask     # EPT: RWX; NPT: 0
    u64 shadow_host_writable_mask # EPT: bit 57; NPT: bit 9
    u64 shadow_mmu_writable_mask  # EPT: bit 58; NPT: bit 10
    u64 shadow_mmio_value         # EPT: W|X (misconfig); NPT: bit 51 | P
    u64 shadow_mmio_mask          # EPT: RWX | bit 63 if nonpresent has it; NPT: bit 51 | P
    u64 shadow_mmio_access_mask   # EPT: 0; NPT: W|U
    bint ept                      # paging mode
    bint ad_disabled              # TDP SPTEs carry SPTE_TDP_AD_DISABLED (EPT without A/D)


# ---------------------------------------------------------------------------
# Predicates (pure functions of (masks, spte); spec §2.4)
# ---------------------------------------------------------------------------

cdef inline bint is_shadow_present_pte(u64 spte) noexcept nogil:
    return (spte & SPTE_MMU_PRESENT_MASK) != 0

cdef inline bint is_large_pte(u64 spte) noexcept nogil:
    return (spte & PT_PAGE_SIZE_MASK) != 0

cdef inline bint is_last_spte(u64 spte, int level) noexcept nogil:
    return level == 1 or is_large_pte(spte)

cdef inline bint is_frozen_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    return spte == m.frozen_value

cdef inline bint is_mmio_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    return (spte & m.shadow_mmio_mask) == m.shadow_mmio_value and m.shadow_mmio_value != 0

cdef inline u64 spte_to_pfn(u64 spte) noexcept nogil:
    return (spte & SPTE_BASE_ADDR_MASK) >> 12

cdef inline bint is_writable_pte(u64 spte) noexcept nogil:
    return (spte & PT_WRITABLE_MASK) != 0

cdef inline bint is_mmu_writable_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    return (spte & m.shadow_mmu_writable_mask) != 0

cdef inline bint spte_ad_enabled(u64 spte) noexcept nogil:
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED

cdef inline bint spte_ad_need_write_protect(u64 spte) noexcept nogil:
    return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_ENABLED

cdef inline u64 spte_shadow_accessed_mask(const spte_masks_t* m, u64 spte) noexcept nogil:
    return m.shadow_accessed_mask if spte_ad_enabled(spte) else 0

cdef inline u64 spte_shadow_dirty_mask(const spte_masks_t* m, u64 spte) noexcept nogil:
    return m.shadow_dirty_mask if spte_ad_enabled(spte) else 0

cdef inline bint is_access_track_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    return not spte_ad_enabled(spte) and (spte & m.shadow_acc_track_mask) == 0

cdef inline bint is_accessed_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    cdef u64 am = spte_shadow_accessed_mask(m, spte)
    if am:
        return (spte & am) != 0
    return not is_access_track_spte(m, spte)

cdef inline bint is_dirty_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    cdef u64 dm = spte_shadow_dirty_mask(m, spte)
    if dm:
        return (spte & dm) != 0
    return (spte & PT_WRITABLE_MASK) != 0

cdef inline bint is_executable_pte(const spte_masks_t* m, u64 spte) noexcept nogil:
    return (spte & (m.shadow_x_mask | m.shadow_nx_mask)) == m.shadow_x_mask

cdef inline u64 pages_per_level(int level) noexcept nogil:
    return (<u64>1) << (9 * (level - 1))

cdef inline int spte_index(gfn_t gfn, int level) noexcept nogil:
    return <int>((gfn >> (9 * (level - 1))) & 511)

cdef inline gfn_t gfn_round_for_level(gfn_t gfn, int level) noexcept nogil:
    return gfn & ~(pages_per_level(level) - 1)


# ---------------------------------------------------------------------------
# Constructors (spec §2.5): pure, inline, never store
# ---------------------------------------------------------------------------

cdef inline bint spte_has_volatile_bits(const spte_masks_t* m, u64 spte) noexcept nogil:
    """Bits hardware or the lockless fast path may set behind our back (6.10)."""
    if not is_writable_pte(spte) and is_mmu_writable_spte(m, spte):
        return True        # fast page fault may set W
    if is_access_track_spte(m, spte):
        return True        # fast page fault may restore access
    if spte_ad_enabled(spte):
        if not (spte & m.shadow_accessed_mask) or \
                (is_writable_pte(spte) and not (spte & m.shadow_dirty_mask)):
            return True    # the CPU may set A or D
    return False


cdef inline u64 mark_spte_for_access_track(const spte_masks_t* m, u64 spte) noexcept nogil:
    if spte_ad_enabled(spte):
        return spte & ~m.shadow_accessed_mask
    if is_access_track_spte(m, spte):
        return spte
    # Save R and X above the A/D-type field; W is dropped, not saved.
    spte |= (spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    spte &= ~m.shadow_acc_track_mask
    return spte


cdef inline u64 restore_acc_track_spte(const spte_masks_t* m, u64 spte) noexcept nogil:
    cdef u64 saved = (spte >> SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
    spte &= ~m.shadow_acc_track_mask
    spte &= ~(SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)
    return spte | saved


cdef inline u64 make_spte(const spte_masks_t* m, int level, unsigned int pte_access, pfn_t pfn,
                           u64 old_spte, bint prefetch, bint host_writable, bint ad_disabled,
                           bint nx_huge_pages, bint write_tracked, bint* wrprot) noexcept nogil:
    """v6.10 make_spte: the leaf for pfn at level; *wrprot set when write was refused."""
    cdef u64 spte = SPTE_MMU_PRESENT_MASK
    wrprot[0] = False
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    spte |= m.shadow_present_mask
    if not prefetch:
        spte |= spte_shadow_accessed_mask(m, spte)
    # NX huge-page mitigation: a huge page is never executable.
    if level > 1 and (pte_access & ACC_EXEC_MASK) and nx_huge_pages:
        pte_access &= ~ACC_EXEC_MASK
    if pte_access & ACC_EXEC_MASK:
        spte |= m.shadow_x_mask
    else:
        spte |= m.shadow_nx_mask
    if pte_access & ACC_USER_MASK:
        spte |= m.shadow_user_mask
    if level > 1:
        spte |= PT_PAGE_SIZE_MASK
    if m.shadow_memtype_mask:
        spte |= m.shadow_memtype_ram
    if host_writable:
        spte |= m.shadow_host_writable_mask
    else:
        pte_access &= ~ACC_WRITE_MASK
    spte |= pfn << 12
    if pte_access & ACC_WRITE_MASK:
        spte |= PT_WRITABLE_MASK | m.shadow_mmu_writable_mask
        # KVM skips the unsync check *and the dirty bit* when the old SPTE was writable.
        if is_writable_pte(old_spte):
            if prefetch:
                spte = mark_spte_for_access_track(m, spte)
            return spte
        if write_tracked:
            wrprot[0] = True
            pte_access &= ~ACC_WRITE_MASK
            spte &= ~(PT_WRITABLE_MASK | m.shadow_mmu_writable_mask)
    if pte_access & ACC_WRITE_MASK:
        spte |= spte_shadow_dirty_mask(m, spte)
    if prefetch:
        spte = mark_spte_for_access_track(m, spte)
    return spte


cdef inline u64 make_nonleaf_spte(const spte_masks_t* m, pfn_t child_pfn, bint ad_disabled) noexcept nogil:
    cdef u64 spte = SPTE_MMU_PRESENT_MASK
    spte |= (child_pfn << 12) | m.shadow_present_mask | PT_WRITABLE_MASK | \
        m.shadow_user_mask | m.shadow_x_mask
    if ad_disabled:
        spte |= SPTE_TDP_AD_DISABLED
    else:
        spte |= m.shadow_accessed_mask
    return spte


cdef inline u64 generation_mmio_spte_mask(u64 gen) noexcept nogil:
    cdef u64 mask = (gen << MMIO_SPTE_GEN_LOW_START) & MMIO_SPTE_GEN_LOW_MASK
    mask |= (gen << MMIO_SPTE_GEN_HIGH_SHIFT) & MMIO_SPTE_GEN_HIGH_MASK
    return mask


cdef inline u64 get_mmio_spte_generation(u64 spte) noexcept nogil:
    return ((spte & MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START) | \
        ((spte & MMIO_SPTE_GEN_HIGH_MASK) >> MMIO_SPTE_GEN_HIGH_SHIFT)


cdef inline gfn_t get_mmio_spte_gfn(const spte_masks_t* m, u64 spte) noexcept nogil:
    """The GPA bits of an MMIO SPTE: the PFN field minus the MMIO marker bits (NPT bit 51)."""
    return (spte & SPTE_BASE_ADDR_MASK & ~m.shadow_mmio_mask) >> 12


cdef inline u64 make_mmio_spte(const spte_masks_t* m, gfn_t gfn, unsigned int access, u64 gen) noexcept nogil:
    cdef u64 spte = generation_mmio_spte_mask(gen & MMIO_SPTE_GEN_MASK)
    spte |= m.shadow_mmio_value | (access & m.shadow_mmio_access_mask)
    spte |= (gfn << 12) & SPTE_BASE_ADDR_MASK
    return spte


cdef inline u64 make_huge_page_split_spte(const spte_masks_t* m, u64 huge_spte, int child_level,
                                   int index, bint nx_huge_pages) noexcept nogil:
    """Child `index` of a huge SPTE: same bits, pfn advanced (6.10; later make_small_spte).

    The offset is OR-ed in, as KVM does: a huge SPTE's pfn is aligned to its size, so
    this is the sum, and an unaligned pfn can never carry into bits 52 and up."""
    cdef u64 child = huge_spte
    cdef bint tracked
    child |= (<u64>index * pages_per_level(child_level)) << 12
    if child_level == 1:
        child &= ~PT_PAGE_SIZE_MASK
        if nx_huge_pages:
            # make_spte_executable: the 4K children may run code again.
            tracked = is_access_track_spte(m, child)
            if tracked:
                child = restore_acc_track_spte(m, child)
            child &= ~m.shadow_nx_mask
            child |= m.shadow_x_mask
            if tracked:
                child = mark_spte_for_access_track(m, child)
    return child


# ---------------------------------------------------------------------------
# Structs of the engine
# ---------------------------------------------------------------------------

# The page pool: one contiguous array of 512-entry pages; index = host frame of a table.
ctypedef struct pool_t:
    u64* pages              # capacity * 512 entries
    int64_t capacity
    int64_t* free_stack     # freed pages, reused LIFO before never-used ones
    int64_t free_top
    int64_t next_fresh      # never-used pages are handed out lowest index first
    uint8_t* state          # PAGE_*
    uint8_t* clean          # 1: page known to hold only zeros
    int8_t* level           # table level (role.level) while PAGE_TABLE
    uint8_t* pflags         # SP_* flags while PAGE_TABLE
    gfn_t* gfn              # first gfn mapped by the table
    int64_t fail_budget     # fault injection: allocations left before failing; -1 = off
    int64_t allocated
    int64_t freed
    int64_t failed
    int64_t zero_inits      # initialisation done by the caches on this pool (atomic adds)
    int64_t zero_untouched
    int64_t fills
    int64_t init_bytes_written
    pthread_mutex_t lock    # short lock: vCPUs top up concurrently

# kvm_mmu_memory_cache
ctypedef struct mem_cache_t:
    pool_t* pool
    u64 init_value          # fill pattern (6.10); 0 with gfp_zero = GFP_ZERO path
    bint gfp_zero
    int capacity            # recorded by the first real top-up; 0 before and after free
    int nobjs
    int64_t* objects        # NULL until the first real top-up
    int64_t fills
    int64_t zero_inits
    int64_t zero_untouched
    int64_t init_bytes_written
    int64_t obtained
    int64_t warnings
    pthread_mutex_t lock    # held by the owner vCPU while it faults, and by cache methods

# Per-context counters (a vCPU's or the VM's own); vm.stats sums them.
ctypedef struct mmu_stats_t:
    int slot                # the vCPU's reader slot; -1 for the VM's own operations
    int64_t faults[6]       # by RET_PF_*
    int64_t pages[4]        # present leaves by level (1..3)
    int64_t pt_pages[6]     # linked tables by their own level (1..5)
    int64_t tables_allocated
    int64_t tables_freed
    int64_t tlb_flushes
    int64_t tlb_flushes_ranged
    int64_t cas_failures
    int64_t warnings
    int64_t spte_changes
    int64_t nx_lpage_splits
    int64_t mmio_sptes_created

ctypedef struct memslot_t:
    gfn_t base_gfn
    u64 npages
    pfn_t pfn
    bint readonly
    int id
    uint8_t* host_flags     # per page: bit 0 accessed, bit 1 dirty (host page flags)

cdef enum:
    HOST_ACCESSED = 1
    HOST_DIRTY = 2

ctypedef struct mmu_t:
    spte_masks_t m
    pool_t* pool
    u64* pages
    int root_level
    int max_level
    int64_t root
    bint nx_huge_pages
    gfn_t gfn_limit         # exclusive: 1 << (9 * root_level)
    u64 mmio_gen
    memslot_t* slots
    int nslots
    int last_slot
    int64_t inject_cas_fail # test aid: fail this many CAS attempts
    pthread_rwlock_t mmu_lock   # faults take it for read, zaps and memslot changes for write
    # Grace period for tables removed in shared mode (KVM frees them after RCU):
    u64 epoch                   # bumped by every shared-mode removal
    u64 removals                # tables removed so far (walk hints compare it)
    u64 reader_epoch[256]       # per vCPU: epoch seen on entering the read side; 0 = outside
    int nvcpus
    int64_t* parked             # removed tables not yet returned to the pool (pool.lock)
    u64* parked_epoch           # epoch stamped on each at removal
    int64_t nparked
    int fatal               # a BUG() case was hit (present leaf -> other pfn)
    gfn_t fatal_gfn
    int fatal_level
    u64 fatal_old
    u64 fatal_new

# struct tdp_iter (arch/x86/kvm/mmu/tdp_iter.h)
ctypedef struct tdp_iter_t:
    u64* pages                  # pool base: child pfn → table (KVM's __va)
    gfn_t next_last_level_gfn   # the gfn the walk is heading for
    gfn_t yielded_gfn           # next_last_level_gfn when the iterator last yielded
    tdp_ptep_t pt_path[5]       # table pointer per level on the current path
    tdp_ptep_t sptep            # the entry the iterator points at
    gfn_t gfn                   # lowest gfn mapped by the current entry
    int root_level
    int min_level               # lowest level the iterator descends to
    int level                   # level of the current entry
    u64 old_spte                # snapshot of *sptep
    bint valid
    bint yielded


# A vCPU's memory of its last walk to a 4K table (a paging-structure cache, in the
# hardware sense).  Valid only while the level-2 entry that links that table still
# holds the value seen, so using it is the same as a walk from the root that ran a
# moment earlier; dropped whenever the vCPU leaves the MMU lock.
ctypedef struct walk_hint_t:
    int last_slot               # memslot index of the previous fault (kvm's last_used_slot)
    u64 removals                # mmu.removals when cached: any removal since drops the hint
    bint valid
    gfn_t region                # gfn >> 9 of the 4K table reached
    tdp_ptep_t l2_sptep         # the level-2 entry linking it
    u64 l2_spte                 # that entry's value when cached
    tdp_ptep_t pt_path[5]       # the walk's tables, root down to the 4K table


# ---------------------------------------------------------------------------
# Kernels and engine entry points (callable from other Cython modules)
# ---------------------------------------------------------------------------

cdef void fill_pages_kernel(u64* pages, int64_t n, u64 value) noexcept nogil
cdef int64_t count_present_kernel(const u64* page, u64 nonpresent_value) noexcept nogil

cdef int mmu_topup_memory_cache(mem_cache_t* mc, int capacity, int min) noexcept nogil
cdef int64_t mmu_memory_cache_alloc(mem_cache_t* mc) noexcept nogil

cdef void tdp_iter_start(tdp_iter_t* it, u64* pages, int64_t root, int root_level,
                         int min_level, gfn_t gfn) noexcept nogil
cdef void tdp_iter_next(tdp_iter_t* it) noexcept nogil

cdef int kvm_tdp_mmu_page_fault(mmu_t* mmu, mmu_stats_t* st, mem_cache_t* mc,
                                walk_hint_t* hint, gfn_t gfn, bint write, bint exec) noexcept nogil

# An embedder's handle on a Python Vcpu: what the fault path needs, usable without the GIL.
# Fill it with vcpu_ref() while holding the GIL and keep the Vcpu object alive meanwhile.
ctypedef struct vcpu_ref_t:
    mmu_t* mmu
    mmu_stats_t* st
    mem_cache_t* mc
    int slot

cdef int vcpu_ref(object vcpu, vcpu_ref_t* out) except -1
cdef int vcpu_fault(vcpu_ref_t* v, gfn_t gfn, bint write, bint exec) noexcept nogil
cdef void mmu_read_lock(mmu_t* mmu, int vcpu_slot) noexcept nogil
cdef void mmu_read_unlock(mmu_t* mmu, int vcpu_slot) noexcept nogil
