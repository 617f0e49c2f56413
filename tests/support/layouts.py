"""Layout and VM factories (docs/API.md "SpteLayout", "Vm, Vcpu") and the spec formulas of
the entries the fault path installs (KVM_MMU_SPEC.md §2.5, API.md fault semantics)."""
import pytest

from support.spec import ACC_ALL, BIT_AD_DISABLED, BIT_PRESENT, NP63, PFN0, W_BIT

#: layout kinds used for parametrisation: EPT with A/D, EPT without A/D, EPT exec-only, NPT
LAYOUT_KINDS = ("ept_ad", "ept_noad", "ept_xo", "npt")
NONPRESENT_VALUES = (NP63, 0)


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
    """``(impl.Vm(layout, **kwargs), layout)``; ``max_pt_pages`` defaults to 256."""
    kwargs.setdefault("max_pt_pages", 256)
    layout = make_layout(impl, kind, nonpresent)
    return impl.Vm(layout, **kwargs), layout


def vm_4k(impl, kind="ept_ad", nonpresent=NP63, **kw):
    """A VM whose faults always map 4K (max_level 1) with one 4 MiB slot at gfn 0 (host pfn
    PFN0); returns ``(vm, layout, vcpu)``."""
    kw.setdefault("max_level", 1)
    vm, layout = make_vm(impl, kind, nonpresent, **kw)
    vm.add_memslot(0, 1024, PFN0)
    return vm, layout, vm.vcpu()


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


def load_root(impl, vcpu):
    """Make ``vcpu`` load a root (6.10 kvm_mmu_reload -> kvm_mmu_load on vCPU entry) without
    changing any table: a reserved-bit fault on an empty walk is handed to
    handle_mmio_page_fault, which finds no MMIO SPTE and returns RET_PF_RETRY without
    installing anything (mmu.c kvm_mmu_page_fault / handle_mmio_page_fault).  Returns the
    root's pool index."""
    from support.spec import PF_RETRY

    assert vcpu.fault(0, error_code=impl.PFERR_RSVD_MASK) == PF_RETRY
    assert vcpu.root is not None
    return vcpu.root
