"""The TDP page-table iterator and the SPTE read/write primitives.

Models Linux v6.10's ``arch/x86/kvm/mmu/tdp_iter.c`` (``tdp_iter_start``,
``tdp_iter_restart``, ``tdp_iter_next`` and its step down / side / up) and
``tdp_iter.h`` (``struct tdp_iter``, ``for_each_tdp_pte_min_level``,
``kvm_tdp_mmu_read_spte`` and the three writes).  Spec §3.2, §3.3.

Memory is the pool: a table is a pool index, an SPTE pointer (``sptep``, KVM's
``tdp_ptep_t``) is a ``(table, index)`` pair, and a non-leaf SPTE's pfn is the pool index
of its child table (KVM's ``__va(pfn << PAGE_SHIFT)``).
"""
from .spte import (PG_LEVEL_4K, PT64_ROOT_MAX_LEVEL, SPTE_ENT_PER_PAGE, gfn_round_for_level,
                   is_last_spte, is_shadow_present_pte, pages_per_hpage, spte_index,
                   spte_to_pfn)


# --- the only reads and stores of page-table memory (tdp_iter.h) ------------------------------


def kvm_tdp_mmu_read_spte(pool, sptep):
    table, index = sptep
    return int(pool._pages[table, index])


def _kvm_tdp_mmu_write_spte(pool, sptep, new_spte):
    """KVM's __kvm_tdp_mmu_write_spte: a plain store."""
    table, index = sptep
    pool._pages[table, index] = new_spte
    pool._mark_dirty(table)


def kvm_tdp_mmu_write_spte_atomic(pool, sptep, new_spte):
    """xchg: store, return the value that was there (single-threaded: read, then store)."""
    old_spte = kvm_tdp_mmu_read_spte(pool, sptep)
    _kvm_tdp_mmu_write_spte(pool, sptep, new_spte)
    return old_spte


def kvm_tdp_mmu_spte_need_atomic_write(layout, old_spte, level):
    """A present leaf with volatile bits (hardware A/D, fast-path W) may change under us."""
    return (is_shadow_present_pte(old_spte) and is_last_spte(old_spte, level)
            and layout.spte_has_volatile_bits(old_spte))


def kvm_tdp_mmu_write_spte(layout, pool, sptep, old_spte, new_spte, level):
    """Exclusive-mode write: xchg (returning the true old value) when the old SPTE may have
    volatile bits, else a plain store (returning the caller's old value)."""
    if kvm_tdp_mmu_spte_need_atomic_write(layout, old_spte, level):
        return kvm_tdp_mmu_write_spte_atomic(pool, sptep, new_spte)
    _kvm_tdp_mmu_write_spte(pool, sptep, new_spte)
    return old_spte


def spte_to_child_pt(spte, level):
    """The table a present non-leaf SPTE points to, else None."""
    if not is_shadow_present_pte(spte) or is_last_spte(spte, level):
        return None
    return spte_to_pfn(spte)


# --- the iterator (tdp_iter.c) ---------------------------------------------------------------


class TdpIter:
    """KVM's ``struct tdp_iter``: a pre-order walk over the SPTEs intersecting a gfn range.

    Use it through :func:`for_each_tdp_pte_min_level`.  The model never yields mmu_lock,
    so ``yielded`` stays False, but the restart logic is kept as KVM has it.
    """

    def __init__(self, pool, root, min_level, next_last_level_gfn):
        """tdp_iter_start(iter, root, min_level, next_last_level_gfn); `root` is the root's
        kvm_mmu_page."""
        self.pool = pool
        self.next_last_level_gfn = next_last_level_gfn  # the gfn the walk is heading for
        self.yielded_gfn = next_last_level_gfn          # ... when it last yielded
        self.root_level = root.role.level
        self.min_level = min_level                      # the walk goes no lower
        self.pt_path = [None] * PT64_ROOT_MAX_LEVEL     # pt_path[level - 1]: table at level
        self.pt_path[self.root_level - 1] = root.spt
        self.level = self.root_level                    # the level of the current entry
        self.gfn = 0                                    # the first gfn the entry maps
        self.sptep = None                               # (table, index) of the entry
        self.old_spte = None                            # the entry as last read
        self.valid = False                              # False once the walk fell off the root
        self.yielded = False
        self.restart()

    def restart(self):
        """tdp_iter_restart: back to the root, heading for next_last_level_gfn."""
        self.yielded = False
        self.yielded_gfn = self.next_last_level_gfn
        self.level = self.root_level
        self.gfn = gfn_round_for_level(self.next_last_level_gfn, self.level)
        self._refresh_sptep()
        self.valid = True

    def _refresh_sptep(self):
        """tdp_iter_refresh_sptep: point at the entry for (gfn, level) and read it."""
        self.sptep = (self.pt_path[self.level - 1], spte_index(self.gfn, self.level))
        self.old_spte = kvm_tdp_mmu_read_spte(self.pool, self.sptep)

    def _try_step_down(self):
        if self.level == self.min_level:
            return False
        # Re-read before stepping down: never walk into a table no longer linked here.
        self.old_spte = kvm_tdp_mmu_read_spte(self.pool, self.sptep)
        child_pt = spte_to_child_pt(self.old_spte, self.level)
        if child_pt is None:
            return False
        self.level -= 1
        self.pt_path[self.level - 1] = child_pt
        self.gfn = gfn_round_for_level(self.next_last_level_gfn, self.level)
        self._refresh_sptep()
        return True

    def _try_step_side(self):
        # The last entry of its table: the caller steps up.
        if spte_index(self.gfn, self.level) == SPTE_ENT_PER_PAGE - 1:
            return False
        self.gfn += pages_per_hpage(self.level)
        self.next_last_level_gfn = self.gfn
        table, index = self.sptep
        self.sptep = (table, index + 1)
        self.old_spte = kvm_tdp_mmu_read_spte(self.pool, self.sptep)
        return True

    def _try_step_up(self):
        if self.level == self.root_level:
            return False
        self.level += 1
        self.gfn = gfn_round_for_level(self.gfn, self.level)
        self._refresh_sptep()
        return True

    def next(self):
        """tdp_iter_next: down if possible, else side, else up-and-side; off the root: invalid."""
        if self.yielded:
            self.restart()
            return
        if self._try_step_down():
            return
        while True:
            if self._try_step_side():
                return
            if not self._try_step_up():
                break
        self.valid = False


def for_each_tdp_pte_min_level(pool, root, min_level, start, end):
    """KVM's macro: yields the iterator at each SPTE, pre-order, while it is valid and its
    gfn is below `end` (for ``start == end`` that still visits the entries on start's path
    whose gfn is below `end`, as KVM does)."""
    it = TdpIter(pool, root, min_level, start)
    while it.valid and it.gfn < end:
        yield it
        it.next()


def for_each_tdp_pte(pool, root, start, end):
    return for_each_tdp_pte_min_level(pool, root, PG_LEVEL_4K, start, end)
