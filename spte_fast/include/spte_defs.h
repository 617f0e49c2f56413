/* spte_fast: the fixed SPTE constants of Linux v6.10 (arch/x86/kvm/mmu/spte.h, mmu.h,
 * arch/x86/include/asm/vmx.h), one place.  Mode-dependent masks live in spte_masks_t
 * (spte.pxd), per layout.  The _Static_asserts are KVM's static_asserts; tests/test_spte.py
 * mirrors each one at run time against the Python-visible values. */
#ifndef SPTE_FAST_SPTE_DEFS_H
#define SPTE_FAST_SPTE_DEFS_H

#include <stdint.h>

#define SPTE_MMU_PRESENT_MASK        (1ULL << 11)  /* KVM "shadow-present": the only bit is_shadow_present_pte tests */
#define SHADOW_NONPRESENT_VALUE      (1ULL << 63)  /* EPT suppress-#VE; NPT ignores it when P=0 */
#define FROZEN_SPTE_BITS             0x5a0ULL      /* bits 5,7,8,10: no RWX/P, no PFN, not bit 11 */
#define SPTE_BASE_ADDR_MASK          (((1ULL << 52) - 1) & ~0xfffULL)  /* PFN field, bits 12..51 */
#define PT_PRESENT_MASK              (1ULL << 0)
#define PT_WRITABLE_MASK             (1ULL << 1)
#define PT_PAGE_SIZE_MASK            (1ULL << 7)
#define SPTE_TDP_AD_SHIFT            52
#define SPTE_TDP_AD_MASK             (3ULL << 52)  /* A/D type of a present TDP SPTE */
#define SPTE_TDP_AD_ENABLED          0ULL          /* must be 0: bits 52-62 reserved in PAE */
#define SPTE_TDP_AD_DISABLED         (1ULL << 52)  /* access tracking through RWX */
#define SPTE_TDP_AD_WRPROT_ONLY      (2ULL << 52)  /* dirty tracking through write-protection */
#define SHADOW_ACC_TRACK_SAVED_BITS_MASK  5ULL     /* R|X; W is never saved */
#define SHADOW_ACC_TRACK_SAVED_BITS_SHIFT 54       /* saved R at 54, saved X at 56 */
#define EPT_SPTE_HOST_WRITABLE       (1ULL << 57)
#define EPT_SPTE_MMU_WRITABLE        (1ULL << 58)
#define DEFAULT_SPTE_HOST_WRITABLE   (1ULL << 9)
#define DEFAULT_SPTE_MMU_WRITABLE    (1ULL << 10)
#define VMX_EPT_SUPPRESS_VE_BIT      (1ULL << 63)
#define VMX_EPT_RWX_MASK             7ULL
#define VMX_EPT_MISCONFIG_WX_VALUE   6ULL          /* W|X without R: EPT misconfiguration */
#define VMX_EPT_MEMTYPE_WB_IPAT      0x70ULL       /* WB (6 << 3) | IPAT (bit 6): normal RAM */
#define VMX_EPT_MEMTYPE_MASK         0x78ULL
#define NPT_MMIO_VALUE               ((1ULL << 51) | 1ULL)  /* reserved PA bit 51 + P */
#define MMIO_SPTE_GEN_MASK           0x7ffffULL    /* 19-bit memslot generation */
#define MMIO_SPTE_GEN_LOW_START      3
#define MMIO_SPTE_GEN_LOW_END        10
#define MMIO_SPTE_GEN_HIGH_START     52
#define MMIO_SPTE_GEN_HIGH_END       62
#define MMIO_SPTE_GEN_LOW_MASK       (((1ULL << (MMIO_SPTE_GEN_LOW_END + 1)) - 1) & ~((1ULL << MMIO_SPTE_GEN_LOW_START) - 1))
#define MMIO_SPTE_GEN_HIGH_MASK      (((1ULL << (MMIO_SPTE_GEN_HIGH_END + 1)) - 1) & ~((1ULL << MMIO_SPTE_GEN_HIGH_START) - 1))
#define MMIO_SPTE_GEN_LOW_BITS       (MMIO_SPTE_GEN_LOW_END - MMIO_SPTE_GEN_LOW_START + 1)
#define MMIO_SPTE_GEN_HIGH_SHIFT     (MMIO_SPTE_GEN_HIGH_START - MMIO_SPTE_GEN_LOW_BITS)
#define SPTE_ENT_PER_PAGE            512
#define PT64_ROOT_MAX_LEVEL          5
#define KVM_ARCH_NR_OBJS_PER_MEMORY_CACHE 40
#define ACC_EXEC_MASK                1
#define ACC_WRITE_MASK               2
#define ACC_USER_MASK                4
#define ACC_ALL                      7
/* Page-fault error code bits (arch/x86/include/asm/kvm_host.h) */
#define PFERR_PRESENT_MASK           (1ULL << 0)
#define PFERR_WRITE_MASK             (1ULL << 1)
#define PFERR_USER_MASK              (1ULL << 2)
#define PFERR_RSVD_MASK              (1ULL << 3)
#define PFERR_FETCH_MASK             (1ULL << 4)

_Static_assert(!(SHADOW_NONPRESENT_VALUE & SPTE_MMU_PRESENT_MASK), "non-present value must not be MMU-present");
_Static_assert(!((SHADOW_NONPRESENT_VALUE | FROZEN_SPTE_BITS) & (SPTE_MMU_PRESENT_MASK | 7ULL)), "frozen must not be present");
_Static_assert(!(SPTE_TDP_AD_MASK & (SHADOW_ACC_TRACK_SAVED_BITS_MASK << SHADOW_ACC_TRACK_SAVED_BITS_SHIFT)), "A/D type vs saved bits");
_Static_assert(!(SPTE_TDP_AD_MASK & (EPT_SPTE_HOST_WRITABLE | EPT_SPTE_MMU_WRITABLE)), "A/D type vs writable bits");
_Static_assert(!((MMIO_SPTE_GEN_LOW_MASK | MMIO_SPTE_GEN_HIGH_MASK) & (SPTE_MMU_PRESENT_MASK | SPTE_BASE_ADDR_MASK)), "MMIO gen bits");

#endif
