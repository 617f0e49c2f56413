"""Hardening: edge cases at the API boundary and in the semantics (docs/API.md;
KVM_MMU_SPEC.md §3.9), pinned on both implementations through ``impl`` — except the
multi-threaded ones (C, L, N), which are the engine's: the reference model is
single-threaded.

A. an NX exec fault on a gfn in no memslot still marks its tables "huge page disallowed";
B. the 64-bit atomics take only ints / numpy integer scalars (no ``__index__`` callbacks);
C. fault_batch is immune to another thread rewriting its gfns array;
D. ``Vcpu(vm)`` is the same as ``vm.vcpu()``;
E. an uninitialised ``SpteLayout`` is refused;
F. Ctrl-C interrupts a fault_batch stuck in endless RETRY;
G. ``pool.pages`` cannot be made writable;
H. fault_batch maps -EIO to CacheConfigError, like fault();
I. audit() accounts for every pool page;
J. argument types are strict (delete_memslot, fault, fault_batch);
K. make_huge_page_split_spte ORs the child offset into the huge SPTE, as KVM does;
L. memslot changes are serialised between threads;
M. an MMIO generation wrap zaps every SPTE (kvm_mmu_invalidate_mmio_sptes);
N. calls on one Vcpu from two threads are serialised (KVM's vcpu->mutex).

The crash- or hang-prone cases (B, F) run in a child interpreter, so a segfault or a hang
fails one test instead of the whole session.
"""
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from support.snapshots import assert_same_snapshot, snapshot
from support.spec import NP63, PAGES_2M, PF_EMULATE, PF_FIXED, pages_per
from support.threads import run_threads

PFN0 = 0x100000  # a 1G-aligned host pfn


def child_argv(code, impl):
    """argv running ``code`` (dedented) in a fresh interpreter; sys.argv[1] is the name of
    the module ``impl``."""
    return [sys.executable, "-c", textwrap.dedent(code), impl.__name__]


def child_env(impl):
    """The environment of a child interpreter: the directory ``impl`` was imported from
    first on PYTHONPATH, so the child tests the same build as this process."""
    root = Path(impl.__file__).resolve().parents[1]  # spte_fast/<module>.py -> checkout
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    return env


def run_child(code, impl, timeout=60):
    """Run ``code`` in a child interpreter; a crash shows as a negative returncode instead
    of killing pytest."""
    return subprocess.run(child_argv(code, impl), env=child_env(impl), capture_output=True,
                          text=True, timeout=timeout)


def ept_vm(impl, **kw):
    kw.setdefault("max_pt_pages", 64)
    return impl.Vm(impl.SpteLayout.ept(), **kw)


# ==========================================================================================
# A. NX huge pages: an exec fault on a gfn with no memslot
# ==========================================================================================


def nx_mmio_then_ram(impl):
    vm = ept_vm(impl, nx_huge_pages=True)
    v = vm.vcpu()
    assert v.fault(0x200, exec=True) == PF_EMULATE  # no slot: an MMIO SPTE at 4K
    vm.add_memslot(0, 0x400, PFN0)  # now RAM, 2M-aligned gfn and pfn
    assert v.fault(0x200) == PF_FIXED
    return vm


def test_nx_exec_fault_on_mmio_gfn_marks_tables_huge_page_disallowed(impl):
    """§3.9 step 1 applies to every exec fault: the tables the MMIO exec fault allocated are
    nx_huge_page_disallowed, so the later read fault maps 4K below them instead of replacing
    the level-1 table by a 2M leaf (no ranged flush)."""
    vm = nx_mmio_then_ram(impl)
    spte, level = vm.lookup(0x200)
    assert level == impl.PG_LEVEL_4K
    assert vm.layout.spte_to_pfn(spte) == PFN0 + 0x200
    assert vm.stats["pt_pages_l1"] == 1
    assert vm.stats["tlb_flushes_ranged"] == 0
    vm.audit()


def test_nx_exec_fault_on_mmio_gfn_same_state_in_both(fast, reference):
    """The engine and the oracle end the A sequence with the same walk and stats."""
    vf, vr = nx_mmio_then_ram(fast), nx_mmio_then_ram(reference)
    for g in (0x200, 0x201, 0x3ff):
        assert vf.walk(g) == vr.walk(g)
    assert vf.stats == vr.stats


# ==========================================================================================
# B. 64-bit atomics: ints and numpy integer scalars only
# ==========================================================================================

ATOMIC_EVIL_CHILD = """
    import importlib, sys
    import numpy as np
    impl = importlib.import_module(sys.argv[1])
    N = 1 << 20                       # 8 MiB: its own mapping, unmapped by the resize

    CASES = [("cmpxchg", "index"), ("cmpxchg", "expected"), ("cmpxchg", "new"),
             ("xchg", "index"), ("xchg", "new"),
             ("atomic_or", "index"), ("atomic_or", "mask"),
             ("atomic_and_not", "index"), ("atomic_and_not", "mask")]
    for name, where in CASES:
        a = np.zeros(N, dtype=np.uint64)

        class Evil:
            def __index__(self):
                a.resize(1, refcheck=False)   # frees the buffer under the atomic
                return 1

        args = {"cmpxchg": [N - 1, 0, 1], "xchg": [N - 1, 1],
                "atomic_or": [N - 1, 1], "atomic_and_not": [N - 1, 1]}[name]
        pos = {"index": 0, "expected": 1, "new": -1, "mask": -1}[where]
        args[pos] = Evil()
        print(name, where, "...", end=" ", flush=True)
        try:
            getattr(impl, name)(a, *args)
            outcome = "no error"
        except Exception as e:
            outcome = type(e).__name__
        unchanged = a.size == N and not a.any()
        print(outcome, "unchanged" if unchanged else "CHANGED", flush=True)
"""


def test_atomics_refuse_index_objects_without_crashing(impl):
    """An argument with ``__index__`` (here one that resizes the array) is a TypeError for
    every position of every atomic; no Python code runs, so the array is untouched and the
    process survives (run in a child: a use-after-free must not kill pytest)."""
    proc = run_child(ATOMIC_EVIL_CHILD, impl)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, f"child died ({proc.returncode}): {lines[-1:]} {proc.stderr}"
    assert len(lines) == 9
    for line in lines:
        assert line.endswith("TypeError unchanged"), line


@pytest.mark.parametrize("name", ["cmpxchg", "xchg", "atomic_or", "atomic_and_not"])
@pytest.mark.parametrize("pos", [0, -1], ids=["index", "value"])
def test_atomics_refuse_zero_dim_arrays(impl, name, pos):
    """A 0-d array is not an int (API.md: ints or numpy integer scalars): TypeError, array
    unchanged; the numpy integer scalars themselves are accepted."""
    a = np.zeros(8, dtype=np.uint64)
    args = [5, 0, 3] if name == "cmpxchg" else [5, 3]
    bad = list(args)
    bad[pos] = np.array(bad[pos])
    with pytest.raises(TypeError):
        getattr(impl, name)(a, *bad)
    assert not a.any()
    getattr(impl, name)(a, *[np.uint16(x) for x in args])
    assert a[5] == (0 if name == "atomic_and_not" else 3)


# ==========================================================================================
# C. fault_batch against a concurrent writer of its gfns array
# ==========================================================================================


def test_fault_batch_immune_to_gfns_rewritten_during_the_batch(fast):
    """The gfns are read once: a value beyond the address width that another thread writes
    into the array mid-batch is never faulted (the batch completes or raises ValueError) and
    the tables stay consistent."""
    impl = fast  # threads: the reference model is single-threaded (API.md)
    n = 4_000_000
    bad = (1 << 36) + (1 << 30) + 7  # beyond the 4-level width; its low bits are in no slot
    vm = impl.Vm(impl.SpteLayout.ept(), max_pt_pages=1 << 10)
    vm.add_memslot(0, 1 << 20, PFN0)
    v = vm.vcpu()
    for delay in (0.0, 0.002, 0.005, 0.01, 0.02):
        g = np.zeros(n, dtype=np.uint64)  # gfn 0 over and over: SPURIOUS after the first
        g[-16:] = 7

        def rewrite():
            time.sleep(delay)
            g[-16:] = bad

        (res, err), _ = run_threads([lambda: v.fault_batch(g), rewrite])
        assert err is None or isinstance(err, ValueError), repr(err)
        if err is None:
            assert sum(res.values()) == n
        assert vm.walk((1 << 30) + 7) == [(4, NP63)]
        vm.audit()


# ==========================================================================================
# D. Vcpu(vm) == vm.vcpu()
# ==========================================================================================


def test_direct_vcpu_construction_registers_like_vm_vcpu(impl):
    """``impl.Vcpu(vm)`` is registered in ``vm.vcpus``, its faults reach ``vm.stats`` and the
    tables, and audit passes: the same outcome as a vCPU from ``vm.vcpu()``."""
    vms, vcpus = [], []
    for make in (lambda vm: impl.Vcpu(vm), lambda vm: vm.vcpu()):
        vm = ept_vm(impl)
        vm.add_memslot(0, 1024, PFN0)
        v = make(vm)
        assert len(vm.vcpus) == 1 and vm.vcpus[0] is v
        assert v.fault(5, write=True) == PF_FIXED
        assert v.fault(5, write=True) == impl.PF.SPURIOUS
        vm.audit()
        vms.append(vm)
        vcpus.append(v)
    direct, usual = vms
    assert direct.stats["faults_fixed"] == 1 and direct.stats["pages_2m"] == 1
    assert direct.stats == usual.stats
    assert direct.walk(5) == usual.walk(5)
    assert vcpus[0].stats == vcpus[1].stats


# ==========================================================================================
# E. Uninitialised SpteLayout
# ==========================================================================================

BLANK_LAYOUT_CALLS = {
    "is_shadow_present_pte": lambda L: L.is_shadow_present_pte(0),
    "is_mmio_spte": lambda L: L.is_mmio_spte(6),
    "spte_to_pfn": lambda L: L.spte_to_pfn(1 << 12),
    "make_spte": lambda L: L.make_spte(1),
    "make_mmio_spte": lambda L: L.make_mmio_spte(1),
}


def refuse_blank_layout(impl, use):
    """``SpteLayout.__new__`` skips ept()/npt() validation (all masks 0, frozen value ==
    non-present value).  Such a layout is refused with TypeError: by ``__new__`` itself, or
    else by ``use(layout)``."""
    try:
        blank = impl.SpteLayout.__new__(impl.SpteLayout)
    except TypeError:
        return
    with pytest.raises(TypeError):
        use(blank)


def test_uninitialised_layout_refused_by_vm(impl):
    """A Vm refuses an uninitialised layout with TypeError."""
    refuse_blank_layout(impl, lambda L: impl.Vm(L, max_pt_pages=64))


@pytest.mark.parametrize("call", list(BLANK_LAYOUT_CALLS), ids=list(BLANK_LAYOUT_CALLS))
def test_uninitialised_layout_methods_raise_type_error(impl, call):
    """A layout method on an uninitialised layout is a TypeError, not an answer computed
    from zero masks."""
    refuse_blank_layout(impl, BLANK_LAYOUT_CALLS[call])


# ==========================================================================================
# F. Ctrl-C during endless RETRY
# ==========================================================================================

CAS_HANG_CHILD = """
    import importlib, signal, sys
    import numpy as np
    signal.signal(signal.SIGINT, signal.default_int_handler)
    impl = importlib.import_module(sys.argv[1])
    vm = impl.Vm(impl.SpteLayout.ept(), max_pt_pages=64)
    vm.add_memslot(0, 1024, 0x100000)
    v = vm.vcpu()
    vm.inject_cas_failures(2 ** 62)        # every CAS fails: RETRY for ever
    print("ready", flush=True)
    v.fault_batch(np.array([5, 6, 7], dtype=np.uint64))
    print("returned", flush=True)
"""


def test_sigint_interrupts_fault_batch_stuck_in_retry(impl):
    """A batch that can only RETRY still answers SIGINT: the child exits with
    KeyboardInterrupt within 10 s of the signal."""
    proc = subprocess.Popen(child_argv(CAS_HANG_CHILD, impl), env=child_env(impl),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(1.0)
        assert proc.poll() is None, "fault_batch returned although every CAS fails"
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("fault_batch ignored SIGINT for 10 s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err, err


# ==========================================================================================
# G. pool.pages stays read-only
# ==========================================================================================


@pytest.mark.parametrize("owner", ["pool", "vm.pool"])
def test_pool_pages_cannot_be_made_writable(impl, owner):
    """``pages.flags.writeable = True`` (or ``setflags``) raises ValueError, on the view and on
    any ndarray it is a view of; the pool content is unchanged."""
    if owner == "pool":
        pool = impl.PagePool(4, poison=0x1234)
    else:
        vm = ept_vm(impl)
        vm.add_memslot(0, 1024, PFN0)
        vm.vcpu().fault(5, write=True)
        pool = vm.pool
    pages = pool.pages
    before = np.array(pages, copy=True)
    base = pages
    while isinstance(base, np.ndarray):
        with pytest.raises(ValueError):
            base.flags.writeable = True
        with pytest.raises(ValueError):
            base.setflags(write=True)
        base = base.base
    with pytest.raises(ValueError):
        pages[0, 0] = 1
    assert not pool.pages.flags.writeable
    assert np.array_equal(pool.pages, before)


# ==========================================================================================
# H. -EIO in fault_batch
# ==========================================================================================


def test_fault_batch_maps_eio_to_cache_config_error(impl):
    """A vCPU cache whose recorded capacity is not 40 makes the fault's top-up -EIO:
    fault_batch raises CacheConfigError (not OutOfMemory) after the one fault that needed no
    top-up, as fault() does."""
    vm = impl.Vm(impl.SpteLayout.ept(), max_pt_pages=256, max_level=1)
    vm.add_memslot(0, 1 << 20, PFN0)
    v = vm.vcpu()
    v.cache.topup(5, capacity=6)  # legal: records capacity 6; the fault path asks for 40
    with pytest.raises(impl.CacheConfigError) as info:
        v.fault_batch(np.arange(0, 1 << 20, PAGES_2M, dtype=np.uint64))
    assert not isinstance(info.value, impl.OutOfMemory)
    assert vm.stats["faults_fixed"] == 1
    assert vm.lookup(0) is not None and vm.lookup(PAGES_2M) is None
    with pytest.raises(impl.CacheConfigError):
        v.fault(PAGES_2M)
    vm.audit()


# ==========================================================================================
# I. audit() accounts for every pool page
# ==========================================================================================


def test_audit_catches_raw_page_kept_from_pool(impl):
    """A page taken with ``vm.pool.alloc()`` and kept is neither free, cached nor linked:
    AuditError; freeing it makes the VM consistent again."""
    vm = ept_vm(impl)
    vm.add_memslot(0, 1024, PFN0)
    vm.vcpu().fault(5)  # a vCPU cache holding pages is fine
    vm.audit()
    idx = vm.pool.alloc()
    with pytest.raises(impl.AuditError):
        vm.audit()
    vm.pool.free(idx)
    vm.audit()


def test_audit_catches_pages_held_by_a_foreign_cache(impl):
    """Pages held by a MemoryCache that belongs to no vCPU of the VM: AuditError; after the
    cache's ``free()`` audit passes."""
    vm = ept_vm(impl)
    cache = impl.MemoryCache(vm.pool, init_value=vm.layout.nonpresent_value)
    cache.topup(1)
    assert cache.nobjs > 0
    with pytest.raises(impl.AuditError):
        vm.audit()
    cache.free()
    vm.audit()


# ==========================================================================================
# J. Strict argument types
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
    vm = ept_vm(impl)
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
# K. make_huge_page_split_spte composes the child address by OR
# ==========================================================================================

PS_BIT = 1 << 7


@pytest.mark.parametrize("huge_level, pfn, child_level, index, nx", [
    (3, (1 << 40) - 1, 2, 1, False),  # unaligned pfn at the top: OR, no carry into bit 52
    (3, (1 << 40) - 1, 2, 511, False),
    (2, (1 << 40) - 1, 1, 511, False),
    (2, (1 << 40) - 512, 1, 511, False),  # aligned: OR == add
    (3, 1 << 30, 1, 0, False),  # (the spec allows any large SPTE, even a 1G one, at 4K)
    (2, 0x12345 << 9, 1, 77, True),  # nx: the 4K child becomes executable
])
def test_huge_page_split_spte_ors_child_offset_into_huge_spte(impl, huge_level, pfn,
                                                              child_level, index, nx):
    """KVM: ``child = huge | (index * KVM_PAGES_PER_HPAGE(child_level)) << 12``, then at 4K
    clear bit 7 (and with nx_huge_pages set x).  No bit outside the PFN field changes
    otherwise: an unaligned huge pfn cannot carry into the A/D-type field."""
    L = impl.SpteLayout.ept()
    _, huge = L.make_spte(pfn, level=huge_level, nx_huge_pages=nx)
    child = L.make_huge_page_split_spte(huge, child_level, index, nx_huge_pages=nx)
    expected = huge | ((index * pages_per(child_level)) << 12)
    if child_level == 1:
        expected &= ~PS_BIT
        if nx:
            assert not L.is_executable_pte(huge)
            expected |= L.x_mask
    assert hex(child) == hex(expected)
    assert L.spte_to_pfn(child) == pfn | (index * pages_per(child_level))
    assert L.spte_ad_enabled(child) == L.spte_ad_enabled(huge)


# ==========================================================================================
# L. Memslot changes from several threads
# ==========================================================================================


def test_concurrent_add_memslot_same_range_exactly_one_wins(fast):
    """8 threads add a slot for the same gfn range at once: exactly one succeeds, the others
    raise ValueError (overlap), and the VM holds one slot."""
    impl = fast  # threads: the reference model is single-threaded (API.md)
    for _ in range(10):
        vm = ept_vm(impl)
        results = run_threads([lambda i=i: vm.add_memslot(0, 1024, PFN0 + i * 1024)
                               for i in range(8)])
        ok = [r for r, e in results if e is None]
        errors = [e for r, e in results if e is not None]
        assert len(ok) == 1, results
        assert all(isinstance(e, ValueError) for e in errors), errors
        assert [s[0] for s in vm.memslots] == ok
        assert vm.mmio_generation == 1
        vm.audit()


def test_concurrent_add_memslot_disjoint_ranges_all_win(fast):
    """8 threads add disjoint slots at once: all succeed with distinct ids 0..7."""
    impl = fast  # threads: the reference model is single-threaded (API.md)
    for _ in range(10):
        vm = ept_vm(impl)
        results = run_threads([lambda i=i: vm.add_memslot(i * 1024, 1024, PFN0 + i * 1024)
                               for i in range(8)])
        assert all(e is None for _, e in results), results
        ids = sorted(r for r, _ in results)
        assert ids == list(range(8))
        assert sorted(s[0] for s in vm.memslots) == ids
        assert vm.mmio_generation == 8
        vm.audit()


# ==========================================================================================
# M. MMIO generation wrap-around
# ==========================================================================================

WRAP_DEADLINE = 120  # seconds: a hang guard, not a performance check


@pytest.mark.slow
def test_mmio_generation_wrap_zaps_every_spte(impl):
    """After 2**19 memslot changes the generation (API.md: +1 per change, modulo 2**19) is 0
    again, and, as kvm_mmu_invalidate_mmio_sptes does, every SPTE is zapped at once: the old
    MMIO SPTE (whose generation 1 would come back) and the RAM leaf are gone, with one full
    TLB flush."""
    vm = ept_vm(impl, max_pt_pages=64)
    vm.add_memslot(0, 1024, PFN0)  # generation 1
    v = vm.vcpu()
    mmio_gfn = 0x40000
    assert v.fault(5, write=True) == PF_FIXED
    assert v.fault(mmio_gfn) == PF_EMULATE
    mmio = vm.walk(mmio_gfn)[-1][1]
    assert vm.layout.is_mmio_spte(mmio) and vm.layout.get_mmio_spte_generation(mmio) == 1
    flushes = vm.stats["tlb_flushes"]
    start = time.monotonic()
    changes = 1
    while True:
        sid = vm.add_memslot(1 << 30, 1, PFN0 + (1 << 20))
        changes += 1
        if changes == 1 << 19:
            break
        vm.delete_memslot(sid)
        changes += 1
        if changes % 4096 == 1:
            assert vm.lookup(5) is not None  # nothing is zapped before the wrap
            if time.monotonic() - start > WRAP_DEADLINE:
                pytest.fail(f"only {changes} memslot changes in {WRAP_DEADLINE} s")
    assert vm.mmio_generation == 0
    assert vm.lookup(5) is None
    assert vm.walk(5)[-1][1] == NP63
    assert vm.walk(mmio_gfn)[-1][1] == NP63
    assert vm.stats["pages_2m"] == 0 and vm.stats["pages_4k"] == 0
    assert vm.stats["tlb_flushes"] == flushes + 1
    vm.audit()


# ==========================================================================================
# N. One Vcpu, two threads
# ==========================================================================================


def test_one_vcpu_shared_by_two_threads_is_serialised(fast):
    """Two threads run fault_batch on the same Vcpu (disjoint 4K ranges) at once, a few
    rounds: the calls are serialised like KVM's vcpu->mutex, so every gfn is mapped, the
    stats count exactly the faults made and audit passes."""
    impl = fast  # threads: the reference model is single-threaded (API.md)
    n = 1 << 15
    vm = impl.Vm(impl.SpteLayout.ept(), max_level=1, max_pt_pages=1 << 10)
    vm.add_memslot(0, 2 * n, PFN0)
    v = vm.vcpu()
    halves = [np.arange(0, n, dtype=np.uint64), np.arange(n, 2 * n, dtype=np.uint64)]
    fixed = retry = 0
    for _ in range(3):
        results = run_threads([lambda h=h: v.fault_batch(h) for h in halves])
        assert all(e is None for _, e in results), results
        for r, _ in results:
            assert r["spurious"] == 0 and r["emulate"] == 0
            fixed += r["fixed"]
            retry += r["retry"]
        st = vm.stats
        assert st["pages_4k"] == 2 * n
        assert st["faults_fixed"] == fixed and st["faults_retry"] == retry
        assert v.stats["faults_fixed"] == fixed
        vm.audit()
        vm.zap_all()
    assert fixed == 3 * 2 * n
