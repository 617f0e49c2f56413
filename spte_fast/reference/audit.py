"""vm.audit(): check every invariant of the model's state, or raise AuditError naming it.

Linux v6.10 has no single audit of the TDP MMU (``arch/x86/kvm/mmu/mmu_audit.c`` was
removed in 5.15); its invariants are asserted where they matter, in ``tdp_mmu.c``
(``handle_changed_spte``, ``check_spte_writable_invariants``), ``spte.h`` and ``mmu.c``
(the NX huge-page list).  This walks the tables directly (not through the iterator, so a
broken iterator cannot hide a broken table) and raises ``AuditError`` with an
``invariant`` from ``errors.AUDIT_INVARIANTS``.  Spec §6.
"""
from ..errors import AuditError
from .memslots import gfn_to_memslot
from .spte import (PT64_ROOT_MAX_LEVEL, PT_WRITABLE_MASK, SPTE_ENT_PER_PAGE,
                   VMX_EPT_SUPPRESS_VE_BIT, get_mmio_spte_gfn, is_last_spte, is_mmio_spte,
                   is_shadow_present_pte, pages_per_hpage, spte_to_pfn)
from .tdp_iter import kvm_tdp_mmu_read_spte
from .tdp_mmu import PAGE_STAT_KEYS


def _fail(invariant, what, gfn=None, level=None, value=None):
    where = ""
    if gfn is not None:
        where = f" at gfn {gfn:#x} level {level} value {value:#x}"
    raise AuditError(f"{invariant}: {what}{where}", invariant=invariant)


def _describe_sp(sp):
    if sp is None:
        return "none"
    return f"spt {sp.spt} level {sp.role.level} gfn {sp.gfn:#x} ptep {sp.ptep}"


def kvm_mmu_audit(kvm):
    """Check the invariants of API.md; raise AuditError naming the first one broken.

    First the roots (list, reference counts, zapped invalid roots).  Then per entry of
    every table linked below a root on the list, in this order: frozen entries, MMIO SPTEs
    (level, gfn), other non-present values, the EPT suppress-#VE bit, then non-leaf entries
    (encoding, target, the child's kvm_mmu_page) or leaves (level, writable state, slot,
    pfn, read-only slot).  Then the counters, the NX huge-page list and the pool.
    """
    L = kvm.layout
    pool = kvm.pool
    ve = bool(L.present_mask & VMX_EPT_SUPPRESS_VE_BIT)  # EPT with a bit-63 non-present value
    page_counts = dict.fromkeys(PAGE_STAT_KEYS.values(), 0)
    level_counts = dict.fromkeys(range(1, PT64_ROOT_MAX_LEVEL + 1), 0)
    linked = []  # tables reached from the root, in pre-order
    seen = set()

    def visit(table, level, base_gfn, ptep):
        if table in seen:
            _fail("linked-once", f"table {table} is linked more than once", base_gfn, level,
                  table)
        seen.add(table)
        linked.append(table)
        level_counts[level] += 1
        sp = kvm.mmu_pages.get(table)
        if (sp is None or sp.spt != table or sp.role.level != level or sp.gfn != base_gfn
                or sp.ptep != ptep or pool.page_state(table) != "table"):
            _fail("table-metadata", f"table {table} (pool state {pool.page_state(table)!r}) "
                  f"has kvm_mmu_page {_describe_sp(sp)}, expected level {level} gfn "
                  f"{base_gfn:#x} ptep {ptep}", base_gfn, level, table)
        for i in range(SPTE_ENT_PER_PAGE):
            spte = kvm_tdp_mmu_read_spte(pool, (table, i))
            gfn = base_gfn + i * pages_per_hpage(level)
            if spte == L.nonpresent_value:
                continue
            if L.is_frozen_spte(spte):
                _fail("no-frozen-at-rest", "frozen SPTE left in a linked table", gfn, level, spte)
            if is_mmio_spte(kvm, spte):  # current or stale: both are allowed
                if level != 1:
                    _fail("mmio-level", "MMIO SPTE above 4K", gfn, level, spte)
                if get_mmio_spte_gfn(kvm, spte) != gfn:
                    _fail("mmio-gfn", "MMIO SPTE encodes another gfn", gfn, level, spte)
                continue
            if not is_shadow_present_pte(spte):
                _fail("nonpresent-value", "neither the non-present value, a present SPTE "
                      "nor an MMIO SPTE", gfn, level, spte)
            if ve and not spte & VMX_EPT_SUPPRESS_VE_BIT:
                _fail("ept-suppress-ve", "present EPT SPTE without suppress-#VE", gfn, level,
                      spte)
            if is_last_spte(spte, level):
                audit_leaf(spte, gfn, level)
                continue
            child = spte_to_pfn(spte)
            expected = L.make_nonleaf_spte(child, ad_disabled=L.default_ad_disabled)
            if spte != expected:
                _fail("nonleaf-encoding", f"non-leaf is not {expected:#x}", gfn, level, spte)
            if child >= pool.capacity:
                _fail("nonleaf-target", "non-leaf points outside the pool", gfn, level, spte)
            visit(child, level - 1, gfn, (table, i))

    def audit_leaf(spte, gfn, level):
        if level > kvm.max_level:
            _fail("leaf-level", f"leaf above max_level {kvm.max_level}", gfn, level, spte)
        if not L._writable_state_ok(spte):
            _fail("writable-state", "MMU-writable without Host-writable, or W without "
                  "MMU-writable", gfn, level, spte)
        slot = gfn_to_memslot(kvm, gfn)
        if slot is None or gfn + pages_per_hpage(level) > slot.base_gfn + slot.npages:
            _fail("leaf-in-slot", "leaf maps gfns outside every memslot", gfn, level, spte)
        if spte_to_pfn(spte) != slot.gfn_to_pfn(gfn):
            _fail("leaf-pfn", f"leaf pfn is not the slot's pfn {slot.gfn_to_pfn(gfn):#x}",
                  gfn, level, spte)
        if slot.readonly and spte & (PT_WRITABLE_MASK | L.host_writable_mask):
            _fail("readonly-slot", "writable or host-writable leaf in a read-only memslot",
                  gfn, level, spte)
        page_counts[PAGE_STAT_KEYS[level]] += 1

    _audit_roots(kvm)
    for root in kvm.tdp_mmu_roots:
        visit(root.spt, root.role.level, 0, None)

    stat = kvm.stat
    for key, found in page_counts.items():
        if stat[key] != found:
            _fail("page-stats", f"{key} is {stat[key]}, {found} leaves found")
    for level, found in level_counts.items():
        if stat[f"pt_pages_l{level}"] != found:
            _fail("pt-pages", f"pt_pages_l{level} is {stat[f'pt_pages_l{level}']}, "
                  f"{found} tables found")
    if stat["pt_pages"] != len(linked):
        _fail("pt-pages", f"pt_pages is {stat['pt_pages']}, {len(linked)} tables found")
    if stat["tables_allocated"] - stat["tables_freed"] != len(linked):
        _fail("table-accounting", f"tables_allocated {stat['tables_allocated']} - "
              f"tables_freed {stat['tables_freed']} != {len(linked)} tables linked")
    _audit_nx_huge_pages(kvm, linked)
    _audit_pool(kvm, linked, seen)


def _audit_roots(kvm):
    """The roots list: each root once, at most one valid; every vCPU's root on it; each
    root's refcount is one per vCPU using it plus the MMU's while valid (and never 0 on
    the list); an invalid root no longer scheduled to zap holds only non-present
    entries."""
    roots = kvm.tdp_mmu_roots
    if len({id(root) for root in roots}) != len(roots):
        _fail("roots", "a root is on the list twice")
    valid = [root.spt for root in roots if not root.role.invalid]
    if len(valid) > 1:
        _fail("roots", f"more than one valid root: {valid}")
    on_list = {id(root) for root in roots}
    for n, vcpu in enumerate(kvm.vcpus):
        if vcpu.root is not None and id(vcpu.root) not in on_list:
            _fail("roots", f"vCPU {n}'s root {vcpu.root.spt} is not on the roots list")
    nonpresent = kvm.layout.nonpresent_value
    for root in roots:
        users = sum(1 for vcpu in kvm.vcpus if vcpu.root is root)
        expected = (0 if root.role.invalid else 1) + users
        if root.tdp_mmu_root_count != expected or root.tdp_mmu_root_count < 1:
            _fail("roots", f"root {root.spt} (invalid {root.role.invalid}) has refcount "
                  f"{root.tdp_mmu_root_count}, {users} vCPUs use it")
        if root.role.invalid and not root.tdp_mmu_scheduled_root_to_zap:
            for i in range(SPTE_ENT_PER_PAGE):
                spte = kvm_tdp_mmu_read_spte(kvm.pool, (root.spt, i))
                if spte != nonpresent:
                    _fail("roots", f"invalid root {root.spt} was zapped but holds entry {i}",
                          i * pages_per_hpage(root.role.level), root.role.level, spte)


def _audit_nx_huge_pages(kvm, linked):
    """The list holds each tracked linked table once, nothing else; its length is
    nx_lpage_splits; every listed table is nx_huge_page_disallowed."""
    listed = kvm.possible_nx_huge_pages
    tracked = [kvm.mmu_pages[t] for t in linked if kvm.mmu_pages[t].possible_nx_huge_page_linked]
    if len({id(sp) for sp in listed}) != len(listed):
        _fail("nx-huge-pages", "a table is on the possible-NX-huge-page list twice")
    if {id(sp) for sp in listed} != {id(sp) for sp in tracked}:
        _fail("nx-huge-pages", f"the possible-NX-huge-page list {[sp.spt for sp in listed]} "
              f"is not the tracked linked tables {[sp.spt for sp in tracked]}")
    if len(listed) != kvm.stat["nx_lpage_splits"]:
        _fail("nx-huge-pages", f"nx_lpage_splits is {kvm.stat['nx_lpage_splits']}, the list "
              f"holds {len(listed)} tables")
    for sp in listed:
        if not sp.nx_huge_page_disallowed:
            _fail("nx-huge-pages", f"listed table {sp.spt} is not nx_huge_page_disallowed")


def _audit_pool(kvm, linked, seen):
    """Every pool page is exactly one of: free, cached in one vCPU cache, linked once; and
    its page_state agrees.  No kvm_mmu_page outlives its link."""
    pool = kvm.pool
    unlinked = sorted(set(kvm.mmu_pages) - seen)
    if unlinked:
        _fail("pool-accounting", f"tables with a kvm_mmu_page that are not linked: "
              f"{unlinked[:8]}")
    owner = {}
    holders = [("free", "free", pool._free_pages()), ("linked", "table", linked)]
    holders += [(f"cached in vCPU {n}", "cached", vcpu.cache.objects)
                for n, vcpu in enumerate(kvm.vcpus)]
    for name, state, pages in holders:
        for page in pages:
            if page in owner:
                _fail("pool-accounting", f"page {page} is both {owner[page]} and {name}")
            owner[page] = name
            if pool.page_state(page) != state:
                _fail("pool-accounting", f"page {page} is {name} but its state is "
                      f"{pool.page_state(page)!r}")
    missing = [page for page in range(pool.capacity) if page not in owner]
    if missing:
        _fail("pool-accounting", f"pages neither free, cached nor linked: {missing[:8]}")
