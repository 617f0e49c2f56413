"""The lackey converter and the binary trace format (spte_fast.sim.trace, `spte-fast trace`).

Every command-line path runs ``python -m spte_fast`` as a subprocess.  Expected records
come from a line-by-line oracle (tests/support/cli.py), not from the code under test.
"""
import gzip
import json
import lzma
import os
import sys
import threading

import numpy as np
import pytest

from spte_fast.sim import trace as tr

from support.cli import oracle_records, run_cli
from support.spec import ad_fault_counts

# A lackey log as valgrind writes it: banners, an empty line, all four record kinds,
# consecutive duplicates (same page and kind, other offsets), and a read, write and fetch
# of one page in a row (three distinct records).
LOG = """\
==4242== Lackey, an example Valgrind tool
==4242== Command: ./prog
==4242== 
I  04001000,3
I  04001004,2
I  04001ff0,5
 L 1ffefff8a0,8
 L 1ffefff8a8,8
 S 1ffefff8a0,8
 M 0804a010,4
 M 0804a018,4
I  04002000,4
 L 04002010,8
 S 04002020,8
I  04002030,1
 L 0000000000000abc,1
I  04001000,3

==4242== 
==4242== Counted 1 call to main()
"""


def _write(path, text):
    data = text.encode()
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "wb") as f:
        f.write(data)
    return path


def _read_trace(path):
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "rb") as f:
        data = f.read()
    assert len(data) % 8 == 0
    return np.frombuffer(data, dtype="<u8").tolist()


def test_oracle_on_the_sample_log():
    # The oracle itself, by hand: 16 accesses (an M is a load and a store), duplicates
    # dropped.
    expected = [0x4001 << 2 | 2, 0x1ffefff << 2 | 0, 0x1ffefff << 2 | 1,
                0x804a << 2 | 0, 0x804a << 2 | 1, 0x804a << 2 | 0, 0x804a << 2 | 1,
                0x4002 << 2 | 2, 0x4002 << 2 | 0, 0x4002 << 2 | 1, 0x4002 << 2 | 2,
                0 << 2 | 0, 0x4001 << 2 | 2]
    assert oracle_records(LOG) == expected


@pytest.mark.parametrize("log_ext", ["", ".gz", ".xz"])
@pytest.mark.parametrize("out_ext", ["", ".gz", ".xz"])
def test_convert_compression_both_ways(tmp_path, log_ext, out_ext):
    log = _write(tmp_path / f"lackey.log{log_ext}", LOG)
    out = tmp_path / f"trace.bin{out_ext}"
    r = run_cli("trace", "convert", log, "-o", out)
    assert r.rc == 0, r.err
    assert _read_trace(out) == oracle_records(LOG)
    if out_ext:      # really compressed (the magic numbers), not plain bytes with a suffix
        assert out.read_bytes()[:2] in (b"\x1f\x8b", b"\xfd7")
    assert "16 accesses -> 13 records" in r.out


@pytest.mark.parametrize("tlb", [1, 2, 3, 64])
def test_convert_tlb_keeps_fifo_misses(tmp_path, tlb):
    rng = np.random.default_rng(7)
    pages = rng.integers(0, 6, 400) * 4096 + 0x400000     # 6 pages: hits and evictions
    kinds = rng.choice(["I ", " L", " S", " M"], 400)
    text = "".join(f"{k} {a:08x},4\n" for k, a in zip(kinds, pages))
    log = _write(tmp_path / "l.log", text)
    out = tmp_path / "t.bin"
    r = run_cli("trace", "convert", log, "-o", out, "--tlb", tlb)
    assert r.rc == 0, r.err
    got = _read_trace(out)
    assert got == oracle_records(text, tlb=tlb)
    # One entry never hits once consecutive duplicates are gone; more entries filter.
    assert (len(got) < len(oracle_records(text))) == (tlb > 1)


def test_fifo_tlb_is_fifo_not_lru():
    t = tr.FifoTlb(2)
    a, b, c = 4, 8, 12
    # a b a c a: the hit on a does not refresh it, so c evicts a and a misses again.
    assert t.misses(np.array([a, b, a, c, a], dtype=np.uint64)).tolist() == [a, b, c, a]
    # State carries over chunks: c and a are in the TLB now, b was evicted.
    assert t.misses(np.array([c, a, b], dtype=np.uint64)).tolist() == [b]


def test_convert_streams_across_block_boundaries(tmp_path):
    # Tiny blocks: lines split between reads, duplicates across blocks, a last line with
    # no newline.  The result must equal the one-shot conversion.
    text = LOG * 5 + "I  04001000,3"
    src = _write(tmp_path / "l.log", text)
    for block in (7, 13, 64, 1 << 20):
        st = tr.convert_lackey(src, tmp_path / "t.bin", block=block)
        assert _read_trace(tmp_path / "t.bin") == oracle_records(text), block
        assert st.accesses == 16 * 5 + 1
        assert st.lines == text.count("\n") + 1


@pytest.mark.parametrize("bad, lineno", [
    (" X 04001000,4", 5),            # unknown kind letter
    ("I  04001000", 5),              # no size
    ("I  0400zz00,4", 5),            # not hex
    (" L 04001000,4,4", 5),          # two commas
    (" L 04001000,", 5),             # empty size
    (" L 11112222333344445,8", 5),   # 17 hex digits
    ("L 04001000,4", 5),             # lost its leading space
    ("hello world", 5),              # program output mixed into the log
])
def test_convert_rejects_an_unparsable_line(tmp_path, bad, lineno):
    lines = LOG.splitlines()
    lines.insert(lineno - 1, bad)
    log = _write(tmp_path / "bad.log", "\n".join(lines) + "\n")
    out = tmp_path / "t.bin"
    line = run_cli("trace", "convert", log, "-o", out).error_line()
    assert f"bad.log:{lineno}: not a lackey record" in line
    assert not out.exists()                               # no partial trace left behind


def test_convert_errors(tmp_path):
    assert "no such file" in run_cli("trace", "convert", tmp_path / "nope.log", "-o",
                                     tmp_path / "t.bin").error_line()
    log = _write(tmp_path / "l.log", LOG)
    assert "required" in run_cli("trace", "convert", log).error_line()          # no -o
    assert "at least 1" in run_cli("trace", "convert", log, "-o", tmp_path / "t.bin",
                                   "--tlb", "0").error_line()
    assert "No such file" in run_cli("trace", "convert", log, "-o",
                                     tmp_path / "no" / "dir" / "t.bin").error_line()
    (tmp_path / "broken.log.xz").write_bytes(b"not xz at all")
    run_cli("trace", "convert", tmp_path / "broken.log.xz", "-o", tmp_path / "t.bin").error_line()


def test_convert_help_documents_the_format():
    r = run_cli("trace", "convert", "--help")
    assert r.rc == 0
    assert "(page_number << 2) | kind" in r.out
    for words in ("0 read", "1 write", "2 exec", "little-endian", ".xz", "FIFO"):
        assert words in r.out, words


# -- the binary trace reader ---------------------------------------------------------------

def test_iter_records_chunks_and_checks(tmp_path):
    recs = (np.arange(10, dtype=np.uint64) << np.uint64(2)) | np.uint64(1)
    path = tmp_path / "t.bin.gz"
    with gzip.open(path, "wb") as f:
        f.write(recs.astype("<u8").tobytes())
    chunks = list(tr.iter_records(path, gfn_limit=1 << 36, chunk=3))
    assert [c.size for c in chunks] == [3, 3, 3, 1]
    assert np.concatenate(chunks).tolist() == recs.tolist()
    with pytest.raises(tr.TraceError, match="record 9: page number 0x9 is beyond"):
        list(tr.iter_records(path, gfn_limit=9, chunk=4))


@pytest.mark.parametrize("data, message", [
    (b"\x00" * 13, "truncated trace: 13 bytes"),
    ((4 << 2 | 1).to_bytes(8, "little") + (5 << 2 | 3).to_bytes(8, "little"),
     "record 1: unknown kind 3"),
])
def test_iter_records_rejects_malformed(tmp_path, data, message):
    path = tmp_path / "t.bin"
    path.write_bytes(data)
    with pytest.raises(tr.TraceError, match=message):
        list(tr.iter_records(path))


def test_scan_trace_summary(tmp_path):
    pages = np.array([0, 1, 511, 512, 1 << 18, (1 << 18) + 3, 5], dtype=np.uint64)
    kinds = np.array([0, 1, 2, 0, 1, 1, 2], dtype=np.uint64)
    path = tmp_path / "t.bin.xz"
    with lzma.open(path, "wb") as f:
        f.write(((pages << np.uint64(2)) | kinds).astype("<u8").tobytes())
    info = tr.scan_trace(path, 1 << 36, levels=3, chunk=2)
    assert info.records == 7 and info.max_page == (1 << 18) + 3
    assert info.kinds == (2, 3, 2)
    assert info.regions == (3, 2, 1)     # 2M regions 0, 1, 512; 1G regions 0, 1; one 512G


def test_round_trip_convert_then_simulate(tmp_path):
    rng = np.random.default_rng(3)
    n = 3000
    addrs = rng.integers(0, 1 << 28, n) & ~0x7
    kinds = rng.choice(["I ", " L", " S", " M"], n)
    text = "==1== start\n" + "".join(f"{k} {a:08x},8\n" for k, a in zip(kinds, addrs))
    log = _write(tmp_path / "l.log.gz", text)
    out = tmp_path / "t.bin.xz"
    assert run_cli("trace", "convert", log, "-o", out).rc == 0
    recs = oracle_records(text)
    r = run_cli("simulate", "--trace", out, "--json")
    assert r.rc == 0, r.err
    doc = r.json()
    pages = {x >> 2 for x in recs}
    assert doc["accesses"] == len(recs)
    # each page's first access exits and is FIXED; the others hit (a 4K leaf of a writable
    # slot has R, W, X, A and D from make_spte, so no access of any kind exits again)
    assert doc["results"]["fixed"] == doc["faults"] == len(pages)
    assert doc["results"]["hits"] == len(recs) - len(pages)
    assert doc["results"]["spurious"] == 0
    kinds = ("read", "write", "exec")
    assert doc["config"]["trace_kinds"] == {
        name: sum(1 for x in recs if x & 3 == k) for k, name in enumerate(kinds)}
    assert doc["stats"]["pages_4k"] == len(pages)
    # The guest is one memslot from gfn 0 over the highest page, rounded up to 2M.
    assert doc["config"]["memslots"][0]["npages"] == (max(pages) // 512 + 1) * 512
    assert doc["audit"] == "passed"
    # --faults replays a prefix only.
    doc = run_cli("simulate", "--trace", out, "--json", "--faults", 100).json()
    assert doc["accesses"] == 100
    assert doc["results"]["fixed"] == len({x >> 2 for x in recs[:100]})
    # --mode fault: every record a not-present fault; with EPT A/D the first re-touch of a
    # page drops D (the slow path, make_spte with a writable old SPTE): FIXED too
    doc = run_cli("simulate", "--trace", out, "--json", "--mode", "fault").json()
    fixed, spurious = ad_fault_counts([x >> 2 for x in recs])
    assert fixed > len(pages)
    assert (doc["results"]["fixed"], doc["results"]["spurious"]) == (fixed, spurious)


def test_simulate_replays_a_fifo(tmp_path):
    # A FIFO can be read once only: simulate --trace must not open it twice (it used to
    # scan the trace, then reopen it for the replay, and block forever on the reopen).
    rng = np.random.default_rng(9)
    recs = ((rng.integers(0, 1 << 16, 4000).astype(np.uint64) << np.uint64(2))
            | rng.integers(0, 3, 4000).astype(np.uint64)).astype("<u8")
    for name, data in (("t.bin", recs.tobytes()), ("t.bin.xz", lzma.compress(recs.tobytes()))):
        path = tmp_path / name
        path.write_bytes(data)
        want = run_cli("simulate", "--trace", path, "--json", "--chunk", 1000)
        assert want.rc == 0, want.err
        fifo = tmp_path / f"fifo-{name}"
        os.mkfifo(fifo)
        errors = []

        def feed():
            try:
                with open(fifo, "wb") as f:        # blocks until the reader opens it
                    f.write(data)
            except OSError as e:                   # the reader went away early
                errors.append(e)

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        try:
            got = run_cli("simulate", "--trace", fifo, "--json", "--chunk", 1000, timeout=60)
        finally:
            if writer.is_alive():                  # never opened: release the writer
                os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
            writer.join(10)
        assert got.rc == 0, got.err
        assert errors == []
        a, b = want.json(), got.json()
        assert b["results"] == a["results"] and b["stats"] == a["stats"]
        assert b["accesses"] == a["accesses"] == 4000
        for key in ("trace_records", "trace_kinds", "memslots", "max_pt_pages"):
            assert b["config"][key] == a["config"][key], key


# -- issue 13: every input format, stdin/stdout, partial logs, trace info -------------------

def _champsim(path, instrs):
    """A ChampSim trace of (ip, [loads], [stores]) instructions, written by hand."""
    rows = np.zeros(len(instrs), dtype=tr._readers.CHAMPSIM_DTYPE)
    for row, (ip, loads, stores) in zip(rows, instrs):
        row["ip"] = ip
        row["source_memory"][:len(loads)] = loads
        row["destination_memory"][:len(stores)] = stores
    data = rows.tobytes()
    assert len(data) == 64 * len(instrs)
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "wb") as f:
        f.write(data)
    return path


CHAMPSIM = [(0x401003, [0x7ffd1000], []), (0x401007, [], [0x601040]),
            (0x402001, [0x7ffd1008, 0x601048], [0x7ffd2000]), (0x401003, [], [])]
CHAMPSIM_RECORDS = [0x401 << 2 | 2, 0x7ffd1 << 2 | 0, 0x401 << 2 | 2, 0x601 << 2 | 1,
                    0x402 << 2 | 2, 0x7ffd1 << 2 | 0, 0x601 << 2 | 0, 0x7ffd2 << 2 | 1,
                    0x401 << 2 | 2]
PIN = ("0x401003: R 0x7ffd1000\n0x401007: W 0x601040\n0x401007: W 0x601048\n"
       "0x402001: R 0x7ffd2008\n#eof\n")


@pytest.mark.parametrize("ext", ["", ".gz", ".xz"])
def test_champsim_is_detected_and_read(tmp_path, ext):
    path = _champsim(tmp_path / f"t.champsim{ext}", CHAMPSIM)
    assert np.concatenate(list(tr.iter_records(path))).tolist() == CHAMPSIM_RECORDS
    info = run_cli("trace", "info", path, "--json").json()
    assert (info["format"], info["instructions"], info["records"]) == ("champsim", 4, 9)
    assert info["kinds"] == {"read": 3, "write": 2, "exec": 4}
    assert info["distinct_pages"] == 5 and info["distinct_2m"] == 3
    doc = run_cli("simulate", "--trace", path, "--json").json()
    assert doc["accesses"] == 9 and doc["results"]["fixed"] == 5
    assert doc["config"]["trace_format"] == "champsim"


def test_pinatrace_is_detected_and_needs_its_eof(tmp_path):
    path = _write(tmp_path / "pinatrace.out", PIN)
    want = [0x7ffd1 << 2, 0x601 << 2 | 1, 0x601 << 2 | 1, 0x7ffd2 << 2]
    assert np.concatenate(list(tr.iter_records(path))).tolist() == want
    cut = _write(tmp_path / "cut.out", PIN[:PIN.index("#eof")] + "0x402005: R 0x7f")
    line = run_cli("trace", "info", cut).error_line()
    assert "no '#eof' line" in line and "--allow-partial" in line
    info = run_cli("trace", "info", cut, "--allow-partial", "--json").json()
    assert info["records"] == 5 and "#eof" in info["partial"]
    cut = _write(tmp_path / "cut2.out", PIN[:PIN.index("#eof")] + "0x4020")
    line = run_cli("trace", "info", cut).error_line()
    assert "cut2.out:5: not a pinatrace record" in line and "--allow-partial" in line
    info = run_cli("trace", "info", cut, "--allow-partial", "--json").json()
    assert info["records"] == 4 and "line 5" in info["partial"]


def test_a_raw_lackey_log_replays_directly(tmp_path):
    log = _write(tmp_path / "lackey.log", LOG)
    doc = run_cli("simulate", "--trace", log, "--json").json()
    recs = [16 and r for r in oracle_records(LOG)]
    assert doc["config"]["trace_format"] == "lackey"
    assert doc["accesses"] == doc["config"]["trace_records"] == 16      # every access
    assert doc["results"]["fixed"] == len({r >> 2 for r in recs})


def test_unknown_format_names_the_formats(tmp_path):
    path = _write(tmp_path / "notes.txt", "hello world\nthis is no trace\n")
    line = run_cli("simulate", "--trace", path).error_line()
    for word in ("binary", "lackey", "pinatrace", "champsim", "--trace-format",
                 "'hello world'"):
        assert word in line
    # forced, the lackey reader names the line
    line = run_cli("simulate", "--trace", path, "--trace-format", "lackey").error_line()
    assert "notes.txt:1: not a lackey record" in line


def test_pipe_to_simulate_replays_every_record(tmp_path):
    # issue 13: `cat t.bin | spte-fast simulate --trace -` (and /dev/stdin) must replay
    # the whole pipe, not 0 records
    import subprocess
    from support.cli import ROOT
    recs = ((np.arange(5000, dtype=np.uint64) % 1234) << np.uint64(2)).astype("<u8")
    path = tmp_path / "t.bin"
    path.write_bytes(recs.tobytes())
    env = dict(os.environ, PYTHONPATH=ROOT)
    for name in ("-", "/dev/stdin"):
        out = subprocess.run(f"cat {path} | {sys.executable} -m spte_fast simulate --json "
                             f"--trace {name}", shell=True, capture_output=True, env=env,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["accesses"] == doc["config"]["trace_records"] == 5000
        assert doc["results"]["fixed"] == 1234


def test_convert_stdin_to_stdout(tmp_path):
    import subprocess
    from support.cli import ROOT
    log = _write(tmp_path / "l.log.gz", LOG)
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-m", "spte_fast", "trace", "convert", "-", "-o",
                          "-"], input=log.read_bytes(), capture_output=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert np.frombuffer(out.stdout, dtype="<u8").tolist() == oracle_records(LOG)
    assert b"16 accesses -> 13 records" in out.stderr      # the summary is not the data


def test_convert_allow_partial_keeps_what_precedes_a_cut_line(tmp_path):
    text = LOG.replace("\n==4242== \n==4242== Counted 1 call to main()\n", "\n") + " L 0400"
    log = _write(tmp_path / "cut.log", text)
    out = tmp_path / "t.bin"
    line = run_cli("trace", "convert", log, "-o", out).error_line()
    assert "cut.log:19: not a lackey record: ' L 0400'" in line and "cut off" in line
    assert not out.exists()
    r = run_cli("trace", "convert", log, "-o", out, "--allow-partial")
    assert r.rc == 0, r.err
    assert _read_trace(out) == oracle_records(text[:text.rindex("\n") + 1])
    assert "warning" in r.out and "line 19" in r.out


def test_trace_info_counts_pages_regions_and_reuse(tmp_path):
    # pages 0..9 twice over, then page 1 << 18 (another 1G region): reuse interval 10 each
    pages = list(range(10)) * 2 + [1 << 18]
    path = tmp_path / "t.bin"
    path.write_bytes(np.array([p << 2 | (p % 3) for p in pages], dtype="<u8").tobytes())
    info = run_cli("trace", "info", path, "--json").json()
    assert info["records"] == 21 and info["distinct_pages"] == 11
    assert (info["distinct_2m"], info["distinct_1g"]) == (2, 2)
    assert info["lowest_address"] == 0 and info["highest_address"] == (1 << 30) + 0xfff
    assert info["reuse"]["retouch_fraction"] == pytest.approx(10 / 21)
    assert 10 <= info["reuse"]["median_interval"] <= 11
    text = run_cli("trace", "info", path).out
    assert "distinct   4K pages 11" in text and "47.62 % of accesses" in text


def _lackey_of_true(tmp_path):
    import shutil
    import subprocess
    if shutil.which("valgrind"):
        log = tmp_path / "true.log"
        subprocess.run(["valgrind", "--tool=lackey", "--trace-mem=yes",
                        f"--log-file={log}", "/bin/true"], check=True, timeout=300)
        return log
    return os.path.join(os.path.dirname(__file__), "data", "lackey_true.log.xz")


def test_lackey_log_of_bin_true(tmp_path):
    log = _lackey_of_true(tmp_path)
    info = run_cli("trace", "info", log, "--json").json()
    assert info["format"] == "lackey" and info["records"] > 10_000
    assert info["kinds"]["exec"] > 0 and info["kinds"]["write"] > 0
    pages = set()
    for recs in tr.iter_records(log):
        pages.update((recs >> np.uint64(2)).tolist())
    assert info["distinct_pages"] == len(pages)
    doc = run_cli("simulate", "--trace", log, "--json").json()
    assert doc["accesses"] == info["records"] and doc["results"]["fixed"] == len(pages)
