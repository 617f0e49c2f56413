"""Guest memory as the VMM sees it: ``kvm_read_guest`` / ``kvm_write_guest``
(``virt/kvm/kvm_main.c``) through the memslots onto host pages.

A memslot maps gfn onto host pfn ``slot.pfn + gfn - slot.base_gfn``; the words live with
the host page (``kvm.host_memory``: pfn -> 512 words, made on the first write), so a moved
slot keeps its contents and the pages of a deleted slot come back when a slot maps them
again.  Never-written pages read 0.  These are the VMM's own accesses: no SPTE, no exit,
no dirty log sees them.
"""
from .memslots import gfn_to_memslot

WORDS_PER_PAGE = 512


def guest_words(kvm, gpa, n):
    """[(host pfn, word index)] of the n words from gpa; ValueError for a gpa that is not
    8-byte aligned, beyond the address width, or in no memslot (-EFAULT)."""
    if gpa % 8:
        raise ValueError(f"gpa {gpa:#x} is not 8-byte aligned (guest memory is read and "
                         "written in 64-bit words)")
    if gpa // 8 + n > kvm.gfn_limit * WORDS_PER_PAGE:
        raise ValueError(f"gpa {gpa:#x} + {n} words is beyond the guest's "
                         f"{kvm.root_level}-level address width")
    out = []
    pfn_of = {}
    for w in range(gpa // 8, gpa // 8 + n):
        gfn = w // WORDS_PER_PAGE
        if gfn not in pfn_of:
            slot = gfn_to_memslot(kvm, gfn)
            if slot is None:
                raise ValueError(f"gpa {gfn << 12:#x} is in no memslot: the VMM has no host "
                                 "memory there")
            pfn_of[gfn] = slot.gfn_to_pfn(gfn)
        out.append((pfn_of[gfn], w % WORDS_PER_PAGE))
    return out


def kvm_read_guest(kvm, gpa, n):
    words = guest_words(kvm, gpa, n)
    return [kvm.host_memory[pfn][i] if pfn in kvm.host_memory else 0 for pfn, i in words]


def kvm_write_guest(kvm, gpa, values):
    words = guest_words(kvm, gpa, len(values))          # every word checked first
    for (pfn, i), v in zip(words, values):
        page = kvm.host_memory.setdefault(pfn, [0] * WORDS_PER_PAGE)
        page[i] = v
