"""Embedding: another Cython extension cimports spte_fast and runs its C API (DESIGN.md).

tests/embed/embed_demo.pyx is compiled here (cythonize + setuptools, into a temporary
directory) against the ``.pxd`` that ships beside the installed package, then:
the memset64 kernel, the count kernel and the inline constructors fill and build a table
with no Python in the loop; a Python Vcpu's ``kvm_vcpu_t`` faults a guest through
``vcpu_fault`` and a Vm's cdef class layout is read directly; all are checked against the
Python API on the same input.
Skipped (with the reason) when no C compiler is available.
"""
import importlib.util
import os
import shutil
import sys
import sysconfig
import warnings

import numpy as np
import pytest

import spte_fast as sf

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_DIR = os.path.dirname(os.path.abspath(sf.__file__))


def _have_compiler():
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(os.environ.get("CC", cc).split()[0]) is not None


@pytest.fixture(scope="module")
def embed(tmp_path_factory):
    """The compiled tests/embed/embed_demo extension module."""
    if not _have_compiler():
        pytest.skip("no C compiler: the embedding example cannot be compiled")
    Cython = pytest.importorskip("Cython.Build", reason="Cython is needed to compile .pyx")
    from setuptools import Distribution, Extension
    build = tmp_path_factory.mktemp("embed")
    src = build / "embed_demo.pyx"
    shutil.copy(os.path.join(HERE, "embed", "embed_demo.pyx"), src)
    with warnings.catch_warnings():          # build-tool chatter is not under test here
        warnings.simplefilter("ignore")
        exts = Cython.cythonize(
            [Extension("embed_demo", [str(src)],
                       include_dirs=[np.get_include(), sf.get_include()])], quiet=True,
            include_path=[os.path.dirname(PKG_DIR)],      # finds spte_fast/_core.pxd
            compiler_directives={"language_level": 3})
        dist = Distribution({"ext_modules": exts, "script_name": "setup.py"})
        cmd = dist.get_command_obj("build_ext")
        cmd.build_lib = str(build)
        cmd.build_temp = str(build / "tmp")
        cmd.ensure_finalized()
        cmd.run()
    path = cmd.get_ext_fullpath("embed_demo")
    spec = importlib.util.spec_from_file_location("embed_demo", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pxd_and_headers_ship_with_the_package():
    # The package data that pip installs beside the module (pyproject: package-data).
    for name in ("_core.pxd", "spte.pxd"):
        assert os.path.isfile(os.path.join(PKG_DIR, name))
    for header in ("spte_defs.h", "spte_atomic.h", "spte_memset64.h"):
        assert os.path.isfile(os.path.join(sf.get_include(), header))


@pytest.mark.parametrize("layout", [sf.SpteLayout.ept(), sf.SpteLayout.ept(nonpresent_value=0),
                                    sf.SpteLayout.npt(), sf.SpteLayout.ept(ad=False)],
                         ids=["ept", "ept-np0", "npt", "ept-noad"])
def test_kernels_and_constructors_from_c(embed, layout):
    pages = np.full((4, 512), 0x1234, dtype=np.uint64)
    counts, leaf5, nonleaf = embed.build_table(layout, pages, 0x5000)
    # fill_pages_kernel wrote the non-present value everywhere but the two C-built entries.
    assert counts == [512, 1, 0, 0]
    assert (pages[2:] == layout.nonpresent_value).all()
    assert (pages[1, 1:] == layout.nonpresent_value).all()
    # make_spte / make_nonleaf_spte inlined from the .pxd == the Python API.
    assert leaf5 == layout.make_spte(0x5005)[1] == pages[0, 5]
    assert nonleaf == layout.make_nonleaf_spte(0)
    assert [int(x) for x in pages[0, :3]] == [layout.make_spte(0x5000 + i)[1] for i in range(3)]


@pytest.mark.parametrize("layout_name", ["ept", "legacy", "npt"])
def test_fault_path_from_c_matches_the_python_vm(embed, layout_name, seed):
    layout = {"ept": sf.SpteLayout.ept(), "legacy": sf.SpteLayout.ept(nonpresent_value=0),
              "npt": sf.SpteLayout.npt()}[layout_name]
    rng = np.random.default_rng(seed)
    npages, pfn = 1 << 16, 0x100000                  # 256 MiB slot; gfns above it are MMIO
    gfns = rng.integers(0, npages + 4096, 20000, dtype=np.uint64)
    gfns[:512] = np.arange(512, dtype=np.uint64)      # one whole 2M region
    access = rng.integers(0, 4, gfns.size, dtype=np.uint8)
    for max_level in (sf.PG_LEVEL_4K, sf.PG_LEVEL_2M):
        embedded = sf.Vm(layout, root_level=4, max_level=max_level, max_pt_pages=1024)
        embedded.add_memslot(0, npages, pfn)
        counts, leaves, mmio = embed.fault_gfns(embedded.vcpu(), gfns, access)
        embedded.audit()

        vm = sf.Vm(layout, root_level=4, max_level=max_level, max_pt_pages=1024)
        vm.add_memslot(0, npages, pfn)
        out = np.zeros(gfns.size, dtype=np.int8)
        res = vm.vcpu().fault_batch(gfns, access, out=out)
        expected = [vm.walk(int(g))[-1][1] for g in gfns]

        assert counts[sf.PF.FIXED] == res["fixed"] > 0
        assert counts[sf.PF.SPURIOUS] == res["spurious"] > 0
        assert counts[sf.PF.EMULATE] == res["emulate"] > 0
        assert leaves == expected
        assert mmio == int((gfns >= npages).sum())
        assert embedded.stats == vm.stats
        if max_level == sf.PG_LEVEL_2M:
            assert vm.lookup(0)[1] == sf.PG_LEVEL_2M


@pytest.mark.parametrize("layout_name", ["ept", "npt"])
def test_the_hardware_view_from_c_matches_access_batch(embed, layout_name):
    """vcpu_access (the embedding API) is what Vcpu.access_batch does, access for access:
    the same codes, the same tables, the same counters."""
    layout = {"ept": sf.SpteLayout.ept(), "npt": sf.SpteLayout.npt()}[layout_name]
    rng = np.random.default_rng(5)
    npages = 1 << 14
    gfns = rng.integers(0, npages + 1024, 5000, dtype=np.uint64)      # some past the slot
    kind = rng.integers(0, 3, gfns.size, dtype=np.uint8)
    vms = []
    for _ in range(2):
        vm = sf.Vm(layout, max_level=sf.PG_LEVEL_2M, max_pt_pages=512)
        vm.add_memslot(0, npages, 0x100000)
        vms.append(vm)
    codes = embed.access_gfns(vms[0].vcpu(), gfns, kind)
    out = np.zeros(gfns.size, dtype=np.int8)
    res = vms[1].vcpu().access_batch(gfns, kind, out=out)
    assert codes == out.tolist()
    assert res["hits"] == codes.count(0) > 0 and res["emulate"] > 0
    assert vms[0].stats == vms[1].stats
    assert vms[0].tdp_iter(0, vms[0].gfn_limit) == vms[1].tdp_iter(0, vms[1].gfn_limit)
    vms[0].audit()


@pytest.mark.parametrize("layout_name", ["ept", "npt"])
def test_a_tlb_fill_from_c_is_the_access_then_the_leaf(embed, layout_name):
    """vcpu_tlb_fill (the embedding API an emulator's TLB miss calls): the access exactly as
    access_batch runs it, then what the TLB caches -- the leaf's level, the host pfn of the
    gfn (slot pfn + offset, DESIGN.md), and the permissions: RAM leaves are RWX (EPT
    ACC_ALL; NPT P|U|W without NX), a write only with D set (SDM vol. 3 §29.3.5, APM vol. 2
    §15.25.7); nothing for an emulated (MMIO) access."""
    layout = {"ept": sf.SpteLayout.ept(), "npt": sf.SpteLayout.npt()}[layout_name]
    rng = np.random.default_rng(6)
    npages, pfn0 = 1 << 14, 0x100000
    gfns = rng.integers(0, npages + 1024, 3000, dtype=np.uint64)      # some past the slot
    kind = rng.integers(0, 3, gfns.size, dtype=np.uint8)
    vms = []
    for _ in range(2):
        vm = sf.Vm(layout, max_level=sf.PG_LEVEL_2M, max_pt_pages=512)
        vm.add_memslot(0, npages, pfn0, dirty_log=False)
        vms.append(vm)
    fills, counts = embed.tlb_fill_gfns(vms[0].vcpu(), gfns, kind)
    out = np.zeros(gfns.size, dtype=np.int8)
    res = vms[1].vcpu().access_batch(gfns, kind, out=out)
    assert [f[0] for f in fills] == out.tolist()
    assert counts[0] == res["hits"] and counts[sf.PF.FIXED] == res["fixed"]
    assert vms[0].stats == vms[1].stats
    for g, (code, level, pfn, perms) in zip(gfns.tolist(), fills):
        if g >= npages:
            assert (code, level, pfn, perms) == (sf.PF.EMULATE, 0, None, 0)
            continue
        spte, lvl = vms[0].lookup(g)
        assert (level, pfn, perms) == (lvl, pfn0 + g, 7)
        assert layout.spte_to_pfn(spte) + (g & ((1 << (9 * (lvl - 1))) - 1)) == pfn
    with pytest.raises(MemoryError):            # a kind that is none of the three
        embed.tlb_fill_gfns(vms[0].vcpu(), gfns[:1], np.array([3], dtype=np.uint8))


@pytest.mark.parametrize("layout_name,pml", [("ept", True), ("ept", False), ("npt", False)])
def test_a_clean_tlb_entry_does_not_allow_a_write(embed, layout_name, pml):
    """After get_dirty_log re-protects the slot (PML: D cleared; otherwise W removed), a
    read fill caches R|X only, so the next write misses and walks; the write fill sets D
    (PML) or takes the fast page fault, and then caches R|W|X."""
    layout = {"ept": sf.SpteLayout.ept(), "npt": sf.SpteLayout.npt()}[layout_name]
    vm = sf.Vm(layout, max_pt_pages=64, pml=pml)
    slot = vm.add_memslot(0, 512, 0x100000, dirty_log=True)
    v = vm.vcpu()
    g = np.array([7], dtype=np.uint64)
    (first,), _ = embed.tlb_fill_gfns(v, g, np.array([0], dtype=np.uint8))
    assert first == (sf.PF.FIXED, 1, 0x100007, 7)     # a writable leaf made with D
    vm.get_dirty_log(slot)
    (read,), _ = embed.tlb_fill_gfns(v, g, np.array([0], dtype=np.uint8))
    assert read == (0, 1, 0x100007, 5)                 # no exit; R|X: clean or read-only
    (write,), _ = embed.tlb_fill_gfns(v, g, np.array([1], dtype=np.uint8))
    assert write == ((0 if pml else sf.PF.FIXED), 1, 0x100007, 7)
    assert int(vm.get_dirty_log(slot)[0]) == 1 << 7


def test_cdef_class_layouts_reach_the_kvm_mmu_pages(embed):
    """An embedder reads a Vm's kvm_t and the tables' kvm_mmu_page straight from C."""
    vm = sf.Vm(sf.SpteLayout.ept(), root_level=4, max_level=sf.PG_LEVEL_4K, max_pt_pages=64)
    vm.add_memslot(0, 1 << 20, 0x100000)
    gfn = (3 << 27) | (5 << 18) | (7 << 9) | 9         # distinct index at every level
    assert embed.table_levels(vm, gfn) == []           # no root before a vCPU entry
    v = vm.vcpu()
    # the first entry loads the root (kvm_mmu_load); a reserved-bit fault on an empty walk
    # is handle_mmio_page_fault's RETRY and installs nothing
    assert v.fault(gfn, error_code=sf.PFERR_RSVD_MASK) == sf.PF.RETRY
    assert embed.table_levels(vm, gfn) == [(4, 0)]     # only the root before a fault
    v.fault(gfn)
    # tdp_mmu_init_child_sp: level one below the parent entry, gfn = the entry's gfn.
    assert embed.table_levels(vm, gfn) == [(4, 0), (3, 3 << 27), (2, (3 << 27) | (5 << 18)),
                                           (1, (3 << 27) | (5 << 18) | (7 << 9))]
