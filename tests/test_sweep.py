"""``spte-fast sweep``: a grid of simulate runs on dask.distributed (issue 13, item 4).

A LocalCluster runs in this process (one worker thread); the command runs in-process too,
pointed at it with ``--scheduler``.  Every row is held against the same point run directly
through ``spte_fast.sim`` -- counts only (single vCPU: they are deterministic), never
rates or times.  One test runs the default path (a LocalCluster of worker processes).
"""
import os

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
pa_csv = pytest.importorskip("pyarrow.csv")
pq = pytest.importorskip("pyarrow.parquet")

from spte_fast import cli, sim                        # noqa: E402
from spte_fast.sim import sweep                       # noqa: E402

GRID = """
[grid]
layout = ["ept", "legacy"]
workload = ["seq", "hotcold"]

[fixed]
faults = "40k"
guest_size = "64M"
zap_every = 10_000
seed = 3
"""
COUNT_PREFIXES = ("results.", "hardware.", "zaps.", "stats.")


@pytest.fixture(scope="module")
def scheduler():
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=":0") as cluster:
        yield cluster.scheduler_address


def _sweep(capsys, grid_text, out, *args, name="grid.toml"):
    grid = os.path.join(os.path.dirname(out), name)
    with open(grid, "w") as f:
        f.write(grid_text)
    rc = cli.main(["sweep", grid, "-o", out, *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _rows(out):
    return {r["point"]: r for r in pq.read_table(os.path.join(out, "results.parquet"))
            .to_pylist()}


def _direct(layout, workload):
    """The same point, run through the library (what the row must say)."""
    res = sim.run(sim.SimConfig(layout=layout, zap_every=10_000, seed=3),
                  sim.workload(workload, 40_000, 64 << 20, 3))
    return sweep.flatten({k: v for k, v in res.to_dict().items() if k != "samples"})


def test_grid_rows_are_the_points_run_directly(capsys, tmp_path, scheduler):
    out = str(tmp_path / "out")
    rc, text, err = _sweep(capsys, GRID, out, "--scheduler", scheduler)
    assert rc == 0, err
    assert "4 points: 4 run, 0 skipped" in text and "0 failed" in text
    rows = _rows(out)
    assert len(rows) == 4
    seen = set()
    for row in rows.values():
        layout, workload = row["point.layout"], row["point.workload"]
        seen.add((layout, workload))
        assert row["point"] == sweep.point_key({"faults": 40_000, "guest_size": 64 << 20,
                                                "zap_every": 10_000, "seed": 3,
                                                "layout": layout, "workload": workload})
        assert (row["config.layout"], row["config.workload"], row["config.faults"],
                row["config.guest_bytes"]) == (layout, workload, 40_000, 64 << 20)
        want = _direct(layout, workload)
        counts = [k for k in want if k.startswith(COUNT_PREFIXES)] + ["accesses", "faults"]
        assert {k: row[k] for k in counts} == {k: want[k] for k in counts}
        assert row["accesses"] == 40_000 and row["zaps.gfn_range"] == 4
        assert row["audit"] == "passed"
    assert seen == {(a, b) for a in ("ept", "legacy") for b in ("seq", "hotcold")}
    # legacy's non-present value is 0, ept's bit 63
    assert {r["config.layout"]: r["config.nonpresent_value"] for r in rows.values()} == \
        {"ept": hex(1 << 63), "legacy": "0x0"}
    # The CSV holds the same table.
    csv = pa_csv.read_csv(os.path.join(out, "results.csv")).to_pylist()
    assert sorted((r["point"], r["stats.pt_pages"], r["results.hits"]) for r in csv) == \
        sorted((r["point"], r["stats.pt_pages"], r["results.hits"]) for r in rows.values())


def test_resume_skips_the_points_already_done(capsys, tmp_path, scheduler):
    out = str(tmp_path / "out")
    assert _sweep(capsys, GRID, out, "--scheduler", scheduler)[0] == 0
    first = _rows(out)
    # Run again: nothing to do.
    rc, text, _ = _sweep(capsys, GRID, out, "--scheduler", scheduler)
    assert rc == 0 and "4 points: 0 run, 4 skipped" in text
    assert _rows(out) == first
    # Grow the grid (and reorder it, and respell a count): only the new points run, the
    # old rows stay as they were (their wall times too: they did not run again).
    grown = GRID.replace('workload = ["seq", "hotcold"]',
                         'workload = ["hotcold", "random", "seq"]').replace('"40k"', "40000")
    rc, text, _ = _sweep(capsys, grown, out, "--scheduler", scheduler)
    assert rc == 0 and "6 points: 2 run, 4 skipped" in text
    rows = _rows(out)
    assert len(rows) == 6 and {k: rows[k] for k in first} == first
    assert sorted(r["point.layout"] for r in rows.values()
                  if r["point.workload"] == "random") == ["ept", "legacy"]


def test_a_failing_point_is_reported_and_the_others_kept(capsys, tmp_path, scheduler):
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    np.array([(5 << 2) | 1, 7 << 2, (9 << 2) | 2], dtype="<u8").tofile(good)
    np.array([5 << 2, (6 << 2) | 3], dtype="<u8").tofile(bad)      # kind 3: invalid
    grid = '[grid]\ntrace = ["good.bin", "bad.bin"]\n'
    out = str(tmp_path / "out")
    rc, text, err = _sweep(capsys, grid, out, "--scheduler", scheduler)
    assert rc == 1
    assert "2 points: 1 run, 0 skipped (already in" in text and "1 failed" in text
    assert "bad.bin" in text and "TraceError" in text
    assert err.startswith("spte-fast: error: 1 of 2 points failed")
    (row,) = _rows(out).values()
    assert row["point.trace"] == str(good) and row["accesses"] == 3
    assert row["stats.pages_4k"] == 3
    # The failed point is not in the table, so the next run retries it (and only it).
    rc, text, _ = _sweep(capsys, grid, out, "--scheduler", scheduler)
    assert rc == 1 and "2 points: 0 run, 1 skipped" in text and "1 failed" in text


BAD_GRIDS = [
    ('[grid]\nlayot = ["ept"]\n', "unknown option 'layot'; the options are workload, trace"),
    ('[grid]\nmax-level = ["4k"]\n', "(spell it 'max_level')"),
    ('[grid]\nlayout = ["ept", "bogus"]\n', "layout: 'bogus' is not one of ept, ept-noad"),
    ('[grid]\nlayout = "ept"\n', "layout must be a non-empty list"),
    ('[grid]\nlayout = []\n', "layout must be a non-empty list"),
    ('[grid]\nlayout = ["ept", "ept"]\n', "lists a value twice"),
    ('[grid]\nroot_level = [4, 6]\n', "root_level: 6 is not one of 4, 5"),
    ('[grid]\nfaults = ["10Q"]\n', "faults: not a count: '10Q'"),
    ('[grid]\nguest_size = ["5000"]\n', "not a multiple of 4 KiB"),
    ('[grid]\nvcpus = [true]\n', "vcpus: not an integer: True"),
    ('[grid]\nlayout = ["ept"]\n[fixed]\nlayout = "npt"\n', "in both [grid] and [fixed]"),
    ('[grid]\nlayout = ["ept"]\n[fixed]\nseed = [1, 2]\n', "[fixed] seed is a list"),
    ('[grid]\nworkload = ["seq"]\n[fixed]\ntrace = "t.bin"\n', "trace"),
    ('[grid]\nlayout = ["ept"]\n[gird]\nseed = 1\n', "unknown table or key 'gird'"),
    ('[fixed]\nseed = 1\n', "no [grid] table"),
    ('[grid\n', "not valid TOML"),
    ('[grid]\nroot_level = [4]\nworkload = ["huge"]\n[fixed]\nguest_size = "512T"\n'
     'faults = 10\n', "does not fit the 4-level address width"),
]


@pytest.mark.parametrize("text, message", BAD_GRIDS)
def test_bad_grids_are_refused_before_anything_runs(capsys, tmp_path, text, message):
    out = tmp_path / "out"
    rc, stdout, err = _sweep(capsys, text, str(out), "--scheduler", "tcp://127.0.0.1:1")
    assert rc == 2 and stdout == ""
    assert err.startswith("spte-fast: error: ") and len(err.splitlines()) == 1
    assert message in err, err
    assert not out.exists()


def test_both_workload_and_trace_is_refused(capsys, tmp_path):
    (tmp_path / "t.bin").write_bytes(np.array([5 << 2], dtype="<u8").tobytes())
    rc, _, err = _sweep(capsys, '[grid]\nworkload = ["seq"]\n[fixed]\ntrace = "t.bin"\n',
                        str(tmp_path / "out"))
    assert rc == 2 and "a workload or a trace, not both" in err


def test_bad_options_are_refused(capsys, tmp_path):
    out = str(tmp_path / "out")
    rc, _, err = _sweep(capsys, GRID, out, "--metric", "stats.nope")
    assert rc == 2 and "--metric stats.nope: not a numeric column" in err
    rc, _, err = _sweep(capsys, GRID, out, "--workers", "0")
    assert rc == 2 and "--workers: must be at least 1" in err
    (tmp_path / "file").write_text("")
    rc, _, err = _sweep(capsys, GRID, str(tmp_path / "file"))
    assert rc == 2 and "is not a directory" in err
    os.makedirs(out)
    with open(os.path.join(out, "results.parquet"), "w") as f:
        f.write("not parquet")
    rc, _, err = _sweep(capsys, GRID, out)
    assert rc == 2 and "not a sweep's results" in err


def test_the_default_is_a_local_cluster_of_processes(capsys, tmp_path):
    grid = '[grid]\nlayout = ["npt"]\n[fixed]\nworkload = "seq"\nfaults = 1000\n' \
           'guest_size = "8M"\n'
    out = str(tmp_path / "out")
    rc, text, err = _sweep(capsys, grid, out, "--workers", "1", "--memory-limit", "1GiB")
    assert rc == 0, err
    assert "1 points: 1 run" in text
    (row,) = _rows(out).values()
    assert (row["config.layout"], row["accesses"], row["stats.pages_4k"]) == ("npt", 1000, 1000)


def test_summary_plot_of_the_chosen_metric(capsys, tmp_path, scheduler):
    pytest.importorskip("matplotlib")
    out = str(tmp_path / "out")
    rc, text, _ = _sweep(capsys, GRID, out, "--scheduler", scheduler, "--metric", "faults")
    assert rc == 0 and f"plot     {os.path.join(out, 'summary.png')} (faults)" in text
    with open(os.path.join(out, "summary.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
