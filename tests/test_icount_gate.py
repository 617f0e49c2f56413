"""The instruction-count gate (bench/icount.py, issue 13 item 5) catches a slowed kernel.

One item (the page fill, the cheapest to run under callgrind) is measured three times, each
in a fresh process: a baseline; an unchanged run, which must count exactly the same
instructions and pass; and a run where the kernel does about 6 % more work per nominal
item (``--slow fill=1.05``: 17 passes over the pages instead of 16), which the 2 % gate
must fail.  Skipped where valgrind is not installed.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

from support.cli import ROOT

ICOUNT = os.path.join(ROOT, "bench", "icount.py")


def icount(*args):
    p = subprocess.run([sys.executable, ICOUNT, *map(str, args)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_gate_passes_an_unchanged_run_and_fails_a_slowed_kernel(tmp_path):
    base, again = tmp_path / "base.json", tmp_path / "again.json"
    rc, out, err = icount("--items", "fill", "--save", base)
    assert rc == 0, err
    doc = json.loads(base.read_text())
    fill = doc["items"]["fill"]
    assert fill["items"] == 1024 and fill["unit"] == "page"
    # memset64 of a 4 KiB page: at least one store per 16 bytes, and not a store loop per word
    assert 256 <= fill["per_item"] < 2048

    rc, out, err = icount("--items", "fill", "--compare", base, "--fail", "2%",
                          "--save", again)
    assert rc == 0, err
    assert "PASS" in out and "+0.00%" in out
    # The counts repeat exactly, process to process.
    assert json.loads(again.read_text())["items"]["fill"]["instructions"] == \
        fill["instructions"]

    rc, out, err = icount("--items", "fill", "--compare", base, "--fail", "2%",
                          "--slow", "fill=1.05")
    assert rc == 1, err
    row = next(line for line in out.splitlines() if line.startswith("fill "))
    assert "REGRESSION" in row
    change = float(row.split()[3].rstrip("%"))
    assert 5 < change < 8                     # 17/16 of the work, plus the same call
    assert "FAIL: fill regressed by more than 2.0%" in out


@pytest.mark.parametrize("args, message", [
    (["--items", "fill,bogus"], "unknown item bogus (the items: fill, fault_seq"),
    (["--compare", "/nonexistent/base.json"], "--compare /nonexistent/base.json: No such"),
    (["--fail", "two"], "not a percentage: 'two'"),
    (["--slow", "fill"], "--slow ITEM=FACTOR"),
])
def test_bad_input_is_one_error_line(args, message):
    rc, out, err = icount(*args)
    assert rc == 2 and out == ""
    assert err.startswith("icount: error: ") and len(err.splitlines()) == 1
    assert message in err, err


def test_a_file_that_is_not_a_baseline_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"items": {"fill": {}}}')
    rc, _, err = icount("--compare", bad)
    assert rc == 2 and "not a baseline of bench/icount.py" in err
