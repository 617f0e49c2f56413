"""Source rules of the core that review alone would not keep (STYLE.md §3.5, DESIGN.md).

The engine is spte_fast/core/*.pxi, included into one extension; spte_fast/_bench.pyx is a
second module that cimports it.

1. Only the write primitives store into page-table memory: the store helpers of
   include/spte_atomic.h and the memset64 fill are called only from
   ``__kvm_tdp_mmu_write_spte``, ``kvm_tdp_mmu_write_spte_atomic``, ``tdp_try_cmpxchg64``,
   ``fill_pages_kernel`` (pages no table links yet), the public kernels on user arrays, the
   bench hooks on their own arrays, and ``hw_set_ad_bits`` (core/hw.pxi): the CPU's own
   locked OR of A/D into a leaf during the hardware walk (issue 10 contract, access()
   step 2: no handle_changed_spte -- it is the hardware, not KVM, that writes).
2. Engine code never stores through a subscript except into metadata arrays and outputs.
3. Every setter ends in handle_changed_spte.
4. No literal 0 stands for an empty entry: zap paths write the layout's value.
5. Only the kvm_mmu_page helpers (core/mmu_page.pxi) write a kvm_mmu_page or move a page
   into or out of the table states.

Each rule's checker is also run on a small source that breaks it, so a checker that
silently matches nothing fails here too.
"""
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "spte_fast"
CORE = sorted((PKG / "core").glob("*.pxi"))
BENCH = PKG / "_bench.pyx"
MMU_PAGE = "mmu_page.pxi"

# Which functions may call which store helper.
ALLOWED = {
    "spte_store_relaxed": {"__kvm_tdp_mmu_write_spte", "_rmw_loop"},
    "spte_xchg_seq_cst": {"kvm_tdp_mmu_write_spte_atomic", "_atomic_rmw"},
    "spte_try_cmpxchg_seq_cst": {"tdp_try_cmpxchg64", "cmpxchg", "_rmw_loop", "_insert"},
    "spte_fetch_or_seq_cst": {"_atomic_rmw", "hw_set_ad_bits"},
    # bare_clear_dirty: _bench.pyx's bare-C baseline for clearing a dirty log (bench only)
    "spte_fetch_and_seq_cst": {"_atomic_rmw", "tdp_mmu_clear_spte_bits", "bare_clear_dirty"},
    "spte_memset64": {"fill_pages_kernel", "reset", "_insert"},
    "fill_pages_kernel": {"mmu_memory_cache_init_page", "fill_pages", "fill_repeat"},
}

# Subscript stores allowed in engine code: metadata, counters, outputs -- never a table.
METADATA = {
    "p.state", "p.clean", "p.free_stack", "mc.objects", "mc.pool.state", "mc.warn",
    "kvm.pool.state", "kvm.pool.clean", "kvm.rcu_pending", "kvm.rcu_pending_seq",
    "kvm.rcu_reader_seq", "self.kvm.rcu_reader_seq", "st.faults", "st.pages", "st.pt_pages",
    "st.warn", "vcpu.stat.faults", "vcpu.stat.pages", "counts", "out", "o", "flags", "seen",
    "leaves", "tables", "acc.faults", "acc.pt_pages", "acc.pages", "acc.warn", "wrprot",
    "link", "size", "dims", "d", "done", "it.pt_path", "c.cache_warn",
    "kvm.hw_need", "kvm.hw_forbid", "kvm.hw_hit_need", "kvm.hw_hit_check", "ad",
    "leaf_present",  # hw_tdp_walk's output flag
    "last",  # hw_walk_last's output: the entry the walk stopped at (a copy)
    "kvm.roots",  # kvm->arch.tdp_mmu_roots: pool indices of the roots
    "slots",  # a new memslot array being built (kvm_main.pxi move)
    "levels",  # tdp_mmu_zap_root's local list of zap levels
    "kvm.leaf_4k_template",  # make_spte's precomputed 4K leaves (per host_writable)
    "vcpu.pml_buf",  # the vCPU's page-modification log (gfns, not SPTEs)
    # guest memory (core/guest_memory.pxi): the hash of host pages and the guest's words
    "g.keys", "g.pages", "new_keys", "new_pages", "words_",
    # the two-dimensional walk (core/guest_walk.pxi): its output, counts and the guest
    # entries it read (locals)
    "pfn", "w.counts", "pfns", "idx", "ptes", "guest_faults",
    "vcpu.gm_pfn", "vcpu.gm_page",  # the vCPU's cache of guest-memory page pointers
}

_HEAD = re.compile(r"^\s*(?:cdef|cpdef|def)\s+(?:inline\s+)?(?:[\w\*\.\[\], ]+\s+)?"
                   r"\**(\w+)\s*\((.*)")


def functions(text):
    """(name, signature + body lines) for every def/cdef function of a source text."""
    out, name, body = [], None, []
    for line in text.splitlines():
        m = _HEAD.match(line)
        if m and not line.strip().startswith("#") and " class " not in line:
            if name:
                out.append((name, body))
            name, body = m.group(1), [m.group(2)]
        elif name:
            body.append(line)
    if name:
        out.append((name, body))
    return out


def _code(line):
    return line.split("#")[0]


def helper_callers(funcs, helper):
    return {name for name, body in funcs
            if any(re.search(rf"(?<![\w.]){helper}\s*\(", _code(line)) for line in body)}


def subscript_stores(text):
    """Lines storing through ``x[...] =`` into something that is not metadata."""
    bad = []
    for line in text.splitlines():
        code = _code(line)
        m = re.match(r"\s*([\w\.]+)\s*\[[^\]]*\]\s*(\+|-|\|)?=(?!=)", code)
        if m and m.group(1) not in METADATA:
            bad.append(line.strip())
    return bad


_SP_FIELDS = r"(?:spt|ptep|gfn|level|nx_huge_page_disallowed|nx_linked|nx_prev|nx_next)"


def kvm_mmu_page_writes(text):
    """Lines that write a kvm_mmu_page field, or put a page into or out of a table state."""
    bad = []
    for name, body in functions(text):
        sp_vars = set()
        for line in body:
            sp_vars |= set(re.findall(r"kvm_mmu_page_t\s*\*\s*(\w+)", _code(line)))
        for line in body:
            code = _code(line)
            lhs = re.match(r"\s*(.+?)\s*(?:\+|-|\|)?(?<![!<>=])=(?!=)", code)
            if not lhs or "==" in lhs.group(1) or lhs.group(1).lstrip().startswith(
                    ("cdef ", "if ", "elif ", "while ", "return ")):
                continue
            target = lhs.group(1)
            if re.search(r"\.sp\[|pool_sp\(|spte_to_child_sp\(", target) or \
                    any(re.match(rf"{v}\.{_SP_FIELDS}\b", target) for v in sp_vars):
                bad.append(f"{name}: {line.strip()}")
            if re.search(r"state\[[^\]]*\]", target) and \
                    re.search(r"=\s*(PAGE_TABLE|PAGE_PARKED)\b", code):
                bad.append(f"{name}: {line.strip()}")
    return bad


@pytest.fixture(scope="module")
def sources():
    return {p.name: p.read_text() for p in CORE}


@pytest.fixture(scope="module")
def funcs(sources):
    out = []
    for text in sources.values():
        out += functions(text)
    return out + functions(BENCH.read_text())


def test_the_parser_finds_the_engine(funcs):
    names = {n for n, _ in funcs}
    for expected in ("__kvm_tdp_mmu_write_spte", "tdp_try_cmpxchg64", "handle_changed_spte",
                     "kvm_tdp_mmu_map", "tdp_mmu_zap_leafs", "kvm_tdp_mmu_page_fault",
                     "handle_removed_pt", "tdp_mmu_init_sp", "fill_repeat"):
        assert expected in names


@pytest.mark.parametrize("helper", sorted(ALLOWED))
def test_store_helpers_only_in_write_primitives(funcs, helper):
    callers = helper_callers(funcs, helper)
    assert callers, f"{helper} is not used at all: the rule table is stale"
    assert callers <= ALLOWED[helper], f"{helper} called from {sorted(callers - ALLOWED[helper])}"


def test_store_helper_rule_catches_a_stray_store():
    src = "cdef void zap_it(tdp_ptep_t p) noexcept nogil:\n    spte_store_relaxed(p, 0)\n"
    assert helper_callers(functions(src), "spte_store_relaxed") == {"zap_it"}


def test_no_subscript_store_into_tables_in_engine(sources):
    bad = []
    for name, text in sources.items():
        if name in ("api.pxi", "boundary.pxi"):      # Python-facing: user arrays, outputs
            continue
        bad += [f"{name}: {line}" for line in subscript_stores(text)]
    assert not bad, "stores into page memory outside the write primitives:\n" + "\n".join(bad)


def test_subscript_rule_catches_a_table_store():
    assert subscript_stores("    table[i] = new_spte\n    st.pages[1] += 1\n") == \
        ["table[i] = new_spte"]


SETTERS = ["tdp_mmu_set_spte", "tdp_mmu_set_spte_atomic", "tdp_mmu_zap_spte_atomic"]


@pytest.mark.parametrize("setter", SETTERS)
def test_setters_end_in_handle_changed_spte(funcs, setter):
    body = dict(funcs)[setter]
    code = [l for l in body if l.strip() and not l.strip().startswith(("#", '"""'))]
    calls = [i for i, l in enumerate(code) if "handle_changed_spte(" in l]
    stores = [i for i, l in enumerate(code)
              if re.search(r"__kvm_tdp_mmu_write_spte\(|kvm_tdp_mmu_write_spte\(|"
                           r"__tdp_mmu_set_spte_atomic\(", l)]
    assert calls and stores and max(stores) < max(calls)


def test_handle_removed_pt_books_every_frozen_entry(funcs):
    body = "\n".join(dict(funcs)["handle_removed_pt"])
    assert "handle_changed_spte(" in body and "frozen" in body


def test_zaps_write_the_layouts_nonpresent_value_not_a_literal(sources, funcs):
    """KVM_MMU_SPEC §6 item 10: the value written back by zaps is the layout's."""
    engine = sources["tdp_mmu.pxi"]
    assert not re.search(r"set_spte\w*\([^)]*,\s*0\s*\)", engine)
    for fn in ("tdp_mmu_zap_leafs", "__tdp_mmu_zap_root", "kvm_tdp_mmu_zap_sp",
               "tdp_mmu_zap_spte_atomic"):
        assert "shadow_nonpresent_value" in "\n".join(dict(funcs)[fn]), fn


def test_only_the_kvm_mmu_page_helpers_write_table_metadata(sources):
    bad = []
    for name, text in sources.items():
        if name != MMU_PAGE:
            bad += [f"{name}: {line}" for line in kvm_mmu_page_writes(text)]
    assert not bad, "kvm_mmu_page metadata written outside core/mmu_page.pxi:\n" + \
        "\n".join(bad)


def test_the_kvm_mmu_page_helpers_do_write_it(sources):
    """The rule's other half: the helpers are where the writes are (else it is stale)."""
    found = kvm_mmu_page_writes(sources[MMU_PAGE])
    for helper in ("tdp_mmu_init_sp", "track_possible_nx_huge_page", "tdp_mmu_unlink_sp",
                   "call_rcu_free_sp"):
        assert any(line.startswith(helper + ":") for line in found), helper


def test_kvm_mmu_page_rule_catches_stray_writes():
    src = ("cdef void map_it(kvm_t* kvm, int64_t i) noexcept nogil:\n"
           "    cdef kvm_mmu_page_t* sp = pool_sp(kvm.pool, i)\n"
           "    sp.level = 2\n"
           "    kvm.pool.sp[i].gfn = 0\n"
           "    kvm.pool.state[i] = PAGE_TABLE\n"
           "    it.level = 3\n")
    assert len(kvm_mmu_page_writes(src)) == 3


# -- the shape of the tree (issue-independent: the layout DESIGN.md describes) ---------------

def test_core_pyx_is_only_the_list_of_its_parts():
    text = (PKG / "_core.pyx").read_text()
    body = text.split('"""', 2)[2]                      # after the module docstring
    code = [_code(line).strip() for line in body.splitlines() if _code(line).strip()]
    assert code[0] == "cimport cython"
    includes = [line for line in code[1:]]
    assert all(re.fullmatch(r'include "core/\w+\.pxi"', line) for line in includes), includes
    assert {re.search(r"core/(\w+\.pxi)", l).group(1) for l in includes} == {p.name for p in CORE}


@pytest.mark.parametrize("path", sorted(p for p in PKG.rglob("*.p[yx]*")
                                         if p.suffix in (".py", ".pyx", ".pxd", ".pxi", ".pyi")),
                         ids=lambda p: str(p.relative_to(PKG)))
def test_no_source_file_grows_past_a_thousand_lines(path):
    assert len(path.read_text().splitlines()) <= 1000


def test_only_the_iterator_moves_an_iterator(funcs):
    """kvm_tdp_mmu_map reads as KVM's loop: an iterator's level and gfn are set only by
    the functions of core/tdp_iter.pxi (start, start_at, next, resume, seek, walk_down)."""
    iter_funcs = {n for n, _ in functions((PKG / "core" / "tdp_iter.pxi").read_text())}
    bad = [f"{name}: {line.strip()}" for name, body in funcs if name not in iter_funcs
           for line in body if re.match(r"\s*it\.(level|gfn|sptep|pt_path)\b[^=]*=(?!=)",
                                        _code(line))]
    assert not bad, "\n".join(bad)


def test_the_fault_record_flows_from_the_entry_to_the_map(funcs):
    """struct kvm_page_fault is what the fault path passes (mmu.c / tdp_mmu.c signatures)."""
    sigs = {name: body[0] for name, body in funcs}
    for fn in ("kvm_tdp_mmu_page_fault", "fast_page_fault", "kvm_faultin_pfn",
               "kvm_mmu_hugepage_adjust", "disallowed_hugepage_adjust", "kvm_tdp_mmu_map",
               "tdp_mmu_map_handle_target_level"):
        assert "kvm_page_fault_t* fault" in sigs[fn], fn
    assert "kvm_page_fault_t fault" in "\n".join(dict(funcs)["kvm_mmu_do_page_fault"])
