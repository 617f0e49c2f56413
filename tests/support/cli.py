"""Helpers shared by the command-line tests (test_cli.py, test_trace.py).

``run_cli`` runs ``python -m spte_fast ...`` as a subprocess, as a user would; the lackey
helpers are a slow, line-by-line oracle of the converter (a regular expression per line
and a list as the FIFO TLB), independent of spte_fast.sim.trace's vectorised parser.
"""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_LINE = re.compile(r"^(I | L| S| M) ([0-9a-fA-F]+),(\d+)$")
_KIND = {"I ": (2,), " L": (0,), " S": (1,), " M": (0, 1)}    # M: a load, then a store


class Result:
    def __init__(self, proc):
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def json(self):
        """The one JSON document stdout must hold (json.loads refuses anything extra)."""
        return json.loads(self.out)

    def error_line(self, usage=None):
        """Assert the bad-input contract (status 2, nothing on stdout, no traceback; on
        stderr one error line, after the command's usage when the command line itself
        was wrong) and return the error line.  ``usage``: True/False insists on it."""
        assert self.rc == 2, (self.rc, self.err)
        assert self.out == ""
        assert "Traceback" not in self.err
        lines = self.err.splitlines()
        assert lines, self.err
        head = lines[:-1]
        if head:
            assert head[0].startswith("usage: spte-fast"), self.err
            assert all(line.startswith(" ") for line in head[1:]), self.err
        if usage is not None:
            assert bool(head) is usage, self.err
        assert lines[-1].startswith("spte-fast: error: "), lines[-1]
        return lines[-1]


def run_cli(*args, env=None, stderr=subprocess.PIPE, timeout=120):
    """Run ``python -m spte_fast ARGS`` from a temporary-friendly cwd; return a Result."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, e.get("PYTHONPATH")) if p)
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", "spte_fast", *map(str, args)], env=e,
                          stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=timeout)
    return Result(proc)


def oracle_records(text, tlb=None):
    """The records a lackey log converts to, computed one line at a time."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("=="):
            continue
        m = _LINE.match(line)
        assert m, line
        for kind in _KIND[m.group(1)]:
            rec = (int(m.group(2), 16) >> 12) << 2 | kind
            if not out or out[-1] != rec:
                out.append(rec)
    if tlb is None:
        return out
    fifo, kept = [], []
    for rec in out:
        if rec in fifo:
            continue
        kept.append(rec)
        fifo.append(rec)
        if len(fifo) > tlb:
            fifo.pop(0)
    return kept
