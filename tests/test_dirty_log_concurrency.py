"""Issue 11 item 4: dirty logging under concurrency -- the property live migration depends on.

vCPU threads write guest pages (``access_batch``, GIL released) while another thread
harvests the dirty log (``get_dirty_log``, and with manual protect ``clear_dirty_log`` of
what it got).  Linux 6.10's guarantee (kvm_main.c ``kvm_get_dirty_log_protect`` /
``kvm_clear_dirty_log_protect``: the bits are taken atomically and the pages re-protected
before the flush; the write that follows faults again -- fast page fault or PML -- and marks
the page again): every write that completed before a harvest began is in that harvest or an
earlier one, so the union of all harvests holds every write.  Reads of pages mapped before
logging began never dirty them.  The engine only: the reference model is single-threaded.
Bounded: about a quarter of a second of writing per case.
"""
import threading
import time

import numpy as np
import pytest

import spte_fast as sf
from support.layouts import make_layout

SLOT_PAGES = 4096
READ_BASE = 3072            # pages [READ_BASE, SLOT_PAGES) are only ever read
BATCH = 256
WRITE_SECONDS = 0.25


def bitmap_pages(words):
    """The page numbers set in a bitmap of uint64 words."""
    bits = np.unpackbits(np.asarray(words, dtype="<u8").view(np.uint8), bitorder="little")
    return np.flatnonzero(bits)


def missing_writes(completed, union):
    """The written pages whose bit is in no harvest ([] when none is missing)."""
    if not completed:
        return []
    written = np.unique(np.concatenate(completed))
    return written[~np.isin(written, union)].tolist()


class Migration:
    """A VM with one slot, every page mapped before dirty logging is enabled."""

    def __init__(self, kind, pml, manual, writers=2):
        self.vm = sf.Vm(make_layout(sf, kind), max_level=1, max_pt_pages=512, pml=pml,
                        manual_dirty_log_protect=manual)
        self.manual = manual
        self.slot = self.vm.add_memslot(0, SLOT_PAGES, 0x100000)
        self.vcpus = [self.vm.vcpu() for _ in range(writers)]
        all_pages = np.arange(SLOT_PAGES, dtype=np.uint64)
        self.vcpus[0].access_batch(all_pages, np.ones(SLOT_PAGES, dtype=np.uint8))
        self.vm.set_memslot_flags(self.slot, dirty_log=True)
        self.lock = threading.Lock()
        self.completed = []                 # page arrays whose access_batch returned
        self.union = np.zeros(0, dtype=np.int64)
        self.late = []                      # writes missing from a harvest that began after them
        self.errors = []

    def harvest(self, drop=False):
        with self.lock:
            done_before = len(self.completed)
        words = self.vm.get_dirty_log(self.slot)
        if self.manual:
            self.vm.clear_dirty_log(self.slot, 0, SLOT_PAGES, words)
        if not drop:
            self.union = np.union1d(self.union, bitmap_pages(words))
        with self.lock:
            before = self.completed[:done_before]
        lost = missing_writes(before, self.union)
        if lost:
            self.late.append(lost[:8])

    def writer(self, vcpu, seed, deadline):
        rng = np.random.default_rng(seed)
        try:
            while time.monotonic() < deadline:
                pages = rng.integers(0, READ_BASE, BATCH, dtype=np.uint64)
                reads = rng.integers(READ_BASE, SLOT_PAGES, BATCH // 4, dtype=np.uint64)
                vcpu.access_batch(pages, np.ones(BATCH, dtype=np.uint8))
                vcpu.access_batch(reads)
                with self.lock:
                    self.completed.append(pages)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(e)

    def run(self):
        deadline = time.monotonic() + WRITE_SECONDS
        threads = [threading.Thread(target=self.writer, args=(v, i, deadline))
                   for i, v in enumerate(self.vcpus)]
        for t in threads:
            t.start()
        harvests = 0
        while any(t.is_alive() for t in threads):
            self.harvest()
            harvests += 1
        for t in threads:
            t.join()
        self.harvest()                      # after the last write: drains every PML log
        return harvests


CASES = [("ept_ad", True), ("ept_ad", False), ("ept_noad", None), ("npt", None)]


@pytest.mark.parametrize("manual", [False, True], ids=["get", "get+clear"])
@pytest.mark.parametrize("kind, pml", CASES, ids=["ept-pml", "ept-ad-wrprot", "ept-noad", "npt"])
def test_no_write_is_ever_missing_from_the_harvests(kind, pml, manual):
    m = Migration(kind, pml, manual)
    harvests = m.run()
    assert not m.errors, m.errors
    assert harvests >= 2 and len(m.completed) >= 4      # the two really overlapped
    assert m.late == []                 # each harvest held the writes completed before it
    assert missing_writes(m.completed, m.union) == []
    assert not np.any(m.union >= READ_BASE)             # reads never dirty a mapped page
    st = m.vm.stats
    # The writes went through the path the layout logs by: PML, or the fast page fault.
    assert (st["pml_logged"] if m.vm.pml else st["faults_fast"]) > harvests
    # Nothing leaked or left inconsistent.
    m.vm.audit()
    assert st["pages_4k"] == SLOT_PAGES
    assert st["tables_allocated"] - st["tables_freed"] == st["pt_pages"]
    m.vm.delete_memslot(m.slot)
    assert m.vm.stats["pages_4k"] == 0
    m.vm.audit()


def test_the_checker_reports_a_harvest_that_was_dropped():
    """Negative control: a harvest whose bitmap is thrown away loses its writes, and the
    checks above see it -- the property test cannot pass vacuously."""
    m = Migration("ept_ad", True, manual=False, writers=1)
    pages = np.array([5, 6, 700], dtype=np.uint64)
    m.vcpus[0].access_batch(pages, np.ones(3, dtype=np.uint8))
    m.completed.append(pages)
    m.harvest(drop=True)
    assert m.late == [[5, 6, 700]]
    m.harvest()                         # the log was taken: nothing comes back
    assert missing_writes(m.completed, m.union) == [5, 6, 700]
