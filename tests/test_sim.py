"""The simulator as a library (spte_fast.sim): engine runs, results, the one-pass trace read.

Everything here runs in process through ``sim.run`` -- no command line -- except the
import check, which needs a fresh interpreter.  Expected counts are worked out by hand
from what a workload does, or from numpy on the records (``np.unique``), never from the
code under test.
"""
import builtins
import dataclasses
import json
import lzma
import os
import subprocess
import sys

import numpy as np
import pytest

import spte_fast as sf
from spte_fast import sim
from spte_fast.sim import trace as tr
from spte_fast.sim.engine import SimConfig

from support.cli import ROOT
from support.spec import ad_fault_counts

PAGES_16M = 4096


def _records(pages, kinds):
    return (np.asarray(pages, dtype=np.uint64) << np.uint64(2)) | np.asarray(kinds, np.uint64)


def _write_trace(path, recs):
    data = np.asarray(recs, dtype="<u8").tobytes()
    if str(path).endswith(".xz"):
        data = lzma.compress(data)
    path.write_bytes(data)
    return path


# -- runs of a built-in workload -----------------------------------------------------------

@pytest.mark.parametrize("faults", [1000, PAGES_16M, 10_000])
def test_seq_run_counts_are_first_touches(faults):
    # seq over G pages: access i is gfn i % G.  The first min(N, G) are first touches: the
    # CPU's walk meets a non-present entry (EPT violation), kvm_mmu_page_fault installs a
    # 4K leaf (FIXED) and the re-executed access walks again and hits.  Every later access
    # hits: make_spte already set A and D (a writable slot), so the CPU sets nothing.
    res = sim.run(SimConfig(chunk=700), sim.workload("seq", faults, 16 << 20))
    touched = min(faults, PAGES_16M)
    assert res.accesses == faults and res.faults == touched
    assert res.results == {"hits": faults - touched, "fixed": touched, "spurious": 0,
                           "emulate": 0, "retry": 0, "fast": 0}
    assert res.hardware == {"hw_walks": faults + touched, "hw_ad_sets": 0,
                            "exits_ept_violation": touched, "exits_misconfig": 0}
    assert res.stats["pages_4k"] == touched
    fixed = touched
    assert res.stats["pages_2m"] == res.stats["pages_1g"] == 0
    # gfns 0 .. fixed-1: one L1 table per 512 of them, one L2 (16 MiB < 1 GiB), L3, root.
    assert (res.stats["pt_pages_l1"], res.stats["pt_pages_l2"], res.stats["pt_pages_l3"],
            res.stats["pt_pages_l4"]) == (-(-fixed // 512), 1, 1, 1)
    assert res.audit == "passed"
    assert res.config.max_level == sf.PG_LEVEL_4K          # the workload's default, resolved


@pytest.mark.parametrize("faults", [1000, 10_000])
def test_fault_mode_delivers_every_record_as_a_not_present_fault(faults):
    # mode="fault": each record is a fault (Vcpu.fault_batch).  With EPT A/D a re-touch of
    # a mapped page takes the slow path (6.10 page_fault_can_be_fast refuses not-present
    # faults when A/D bits are in use) and make_spte drops D: the first re-touch of each
    # page is FIXED too, the rest SPURIOUS.
    res = sim.run(SimConfig(chunk=700, mode="fault"), sim.workload("seq", faults, 16 << 20))
    fixed, spurious = ad_fault_counts(np.arange(faults) % PAGES_16M)
    assert res.accesses == res.faults == faults
    assert res.results == {"fixed": fixed, "spurious": spurious, "emulate": 0, "retry": 0,
                           "fast": 0}
    assert res.hardware["hw_walks"] == 0
    assert "M faults/s in the fault path" in sim.report.summary(res)


def test_samples_follow_the_run():
    res = sim.run(SimConfig(chunk=3000, zap_every=2500, stats_interval=3000),
                  sim.workload("random", 20_000, 64 << 20, seed=3))
    accesses = [s.accesses for s in res.samples]
    assert accesses == [3000, 6000, 9000, 12000, 15000, 18000, 20000]   # and the end
    assert accesses[-1] == res.accesses == 20_000
    faults = [s.faults for s in res.samples]
    assert all(a <= b for a, b in zip(faults, faults[1:]))
    assert faults[-1] == res.faults == res.hardware["exits_ept_violation"]
    seconds = [s.seconds for s in res.samples]
    assert seconds == sorted(seconds)
    assert all(len(s.pt_pages) == 4 for s in res.samples)
    last = res.samples[-1]
    assert list(last.pt_pages) == [res.stats[f"pt_pages_l{lvl}"] for lvl in range(1, 5)]
    assert last.pt_bytes == 4096 * res.stats["pt_pages"]
    assert last.leaves == (res.stats["pages_4k"], 0, 0)
    assert last.results == res.results
    assert res.zaps["gfn_range"] == 20_000 // 2500


def test_samples_default_to_about_two_hundred_and_count_the_working_set():
    # seq over 16 MiB (4096 pages), 10 000 accesses: the working set grows by one page per
    # access up to 4096, then stays; with no zap every touched page stays mapped.
    res = sim.run(SimConfig(chunk=999), sim.workload("seq", 10_000, 16 << 20))
    assert res.stats_interval == 50 and len(res.samples) == 200
    assert [s.accesses for s in res.samples] == list(range(50, 10_001, 50))
    assert [s.working_set for s in res.samples] == [min(n, PAGES_16M) for n in
                                                    range(50, 10_001, 50)]
    assert all(s.leaves[0] == s.working_set for s in res.samples)
    assert res.to_dict()["config"]["stats_interval"] == 50
    doc = res.samples[-1].to_dict()
    assert doc["leaves"] == {"4k": 4096, "2m": 0, "1g": 0} and doc["working_set"] == 4096


def test_trace_zaps_hit_the_regions_the_trace_touched(tmp_path):
    # A trace over two 2M regions far apart in a 4 GiB guest (8192 pages past page 0
    # would be unlikely to be picked at random): every zap that finds leaves flushes, so
    # with zaps among touched regions every zap but one (a region zapped twice in a row
    # between its accesses) flushes; over the whole guest almost none would.
    pages = np.concatenate([np.arange(0, 512), np.arange(1 << 19, (1 << 19) + 512)] * 20)
    path = _write_trace(tmp_path / "t.bin", _records(pages, np.zeros(pages.size)))
    with sim.trace_source(path, guest_bytes=4 << 30) as src:
        res = sim.run(SimConfig(zap_every=1000, seed=4), src)
    assert res.zaps["gfn_range"] == pages.size // 1000
    assert res.zaps["gfn_range_flushed"] >= res.zaps["gfn_range"] - 2
    assert res.stats["tlb_flushes_ranged"] == res.zaps["gfn_range_flushed"]


def test_every_record_read_is_replayed(tmp_path):
    recs = _records(np.arange(3000) % 700, np.arange(3000) % 3)
    path = _write_trace(tmp_path / "t.bin.xz", recs)
    with sim.trace_source(path) as src:
        res = sim.run(SimConfig(chunk=256), src)
        assert res.accesses == 3000 == res.to_dict()["config"]["trace_records"]
        # the replay refuses to end with fewer records than the source promised
        short = dataclasses.replace(src, faults=3001)
        with pytest.raises(sim.RunError, match="replayed 3,000 records where the source "
                                               "had 3,001"):
            sim.run(SimConfig(), short)


def test_to_dict_is_the_json_document_and_round_trips():
    res = sim.run(SimConfig(chunk=5000, root_level=5, layout="legacy", vcpus=2),
                  sim.workload("mixed", 12_000, 16 << 20, seed=1))
    doc = res.to_dict()
    assert json.loads(json.dumps(doc)) == doc
    assert json.loads(sim.report.to_json(res, plot="x.png")) == {**doc, "plot": "x.png"}
    assert set(doc) == {"config", "accesses", "faults", "hardware", "results", "elapsed_s",
                        "fault_s", "zap_s", "accesses_per_s", "overall_accesses_per_s",
                        "faults_per_s", "overall_faults_per_s", "zaps", "stats", "audit",
                        "samples"}
    assert doc["config"]["mode"] == "access"
    assert doc["hardware"] == {k: doc["stats"][k] for k in
                               ("hw_walks", "hw_ad_sets", "exits_ept_violation",
                                "exits_misconfig")}
    c = doc["config"]
    assert (c["source"], c["workload"], c["layout"], c["nonpresent_value"], c["root_level"],
            c["max_level"], c["vcpus"], c["chunk"]) == \
        ("workload", "mixed", "legacy", "0x0", 5, "4k", 2, 5000)
    assert [s["readonly"] for s in c["memslots"]] == [False, True]
    assert [s["accesses"] for s in doc["samples"]] == list(range(60, 12_001, 60))
    assert len(doc["samples"][0]["pt_pages"]) == 5
    assert doc["stats"] == res.stats and doc["stats"]["pt_pages_l5"] == 1


def test_summary_reports_the_result():
    res = sim.run(SimConfig(), sim.workload("seq", 5000, 16 << 20))
    text = sim.report.summary(res)
    assert text.startswith("spte-fast simulate: seq workload, 5,000 accesses, 16.0 MiB guest")
    # 4096 first touches exit and are FIXED, the 904 re-touches hit
    assert "hardware hits 904" in text and "EPT violation / #NPF 4,096" in text
    assert "fixed 4,096   fast 0   spurious 0" in text and "audit        passed" in text


@pytest.mark.parametrize("kwargs, message", [
    ({"layout": "ept2"}, "unknown layout"), ({"root_level": 3}, "root_level"),
    ({"max_level": 4}, "max_level"), ({"vcpus": 0}, "vcpus"), ({"vcpus": 257}, "vcpus"),
    ({"zap_every": 0}, "zap_every"), ({"chunk": 1.5}, "chunk"), ({"seed": -1}, "seed"),
    ({"mode": "hw"}, "unknown mode"),
])
def test_bad_configuration_is_an_input_error(kwargs, message):
    with pytest.raises(sim.InputError, match=message):
        SimConfig(**kwargs)


def test_guest_beyond_the_address_width_is_an_input_error():
    with pytest.raises(sim.InputError, match="does not fit the 4-level address width"):
        sim.run(SimConfig(), sim.workload("random", 10, 512 << 40))


def test_memslots_the_engine_refuses_are_an_input_error(tmp_path):
    # Page 1 << 44 is inside 5 levels, but past kvm_mmu_max_gfn() of the default 46-bit
    # host, and so is its host pfn (6.10 kvm_arch_prepare_memory_region: -EINVAL).
    path = _write_trace(tmp_path / "far.bin", _records([1, 1 << 44], [0, 0]))
    with sim.trace_source(path, root_level=5) as src, \
            pytest.raises(sim.InputError, match="MAXPHYADDR"):
        sim.run(SimConfig(root_level=5), src)


# -- the one-pass trace read ---------------------------------------------------------------

@pytest.fixture
def count_opens(monkeypatch):
    """Counts, per path, every Python-level open (plain, gzip and lzma open through it)."""
    opened = {}
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            key = os.path.abspath(os.fspath(file))
            opened[key] = opened.get(key, 0) + 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return lambda path: opened.get(os.path.abspath(os.fspath(path)), 0)


def test_trace_run_opens_and_decompresses_its_input_once(tmp_path, count_opens):
    rng = np.random.default_rng(11)
    pages = rng.integers(0, 1 << 14, 5000)
    kinds = rng.integers(0, 3, 5000)
    path = _write_trace(tmp_path / "t.bin.xz", _records(pages, kinds))
    with sim.trace_source(path) as src:
        assert count_opens(path) == 1
        os.remove(path)                 # the replay must not need the file any more
        res = sim.run(SimConfig(chunk=999, stats_interval=999), src)
    assert count_opens(path) == 1
    distinct = np.unique(pages).size
    # Each page's first access exits and is FIXED; every other access hits (a fetch of a
    # page first read finds X set: ACC_ALL at 4K).
    assert res.results == {"hits": 5000 - distinct, "fixed": distinct, "spurious": 0,
                           "emulate": 0, "retry": 0, "fast": 0}
    assert res.stats["pages_4k"] == distinct
    assert [s.accesses for s in res.samples][-1] == 5000 and len(res.samples) == 6
    c = res.to_dict()["config"]
    assert c["trace_records"] == 5000
    assert c["trace_kinds"] == {k: int(np.sum(kinds == i))
                                for i, k in enumerate(("read", "write", "exec"))}
    assert c["memslots"][0]["npages"] == (int(pages.max()) // 512 + 1) * 512


def test_trace_prefix_replays_but_the_whole_file_is_validated(tmp_path):
    recs = _records([7, 8, 9, 7, 10], [0, 1, 2, 0, 1])
    path = _write_trace(tmp_path / "t.bin", recs)
    with sim.trace_source(path, faults=4) as src:
        res = sim.run(SimConfig(chunk=2), src)
        # 7, 8, 9 first touches (exits, FIXED), then 7 again: a hit
        assert res.results["fixed"] == 3 and res.results["hits"] == 1
        assert res.accesses == 4
        assert res.to_dict()["config"]["trace_records"] == 5          # the whole file
    bad = _write_trace(tmp_path / "bad.bin", np.append(recs, 11 << 2 | 3))
    with pytest.raises(sim.TraceError, match="record 5: unknown kind 3"):
        sim.trace_source(bad, faults=1)


def test_closing_a_trace_source_drops_its_spool(tmp_path):
    src = sim.trace_source(_write_trace(tmp_path / "t.bin", _records([1, 2], [0, 0])))
    assert sum(g.size for g, _ in src.chunks(1)) == 2
    assert sum(g.size for g, _ in src.chunks(1)) == 2       # replayable until closed
    src.close()
    with pytest.raises(ValueError, match="closed file"):
        next(src.chunks(1))


def test_scan_trace_spools_the_requested_prefix(tmp_path):
    recs = _records(np.arange(100) * 1000, np.arange(100) % 3)
    path = _write_trace(tmp_path / "t.bin", recs)
    for limit, want in ((None, 100), (0, 0), (37, 37), (500, 100)):
        spool = tmp_path / f"spool{limit}"
        with open(spool, "w+b") as f:
            info = tr.scan_trace(path, 1 << 36, levels=3, chunk=16, spool=f,
                                 spool_limit=limit)
            back = [c for c in tr.read_spool(f, chunk=10)]
        assert info.records == 100
        got = np.concatenate(back).tolist() if back else []
        assert got == recs[:want].tolist()
        assert all(c.size == 10 for c in back[:-1])


@pytest.mark.parametrize("gfn_limit", [1 << 36, 1 << 45], ids=["bitmap", "sorted-runs"])
def test_region_counts_equal_a_numpy_unique_oracle(tmp_path, seed, gfn_limit):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 20_000))
    # Clusters (shared 2M regions), uniform pages, and the edges of the address space.
    pages = np.concatenate([
        rng.integers(0, 1 << 12, n // 3),
        rng.integers(0, gfn_limit, n // 3),
        int(rng.integers(0, gfn_limit - 4096)) + rng.integers(0, 4096, n - 2 * (n // 3)),
        [0, 511, 512, (1 << 18) - 1, 1 << 18, gfn_limit - 1]]).astype(np.uint64)
    rng.shuffle(pages)
    levels = 4 if gfn_limit > 1 << 36 else 3
    path = _write_trace(tmp_path / "r.bin", _records(pages, rng.integers(0, 3, pages.size)))
    for chunk in (1, 7, 1000, 1 << 20):        # many chunks: every merge rank is exercised
        if chunk == 1 and pages.size > 2000:
            continue
        info = tr.scan_trace(path, gfn_limit, levels=levels, chunk=chunk)
        oracle = tuple(int(np.unique(pages >> np.uint64(9 * (lvl + 1))).size)
                       for lvl in range(levels))
        assert info.regions == oracle, chunk
        assert info.max_page == int(pages.max()) and info.records == pages.size


@pytest.mark.parametrize("gfn_limit", [1 << 36, 1 << 45], ids=["bitmap", "sorted-runs"])
def test_region_counter_distinct_is_sorted_and_exact(gfn_limit):
    rng = np.random.default_rng(5)
    counter = tr.RegionCounter(gfn_limit)
    seen = []
    hot = rng.integers(0, gfn_limit, 50, dtype=np.uint64)     # regions seen in every chunk
    for _ in range(40):
        pages = np.concatenate([rng.integers(0, gfn_limit, int(rng.integers(0, 300)),
                                             dtype=np.uint64), rng.permutation(hot)])
        counter.add(pages)
        seen.append(pages)
    want = np.unique(np.concatenate(seen) >> np.uint64(9))
    assert counter.distinct().tolist() == want.tolist()
    assert tr.RegionCounter(gfn_limit).counts(3) == (0, 0, 0)


def test_empty_trace_is_a_trace_error(tmp_path):
    with pytest.raises(sim.TraceError, match="empty trace"):
        sim.trace_source(_write_trace(tmp_path / "e.bin", []))


# -- the package boundary ------------------------------------------------------------------

def test_sim_does_not_import_the_command_line():
    code = ("import sys, spte_fast.sim, spte_fast.sim.demo; "
            "print(sorted(m for m in ('argparse', 'spte_fast.cli', 'tqdm', 'matplotlib') "
            "if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def test_result_is_a_dataclass_of_the_run():
    res = sim.run(SimConfig(), sim.workload("seq", 10, 16 << 20))
    fields = {f.name for f in dataclasses.fields(res)}
    assert {"config", "results", "faults_per_s", "elapsed_s", "zaps", "stats", "audit",
            "samples"} <= fields
    assert isinstance(res.config, SimConfig) and isinstance(res.samples[0], sim.Sample)
