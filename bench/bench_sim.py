"""The simulator end to end: ``spte-fast simulate``'s default run beside its batches alone.

Group ``sim`` (ratios in one run, ``python bench/ratios.py RESULT.json``):

* ``test_sim_default_run``: ``engine.run(SimConfig(), workload("random", 10 M))``, what the
  command runs before its report.  The figure is the run's own loop wall (``elapsed_s``:
  the workload's generation on the producer thread, the working-set pass, the batches,
  the 200 samples), which is issue 10's target (>= 60 M accesses/s end to end); the whole
  call (a new Vm, the audit) is ``run_s`` in extra_info.
* ``test_sim_batches_only``: the same 10 M accesses, generated before the round, through
  one Vcpu's ``access_batch`` in the run's 50 K-access segments, a new Vm per round: what
  the run would cost with nothing around its batches.  The ratio between the two is what
  the simulator adds.
"""
import statistics

import numpy as np
import pytest

import spte_fast as sf
from spte_fast.sim import engine, workloads

ACCESSES = 10_000_000
SEGMENT = ACCESSES // engine.SAMPLES        # the default run's stats interval
GROUP = "sim: the default simulate run, 10 M random accesses over 4 GiB (ns/access)"


def test_sim_default_run(benchmark):
    benchmark.group = GROUP
    loops, results = [], []

    def run():
        r = engine.run(engine.SimConfig(), workloads.workload("random", ACCESSES))
        loops.append(r.elapsed_s)
        results.append(r.results)

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert all(r["hits"] + r["fixed"] == ACCESSES for r in results)
    loop = statistics.median(loops)
    benchmark.extra_info["accesses_per_s"] = ACCESSES / loop
    benchmark.extra_info["ns_per_item"] = loop / ACCESSES * 1e9
    benchmark.extra_info["run_s"] = benchmark.stats.stats.median


@pytest.fixture(scope="module")
def default_accesses():
    """The default run's accesses: its workload's chunks, concatenated."""
    src = workloads.workload("random", ACCESSES)
    return np.concatenate([g for g, _ in src.chunks(engine.DEFAULT_CHUNK)]), src


def test_sim_batches_only(benchmark, default_accesses):
    benchmark.group = GROUP
    gfns, src = default_accesses
    state = {}

    def setup():
        vm = sf.Vm(sf.SpteLayout.ept(), root_level=4, max_level=sf.PG_LEVEL_4K,
                   max_pt_pages=workloads.pool_pages(src, 4, 1))
        for s in src.slots:
            vm.add_memslot(s.base_gfn, s.npages, s.pfn)
        state["vcpu"] = vm.vcpu()

    def run():
        batch = state["vcpu"].access_batch
        hits = 0
        for a in range(0, ACCESSES, SEGMENT):
            hits += batch(gfns[a:a + SEGMENT])["hits"]
        state["hits"] = hits

    benchmark.pedantic(run, setup=setup, rounds=5, warmup_rounds=1)
    assert state["hits"] == ACCESSES - np.unique(gfns).size
    med = benchmark.stats.stats.median
    benchmark.extra_info["accesses_per_s"] = ACCESSES / med
    benchmark.extra_info["ns_per_item"] = med / ACCESSES * 1e9
