"""Source rules of the core that review alone would not keep (STYLE.md §3.5).

1. Only the write primitives store into page-table memory: the atomic/plain store
   helpers of the verbatim C block are called only from `_spte_store`, `_spte_xchg`,
   `_spte_cmpxchg`, `_mc_fill_page`/`fill_pages_kernel` (new pages), the public
   kernels on user arrays and the bench hooks.
2. Engine code never stores into memory through a subscript except into metadata
   arrays (pool states, levels, counters, ...): no `table[i] = ...`.
3. Every engine setter ends in handle_changed_spte.
4. No literal 0 stands for an empty entry: zap paths write the layout's value.
"""
import re
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "spte_fast" / "_core.pyx"

# Which functions may call which store helper.
ALLOWED = {
    "spte_write_once": {"_spte_store", "_bench_plain_rmw"},
    "spte_xchg64": {"_spte_xchg", "_atomic_rmw"},
    "spte_try_cmpxchg64": {"_spte_cmpxchg", "cmpxchg", "_bench_cmpxchg", "_insert"},
    "spte_fetch_or64": {"_atomic_rmw"},
    "spte_fetch_and64": {"_atomic_rmw"},
    "spte_memset64": {"fill_pages_kernel", "_mc_fill_page", "reset", "_insert"},
}

# Subscript stores allowed in engine code: metadata, counters, outputs — never a table.
METADATA = {
    "p.state", "p.level", "p.gfn", "p.pflags", "p.clean", "p.free_stack", "mc.objects",
    "mmu.pool.state", "last", "mc.pool.state", "self.pool.p.state", "self.pool.p.level",
    "self.pool.p.gfn", "self.pool.p.clean", "st.faults", "st.pages", "st.pt_pages", "counts",
    "out", "o", "it.pt_path", "leaves", "tables", "seen", "acc.faults", "acc.pt_pages",
    "acc.pages", "arr", "wrprot", "old", "done", "d", "mmu.parked", "mmu.parked_epoch",
    "mmu.pool.state", "last",
}


def _functions(text):
    """(name, body lines) for every def/cdef function in the file."""
    out = []
    name, body = None, []
    head = re.compile(r"^\s*(?:cdef|cpdef|def)\s+(?:inline\s+)?(?:[\w\*\.\[\], ]+\s+)?"
                      r"\**(\w+)\s*\(")
    for line in text.splitlines():
        m = head.match(line)
        if m and not line.strip().startswith("#") and " class " not in line:
            if name:
                out.append((name, body))
            name, body = m.group(1), []
        elif name:
            body.append(line)
    if name:
        out.append((name, body))
    return out


@pytest.fixture(scope="module")
def source():
    return CORE.read_text()


@pytest.fixture(scope="module")
def functions(source):
    return _functions(source)


def test_parser_finds_the_engine(functions):
    names = {n for n, _ in functions}
    for expected in ("_spte_store", "_spte_cmpxchg", "handle_changed_spte", "_tdp_mmu_map",
                     "_zap_leafs", "kvm_tdp_mmu_page_fault", "handle_removed_pt"):
        assert expected in names


@pytest.mark.parametrize("helper", sorted(ALLOWED))
def test_store_helpers_only_in_write_primitives(functions, helper):
    callers = {name for name, body in functions
               if any(re.search(rf"\b{helper}\s*\(", line) for line in body)}
    assert callers, f"{helper} is not used at all: the rule table is stale"
    assert callers <= ALLOWED[helper], f"{helper} called from {sorted(callers - ALLOWED[helper])}"


def _engine_section(source):
    start = source.index("# Write primitives")
    end = source.index("# Python classes")
    return source[start:end]


def test_no_subscript_store_into_tables_in_engine(source):
    bad = []
    for lineno, line in enumerate(_engine_section(source).splitlines()):
        code = line.split("#")[0]
        m = re.match(r"\s*([\w\.]+)\s*\[[^\]]*\]\s*(\+|-|\|)?=(?!=)", code)
        if m and m.group(1) not in METADATA:
            bad.append(line.strip())
        if re.match(r"\s*\w+\[0\]\s*=", code) and \
                not re.match(r"\s*(wrprot|old|done|last)\[", code):
            bad.append(line.strip())
    assert not bad, "stores into page memory outside the write primitives:\n" + "\n".join(bad)


SETTERS = ["tdp_mmu_set_spte", "tdp_mmu_set_spte_atomic", "tdp_mmu_zap_spte_atomic"]


@pytest.mark.parametrize("setter", SETTERS)
def test_setters_end_in_handle_changed_spte(functions, setter):
    body = dict(functions)[setter]
    code = [l for l in body if l.strip() and not l.strip().startswith(("#", '"""'))]
    calls = [i for i, l in enumerate(code) if "handle_changed_spte(" in l]
    stores = [i for i, l in enumerate(code)
              if re.search(r"_spte_(store|xchg|cmpxchg)\(|_tdp_mmu_write_spte\(|_cas\(", l)]
    assert calls and stores and max(stores) < max(calls)


def test_handle_removed_pt_books_every_frozen_entry(functions):
    body = "\n".join(dict(functions)["handle_removed_pt"])
    assert "handle_changed_spte(" in body and "frozen" in body


def test_zaps_write_the_layouts_nonpresent_value_not_a_literal(source):
    """Spec §6 item 10: the value written back by zaps is the layout's."""
    engine = _engine_section(source)
    assert not re.search(r"set_spte\w*\([^)]*,\s*0\s*\)", engine)
    for fn in ("_zap_leafs", "_zap_root_pass", "_zap_sp"):
        body = engine[engine.index(f"cdef bint {fn}("):]
        body = body[: body.index("\n\n\n")]
        assert "shadow_nonpresent_value" in body, fn
