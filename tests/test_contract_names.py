"""The two vocabularies both implementations share (spte_fast.errors, docs/API.md).

``AuditError.invariant`` names and warning reasons are part of the contract: a failure or a
warning reads the same whichever implementation produced it.  The name lists are pinned
here (renaming one is a contract change), both implementations' sources are held to them,
and the warnings that the public API can provoke are checked by reason on both.
"""
import re
from pathlib import Path

import pytest

from spte_fast import errors

PKG = Path(errors.__file__).resolve().parent

PINNED_INVARIANTS = [
    "present-leaf-pfn-change", "nonpresent-value", "no-frozen-at-rest", "mmio-level",
    "mmio-gfn", "ept-suppress-ve", "nonleaf-encoding", "nonleaf-target", "linked-once",
    "table-metadata", "leaf-level", "writable-state", "leaf-in-slot", "leaf-pfn",
    "readonly-slot", "page-stats", "pt-pages", "table-accounting", "nx-huge-pages",
    "roots",  # issue 10: roots on kvm->arch.tdp_mmu_roots with reference counts
    "pool-accounting",
]
PINNED_WARN_REASONS = [
    "spte-level", "spte-gfn-unaligned", "spte-writable-invariants", "nonpresent-to-nonpresent",
    "nonleaf-to-nonleaf", "set-spte-frozen", "set-spte-atomic-frozen", "zap-sp-unlinked",
    "cache-capacity-zero", "cache-init-value-gfp-zero", "cache-capacity-mismatch",
    "cache-alloc-empty",
]


def test_the_vocabularies_are_pinned():
    assert list(errors.AUDIT_INVARIANTS) == PINNED_INVARIANTS
    assert list(errors.WARN_REASONS) == PINNED_WARN_REASONS
    assert errors.CACHE_WARN_REASONS == tuple(r for r in PINNED_WARN_REASONS
                                              if r.startswith("cache-"))


def test_audit_error_refuses_an_unknown_invariant():
    assert errors.AuditError("x", invariant="leaf-pfn").invariant == "leaf-pfn"
    with pytest.raises(ValueError, match="unknown audit invariant"):
        errors.AuditError("x", invariant="pool-pages")


_RAISED = re.compile(r"""(?<![\w.])(?:_audit_fail(?:_at)?|_?fail)\(\s*["']([a-z0-9-]+)["']|"""
                     r"""invariant\s*=\s*["']([a-z0-9-]+)["']""")


def _names_raised(paths):
    found = set()
    for path in paths:
        for m in _RAISED.finditer(path.read_text()):
            found.add(m.group(1) or m.group(2))
    return found


@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_each_implementation_checks_every_invariant_by_its_name(impl):
    paths = sorted((PKG / "core").glob("*.pxi")) if impl == "fast" else \
        sorted((PKG / "reference").glob("*.py"))
    names = _names_raised(paths)
    assert names, "no AuditError found: the scan is stale"
    assert names <= set(PINNED_INVARIANTS), f"unknown names: {sorted(names - set(PINNED_INVARIANTS))}"
    assert set(PINNED_INVARIANTS) <= names, \
        f"never checked: {sorted(set(PINNED_INVARIANTS) - names)}"


def test_every_warning_reason_has_a_key_and_starts_at_zero(impl):
    vm = impl.Vm(impl.SpteLayout.ept(), max_pt_pages=64)
    assert vm.warnings_by_reason == dict.fromkeys(PINNED_WARN_REASONS, 0)
    cache = impl.MemoryCache(impl.PagePool(8), init_value=1 << 63)
    assert cache.warnings_by_reason == dict.fromkeys(errors.CACHE_WARN_REASONS, 0)


@pytest.mark.parametrize("reason, provoke", [
    # __kvm_mmu_topup_memory_cache (virt/kvm/kvm_main.c, 6.10): WARN_ON_ONCE(!capacity)
    ("cache-capacity-zero", lambda sf, c: c.topup(1, capacity=0)),
    # WARN_ON_ONCE(mc->init_value && (mc->kmem_cache || mc->gfp_zero))
    ("cache-init-value-gfp-zero", None),
    # WARN_ON_ONCE(mc->capacity != capacity)
    ("cache-capacity-mismatch", lambda sf, c: (c.topup(1, capacity=4), c.topup(9, capacity=5))),
    # kvm_mmu_memory_cache_alloc: WARN_ON(!mc->nobjs) before the direct allocation
    ("cache-alloc-empty", lambda sf, c: c.alloc()),
])
def test_cache_warnings_are_counted_by_reason(impl, reason, provoke):
    pool = impl.PagePool(16)
    if provoke is None:
        cache = impl.MemoryCache(pool, init_value=1 << 63, gfp_zero=True)
        provoke = lambda sf, c: c.topup(1)          # noqa: E731
    else:
        cache = impl.MemoryCache(pool, init_value=1 << 63)
    try:
        provoke(impl, cache)
    except impl.CacheConfigError:
        pass
    expected = dict.fromkeys(errors.CACHE_WARN_REASONS, 0)
    expected[reason] = 1
    assert cache.warnings_by_reason == expected
    assert cache.warnings == 1 == cache.stats["warnings"]


def test_vm_warnings_add_up_the_vcpu_caches(impl):
    vm = impl.Vm(impl.SpteLayout.ept(), max_pt_pages=64)
    v1, v2 = vm.vcpu(), vm.vcpu()
    v1.cache.alloc()                                 # an empty cache: one warning each
    v2.cache.alloc()
    by_reason = vm.warnings_by_reason
    assert by_reason["cache-alloc-empty"] == 2
    assert sum(by_reason.values()) == 2 == vm.stats["warnings"]
