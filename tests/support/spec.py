"""Constants and geometry of KVM_MMU_SPEC.md (§1.2 constants, §2.1 geometry, §2.2 software
bits) and docs/API.md "Constants", written down independently of both implementations."""

U64 = (1 << 64) - 1
NP63 = 1 << 63  # SHADOW_NONPRESENT_VALUE on x86-64 (spec §1.2)
#: the garbage every poisoned pool page starts with (STYLE.md §3.7 "Poisoned memory")
POISON = 0xAAAA_AAAA_AAAA_AAAA
ACC_ALL = 7
ENT = 512  # SPTE_ENT_PER_PAGE
PAGES_2M = 512
PAGES_1G = 512 * 512
PFN_LIMIT = 1 << 40
PFN0 = 1 << 30  # a 1G-aligned host pfn (2**30 is a multiple of 512**2 = 2**18)

BIT_PRESENT = 1 << 11  # SPTE_MMU_PRESENT_MASK: the only bit is_shadow_present_pte tests
BIT_PS = 1 << 7  # PT_PAGE_SIZE_MASK
BIT_AD_DISABLED = 1 << 52  # SPTE_TDP_AD_DISABLED
ADDR_MASK = ((1 << 52) - 1) & ~0xFFF  # SPTE_BASE_ADDR_MASK
W_BIT = 1 << 1
MMIO_GEN_MASK = (1 << 19) - 1  # MMIO_SPTE_GEN_MASK (spec §2.2)

#: KVM's RET_PF_* numbers (docs/API.md ``PF``)
PF_FIXED, PF_SPURIOUS, PF_RETRY, PF_EMULATE = 4, 5, 1, 2

#: docs/API.md "Constants", verbatim
API_CONSTANTS = {
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
    "SPTE_BASE_ADDR_MASK": ((1 << 52) - 1) & ~0xFFF,
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
    # issue 10 contract "Constants": KVM's page-fault error code bits
    # (arch/x86/include/asm/kvm_host.h PFERR_*_BIT) and the per-access code of a hit
    "PFERR_PRESENT_MASK": 1 << 0,
    "PFERR_WRITE_MASK": 1 << 1,
    "PFERR_USER_MASK": 1 << 2,
    "PFERR_RSVD_MASK": 1 << 3,
    "PFERR_FETCH_MASK": 1 << 4,
    "ACCESS_HIT": 0,
}


def gfn_width(root_level):
    """Exclusive bound on gfns: 48-bit GPA for 4 levels, 57-bit for 5 (API.md)."""
    return 1 << (9 * root_level)


def pages_per(level):
    """KVM_PAGES_PER_HPAGE (spec §2.1)."""
    return 1 << (9 * (level - 1))


def round_gfn(gfn, level):
    """gfn_round_for_level (spec §2.1)."""
    return gfn & ~(pages_per(level) - 1)


def spte_index(gfn, level):
    """SPTE_INDEX of a gfn at a level (spec §2.1)."""
    return (gfn >> (9 * (level - 1))) & 511


def child_of(spte):
    """The page index a non-leaf SPTE points at (PFN field, bits 12..51)."""
    return (spte & ADDR_MASK) >> 12


def is_present(spte):
    return bool(spte & BIT_PRESENT)


def is_leaf(spte, level):
    """is_last_spte on a present SPTE (spec §2.1: level 1 or bit 7)."""
    return is_present(spte) and (level == 1 or bool(spte & BIT_PS))


def ad_fault_counts(gfns):
    """(fixed, spurious) of delivering every gfn of a sequence as a not-present fault
    (``fault``/``fault_batch``) to a VM whose layout has A/D bits, all gfns in writable RAM,
    nothing zapped: the first fault of a page installs a writable, dirty leaf (make_spte
    sets D with ACC_WRITE); the second is no fast-path candidate (6.10 mmu.c
    page_fault_can_be_fast: !PRESENT only without A/D) and make_spte with the writable old
    SPTE skips D (spte.c: ``if (is_writable_pte(old_spte)) goto out``): FIXED again; from
    the third on the same SPTE is built: RET_PF_SPURIOUS."""
    import numpy as np

    gfns = np.asarray(gfns)
    if gfns.size == 0:
        return 0, 0
    counts = np.unique(gfns, return_counts=True)[1]
    fixed = int(counts.size + (counts >= 2).sum())
    return fixed, int(gfns.size) - fixed
