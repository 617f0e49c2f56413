# spte_fast.integrations._unicorn: the C side of spte_fast.integrations.unicorn.
#
# unicorn (QEMU's TCG) calls a UC_HOOK_TLB_FILL callback on every miss of its software TLB
# in UC_TLB_VIRTUAL mode.  `tlb_fill` below is that callback as a cdef function with
# unicorn's C signature (uc_cb_tlbevent_t), registered through unicorn's ctypes API as a raw
# function pointer: each fill is one vcpu_tlb_fill (the embedding API of spte_fast._core)
# with no Python object and no GIL -- uc_emu_start runs with the GIL released (ctypes).
# Nothing here links against unicorn: the one entry point the callback needs (uc_emu_stop,
# when the model fails) comes in as an address from the loaded library.
#
# Also here: two C callbacks the benchmarks and the `emulate` command use to measure the
# emulator itself -- an identity TLB fill (the cost of the hook mechanism alone) and an
# instruction counter (UC_HOOK_CODE).

from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree
from libc.stdint cimport int64_t, uint32_t, uint64_t

from spte_fast._core cimport (ACC_FETCH, ACC_READ, ACCESS_GUEST_PAGE_FAULT, ACCESS_INTERRUPTED,
                              COUNT_FAST,
                              NR_BATCH_COUNTS, RET_PF_EMULATE, RET_PF_FIXED, RET_PF_RETRY,
                              RET_PF_SPURIOUS, SPTE_EINVAL, hw_tlb_entry_t, kvm_vcpu_t,
                              vcpu_guest_tlb_fill, vcpu_handle, vcpu_tlb_fill)

cdef extern from *:
    """
    #include <stdint.h>
    /* struct uc_tlb_entry (unicorn.h): uint64_t paddr; uc_prot perms (an int enum). */
    typedef struct { uint64_t paddr; int perms; } sf_uc_tlb_entry;
    typedef int (*sf_uc_emu_stop_fn)(void *uc);
    """
    ctypedef struct sf_uc_tlb_entry:
        uint64_t paddr
        int perms
    ctypedef int (*sf_uc_emu_stop_fn)(void* uc) noexcept nogil

cdef enum:
    UC_MEM_READ = 16                # uc_mem_type: READ, WRITE, FETCH are 16, 17, 18
    UC_PROT_ALL = 7
    INTERRUPTED_RETRIES = 64        # ACCESS_INTERRUPTED rounds before a fill gives up
    # Why a fill was answered with a fault (the guest sees a #PF):
    DENY_NONE = 0
    DENY_EMULATED = 1               # no translation: KVM emulated the access (MMIO)
    DENY_BEYOND = 2                 # a gfn beyond the guest's address width
    DENY_ERROR = 3                  # the model failed (OutOfMemory, ...): emulation stops
    DENY_BAD_KIND = 4               # not a read, write or fetch
    DENY_GUEST_FAULT = 5            # the guest's own page tables refuse it (a #PF)

DENY_REASONS = ("", "emulated", "beyond_address_width", "model_error", "bad_access_type",
                "guest_page_fault")


ctypedef struct fill_state_t:
    kvm_vcpu_t* vcpu
    int64_t fills[3]                # by kind (ACC_*)
    int64_t exits[3]                # fills whose access raised at least one VM exit
    int64_t denied[3]               # fills answered with a fault
    int64_t counts[NR_BATCH_COUNTS] # the accesses' exits by RET_PF_* (vcpu_tlb_fill)
    int error                       # the first model error (-SPTE_E*), 0 for none
    uint64_t error_gfn
    uint64_t denied_vaddr           # the first fill answered with a fault since reset
    int denied_kind
    int denied_reason
    bint guest_paging               # vaddr is guest-virtual: the two-dimensional walk
    bint user                       # the guest's accesses are user-mode
    sf_uc_emu_stop_fn uc_emu_stop


cdef inline bint _deny(fill_state_t* s, uint64_t vaddr, int acc, int reason) noexcept nogil:
    """Answer with a fault; the first one since reset_denied is kept (what follows it is the
    CPU delivering the fault, with no IDT to deliver it to)."""
    if acc >= ACC_READ and acc <= ACC_FETCH:
        s.denied[acc] += 1
    if s.denied_reason == DENY_NONE:
        s.denied_vaddr = vaddr
        s.denied_kind = acc
        s.denied_reason = reason
    return False


cdef bint tlb_fill(void* uc, uint64_t vaddr, int mem_type, sf_uc_tlb_entry* result,
                   void* user_data) noexcept nogil:
    """uc_cb_tlbevent_t: translate the page at `vaddr` for an access of `mem_type` through
    the vCPU's hardware view: a guest-physical address when the guest runs with paging off,
    else guest-virtual (the two-dimensional walk through the guest's own tables)."""
    cdef fill_state_t* s = <fill_state_t*>user_data
    cdef int acc = mem_type - UC_MEM_READ
    cdef hw_tlb_entry_t e
    cdef int r = ACCESS_INTERRUPTED, rounds = 0
    if acc < ACC_READ or acc > ACC_FETCH:
        return _deny(s, vaddr, acc, DENY_BAD_KIND)
    s.fills[acc] += 1
    while r == ACCESS_INTERRUPTED and rounds < INTERRUPTED_RETRIES:
        if s.guest_paging:
            r = vcpu_guest_tlb_fill(s.vcpu, vaddr, acc, s.user, s.counts, &e)
        else:
            r = vcpu_tlb_fill(s.vcpu, vaddr >> 12, acc, s.counts, &e)
        rounds += 1
    if r == -SPTE_EINVAL:
        return _deny(s, vaddr, acc, DENY_BEYOND)
    if s.guest_paging and r == ACCESS_GUEST_PAGE_FAULT:
        return _deny(s, vaddr, acc, DENY_GUEST_FAULT)
    if r < 0 or r == ACCESS_INTERRUPTED:
        if s.error == 0:
            s.error = r if r < 0 else -ACCESS_INTERRUPTED
            s.error_gfn = vaddr >> 12
        s.uc_emu_stop(uc)
        return _deny(s, vaddr, acc, DENY_ERROR)
    if r != 0:
        s.exits[acc] += 1
    if e.level == 0:
        return _deny(s, vaddr, acc, DENY_EMULATED)
    # No flush of the emulator's TLB is needed here: 6.10's TDP fault path flushes only when
    # a table gives way to a huge page at the fault's goal level, which needs the host
    # mapping level to grow (this model never limits it), and its in-fault huge-page split
    # keeps every translation (tdp_mmu_split_huge_page: no flush).  KVM's other flushes
    # come from VM operations, which Attachment.emu_start passes on.
    result.paddr = e.pfn << 12
    result.perms = e.perms
    return True


cdef class TlbFill:
    """The state `tlb_fill` works on for one attachment: the vCPU and the counts.  Keep this
    object (and so the vCPU) alive while the hook is installed."""
    cdef fill_state_t* s
    cdef readonly object vcpu

    def __cinit__(self, vcpu, uint64_t uc_emu_stop, bint guest_paging=False, bint user=True):
        cdef kvm_vcpu_t* v = vcpu_handle(vcpu)      # TypeError for anything but a Vcpu
        if not uc_emu_stop:
            raise ValueError("the address of uc_emu_stop is needed")
        self.s = <fill_state_t*>PyMem_RawCalloc(1, sizeof(fill_state_t))
        if self.s == NULL:
            raise MemoryError()
        self.vcpu = vcpu
        self.s.vcpu = v
        self.s.uc_emu_stop = <sf_uc_emu_stop_fn><void*>uc_emu_stop
        self.s.guest_paging = guest_paging
        self.s.user = user
        self.s.denied_kind = -1

    def __dealloc__(self):
        PyMem_RawFree(self.s)

    @property
    def callback(self):
        """The address of the C callback (uc_cb_tlbevent_t)."""
        return <uint64_t><void*>tlb_fill

    @property
    def user_data(self):
        return <uint64_t><void*>self.s

    def counts(self):
        """fills, exits and denied fills by kind; the exits' results."""
        cdef fill_state_t* s = self.s
        return {"fills": tuple(s.fills), "exits": tuple(s.exits), "denied": tuple(s.denied),
                "fixed": s.counts[RET_PF_FIXED], "spurious": s.counts[RET_PF_SPURIOUS],
                "retry": s.counts[RET_PF_RETRY], "emulate": s.counts[RET_PF_EMULATE],
                "fast": s.counts[COUNT_FAST], "no_exit": s.counts[0]}

    def first_denied(self):
        """(vaddr, kind, reason) of the first fill answered with a fault since
        reset_denied(), or None."""
        if self.s.denied_reason == DENY_NONE:
            return None
        return (self.s.denied_vaddr, self.s.denied_kind, DENY_REASONS[self.s.denied_reason])

    def reset_denied(self):
        self.s.denied_reason = DENY_NONE

    def take_error(self):
        """(-SPTE_E* code, gfn) of the first model error since the last call, or None."""
        if self.s.error == 0:
            return None
        out = (self.s.error, self.s.error_gfn)
        self.s.error = 0
        return out


# -- the emulator's own costs, for comparison ------------------------------------------------

ctypedef struct identity_state_t:
    uint64_t offset                 # paddr = vaddr + offset
    int64_t fills


cdef bint identity_fill(void* uc, uint64_t vaddr, int mem_type, sf_uc_tlb_entry* result,
                        void* user_data) noexcept nogil:
    """A TLB fill that maps every page at `offset` with all permissions: unicorn's own
    default translation through the hook mechanism."""
    cdef identity_state_t* s = <identity_state_t*>user_data
    s.fills += 1
    result.paddr = vaddr + s.offset
    result.perms = UC_PROT_ALL
    return True


cdef void count_code(void* uc, uint64_t address, uint32_t size, void* user_data) noexcept nogil:
    """uc_cb_hookcode_t: one more instruction executed."""
    (<int64_t*>user_data)[0] += 1


cdef class IdentityFill:
    """State for identity_fill (a bench baseline): fills counted, paddr = vaddr + offset."""
    cdef identity_state_t s

    def __cinit__(self, uint64_t offset=0):
        self.s.offset = offset
        self.s.fills = 0

    @property
    def callback(self):
        return <uint64_t><void*>identity_fill

    @property
    def user_data(self):
        return <uint64_t><void*>&self.s

    @property
    def fills(self):
        return self.s.fills


cdef class InstructionCounter:
    """State for count_code: instructions executed while the UC_HOOK_CODE hook is on."""
    cdef int64_t n

    @property
    def callback(self):
        return <uint64_t><void*>count_code

    @property
    def user_data(self):
        return <uint64_t><void*>&self.n

    @property
    def count(self):
        return self.n
