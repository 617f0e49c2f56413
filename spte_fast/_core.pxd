# spte_fast._core: the engine's C-level declarations (the embedding API).
#
# The structs below are KVM's objects, one per concept, in the order a fault meets them:
# the page pool (the host's struct page array), kvm_mmu_memory_cache, kvm_mmu_page,
# kvm_memory_slot, struct kvm, struct kvm_vcpu, struct tdp_iter, struct kvm_page_fault.
# Then the prototypes other Cython modules may call and the cdef class layouts, so an
# embedder can `cimport spte_fast._core` and reach a Python Vcpu's kvm_vcpu_t directly
# (`from spte_fast._core cimport Vcpu, kvm_vcpu_t, vcpu_fault`).  The SPTE layer
# (types, constants, predicates, constructors) is spte_fast/spte.pxd, re-exported here.
# Build an embedding extension with include_dirs=[numpy.get_include(), spte_fast.get_include()].
# Semantics: Linux v6.10 (arch/x86/kvm/mmu/, virt/kvm/kvm_main.c).

cimport cython
from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree, PyMem_RawMalloc
from libc.stdint cimport int8_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from posix.mman cimport (MADV_NOHUGEPAGE, MAP_ANONYMOUS, MAP_FAILED, MAP_NORESERVE,
                         MAP_PRIVATE, PROT_READ, PROT_WRITE, madvise, mmap, munmap)

cimport numpy as cnp

from spte_fast.spte cimport *


cdef extern from "spte_atomic.h":
    u64 spte_load_acquire(const u64 *p) noexcept nogil
    void spte_store_relaxed(u64 *p, u64 v) noexcept nogil
    u64 spte_xchg_seq_cst(u64 *p, u64 v) noexcept nogil
    bint spte_try_cmpxchg_seq_cst(u64 *p, u64 *old, u64 new_) noexcept nogil
    u64 spte_fetch_or_seq_cst(u64 *p, u64 m) noexcept nogil
    u64 spte_fetch_and_seq_cst(u64 *p, u64 m) noexcept nogil
    void u8_or_relaxed(uint8_t *p, uint8_t m) noexcept nogil
    void u64_or_relaxed(u64 *p, u64 m) noexcept nogil
    void i64_add_relaxed(int64_t *p, int64_t v) noexcept nogil
    int64_t i64_load_relaxed(const int64_t *p) noexcept nogil
    bint i64_dec_if_positive_relaxed(int64_t *p) noexcept nogil
    u64 u64_load_seq_cst(const u64 *p) noexcept nogil
    int __builtin_ctzll(unsigned long long x) noexcept nogil
    u64 bitmap_xchg_word(u64 *p, u64 v) noexcept nogil
    u64 bitmap_fetch_andnot_word(u64 *p, u64 m) noexcept nogil
    void bitmap_store_word(u64 *p, u64 v) noexcept nogil
    int __builtin_clzll(unsigned long long x) noexcept nogil
    void u64_store_seq_cst(u64 *p, u64 v) noexcept nogil
    u64 u64_inc_return_seq_cst(u64 *p) noexcept nogil
    void spte_prefetch_read(const void* p) noexcept nogil
    void cpu_relax() noexcept nogil

    ctypedef struct pthread_mutex_t:
        pass
    int pthread_mutex_init(pthread_mutex_t *m, void *attr) nogil
    int pthread_mutex_destroy(pthread_mutex_t *m) nogil
    int pthread_mutex_lock(pthread_mutex_t *m) nogil
    int pthread_mutex_unlock(pthread_mutex_t *m) nogil
    ctypedef struct pthread_rwlock_t:
        pass
    int pthread_rwlock_destroy(pthread_rwlock_t *l) nogil
    int pthread_rwlock_rdlock(pthread_rwlock_t *l) nogil
    int pthread_rwlock_wrlock(pthread_rwlock_t *l) nogil
    int pthread_rwlock_unlock(pthread_rwlock_t *l) nogil
    int spte_rwlock_init(pthread_rwlock_t *l) nogil

cdef extern from "spte_memset64.h":
    void spte_memset64(u64 *p, u64 v, size_t n) noexcept nogil
    int64_t spte_count_ne(const u64 *p, u64 v, size_t n) noexcept nogil


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

# The CPU's page walk (core/hw.pxi): its verdicts, the kinds of access (access_batch's codes,
# and unicorn's UC_MEM_READ/WRITE/FETCH minus 16), and what a TLB entry lets the CPU do
# without walking again (the values of unicorn's UC_PROT_*).
cdef enum:
    HW_HIT = 0                      # translated, no exit
    HW_VIOLATION = 1                # EPT violation / #NPF (no RSVD)
    HW_MISCONFIG = 2                # EPT misconfiguration / #NPF with RSVD
    HW_PML_FULL = 3                 # page-modification log full (VMX): nothing was set
    HW_UNDECIDED = 4                # hw_walk_hits: not the common case, walk in full
    ACC_READ = 0
    ACC_WRITE = 1
    ACC_FETCH = 2
    HW_PERM_READ = 1
    HW_PERM_WRITE = 2
    HW_PERM_EXEC = 4
    ACCESS_INTERRUPTED = 1 << 8     # vcpu_access: re-executed 2**16 times, call again
    ACCESS_GUEST_PAGE_FAULT = 14    # a guest-virtual access the guest takes a #PF on
    NR_BATCH_COUNTS = 7             # access counts: [0] no exit, [RET_PF_*] exits by result,
    COUNT_FAST = 6                  # [COUNT_FAST] exits fast_page_fault resolved

# Page states in the pool (audit: every page is exactly one of these).
cdef enum:
    PAGE_FREE = 0     # on the free list
    PAGE_RAW = 1      # handed out by pool_alloc / a cache's alloc, owner unknown
    PAGE_CACHED = 2   # held by a memory cache
    PAGE_TABLE = 3    # a page table of a Vm (linked, or the root)
    PAGE_PARKED = 4   # a removed table waiting out the grace period of the readers

cdef enum:
    MAX_VCPUS = 256
    MAX_ROOTS = MAX_VCPUS + 1        # one valid root, and an invalid one per vCPU at most
    VM_READER = MAX_VCPUS            # the VM's own read-side slot (eager split, dirty-log
                                     # protection, collapsible zaps run under the read lock)
    PML_ENTITY_NUM = 512             # entries of a vCPU's page-modification log (vmx.h)
    GM_CACHE = 8                     # a vCPU's cache of guest-memory page pointers
    KVM_MEM_LOG_DIRTY_PAGES = 1      # memslot flags (include/uapi/linux/kvm.h)
    KVM_MEM_READONLY = 2
    KVM_MEMSLOT_INVALID = 1 << 16    # a slot being deleted or moved (include/linux/kvm_host.h)
    KVM_ADDRESS_SPACE_NUM = 2        # kvm_arch_nr_memslot_as_ids: SMM (generations step by 2)
    HOST_ACCESSED = 1                # host page flags (struct page's accessed / dirty)
    HOST_DIRTY = 2
    HOST_FLAGS_CHUNK_SHIFT = 12      # pages per bit of a slot's host_flags_touched

# Warning reasons, in the order of spte_fast.errors.WARN_REASONS (mmu first, then the cache).
cdef enum:
    WARN_SPTE_LEVEL = 0
    WARN_SPTE_GFN_UNALIGNED = 1
    WARN_SPTE_WRITABLE_INVARIANTS = 2
    WARN_NONPRESENT_TO_NONPRESENT = 3
    WARN_NONLEAF_TO_NONLEAF = 4
    WARN_SET_SPTE_FROZEN = 5
    WARN_SET_SPTE_ATOMIC_FROZEN = 6
    WARN_ZAP_SP_UNLINKED = 7
    NR_MMU_WARN = 8
cdef enum:
    WARN_CACHE_CAPACITY_ZERO = 0
    WARN_CACHE_INIT_VALUE_GFP_ZERO = 1
    WARN_CACHE_CAPACITY_MISMATCH = 2
    WARN_CACHE_ALLOC_EMPTY = 3
    NR_CACHE_WARN = 4


# ---------------------------------------------------------------------------
# kvm_mmu_page (mmu_internal.h): one per page-table page.  Only the helpers in
# core/mmu_page.pxi write these fields or the pool's per-page metadata of a table.
# ---------------------------------------------------------------------------

ctypedef struct kvm_mmu_page_t:
    tdp_ptep_t spt                  # the table's 512 entries
    tdp_ptep_t ptep                 # the entry that links it (NULL for a root)
    gfn_t gfn                       # first gfn it maps
    int8_t level                    # role.level: its own level (a 4K-leaf table is 1)
    bint nx_huge_page_disallowed    # made by a fault that could not use a huge page
    bint nx_linked                  # on kvm.possible_nx_huge_pages
    int64_t nx_prev                 # possible_nx_huge_page_link (pool indices, -1 ends)
    int64_t nx_next
    # Roots only (tdp_mmu.c), changed under kvm.tdp_mmu_pages_lock:
    int root_count                  # tdp_mmu_root_count: one per vCPU using it, +1 for the
                                    # MMU until the root is invalidated
    bint role_invalid               # role.invalid
    bint scheduled_root_to_zap      # tdp_mmu_scheduled_root_to_zap


# ---------------------------------------------------------------------------
# The page pool: the host's page-table memory.  One contiguous array of 512-entry pages;
# a page's index is its host frame number, `sp[index]` its kvm_mmu_page (page_private).
# ---------------------------------------------------------------------------

# What a memory cache did to initialise pages (the pool reports the sum over its caches).
ctypedef struct cache_init_stats_t:
    int64_t fills                   # memset64 with init_value
    int64_t zero_inits              # zeroed for GFP_ZERO
    int64_t zero_untouched          # GFP_ZERO pages known to be zero already
    int64_t init_bytes_written

ctypedef struct pool_t:
    u64* pages                      # capacity * 512 entries, 4 KiB aligned
    int64_t capacity
    int64_t* free_stack             # freed pages, reused LIFO before never-used ones
    int64_t free_top
    int64_t next_fresh              # never-used pages are handed out lowest index first
    uint8_t* state                  # PAGE_*
    uint8_t* clean                  # 1: page known to hold only zeros
    kvm_mmu_page_t* sp              # per page, valid while PAGE_TABLE
    int64_t fail_budget             # fault injection: allocations left before failing; -1 = off
    int64_t allocated
    int64_t freed
    int64_t failed
    kvm_mmu_memory_cache_t* caches  # the caches on this pool (list through pool_next)
    cache_init_stats_t retired      # init work of caches that no longer exist
    pthread_mutex_t lock            # short lock: vCPUs top up concurrently


# ---------------------------------------------------------------------------
# kvm_mmu_memory_cache (include/linux/kvm_types.h, 6.10)
# ---------------------------------------------------------------------------

ctypedef struct kvm_mmu_memory_cache_t:
    pool_t* pool
    u64 init_value                  # fill pattern (6.10); 0 with gfp_zero = GFP_ZERO path
    bint gfp_zero
    int capacity                    # recorded by the first real top-up; 0 before and after free
    int nobjs
    int64_t* objects                # NULL until the first real top-up
    cache_init_stats_t init         # atomic adds: the pool sums them while vCPUs run
    int64_t obtained                # pages taken from the pool
    int64_t warn[NR_CACHE_WARN]     # by WARN_CACHE_*
    int last_warn                   # reason of the latest warning, -1 none (for messages)
    pthread_mutex_t lock            # the owner's vcpu->mutex: held while it faults
    kvm_mmu_memory_cache_t* pool_next


# ---------------------------------------------------------------------------
# kvm_memory_slot (include/linux/kvm_host.h)
# ---------------------------------------------------------------------------

ctypedef struct kvm_memory_slot_t:
    gfn_t base_gfn
    u64 npages
    pfn_t pfn                       # host pfn backing base_gfn (stands for userspace_addr)
    uint32_t flags                  # KVM_MEM_*
    int id
    uint8_t* host_flags             # per page: HOST_ACCESSED | HOST_DIRTY (owned by the slot)
    u64* host_flags_touched         # one bit per HOST_FLAGS_CHUNK pages whose flags were set:
                                    # a delete reads only those (owned by the slot)
    u64* dirty_bitmap               # KVM_MEM_LOG_DIRTY_PAGES: one bit per page, set by
                                    # mark_page_dirty_in_slot (owned by the slot; else NULL)


# ---------------------------------------------------------------------------
# Counters of one context (a vCPU's own, or the VM's own operations); vm.stats sums them,
# so vCPU threads never share a counter.  docs/API.md maps them to KVM's stat names.
# ---------------------------------------------------------------------------

ctypedef struct mmu_stats_t:
    int rcu_reader                  # this context's reader slot (vcpu_idx); -1 for the VM
    int64_t faults[6]               # by RET_PF_*
    int64_t pages[4]                # present leaves by level 1..3 (kvm_update_page_stats)
    int64_t pt_pages[6]             # linked tables by their own level 1..5
    int64_t tables_allocated
    int64_t tables_freed
    int64_t tlb_flushes
    int64_t tlb_flushes_ranged
    int64_t cas_failures
    int64_t spte_changes            # calls of handle_changed_spte
    int64_t mmio_sptes_created
    int64_t faults_fast             # pf_fast: faults fast_page_fault answered
    int64_t hw_walks                # the CPU's EPT/NPT walks (vcpu.access)
    int64_t hw_ad_sets              # leaves whose A (and D) the CPU set
    int64_t exits_ept_violation     # EPT violations / #NPF without RSVD
    int64_t exits_misconfig         # EPT misconfigurations / #NPF with RSVD
    int64_t exits_pml_full          # page-modification log full (EXIT_REASON_PML_FULL)
    int64_t pml_logged              # gfns the CPU wrote into a PML buffer
    int64_t dirty_pages_marked      # mark_page_dirty_in_slot calls on a dirty-logged slot
    int64_t huge_pages_split        # huge SPTEs replaced by a table of 512 (eager split)
    int64_t nx_huge_pages_recovered # possible-NX-huge-page tables zapped by NX recovery
    int64_t guest_walks             # guest-virtual accesses walked (each re-execution too)
    int64_t guest_walk_refs         # memory references of those walks (guest + TDP entries)
    int64_t guest_faults            # guest page faults (#PF delivered in the guest)
    int64_t guest_ad_sets           # guest page-table entries whose A (and D) the CPU set
    int64_t warn[NR_MMU_WARN]       # by WARN_*


# Guest memory's contents (core/guest_memory.pxi), kept for the host pages that were
# written: a hash from host pfn to a 512-word page, so that aliased and moved memslots
# see the host's memory, as a VMM's mappings do.
ctypedef struct guest_mem_t:
    u64* keys                       # host pfn + 1 per slot (0: empty)
    u64** pages
    int bits                        # capacity 1 << bits (0: nothing allocated)
    u64 count
    pthread_mutex_t lock            # lookups and insertions


# ---------------------------------------------------------------------------
# struct kvm: the VM's MMU state
# ---------------------------------------------------------------------------

ctypedef struct kvm_t:
    spte_masks_t m                  # the layout's masks (per VM, as 6.10's shadow_mmio_value)
    pool_t* pool
    int root_level                  # tdp_root_level
    int max_level                   # largest mapping level
    bint nx_huge_pages              # the NX huge-page mitigation
    gfn_t gfn_limit                 # exclusive: 1 << (9 * root_level)
    int host_phys_bits              # host MAXPHYADDR (shadow_phys_bits)
    gfn_t max_gfn                   # kvm_mmu_max_gfn(): the last gfn the host can address
    u64 rsvd_pa_mask                # PA bits host_phys_bits..51: reserved for the CPU
    bint ad_enabled                 # kvm_ad_enabled(): the CPU sets A/D bits
    u64 generation                  # memslots generation: +2 per swap (its low 19 bits go
                                    # into MMIO SPTEs)
    u64 leaf_4k_template[2]         # make_spte(level 1, ACC_ALL, pfn 0, not prefetch, a
                                    # non-writable old SPTE), [host_writable]
    int64_t roots[MAX_ROOTS]        # tdp_mmu_roots: pool indices, oldest first
    int nr_roots
    # What the CPU's walker checks (core/hw.pxi): present bits, per access kind the bits a
    # leaf needs and those it must not have, and whether it sets A/D.
    u64 hw_present_mask
    u64 hw_need[3]
    u64 hw_forbid[3]
    u64 hw_hit_ok                   # the hit case (core/hw.pxi hw_walk_hits): bit 0 and
    u64 hw_hit_need[3]              # the reserved PA bits on every level; per access kind
    u64 hw_hit_check[3]             # the bits the leaf needs, and those looked at
    kvm_memory_slot_t* slots        # sorted by base_gfn
    int nslots
    int64_t inject_cas_fail         # test aid: fail this many CAS attempts
    pthread_rwlock_t mmu_lock       # faults take it for read; zaps, memslot changes for write
    pthread_mutex_t tdp_mmu_pages_lock  # guards the possible-NX-huge-page list
    int64_t possible_nx_head        # possible_nx_huge_pages: oldest first (-1: empty)
    int64_t possible_nx_tail
    int64_t nx_lpage_splits         # its length (kvm->stat.nx_lpage_splits)
    # The grace period that stands for RCU: a table removed while another vCPU may still
    # walk it is freed only once every reader inside the read side entered after it.
    u64 rcu_gp_seq                  # bumped by every deferred free
    u64 removals                    # tables removed so far (walk hints compare it)
    u64 rcu_reader_seq[MAX_VCPUS + 1]    # per vCPU (and VM_READER): gp seq seen on entering
                                         # the read side; 0 = outside
    int nvcpus
    int64_t* rcu_pending            # removed tables waiting for the grace period (pool.lock)
    u64* rcu_pending_seq            # the gp seq each waits for
    int64_t nr_rcu_pending
    # Dirty logging (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, module parameters enable_pml and
    # eager_page_split) and NX huge-page recovery (nx_huge_pages_recovery_ratio).
    bint manual_dirty_log_protect
    bint dirty_log_initially_set    # KVM_DIRTY_LOG_INITIALLY_SET
    bint enable_pml                 # kvm_x86_ops.cpu_dirty_log_size != 0
    bint eager_page_split
    int nx_huge_pages_recovery_ratio
    int nr_memslots_dirty_logging   # PML is on in the vCPUs while this is non-zero
    guest_mem_t guest_mem           # what the guest's memory holds (read/write_guest)
    int fatal                       # a BUG() case was hit (present leaf -> other pfn)
    gfn_t fatal_gfn
    int fatal_level
    u64 fatal_old
    u64 fatal_new


# A vCPU's memory of its last walk to a 4K table (a paging-structure cache, in the hardware
# sense).  Valid only while the level-2 entry that links that table still holds the value
# seen and no table was removed since, so seeding an iterator from it is the same as a walk
# from the root a moment earlier; dropped whenever the vCPU leaves the read side.
ctypedef struct walk_hint_t:
    bint valid
    u64 removals                    # kvm.removals when cached
    gfn_t region                    # gfn >> 9 of the 4K table reached
    tdp_ptep_t l2_sptep             # the level-2 entry linking it
    u64 l2_spte                     # that entry's value when cached
    tdp_ptep_t pt_path[5]           # the walk's tables, root down to the 4K table


# struct kvm_vcpu (the MMU's part)
ctypedef struct kvm_vcpu_t:
    kvm_t* kvm
    mmu_stats_t stat
    kvm_mmu_memory_cache_t* mmu_shadow_page_cache
    walk_hint_t hint
    int last_used_slot              # index into kvm.slots (vcpu->last_used_slot)
    int vcpu_idx                    # also its reader slot in the grace period
    int64_t root                    # mmu->root.hpa: pool index of its root, -1 INVALID_PAGE
    gfn_t mmio_gfn                  # vcpu_cache_mmio_info (0: nothing cached)
    u64 mmio_gen                    # the memslots generation it was cached in
    int pml_count                   # entries in pml_buf (the CPU's PML index counts down
                                    # from 511; this counts up)
    gfn_t pml_buf[PML_ENTITY_NUM]   # the page-modification log: gfns whose D the CPU set
    bint guest_paging               # the guest runs with paging on (CR3 below)
    u64 guest_cr3                   # the guest's CR3: its root table's gpa
    int guest_levels                # 4- or 5-level guest paging (CR4.LA57)
    pfn_t gm_pfn[GM_CACHE]          # the guest-memory pages its walks read last (by pfn
    u64* gm_page[GM_CACHE]          # mod GM_CACHE; a page lives as long as the VM)


# A translation as the CPU's TLB holds it after a walk (vcpu_tlb_fill).
ctypedef struct hw_tlb_entry_t:
    u64 spte                        # the leaf that translated the gfn
    int level                       # its level (1 4K, 2 2M, 3 1G); 0: no translation
    pfn_t pfn                       # the host pfn backing the gfn itself
    int perms                       # HW_PERM_*: the accesses the entry allows


# struct tdp_iter (arch/x86/kvm/mmu/tdp_iter.h)
ctypedef struct tdp_iter_t:
    u64* pages                      # pool base: child pfn -> table (KVM's __va)
    gfn_t next_last_level_gfn       # the gfn the walk is heading for
    tdp_ptep_t pt_path[5]           # table pointer per level on the current path
    tdp_ptep_t sptep                # the entry the iterator points at
    gfn_t gfn                       # lowest gfn mapped by the current entry
    int root_level
    int min_level                   # lowest level the iterator descends to
    int level                       # level of the current entry
    u64 old_spte                    # snapshot of *sptep
    bint valid


# struct kvm_page_fault (arch/x86/kvm/mmu/mmu_internal.h): one fault from entry to map
ctypedef struct kvm_page_fault_t:
    gfn_t gfn
    u64 error_code                  # PFERR_* bits
    bint present                    # PFERR_PRESENT_MASK
    bint write                      # PFERR_WRITE_MASK
    bint rsvd                       # PFERR_RSVD_MASK
    bint exec                       # PFERR_FETCH_MASK
    bint prefetch
    bint nx_huge_page_workaround_enabled
    int max_level                   # the VM's largest mapping level
    int req_level                   # what the memslot allows (kvm_mmu_hugepage_adjust)
    int goal_level                  # what the fault will map
    bint huge_page_disallowed       # exec fault under the NX mitigation
    kvm_memory_slot_t* slot         # NULL: no memslot (MMIO)
    pfn_t pfn
    bint map_writable


# ---------------------------------------------------------------------------
# Entry points (callable from other Cython modules without Python)
# ---------------------------------------------------------------------------

cdef void fill_pages_kernel(u64* pages, int64_t n, u64 value) noexcept nogil
cdef int64_t count_present_kernel(const u64* page, u64 nonpresent_value) noexcept nogil

cdef int kvm_mmu_topup_memory_cache(kvm_mmu_memory_cache_t* mc, int capacity,
                                    int min) noexcept nogil
cdef int64_t kvm_mmu_memory_cache_alloc(kvm_mmu_memory_cache_t* mc) noexcept nogil

cdef void tdp_iter_start(tdp_iter_t* it, u64* pages, tdp_ptep_t root_pt, int root_level,
                         int min_level, gfn_t gfn) noexcept nogil
cdef void tdp_iter_next(tdp_iter_t* it) noexcept nogil

cdef void kvm_mmu_read_lock(kvm_t* kvm, int reader) noexcept nogil
cdef void kvm_mmu_read_unlock(kvm_t* kvm, int reader) noexcept nogil
cdef int kvm_mmu_page_fault(kvm_vcpu_t* vcpu, gfn_t gfn, u64 error_code) noexcept nogil

# One fault as Vcpu.fault makes it, GIL-free: the vCPU's mutex, mmu_lock for read,
# RET_PF_* or -SPTE_ENOMEM / -SPTE_EIO.  The gfn must be below kvm.gfn_limit.
cdef int vcpu_fault(kvm_vcpu_t* vcpu, gfn_t gfn, bint write, bint exec) noexcept nogil
# The same with a full error code (PFERR_*), as an exit handler passes it.
cdef int vcpu_fault_error_code(kvm_vcpu_t* vcpu, gfn_t gfn, u64 error_code) noexcept nogil
# One access as the CPU makes it (the hardware view): the vCPU's mutex, mmu_lock for read,
# the EPT/NPT walk with A/D assists, and the exits it raises until the access completes.
# 0 (no exit) or the RET_PF_* of the last exit, or -SPTE_ENOMEM / -SPTE_EIO; may also
# return ACCESS_INTERRUPTED after 2**16 re-executions: call again.
cdef int vcpu_access(kvm_vcpu_t* vcpu, gfn_t gfn, bint write, bint exec) noexcept nogil
# A TLB miss of an emulated CPU (spte_fast.integrations.unicorn): the access of kind ACC_*
# to completion as vcpu_access makes it, then the translation the CPU may cache in `e`.
# Returns what vcpu_access returns, or -SPTE_EINVAL for a gfn beyond the address width or
# a bad kind (nothing done); `e.level` is 0 when no translation exists (RET_PF_EMULATE: the
# access was emulated, e.g. MMIO).  `counts` (NR_BATCH_COUNTS) adds the access's exits:
# [0] += 1 when there was none, [RET_PF_*] per exit, [COUNT_FAST] those fast_page_fault fixed.
cdef int vcpu_tlb_fill(kvm_vcpu_t* vcpu, gfn_t gfn, int acc, int64_t* counts,
                       hw_tlb_entry_t* e) noexcept nogil
# A guest-virtual access of a guest with paging on (core/guest_walk.pxi): the
# two-dimensional walk, re-executed after every exit, as vcpu_access does for a gfn.
# 0 (no exit), ACCESS_GUEST_PAGE_FAULT (14), the RET_PF_* of the first exit, ACCESS_INTERRUPTED,
# or -SPTE_E*.  acc: ACC_*; counts as vcpu_tlb_fill's.
cdef int vcpu_guest_access(kvm_vcpu_t* vcpu, u64 gva, int acc, bint user,
                           int64_t* counts) noexcept nogil
# The same, then (as vcpu_tlb_fill) the translation a TLB may cache for gva's page: the
# TDP leaf of the final gpa, the host pfn, and the permissions both the TDP leaf and the
# guest's entries grant (a write only once the guest PTE and the TDP leaf are dirty);
# e.level 0 after a guest page fault or an emulated access.
cdef int vcpu_guest_tlb_fill(kvm_vcpu_t* vcpu, u64 gva, int acc, bint user, int64_t* counts,
                             hw_tlb_entry_t* e) noexcept nogil
# The kvm_vcpu_t of a Python Vcpu (with the GIL; keep the Vcpu alive while using it).
cdef kvm_vcpu_t* vcpu_handle(object vcpu) except NULL

# The API boundary's argument checks, for other modules' def functions (spte_fast._bench).
cdef u64 _as_u64(object v, str name) except? 0xFFFFFFFFFFFFFFFF
cdef int64_t _as_int(object v, str name, int64_t lo, int64_t hi) except? -1
cdef cnp.ndarray _u64_array(object a, str name, bint writable)
cdef cnp.ndarray _pages_array(object a, str name, bint writable)
cdef cnp.ndarray _gfn_array(object a, str name, u64 limit)
cdef object _page_arena(int64_t cap, object poison)


# ---------------------------------------------------------------------------
# cdef class layouts (the Python objects' C state)
# ---------------------------------------------------------------------------

@cython.final
cdef class SpteLayout:
    cdef spte_masks_t m
    cdef readonly bint exec_only
    cdef _validate(self)
    cdef tuple _key(self)
    cdef u64 _mmio_arg(self, spte) except? 0


@cython.final
@cython.no_gc_clear
cdef class PagePool:
    cdef pool_t p
    cdef object _arr                # the (capacity, 512) array the pages live in
    cdef object _ro                 # the same seen through a read-only buffer (``pages``)
    cdef readonly object poison
    cdef int64_t _index(self, index) except -1


@cython.final
@cython.no_gc_clear
cdef class MemoryCache:
    cdef kvm_mmu_memory_cache_t mc
    cdef readonly PagePool pool
    cdef readonly int default_capacity


@cython.final
@cython.no_gc_clear
cdef class Vm:
    cdef kvm_t kvm
    cdef mmu_stats_t st             # the VM's own operations (zaps, memslot changes)
    cdef readonly SpteLayout layout
    cdef readonly PagePool pool
    cdef object _retired_pfns       # sorted uint64: host pages of deleted slots with flags set
    cdef object _retired_bits       # uint8: their accessed/dirty flags (host pages keep them)
    cdef object _slots_lock         # slots_lock: one memslot change at a time
    cdef object _vcpu_lock          # serialises vCPU creation (the MAX_VCPUS check)
    cdef list _vcpus
    cdef int _next_slot_id
    cdef gfn_t _gfn(self, v, str name) except? 0xFFFFFFFFFFFFFFFF
    cdef int _raise_fatal(self) except -1
    cdef int _swap_memslots(self, kvm_memory_slot_t* slots, int n, int mark_invalid,
                            int clear_invalid) except -1
    cdef int _zap_all_fast(self) except -1
    cdef tuple _gfn_range(self, start, end)
    cdef int _check_slot_range(self, gfn_t base, u64 n, int64_t skip_id) except -1
    cdef int _check_max_gfn(self, gfn_t base, u64 n) except -1
    cdef object _add_memslot(self, gfn_t base, u64 n, u64 p, bint readonly, bint dirty_log)
    cdef u64* _alloc_dirty_bitmap(self, u64 n) except NULL
    cdef int _set_memslot_flags(self, int64_t sid_wanted, bint log) except -1
    cdef kvm_memory_slot_t* _dirty_logged_slot(self, int64_t sid_wanted) except NULL
    cdef int _vcpu_handles(self, kvm_vcpu_t** out) except -1
    cdef int _slot_index(self, int64_t sid_wanted) except -1
    cdef int _invalidate_memslot(self, int at) except -1
    cdef int _delete_memslot(self, int64_t sid_wanted) except -1
    cdef int _move_memslot(self, int64_t sid_wanted, gfn_t base) except -1
    cdef int _host_flags(self, pfn) except -1
    cdef list _tdp_iter(self, gfn_t start, gfn_t end, int min_level)
    cdef int _register_vcpu(self, Vcpu v) except -1


@cython.final
cdef class Vcpu:
    cdef readonly Vm vm
    cdef readonly MemoryCache cache
    cdef kvm_vcpu_t vcpu
