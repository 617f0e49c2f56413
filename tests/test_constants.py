"""Constants, static facts and the build shape (docs/API.md "Constants", STYLE.md §3.3, §3.7).

Every constant of API.md has its documented value in both implementations; the
fast and the reference module agree name by name; the compile-time facts that
``_core.pxd`` asserts with ``_Static_assert`` (KVM's ``static_assert``s) hold
at run time too; ``import spte_fast`` exposes exactly ``__all__``.
"""
import enum
import subprocess
import sys
import types

import pytest

import spte_fast.errors as errors_mod

SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF

#: API.md "Constants", verbatim
CONSTANTS = {
    "PG_LEVEL_4K": 1,
    "PG_LEVEL_2M": 2,
    "PG_LEVEL_1G": 3,
    "PT64_ROOT_MAX_LEVEL": 5,
    "SPTE_ENT_PER_PAGE": 512,
    "KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE": 40,
    "ACC_EXEC_MASK": 1,
    "ACC_WRITE_MASK": 2,
    "ACC_USER_MASK": 4,
    "ACC_ALL": 7,
    "SPTE_MMU_PRESENT_MASK": 1 << 11,
    "SHADOW_NONPRESENT_VALUE": 1 << 63,
    "FROZEN_SPTE": (1 << 63) | 0x5A0,
    "REMOVED_SPTE": (1 << 63) | 0x5A0,
    "FROZEN_SPTE_BITS": 0x5A0,
    "SPTE_BASE_ADDR_MASK": SPTE_BASE_ADDR_MASK,
    "PT_PAGE_SIZE_MASK": 1 << 7,
    "PT_WRITABLE_MASK": 1 << 1,
    "PT_PRESENT_MASK": 1 << 0,
    "SPTE_TDP_AD_SHIFT": 52,
    "SPTE_TDP_AD_MASK": 3 << 52,
    "SPTE_TDP_AD_ENABLED": 0,
    "SPTE_TDP_AD_DISABLED": 1 << 52,
    "SPTE_TDP_AD_WRPROT_ONLY": 2 << 52,
    "SHADOW_ACC_TRACK_SAVED_BITS_MASK": 5,
    "SHADOW_ACC_TRACK_SAVED_BITS_SHIFT": 54,
    "EPT_SPTE_HOST_WRITABLE": 1 << 57,
    "EPT_SPTE_MMU_WRITABLE": 1 << 58,
    "DEFAULT_SPTE_HOST_WRITABLE": 1 << 9,
    "DEFAULT_SPTE_MMU_WRITABLE": 1 << 10,
    "VMX_EPT_SUPPRESS_VE_BIT": 1 << 63,
    "VMX_EPT_RWX_MASK": 7,
    "VMX_EPT_MISCONFIG_WX_VALUE": 6,
    "VMX_EPT_MEMTYPE_WB_IPAT": 0x70,
    "MMIO_SPTE_GEN_MASK": 0x7FFFF,
    "MMIO_SPTE_GEN_LOW_START": 3,
    "MMIO_SPTE_GEN_LOW_END": 10,
    "MMIO_SPTE_GEN_HIGH_START": 52,
    "MMIO_SPTE_GEN_HIGH_END": 62,
    "NPT_MMIO_VALUE": (1 << 51) | 1,
}

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


def bits(lo, hi):
    """Mask of bits lo..hi inclusive."""
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


# --------------------------------------------------------------------------
# Documented values, both implementations
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_constant_has_documented_value(impl, name):
    value = getattr(impl, name)
    assert isinstance(value, int) and not isinstance(value, bool)
    assert value == CONSTANTS[name], f"{name} = {value:#x}, API.md says {CONSTANTS[name]:#x}"


def test_removed_spte_is_alias_of_frozen_spte(impl):
    """FROZEN_SPTE is the >= 6.11 name of v6.10's REMOVED_SPTE (spec §1.1)."""
    assert impl.REMOVED_SPTE == impl.FROZEN_SPTE == impl.SHADOW_NONPRESENT_VALUE | impl.FROZEN_SPTE_BITS


def test_pf_is_intenum_with_ret_pf_numbers(impl):
    assert issubclass(impl.PF, enum.IntEnum)
    assert {m.name: int(m) for m in impl.PF} == {
        "CONTINUE": 0,
        "RETRY": 1,
        "EMULATE": 2,
        "INVALID": 3,
        "FIXED": 4,
        "SPURIOUS": 5,
    }


@pytest.mark.parametrize("name", sorted(CONSTANTS))
def test_fast_constant_equals_reference_constant(fast, reference, name):
    """STYLE.md §3.3: drift between _core and reference is caught name by name."""
    assert getattr(fast, name) == getattr(reference, name)


def test_every_public_int_constant_of_fast_matches_reference(fast, reference):
    """Also the UPPER_CASE ints API.md does not list, if the fast module exports any."""
    upper = [n for n in fast.__all__ if n.isupper() and isinstance(getattr(fast, n), int)]
    assert set(CONSTANTS) <= set(upper)
    for name in upper:
        assert hasattr(reference, name), f"reference lacks {name}"
        assert getattr(fast, name) == getattr(reference, name), name


# --------------------------------------------------------------------------
# Static facts (the _Static_asserts / KVM static_asserts, spec §1.2, §2.2)
# --------------------------------------------------------------------------


def test_nonpresent_value_does_not_overlap_mmu_present_bit(impl):
    assert impl.SHADOW_NONPRESENT_VALUE & impl.SPTE_MMU_PRESENT_MASK == 0


def test_frozen_spte_has_no_rwx_p_or_present_bit(impl):
    """0x5a0 = bits 5, 7, 8, 10: not present on EPT (RWX) nor NPT (P), not bit 11 (spec §1.2)."""
    assert impl.FROZEN_SPTE & impl.VMX_EPT_RWX_MASK == 0
    assert impl.FROZEN_SPTE & impl.PT_PRESENT_MASK == 0
    assert impl.FROZEN_SPTE & impl.SPTE_MMU_PRESENT_MASK == 0
    assert impl.FROZEN_SPTE & impl.SPTE_BASE_ADDR_MASK == 0  # no PFN bits: no L1TF exposure
    assert impl.FROZEN_SPTE_BITS == (1 << 5) | (1 << 7) | (1 << 8) | (1 << 10)
    assert impl.FROZEN_SPTE != impl.SHADOW_NONPRESENT_VALUE


def test_ad_type_field_disjoint_from_saved_access_bits(impl):
    saved = impl.SHADOW_ACC_TRACK_SAVED_BITS_MASK << impl.SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    assert saved == (1 << 54) | (1 << 56)
    assert impl.SPTE_TDP_AD_MASK & saved == 0
    assert impl.SPTE_TDP_AD_MASK == bits(52, 53)
    assert impl.SPTE_TDP_AD_MASK == 3 << impl.SPTE_TDP_AD_SHIFT


def test_ad_type_field_disjoint_from_host_and_mmu_writable_bits(impl):
    writable = (
        impl.EPT_SPTE_HOST_WRITABLE
        | impl.EPT_SPTE_MMU_WRITABLE
        | impl.DEFAULT_SPTE_HOST_WRITABLE
        | impl.DEFAULT_SPTE_MMU_WRITABLE
    )
    assert impl.SPTE_TDP_AD_MASK & writable == 0
    saved = impl.SHADOW_ACC_TRACK_SAVED_BITS_MASK << impl.SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
    assert saved & writable == 0


def test_ad_type_values_lie_inside_the_field(impl):
    for v in (impl.SPTE_TDP_AD_ENABLED, impl.SPTE_TDP_AD_DISABLED, impl.SPTE_TDP_AD_WRPROT_ONLY):
        assert v & ~impl.SPTE_TDP_AD_MASK == 0
    assert impl.SPTE_TDP_AD_ENABLED == 0  # must be 0: bits 52-62 are reserved in PAE (spec §2.2)
    assert len({impl.SPTE_TDP_AD_ENABLED, impl.SPTE_TDP_AD_DISABLED, impl.SPTE_TDP_AD_WRPROT_ONLY}) == 3


def test_mmio_generation_ranges_disjoint_from_present_bit_and_pfn_field(impl):
    low = bits(impl.MMIO_SPTE_GEN_LOW_START, impl.MMIO_SPTE_GEN_LOW_END)
    high = bits(impl.MMIO_SPTE_GEN_HIGH_START, impl.MMIO_SPTE_GEN_HIGH_END)
    for gen_bits in (low, high):
        assert gen_bits & impl.SPTE_MMU_PRESENT_MASK == 0
        assert gen_bits & impl.SPTE_BASE_ADDR_MASK == 0
    assert low & high == 0
    # the two ranges hold exactly the 19-bit generation
    width = bin(low).count("1") + bin(high).count("1")
    assert width == 19 == impl.MMIO_SPTE_GEN_MASK.bit_length()
    assert impl.MMIO_SPTE_GEN_MASK == (1 << 19) - 1
    # and neither range touches bit 63 (suppress #VE / the non-present value)
    assert (low | high) & impl.SHADOW_NONPRESENT_VALUE == 0


def test_base_addr_mask_is_bits_12_to_51(impl):
    assert impl.SPTE_BASE_ADDR_MASK == bits(12, 51)
    assert impl.SPTE_BASE_ADDR_MASK >> 12 == (1 << 40) - 1


def test_npt_mmio_value_is_reserved_bit_51_plus_p_and_not_present(impl):
    assert impl.NPT_MMIO_VALUE & impl.SPTE_MMU_PRESENT_MASK == 0
    assert impl.NPT_MMIO_VALUE & impl.PT_PRESENT_MASK


def test_access_masks_compose_acc_all(impl):
    assert impl.ACC_EXEC_MASK | impl.ACC_WRITE_MASK | impl.ACC_USER_MASK == impl.ACC_ALL
    assert impl.ACC_EXEC_MASK & impl.ACC_WRITE_MASK & impl.ACC_USER_MASK == 0


# --------------------------------------------------------------------------
# Errors (API.md "Errors")
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Build shape
# --------------------------------------------------------------------------


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
    """API.md: "Both modules export the same names"."""
    assert set(reference.__all__) == set(fast.__all__)


def test_reference_is_not_imported_by_the_package():
    """STYLE.md §3.1: reference.py is never imported by ``__init__``."""
    code = "import sys, spte_fast; print('spte_fast.reference' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
