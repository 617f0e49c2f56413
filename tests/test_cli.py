"""The ``spte-fast`` command: every simulate path and error case, run as a subprocess.

Small --faults keep the file fast; one run is the real default (10 M accesses).  Values are
checked against what each option means (counts, stats, configuration), never timings.
A simulation runs each record as an access of the CPU (the hardware view, issue 10): a hit,
or an exit that kvm_mmu_page_fault handles; ``--mode fault`` delivers each as a fault.
"""
import csv
import json
import lzma
import os
import subprocess
import sys

import numpy as np
import pytest

import spte_fast as sf
from spte_fast.sim import report as sim_report

from support.cli import ROOT, run_cli

STATS_KEYS = {"faults_fixed", "faults_spurious", "faults_retry", "faults_emulate", "pages_4k",
              "pages_2m", "pages_1g", "pt_pages", "pt_pages_l1", "pt_pages_l4",
              "tables_allocated", "tables_freed", "cache_fills", "cache_zero_inits",
              "init_bytes_written", "tlb_flushes", "tlb_flushes_ranged", "cas_failures",
              "warnings", "mmio_sptes_created"}


def simulate(*args):
    r = run_cli("simulate", "--json", *args)
    assert r.rc == 0, r.err
    assert r.err == ""                  # no progress bar or chatter when stderr is a pipe
    doc = r.json()
    res = doc["results"]
    assert res["fixed"] + res["spurious"] + res["emulate"] + res["retry"] == doc["faults"]
    assert doc["audit"] == "passed"
    assert STATS_KEYS <= set(doc["stats"])
    st, hw = doc["stats"], doc["hardware"]
    # Every access either hits or exits at least once (re-executed after FIXED, SPURIOUS
    # and RETRY); each exit is one kvm_mmu_page_fault result.
    if doc["config"]["mode"] == "access":
        assert res["hits"] + doc["faults"] >= doc["accesses"] >= res["hits"]
        assert hw["exits_ept_violation"] + hw["exits_misconfig"] == doc["faults"]
    # pf_* count kvm_mmu_do_page_fault's results; an emulated access to a current MMIO SPTE
    # returns from handle_mmio_page_fault before it (mmu.c kvm_mmu_page_fault).
    assert (st["faults_fixed"], st["faults_spurious"], st["faults_retry"]) == \
        (res["fixed"], res["spurious"], res["retry"])
    assert st["faults_emulate"] <= res["emulate"]
    return doc


def test_default_run_is_ten_million_random_accesses():
    doc = simulate()
    c = doc["config"]
    assert doc["accesses"] == c["faults"] == 10_000_000 and c["mode"] == "access"
    assert (c["workload"], c["layout"], c["root_level"], c["max_level"], c["vcpus"]) == \
        ("random", "ept", 4, "4k", 1)
    assert c["guest_bytes"] == 4 << 30
    assert doc["faults_per_s"] > 0 and doc["elapsed_s"] > 0
    # 4 GiB at 4K: 2048 L1 tables, 4 L2, 1 L3, the root; ~1 M pages touched.
    st = doc["stats"]
    assert (st["pt_pages_l1"], st["pt_pages_l2"], st["pt_pages_l3"], st["pt_pages_l4"]) == \
        (2048, 4, 1, 1)
    # Each page's first access exits (EPT violation) and is FIXED; every later one hits
    # (make_spte set A and D already, so the CPU sets nothing).
    touched, res = st["pages_4k"], doc["results"]
    assert touched > 1_000_000
    assert res["fixed"] == doc["faults"] == touched
    assert res["hits"] == 10_000_000 - touched
    assert doc["hardware"]["hw_ad_sets"] == 0
    assert doc["hardware"]["hw_walks"] == 10_000_000 + touched


@pytest.mark.parametrize("workload", ["seq", "random", "zipf", "hotcold", "huge", "mixed"])
def test_every_workload(workload):
    doc = simulate("--workload", workload, "--faults", 20_000, "--seed", 1)
    assert doc["accesses"] == 20_000
    assert doc["config"]["workload"] == workload
    st = doc["stats"]
    if workload == "huge":
        # 64 GiB: 1G leaves in the lower half, 2M leaves in the 2M-only upper half.
        assert doc["config"]["max_level"] == "1g" and doc["config"]["guest_bytes"] == 64 << 30
        assert st["pages_1g"] > 0 and st["pages_2m"] > 0 and st["pages_4k"] == 0
        assert len(doc["config"]["memslots"]) == 2
    else:
        assert st["pages_2m"] == st["pages_1g"] == 0
    if workload == "mixed":
        assert doc["results"]["emulate"] > 0 and st["mmio_sptes_created"] > 0
        assert [s["readonly"] for s in doc["config"]["memslots"]] == [False, True]
    else:
        assert doc["results"]["emulate"] == 0


def test_seq_touches_each_page_once_then_retouches():
    doc = simulate("--workload", "seq", "--guest-size", "16M", "--faults", 10_000)
    # 16 MiB = 4096 pages: 4096 first touches exit and are FIXED, then every access hits
    assert doc["results"]["fixed"] == 4096 and doc["results"]["hits"] == 10_000 - 4096
    assert doc["results"]["spurious"] == 0
    assert doc["stats"]["pages_4k"] == 4096


def test_fault_mode_delivers_each_record_as_a_fault():
    doc = simulate("--workload", "seq", "--guest-size", "16M", "--faults", 10_000,
                   "--mode", "fault")
    # 4096 first touches, then 4096 first re-touches that drop D (EPT A/D: the slow path,
    # make_spte with a writable old SPTE), then spurious re-touches
    assert doc["config"]["mode"] == "fault" and doc["faults"] == 10_000
    assert doc["results"]["fixed"] == 2 * 4096
    assert doc["results"]["spurious"] == 10_000 - 2 * 4096
    assert doc["hardware"]["hw_walks"] == 0


def test_skewed_workloads_touch_fewer_pages_than_uniform():
    args = ("--guest-size", "64M", "--faults", 50_000)
    fixed = {w: simulate("--workload", w, *args)["results"]["fixed"]
             for w in ("random", "zipf", "hotcold")}
    assert fixed["zipf"] < fixed["random"] and fixed["hotcold"] < fixed["random"]


@pytest.mark.parametrize("layout, nonpresent, fills", [
    ("ept", "0x8000000000000000", True), ("tdx", "0x8000000000000000", True),
    ("ept-noad", "0x8000000000000000", True), ("npt", "0x8000000000000000", True),
    ("legacy", "0x0", False)])
def test_layouts(layout, nonpresent, fills):
    doc = simulate("--layout", layout, "--faults", 5000)
    assert doc["config"]["layout"] == layout
    assert doc["config"]["nonpresent_value"] == nonpresent
    # Non-zero non-present value: tables are memset64-filled; 0: the GFP_ZERO path.
    assert (doc["stats"]["cache_fills"] > 0) is fills
    if not fills:
        assert doc["stats"]["cache_fills"] == 0


def test_root_level_5():
    doc = simulate("--root-level", 5, "--faults", 5000)
    assert doc["stats"]["pt_pages_l5"] == 1 and doc["stats"]["pt_pages_l4"] == 1


@pytest.mark.parametrize("level, leaves", [("4k", "pages_4k"), ("2m", "pages_2m"),
                                           ("1g", "pages_1g")])
def test_max_level(level, leaves):
    doc = simulate("--max-level", level, "--faults", 5000, "--guest-size", "4G")
    assert doc["config"]["max_level"] == level
    st = doc["stats"]
    assert st[leaves] > 0
    assert st["pages_4k"] + st["pages_2m"] + st["pages_1g"] == st[leaves]


def test_vcpus_split_the_work():
    doc = simulate("--vcpus", 2, "--faults", 200_000, "--chunk", 50_000)
    assert doc["config"]["vcpus"] == 2
    assert doc["accesses"] == 200_000


def test_zaps_are_interleaved():
    doc = simulate("--faults", 100_000, "--zap-every", 7_000, "--zap-all-every", 30_000,
                   "--chunk", 16_384)
    z, st = doc["zaps"], doc["stats"]
    assert z["gfn_range"] == 100_000 // 7_000
    assert z["all"] == 100_000 // 30_000
    # zap_all is kvm_tdp_mmu_zap_all, which flushes nothing (6.10: "A TLB flush is
    # unnecessary"); the simulator's all_flushed counts the zap_all calls that zapped
    assert st["tlb_flushes"] == 0 and z["all_flushed"] > 0
    assert st["tlb_flushes_ranged"] == z["gfn_range_flushed"]
    assert st["tables_freed"] > 0            # zap_all frees every table but the root
    # After the last zap_all at 90 000, only the last 10 000 faults' pages are mapped.
    assert st["pages_4k"] <= 10_000


def test_seed_decides_the_run():
    args = ("--workload", "mixed", "--faults", 20_000, "--guest-size", "16M")
    key = lambda d: (d["results"]["fixed"], d["results"]["emulate"],  # noqa: E731
                     d["stats"]["mmio_sptes_created"])
    a, b, c = (simulate(*args, "--seed", s) for s in (1, 1, 2))
    assert key(a) == key(b)
    assert key(a) != key(c)


def test_json_keeps_the_samples():
    doc = simulate("--faults", 40_000, "--chunk", 10_000, "--root-level", 5,
                   "--stats-interval", 10_000)
    samples = doc["samples"]
    assert [s["accesses"] for s in samples] == [10_000, 20_000, 30_000, 40_000]
    assert all(set(s) == {"accesses", "faults", "seconds", "accesses_per_s", "faults_per_s",
                          "results", "leaves", "pt_pages", "pt_bytes", "working_set"}
               for s in samples)
    assert samples[-1]["faults"] == doc["faults"]
    assert samples[-1]["pt_pages"] == [doc["stats"][f"pt_pages_l{lvl}"] for lvl in range(1, 6)]
    assert samples[-1]["results"] == doc["results"]
    assert samples[-1]["working_set"] == doc["stats"]["pages_4k"]     # random, 4K, no zaps
    # the default: about 200 samples per run
    doc = simulate("--faults", 40_000)
    assert doc["config"]["stats_interval"] == 200 and len(doc["samples"]) == 200


def test_output_dir_holds_stats_samples_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "m5out" 
    r = run_cli("simulate", "--workload", "seq", "--guest-size", "16M", "--faults", 10_000,
                "--stats-interval", 1000, "-o", out, "--plot")
    assert r.rc == 0, r.err
    assert f"{out}/ (stats.json, samples.csv)" in r.out
    doc = json.loads((out / "stats.json").read_text())
    assert doc["accesses"] == 10_000 and doc["plot"] == str(out / "plot.png")
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "samples.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(row["accesses"]) for row in rows] == list(range(1000, 10_001, 1000))
    # seq over 4096 pages: one first touch (a fault, FIXED) per access up to 4096
    assert [int(row["fixed"]) for row in rows] == [min(n, 4096) for n in
                                                   range(1000, 10_001, 1000)]
    assert [int(row["working_set_pages"]) for row in rows] == \
        [int(row["leaves_4k"]) for row in rows]
    last = rows[-1]
    assert int(last["hits"]) == 10_000 - 4096
    assert int(last["tables_l1"]) == 8 and int(last["tables_l4"]) == 1
    assert int(last["pt_bytes"]) == 4096 * doc["stats"]["pt_pages"]
    assert float(last["accesses_per_s"]) > 0
    assert rows[0].keys() == set(sim_report.csv_columns(4))


def test_several_layouts_print_one_comparison(tmp_path):
    r = run_cli("simulate", "--layout", "ept,npt,legacy", "--workload", "seq",
                "--guest-size", "16M", "--faults", 5000)
    assert r.rc == 0, r.err
    head = [line for line in r.out.splitlines() if line.strip().startswith("layout")]
    assert head and head[0].split() == ["layout", "ept", "npt", "legacy"]
    fills = [line for line in r.out.splitlines() if line.strip().startswith("cache fills")]
    assert fills[0].split()[-1] == "0"                  # legacy: the GFP_ZERO path
    assert all(x != "0" for x in fills[0].split()[2:-1])
    # the same records under each: the same faults, the JSON holds every run
    doc = run_cli("simulate", "--layout", "ept,npt,legacy", "--workload", "mixed",
                  "--faults", 5000, "--json", "-o", tmp_path / "o").json()
    runs = doc["runs"]
    assert [d["config"]["layout"] for d in runs] == ["ept", "npt", "legacy"]
    assert len({(d["results"]["fixed"], d["results"]["emulate"]) for d in runs}) == 1
    for lay in ("ept", "npt", "legacy"):
        assert json.loads((tmp_path / "o" / lay / "stats.json").read_text())[
            "config"]["layout"] == lay
    assert "legacy" in (tmp_path / "o" / "comparison.txt").read_text()


def test_version():
    r = run_cli("--version")
    assert r.rc == 0 and r.out.strip() == f"spte-fast {sf.__version__}"


def test_bare_command_prints_help_and_succeeds():
    r = run_cli()
    assert r.rc == 0 and r.err == ""
    assert r.out.startswith("usage: spte-fast")
    for word in ("simulate", "trace", "demo", "--version"):
        assert word in r.out


def test_errors_show_the_usage_of_the_command():
    r = run_cli("simulate", "--layout", "ept,bogus")
    line = r.error_line(usage=True)
    assert "invalid choice: 'bogus'" in line
    assert r.err.startswith("usage: spte-fast simulate")
    r = run_cli("trace", "info", "no-such-file")
    assert "no such file" in r.error_line(usage=True)
    assert r.err.startswith("usage: spte-fast trace info")


def test_plot_hint_names_the_real_extra():
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    from spte_fast import cli
    name, extra = cli.PLOT_EXTRA.rstrip("]").split("[")
    assert name == project["name"]
    assert any(d.startswith("matplotlib") for d in project["optional-dependencies"][extra])


def test_human_summary():
    r = run_cli("simulate", "--faults", 20_000, "--zap-every", 5_000)
    assert r.rc == 0 and r.err == ""
    for words in ("faults/s", "fixed", "spurious", "page tables", "L1", "L4", "total",
                  "cache fills", "zero-inits", "bytes written", "TLB flushes",
                  "2M ranges 4", "audit", "passed"):
        assert words in r.out, words


def test_help_defines_the_workloads():
    r = run_cli("simulate", "--help")
    assert r.rc == 0
    for words in ("seq ", "random ", "zipf ", "hotcold ", "huge ", "mixed ", "90 %",
                  "MMIO", "legacy", "tdx", "--zap-all-every", "--plot"):
        assert words in r.out, words


def test_progress_bar_only_on_a_terminal():
    pytest.importorskip("tqdm")
    import fcntl
    import struct
    import termios
    master, slave = os.openpty()
    # A terminal of 100 columns (a fresh pty is 0x0, and tqdm draws nothing in 0 columns).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    try:
        r = run_cli("simulate", "--faults", 300_000, "--chunk", 100_000, "--json",
                    stderr=slave)
    finally:
        os.close(slave)
    os.set_blocking(master, False)
    try:
        tty = os.read(master, 65536).decode(errors="replace")
    except BlockingIOError:
        tty = ""
    os.close(master)
    assert r.rc == 0
    assert "300k" in tty                          # tqdm's bar, with its total
    assert r.json()["accesses"] == 300_000        # stdout stays one JSON document


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "run.png"
    doc = simulate("--faults", 40_000, "--chunk", 10_000, "--plot", png)
    assert doc["plot"] == str(png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path):
    # Simulate a machine without matplotlib: a package of that name that fails to import.
    fake = tmp_path / "fake" / "matplotlib"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), ROOT])}
    r = run_cli("simulate", "--faults", 1000, "--plot", tmp_path / "x.png", env=env)
    line = r.error_line()
    assert "matplotlib" in line and "pip install 'spte_fast[plot]'" in line
    assert not (tmp_path / "x.png").exists()


def test_demo():
    r = run_cli("demo")
    assert r.rc == 0, r.err
    assert "GFP_ZERO" in r.out and "memset64 fill" in r.out
    assert r.out.count("M faults/s") == 3


def test_console_script():
    exe = os.path.join(os.path.dirname(sys.executable), "spte-fast")
    if not os.path.exists(exe):
        pytest.skip("spte-fast is not installed next to this Python (pip install -e .)")
    r = subprocess.run([exe, "simulate", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--workload" in r.stdout


def _trace(tmp_path, name, records):
    path = tmp_path / name
    path.write_bytes(np.asarray(records, dtype="<u8").tobytes())
    return path


@pytest.mark.parametrize("argv, message", [
    (["simulate", "--workload", "nope"], "invalid choice: 'nope'"),
    (["simulate", "--layout", "ept2"], "invalid choice: 'ept2'"),
    (["simulate", "--layout", "ept,ept"], "a layout named twice"),
    (["simulate", "--plot", "--faults", "10"], "--plot without a file name needs -o DIR"),
    (["simulate", "--stats-interval", "0"], "at least 1"),
    (["simulate", "--trace", "t.bin", "--trace-format", "pcap"], "invalid choice: 'pcap'"),
    (["simulate", "--root-level", "3"], "invalid choice: 3"),
    (["simulate", "--max-level", "512g"], "invalid choice: '512g'"),
    (["simulate", "--faults", "0"], "at least 1"),
    (["simulate", "--faults", "many"], "not a count"),
    (["simulate", "--guest-size", "4X"], "not a size"),
    (["simulate", "--guest-size", "5000"], "multiple of 4 KiB"),
    (["simulate", "--guest-size", "512T", "--faults", "10"], "address width"),
    (["simulate", "--vcpus", "1000"], "at most 256"),
    (["simulate", "--zap-every", "-5"], "not a count"),
    (["simulate", "--seed", "x"], "invalid int value"),
    (["simulate", "--workload", "seq", "--trace", "t.bin"], "not allowed with"),
    (["simulate", "--bogus"], "unrecognized arguments"),
    (["simulate", "--trace", "does-not-exist.bin"], "no such file"),
    (["simulate", "--plot", "/no/such/dir/x.png", "--faults", "10"], "does not exist"),
    (["frobnicate"], "invalid choice"),
    (["trace"], "required"),
    (["trace", "split"], "invalid choice"),
])
def test_bad_input_is_one_line_and_status_2(argv, message):
    assert message in run_cli(*argv).error_line()


@pytest.mark.parametrize("name, records, message", [
    ("trunc.bin", None, "truncated trace: 20 bytes"),
    ("kind3.bin", [4 << 2, 5 << 2 | 3], "record 1: unknown kind 3"),
    ("wide.bin", [1 << 2, (1 << 36) << 2 | 1], "record 1: page number 0x1000000000 is beyond"),
    ("empty.bin", [], "empty trace"),
])
def test_bad_traces(tmp_path, name, records, message):
    if records is None:
        path = tmp_path / name
        path.write_bytes(b"\x00" * 20)
    else:
        path = _trace(tmp_path, name, records)
    assert message in run_cli("simulate", "--trace", path).error_line()


def test_trace_width_follows_the_root_level(tmp_path):
    # Page 1 << 36 is beyond 4 levels but inside 5; a guest of 4 MiB maps page 1 only and
    # the far page faults as MMIO.
    path = _trace(tmp_path, "far.bin", [1 << 2, (1 << 36) << 2 | 1])
    doc = simulate("--trace", path, "--root-level", 5, "--guest-size", "4M")
    assert doc["results"] == {"hits": 0, "fixed": 1, "spurious": 0, "emulate": 1, "retry": 0,
                              "fast": 0}


@pytest.mark.parametrize("name, data", [
    ("t.bin.gz", b"this is not gzip"),
    ("t.bin.xz", b"this is not xz either"),
    ("cut.bin.xz", None),                       # a valid stream cut in the middle
])
def test_bad_compressed_trace(tmp_path, name, data):
    path = tmp_path / name
    if data is None:
        data = lzma.compress((np.arange(1 << 16, dtype="<u8") << 2).tobytes() * 4)
        data = data[:len(data) // 2]
    path.write_bytes(data)
    line = run_cli("simulate", "--trace", path).error_line()
    assert f"{name}: corrupt compressed data" in line
