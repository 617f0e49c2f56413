# =====================================================================================
# core/tdp_iter.pxi: SPTE reads and writes, and the TDP iterator
# (≈ arch/x86/kvm/mmu/tdp_iter.h and tdp_iter.c, Linux 6.10)
# =====================================================================================
# The write primitives below are the only code that stores into a linked page table
# (plus the memset64 fill of pages no table links yet, and the split-page fill of a table
# before it is linked); everything else changes SPTEs through the setters of
# core/tdp_mmu.pxi, which end in handle_changed_spte.  Three callers change an SPTE
# without handle_changed_spte, as in 6.10, because neither presence nor the pfn changes:
# the CPU's A/D assist (hw_set_ad_bits), fast_page_fault's CAS and aging's bit clears.
#
# The iterator walks, in pre-order, the entries that intersect [start, end) down to
# min_level:
#     tdp_iter_start(&it, pages, root_pt, root_level, min_level, start)
#     while it.valid and it.gfn < end:
#         ...body...
#         tdp_iter_next(&it)
# It re-reads an entry before stepping down into it: the snapshot may be stale (another
# vCPU, a zap).  Yielding (tdp_mmu_iter_cond_resched) is not modelled: no operation here
# drops mmu_lock in the middle of a walk.

cdef inline u64 kvm_tdp_mmu_read_spte(tdp_ptep_t sptep) noexcept nogil:
    return spte_load_acquire(sptep)


cdef inline void __kvm_tdp_mmu_write_spte(tdp_ptep_t sptep, u64 new_spte) noexcept nogil:
    """WRITE_ONCE: for entries no one else may change (exclusive mode, a frozen SPTE)."""
    spte_store_relaxed(sptep, new_spte)


cdef inline u64 kvm_tdp_mmu_write_spte_atomic(tdp_ptep_t sptep, u64 new_spte) noexcept nogil:
    """xchg: returns the value replaced, including bits hardware set meanwhile."""
    return spte_xchg_seq_cst(sptep, new_spte)


cdef inline bint tdp_try_cmpxchg64(tdp_ptep_t sptep, u64* old, u64 new_spte) noexcept nogil:
    """try_cmpxchg64: on failure *old is refreshed with the value found."""
    return spte_try_cmpxchg_seq_cst(sptep, old, new_spte)


cdef inline u64 kvm_tdp_mmu_write_spte(const spte_masks_t* m, tdp_ptep_t sptep, u64 old_spte,
                                       u64 new_spte, int level) noexcept nogil:
    """kvm_tdp_mmu_write_spte: xchg when volatile bits of a present leaf could be lost."""
    if is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level) and \
            spte_has_volatile_bits(m, old_spte):
        return kvm_tdp_mmu_write_spte_atomic(sptep, new_spte)
    __kvm_tdp_mmu_write_spte(sptep, new_spte)
    return old_spte


cdef inline void hw_set_ad_bits(tdp_ptep_t sptep, u64 bits) noexcept nogil:
    """The CPU's locked OR of the accessed / dirty flags into a leaf (core/hw.pxi)."""
    spte_fetch_or_seq_cst(sptep, bits)


cdef inline tdp_ptep_t spte_to_child_table(u64* pages, u64 spte) noexcept nogil:
    """The table a present non-leaf SPTE points to (tdp_iter.c spte_to_child_pt: __va of
    its pfn), given the pool's pages: page pfn starts pfn << 12 bytes in, which is the
    SPTE's address field itself."""
    return <tdp_ptep_t>(<char*>pages + (spte & SPTE_BASE_ADDR_MASK))


cdef inline u64 tdp_mmu_clear_spte_bits(const spte_masks_t* m, tdp_ptep_t sptep, u64 old_spte,
                                        u64 mask, int level) noexcept nogil:
    """tdp_mmu_clear_spte_bits: fetch-and-not when the CPU could set a bit meanwhile (the
    true old value is returned), else a plain store of old & ~mask."""
    if is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level) and \
            spte_has_volatile_bits(m, old_spte):
        return spte_fetch_and_seq_cst(sptep, ~mask)
    __kvm_tdp_mmu_write_spte(sptep, old_spte & ~mask)
    return old_spte


# -- the iterator ------------------------------------------------------------------------

cdef inline void tdp_iter_refresh_sptep(tdp_iter_t* it) noexcept nogil:
    it.sptep = it.pt_path[it.level - 1] + spte_index(it.gfn, it.level)
    it.old_spte = kvm_tdp_mmu_read_spte(it.sptep)


cdef void tdp_iter_restart(tdp_iter_t* it) noexcept nogil:
    it.level = it.root_level
    it.gfn = gfn_round_for_level(it.next_last_level_gfn, it.level)
    tdp_iter_refresh_sptep(it)
    it.valid = True


cdef void tdp_iter_start(tdp_iter_t* it, u64* pages, tdp_ptep_t root_pt, int root_level,
                         int min_level, gfn_t gfn) noexcept nogil:
    it.pages = pages
    it.next_last_level_gfn = gfn
    it.root_level = root_level
    it.min_level = min_level
    it.pt_path[root_level - 1] = root_pt
    tdp_iter_restart(it)


cdef inline void tdp_iter_start_at(tdp_iter_t* it, u64* pages, tdp_ptep_t* pt_path,
                                   int root_level, int level, gfn_t gfn) noexcept nogil:
    """Start at `level` of a path known to hold present non-leaf entries above it (a walk
    made a moment ago, or a vCPU's walk hint): where tdp_iter_start followed by step-downs
    would arrive, without re-walking the levels above."""
    it.pages = pages
    it.next_last_level_gfn = gfn
    it.root_level = root_level
    it.min_level = 1
    memcpy(it.pt_path, pt_path, sizeof(it.pt_path))
    it.level = level
    it.gfn = gfn_round_for_level(gfn, level)
    tdp_iter_refresh_sptep(it)
    it.valid = True


cdef inline bint tdp_iter_at_nonleaf(const tdp_iter_t* it) noexcept nogil:
    """The current entry (as last read) is a present non-leaf: there is a table below."""
    return is_shadow_present_pte(it.old_spte) and not is_last_spte(it.old_spte, it.level)


cdef inline void _tdp_iter_descend(tdp_iter_t* it) noexcept nogil:
    """Step into the table the current entry (a present non-leaf, just read) points to."""
    it.level -= 1
    it.pt_path[it.level - 1] = spte_to_child_table(it.pages, it.old_spte)
    it.gfn = gfn_round_for_level(it.next_last_level_gfn, it.level)
    tdp_iter_refresh_sptep(it)


cdef bint try_step_down(tdp_iter_t* it) noexcept nogil:
    if it.level == it.min_level:
        return False
    # Re-read: the entry may have changed since the snapshot (another vCPU, a zap).
    it.old_spte = kvm_tdp_mmu_read_spte(it.sptep)
    if not tdp_iter_at_nonleaf(it):
        return False
    _tdp_iter_descend(it)
    return True


cdef inline bint try_step_side(tdp_iter_t* it) noexcept nogil:
    if spte_index(it.gfn, it.level) == SPTE_ENT_PER_PAGE - 1:
        return False
    it.gfn += pages_per_level(it.level)
    it.next_last_level_gfn = it.gfn
    it.sptep += 1
    it.old_spte = kvm_tdp_mmu_read_spte(it.sptep)
    return True


cdef inline bint try_step_up(tdp_iter_t* it) noexcept nogil:
    if it.level == it.root_level:
        return False
    it.level += 1
    it.gfn = gfn_round_for_level(it.gfn, it.level)
    tdp_iter_refresh_sptep(it)
    return True


cdef void tdp_iter_next(tdp_iter_t* it) noexcept nogil:
    """The next entry in pre-order: down if possible, else side, else up and side."""
    if try_step_down(it):
        return
    while True:
        if try_step_side(it):
            return
        if not try_step_up(it):
            break
    it.valid = False


cdef inline void tdp_iter_resume(tdp_iter_t* it, int level) noexcept nogil:
    """Go back up the walked path to `level` (>= the current level) and re-read the entry
    there: the entries in between are the present non-leaves the walk stepped through."""
    if level != it.level:
        it.level = level
        it.gfn = gfn_round_for_level(it.next_last_level_gfn, level)
    tdp_iter_refresh_sptep(it)


cdef inline bint tdp_iter_seek(tdp_iter_t* it, u64* pages, tdp_ptep_t root_pt,
                               int root_level, gfn_t gfn, int level) noexcept nogil:
    """Position a new iterator on gfn's entry at `level` if the path down to it exists (True),
    else at the last entry of the walk (as kvm_tdp_mmu_get_walk ends), stopping at the first
    entry that is not a present non-leaf: where tdp_iter_start followed by step-downs
    arrives, with the walk in locals and the iterator written once at the end."""
    cdef tdp_ptep_t table = root_pt
    cdef tdp_ptep_t sptep
    cdef u64 spte
    cdef int lvl = root_level
    cdef int shift = 9 * (root_level - 1)
    while True:
        it.pt_path[lvl - 1] = table
        sptep = table + ((gfn >> shift) & (SPTE_ENT_PER_PAGE - 1))
        spte = kvm_tdp_mmu_read_spte(sptep)
        if lvl == level or not is_shadow_present_pte(spte) or is_last_spte(spte, lvl):
            break
        table = spte_to_child_table(pages, spte)
        lvl -= 1
        shift -= 9
    it.pages = pages
    it.next_last_level_gfn = gfn
    it.root_level = root_level
    it.min_level = level
    it.level = lvl
    it.gfn = gfn & ~((<gfn_t>1 << shift) - 1)
    it.sptep = sptep
    it.old_spte = spte
    it.valid = True
    return lvl == level
