"""The exception hierarchy and the two vocabularies shared by the engine and the reference model.

Both implementations raise ``AuditError`` only with an ``invariant`` named in
``AUDIT_INVARIANTS`` and count warnings only under a reason named in ``WARN_REASONS``: the
names are part of the contract (docs/API.md), so a test written against one implementation
reads the other's failures the same way.  These are data, not code: each implementation
checks and counts in its own code.
"""

#: ``AuditError.invariant`` names: what ``vm.audit()`` (and a KVM ``BUG()`` case) can report.
AUDIT_INVARIANTS = {
    "present-leaf-pfn-change": "a present leaf was replaced by a present leaf with another pfn "
                               "(KVM's BUG() in handle_changed_spte)",
    "nonpresent-value": "a linked table holds a non-present entry that is neither the layout's "
                        "non-present value nor an MMIO SPTE",
    "no-frozen-at-rest": "a frozen SPTE is left in a linked table between operations",
    "mmio-level": "an MMIO SPTE above the 4K level",
    "mmio-gfn": "an MMIO SPTE encodes another gfn than the one it is installed for",
    "ept-suppress-ve": "a present EPT SPTE lacks bit 63 although the non-present value has it",
    "nonleaf-encoding": "a non-leaf entry differs from make_nonleaf_spte of its child table",
    "nonleaf-target": "a non-leaf entry points outside the page pool",
    "linked-once": "a table is linked from more than one entry",
    "table-metadata": "a linked table's kvm_mmu_page (level, gfn, parent entry) disagrees with "
                      "where it is linked",
    "leaf-level": "a leaf above the VM's max_level",
    "writable-state": "a leaf with W but not MMU-writable, or MMU-writable but not host-writable",
    "leaf-in-slot": "a leaf maps gfns outside every memslot",
    "leaf-pfn": "a leaf's pfn is not its memslot's pfn for the gfn",
    "readonly-slot": "a writable or host-writable leaf in a read-only memslot",
    "page-stats": "pages_4k / pages_2m / pages_1g differ from the present leaves found",
    "pt-pages": "pt_pages / pt_pages_lN differ from the tables found",
    "table-accounting": "tables_allocated - tables_freed differs from the tables linked",
    "nx-huge-pages": "the possible-NX-huge-page list, nx_lpage_splits and the tables' "
                     "nx_huge_page_disallowed flags disagree",
    "roots": "a root on the VM's list whose reference count is not one per vCPU using it plus one for the MMU while valid, a second valid root, or a vCPU root off the list",
    "pool-accounting": "a pool page is not exactly one of free, cached in one vCPU cache, "
                       "linked once, or parked",
}

#: Warning reasons: each is one WARN_ON_ONCE site of Linux 6.10, counted instead of printed.
WARN_REASONS = {
    # handle_changed_spte (tdp_mmu.c)
    "spte-level": "handle_changed_spte: level outside 1..PT64_ROOT_MAX_LEVEL",
    "spte-gfn-unaligned": "handle_changed_spte: gfn not aligned to the level",
    "spte-writable-invariants": "check_spte_writable_invariants: W without MMU-writable, or "
                                "MMU-writable without host-writable",
    "nonpresent-to-nonpresent": "handle_changed_spte: a non-present SPTE replaced by another "
                                "non-present value that is neither MMIO nor frozen",
    "nonleaf-to-nonleaf": "handle_changed_spte: a present non-leaf replaced by a non-leaf with "
                          "another pfn",
    # the setters (tdp_mmu.c)
    "set-spte-frozen": "tdp_mmu_set_spte: the old or the new SPTE is frozen",
    "set-spte-atomic-frozen": "tdp_mmu_set_spte_atomic: the iterator yielded or its old SPTE "
                              "is frozen",
    "zap-sp-unlinked": "kvm_tdp_mmu_zap_sp: the table has no present parent entry",
    # the memory cache (virt/kvm/kvm_main.c)
    "cache-capacity-zero": "__kvm_mmu_topup_memory_cache: capacity 0",
    "cache-init-value-gfp-zero": "__kvm_mmu_topup_memory_cache: init_value together with a "
                                 "zero-filling cache",
    "cache-capacity-mismatch": "__kvm_mmu_topup_memory_cache: capacity differs from the first "
                               "top-up's",
    "cache-alloc-empty": "kvm_mmu_memory_cache_alloc: the cache was empty",
}

#: The reasons a memory cache counts (``cache.warnings_by_reason`` has exactly these keys).
CACHE_WARN_REASONS = tuple(r for r in WARN_REASONS if r.startswith("cache-"))


class SpteError(Exception):
    """Root of every error spte_fast raises on purpose."""


class OutOfMemory(SpteError, MemoryError):
    """The page pool could not supply the pages asked for (KVM's -ENOMEM).

    ``completed`` is set by batch entry points: how many items finished
    before the pool ran dry.
    """

    def __init__(self, *args, completed=None):
        super().__init__(*args)
        self.completed = completed


class CacheConfigError(SpteError, ValueError):
    """A memory-cache top-up that KVM refuses with WARN + -EIO."""


class AuditError(SpteError, AssertionError):
    """A broken invariant (also KVM's BUG() cases). ``invariant`` names it.

    ``invariant`` is one of ``AUDIT_INVARIANTS`` (or None for an error raised by hand).
    """

    def __init__(self, *args, invariant=None):
        if invariant is not None and invariant not in AUDIT_INVARIANTS:
            raise ValueError(f"unknown audit invariant {invariant!r}")
        super().__init__(*args)
        self.invariant = invariant
