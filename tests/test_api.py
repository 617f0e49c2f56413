"""The package boundary: the exported names and error classes, and argument checking at the
``Vm`` / ``Vcpu`` boundary, on both implementations (docs/API.md preamble, "Errors",
"Vm, Vcpu"; STYLE.md §3.7 build-shape tests).

docs/API.md: integer arguments must be Python ``int``s or numpy integer scalars (``bool``
is an int); anything else, also an object that merely has ``__index__``, is a
``TypeError``; values outside their range raise ``ValueError``; both before anything
changes.  Array arguments must be numpy arrays.  The boundary checks of the lower layers
live with their layer (test_spte.py, test_kernels.py, test_pool.py, test_mmu_cache.py,
test_memslots.py).
"""
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import spte_fast.errors as errors_mod
from support.layouts import leaf_spte, load_root, make_vm, refuse_blank_layout, vm_4k
from support.snapshots import assert_same_snapshot, snapshot
from support.spec import API_CONSTANTS as CONSTANTS
from support.spec import NP63, PF_EMULATE, PF_FIXED, PF_SPURIOUS, PFN0


#: the public names API.md promises besides the constants
API_NAMES = (
    "PF",
    "SpteError",
    "OutOfMemory",
    "CacheConfigError",
    "AuditError",
    "SpteLayout",
    "fill_pages",
    "scan_present",
    "count_present",
    "cmpxchg",
    "xchg",
    "atomic_or",
    "atomic_and_not",
    "PagePool",
    "MemoryCache",
)


# ==========================================================================================
# Errors (API.md "Errors")
# ==========================================================================================


def test_error_hierarchy(impl):
    assert issubclass(impl.SpteError, Exception)
    assert issubclass(impl.OutOfMemory, impl.SpteError)
    assert issubclass(impl.OutOfMemory, MemoryError)
    assert issubclass(impl.CacheConfigError, impl.SpteError)
    assert issubclass(impl.CacheConfigError, ValueError)
    assert issubclass(impl.AuditError, impl.SpteError)
    assert issubclass(impl.AuditError, AssertionError)


def test_errors_are_the_shared_classes(impl):
    """Both implementations raise the classes of ``spte_fast.errors``, so a caller's
    ``except spte_fast.OutOfMemory`` catches the reference model's errors too."""
    for name in ("SpteError", "OutOfMemory", "CacheConfigError", "AuditError"):
        assert getattr(impl, name) is getattr(errors_mod, name)


def test_error_payloads(impl):
    e = impl.OutOfMemory("pool empty", completed=3)
    assert e.completed == 3 and "pool empty" in str(e)
    assert impl.OutOfMemory("x").completed is None
    a = impl.AuditError("gfn 0x10 level 1 value 0x0", invariant="nonpresent-value")
    assert a.invariant == "nonpresent-value"
    with pytest.raises(MemoryError):
        raise impl.OutOfMemory("x")
    with pytest.raises(ValueError):
        raise impl.CacheConfigError("x")


# ==========================================================================================
# Build shape (STYLE.md §3.7)
# ==========================================================================================


def test_every_name_in_all_exists(impl):
    assert len(impl.__all__) == len(set(impl.__all__)), "duplicates in __all__"
    missing = [n for n in impl.__all__ if not hasattr(impl, n)]
    assert missing == []


def test_all_lists_the_documented_names(impl):
    names = set(impl.__all__)
    assert set(CONSTANTS) <= names
    assert set(API_NAMES) <= names


def test_import_spte_fast_exposes_exactly_all(fast):
    """Every public, non-module attribute of ``spte_fast`` is in ``__all__`` and
    every name of ``__all__`` exists (STYLE.md §3.7 build-shape test)."""
    public = {
        n
        for n in dir(fast)
        if not n.startswith("_") and not isinstance(getattr(fast, n), types.ModuleType)
    }
    assert public == set(fast.__all__)
    assert hasattr(fast, "__version__")


def test_star_import_gives_all(fast):
    ns = {}
    exec("from spte_fast import *", ns)
    ns.pop("__builtins__")
    assert set(ns) == set(fast.__all__)


def test_reference_exports_the_same_public_names_as_fast(fast, reference):
    """API.md: "Both modules export the same names" (get_include, the embedders' build
    helper, is the engine's alone: the oracle has no C to build against; GuestPageTables is
    guest code on the public Vm API, not part of either model, and serves both from
    spte_fast)."""
    assert set(reference.__all__) == set(fast.__all__) - {"get_include", "GuestPageTables"}
    assert os.path.isdir(fast.get_include())


def test_reference_is_not_imported_by_the_package():
    """STYLE.md §3.1: reference.py is never imported by ``__init__``."""
    code = "import sys, spte_fast; print('spte_fast.reference' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ==========================================================================================
# Vm construction
# ==========================================================================================


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"root_level": 3}, ValueError),
        ({"root_level": 6}, ValueError),
        ({"root_level": 0}, ValueError),
        ({"root_level": -4}, ValueError),
        ({"root_level": 4.0}, TypeError),
        ({"root_level": "4"}, TypeError),
        ({"max_level": 0}, ValueError),
        ({"max_level": 4}, ValueError),
        ({"max_level": 2.0}, TypeError),
        ({"max_level": None}, TypeError),
        ({"max_pt_pages": 1}, ValueError),
        ({"max_pt_pages": 0}, ValueError),
        ({"max_pt_pages": -5}, ValueError),
        ({"max_pt_pages": 8.0}, TypeError),
    ],
)
def test_vm_bad_arguments(impl, kwargs, exc):
    layout = impl.SpteLayout.ept()
    kwargs = {"max_pt_pages": 8, **kwargs}
    with pytest.raises(exc):
        impl.Vm(layout, **kwargs)


def test_vm_accepts_numpy_integer_scalars(impl):
    vm = impl.Vm(impl.SpteLayout.ept(), root_level=np.int64(5), max_level=np.uint8(2),
                 max_pt_pages=np.int32(8))
    assert vm.root_level == 5 and vm.max_level == 2 and vm.pool.capacity == 8
    slot = vm.add_memslot(np.uint64(0), np.int16(16), np.int64(PFN0))
    assert slot == 0
    assert vm.vcpu().fault(np.uint32(3)) == PF_FIXED
    vm.audit()


def test_vm_layout_must_be_a_layout(impl):
    with pytest.raises(TypeError):
        impl.Vm(None, max_pt_pages=8)
    with pytest.raises(TypeError):
        impl.Vm(NP63, max_pt_pages=8)


def test_uninitialised_layout_refused_by_vm(impl):
    """A Vm refuses an uninitialised layout with TypeError (docs/API.md "SpteLayout":
    ``SpteLayout.__new__(SpteLayout)`` raises TypeError, so no layout with unset masks
    reaches a Vm)."""
    refuse_blank_layout(impl, lambda L: impl.Vm(L, max_pt_pages=64))


# ==========================================================================================
# Strict argument types: a float, str, 0-d array or list is a TypeError
# ==========================================================================================


BAD_TYPE_CALLS = {
    "delete_memslot(0.0)": lambda vm, v: vm.delete_memslot(0.0),
    "delete_memslot(float64(1.0))": lambda vm, v: vm.delete_memslot(np.float64(1.0)),
    "delete_memslot('x')": lambda vm, v: vm.delete_memslot("x"),
    "fault(array(5))": lambda vm, v: v.fault(np.array(5)),
    "fault_batch(list)": lambda vm, v: v.fault_batch([1, 2]),
    "fault_batch(access=list)": lambda vm, v: v.fault_batch(np.array([1, 2]), access=[0, 1]),
    "fault_batch(out=list)": lambda vm, v: v.fault_batch(np.array([1, 2]), out=[0, 0]),
}


@pytest.mark.parametrize("call", list(BAD_TYPE_CALLS), ids=list(BAD_TYPE_CALLS))
def test_non_integer_arguments_raise_type_error_and_change_nothing(impl, call):
    """A float, str, 0-d array or list where an int / integer ndarray belongs is a TypeError
    raised before anything changes (API.md: "non-integers raise TypeError")."""
    vm = make_vm(impl, max_pt_pages=64)[0]
    vm.add_memslot(0, 1024, PFN0)  # slot 0
    vm.add_memslot(4096, 1024, PFN0 + 4096)  # slot 1
    v = vm.vcpu()
    v.fault(5, write=True)
    v.fault(4100, write=True)
    gfns = (1, 2, 5, 4100)
    walks = [vm.walk(g) for g in gfns]
    before = snapshot(vm, [v])
    with pytest.raises(TypeError):
        BAD_TYPE_CALLS[call](vm, v)
    assert [vm.walk(g) for g in gfns] == walks
    assert_same_snapshot(before, snapshot(vm, [v]))
    vm.audit()


# ==========================================================================================
# Faults, walk / lookup, zaps, CAS-failure injection: types and ranges
# ==========================================================================================


def test_fault_argument_checks(impl):
    vm, layout, vcpu = vm_4k(impl)
    before = snapshot(vm, [vcpu])
    for bad in (-1, 1 << 36, 1 << 64):
        with pytest.raises(ValueError):
            vcpu.fault(bad)
    for bad in (1.0, "3", None):
        with pytest.raises(TypeError):
            vcpu.fault(bad)
    assert_same_snapshot(before, snapshot(vm, [vcpu]))
    assert vcpu.fault((1 << 36) - 1) == PF_EMULATE  # the last gfn is in the width
    vm.audit()


def test_walk_lookup_argument_checks(impl):
    vm, _ = make_vm(impl)
    for fn in (vm.walk, vm.lookup):
        for bad in (-1, 1 << 36):
            with pytest.raises(ValueError):
                fn(bad)
        with pytest.raises(TypeError):
            fn(1.5)
    vm5, _ = make_vm(impl, root_level=5)
    # no root before a vCPU's first entry (6.10 kvm_mmu_load): an empty walk, but the
    # argument checks still come first (issue 10 contract, "Vm")
    assert vm5.walk((1 << 45) - 1) == [] and vm5.lookup((1 << 45) - 1) is None
    with pytest.raises(ValueError):
        vm5.walk(1 << 45)
    load_root(impl, vm5.vcpu())
    assert vm5.walk((1 << 45) - 1) == [(5, NP63)]
    with pytest.raises(ValueError):
        vm5.walk(1 << 45)
    vm.audit()
    vm5.audit()


def test_zap_gfn_range_argument_checks(impl):
    vm, layout, vcpu = vm_4k(impl)
    vcpu.fault(3)
    before = snapshot(vm, [vcpu])
    for args, exc in (((5, 4), ValueError), ((-1, 4), ValueError), ((0, (1 << 36) + 1), ValueError),
                      ((0.0, 4), TypeError), ((0, None), TypeError)):
        with pytest.raises(exc):
            vm.zap_gfn_range(*args)
    assert_same_snapshot(before, snapshot(vm, [vcpu]))
    assert vm.zap_gfn_range(0, 1 << 36) is True  # the whole width is a valid range
    vm.audit()


def test_zap_sp_level_checks(impl):
    vm, layout, vcpu = vm_4k(impl)
    vcpu.fault(3)
    before = snapshot(vm, [vcpu])
    for level in (0, 4, 5, -1):
        with pytest.raises(ValueError):
            vm.zap_sp(3, level)
    with pytest.raises(ValueError):
        vm.zap_sp(1 << 36, 1)
    assert_same_snapshot(before, snapshot(vm, [vcpu]))
    vm5, _ = make_vm(impl, root_level=5)
    assert vm5.zap_sp(0, 4) is False
    with pytest.raises(ValueError):
        vm5.zap_sp(0, 5)
    vm.audit()
    vm5.audit()


def test_zap_spte_atomic_level_checks(impl):
    vm, layout, vcpu = vm_4k(impl)
    vcpu.fault(3)
    before = snapshot(vm, [vcpu])
    for level in (0, 5, 6):
        with pytest.raises(ValueError):
            vm.zap_spte_atomic(3, level)
    with pytest.raises(ValueError):
        vm.zap_spte_atomic(1 << 36, 1)
    with pytest.raises(TypeError):
        vm.zap_spte_atomic(3.0, 1)
    assert_same_snapshot(before, snapshot(vm, [vcpu]))
    vm.audit()


def test_inject_cas_failures_argument_checks(impl):
    vm, _ = make_vm(impl)
    with pytest.raises(ValueError):
        vm.inject_cas_failures(-1)
    with pytest.raises(TypeError):
        vm.inject_cas_failures(1.0)
    vm.inject_cas_failures(0)
    vm.audit()


# ==========================================================================================
# fault_batch arrays: what qualifies, and what is refused
# ==========================================================================================


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64,
                                   np.uint8, np.uint16, np.uint32, np.uint64])
def test_fault_batch_any_integer_dtype(impl, dtype):
    """The third item re-faults gfn 1 (exec) over the leaf the first item installed.  On EPT
    with A/D a not-present fault never takes the fast path (6.10 mmu.c
    page_fault_can_be_fast: !PRESENT only when !kvm_ad_enabled()), so kvm_tdp_mmu_map runs
    make_spte with the old SPTE: the old one is writable, so the new one skips D (spte.c
    make_spte ``if (is_writable_pte(old_spte)) goto out``) and differs -> RET_PF_FIXED."""
    vm, layout, vcpu = vm_4k(impl)
    gfns = np.array([1, 2, 1, 100, 127], dtype=dtype)
    access = np.array([0, 1, 2, 3, 1], dtype=dtype)
    out = np.zeros(5, dtype=np.int8)
    counts = vcpu.fault_batch(gfns, access=access, out=out)
    assert counts == {"fixed": 5, "spurious": 0, "retry": 0, "emulate": 0, "fast": 0}
    assert out.tolist() == [PF_FIXED] * 5
    assert vm.lookup(1) == (leaf_spte(layout, PFN0 + 1, old=leaf_spte(layout, PFN0 + 1)), 1)
    for g in (2, 100, 127):
        assert vm.lookup(g) == (leaf_spte(layout, PFN0 + g), 1)
    vm.audit()


def test_fault_batch_accepts_views_and_read_only_inputs(impl):
    """API.md asks for 1-D integer arrays (gfns, access) and a writable 1-D int8 array
    (out): strided views, read-only inputs and byte-swapped dtypes qualify."""
    vm, layout, vcpu = vm_4k(impl)
    gfns = np.arange(0, 40, dtype=np.uint64)[::4]  # 10 gfns, stride 32 bytes
    gfns.flags.writeable = False
    access = np.tile(np.array([1, 9], dtype=np.uint8), 10)[::2]  # all 1 (write)
    out_base = np.full(20, -1, dtype=np.int8)
    out = out_base[::2]
    assert not gfns.flags.c_contiguous and not out.flags.c_contiguous
    counts = vcpu.fault_batch(gfns, access=access, out=out)
    assert counts == {"fixed": 10, "spurious": 0, "retry": 0, "emulate": 0, "fast": 0}
    assert out.tolist() == [PF_FIXED] * 10
    assert out_base[1::2].tolist() == [-1] * 10  # the gaps are untouched
    for g in range(0, 40, 4):
        assert vm.lookup(g) == (leaf_spte(layout, PFN0 + g), 1)
    big = np.array([41, 42], dtype=">u8")
    assert vcpu.fault_batch(big, access=np.array([0, 2], dtype=">i2"))["fixed"] == 2
    assert vm.lookup(42) is not None
    vm.audit()


def _bad_batches():
    n = 3
    g = np.array([1, 2, 3], dtype=np.uint64)
    ok_out = np.zeros(n, dtype=np.int8)
    ro_out = np.zeros(n, dtype=np.int8)
    ro_out.flags.writeable = False
    return [
        ("float gfns", dict(gfns=np.array([1.0, 2.0, 3.0])), TypeError),
        ("float32 gfns", dict(gfns=np.array([1, 2, 3], dtype=np.float32)), TypeError),
        ("negative gfn", dict(gfns=np.array([1, -2, 3], dtype=np.int64)), ValueError),
        ("negative int8 gfn", dict(gfns=np.array([1, -1], dtype=np.int8)), ValueError),
        ("gfn at width", dict(gfns=np.array([1, 2, 1 << 36], dtype=np.uint64)), ValueError),
        ("huge gfn", dict(gfns=np.array([1, 2, (1 << 64) - 1], dtype=np.uint64)), ValueError),
        ("2-D gfns", dict(gfns=np.array([[1, 2], [3, 4]], dtype=np.uint64)), ValueError),
        ("access too short", dict(gfns=g, access=np.zeros(2, dtype=np.uint8)), ValueError),
        ("access too long", dict(gfns=g, access=np.zeros(4, dtype=np.uint8)), ValueError),
        ("access 4", dict(gfns=g, access=np.array([0, 4, 0], dtype=np.uint8)), ValueError),
        ("access 255", dict(gfns=g, access=np.array([0, 0, 255], dtype=np.uint8)), ValueError),
        ("access -1", dict(gfns=g, access=np.array([0, -1, 0], dtype=np.int8)), ValueError),
        ("float access", dict(gfns=g, access=np.zeros(3)), TypeError),
        ("2-D access", dict(gfns=g, access=np.zeros((3, 1), dtype=np.uint8)), ValueError),
        ("out int32", dict(gfns=g, out=np.zeros(n, dtype=np.int32)), TypeError),
        ("out uint8", dict(gfns=g, out=np.zeros(n, dtype=np.uint8)), TypeError),
        ("out float", dict(gfns=g, out=np.zeros(n)), TypeError),
        ("out short", dict(gfns=g, out=np.zeros(n - 1, dtype=np.int8)), ValueError),
        ("out long", dict(gfns=g, out=np.zeros(n + 1, dtype=np.int8)), ValueError),
        ("out 2-D", dict(gfns=g, out=np.zeros((n, 1), dtype=np.int8)), ValueError),
        ("out read-only", dict(gfns=g, out=ro_out), (TypeError, ValueError)),
        ("ok gfns, bad access after ok out", dict(gfns=g, access=np.array([9, 0, 0]), out=ok_out),
         ValueError),
    ]


@pytest.mark.parametrize("name, kwargs, exc", _bad_batches(), ids=[b[0] for b in _bad_batches()])
def test_fault_batch_argument_checks_change_nothing(impl, name, kwargs, exc):
    vm, layout, vcpu = vm_4k(impl)
    vcpu.fault(1)
    out = kwargs.get("out")
    out_before = None if out is None else out.copy()
    before = snapshot(vm, [vcpu])
    with pytest.raises(exc):
        vcpu.fault_batch(**kwargs)
    assert_same_snapshot(before, snapshot(vm, [vcpu]))
    if out is not None:
        assert np.array_equal(out, out_before)
    vm.audit()
