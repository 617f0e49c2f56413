"""spte_fast as unicorn's MMU (spte_fast.integrations.unicorn; issue 15).

Real x86-64 machine code runs under unicorn with a vCPU's hardware view answering every TLB
fill.  The bundled routines (spte_fast/integrations/routines/*.c) are compiled here with the
system compiler; each result is checked in emulated memory against numpy / Python, so every
translation the model gave was right (RAM lives at the memslots' host addresses, so a wrong
pfn reads the wrong bytes).  Then the model's counts are checked against unicorn's own
memory hooks on a separate plain run (``touched``): the pages and 2M regions the program
touches, by the kind of their first access.

Expectations come from the hardware and 6.10, not from the model:
* a TLB miss is the CPU's page walk; the first access to a page without an SPTE exits
  (EPT violation / #NPF) once and KVM maps it (``kvm_tdp_mmu_map``), so exits by kind are
  the pages' first-access kinds and the leaves are the distinct pages (2M regions when
  huge pages are allowed: ``kvm_mmu_hugepage_adjust``);
* a TLB entry caches a write only once D is set where the CPU keeps D (SDM vol. 3 §29.3.5,
  APM vol. 2 §15.25.7), so writes after a dirty-log clear reach the model: with PML the
  walk logs the gfn (``vmx_flush_pml_buffer``), without it the write-protected SPTE faults
  (``fast_page_fault`` → ``mark_page_dirty_in_slot``); the log then holds exactly the
  pages the guest wrote;
* an access with no memslot is emulated by KVM (``handle_mmio_page_fault`` /
  ``kvm_handle_noslot_fault``): no RAM answers it, and the guest takes a fault.

Skipped without unicorn (the ``[unicorn]`` extra) or a C compiler.
"""
import shutil
import sys
import threading

import numpy as np
import pytest

unicorn = pytest.importorskip("unicorn", reason="the [unicorn] extra is not installed")
from unicorn import unicorn_const as UC  # noqa: E402

import spte_fast as sf  # noqa: E402
from spte_fast import reference  # noqa: E402
from spte_fast.integrations import routines as R  # noqa: E402
from spte_fast.integrations import unicorn as sfu  # noqa: E402
from support.spec import NP63  # noqa: E402
from support.tables import present_leaves  # noqa: E402

if shutil.which("cc") is None or shutil.which("objcopy") is None:
    pytest.skip("no C compiler or objcopy: the routines cannot be built", allow_module_level=True)

HOST_PFN = 0x100000             # guest RAM at host physical 4 GiB (2M- and 1G-aligned)
SMALL = {"sort": 3000, "hash": 2000, "matmul": 20, "list": 3000, "invlpg": 64}
KINDS = ("read", "write", "fetch")


@pytest.fixture(scope="module")
def code(tmp_path_factory):
    """The flat binaries, compiled by this test run."""
    d = tmp_path_factory.mktemp("routines")
    return {name: R.build(name, cache_dir=d) for name in R.ROUTINES}


def make(impl=sf, kind="ept_ad", nonpresent=NP63, name="sort", size=None, **vm_kw):
    if kind == "ept_ad":
        layout = impl.SpteLayout.ept(ad=True, nonpresent_value=nonpresent)
    elif kind == "ept_noad":
        layout = impl.SpteLayout.ept(ad=False, nonpresent_value=nonpresent)
    else:
        layout = impl.SpteLayout.npt(nonpresent_value=nonpresent)
    vm = impl.Vm(layout, **vm_kw)
    slot = vm.add_memslot(0, R.memory_bytes(name, size) >> 12, HOST_PFN)
    return vm, slot, vm.vcpu()


def run(att, code, name, size, seed=0, check=True):
    p = R.prepare(att, name, size, seed=seed, code=code[name])
    R.start(att.uc, p)
    att.emu_start(R.LOAD_GPA, R.EXIT_GPA)
    if check:
        p.check(att)
    return p


def new_uc():
    return unicorn.Uc(UC.UC_ARCH_X86, UC.UC_MODE_64)


def touched(code, name, size, seed=0):
    """{page: kind of its first access} from unicorn's memory hooks on a plain run (RAM at
    gpa 0, unicorn's default identity translation): UC_HOOK_MEM_READ / _WRITE for data,
    UC_HOOK_BLOCK for the code pages each executed block occupies."""
    uc = new_uc()
    uc.mem_map(0, R.memory_bytes(name, size))
    mem = R.FlatMemory(uc)
    p = R.prepare(mem, name, size, seed=seed, code=code[name])
    R.start(uc, p)
    first = {}

    def note(addr, n, kind):
        for page in range(addr >> 12, ((addr + max(n, 1) - 1) >> 12) + 1):
            first.setdefault(page, kind)

    uc.hook_add(UC.UC_HOOK_MEM_READ | UC.UC_HOOK_MEM_WRITE,
                lambda uc, acc, addr, n, val, ud: note(addr, n, KINDS[acc - UC.UC_MEM_READ]))
    uc.hook_add(UC.UC_HOOK_BLOCK, lambda uc, addr, n, ud: note(addr, n, "fetch"))
    uc.emu_start(R.LOAD_GPA, R.EXIT_GPA)
    p.check(mem)
    return first


# -- results in emulated memory --------------------------------------------------------------

@pytest.mark.parametrize("callback", ["c", "python"])
@pytest.mark.parametrize("kind", ["ept_ad", "ept_noad", "npt"])
@pytest.mark.parametrize("name", list(R.ROUTINES))
def test_routine_results_are_right_through_the_model(code, name, kind, callback):
    vm, _slot, v = make(kind=kind, name=name, size=SMALL[name])
    with sfu.attach(new_uc(), v, callback=callback) as att:
        run(att, code, name, SMALL[name])
        st = att.stats
        assert st["tlb_fills"] > 0 and st["fills_denied"] == 0
        assert st["tlb_fills_fetch"] >= 1           # the code came through the model too
    vm.audit()


def test_sort_of_a_million_integers(code):
    """The issue's headline routine at full size, through the C callback."""
    vm, _slot, v = make(name="sort", size=10**6)
    with sfu.attach(new_uc(), v) as att:
        run(att, code, "sort", 10**6, seed=3)
        assert att.stats["tlb_fills"] >= 8 * 10**6 // 4096     # every data page at least
    vm.audit()


@pytest.mark.parametrize("nonpresent", [NP63, 0])
def test_both_nonpresent_values(code, nonpresent):
    vm, _slot, v = make(nonpresent=nonpresent, name="hash", size=SMALL["hash"], max_level=1)
    with sfu.attach(new_uc(), v) as att:
        run(att, code, "hash", SMALL["hash"])
    vm.audit()
    assert vm.layout.nonpresent_value == nonpresent


# -- the counts against unicorn's own memory hooks -------------------------------------------

@pytest.mark.parametrize("callback", ["c", "python"])
@pytest.mark.parametrize("kind", ["ept_ad", "npt"])
@pytest.mark.parametrize("name", list(R.ROUTINES))
def test_4k_leaves_and_exits_match_the_pages_touched(code, name, kind, callback):
    """max_level 4K: one leaf per page touched, one exit per page, of its first kind."""
    first = touched(code, name, SMALL[name])
    vm, _slot, v = make(kind=kind, name=name, size=SMALL[name], max_level=1)
    with sfu.attach(new_uc(), v, callback=callback) as att:
        run(att, code, name, SMALL[name])
        st = att.stats
    leaves = present_leaves(vm)
    assert sorted(leaves) == sorted(first)
    assert all(level == 1 for level, _ in leaves.values())
    assert vm.stats["pages_4k"] == len(first) and vm.stats["faults_fixed"] == len(first)
    for k in KINDS:
        assert st[f"fill_exits_{k}"] == sum(1 for f in first.values() if f == k), k
    assert st["fill_exits"] == len(first)
    assert st["tlb_fills"] >= len(first)


@pytest.mark.parametrize("name", ["hash", "list"])
def test_2m_leaves_match_the_regions_touched(code, name):
    """Huge pages allowed (an aligned slot): one 2M leaf per 2M region touched, its exit
    of the kind of the region's first access; the fills still come per 4K page."""
    size = {"hash": 70_000, "list": 60_000}[name]      # several 2M regions, few accesses
    first = touched(code, name, size)
    regions = {}
    for page, k in first.items():                            # dicts keep first-touch order
        regions.setdefault(page >> 9, k)
    vm, _slot, v = make(name=name, size=size)
    with sfu.attach(new_uc(), v) as att:
        run(att, code, name, size)
        st = att.stats
    leaves = present_leaves(vm)
    assert len(regions) >= 3
    assert {g >> 9 for g in leaves} == set(regions)
    assert all(level == 2 for level, _ in leaves.values())
    assert vm.stats["pages_2m"] == len(regions) and vm.stats["pages_4k"] == 0
    for k in KINDS:
        assert st[f"fill_exits_{k}"] == sum(1 for f in regions.values() if f == k), k
    assert st["tlb_fills"] >= len(first)


# -- dirty logging through the emulator's TLB ------------------------------------------------

@pytest.mark.parametrize("callback", ["c", "python"])
@pytest.mark.parametrize("kind,pml", [("ept_ad", True), ("ept_ad", False), ("ept_noad", False),
                                      ("npt", False)])
@pytest.mark.parametrize("name", ["sort", "matmul"])
def test_dirty_log_holds_the_pages_the_guest_wrote(code, name, kind, pml, callback):
    """Round 1 maps everything (a writable fault in a dirty-logged slot marks the page:
    make_spte); get_dirty_log clears and re-protects (D cleared with PML, W without) and
    flushes; round 2's log is exactly the pages round 2 wrote -- which needs the emulator's
    TLB flushed at emu_start and clean entries refilled on the first write."""
    size = SMALL[name]
    writes = set()
    uc0 = new_uc()
    uc0.mem_map(0, R.memory_bytes(name, size))
    p0 = R.prepare(R.FlatMemory(uc0), name, size, seed=1, code=code[name])
    R.start(uc0, p0)
    uc0.hook_add(UC.UC_HOOK_MEM_WRITE,
                 lambda uc, acc, addr, n, val, ud: writes.update(range(addr >> 12,
                                                                        ((addr + n - 1) >> 12) + 1)))
    uc0.emu_start(R.LOAD_GPA, R.EXIT_GPA)

    layout = (sf.SpteLayout.npt() if kind == "npt"
              else sf.SpteLayout.ept(ad=kind == "ept_ad"))
    vm = sf.Vm(layout, pml=pml)
    slot = vm.add_memslot(0, R.memory_bytes(name, size) >> 12, HOST_PFN, dirty_log=True)
    v = vm.vcpu()
    with sfu.attach(new_uc(), v, callback=callback) as att:
        run(att, code, name, size, seed=0)
        vm.get_dirty_log(slot)                   # round 1's pages; clears and protects
        run(att, code, name, size, seed=1)
        log = vm.get_dirty_log(slot)
    dirty = {i for i in range(64 * len(log)) if int(log[i // 64]) >> (i % 64) & 1}
    assert dirty == writes
    vm.audit()


# -- the C and Python callbacks, the engine and the oracle ------------------------------------

def _state(vm):
    return present_leaves(vm), {k: v for k, v in vm.stats.items()}


@pytest.mark.parametrize("kind", ["ept_ad", "ept_noad", "npt"])
@pytest.mark.parametrize("name", ["hash", "list"])
def test_c_callback_on_the_engine_matches_python_callback_on_the_oracle(code, name, kind):
    """The same program through the C callback on the Cython engine and through the Python
    callback on the reference model: every leaf, every VM stat and every fill count agree."""
    out = []
    for impl, cb in ((sf, "c"), (sf, "python"), (reference, "python")):
        vm, _slot, v = make(impl, kind=kind, name=name, size=SMALL[name])
        with sfu.attach(new_uc(), v, callback=cb) as att:
            run(att, code, name, SMALL[name], seed=5)
            out.append((_state(vm), att.stats))
    assert out[0] == out[1] == out[2]


def test_the_c_callback_makes_no_python_call_per_fill(code):
    """uc_emu_start runs with the GIL released; the C callback never enters Python (no
    profiler event beyond the binding's emu_start), the Python one enters once per fill."""
    calls = {"c": 0, "python": 0}
    for cb in ("c", "python"):
        vm, _slot, v = make(name="list", size=SMALL["list"], max_level=1)
        att = sfu.attach(new_uc(), v, callback=cb)
        p = R.prepare(att, "list", SMALL["list"], code=code["list"])
        R.start(att.uc, p)
        seen = []

        def prof(frame, event, arg, seen=seen):
            if event == "call":
                seen.append(frame.f_code.co_name)
        sys.setprofile(prof)
        try:
            att.uc.emu_start(R.LOAD_GPA, R.EXIT_GPA)
        finally:
            sys.setprofile(None)
        p.check(att)
        calls[cb] = sum(1 for n in seen if n == "_python_fill")
        if cb == "c":
            assert [n for n in seen if n != "emu_start"] == []   # the binding's own method
        att.detach()
    assert calls["python"] > 0 and calls["c"] == 0


def test_another_thread_runs_while_the_c_callback_answers(code):
    """The GIL is free during the run: a Python thread makes progress meanwhile."""
    vm, _slot, v = make(name="sort", size=200_000)
    att = sfu.attach(new_uc(), v)
    p = R.prepare(att, "sort", 200_000, code=code["sort"])
    R.start(att.uc, p)
    ticks, stop = [0], threading.Event()

    def spin():
        while not stop.is_set():
            ticks[0] += 1
    t = threading.Thread(target=spin)
    t.start()
    before = ticks[0]
    try:
        att.emu_start(R.LOAD_GPA, R.EXIT_GPA)
        during = ticks[0] - before
    finally:
        stop.set()
        t.join()
    p.check(att)
    assert during > 1000


# -- what the guest sees when the model cannot back an access --------------------------------

@pytest.mark.parametrize("callback", ["c", "python"])
def test_an_access_outside_the_memslots_is_emulated_and_faults_the_guest(code, callback):
    """The list's head points past guest RAM: KVM finds no memslot, installs an MMIO SPTE
    and emulates (RET_PF_EMULATE); unicorn has no device there, so the guest faults."""
    vm, _slot, v = make(name="list", size=100)
    att = sfu.attach(new_uc(), v, callback=callback)
    p = R.prepare(att, "list", 100, code=code["list"])
    outside = (R.memory_bytes("list", 100) + (4 << 20)) & ~0xFFF
    att.write(R.ARGS_GPA, np.uint64(outside).tobytes())
    R.start(att.uc, p)
    with pytest.raises(unicorn.UcError) as e:
        att.emu_start(R.LOAD_GPA, R.EXIT_GPA)
    assert e.value.errno == UC.UC_ERR_EXCEPTION
    assert att.fault == (outside, "read", "emulated")
    assert att.stats["fills_denied_read"] == 1
    assert vm.stats["faults_emulate"] == 1
    assert vm.layout.is_mmio_spte(vm.walk(outside >> 12)[-1][1])
    vm.audit()


def test_an_address_beyond_the_guest_width_faults_the_guest(code):
    vm, _slot, v = make(name="list", size=100)
    att = sfu.attach(new_uc(), v)
    p = R.prepare(att, "list", 100, code=code["list"])
    far = 1 << 50                               # beyond 4-level EPT's 48 bits
    att.write(R.ARGS_GPA, np.uint64(far).tobytes())
    R.start(att.uc, p)
    with pytest.raises(unicorn.UcError):
        att.emu_start(R.LOAD_GPA, R.EXIT_GPA)
    assert att.fault == (far, "read", "beyond_address_width")
    vm.audit()


@pytest.mark.parametrize("callback", ["c", "python"])
def test_out_of_page_table_memory_is_raised_by_emu_start(code, callback):
    vm, _slot, v = make(name="list", size=3000, max_level=1, max_pt_pages=8)
    att = sfu.attach(new_uc(), v, callback=callback)
    p = R.prepare(att, "list", 3000, code=code["list"])
    R.start(att.uc, p)
    with pytest.raises(sf.OutOfMemory):
        att.emu_start(R.LOAD_GPA, R.EXIT_GPA)
    assert att.fault[2] == "model_error"
    vm.audit()


# -- attach / detach ------------------------------------------------------------------------

def test_attach_refuses_bad_arguments():
    vm, _slot, v = make(name="list", size=100)
    uc = new_uc()
    with pytest.raises(TypeError):
        sfu.attach(object(), v)
    with pytest.raises(ValueError):
        sfu.attach(uc, v, callback="rust")
    with pytest.raises(TypeError):
        sfu.attach(uc, v, guest=object())
    with pytest.raises(TypeError):
        sfu.attach(uc, object())
    rvm, _s, rv = make(reference, name="list", size=100)
    with pytest.raises(TypeError):
        sfu.attach(uc, rv, callback="c")      # the C path needs the engine
    assert uc.mem_regions() is not None and list(uc.mem_regions()) == []   # nothing done
    att = sfu.attach(uc, v)
    with pytest.raises(ValueError):
        sfu.attach(uc, v)
    att.detach()
    with pytest.raises(ValueError):
        att.detach()
    with pytest.raises(ValueError):
        att.emu_start(R.LOAD_GPA, R.EXIT_GPA)


def test_detach_restores_the_emulator(code):
    """After detach no fill reaches spte_fast: the hook is gone, the memory attach mapped is
    unmapped, and unicorn translates by itself again."""
    vm, _slot, v = make(name="list", size=100)
    uc = new_uc()
    att = sfu.attach(uc, v)
    assert [(b, e) for b, e, _ in uc.mem_regions()] == \
        [(HOST_PFN << 12, (HOST_PFN << 12) + R.memory_bytes("list", 100) - 1)]
    run(att, code, "list", 100)
    fills = att.stats["tlb_fills"]
    att.detach()
    assert list(uc.mem_regions()) == []
    uc.mem_map(0, R.memory_bytes("list", 100))
    p = R.prepare(R.FlatMemory(uc), "list", 100, code=code["list"])
    R.start(uc, p)
    uc.emu_start(R.LOAD_GPA, R.EXIT_GPA)
    p.check(R.FlatMemory(uc))
    assert att.stats["tlb_fills"] == fills
    assert not hasattr(uc, "_spte_fast_attachment")


def test_memslots_added_after_attach_are_mapped_at_the_next_run(code):
    vm = sf.Vm(sf.SpteLayout.ept())
    v = vm.vcpu()
    att = sfu.attach(new_uc(), v)
    assert list(att.uc.mem_regions()) == []
    vm.add_memslot(0, R.memory_bytes("list", 100) >> 12, HOST_PFN)
    run(att, code, "list", 100)
    assert att.host_address(0x1234) == (HOST_PFN << 12) + 0x1234
    with pytest.raises(ValueError):
        att.host_address(1 << 40)


def test_a_zap_between_runs_is_seen_by_the_next_run(code):
    """zap_gfn_range flushes; emu_start flushes unicorn's TLB, so the next run walks again
    and re-faults every page it touches."""
    vm, _slot, v = make(name="list", size=500, max_level=1)
    att = sfu.attach(new_uc(), v)
    run(att, code, "list", 500)
    exits = att.stats["fill_exits"]
    run(att, code, "list", 500)
    assert att.stats["fill_exits"] == exits     # everything mapped: no exit
    vm.zap_gfn_range(0, 1 << 20)
    run(att, code, "list", 500)
    assert att.stats["fill_exits"] == 2 * exits
    assert vm.stats["faults_fixed"] == 2 * exits


# -- spte-fast emulate ------------------------------------------------------------------------

@pytest.fixture
def cli(monkeypatch, tmp_path_factory):
    """cli.main in-process, the routines built into a cache of this test run."""
    from spte_fast import cli as _cli
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg"))
    return _cli.main


@pytest.mark.parametrize("name", list(R.ROUTINES))
def test_emulate_runs_each_bundled_routine(cli, capsys, name):
    assert cli(["emulate", name, "--size", str(SMALL[name]), "--json"]) == 0
    import json
    doc = json.loads(capsys.readouterr().out)
    assert doc["check"].startswith("right") and doc["audit"] == "passed"
    assert doc["config"]["size"] == SMALL[name]
    assert doc["instructions"] > 0 and doc["tlb_fills"]["tlb_fills"] > 0
    st, fills = doc["stats"], doc["tlb_fills"]
    assert fills["fill_exits"] == st["faults_fixed"] == st["pages_2m"] + st["pages_4k"] > 0


def test_emulate_with_guest_paging(cli, capsys):
    """--guest-paging tdp: 2M guest pages over 4-level EPT with 4K leaves, so a warm walk
    reads 3 x (4 + 1) + 4 = 19 entries; every fill is a guest walk."""
    assert cli(["emulate", "list", "--size", "3000", "--max-level", "4k",
                "--guest-paging", "tdp", "--json"]) == 0
    import json
    doc = json.loads(capsys.readouterr().out)
    hw, f = doc["hardware"], doc["tlb_fills"]
    assert doc["check"].startswith("right") and doc["config"]["guest_paging"] == "tdp"
    assert hw["guest_walks"] >= f["tlb_fills"] > 0 and hw["guest_faults"] == 0
    warm = hw["guest_walks"] - f["fill_exits"] * 1        # walks that did not exit
    assert 19 * warm <= hw["guest_walk_refs"] <= 19 * hw["guest_walks"]
    assert cli(["emulate", "list", "--size", "3000", "--guest-paging", "tdp"]) == 0
    assert "guest walks  " in capsys.readouterr().out


def test_emulate_report_and_output_dir(cli, capsys, tmp_path):
    out = tmp_path / "run"
    assert cli(["emulate", "matmul", "--size", "16", "--layout", "npt", "--max-level", "4k",
                "-o", str(out)]) == 0
    text = capsys.readouterr().out
    for row in ("result       right", "instructions ", "TLB fills    ", "exits        ",
                "leaves       4K ", "audit        passed", "layout npt"):
        assert row in text, row
    import json
    doc = json.loads((out / "stats.json").read_text())
    assert doc["config"]["layout"] == "npt" and doc["stats"]["pages_2m"] == 0
    assert doc["stats"]["pages_4k"] == doc["tlb_fills"]["fill_exits"]


def _flat(tmp_path, hexcode):
    path = tmp_path / "prog.bin"
    path.write_bytes(bytes.fromhex(hexcode))
    return str(path)


def test_emulate_a_flat_binary(cli, capsys, tmp_path):
    # mov rax, [0x2000]; mov [0x3000], rax; hlt
    prog = _flat(tmp_path, "488b042500200000" "4889042500300000" "f4")
    assert cli(["emulate", prog, "--max-level", "4k", "--json"]) == 0
    import json
    doc = json.loads(capsys.readouterr().out)
    assert doc["check"].startswith("not checked")
    f = doc["tlb_fills"]
    # code page (fetch), 0x2000 (read), 0x3000 (write) and nothing else: stack unused
    assert (f["fill_exits_fetch"], f["fill_exits_read"], f["fill_exits_write"]) == (1, 1, 1)
    assert doc["stats"]["pages_4k"] == 3 and doc["instructions"] == 3


def test_emulate_reports_a_guest_fault(cli, capsys, tmp_path):
    # mov rax, [0x40000000]: past the 64 MiB guest, an MMIO access nothing answers
    prog = _flat(tmp_path, "488b042500000040" "f4")
    assert cli(["emulate", prog, "--no-count"]) == 1
    err = capsys.readouterr().err
    assert "the guest stopped at rip 0x1000" in err and "read of 0x40000000, emulated" in err


@pytest.mark.parametrize("argv,msg", [
    (["emulate", "sort", "--guest-paging", "shadow"], "needs the shadow MMU"),
    (["emulate", "no-such-routine"], "neither a bundled routine"),
    (["emulate", "sort", "--layout", "x86"], "invalid choice"),
    (["emulate", "sort", "--size", "0"], "at least 1"),
    (["emulate", "sort", "--timeout", "-1"], "seconds must be >= 0"),
    (["emulate", "sort", "--timeout", "nan"], "seconds must be >= 0"),
    (["emulate", "sort", "--guest-size", "1M"], "applies to a flat binary"),
    (["emulate", "sort", "--size", "10G"], "emulate maps at most 16.0 GiB"),
])
def test_emulate_refuses_bad_input(cli, capsys, argv, msg):
    assert cli(argv) == 2
    assert msg in capsys.readouterr().err


@pytest.mark.parametrize("callback", ["c", "python"])
@pytest.mark.parametrize("kind", ["ept_ad", "npt"])
def test_an_exec_fault_splits_a_huge_page_without_a_flush(kind, callback):
    """The NX huge-page mitigation: a read maps region 1 with a non-executable 2M leaf;
    jumping into it is an exec fault that cannot use a huge page, and 6.10's
    kvm_tdp_mmu_map splits the huge SPTE in place (tdp_mmu_split_huge_page: 512 4K leaves
    of the same pfns, "the translation will be the same either way", no TLB flush) and then
    maps the exec page.  So the emulator's TLB is not flushed, and the re-read of page 0x201
    is answered by its cached entry: no fill, no fault."""
    vm, _slot, v = make(kind=kind, name="list", size=1 << 18, nx_huge_pages=True)
    att = sfu.attach(new_uc(), v, callback=callback)
    # 0x1000: mov rax, [0x201000]; mov rbx, 0x200000; jmp rbx
    att.write(0x1000, bytes.fromhex("488b042500102000" "48c7c300002000" "ffe3"))
    # 0x200000: mov rcx, [0x201000]; hlt
    att.write(0x200000, bytes.fromhex("488b0c2500102000" "f4"))
    att.emu_start(0x1000, 0x1001)
    leaves = present_leaves(vm)
    assert {g for g, (lvl, _) in leaves.items() if lvl == 1} == \
        {0x1} | set(range(0x200, 0x400))
    assert all(lvl == 1 for lvl, _ in leaves.values())
    assert v.stats["faults_fixed"] == 3          # code, the 2M read, the exec split
    st = att.stats
    assert (st["fill_exits_fetch"], st["fill_exits_read"]) == (2, 1)
    assert st["tlb_fills_read"] == 1             # the re-read hit unicorn's TLB
    assert st["emulator_tlb_flushes"] == 1       # attach's only
    assert vm.stats["tlb_flushes"] + vm.stats["tlb_flushes_ranged"] == 0
    vm.audit()


# -- guest paging: the two-dimensional walk answers the fills ---------------------------------

def guest_tables(vm, name, size, level=2):
    """The guest maps its RAM at the same virtual addresses (the routines are linked at
    0x1000 and use absolute addresses), with 2M pages, tables after the routine's memory."""
    mem_pages = R.memory_bytes(name, size) >> 12
    pt = sf.GuestPageTables(vm, table_gfns=(mem_pages, mem_pages + 64))
    step = 512 if level == 2 else 1
    for g in range(0, mem_pages, step):
        pt.map(g << 12, g, level=level)
    return pt


def make_guest(impl=sf, kind="ept_ad", name="sort", size=None, level=2, **vm_kw):
    """A VM whose memslot holds the routine's memory and 64 table frames after it."""
    layout = {"ept_ad": impl.SpteLayout.ept(), "ept_noad": impl.SpteLayout.ept(ad=False),
              "npt": impl.SpteLayout.npt()}[kind]
    vm = impl.Vm(layout, **vm_kw)
    vm.add_memslot(0, (R.memory_bytes(name, size) >> 12) + 64, HOST_PFN)
    return vm, guest_tables(vm, name, size, level), vm.vcpu()


@pytest.mark.parametrize("callback", ["c", "python"])
@pytest.mark.parametrize("kind", ["ept_ad", "npt"])
@pytest.mark.parametrize("name", list(R.ROUTINES))
def test_routines_run_with_guest_paging(code, name, kind, callback):
    """Every fill a guest-virtual access: the results are right, and each fill walked the
    guest's tables in two dimensions (their pages are mapped by the TDP MMU too)."""
    vm, pt, v = make_guest(kind=kind, name=name, size=SMALL[name], max_level=1)
    with sfu.attach(new_uc(), v, guest=pt, callback=callback) as att:
        run(att, code, name, SMALL[name])
        st = att.stats
    assert v.cr3 == pt.root_gpa
    assert st["fills_denied"] == 0 and v.stats["guest_faults"] == 0
    assert v.stats["guest_walks"] >= st["tlb_fills"]
    leaves = present_leaves(vm)
    assert set(pt.tables[:4]) <= set(leaves)             # the guest's tables were walked
    vm.audit()


@pytest.mark.parametrize("kind", ["ept_ad", "ept_noad", "npt"])
def test_guest_paging_c_and_python_callbacks_and_the_oracle_agree(code, kind):
    out = []
    for impl, cb in ((sf, "c"), (sf, "python"), (reference, "python")):
        vm, pt, v = make_guest(impl, kind=kind, name="list", size=SMALL["list"], level=1,
                               max_level=1)
        with sfu.attach(new_uc(), v, guest=pt, callback=cb) as att:
            run(att, code, "list", SMALL["list"], seed=2)
            tables = vm.read_guest(pt.tables[0] << 12, 512 * len(pt.tables)).tolist()
            out.append((_state(vm), att.stats, v.stats, tables))
    assert out[0] == out[1] == out[2]


@pytest.mark.parametrize("callback", ["c", "python"])
def test_an_address_the_guest_does_not_map_is_its_page_fault(code, callback):
    vm, pt, v = make_guest(name="list", size=100, level=1, max_level=1)
    pt.unmap(0x8000)                                     # the argument block's page
    att = sfu.attach(new_uc(), v, guest=pt, callback=callback)
    p = R.prepare(att, "list", 100, code=code["list"])
    R.start(att.uc, p)
    with pytest.raises(unicorn.UcError):
        att.emu_start(R.LOAD_GPA, R.EXIT_GPA)
    assert att.fault == (0x8000, "read", "guest_page_fault")
    assert v.stats["guest_faults"] >= 1


@pytest.mark.parametrize("callback", ["c", "python"])
def test_a_guest_read_only_page_refuses_the_write(code, callback):
    """The guest maps the argument block read-only: the first store to it (the routine's
    results) is the guest's page fault -- the TLB entry of the earlier read had no W."""
    vm, pt, v = make_guest(name="list", size=100, level=1, max_level=1)
    pt.protect(0x8000, writable=False)
    att = sfu.attach(new_uc(), v, guest=pt, callback=callback)
    p = R.prepare(att, "list", 100, code=code["list"])
    R.start(att.uc, p)
    with pytest.raises(unicorn.UcError):
        att.emu_start(R.LOAD_GPA, R.EXIT_GPA)
    assert att.fault == (0x8000, "write", "guest_page_fault")
    assert att.stats["tlb_fills_read"] >= 1


@pytest.mark.parametrize("name", ["sort", "list", "matmul"])
def test_guest_paging_leaves_match_the_pages_and_tables_touched(code, name):
    """With guest paging (4K guest pages mapping gva = gpa, 4K EPT leaves) the TDP leaves are
    exactly the data pages unicorn's memory hooks saw on a plain run plus the guest's table
    pages on their walks: the root, its L3 and L2 tables, and the L1 table of every 2M
    region touched (decoded from the L2 table in guest memory)."""
    size = SMALL[name]
    first = touched(code, name, size)
    vm, pt, v = make_guest(name=name, size=size, level=1, max_level=1)
    with sfu.attach(new_uc(), v, guest=pt) as att:
        run(att, code, name, size)
    root = pt.root_gpa
    l3 = (vm.read_guest(root) & 0x000F_FFFF_FFFF_F000) >> 12
    l2 = (vm.read_guest(l3 << 12) & 0x000F_FFFF_FFFF_F000) >> 12
    l1 = {(vm.read_guest((l2 << 12) + 8 * (p >> 9)) & 0x000F_FFFF_FFFF_F000) >> 12
          for p in first}
    want = set(first) | {root >> 12, l3, l2} | l1
    leaves = present_leaves(vm)
    assert set(leaves) == want
    assert all(level == 1 for level, _ in leaves.values())
    assert vm.stats["faults_fixed"] == len(want)
