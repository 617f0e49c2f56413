"""The fuzz harness itself is exercised on every test run (issue 14): each target runs a
few hundred seeded random inputs in a child process (a crash fails this test, not the
session), and the pure-Python byte reader behaves as the targets assume.  The bounded
coverage-guided run is in .ci/run; the long runs' figures are in fuzz/README.md."""
import os
import subprocess
import sys

import pytest

from support.cli import ROOT

RUNS = {"api": 300, "trace": 1500, "cli": 300}


@pytest.mark.parametrize("target", sorted(RUNS))
def test_target_runs_clean(target):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-m", "fuzz.run", target, "--runs",
                           str(RUNS[target]), "--seed", "14", "--max-len", "768"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{target}: {RUNS[target]} runs, seed 14, no finding" in proc.stdout


def test_the_byte_reader_reads_past_the_end_as_zero():
    sys.path.insert(0, ROOT)
    try:
        from fuzz.bytes_reader import Bytes
    finally:
        sys.path.remove(ROOT)
    r = Bytes(b"\x05\xff")
    assert r.below(3) == 2 and r.flag() is True
    assert r.remaining() == 0 and r.byte() == 0 and r.below(10) == 0 and r.take(4) == b""


def test_every_target_accepts_the_empty_input():
    sys.path.insert(0, ROOT)
    try:
        from fuzz import targets
    finally:
        sys.path.remove(ROOT)
    for name, target in targets.TARGETS.items():
        target(b"")
