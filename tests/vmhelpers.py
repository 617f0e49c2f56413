"""Helpers shared by the TDP MMU engine tests (test_engine.py, test_engine_invariants.py,
test_differential_vm.py).

Everything here is derived from docs/API.md and KVM_MMU_SPEC.md (§2.1 geometry, §2.5
constructors), never from running the code under test: the table walk decodes raw pool
memory with the spec's bit positions, not with the implementation's predicates.
"""
import threading

import numpy as np

NP63 = 1 << 63
POISON = 0xAAAA_AAAA_AAAA_AAAA
ACC_ALL = 7
ENT = 512
PAGES_2M = 512
PAGES_1G = 512 * 512
PFN_LIMIT = 1 << 40

BIT_PRESENT = 1 << 11  # SPTE_MMU_PRESENT_MASK: the only bit is_shadow_present_pte tests
BIT_PS = 1 << 7  # PT_PAGE_SIZE_MASK
BIT_AD_DISABLED = 1 << 52  # SPTE_TDP_AD_DISABLED
ADDR_MASK = ((1 << 52) - 1) & ~0xFFF  # SPTE_BASE_ADDR_MASK
W_BIT = 1 << 1

#: layout kinds used for parametrisation: EPT with A/D, EPT without A/D, EPT exec-only, NPT
LAYOUT_KINDS = ("ept_ad", "ept_noad", "ept_xo", "npt")
NONPRESENT_VALUES = (NP63, 0)

PF_FIXED, PF_SPURIOUS, PF_RETRY, PF_EMULATE = 4, 5, 1, 2


def make_layout(impl, kind="ept_ad", nonpresent=NP63):
    if kind == "ept_ad":
        return impl.SpteLayout.ept(ad=True, nonpresent_value=nonpresent)
    if kind == "ept_noad":
        return impl.SpteLayout.ept(ad=False, nonpresent_value=nonpresent)
    if kind == "ept_xo":
        return impl.SpteLayout.ept(ad=True, exec_only=True, nonpresent_value=nonpresent)
    if kind == "npt":
        return impl.SpteLayout.npt(nonpresent_value=nonpresent)
    raise ValueError(kind)


def make_vm(impl, kind="ept_ad", nonpresent=NP63, **kwargs):
    kwargs.setdefault("max_pt_pages", 256)
    layout = make_layout(impl, kind, nonpresent)
    return impl.Vm(layout, **kwargs), layout


def gfn_width(root_level):
    """Exclusive bound on gfns: 48-bit GPA for 4 levels, 57-bit for 5 (API.md)."""
    return 1 << (9 * root_level)


def pages_per(level):
    """KVM_PAGES_PER_HPAGE."""
    return 1 << (9 * (level - 1))


def round_gfn(gfn, level):
    """gfn_round_for_level."""
    return gfn & ~(pages_per(level) - 1)


def spte_index(gfn, level):
    return (gfn >> (9 * (level - 1))) & 511


def child_of(spte):
    return (spte & ADDR_MASK) >> 12


def is_present(spte):
    return bool(spte & BIT_PRESENT)


def is_leaf(spte, level):
    return is_present(spte) and (level == 1 or bool(spte & BIT_PS))


def leaf_spte(layout, pfn, level=1, readonly=False, nx=False, old=None):
    """The leaf the fault path installs (API.md fault semantics item 7)."""
    return layout.make_spte(pfn, level, ACC_ALL, host_writable=not readonly,
                            nx_huge_pages=nx, old_spte=old)[1]


def expected_nonleaf(layout, child):
    """make_nonleaf_spte from the spec formula (KVM_MMU_SPEC §2.5, API.md), built from the
    layout's masks rather than from the implementation's constructor."""
    ad = BIT_AD_DISABLED if layout.default_ad_disabled else layout.accessed_mask
    return (BIT_PRESENT | (child << 12) | layout.present_mask | W_BIT | layout.user_mask
            | layout.x_mask | ad)


# --------------------------------------------------------------------------------------------
# Reading the page tables straight out of pool memory
# --------------------------------------------------------------------------------------------


def linked_tables(vm):
    """{pool index: (level, base_gfn)} of every table reachable from the root, found by
    decoding raw entries (bit 11 present, bit 7 / level 1 leaf, bits 12..51 child)."""
    pages = vm.pool.pages
    found = {}
    stack = [(vm.root, vm.root_level, 0)]
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
    """The pool index of the table of `level` covering gfn, or None (decoded by hand)."""
    table, lvl = vm.root, vm.root_level
    pages = vm.pool.pages
    while lvl > level:
        v = int(pages[table][spte_index(gfn, lvl)])
        if not is_present(v) or (v & BIT_PS) or lvl == 1:
            return None
        table, lvl = child_of(v), lvl - 1
    return table


def page_states(vm):
    return [vm.pool.page_state(i) for i in range(vm.pool.capacity)]


def snapshot(vm, vcpus=()):
    """Everything observable about a VM (for "nothing changed" checks)."""
    return dict(
        stats=dict(vm.stats),
        memslots=list(vm.memslots),
        generation=vm.mmio_generation,
        states=page_states(vm),
        caches=[tuple(v.cache.objects) for v in vcpus],
        pages=vm.pool.pages.copy(),
    )


def assert_same_snapshot(before, after):
    pages_b, pages_a = before.pop("pages"), after.pop("pages")
    assert after == before
    assert np.array_equal(pages_a, pages_b)


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


def run_threads(targets, timeout=60):
    """Start every target at once (barrier), join; returns [(result, exception)] in order."""
    barrier = threading.Barrier(len(targets))
    results = [None] * len(targets)

    def wrap(i, fn):
        def run():
            try:
                barrier.wait(timeout=timeout)
                results[i] = (fn(), None)
            except BaseException as e:  # noqa: BLE001 - returned to the test
                results[i] = (None, e)
        return run

    threads = [threading.Thread(target=wrap(i, fn)) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
        assert not t.is_alive(), "a thread did not finish (deadlock?)"
    return results
