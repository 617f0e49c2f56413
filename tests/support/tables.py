"""Reading the page tables straight out of pool memory (KVM_MMU_SPEC.md §2.1 geometry,
§2.2 bit 11, §6 items 9/10): raw entries are decoded with the spec's bit positions (bit 11
present, bit 7 / level 1 leaf, bits 12..51 child), not with the implementation's walker or
predicates."""
import numpy as np

from support.spec import BIT_PRESENT, BIT_PS, ENT, child_of, is_leaf, is_present, pages_per, spte_index


def linked_tables(vm):
    """{pool index: (level, base_gfn)} of every table reachable from a root on the VM's
    roots list (``vm.roots``: the valid root and any invalid root a vCPU still holds;
    6.10 kvm->arch.tdp_mmu_roots), found by decoding raw entries (bit 11 present, bit 7 /
    level 1 leaf, bits 12..51 child).  Empty before any vCPU has loaded a root."""
    pages = vm.pool.pages
    found = {}
    stack = [(r[0], vm.root_level, 0) for r in vm.roots]
    while stack:
        table, level, base = stack.pop()
        assert table not in found, f"table {table} linked twice"
        assert 0 <= table < vm.pool.capacity, f"table index {table} outside the pool"
        found[table] = (level, base)
        if level == 1:
            continue
        row = pages[table]
        for i in range(ENT):
            v = int(row[i])
            if is_present(v) and not (v & BIT_PS):
                stack.append((child_of(v), level - 1, base + i * pages_per(level)))
    return found


def entries(vm, tables=None):
    """(table, level, index, gfn, value) of every entry of every linked table."""
    if tables is None:
        tables = linked_tables(vm)
    pages = vm.pool.pages
    for table, (level, base) in sorted(tables.items()):
        row = pages[table]
        for i in range(ENT):
            yield table, level, i, base + i * pages_per(level), int(row[i])


def present_leaves(vm):
    """{gfn: (level, spte)} of every present leaf."""
    out = {}
    for _t, level, _i, gfn, v in entries(vm):
        if is_leaf(v, level):
            out[gfn] = (level, v)
    return out


def table_page(vm, gfn, level):
    """The pool index of the table of `level` covering gfn in the VM's valid root, or None
    (decoded by hand; None too when no valid root exists)."""
    table, lvl = vm.root, vm.root_level
    if table is None:
        return None
    pages = vm.pool.pages
    while lvl > level:
        v = int(pages[table][spte_index(gfn, lvl)])
        if not is_present(v) or (v & BIT_PS) or lvl == 1:
            return None
        table, lvl = child_of(v), lvl - 1
    return table


def page_states(vm):
    return [vm.pool.page_state(i) for i in range(vm.pool.capacity)]


def tables_content(vm):
    """{pool index: bytes} of every linked table (cache pages excluded)."""
    pages = vm.pool.pages
    return {t: pages[t].tobytes() for t in linked_tables(vm)}


def leaf_slots(vm, tables=None):
    """{(table, index): (gfn, level, spte)} of every present leaf (vectorised decode)."""
    if tables is None:
        tables = linked_tables(vm)
    pages = vm.pool.pages
    out = {}
    for table, (level, base) in tables.items():
        row = pages[table]
        present = (row & np.uint64(BIT_PRESENT)) != 0
        if level > 1:
            present &= (row & np.uint64(BIT_PS)) != 0
        for i in np.flatnonzero(present).tolist():
            out[(table, i)] = (base + i * pages_per(level), level, int(row[i]))
    return out


def check_allowed_values(vm, layout, tables=None):
    """Spec §6 items 9/10: a linked table holds only the non-present value, present SPTEs
    (bit 11) and MMIO SPTEs (4K only); never FROZEN at rest; never 0 unless that is the
    non-present value.  Returns the set of kinds seen."""
    if tables is None:
        tables = linked_tables(vm)
    pages = vm.pool.pages
    nonpresent = np.uint64(layout.nonpresent_value)
    kinds = set()
    for table, (level, base) in tables.items():
        row = pages[table]
        assert not (row == np.uint64(layout.frozen_value)).any(), (table, level)
        is_np = row == nonpresent
        is_p = (row & np.uint64(BIT_PRESENT)) != 0
        if is_np.any():
            kinds.add("nonpresent")
        if is_p.any():
            kinds.add("present")
        for i in np.flatnonzero(~(is_np | is_p)).tolist():
            v = int(row[i])
            gfn = base + i * pages_per(level)
            assert layout.is_mmio_spte(v), (gfn, level, hex(v))
            assert level == 1, (gfn, level, hex(v))
            assert v != 0 or layout.nonpresent_value == 0
            kinds.add("mmio")
    return kinds


def assert_pool_accounting(vm):
    """Every pool page is free, cached in a vCPU cache, or a linked table (exactly); none is
    parked (waiting for a grace period) once every thread has left the read side."""
    pool = vm.pool
    cached = sum(v.cache.nobjs for v in vm.vcpus)
    st = vm.stats
    assert st["tables_allocated"] - st["tables_freed"] == st["pt_pages"]
    assert pool.capacity - pool.nr_free == st["pt_pages"] + cached
    states = [pool.page_state(i) for i in range(pool.capacity)]
    assert states.count("table") == st["pt_pages"]
    assert states.count("cached") == cached
    assert states.count("parked") == 0 and states.count("raw") == 0
