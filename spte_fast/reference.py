"""Pure-Python oracle of spte_fast: the Linux KVM x86 TDP MMU's SPTEs, Linux v6.10.

This module is the slow, obviously-correct model that the Cython engine
(``spte_fast._core``) is tested against.  It is written from the contract in
``docs/API.md`` and the semantics in ``KVM_MMU_SPEC.md`` (cited as "spec §n"),
paraphrasing upstream Linux v6.10 (``arch/x86/kvm/mmu/{spte.h,spte.c,tdp_iter.c,
tdp_mmu.c}``, ``virt/kvm/kvm_main.c``).  It shares no code with the core:
every constant, mask and algorithm is defined here again, for readability and
not for speed.

Names follow KVM.  ``FROZEN_SPTE`` is the >= 6.11 name of v6.10's
``REMOVED_SPTE``; both names are exported and mean the same value.

Places where API.md says nothing and a choice had to be made are marked with a
comment starting ``API.md is silent:``.
"""
import threading

import numpy as np

from .errors import AuditError, CacheConfigError, OutOfMemory, SpteError
from .pf import PF

__all__ = [
    # constants
    "PG_LEVEL_4K", "PG_LEVEL_2M", "PG_LEVEL_1G", "PT64_ROOT_MAX_LEVEL",
    "SPTE_ENT_PER_PAGE", "KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE",
    "ACC_EXEC_MASK", "ACC_WRITE_MASK", "ACC_USER_MASK", "ACC_ALL",
    "SPTE_MMU_PRESENT_MASK", "SHADOW_NONPRESENT_VALUE",
    "FROZEN_SPTE", "REMOVED_SPTE", "FROZEN_SPTE_BITS",
    "SPTE_BASE_ADDR_MASK", "PT_PAGE_SIZE_MASK", "PT_WRITABLE_MASK", "PT_PRESENT_MASK",
    "SPTE_TDP_AD_SHIFT", "SPTE_TDP_AD_MASK", "SPTE_TDP_AD_ENABLED",
    "SPTE_TDP_AD_DISABLED", "SPTE_TDP_AD_WRPROT_ONLY",
    "SHADOW_ACC_TRACK_SAVED_BITS_MASK", "SHADOW_ACC_TRACK_SAVED_BITS_SHIFT",
    "EPT_SPTE_HOST_WRITABLE", "EPT_SPTE_MMU_WRITABLE",
    "DEFAULT_SPTE_HOST_WRITABLE", "DEFAULT_SPTE_MMU_WRITABLE",
    "VMX_EPT_SUPPRESS_VE_BIT", "VMX_EPT_RWX_MASK", "VMX_EPT_MISCONFIG_WX_VALUE",
    "VMX_EPT_MEMTYPE_WB_IPAT",
    "MMIO_SPTE_GEN_MASK", "MMIO_SPTE_GEN_LOW_START", "MMIO_SPTE_GEN_LOW_END",
    "MMIO_SPTE_GEN_HIGH_START", "MMIO_SPTE_GEN_HIGH_END", "NPT_MMIO_VALUE",
    # page-fault results and errors
    "PF", "SpteError", "OutOfMemory", "CacheConfigError", "AuditError",
    # classes
    "SpteLayout", "PagePool", "MemoryCache", "Vm", "Vcpu",
    # kernels
    "fill_pages", "scan_present", "count_present",
    "cmpxchg", "xchg", "atomic_or", "atomic_and_not",
]

# =================================================================================================
# Constants (spec §1.2, §2)
# =================================================================================================

PG_LEVEL_4K = 1
PG_LEVEL_2M = 2
PG_LEVEL_1G = 3
PT64_ROOT_MAX_LEVEL = 5
SPTE_ENT_PER_PAGE = 512
KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE = 40

# KVM's ACC_* access bits (ACC_WRITE_MASK == PT_WRITABLE_MASK, ACC_USER_MASK == PT_USER_MASK).
ACC_EXEC_MASK = 1
ACC_WRITE_MASK = 2
ACC_USER_MASK = 4
ACC_ALL = ACC_EXEC_MASK | ACC_WRITE_MASK | ACC_USER_MASK

# Bit 11 is ignored by every SPTE flavour, so KVM uses it as "shadow-present" (spec §2.2).
SPTE_MMU_PRESENT_MASK = 1 << 11
# The x86-64 v6.10 non-present value: EPT "suppress #VE", ignored by NPT when P = 0 (spec §1.2).
SHADOW_NONPRESENT_VALUE = 1 << 63
# Bits 5, 7, 8, 10: no RWX/P bit, no PFN bit, not bit 11 (spec §1.2).
FROZEN_SPTE_BITS = 0x5A0
FROZEN_SPTE = SHADOW_NONPRESENT_VALUE | FROZEN_SPTE_BITS
REMOVED_SPTE = FROZEN_SPTE  # the v6.10 name

SPTE_BASE_ADDR_MASK = ((1 << 52) - 1) & ~0xFFF  # PFN field, bits 12..51
PT_PAGE_SIZE_MASK = 1 << 7
PT_WRITABLE_MASK = 1 << 1
PT_PRESENT_MASK = 1 << 0

# A/D tracking type of a TDP SPTE in bits 52..53; "enabled" must be 0 (spec §2.2).
SPTE_TDP_AD_SHIFT = 52
SPTE_TDP_AD_MASK = 3 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_ENABLED = 0 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_DISABLED = 1 << SPTE_TDP_AD_SHIFT
SPTE_TDP_AD_WRPROT_ONLY = 2 << SPTE_TDP_AD_SHIFT

# Access tracking saves R (bit 0) and X (bit 2) at bits 54 and 56; W is never saved.
SHADOW_ACC_TRACK_SAVED_BITS_MASK = 0x1 | 0x4
SHADOW_ACC_TRACK_SAVED_BITS_SHIFT = 54

# Software bits recording why a leaf is not writable (spec §2.2 writable-state table).
EPT_SPTE_HOST_WRITABLE = 1 << 57
EPT_SPTE_MMU_WRITABLE = 1 << 58
DEFAULT_SPTE_HOST_WRITABLE = 1 << 9
DEFAULT_SPTE_MMU_WRITABLE = 1 << 10

VMX_EPT_SUPPRESS_VE_BIT = 1 << 63
VMX_EPT_RWX_MASK = 0x7
VMX_EPT_MISCONFIG_WX_VALUE = 0x6  # W|X without R: an EPT misconfiguration, used for MMIO
VMX_EPT_MEMTYPE_WB_IPAT = 0x70  # memtype WB (6 << 3) | IPAT (bit 6): what KVM gives normal RAM

# 19-bit MMIO generation: bits 0..7 at SPTE bits 3..10, bits 8..18 at SPTE bits 52..62.
MMIO_SPTE_GEN_MASK = 0x7FFFF
MMIO_SPTE_GEN_LOW_START = 3
MMIO_SPTE_GEN_LOW_END = 10
MMIO_SPTE_GEN_HIGH_START = 52
MMIO_SPTE_GEN_HIGH_END = 62
# NPT MMIO SPTEs: a reserved PA bit (51) plus P, so the access faults with PFEC.RSVD.
NPT_MMIO_VALUE = (1 << 51) | 1

# Derived helpers (not exported).
_U64_LIMIT = 1 << 64
_PFN_LIMIT = 1 << 40  # the PFN field holds 40 bits
_PAGE_BYTES = SPTE_ENT_PER_PAGE * 8
_MMIO_SPTE_GEN_LOW_BITS = MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1  # 8
_MMIO_SPTE_GEN_LOW_MASK = ((1 << _MMIO_SPTE_GEN_LOW_BITS) - 1) << MMIO_SPTE_GEN_LOW_START
_MMIO_SPTE_GEN_HIGH_MASK = (
    ((1 << (MMIO_SPTE_GEN_HIGH_END - MMIO_SPTE_GEN_HIGH_START + 1)) - 1) << MMIO_SPTE_GEN_HIGH_START
)
_MMIO_SPTE_GEN_HIGH_SHIFT = MMIO_SPTE_GEN_HIGH_START - _MMIO_SPTE_GEN_LOW_BITS  # 44
_SHADOW_ACC_TRACK_SAVED_MASK = SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
_VMX_EPT_ACCESS_BIT = 1 << 8
_VMX_EPT_DIRTY_BIT = 1 << 9
_VMX_EPT_MEMTYPE_MASK = 0x78  # memtype bits 3..5 | IPAT bit 6
_PT_USER_MASK = 1 << 2
_PT_ACCESSED_MASK = 1 << 5
_PT_DIRTY_MASK = 1 << 6
_PT64_NX_MASK = 1 << 63
_GPA_WIDTH_GFN_BITS = {4: 36, 5: 45}  # 48-bit and 57-bit guest physical addresses
_RET_PF_NAMES = {PF.FIXED: "fixed", PF.SPURIOUS: "spurious", PF.RETRY: "retry",
                 PF.EMULATE: "emulate"}


def _pages_per_hpage(level):
    """KVM_PAGES_PER_HPAGE: how many 4K gfns one entry at `level` maps."""
    return 1 << (9 * (level - 1))


def _gfn_round_for_level(gfn, level):
    return gfn & ~(_pages_per_hpage(level) - 1)


def _spte_index(gfn, level):
    """SPTE_INDEX: the entry index of gfn in a table of `level`."""
    return (gfn >> (9 * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


# =================================================================================================
# Argument checks (the API boundary: TypeError / ValueError before anything changes)
# =================================================================================================


_MAX_CACHE_OBJS = 1 << 24   # bound on a cache's min and capacity (API.md)


def _check_int(name, value, lo=None, hi=None):
    """Return `value` as a Python int in [lo, hi) (hi exclusive).

    Python ints (bool included) and numpy integer scalars are integers; anything else is a
    TypeError.  Out of range is a ValueError.
    """
    if not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    value = int(value)
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be >= {lo:#x}, got {value:#x}")
    if hi is not None and value >= hi:
        raise ValueError(f"{name} must be < {hi:#x}, got {value:#x}")
    return value


def _check_u64(name, value):
    return _check_int(name, value, 0, _U64_LIMIT)


def _check_level(level, lo=PG_LEVEL_4K, hi=PT64_ROOT_MAX_LEVEL):
    return _check_int("level", level, lo, hi + 1)


# =================================================================================================
# SpteLayout: the masks of one paging mode (spec §2.3), predicates (§2.4), constructors (§2.5)
# =================================================================================================


class SpteLayout:
    """The SPTE masks of one paging mode: Intel EPT (with or without A/D bits) or AMD NPT.

    KVM keeps these in ``__read_mostly`` globals set by ``kvm_mmu_set_ept_masks`` and
    ``kvm_mmu_reset_all_pte_masks``; here each layout is an immutable object so that EPT and
    NPT models can live side by side.  Build one with :meth:`ept` or :meth:`npt`.
    """

    _ATTRIBUTES = (
        "mode", "ad_enabled", "exec_only", "nonpresent_value", "frozen_value",
        "present_mask", "user_mask", "writable_mask", "x_mask", "nx_mask",
        "accessed_mask", "dirty_mask", "memtype_mask", "memtype_ram", "acc_track_mask",
        "host_writable_mask", "mmu_writable_mask", "mmio_value", "mmio_mask",
        "mmio_access_mask", "pfn_mask", "large_page_mask", "default_ad_disabled",
    )

    @classmethod
    def ept(cls, ad=True, exec_only=False, nonpresent_value=SHADOW_NONPRESENT_VALUE):
        """Intel EPT (``kvm_mmu_set_ept_masks(has_ad_bits=ad, has_exec_only=exec_only)``)."""
        return cls("ept", bool(ad), bool(exec_only), nonpresent_value)

    @classmethod
    def npt(cls, nonpresent_value=SHADOW_NONPRESENT_VALUE):
        """AMD NPT / shadow paging (``kvm_mmu_reset_all_pte_masks``, MMIO caching enabled)."""
        return cls("npt", True, False, nonpresent_value)

    def __new__(cls, *args, **kwargs):
        # A layout always comes from __init__'s checks (via ept()/npt()); a bare
        # SpteLayout.__new__(SpteLayout) would be a layout without masks.
        if not args and not kwargs:
            raise TypeError("use SpteLayout.ept(...) or SpteLayout.npt(...)")
        return super().__new__(cls)

    def __reduce__(self):
        if self.mode == "ept":
            return (SpteLayout.ept, (self.ad_enabled, self.exec_only, self.nonpresent_value))
        return (SpteLayout.npt, (self.nonpresent_value,))

    def __init__(self, mode, ad, exec_only, nonpresent_value):
        nonpresent = _check_u64("nonpresent_value", nonpresent_value)
        # EPT puts the suppress-#VE bit into the present and MMIO masks exactly when the
        # non-present value has it (v6.10 behaviour; nonpresent_value=0 models <= 6.9).
        ve_bit = nonpresent & VMX_EPT_SUPPRESS_VE_BIT
        a = {"mode": mode, "ad_enabled": ad, "exec_only": exec_only,
             "nonpresent_value": nonpresent, "frozen_value": nonpresent | FROZEN_SPTE_BITS,
             "writable_mask": PT_WRITABLE_MASK, "pfn_mask": SPTE_BASE_ADDR_MASK,
             "large_page_mask": PT_PAGE_SIZE_MASK}
        if mode == "ept":
            a.update(
                present_mask=(0 if exec_only else PT_PRESENT_MASK) | ve_bit,
                user_mask=PT_PRESENT_MASK,  # KVM's "user" access is EPT's R bit
                x_mask=0x4, nx_mask=0,
                accessed_mask=_VMX_EPT_ACCESS_BIT if ad else 0,
                dirty_mask=_VMX_EPT_DIRTY_BIT if ad else 0,
                memtype_mask=_VMX_EPT_MEMTYPE_MASK, memtype_ram=VMX_EPT_MEMTYPE_WB_IPAT,
                acc_track_mask=VMX_EPT_RWX_MASK,
                host_writable_mask=EPT_SPTE_HOST_WRITABLE, mmu_writable_mask=EPT_SPTE_MMU_WRITABLE,
                mmio_value=VMX_EPT_MISCONFIG_WX_VALUE, mmio_mask=VMX_EPT_RWX_MASK | ve_bit,
                mmio_access_mask=0,
                default_ad_disabled=not ad,
            )
        elif mode == "npt":
            a.update(
                present_mask=PT_PRESENT_MASK, user_mask=_PT_USER_MASK,
                x_mask=0, nx_mask=_PT64_NX_MASK,
                accessed_mask=_PT_ACCESSED_MASK, dirty_mask=_PT_DIRTY_MASK,
                memtype_mask=0, memtype_ram=0, acc_track_mask=0,
                host_writable_mask=DEFAULT_SPTE_HOST_WRITABLE,
                mmu_writable_mask=DEFAULT_SPTE_MMU_WRITABLE,
                mmio_value=NPT_MMIO_VALUE, mmio_mask=NPT_MMIO_VALUE,
                mmio_access_mask=ACC_WRITE_MASK | ACC_USER_MASK,
                default_ad_disabled=False,
            )
        else:  # pragma: no cover - only the classmethods construct layouts
            raise ValueError(f"unknown paging mode {mode!r}")
        for name in self._ATTRIBUTES:
            object.__setattr__(self, name, a[name])

        # The non-present value must be distinguishable from everything else (spec §1.2).
        if nonpresent & SPTE_MMU_PRESENT_MASK:
            raise ValueError(f"nonpresent_value {nonpresent:#x} is shadow-present (bit 11 set)")
        if self._is_mmio(nonpresent):
            raise ValueError(f"nonpresent_value {nonpresent:#x} is an MMIO SPTE under this layout")
        if self.frozen_value == nonpresent:
            raise ValueError(
                f"nonpresent_value {nonpresent:#x} equals its frozen value "
                "(bits 0x5a0 already set)")
        if self._is_mmio(self.frozen_value):
            raise ValueError(
                f"the frozen value {self.frozen_value:#x} of nonpresent_value {nonpresent:#x} "
                "would be an MMIO SPTE")

    # --- immutability, equality, repr ----------------------------------------------------------

    def __setattr__(self, name, value):
        raise AttributeError(f"SpteLayout.{name} is read-only")

    def __delattr__(self, name):
        raise AttributeError(f"SpteLayout.{name} is read-only")

    def _key(self):
        return tuple(getattr(self, name) for name in self._ATTRIBUTES)

    def __eq__(self, other):
        if not isinstance(other, SpteLayout):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        if self.mode == "ept":
            return (f"SpteLayout.ept(ad={self.ad_enabled}, exec_only={self.exec_only}, "
                    f"nonpresent_value={self.nonpresent_value:#x})")
        return f"SpteLayout.npt(nonpresent_value={self.nonpresent_value:#x})"

    # --- predicates (spec §2.4) -----------------------------------------------------------------

    def _is_mmio(self, spte):
        return (spte & self.mmio_mask) == self.mmio_value

    def is_shadow_present_pte(self, spte):
        spte = _check_u64("spte", spte)
        return bool(spte & SPTE_MMU_PRESENT_MASK)

    def is_large_pte(self, spte):
        spte = _check_u64("spte", spte)
        return bool(spte & PT_PAGE_SIZE_MASK)

    def is_last_spte(self, spte, level):
        spte = _check_u64("spte", spte)
        level = _check_level(level)
        return level == PG_LEVEL_4K or bool(spte & PT_PAGE_SIZE_MASK)

    def is_mmio_spte(self, spte):
        spte = _check_u64("spte", spte)
        return self._is_mmio(spte)

    def is_frozen_spte(self, spte):
        spte = _check_u64("spte", spte)
        return spte == self.frozen_value

    def spte_to_pfn(self, spte):
        spte = _check_u64("spte", spte)
        return (spte & self.pfn_mask) >> 12

    def spte_ad_enabled(self, spte):
        spte = _check_u64("spte", spte)
        return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED

    def spte_ad_need_write_protect(self, spte):
        spte = _check_u64("spte", spte)
        return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_ENABLED

    def _spte_shadow_accessed_mask(self, spte):
        return self.accessed_mask if self.spte_ad_enabled(spte) else 0

    def _spte_shadow_dirty_mask(self, spte):
        return self.dirty_mask if self.spte_ad_enabled(spte) else 0

    def is_access_track_spte(self, spte):
        spte = _check_u64("spte", spte)
        return not self.spte_ad_enabled(spte) and (spte & self.acc_track_mask) == 0

    def is_accessed_spte(self, spte):
        """6.10 form: the A bit if the SPTE uses A/D bits, else "not access-tracked"."""
        spte = _check_u64("spte", spte)
        accessed_mask = self._spte_shadow_accessed_mask(spte)
        if accessed_mask:
            return bool(spte & accessed_mask)
        return not self.is_access_track_spte(spte)

    def is_dirty_spte(self, spte):
        """6.10 form: the D bit if the SPTE uses A/D bits, else the W bit."""
        spte = _check_u64("spte", spte)
        dirty_mask = self._spte_shadow_dirty_mask(spte)
        if dirty_mask:
            return bool(spte & dirty_mask)
        return bool(spte & PT_WRITABLE_MASK)

    def is_writable_pte(self, spte):
        spte = _check_u64("spte", spte)
        return bool(spte & PT_WRITABLE_MASK)

    def is_mmu_writable_spte(self, spte):
        spte = _check_u64("spte", spte)
        return bool(spte & self.mmu_writable_mask)

    def is_executable_pte(self, spte):
        spte = _check_u64("spte", spte)
        return (spte & (self.x_mask | self.nx_mask)) == self.x_mask

    def spte_has_volatile_bits(self, spte):
        """Bits that may change without mmu_lock (fast page fault W, hardware A/D)."""
        spte = _check_u64("spte", spte)
        if not self.is_writable_pte(spte) and self.is_mmu_writable_spte(spte):
            return True
        if self.is_access_track_spte(spte):
            return True
        if self.spte_ad_enabled(spte):
            if not (spte & self.accessed_mask) or (
                    self.is_writable_pte(spte) and not (spte & self.dirty_mask)):
                return True
        return False

    def _writable_state_ok(self, spte):
        """check_spte_writable_invariants: MMU-writable => Host-writable; W => MMU-writable."""
        if spte & self.mmu_writable_mask:
            return bool(spte & self.host_writable_mask)
        return not (spte & PT_WRITABLE_MASK)

    # --- constructors (spec §2.5) ---------------------------------------------------------------

    def make_spte(self, pfn, level=PG_LEVEL_4K, access=ACC_ALL, *, prefetch=False,
                  host_writable=True, ad_disabled=None, nx_huge_pages=False, old_spte=None,
                  write_tracked=False):
        """v6.10 ``make_spte``: returns ``(wrprot, spte)``."""
        pfn = _check_int("pfn", pfn, 0, _PFN_LIMIT)
        level = _check_level(level, PG_LEVEL_4K, PG_LEVEL_1G)
        access = _check_int("access", access, 0, ACC_ALL + 1)
        old_spte = self.nonpresent_value if old_spte is None else _check_u64("old_spte", old_spte)
        ad_disabled = self.default_ad_disabled if ad_disabled is None else bool(ad_disabled)
        prefetch = bool(prefetch)
        wrprot = False
        # (KVM WARNs here if access | present_mask equals the non-present value; a pure
        # constructor has nowhere to count that, so it is not modelled.)

        spte = SPTE_MMU_PRESENT_MASK
        if ad_disabled:
            spte |= SPTE_TDP_AD_DISABLED
        spte |= self.present_mask
        if not prefetch:
            spte |= self._spte_shadow_accessed_mask(spte)

        # NX huge page mitigation: no executable huge pages (iTLB multihit).
        if level > PG_LEVEL_4K and (access & ACC_EXEC_MASK) and nx_huge_pages:
            access &= ~ACC_EXEC_MASK

        spte |= self.x_mask if access & ACC_EXEC_MASK else self.nx_mask
        if access & ACC_USER_MASK:
            spte |= self.user_mask
        if level > PG_LEVEL_4K:
            spte |= PT_PAGE_SIZE_MASK
        spte |= self.memtype_ram  # guest RAM: WB + IPAT on EPT, nothing on NPT
        if host_writable:
            spte |= self.host_writable_mask
        else:
            access &= ~ACC_WRITE_MASK
        spte |= pfn << 12

        if access & ACC_WRITE_MASK:
            spte |= PT_WRITABLE_MASK | self.mmu_writable_mask
            # v6.10 quirk: an already-writable old SPTE skips the unsync check AND the
            # dirty bit below ("goto out").
            if old_spte & PT_WRITABLE_MASK:
                return self._make_spte_out(wrprot, spte, prefetch)
            if write_tracked:  # mmu_try_to_unsync_pages refused
                wrprot = True
                access &= ~ACC_WRITE_MASK
                spte &= ~(PT_WRITABLE_MASK | self.mmu_writable_mask)

        if access & ACC_WRITE_MASK:
            spte |= self._spte_shadow_dirty_mask(spte)
        return self._make_spte_out(wrprot, spte, prefetch)

    def _make_spte_out(self, wrprot, spte, prefetch):
        """The ``out:`` label of make_spte."""
        if prefetch:
            spte = self.mark_spte_for_access_track(spte)
        return wrprot, spte

    def make_nonleaf_spte(self, child_pfn, ad_disabled=None):
        child_pfn = _check_int("child_pfn", child_pfn, 0, _PFN_LIMIT)
        ad_disabled = self.default_ad_disabled if ad_disabled is None else bool(ad_disabled)
        spte = (SPTE_MMU_PRESENT_MASK | (child_pfn << 12) | self.present_mask | PT_WRITABLE_MASK
                | self.user_mask | self.x_mask)
        spte |= SPTE_TDP_AD_DISABLED if ad_disabled else self.accessed_mask
        return spte

    def make_mmio_spte(self, gfn, access=0, generation=0):
        gfn = _check_int("gfn", gfn, 0, 1 << 52)
        # API.md is silent: the range of `access`; take ACC_* bits (0..7) as make_spte does.
        access = _check_int("access", access, 0, ACC_ALL + 1)
        generation = _check_int("generation", generation, 0, MMIO_SPTE_GEN_MASK + 1)
        spte = (generation << MMIO_SPTE_GEN_LOW_START) & _MMIO_SPTE_GEN_LOW_MASK
        spte |= (generation << _MMIO_SPTE_GEN_HIGH_SHIFT) & _MMIO_SPTE_GEN_HIGH_MASK
        spte |= self.mmio_value | (access & self.mmio_access_mask)
        spte |= (gfn << 12) & SPTE_BASE_ADDR_MASK
        return spte

    def _check_mmio(self, spte):
        spte = _check_u64("spte", spte)
        if not self._is_mmio(spte):
            raise ValueError(f"spte {spte:#x} is not an MMIO SPTE of this layout")
        return spte

    def get_mmio_spte_gfn(self, spte):
        spte = self._check_mmio(spte)
        # API.md is silent: NPT's MMIO marker (bit 51) lies inside the PFN field.  KVM's
        # lower-gfn mask stops below the host's physical-address width (< 52 whenever NPT MMIO
        # caching is on), so the marker never reads back as gfn bit 39; drop the MMIO mask bits.
        return (spte & SPTE_BASE_ADDR_MASK & ~self.mmio_mask) >> 12

    def get_mmio_spte_generation(self, spte):
        spte = self._check_mmio(spte)
        gen = (spte & _MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START
        gen |= (spte & _MMIO_SPTE_GEN_HIGH_MASK) >> _MMIO_SPTE_GEN_HIGH_SHIFT
        return gen

    def get_mmio_spte_access(self, spte):
        spte = self._check_mmio(spte)
        return spte & self.mmio_access_mask

    def make_huge_page_split_spte(self, huge_spte, child_level, index, nx_huge_pages=False):
        huge_spte = _check_u64("huge_spte", huge_spte)
        child_level = _check_int("child_level", child_level, PG_LEVEL_4K, PG_LEVEL_2M + 1)
        index = _check_int("index", index, 0, SPTE_ENT_PER_PAGE)
        if not (huge_spte & SPTE_MMU_PRESENT_MASK) or not (huge_spte & PT_PAGE_SIZE_MASK):
            raise ValueError(f"huge_spte {huge_spte:#x} is not a present large SPTE")
        # The child maps the index-th sub-range. KVM ORs the offset into the address (the
        # sum, for the size-aligned PFNs it builds); so does this, also for unaligned ones.
        child_spte = huge_spte | (index * _pages_per_hpage(child_level)) << 12
        if child_level == PG_LEVEL_4K:
            child_spte &= ~PT_PAGE_SIZE_MASK
            # At 4K the NX huge page mitigation no longer applies: make it executable.
            if nx_huge_pages:
                child_spte = self._make_spte_executable(child_spte)
        return child_spte

    def _make_spte_executable(self, spte):
        is_access_track = self.is_access_track_spte(spte)
        if is_access_track:
            spte = self.restore_acc_track_spte(spte)
        spte = (spte & ~self.nx_mask) | self.x_mask
        if is_access_track:
            spte = self.mark_spte_for_access_track(spte)
        return spte

    def mark_spte_for_access_track(self, spte):
        spte = _check_u64("spte", spte)
        if self.spte_ad_enabled(spte):
            return spte & ~self.accessed_mask
        if self.is_access_track_spte(spte):
            return spte
        # (KVM WARNs on broken writable invariants or non-zero saved bits here.)
        spte |= (spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
        spte &= ~self.acc_track_mask
        return spte

    def restore_acc_track_spte(self, spte):
        spte = _check_u64("spte", spte)
        saved_bits = (spte >> SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
        spte &= ~self.acc_track_mask
        spte &= ~_SHADOW_ACC_TRACK_SAVED_MASK
        spte |= saved_bits
        return spte


# =================================================================================================
# Kernels: memset64, sync_page-style scans, 64-bit "atomics" (single-threaded here)
# =================================================================================================


def _check_u64_array(name, array):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, not {type(array).__name__}")
    if array.dtype != np.uint64:
        raise TypeError(f"{name} must have dtype uint64, not {array.dtype}")


def _check_pages_shape(name, pages):
    if not (pages.shape == (SPTE_ENT_PER_PAGE,)
            or (pages.ndim == 2 and pages.shape[1] == SPTE_ENT_PER_PAGE)):
        raise ValueError(f"{name} must have shape (n, 512) or (512,), not {pages.shape}")
    if not pages.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")


def _check_writable(name, array):
    if not array.flags.writeable:
        raise ValueError(f"{name} is read-only")


def fill_pages(pages, value):
    """memset64: set every u64 of `pages` ((n, 512) or (512,)) to `value`."""
    _check_u64_array("pages", pages)
    _check_pages_shape("pages", pages)
    _check_writable("pages", pages)
    value = _check_u64("value", value)
    pages[...] = np.uint64(value)


def scan_present(page, nonpresent_value):
    """Indices (ascending, intp) of the entries of one page that differ from `nonpresent_value`."""
    _check_u64_array("page", page)
    if page.shape != (SPTE_ENT_PER_PAGE,):
        raise ValueError(f"page must have shape (512,), not {page.shape}")
    if not page.flags.c_contiguous:
        raise ValueError("page must be C-contiguous")
    nonpresent_value = _check_u64("nonpresent_value", nonpresent_value)
    indices = [i for i in range(SPTE_ENT_PER_PAGE) if int(page[i]) != nonpresent_value]
    return np.array(indices, dtype=np.intp)


def count_present(pages, nonpresent_value):
    """Per page, how many entries differ from `nonpresent_value` (int64, shape (n,))."""
    _check_u64_array("pages", pages)
    # API.md is silent: whether count_present needs C-contiguous pages; required, like
    # fill_pages (read-only is fine).
    _check_pages_shape("pages", pages)
    nonpresent_value = _check_u64("nonpresent_value", nonpresent_value)
    rows = pages.reshape(-1, SPTE_ENT_PER_PAGE)
    counts = np.count_nonzero(rows != np.uint64(nonpresent_value), axis=1)
    return counts.astype(np.int64).reshape(rows.shape[0])


def _atomic_target(array, index):
    """Validate an atomic's array and index; return the flat writable view and the index."""
    _check_u64_array("array", array)
    if not array.flags.c_contiguous:
        raise ValueError("array must be C-contiguous")
    _check_writable("array", array)
    index = _check_int("index", index, 0, array.size)
    return array.reshape(-1), index


# The oracle's atomics are atomic with respect to each other: one lock around the
# read-modify-write (Python may switch threads between any two bytecodes).
_ATOMIC = threading.Lock()


def cmpxchg(array, index, expected, new):
    """Compare-and-exchange on ``array.flat[index]`` -> ``(ok, observed)``."""
    flat, index = _atomic_target(array, index)
    expected = _check_u64("expected", expected)
    new = _check_u64("new", new)
    with _ATOMIC:
        observed = int(flat[index])
        if observed != expected:
            return False, observed
        flat[index] = new
    return True, observed


def xchg(array, index, new):
    """Exchange: store `new`, return the old value."""
    flat, index = _atomic_target(array, index)
    new = _check_u64("new", new)
    with _ATOMIC:
        old = int(flat[index])
        flat[index] = new
    return old


def atomic_or(array, index, mask):
    """Fetch-and-or: set `mask`, return the old value."""
    flat, index = _atomic_target(array, index)
    mask = _check_u64("mask", mask)
    with _ATOMIC:
        old = int(flat[index])
        flat[index] = old | mask
    return old


def atomic_and_not(array, index, mask):
    """Fetch-and-andnot: clear `mask`, return the old value."""
    flat, index = _atomic_target(array, index)
    mask = _check_u64("mask", mask)
    with _ATOMIC:
        old = int(flat[index])
        flat[index] = old & ~mask
    return old


# =================================================================================================
# PagePool: the host pages that page tables are made of
# =================================================================================================


class PagePool:
    """A fixed array of 4 KiB pages (512 u64 each) with a free list.

    Never-used pages are handed out lowest index first; freed pages are reused LIFO (the most
    recently freed first) before any never-used page.  Per page the pool remembers whether it
    is known to hold only zeros ("clean"): true for never-used pages of an unpoisoned pool and
    for pages a GFP_ZERO cache zeroed; lost when a user writes the page or the page comes back
    through :meth:`free`.  It also remembers who holds each page (:meth:`page_state`); the
    users of the pool (caches, the Vm) report both through private methods.
    """

    PAGE_STATES = ("free", "raw", "cached", "table")

    @staticmethod
    def _page_aligned_block(capacity):
        """capacity zeroed pages, each starting on a 4 KiB boundary as a real page-table
        page does (numpy itself only promises 16-byte alignment)."""
        page_bytes = SPTE_ENT_PER_PAGE * 8
        spare = np.zeros((capacity + 1) * SPTE_ENT_PER_PAGE, dtype=np.uint64)
        skip_bytes = -spare.ctypes.data % page_bytes
        first = skip_bytes // 8
        return spare[first:first + capacity * SPTE_ENT_PER_PAGE].reshape(capacity, SPTE_ENT_PER_PAGE)

    def __init__(self, capacity, poison=None):
        capacity = _check_int("capacity", capacity, 1)
        poison = None if poison is None else _check_u64("poison", poison)
        self._pages = self._page_aligned_block(capacity)
        if poison is not None:
            self._pages.fill(poison)
        self._clean = [poison is None] * capacity
        # A view of a read-only buffer: numpy refuses `flags.writeable = True` on it.
        self._pages_ro = np.asarray(memoryview(self._pages).toreadonly())
        self._capacity = capacity
        self._poison = poison
        self._next_never_used = 0  # pages [_next_never_used, capacity) were never handed out
        self._freed = []  # stack of freed pages; the top is reused first
        self._state = ["free"] * capacity  # see page_state()
        self._fail_budget = None  # fault injection: allocations left before failing, or None
        self._n_allocated = 0
        self._n_freed = 0
        self._n_failed = 0
        # Initialisation work done by the caches that take pages from this pool.
        self._init = {"zero_inits": 0, "zero_untouched": 0, "fills": 0, "init_bytes_written": 0}

    @property
    def capacity(self):
        return self._capacity

    @property
    def poison(self):
        return self._poison

    @property
    def pages(self):
        return self._pages_ro.view()  # a fresh view: reshaping it cannot leak to the next caller

    @property
    def nr_free(self):
        return len(self._freed) + (self._capacity - self._next_never_used)

    def __len__(self):
        return self._capacity

    def alloc(self):
        """Take one page off the free list; its content is unspecified."""
        if self._fail_budget == 0 or self.nr_free == 0:
            self._n_failed += 1
            why = "fault injection" if self.nr_free else "no free page"
            raise OutOfMemory(f"page pool: allocation refused ({why})")
        if self._freed:
            index = self._freed.pop()
        else:
            index = self._next_never_used
            self._next_never_used += 1
        if self._fail_budget is not None:
            self._fail_budget -= 1
        self._state[index] = "raw"
        self._n_allocated += 1
        return index

    def _check_index(self, index):
        return _check_int("index", index, 0, self._capacity)

    def free(self, index):
        """Return an allocated page to the free list."""
        index = self._check_index(index)
        if self._state[index] != "raw":
            raise ValueError(f"page {index} was not handed out by alloc() "
                             f"(state {self._state[index]})")
        self._release(index)

    def _release(self, index):
        """Back to the free list (caches and VMs use this for the pages they own)."""
        self._state[index] = "free"
        self._clean[index] = False  # a page returned to the pool is no longer clean
        self._freed.append(index)
        self._n_freed += 1

    def fail_after(self, n):
        """Let the next `n` allocations succeed, then refuse all until ``fail_after(None)``."""
        self._fail_budget = None if n is None else _check_int("n", n, 0)

    def is_clean(self, index):
        return self._clean[self._check_index(index)]

    def page_state(self, index):
        """"free", "raw" (handed out by an alloc()), "cached" (held by a memory cache) or
        "table" (a page table of a Vm)."""
        return self._state[self._check_index(index)]

    def _mark_dirty(self, index):
        """A user of the pool changed the content of this page (not public)."""
        self._clean[index] = False

    def _mark_clean(self, index):
        """A user of the pool zeroed this page (not public)."""
        self._clean[index] = True

    def _set_state(self, index, state):
        """A user of the pool took this page over (not public)."""
        self._state[index] = state
        if state == "table":
            self._clean[index] = False  # a VM writes into its tables

    @property
    def stats(self):
        return {"allocated": self._n_allocated, "freed": self._n_freed,
                "in_use": self._n_allocated - self._n_freed, "failed": self._n_failed,
                **self._init}

    def __repr__(self):
        return f"PagePool(capacity={self._capacity}, nr_free={self.nr_free})"


# =================================================================================================
# MemoryCache: Linux 6.10 struct kvm_mmu_memory_cache (spec §1.3)
# =================================================================================================


def _mmu_memory_cache_init_page(pool, page, init_value, gfp_zero):
    """Initialise a page just obtained from the pool (alloc_obj, spec §1.3).

    Returns ``(zeroed, untouched, filled)``: the page was zeroed (4096 bytes written), was
    known clean and used as is, and/or was filled with `init_value` (4096 bytes written).
    """
    zeroed = untouched = filled = False
    if gfp_zero:  # __GFP_ZERO: only memory not known to be zero is cleared
        if pool.is_clean(page):
            untouched = True
        else:
            fill_pages(pool._pages[page], 0)
            pool._mark_clean(page)
            zeroed = True
    if init_value != 0:  # the 6.10 custom init value: memset64 of the whole page
        fill_pages(pool._pages[page], init_value)
        pool._mark_dirty(page)
        filled = True
    pool._init["zero_inits"] += zeroed
    pool._init["zero_untouched"] += untouched
    pool._init["fills"] += filled
    pool._init["init_bytes_written"] += 4096 * (zeroed + filled)
    return zeroed, untouched, filled


class MemoryCache:
    """KVM's page-backed ``kvm_mmu_memory_cache`` with the 6.10 ``init_value``."""

    def __init__(self, pool, init_value=0, capacity=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE,
                 gfp_zero=None):
        if not isinstance(pool, PagePool):
            raise TypeError(f"pool must be a PagePool, not {type(pool).__name__}")
        self._pool = pool
        self._init_value = _check_u64("init_value", init_value)
        self._default_capacity = _check_int("capacity", capacity, 0, _MAX_CACHE_OBJS + 1)
        self._gfp_zero = (self._init_value == 0) if gfp_zero is None else bool(gfp_zero)
        self._objects = None  # KVM: NULL until the first real top-up
        self._capacity = 0
        self._warnings = 0
        self._stats = dict.fromkeys(
            ("fills", "zero_inits", "zero_untouched", "init_bytes_written", "obtained"), 0)

    pool = property(lambda self: self._pool)
    init_value = property(lambda self: self._init_value)
    gfp_zero = property(lambda self: self._gfp_zero)
    default_capacity = property(lambda self: self._default_capacity)
    capacity = property(lambda self: self._capacity)
    warnings = property(lambda self: self._warnings)

    @property
    def nobjs(self):
        return len(self._objects) if self._objects is not None else 0

    def __len__(self):
        return self.nobjs

    @property
    def objects(self):
        return tuple(self._objects or ())

    @property
    def stats(self):
        return dict(self._stats, warnings=self._warnings)

    def _warn(self):
        """WARN_ON_ONCE: counted, never raised."""
        self._warnings += 1

    def _alloc_obj(self):
        """mmu_memory_cache_alloc_obj: one page from the pool, initialised."""
        page = self._pool.alloc()  # OutOfMemory propagates
        self._pool._set_state(page, "cached")
        self._stats["obtained"] += 1
        zeroed, untouched, filled = _mmu_memory_cache_init_page(
            self._pool, page, self._init_value, self._gfp_zero)
        self._stats["zero_inits"] += zeroed
        self._stats["zero_untouched"] += untouched
        self._stats["fills"] += filled
        self._stats["init_bytes_written"] += _PAGE_BYTES * (zeroed + filled)
        return page

    def topup(self, min, capacity=None):  # noqa: A002 - KVM's parameter name
        """__kvm_mmu_topup_memory_cache(mc, capacity, min) (spec §1.3)."""
        # The API boundary first: types and ranges.
        min = _check_int("min", min, 0, _MAX_CACHE_OBJS + 1)  # noqa: A001
        capacity = (self._default_capacity if capacity is None
                    else _check_int("capacity", capacity, 0, _MAX_CACHE_OBJS + 1))

        # 1. Enough objects: nothing else happens (no checks, no allocation).
        if self.nobjs >= min:
            return
        # 2. First real top-up: configuration checks, then the objects array.
        if self._objects is None:
            if capacity == 0:
                self._warn()
                raise CacheConfigError("memory cache top-up with capacity 0")
            if self._init_value != 0 and self._gfp_zero:
                self._warn()
                raise CacheConfigError(
                    f"memory cache with init_value {self._init_value:#x} and gfp_zero")
            self._objects = []
            self._capacity = capacity
        # 3. The capacity may not change across top-ups.
        if self._capacity != capacity:
            self._warn()
            raise CacheConfigError(
                f"memory cache top-up with capacity {capacity}, recorded {self._capacity}")
        # 4. Fill up to capacity, not merely to min; what was obtained stays.
        while len(self._objects) < self._capacity:
            try:
                page = self._alloc_obj()
            except OutOfMemory:
                if len(self._objects) >= min:
                    return
                raise OutOfMemory(
                    f"memory cache top-up: {len(self._objects)} objects, {min} needed") from None
            self._objects.append(page)

    def alloc(self):
        """kvm_mmu_memory_cache_alloc: LIFO pop; an empty cache WARNs and allocates directly."""
        if self._objects:
            page = self._objects.pop()
        else:
            self._warn()
            page = self._alloc_obj()
        self._pool._set_state(page, "raw")
        return page

    def free(self):
        """kvm_mmu_free_memory_cache: every cached page back to the pool."""
        # API.md is silent: the order pages go back; KVM pops from the top (objects[-1] first).
        while self._objects:
            self._pool._release(self._objects.pop())
        self._objects = None
        self._capacity = 0

    def __repr__(self):
        return (f"MemoryCache(init_value={self._init_value:#x}, gfp_zero={self._gfp_zero}, "
                f"capacity={self._capacity}, nobjs={self.nobjs})")


# =================================================================================================
# TDP MMU: page metadata, the tdp_iter walker (spec §3.2)
# =================================================================================================


class _MmuPage:
    """KVM's struct kvm_mmu_page for one TDP page table (the parts the model needs)."""

    __slots__ = ("spt", "level", "gfn", "ptep", "nx_huge_page_disallowed",
                 "on_possible_nx_huge_pages")

    def __init__(self, spt, level, gfn, ptep):
        self.spt = spt  # pool index of the table (its "physical address")
        self.level = level  # role.level: the level of the entries inside this table
        self.gfn = gfn  # first gfn this table maps
        self.ptep = ptep  # (parent table, index) of the entry that links it; None for the root
        self.nx_huge_page_disallowed = False
        self.on_possible_nx_huge_pages = False  # accounted in nx_lpage_splits


class TdpIter:
    """KVM's struct tdp_iter: a pre-order walk over the SPTEs intersecting a gfn range.

    The caller loops ``while it.valid and it.gfn < end`` and calls :meth:`next` at the end
    of each step (see ``Vm._for_each_tdp_pte``).  The model never yields mmu_lock, so
    ``yielded`` stays False, but the restart logic is kept as KVM has it.
    """

    def __init__(self, vm, min_level, next_last_level_gfn):
        self._vm = vm
        self.root_level = vm.root_level
        self.min_level = min_level
        self.next_last_level_gfn = next_last_level_gfn
        self.yielded_gfn = next_last_level_gfn
        self.pt_path = [None] * PT64_ROOT_MAX_LEVEL
        self.pt_path[self.root_level - 1] = vm.root
        self.yielded = False
        self.restart()

    def restart(self):
        self.yielded = False
        self.yielded_gfn = self.next_last_level_gfn
        self.level = self.root_level
        self.gfn = _gfn_round_for_level(self.next_last_level_gfn, self.level)
        self._refresh_sptep()
        self.valid = True

    def _refresh_sptep(self):
        """Point at the entry for (gfn, level) and re-read it."""
        self.table = self.pt_path[self.level - 1]
        self.index = _spte_index(self.gfn, self.level)
        self.old_spte = self._vm._read_spte(self.table, self.index)

    def _try_step_down(self):
        if self.level == self.min_level:
            return False
        # Re-read before stepping down: never walk into a table no longer linked here.
        self.old_spte = self._vm._read_spte(self.table, self.index)
        child_pt = self._vm._spte_to_child_pt(self.old_spte, self.level)
        if child_pt is None:
            return False
        self.level -= 1
        self.pt_path[self.level - 1] = child_pt
        self.gfn = _gfn_round_for_level(self.next_last_level_gfn, self.level)
        self._refresh_sptep()
        return True

    def _try_step_side(self):
        if self.index == SPTE_ENT_PER_PAGE - 1:
            return False
        self.gfn += _pages_per_hpage(self.level)
        self.next_last_level_gfn = self.gfn
        self.index += 1
        self.old_spte = self._vm._read_spte(self.table, self.index)
        return True

    def _try_step_up(self):
        if self.level == self.root_level:
            return False
        self.level += 1
        self.gfn = _gfn_round_for_level(self.gfn, self.level)
        self._refresh_sptep()
        return True

    def next(self):
        """tdp_iter_next: down if possible, else side, else up-and-side; off the root: invalid."""
        if self.yielded:
            self.restart()
            return
        if self._try_step_down():
            return
        while True:
            if self._try_step_side():
                return
            if not self._try_step_up():
                break
        self.valid = False


class _PageFault:
    """The parts of KVM's struct kvm_page_fault the TDP fault path uses."""

    __slots__ = ("gfn", "write", "exec", "slot", "req_level", "goal_level",
                 "huge_page_disallowed")

    def __init__(self, gfn, write, exec, slot):  # noqa: A002 - KVM's field name
        self.gfn = gfn
        self.write = write
        self.exec = exec
        self.slot = slot
        self.req_level = PG_LEVEL_4K
        self.goal_level = PG_LEVEL_4K
        self.huge_page_disallowed = False


class _Memslot:
    __slots__ = ("id", "base_gfn", "npages", "pfn", "readonly")

    def __init__(self, slot_id, base_gfn, npages, pfn, readonly):
        self.id = slot_id
        self.base_gfn = base_gfn
        self.npages = npages
        self.pfn = pfn
        self.readonly = readonly

    def has_gfn(self, gfn):
        return self.base_gfn <= gfn < self.base_gfn + self.npages

    def has_pfn(self, pfn):
        return self.pfn <= pfn < self.pfn + self.npages

    def gfn_to_pfn(self, gfn):
        return self.pfn + (gfn - self.base_gfn)

    def as_tuple(self):
        return (self.id, self.base_gfn, self.npages, self.pfn, self.readonly)


# Counters the Vm keeps itself; cache_* and warnings also add the vCPU caches (see Vm.stats).
_VM_COUNTERS = (
    "faults_fixed", "faults_spurious", "faults_retry", "faults_emulate",
    "pages_4k", "pages_2m", "pages_1g",
    "pt_pages", "pt_pages_l1", "pt_pages_l2", "pt_pages_l3", "pt_pages_l4", "pt_pages_l5",
    "tables_allocated", "tables_freed",
    "cache_fills", "cache_zero_inits", "init_bytes_written",
    "tlb_flushes", "tlb_flushes_ranged", "cas_failures", "warnings",
    "spte_changes", "nx_lpage_splits", "mmio_sptes_created",
)
_PAGE_STAT_KEYS = {PG_LEVEL_4K: "pages_4k", PG_LEVEL_2M: "pages_2m", PG_LEVEL_1G: "pages_1g"}


# =================================================================================================
# Vm: one TDP MMU root, memslots, the fault path and zaps (spec §3)
# =================================================================================================


class Vm:
    """A VM with one TDP MMU root (4 or 5 levels) over a :class:`PagePool` of page tables.

    Lock modes are modelled by which setter a path uses: the fault path and the atomic zap
    run in shared mode (compare-and-exchange, ``tdp_mmu_set_spte_atomic``); zap_gfn_range,
    zap_all and zap_sp run in exclusive mode (``tdp_mmu_set_spte``).  Every store into a
    linked table goes through those setters, and every change ends in one
    ``handle_changed_spte``.
    """

    def __init__(self, layout, root_level=4, max_level=PG_LEVEL_1G, max_pt_pages=1 << 20,
                 nx_huge_pages=False, poison=None):
        if not isinstance(layout, SpteLayout):
            raise TypeError(f"layout must be a SpteLayout, not {type(layout).__name__}")
        root_level = _check_int("root_level", root_level)
        if root_level not in (4, 5):
            raise ValueError(f"root_level must be 4 or 5, got {root_level}")
        max_level = _check_int("max_level", max_level, PG_LEVEL_4K, PG_LEVEL_1G + 1)
        max_pt_pages = _check_int("max_pt_pages", max_pt_pages, 2)

        self._layout = layout
        self._root_level = root_level
        self._max_level = max_level
        self._nx_huge_pages = bool(nx_huge_pages)
        self._max_gfn = 1 << _GPA_WIDTH_GFN_BITS[root_level]  # exclusive bound on gfns
        self._pool = PagePool(max_pt_pages, poison=poison)
        self._counters = dict.fromkeys(_VM_COUNTERS, 0)
        self._sps = {}  # pool index -> _MmuPage, for every table that is (being) linked
        self._slots = {}  # slot id -> _Memslot
        self._next_slot_id = 0
        self._mmio_generation = 0
        self._host_accessed = set()  # host pfns whose "accessed" flag KVM has set
        self._host_dirty = set()  # host pfns whose "dirty" flag KVM has set
        self._vcpus = []
        self._cas_failures_to_inject = 0

        # The root: allocated and initialised like a page of the vCPU shadow-page cache
        # (KVM takes it from that cache in kvm_tdp_mmu_alloc_root).
        nonpresent = layout.nonpresent_value
        root = self._pool.alloc()
        # API.md is silent: how the root's initialisation is counted; exactly as a vCPU cache
        # page with init_value = nonpresent_value (fill, or zero-unless-clean when it is 0).
        zeroed, _untouched, filled = _mmu_memory_cache_init_page(
            self._pool, root, nonpresent, nonpresent == 0)
        self._pool._set_state(root, "table")
        self._counters["cache_fills"] += filled
        self._counters["cache_zero_inits"] += zeroed
        self._counters["init_bytes_written"] += _PAGE_BYTES * (zeroed + filled)
        self._root = root
        root_sp = _MmuPage(root, root_level, 0, None)
        self._sps[root] = root_sp
        self._counters["tables_allocated"] += 1
        self._tdp_account_mmu_page(root_sp)

    # --- read-only attributes -------------------------------------------------------------------

    layout = property(lambda self: self._layout)
    root_level = property(lambda self: self._root_level)
    max_level = property(lambda self: self._max_level)
    nx_huge_pages = property(lambda self: self._nx_huge_pages)
    pool = property(lambda self: self._pool)
    root = property(lambda self: self._root)
    mmio_generation = property(lambda self: self._mmio_generation)

    def __repr__(self):
        return (f"Vm({self._layout!r}, root_level={self._root_level}, "
                f"max_level={self._max_level}, max_pt_pages={self._pool.capacity})")

    @property
    def stats(self):
        stats = dict(self._counters)
        # cache_* and init_bytes_written: the root's initialisation plus every vCPU cache.
        for vcpu in self._vcpus:
            cache_stats = vcpu.cache.stats
            stats["cache_fills"] += cache_stats["fills"]
            stats["cache_zero_inits"] += cache_stats["zero_inits"]
            stats["init_bytes_written"] += cache_stats["init_bytes_written"]
            # API.md is silent: what `warnings` counts; the VM's own WARNs plus the WARNs
            # of the vCPU caches (an empty-cache alloc, a refused top-up).
            stats["warnings"] += cache_stats["warnings"]
        return stats

    def _warn(self):
        """WARN_ON_ONCE in the engine: counted, never raised."""
        self._counters["warnings"] += 1

    def _check_gfn(self, gfn, name="gfn"):
        return _check_int(name, gfn, 0, self._max_gfn)

    # --- memslots and host pages ----------------------------------------------------------------

    def add_memslot(self, base_gfn, npages, pfn, readonly=False):
        base_gfn = _check_int("base_gfn", base_gfn, 0)
        npages = _check_int("npages", npages, 1)
        pfn = _check_int("pfn", pfn, 0)
        readonly = bool(readonly)
        if base_gfn + npages > self._max_gfn:
            raise ValueError(f"gfn range [{base_gfn:#x}, {base_gfn + npages:#x}) exceeds the "
                             f"address width ({self._max_gfn:#x})")
        if pfn + npages > _PFN_LIMIT:
            raise ValueError(f"pfn range [{pfn:#x}, {pfn + npages:#x}) exceeds 1 << 40")
        for slot in self._slots.values():
            if base_gfn < slot.base_gfn + slot.npages and slot.base_gfn < base_gfn + npages:
                raise ValueError(f"gfn range overlaps memslot {slot.id}")
            if pfn < slot.pfn + slot.npages and slot.pfn < pfn + npages:
                raise ValueError(f"pfn range overlaps memslot {slot.id}")
        slot_id = self._next_slot_id
        self._next_slot_id += 1
        self._slots[slot_id] = _Memslot(slot_id, base_gfn, npages, pfn, readonly)
        self._bump_mmio_generation()
        return slot_id

    def delete_memslot(self, slot_id):
        slot_id = _check_int("slot_id", slot_id)
        slot = self._slots.get(slot_id)
        if slot is None:
            raise ValueError(f"no memslot {slot_id}")
        self.zap_gfn_range(slot.base_gfn, slot.base_gfn + slot.npages)
        del self._slots[slot_id]
        self._bump_mmio_generation()

    def _bump_mmio_generation(self):
        self._mmio_generation = (self._mmio_generation + 1) % (MMIO_SPTE_GEN_MASK + 1)
        if self._mmio_generation == 0:
            # kvm_mmu_invalidate_mmio_sptes: after a wrap an MMIO SPTE from 2**19 changes
            # ago would look current again, so every SPTE goes (one full flush).
            self.zap_all()

    @property
    def memslots(self):
        return [s.as_tuple() for s in sorted(self._slots.values(), key=lambda s: s.base_gfn)]

    def _slot_for_gfn(self, gfn):
        for slot in self._slots.values():
            if slot.has_gfn(gfn):
                return slot
        return None

    def _check_backed_pfn(self, pfn):
        pfn = _check_int("pfn", pfn, 0)
        if not any(slot.has_pfn(pfn) for slot in self._slots.values()):
            raise ValueError(f"no memslot backs pfn {pfn:#x}")
        return pfn

    def host_page_accessed(self, pfn):
        # API.md is silent: flags belong to host pages (struct page in KVM) and are kept
        # when the slot that mapped them goes away.
        return self._check_backed_pfn(pfn) in self._host_accessed

    def host_page_dirty(self, pfn):
        return self._check_backed_pfn(pfn) in self._host_dirty

    def _kvm_set_pfn_accessed(self, pfn):
        self._host_accessed.add(pfn)

    def _kvm_set_pfn_dirty(self, pfn):
        self._host_dirty.add(pfn)

    # --- vCPUs, fault injection -----------------------------------------------------------------

    def vcpu(self):
        if len(self._vcpus) >= 256:
            raise ValueError("at most 256 vCPUs per Vm")
        return Vcpu(self)

    @property
    def vcpus(self):
        return tuple(self._vcpus)

    def inject_cas_failures(self, n):
        self._cas_failures_to_inject = _check_int("n", n, 0)

    # --- write primitives: the only stores into linked page tables (spec §3.3) ------------------

    def _read_spte(self, table, index):
        """kvm_tdp_mmu_read_spte."""
        return int(self._pool._pages[table, index])

    def _spte_store(self, table, index, value):
        """__kvm_tdp_mmu_write_spte: a plain store."""
        self._pool._pages[table, index] = value
        self._pool._mark_dirty(table)

    def _spte_xchg(self, table, index, value):
        """kvm_tdp_mmu_write_spte_atomic: exchange, returning the old value."""
        old = self._read_spte(table, index)
        self._spte_store(table, index, value)
        return old

    def _spte_cmpxchg(self, table, index, expected, new):
        """try_cmpxchg64 -> (ok, observed); honours inject_cas_failures."""
        observed = self._read_spte(table, index)
        if self._cas_failures_to_inject > 0:
            # Another vCPU "changed" the entry: memory untouched, the CAS fails.
            self._cas_failures_to_inject -= 1
            self._counters["cas_failures"] += 1
            return False, observed
        if observed != expected:
            self._counters["cas_failures"] += 1
            return False, observed
        self._spte_store(table, index, new)
        return True, observed

    def _kvm_tdp_mmu_write_spte(self, table, index, old_spte, new_spte, level):
        """Exclusive-mode write: xchg if the old SPTE is a leaf with volatile bits."""
        L = self._layout
        if (L.is_shadow_present_pte(old_spte) and L.is_last_spte(old_spte, level)
                and L.spte_has_volatile_bits(old_spte)):
            return self._spte_xchg(table, index, new_spte)
        self._spte_store(table, index, new_spte)
        return old_spte

    # --- bookkeeping: handle_changed_spte / handle_removed_pt (spec §3.7, §3.8) -----------------

    def _spte_to_child_pt(self, spte, level):
        """The pool index of the table a present non-leaf SPTE points at, else None."""
        L = self._layout
        if not L.is_shadow_present_pte(spte) or L.is_last_spte(spte, level):
            return None
        return L.spte_to_pfn(spte)

    def _update_page_stats(self, level, delta):
        """kvm_update_page_stats."""
        self._counters[_PAGE_STAT_KEYS[level]] += delta

    def handle_changed_spte(self, gfn, old_spte, new_spte, level, shared):
        """Bookkeeping for one SPTE change (spec §3.7)."""
        L = self._layout
        self._counters["spte_changes"] += 1
        was_present = L.is_shadow_present_pte(old_spte)
        is_present = L.is_shadow_present_pte(new_spte)
        was_leaf = was_present and L.is_last_spte(old_spte, level)
        is_leaf = is_present and L.is_last_spte(new_spte, level)
        pfn_changed = L.spte_to_pfn(old_spte) != L.spte_to_pfn(new_spte)

        if not PG_LEVEL_4K <= level <= PT64_ROOT_MAX_LEVEL:
            self._warn()
        if gfn & (_pages_per_hpage(level) - 1):
            self._warn()

        # KVM's BUG(): a present leaf must be zapped and flushed before a different pfn
        # may be mapped.
        if was_leaf and is_leaf and pfn_changed:
            raise AuditError(
                f"invalid SPTE change: present leaf replaced by a present leaf with a different "
                f"pfn: gfn {gfn:#x} level {level} old {old_spte:#x} new {new_spte:#x}",
                invariant="leaf-pfn-change")

        if old_spte == new_spte:
            return
        if is_leaf and not L._writable_state_ok(new_spte):
            self._warn()

        if not was_present and not is_present:
            # Only MMIO SPTEs and the frozen value may change between non-present values.
            if (not L.is_mmio_spte(old_spte) and not L.is_mmio_spte(new_spte)
                    and not L.is_frozen_spte(new_spte)):
                self._warn()
            return

        if is_leaf != was_leaf:
            self._update_page_stats(level, 1 if is_leaf else -1)

        if was_leaf and L.is_dirty_spte(old_spte) and (
                not is_present or not L.is_dirty_spte(new_spte) or pfn_changed):
            self._kvm_set_pfn_dirty(L.spte_to_pfn(old_spte))

        # A subtree was unlinked: tear it down (KVM WARNs on a non-leaf whose pfn changed).
        if was_present and not was_leaf:
            if is_leaf or not is_present:
                self.handle_removed_pt(self._spte_to_child_pt(old_spte, level), shared)
            elif pfn_changed:
                self._warn()
                self.handle_removed_pt(self._spte_to_child_pt(old_spte, level), shared)

        if was_leaf and L.is_accessed_spte(old_spte) and (
                not is_present or not L.is_accessed_spte(new_spte) or pfn_changed):
            self._kvm_set_pfn_accessed(L.spte_to_pfn(old_spte))

    def handle_removed_pt(self, table, shared):
        """Tear down a table its parent no longer links (spec §3.8), then free it."""
        L = self._layout
        frozen = L.frozen_value
        sp = self._sps.get(table)
        if sp is None:
            raise AuditError(f"removed table {table} is not a known page table",
                             invariant="nonleaf-child")
        level = sp.level
        self._tdp_mmu_unlink_sp(sp)

        for i in range(SPTE_ENT_PER_PAGE):
            gfn = sp.gfn + i * _pages_per_hpage(level)
            if shared:
                # Freeze every entry.  KVM spins while the value swapped out is itself frozen
                # (another thread's frozen operation in flight); single-threaded, that cannot
                # happen, and spinning would never end.
                old_spte = self._spte_xchg(table, i, frozen)
                if old_spte == frozen:
                    raise AuditError(
                        f"frozen SPTE at rest in a removed table: gfn {gfn:#x} level {level} "
                        f"value {old_spte:#x}", invariant="nonpresent-value")
            else:
                # Exclusive: non-present entries have no side effects and stay as they are.
                old_spte = self._read_spte(table, i)
                if not L.is_shadow_present_pte(old_spte):
                    continue
                old_spte = self._kvm_tdp_mmu_write_spte(table, i, old_spte, frozen, level)
            self.handle_changed_spte(gfn, old_spte, frozen, level, shared)

        # KVM frees after an RCU grace period; single-threaded, it goes back at once.
        self._tdp_mmu_free_sp(sp)

    def _tdp_account_mmu_page(self, sp):
        self._counters["pt_pages"] += 1
        self._counters[f"pt_pages_l{sp.level}"] += 1

    def _tdp_mmu_unlink_sp(self, sp):
        """Unaccount the table and take it off the possible-NX-huge-page list."""
        self._counters["pt_pages"] -= 1
        self._counters[f"pt_pages_l{sp.level}"] -= 1
        if not sp.nx_huge_page_disallowed:
            return
        sp.nx_huge_page_disallowed = False
        if sp.on_possible_nx_huge_pages:  # untrack_possible_nx_huge_page
            sp.on_possible_nx_huge_pages = False
            self._counters["nx_lpage_splits"] -= 1

    def _tdp_mmu_free_sp(self, sp):
        """The table goes back to the pool (not to a vCPU cache)."""
        del self._sps[sp.spt]
        self._pool._release(sp.spt)
        self._counters["tables_freed"] += 1

    # --- setters (spec §3.4 - §3.6) -------------------------------------------------------------

    def tdp_mmu_set_spte(self, table, index, old_spte, new_spte, gfn, level):
        """Exclusive mode: write, then bookkeeping.  Returns the (possibly refreshed) old."""
        L = self._layout
        if L.is_frozen_spte(old_spte) or L.is_frozen_spte(new_spte):
            self._warn()
        old_spte = self._kvm_tdp_mmu_write_spte(table, index, old_spte, new_spte, level)
        self.handle_changed_spte(gfn, old_spte, new_spte, level, shared=False)
        return old_spte

    def _tdp_mmu_iter_set_spte(self, it, new_spte):
        it.old_spte = self.tdp_mmu_set_spte(it.table, it.index, it.old_spte, new_spte,
                                            it.gfn, it.level)

    def _tdp_mmu_set_spte_atomic_raw(self, it, new_spte):
        """KVM's __tdp_mmu_set_spte_atomic: the CAS alone.  False (EBUSY) on failure, with
        it.old_spte refreshed to the value found; no bookkeeping either way."""
        if it.yielded or self._layout.is_frozen_spte(it.old_spte):
            self._warn()
        ok, observed = self._spte_cmpxchg(it.table, it.index, it.old_spte, new_spte)
        if not ok:
            it.old_spte = observed
        return ok

    def tdp_mmu_set_spte_atomic(self, it, new_spte):
        """Shared mode: CAS, then bookkeeping.  Returns True on success, False for EBUSY."""
        if not self._tdp_mmu_set_spte_atomic_raw(it, new_spte):
            return False
        self.handle_changed_spte(it.gfn, it.old_spte, new_spte, it.level, shared=True)
        return True

    def tdp_mmu_zap_spte_atomic(self, it):
        """Shared-mode zap: freeze -> ranged flush -> store non-present -> bookkeeping."""
        if not self._tdp_mmu_set_spte_atomic_raw(it, self._layout.frozen_value):
            return False
        self._counters["tlb_flushes_ranged"] += 1  # kvm_flush_remote_tlbs_gfn
        # Nobody else may touch a frozen SPTE, so a plain store suffices.
        nonpresent = self._layout.nonpresent_value
        self._spte_store(it.table, it.index, nonpresent)
        self.handle_changed_spte(it.gfn, it.old_spte, nonpresent, it.level, shared=True)
        return True

    # --- walking ----------------------------------------------------------------------------------

    def _for_each_tdp_pte(self, min_level, start, end):
        """for_each_tdp_pte_min_level: yields the iterator at each SPTE, pre-order."""
        it = TdpIter(self, min_level, start)
        while it.valid and it.gfn < end:
            yield it
            it.next()

    def walk(self, gfn):
        gfn = self._check_gfn(gfn)
        return [(it.level, it.old_spte)
                for it in self._for_each_tdp_pte(PG_LEVEL_4K, gfn, gfn + 1)]

    def lookup(self, gfn):
        level, spte = self.walk(gfn)[-1]
        L = self._layout
        if L.is_shadow_present_pte(spte) and L.is_last_spte(spte, level):
            return spte, level
        return None

    # --- the fault path (spec §3.9) -------------------------------------------------------------

    def _page_fault(self, vcpu, gfn, write, exec):  # noqa: A002
        """One vCPU fault (kvm_tdp_mmu_page_fault); counts the result."""
        ret = self._kvm_tdp_mmu_page_fault(vcpu, gfn, write, exec)
        self._counters["faults_" + _RET_PF_NAMES[ret]] += 1
        vcpu._fault_counts["faults_" + _RET_PF_NAMES[ret]] += 1
        return ret

    def _kvm_tdp_mmu_page_fault(self, vcpu, gfn, write, exec):  # noqa: A002
        """KVM's order: fast path, then the cache top-up, then the pfn, then the map."""
        L = self._layout
        # fast_page_fault's first test: the last SPTE on the walk already allows the access.
        level, spte = self.walk(gfn)[-1]
        if (L.is_shadow_present_pte(spte) and L.is_last_spte(spte, level)
                and self._is_access_allowed(spte, write, exec)):
            return PF.SPURIOUS
        # mmu_topup_memory_caches: OutOfMemory leaves the page tables untouched.
        vcpu.cache.topup(5)
        slot = self._slot_for_gfn(gfn)
        # kvm_faultin_pfn: a write to a read-only memslot is emulated (KVM_PFN_ERR_RO_FAULT).
        if slot is not None and slot.readonly and write:
            return PF.EMULATE
        fault = _PageFault(gfn, write, exec, slot)
        self._kvm_mmu_hugepage_adjust(fault)
        return self._tdp_mmu_map(vcpu, fault)

    def _is_access_allowed(self, spte, write, exec):  # noqa: A002
        if exec:
            return self._layout.is_executable_pte(spte)
        if write:
            return bool(spte & PT_WRITABLE_MASK)
        return bool(spte & PT_PRESENT_MASK)

    def _max_mapping_level(self, slot, gfn):
        """The largest level <= max_level whose aligned range lies in the slot with gfn and
        pfn equally aligned (the host never limits it in this model)."""
        for level in range(self._max_level, PG_LEVEL_4K, -1):
            pages = _pages_per_hpage(level)
            start = _gfn_round_for_level(gfn, level)
            inside = slot.base_gfn <= start and start + pages <= slot.base_gfn + slot.npages
            if inside and (slot.pfn - slot.base_gfn) % pages == 0:
                return level
        return PG_LEVEL_4K

    def _kvm_mmu_hugepage_adjust(self, fault):
        fault.huge_page_disallowed = fault.exec and self._nx_huge_pages
        if fault.slot is None:  # no memslot: an MMIO SPTE at 4K
            return
        fault.req_level = self._max_mapping_level(fault.slot, fault.gfn)
        if fault.req_level == PG_LEVEL_4K or fault.huge_page_disallowed:
            return
        fault.goal_level = fault.req_level

    def _disallowed_hugepage_adjust(self, fault, spte, level):
        """A huge page cannot replace a table that the NX mitigation split: go one lower."""
        L = self._layout
        if (level > PG_LEVEL_4K and level == fault.goal_level
                and L.is_shadow_present_pte(spte) and not L.is_large_pte(spte)
                and self._sps[L.spte_to_pfn(spte)].nx_huge_page_disallowed):
            fault.goal_level -= 1

    def _tdp_mmu_alloc_sp(self, vcpu):
        page = vcpu.cache.alloc()
        self._pool._set_state(page, "table")
        self._counters["tables_allocated"] += 1
        return page

    def _tdp_mmu_init_child_sp(self, page, it):
        sp = _MmuPage(page, it.level - 1, it.gfn, (it.table, it.index))
        self._sps[page] = sp
        return sp

    def _tdp_mmu_link_sp(self, it, sp):
        """Link `sp` below the iterator's entry by CAS; True on success."""
        spte = self._layout.make_nonleaf_spte(sp.spt, ad_disabled=self._layout.default_ad_disabled)
        if not self.tdp_mmu_set_spte_atomic(it, spte):
            return False
        self._tdp_account_mmu_page(sp)
        return True

    def _tdp_mmu_split_huge_page(self, it, sp):
        """Fill `sp` with the 512 pieces of the huge leaf at the iterator, then link it."""
        huge_spte = it.old_spte
        level = it.level
        # The table is not linked yet, so these stores need no bookkeeping.
        for i in range(SPTE_ENT_PER_PAGE):
            child = self._layout.make_huge_page_split_spte(
                huge_spte, level - 1, i, nx_huge_pages=self._nx_huge_pages)
            self._spte_store(sp.spt, i, child)
        if not self._tdp_mmu_link_sp(it, sp):
            return False
        # Linking subtracted the huge page; the new children are added here.
        self._update_page_stats(level - 1, SPTE_ENT_PER_PAGE)
        return True

    def _tdp_mmu_map(self, vcpu, fault):
        """kvm_tdp_mmu_map: walk toward fault.gfn, building tables, then install the leaf."""
        L = self._layout
        for it in self._for_each_tdp_pte(PG_LEVEL_4K, fault.gfn, fault.gfn + 1):
            if self._nx_huge_pages:
                self._disallowed_hugepage_adjust(fault, it.old_spte, it.level)
            # Frozen by another thread: retry without allocating anything.
            if L.is_frozen_spte(it.old_spte):
                return PF.RETRY
            if it.level == fault.goal_level:
                return self._tdp_mmu_map_handle_target_level(fault, it)
            # Step down into an existing lower-level table.
            if L.is_shadow_present_pte(it.old_spte) and not L.is_large_pte(it.old_spte):
                continue
            # Non-present, or a huge page to split: a new table from the vCPU cache.
            page = self._tdp_mmu_alloc_sp(vcpu)
            sp = self._tdp_mmu_init_child_sp(page, it)
            sp.nx_huge_page_disallowed = fault.huge_page_disallowed
            if L.is_shadow_present_pte(it.old_spte):
                linked = self._tdp_mmu_split_huge_page(it, sp)
            else:
                linked = self._tdp_mmu_link_sp(it, sp)
            if not linked:  # lost the CAS: the table goes back to the pool
                self._tdp_mmu_free_sp(sp)
                return PF.RETRY
            # API.md is silent: which tables count in nx_lpage_splits.  As KVM: every table
            # of an NX-disallowed fault is marked, but only those at or below the level the
            # fault could have mapped (req_level >= it.level) are tracked and counted.
            if fault.huge_page_disallowed and fault.req_level >= it.level:
                sp.on_possible_nx_huge_pages = True
                self._counters["nx_lpage_splits"] += 1
        # The walk ended before the goal level (KVM WARNs if it claims to have reached it).
        return PF.RETRY

    def _tdp_mmu_map_handle_target_level(self, fault, it):
        L = self._layout
        ret = PF.FIXED
        wrprot = False
        if fault.slot is None:
            new_spte = L.make_mmio_spte(it.gfn, ACC_ALL, self._mmio_generation)
        else:
            pfn = fault.slot.gfn_to_pfn(_gfn_round_for_level(fault.gfn, it.level))
            wrprot, new_spte = L.make_spte(
                pfn, it.level, ACC_ALL, host_writable=not fault.slot.readonly,
                nx_huge_pages=self._nx_huge_pages, old_spte=it.old_spte)

        installed = False
        if new_spte == it.old_spte:
            ret = PF.SPURIOUS
        elif not self.tdp_mmu_set_spte_atomic(it, new_spte):
            return PF.RETRY
        else:
            installed = True
            # A huge page replaced a table: flush the range it covered.
            if L.is_shadow_present_pte(it.old_spte) and not L.is_last_spte(it.old_spte, it.level):
                self._counters["tlb_flushes_ranged"] += 1

        if wrprot and fault.write:
            ret = PF.EMULATE
        if L.is_mmio_spte(new_spte):
            # KVM bumps pf_mmio_spte_created even when the SPTE was already there; the
            # contract counts only SPTEs actually installed.
            if installed:
                self._counters["mmio_sptes_created"] += 1
            ret = PF.EMULATE
        return ret

    # --- zaps (spec §3.10) -----------------------------------------------------------------------

    def _zap_leafs(self, start, end):
        """tdp_mmu_zap_leafs (exclusive): zap present leaves intersecting [start, end).
        Returns whether a TLB flush is needed; frees no table."""
        L = self._layout
        flush = False
        for it in self._for_each_tdp_pte(PG_LEVEL_4K, start, end):
            if not L.is_shadow_present_pte(it.old_spte) or not L.is_last_spte(it.old_spte,
                                                                                it.level):
                continue
            self._tdp_mmu_iter_set_spte(it, L.nonpresent_value)
            flush = True  # the only root is always valid
        return flush

    def zap_gfn_range(self, start, end):
        start = _check_int("start", start, 0, self._max_gfn + 1)
        end = _check_int("end", end, 0, self._max_gfn + 1)
        if start > end:
            raise ValueError(f"start {start:#x} > end {end:#x}")
        # An empty range intersects nothing.  (KVM's iterator would still visit the entries
        # above `start` whose gfn is below it; KVM never passes an empty range.)
        if start == end:
            return False
        flush = self._zap_leafs(start, end)
        if flush:
            self._counters["tlb_flushes_ranged"] += 1
        return flush

    def _tdp_mmu_zap_root_level(self, zap_level):
        """__tdp_mmu_zap_root (exclusive): zap present entries at levels <= zap_level that the
        walk (min level zap_level) reaches.  Returns whether anything was zapped."""
        L = self._layout
        zapped = False
        for it in self._for_each_tdp_pte(zap_level, 0, self._max_gfn):
            if not L.is_shadow_present_pte(it.old_spte):
                continue
            if it.level > zap_level:
                continue
            self._tdp_mmu_iter_set_spte(it, L.nonpresent_value)
            zapped = True
        return zapped

    def _zap_root(self):
        """tdp_mmu_zap_root: passes of decreasing granularity, 4K -> 2M -> 1G -> root."""
        zapped = False
        for zap_level in (PG_LEVEL_4K, PG_LEVEL_2M, PG_LEVEL_1G, self._root_level):
            zapped |= self._tdp_mmu_zap_root_level(zap_level)
        return zapped

    def zap_all(self):
        """Zap everything; True when anything was zapped (one full TLB flush then)."""
        zapped = self._zap_root()
        if zapped:
            self._counters["tlb_flushes"] += 1
        return zapped

    def _zap_sp(self, sp):
        """kvm_tdp_mmu_zap_sp (exclusive): unlink `sp` by zapping its parent entry."""
        if sp.ptep is None:  # the root has no parent entry
            self._warn()
            return False
        table, index = sp.ptep
        old_spte = self._read_spte(table, index)
        if not self._layout.is_shadow_present_pte(old_spte):
            self._warn()
            return False
        self.tdp_mmu_set_spte(table, index, old_spte, self._layout.nonpresent_value,
                              sp.gfn, sp.level + 1)
        return True

    def zap_sp(self, gfn, level):
        gfn = self._check_gfn(gfn)
        level = _check_int("level", level, PG_LEVEL_4K, self._root_level)
        # Find the table of `level` on gfn's path: the child of the entry at level + 1.
        sp = None
        for it in self._for_each_tdp_pte(level + 1, gfn, gfn + 1):
            if it.level == level + 1:
                child_pt = self._spte_to_child_pt(it.old_spte, it.level)
                if child_pt is not None:
                    sp = self._sps[child_pt]
                break
        if sp is None or not self._zap_sp(sp):
            return False
        self._counters["tlb_flushes"] += 1  # kvm_mmu_remote_flush_or_zap
        return True

    def zap_spte_atomic(self, gfn, level):
        gfn = self._check_gfn(gfn)
        level = _check_int("level", level, PG_LEVEL_4K, self._root_level + 1)
        L = self._layout
        for it in self._for_each_tdp_pte(level, gfn, gfn + 1):
            if it.level != level:
                continue
            # API.md is silent: a lost CAS (inject_cas_failures) is retried on the refreshed
            # value, as KVM's callers do ("goto retry").
            while L.is_shadow_present_pte(it.old_spte):
                if self.tdp_mmu_zap_spte_atomic(it):
                    return True
            return False
        return False

    # --- audit (spec §6) -------------------------------------------------------------------------

    def audit(self):
        """Check the invariants of API.md; raise AuditError naming the first one broken."""
        L = self._layout
        page_counts = dict.fromkeys(_PAGE_STAT_KEYS.values(), 0)
        level_counts = {level: 0 for level in range(1, PT64_ROOT_MAX_LEVEL + 1)}
        linked = []  # tables reached from the root, in pre-order
        seen = set()

        def fail(invariant, what, gfn=None, level=None, value=None):
            where = ""
            if gfn is not None:
                where = f" at gfn {gfn:#x} level {level} value {value:#x}"
            raise AuditError(f"{invariant}: {what}{where}", invariant=invariant)

        def visit(table, level, base_gfn):
            if table in seen:
                fail("pool-pages", f"table {table} is linked more than once",
                     base_gfn, level, table)
            seen.add(table)
            linked.append(table)
            level_counts[level] += 1
            sp = self._sps.get(table)
            if sp is None or sp.level != level or sp.gfn != base_gfn:
                fail("nonleaf-child", f"table {table} has metadata {self._describe_sp(sp)}, "
                     f"expected level {level} gfn {base_gfn:#x}", base_gfn, level, table)
            for i in range(SPTE_ENT_PER_PAGE):
                spte = self._read_spte(table, i)
                gfn = base_gfn + i * _pages_per_hpage(level)
                if spte == L.nonpresent_value or L.is_mmio_spte(spte):
                    continue  # non-present, or a current or stale MMIO SPTE
                if not L.is_shadow_present_pte(spte):
                    fail("nonpresent-value", "neither the non-present value, a present SPTE "
                         "nor an MMIO SPTE", gfn, level, spte)
                if L.present_mask & VMX_EPT_SUPPRESS_VE_BIT and not spte & VMX_EPT_SUPPRESS_VE_BIT:
                    fail("ept-bit63", "present EPT SPTE without suppress-#VE", gfn, level, spte)
                if L.is_last_spte(spte, level):
                    audit_leaf(spte, gfn, level)
                else:
                    child = L.spte_to_pfn(spte)
                    if child >= self._pool.capacity:
                        fail("nonleaf-child", "non-leaf points outside the pool", gfn, level, spte)
                    visit(child, level - 1, gfn)

        def audit_leaf(spte, gfn, level):
            if level > self._max_level:
                fail("leaf-level", f"leaf above max_level {self._max_level}", gfn, level, spte)
            if not L._writable_state_ok(spte):
                fail("writable-state", "MMU-writable without Host-writable, or W without "
                     "MMU-writable", gfn, level, spte)
            slot = self._slot_for_gfn(gfn)
            pages = _pages_per_hpage(level)
            if slot is None or gfn + pages > slot.base_gfn + slot.npages:
                fail("leaf-slot", "leaf maps gfns outside every memslot", gfn, level, spte)
            if L.spte_to_pfn(spte) != slot.gfn_to_pfn(gfn):
                fail("leaf-pfn", f"leaf pfn is not the slot's pfn {slot.gfn_to_pfn(gfn):#x}",
                     gfn, level, spte)
            page_counts[_PAGE_STAT_KEYS[level]] += 1

        visit(self._root, self._root_level, 0)

        counters = self._counters
        for key, found in page_counts.items():
            if counters[key] != found:
                fail("page-stats", f"{key} is {counters[key]}, {found} leaves found")
        for level, found in level_counts.items():
            if counters[f"pt_pages_l{level}"] != found:
                fail("pt-pages", f"pt_pages_l{level} is {counters[f'pt_pages_l{level}']}, "
                     f"{found} tables found")
        if counters["pt_pages"] != len(linked):
            fail("pt-pages", f"pt_pages is {counters['pt_pages']}, {len(linked)} tables found")
        if set(self._sps) != seen:
            extra = sorted(set(self._sps) - seen)
            fail("pt-pages", f"tables with metadata that are not linked: {extra[:8]}")
        tracked = sum(sp.on_possible_nx_huge_pages for sp in self._sps.values())
        if counters["nx_lpage_splits"] != tracked:
            fail("nx-lpage-splits", f"nx_lpage_splits is {counters['nx_lpage_splits']}, "
                 f"{tracked} tables tracked")

        # Every pool page is exactly one of: free, cached in one vCPU cache, linked once; and
        # the pool's page_state agrees.
        owner = {}
        pool = self._pool
        free_pages = list(pool._freed) + list(range(pool._next_never_used, pool.capacity))
        holders = [("free", "free", free_pages), ("linked", "table", linked)]
        holders += [(f"cached in vCPU {n}", "cached", vcpu.cache.objects)
                    for n, vcpu in enumerate(self._vcpus)]
        for name, state, pages in holders:
            for page in pages:
                if page in owner:
                    fail("pool-pages", f"page {page} is both {owner[page]} and {name}")
                owner[page] = name
                if pool.page_state(page) != state:
                    fail("pool-pages", f"page {page} is {name} but its state is "
                         f"{pool.page_state(page)!r}")
        missing = [page for page in range(pool.capacity) if page not in owner]
        if missing:
            fail("pool-pages", f"pages neither free, cached nor linked: {missing[:8]}")

    @staticmethod
    def _describe_sp(sp):
        if sp is None:
            return "none"
        return f"level {sp.level} gfn {sp.gfn:#x}"


# =================================================================================================
# Vcpu: a fault source with its own shadow-page memory cache
# =================================================================================================


class Vcpu:
    """A vCPU of a :class:`Vm`; owns the ``mmu_shadow_page_cache`` its faults draw on."""

    def __init__(self, vm):
        if not isinstance(vm, Vm):
            raise TypeError(f"vm must be a Vm, not {type(vm).__name__}")
        self._vm = vm
        # init_value = the non-present value; gfp_zero only when that value is 0 (spec §1.3).
        self._cache = MemoryCache(vm.pool, init_value=vm.layout.nonpresent_value,
                                  capacity=KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE)
        vm._vcpus.append(self)
        self._fault_counts = {"faults_fixed": 0, "faults_spurious": 0, "faults_retry": 0,
                              "faults_emulate": 0}

    vm = property(lambda self: self._vm)

    @property
    def stats(self):
        """This vCPU's own fault counts."""
        return dict(self._fault_counts)
    cache = property(lambda self: self._cache)

    def fault(self, gfn, write=False, exec=False):  # noqa: A002 - the contract's name
        gfn = self._vm._check_gfn(gfn)
        return self._vm._page_fault(self, gfn, bool(write), bool(exec))

    def fault_batch(self, gfns, access=None, out=None):
        """Fault every gfn in order; RETRY results are faulted again."""
        vm = self._vm
        # Validate everything before the first fault.
        gfn_list = _check_int_array("gfns", gfns)
        n = len(gfn_list)
        for gfn in gfn_list:
            if not 0 <= gfn < vm._max_gfn:
                raise ValueError(f"gfn {gfn:#x} outside [0, {vm._max_gfn:#x})")
        if access is None:
            access_list = [0] * n
        else:
            access_list = _check_int_array("access", access)
            if len(access_list) != n:
                raise ValueError(f"access has {len(access_list)} entries, gfns has {n}")
            for a in access_list:
                if not 0 <= a <= 3:
                    raise ValueError(f"access values must be in 0..3, got {a}")
        if out is not None:
            if not isinstance(out, np.ndarray):
                raise TypeError(f"out must be a numpy.ndarray, not {type(out).__name__}")
            if out.dtype != np.int8:
                raise TypeError(f"out must have dtype int8, not {out.dtype}")
            if out.shape != (n,):
                raise ValueError(f"out must have shape ({n},), not {out.shape}")
            _check_writable("out", out)

        counts = {"fixed": 0, "spurious": 0, "retry": 0, "emulate": 0}
        for k, (gfn, acc) in enumerate(zip(gfn_list, access_list)):
            write, exec_ = bool(acc & 1), bool(acc & 2)
            while True:
                try:
                    ret = vm._page_fault(self, gfn, write, exec_)
                except OutOfMemory as e:
                    raise OutOfMemory(f"page pool exhausted after {k} faults ({e})",
                                      completed=k) from e
                if ret != PF.RETRY:
                    break
                counts["retry"] += 1
            counts[_RET_PF_NAMES[ret]] += 1
            if out is not None:
                out[k] = int(ret)
        return counts

    def __repr__(self):
        return f"Vcpu(cache={self._cache!r})"


def _check_int_array(name, array):
    """A 1-D numpy array of an integer dtype -> list of Python ints."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy.ndarray, not {type(array).__name__}")
    # API.md is silent: whether bool arrays count as integer arrays; numpy says they do not.
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must have an integer dtype, not {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, not of shape {array.shape}")
    values = [int(v) for v in array]
    for v in values:
        if v < 0:
            raise ValueError(f"{name} values must be >= 0, got {v}")
    return values
