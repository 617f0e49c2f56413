"""Page-fault results, numbered as KVM's ``RET_PF_*`` (arch/x86/kvm/mmu/mmu_internal.h)."""
import enum


class PF(enum.IntEnum):
    CONTINUE = 0
    RETRY = 1
    EMULATE = 2
    INVALID = 3
    FIXED = 4
    SPURIOUS = 5
