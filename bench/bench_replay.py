"""Headline: replaying a real program's memory trace through the engine.

The trace is bench/data/lackey_trace.bin.xz (valgrind lackey on bench/data/trace_prog.c,
converted by ``spte-fast trace convert``; see bench/data/README.md): 8.5 M records, every
one a fault (read, write or exec by its kind), of which the first touch of each of its
~2.8 K pages is FIXED, and so is its first re-touch (EPT with A/D: a not-present fault
takes the slow path, and make_spte with the writable old SPTE drops D -- 6.10
page_fault_can_be_fast, make_spte), and the rest SPURIOUS -- a real program's locality,
not a synthetic pattern.

Two groups, measured separately because ``spte-fast simulate --trace`` pays both:

* ``fault_batch replay``: the fault path alone.  The trace is decoded once per session,
  outside the timed region; every round starts from an empty VM (zap_all in the pedantic
  setup) and replays the whole trace in 1 Mi-fault chunks.  faults/s in extra_info;
  layouts ept (non-present bit 63, 6.10) and legacy (non-present 0) side by side.
* ``trace read``: the one pass ``simulate --trace`` makes over the file before the
  replay -- xz decompression, validation, the summary that sizes the page pool, and the
  spool of raw records the replay reads back.  records/s in extra_info.
"""
import os
import tempfile

import numpy as np
import pytest

import spte_fast as sf
from spte_fast.sim import trace as tr

from conftest import per_item, replay_in_chunks

TRACE = os.path.join(os.path.dirname(__file__), "data", "lackey_trace.bin.xz")
CHUNK = 1 << 20
LAYOUTS = {"ept": lambda: sf.SpteLayout.ept(),
           "legacy": lambda: sf.SpteLayout.ept(nonpresent_value=0)}


@pytest.fixture(scope="session")
def lackey_trace():
    """(gfns uint64, access uint8, FIXED faults) of the whole recorded trace: one per
    distinct page, plus one per page touched again."""
    recs = np.concatenate(list(tr.iter_records(TRACE, gfn_limit=1 << 36)))
    gfns = recs >> np.uint64(2)
    counts = np.unique(gfns, return_counts=True)[1]
    return gfns, (recs & np.uint64(3)).astype(np.uint8), int(counts.size + (counts >= 2).sum())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_replay_lackey_trace(benchmark, lackey_trace, layout):
    benchmark.group = "fault_batch replay: lackey trace, 8.5 M faults in 1 Mi chunks, decoded"
    gfns, access, fixed = lackey_trace
    vm = sf.Vm(LAYOUTS[layout](), root_level=4, max_level=sf.PG_LEVEL_4K, max_pt_pages=1 << 10)
    vm.add_memslot(0, int(gfns.max()) + 1, pfn=0x100000)
    vcpu = vm.vcpu()
    res = {}

    def empty_vm():
        vm.zap_all()                    # returns a bool: pedantic would take it for args

    benchmark.pedantic(replay_in_chunks, args=(vcpu.fault_batch, gfns, access, CHUNK, res),
                       setup=empty_vm, rounds=5, warmup_rounds=1)
    assert res["fixed"] == fixed
    assert res["fixed"] + res["spurious"] == gfns.size
    vm.audit()
    per_item(benchmark, gfns.size)


def test_read_lackey_trace_one_pass(benchmark, lackey_trace):
    benchmark.group = "trace read: lackey trace .xz, one pass (decode, validate, summarise, spool)"
    gfns = lackey_trace[0]
    info = {}

    def read():
        with tempfile.TemporaryFile() as spool:
            info["summary"] = tr.scan_trace(TRACE, 1 << 36, levels=3, spool=spool)
            info["spooled"] = spool.tell()

    benchmark.pedantic(read, rounds=3, warmup_rounds=1)
    assert info["summary"].records == gfns.size and info["spooled"] == gfns.size * 8
    assert info["summary"].max_page == int(gfns.max())
    per_item(benchmark, gfns.size, unit="records")
