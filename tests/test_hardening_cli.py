"""Issue 14: the command line never loses a file, never grows without bound, and ends
cleanly -- same-file checks by inode, -o written beside its target and renamed, devices
never removed, lackey lines capped, EPIPE a normal end of output, SIGTERM cleaning up,
options checked before the run and named in the error.  Each case runs ``spte-fast`` as a
subprocess (support.cli), so a hang is a timeout of one test.
"""
import contextlib
import os
import resource
import signal
import stat
import subprocess
import sys

import numpy as np
import pytest

from support.cli import ROOT, run_cli

LOG = "==1== Lackey\nI  04001000,3\n L 1ffefff8a0,8\n S 0804a010,4\n"


def _cli_env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, e.get("PYTHONPATH")) if p)
    return e


def _cli_argv(*args):
    return [sys.executable, "-m", "spte_fast", *map(str, args)]


def _trace(path, n=1000):
    np.array([(i << 2) | (i % 3) for i in range(n)], dtype="<u8").tofile(path)
    return path


def _leftovers(d):
    return sorted(p.name for p in d.iterdir() if p.name.endswith(".part"))


# -- item 9: a trace from a pipe is read once ----------------------------------------------

def test_simulate_trace_from_a_pipe(tmp_path):
    # issue 14 item 9 (fixed by item 6's one-pass reader): /dev/stdin from a pipe gave 0
    # faults and exit 0, the first pass having consumed the input.
    data = _trace(tmp_path / "t.bin").read_bytes()
    proc = subprocess.run(_cli_argv("simulate", "--json", "--trace", "/dev/stdin"),
                          input=data, capture_output=True, env=_cli_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json
    doc = json.loads(proc.stdout)
    assert doc["faults"] == 1000
    assert sum(doc["results"][k] for k in ("fixed", "spurious", "emulate")) == 1000


@pytest.mark.skipif(not os.path.exists("/bin/bash"), reason="needs bash")
def test_simulate_trace_from_process_substitution(tmp_path):
    t = _trace(tmp_path / "t.bin", 777)
    cmd = " ".join(_cli_argv("simulate", "--json", "--trace", "<(cat " + str(t) + ")"))
    proc = subprocess.run(["/bin/bash", "-c", cmd], capture_output=True, env=_cli_env(),
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    import json
    assert json.loads(proc.stdout)["faults"] == 777


# -- item 12: the same-file check compares files, not paths --------------------------------

@pytest.mark.parametrize("link", ["symlink", "hardlink", "dotdot"])
def test_convert_onto_a_link_to_its_log_is_refused(tmp_path, link):
    log = tmp_path / "l.log"
    log.write_text(LOG)
    out = tmp_path / "out.bin"
    if link == "symlink":
        out.symlink_to(log)
    elif link == "hardlink":
        os.link(log, out)
    else:
        (tmp_path / "sub").mkdir()
        out = tmp_path / "sub" / ".." / "l.log"
    line = run_cli("trace", "convert", log, "-o", out).error_line()
    assert "overwrite" in line and "-o" in line
    assert log.read_text() == LOG                  # the log is intact


# -- item 13: never delete what the command did not create ---------------------------------

def test_failed_convert_leaves_an_existing_output_as_it_was(tmp_path):
    log = tmp_path / "bad.log"
    log.write_text(LOG + "garbage\n")
    out = tmp_path / "keep.bin"
    out.write_bytes(b"precious")
    assert "not a lackey record" in run_cli("trace", "convert", log, "-o", out).error_line()
    assert out.read_bytes() == b"precious"
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_failed_convert_never_removes_a_device(tmp_path):
    # issue 14 item 13: as root, -o /dev/null with a bad log deleted /dev/null.  A copy of
    # the null device in tmp_path stands in for it.
    dev = tmp_path / "null"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    log = tmp_path / "bad.log"
    log.write_text(LOG + "garbage\n")
    assert "not a lackey record" in run_cli("trace", "convert", log, "-o", dev).error_line()
    assert stat.S_ISCHR(os.stat(dev).st_mode)
    good = tmp_path / "good.log"
    good.write_text(LOG)
    r = run_cli("trace", "convert", good, "-o", dev)
    assert r.rc == 0, r.err
    assert stat.S_ISCHR(os.stat(dev).st_mode)      # written in place, not replaced


def test_convert_through_a_symlink_writes_its_target(tmp_path):
    log = tmp_path / "l.log"
    log.write_text(LOG)
    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    r = run_cli("trace", "convert", log, "-o", link)
    assert r.rc == 0, r.err
    assert link.is_symlink()
    assert len(target.read_bytes()) == 3 * 8
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    assert _leftovers(tmp_path) == []


def test_sigterm_leaves_no_partial_output(tmp_path):
    # issue 14 item 17: SIGTERM left a partial -o file.  The log is a FIFO, so the convert
    # is certainly mid-way (its temporary output exists) when the signal arrives.
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "t.bin"
    proc = subprocess.Popen(_cli_argv("trace", "convert", fifo, "-o", out), env=_cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        w = os.open(fifo, os.O_WRONLY)
        try:
            os.write(w, (LOG * 1000).encode())
            for _ in range(200_000):               # until it has begun writing its output
                if _leftovers(tmp_path) or out.exists() or proc.poll() is not None:
                    break
                os.sched_yield()
            proc.send_signal(signal.SIGTERM)
            # A signal that lands just before the child's next read() leaves it blocked
            # there (CPython runs handlers between bytecodes): more input, then the end of
            # the log, bring it back to Python, where the handler runs.
            with contextlib.suppress(BrokenPipeError):
                os.write(w, LOG.encode())
        finally:
            os.close(w)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert b"terminated" in err and b"Traceback" not in err
    assert not out.exists()
    assert _leftovers(tmp_path) == []


# -- item 14: a lackey log without newlines fails clearly, in bounded memory ---------------

def test_a_log_without_newlines_fails_clearly(tmp_path):
    log = tmp_path / "one.log"
    log.write_bytes(b"I  0400" * (1 << 20))        # 7 MiB, no newline
    line = run_cli("trace", "convert", log, "-o", tmp_path / "t.bin").error_line()
    assert "one.log:1: a line longer than" in line
    assert not (tmp_path / "t.bin").exists()


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def test_dev_zero_as_a_log_fails_in_bounded_memory(tmp_path):
    # issue 14 item 14: /dev/zero (no newline ever) grew memory without bound.  The child
    # runs under a 3 GiB address-space limit so that the unfixed code fails, not the host.
    # Detected by content (issue 13) it is no trace at all; read as a lackey log, a line
    # without end.
    for extra, message in (([], "/dev/zero: starts with 65,536 zero bytes"),
                           (["--trace-format", "lackey"], "/dev/zero:1: a line longer than")):
        proc = subprocess.run(_cli_argv("trace", "convert", "/dev/zero", "-o",
                                        tmp_path / "t.bin", *extra),
                              capture_output=True, text=True, env=_cli_env(), timeout=120,
                              preexec_fn=_limit_memory)
        assert proc.returncode == 2, proc.stderr[-500:]
        assert message in proc.stderr


# -- item 17: options checked up front, named; EPIPE a normal end ---------------------------

@pytest.mark.parametrize("extra", [[], ["--trace", "T"]])
def test_negative_seed_names_the_option(tmp_path, extra):
    extra = [str(_trace(tmp_path / "t.bin")) if a == "T" else a for a in extra]
    line = run_cli("simulate", "--seed", "-1", "--faults", "10", *extra).error_line()
    assert "--seed" in line


@pytest.mark.parametrize("name, message", [("out.txt", "unsupported format 'txt'"),
                                           ("noext", "no file extension"),
                                           ("DIR", "is a directory")])
def test_plot_target_is_checked_before_the_run(tmp_path, name, message):
    pytest.importorskip("matplotlib")
    (tmp_path / "DIR").mkdir()
    # 10**9 faults: had the run started, the test would time out.
    line = run_cli("simulate", "--faults", "1G", "--plot", tmp_path / name,
                   timeout=60).error_line()
    assert "--plot" in line and message in line
    assert not (tmp_path / "DIR.png").exists()


def test_guest_beyond_the_pfn_field_says_what_to_change():
    line = run_cli("simulate", "--root-level", "5", "--guest-size", "4P",
                   "--faults", "10").error_line()
    assert "--guest-size" in line and "PFN field" in line
    assert "0x" not in line                        # no internal pfn ranges


@pytest.mark.parametrize("argv", [["simulate", "--faults", "1000"],
                                  ["simulate", "--faults", "1000", "--json"], ["demo"]])
def test_a_closed_stdout_is_a_normal_end(argv):
    r, w = os.pipe()
    os.close(r)                                    # the reader is gone before any output
    try:
        proc = subprocess.run(_cli_argv(*argv), stdout=w, stderr=subprocess.PIPE,
                              env=_cli_env(), timeout=120, text=True)
    finally:
        os.close(w)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_read_errors_name_the_file(tmp_path):
    line = run_cli("trace", "convert", "/proc/self/mem", "-o", tmp_path / "t.bin").error_line()
    assert "/proc/self/mem" in line
    assert not (tmp_path / "t.bin").exists()
