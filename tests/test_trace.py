"""The lackey converter and the binary trace format (spte_fast.sim.trace, `spte-fast trace`).

Every command-line path runs ``python -m spte_fast`` as a subprocess.  Expected records
come from a line-by-line oracle (tests/support/cli.py), not from the code under test.
"""
import gzip
import lzma
import os
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
