"""SPTE constants and the masks of one paging mode: ``SpteLayout`` (predicates, constructors).

Models Linux v6.10 ``arch/x86/kvm/mmu/spte.h`` and ``spte.c`` (with the level macros of
``mmu.h`` / ``mmu_internal.h`` and the VMX EPT bits of ``arch/x86/include/asm/vmx.h``).
KVM keeps the masks in ``__read_mostly`` globals; here each layout is an immutable object
so that EPT and NPT models live side by side.
"""
from ._checks import check_int, check_u64

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

# Derived values (not exported by the package).
PFN_LIMIT = 1 << 40  # the PFN field holds 40 bits
PAGE_BYTES = SPTE_ENT_PER_PAGE * 8
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


def pages_per_hpage(level):
    """KVM_PAGES_PER_HPAGE: how many 4K gfns one entry at `level` maps."""
    return 1 << (9 * (level - 1))


def gfn_round_for_level(gfn, level):
    return gfn & ~(pages_per_hpage(level) - 1)


def spte_index(gfn, level):
    """SPTE_INDEX: the entry index of gfn in a table of `level`."""
    return (gfn >> (9 * (level - 1))) & (SPTE_ENT_PER_PAGE - 1)


# Layout-independent predicates (spte.h's static inlines; the SpteLayout methods below are
# the checked public forms).  Internal callers pass valid SPTEs and levels.


def is_shadow_present_pte(spte):
    return bool(spte & SPTE_MMU_PRESENT_MASK)


def is_large_pte(spte):
    return bool(spte & PT_PAGE_SIZE_MASK)


def is_last_spte(spte, level):
    return level == PG_LEVEL_4K or is_large_pte(spte)


def spte_to_pfn(spte):
    return (spte & SPTE_BASE_ADDR_MASK) >> 12


def check_level(level, lo=None, hi=None):
    """A level argument: an int in [lo, hi] (default 1..PT64_ROOT_MAX_LEVEL)."""
    lo = PG_LEVEL_4K if lo is None else lo
    hi = PT64_ROOT_MAX_LEVEL if hi is None else hi
    return check_int("level", level, lo, hi + 1)


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
        nonpresent = check_u64("nonpresent_value", nonpresent_value)
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
        return is_shadow_present_pte(check_u64("spte", spte))

    def is_large_pte(self, spte):
        return is_large_pte(check_u64("spte", spte))

    def is_last_spte(self, spte, level):
        spte = check_u64("spte", spte)
        return is_last_spte(spte, check_level(level))

    def is_mmio_spte(self, spte):
        spte = check_u64("spte", spte)
        return self._is_mmio(spte)

    def is_frozen_spte(self, spte):
        spte = check_u64("spte", spte)
        return spte == self.frozen_value

    def spte_to_pfn(self, spte):
        return spte_to_pfn(check_u64("spte", spte))

    def spte_ad_enabled(self, spte):
        spte = check_u64("spte", spte)
        return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_DISABLED

    def spte_ad_need_write_protect(self, spte):
        spte = check_u64("spte", spte)
        return (spte & SPTE_TDP_AD_MASK) != SPTE_TDP_AD_ENABLED

    def _spte_shadow_accessed_mask(self, spte):
        return self.accessed_mask if self.spte_ad_enabled(spte) else 0

    def _spte_shadow_dirty_mask(self, spte):
        return self.dirty_mask if self.spte_ad_enabled(spte) else 0

    def is_access_track_spte(self, spte):
        spte = check_u64("spte", spte)
        return not self.spte_ad_enabled(spte) and (spte & self.acc_track_mask) == 0

    def is_accessed_spte(self, spte):
        """6.10 form: the A bit if the SPTE uses A/D bits, else "not access-tracked"."""
        spte = check_u64("spte", spte)
        accessed_mask = self._spte_shadow_accessed_mask(spte)
        if accessed_mask:
            return bool(spte & accessed_mask)
        return not self.is_access_track_spte(spte)

    def is_dirty_spte(self, spte):
        """6.10 form: the D bit if the SPTE uses A/D bits, else the W bit."""
        spte = check_u64("spte", spte)
        dirty_mask = self._spte_shadow_dirty_mask(spte)
        if dirty_mask:
            return bool(spte & dirty_mask)
        return bool(spte & PT_WRITABLE_MASK)

    def is_writable_pte(self, spte):
        spte = check_u64("spte", spte)
        return bool(spte & PT_WRITABLE_MASK)

    def is_mmu_writable_spte(self, spte):
        spte = check_u64("spte", spte)
        return bool(spte & self.mmu_writable_mask)

    def is_executable_pte(self, spte):
        spte = check_u64("spte", spte)
        return (spte & (self.x_mask | self.nx_mask)) == self.x_mask

    def spte_has_volatile_bits(self, spte):
        """Bits that may change without mmu_lock (fast page fault W, hardware A/D)."""
        spte = check_u64("spte", spte)
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
        pfn = check_int("pfn", pfn, 0, PFN_LIMIT)
        level = check_level(level, PG_LEVEL_4K, PG_LEVEL_1G)
        access = check_int("access", access, 0, ACC_ALL + 1)
        old_spte = self.nonpresent_value if old_spte is None else check_u64("old_spte", old_spte)
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
        child_pfn = check_int("child_pfn", child_pfn, 0, PFN_LIMIT)
        ad_disabled = self.default_ad_disabled if ad_disabled is None else bool(ad_disabled)
        spte = (SPTE_MMU_PRESENT_MASK | (child_pfn << 12) | self.present_mask | PT_WRITABLE_MASK
                | self.user_mask | self.x_mask)
        spte |= SPTE_TDP_AD_DISABLED if ad_disabled else self.accessed_mask
        return spte

    def make_mmio_spte(self, gfn, access=0, generation=0):
        gfn = check_int("gfn", gfn, 0, 1 << 52)
        # API.md is silent: the range of `access`; take ACC_* bits (0..7) as make_spte does.
        access = check_int("access", access, 0, ACC_ALL + 1)
        generation = check_int("generation", generation, 0, MMIO_SPTE_GEN_MASK + 1)
        spte = generation_mmio_spte_mask(generation)
        spte |= self.mmio_value | (access & self.mmio_access_mask)
        # 6.10 ORs the whole gpa, unmasked: a gfn from bit 40 up lands in bits 52+ (an
        # impossible gfn once kvm_mmu_max_gfn bounds MMIO SPTEs, but that is the function).
        spte |= gfn << 12
        return spte

    def _check_mmio(self, spte):
        spte = check_u64("spte", spte)
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
        huge_spte = check_u64("huge_spte", huge_spte)
        child_level = check_int("child_level", child_level, PG_LEVEL_4K, PG_LEVEL_2M + 1)
        index = check_int("index", index, 0, SPTE_ENT_PER_PAGE)
        if not (huge_spte & SPTE_MMU_PRESENT_MASK) or not (huge_spte & PT_PAGE_SIZE_MASK):
            raise ValueError(f"huge_spte {huge_spte:#x} is not a present large SPTE")
        # The child maps the index-th sub-range. KVM ORs the offset into the address (the
        # sum, for the size-aligned PFNs it builds); so does this, also for unaligned ones.
        child_spte = huge_spte | (index * pages_per_hpage(child_level)) << 12
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
        spte = check_u64("spte", spte)
        if self.spte_ad_enabled(spte):
            return spte & ~self.accessed_mask
        if self.is_access_track_spte(spte):
            return spte
        # (KVM WARNs on broken writable invariants or non-zero saved bits here.)
        spte |= (spte & SHADOW_ACC_TRACK_SAVED_BITS_MASK) << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT
        spte &= ~self.acc_track_mask
        return spte

    def restore_acc_track_spte(self, spte):
        spte = check_u64("spte", spte)
        saved_bits = (spte >> SHADOW_ACC_TRACK_SAVED_BITS_SHIFT) & SHADOW_ACC_TRACK_SAVED_BITS_MASK
        spte &= ~self.acc_track_mask
        spte &= ~_SHADOW_ACC_TRACK_SAVED_MASK
        spte |= saved_bits
        return spte




# =================================================================================================
# The VM's MMIO SPTEs: kvm->arch.shadow_mmio_value and the host's physical-address width
# =================================================================================================
# KVM keeps shadow_mmio_mask / shadow_mmio_access_mask / enable_mmio_caching in globals set by
# kvm_mmu_set_mmio_spte_mask, and the value per VM (kvm->arch.shadow_mmio_value, 6.10).  The
# model keeps all of them in the Kvm record (the layout stays the paging mode's constant
# masks); these functions take that record.


def kvm_mmu_set_mmio_spte_mask(kvm, mmio_value, mmio_mask, access_mask):
    """kvm_mmu_set_mmio_spte_mask: a value of 0 disables MMIO caching."""
    kvm.enable_mmio_caching = mmio_value != 0
    kvm.shadow_mmio_value = mmio_value
    kvm.shadow_mmio_mask = mmio_mask
    kvm.shadow_mmio_access_mask = access_mask


def kvm_mmu_init_mmio_masks(kvm):
    """The MMIO masks of the VM's paging mode and host.

    EPT (kvm_mmu_set_ept_masks): the misconfiguration value W|X (0b110), always cached.
    NPT (kvm_mmu_reset_all_pte_masks): a reserved physical-address bit (51) plus P, which
    exists only while the host has fewer than 52 physical-address bits; at 52 there is no
    reserved PA bit, so MMIO caching is off (value and mask 0).
    """
    L = kvm.layout
    if L.mode == "ept":
        kvm_mmu_set_mmio_spte_mask(kvm, L.mmio_value, L.mmio_mask, L.mmio_access_mask)
    elif kvm.host_maxphyaddr < 52:
        kvm_mmu_set_mmio_spte_mask(kvm, NPT_MMIO_VALUE, NPT_MMIO_VALUE,
                                   ACC_WRITE_MASK | ACC_USER_MASK)
    else:
        kvm_mmu_set_mmio_spte_mask(kvm, 0, 0, ACC_WRITE_MASK | ACC_USER_MASK)
    # shadow_nonpresent_or_rsvd_lower_gfn_mask without the L1TF mitigation:
    # GENMASK(host_maxphyaddr - 1, PAGE_SHIFT).
    kvm.mmio_gfn_mask = ((1 << kvm.host_maxphyaddr) - 1) & ~0xFFF


def is_mmio_spte(kvm, spte):
    """spte.h is_mmio_spte(kvm, spte): the VM's value, and only while MMIO caching is on."""
    return kvm.enable_mmio_caching and (spte & kvm.shadow_mmio_mask) == kvm.shadow_mmio_value


def make_mmio_spte(kvm, gfn, access):
    """spte.c make_mmio_spte(vcpu, gfn, access): the generation is the memslots one, masked."""
    spte = generation_mmio_spte_mask(kvm.memslots_generation & MMIO_SPTE_GEN_MASK)
    spte |= kvm.shadow_mmio_value | (access & kvm.shadow_mmio_access_mask)
    spte |= gfn << 12
    return spte


def get_mmio_spte_gfn(kvm, spte):
    """mmu.c get_mmio_spte_gfn: the gpa bits below the host's MAXPHYADDR."""
    return (spte & kvm.mmio_gfn_mask) >> 12


def generation_mmio_spte_mask(gen):
    """spte.h generation_mmio_spte_mask: gen[7:0] in bits 3..10, gen[18:8] in bits 52..62."""
    spte = (gen << MMIO_SPTE_GEN_LOW_START) & _MMIO_SPTE_GEN_LOW_MASK
    spte |= (gen << _MMIO_SPTE_GEN_HIGH_SHIFT) & _MMIO_SPTE_GEN_HIGH_MASK
    return spte


def get_mmio_spte_generation(spte):
    gen = (spte & _MMIO_SPTE_GEN_LOW_MASK) >> MMIO_SPTE_GEN_LOW_START
    gen |= (spte & _MMIO_SPTE_GEN_HIGH_MASK) >> _MMIO_SPTE_GEN_HIGH_SHIFT
    return gen
