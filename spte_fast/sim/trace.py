"""Memory-access traces: the valgrind lackey converter and the binary trace reader.

``scan_trace`` reads a trace once, front to back (so it may come from a pipe): it
validates it, summarises what sizing a VM takes, and can spool the raw records to a plain
file that ``read_spool`` replays.

Binary trace format
-------------------
A file of little-endian ``uint64`` records and nothing else (no header)::

    record = (page_number << 2) | kind

``page_number`` is the 4 KiB page of the access (``address >> 12``); ``kind`` is

* 0 read  -- lackey ``L`` (load),
* 1 write -- lackey ``S`` (store) and ``M`` (modify: a read-modify-write, recorded as a write),
* 2 exec  -- lackey ``I`` (instruction fetch),
* 3 is invalid.

The kind doubles as ``Vcpu.fault_batch``'s access bits (bit 0 write, bit 1 exec), so a
decoded chunk is faulted as ``fault_batch(records >> 2, access=records & 3)``.  The length
of a file must be a multiple of 8.  Files are compressed by their name: ``.gz`` (gzip),
``.xz`` (xz/LZMA), anything else plain.  Everything here streams in bounded chunks: neither
a lackey log nor a trace is ever held in memory whole.

Converting a lackey log (``valgrind --tool=lackey --trace-mem=yes``)
--------------------------------------------------------------------
Records are the lines ``I  addr,size``, `` L addr,size``, `` S addr,size`` and
`` M addr,size`` (``addr`` hexadecimal, ``size`` decimal); valgrind's ``==pid==`` lines
and empty lines are skipped, and any other line is an error naming its line number.
Consecutive duplicate records are dropped.  With a TLB of N entries only the misses of a
FIFO TLB keyed by the record itself (page and kind: a read, a write and an instruction
fetch of one page are three entries, so the first write to a page that was only read is
kept) are written.
"""
import collections
import contextlib
import gzip
import lzma
import os
import stat
import tempfile
import zlib
from dataclasses import dataclass

import numpy as np

from .errors import TraceError

KIND_READ, KIND_WRITE, KIND_EXEC = 0, 1, 2
KIND_NAMES = ("read", "write", "exec")
CHUNK_RECORDS = 1 << 20          # records per chunk when reading a trace (8 MiB)
LACKEY_BLOCK = 4 << 20           # bytes of lackey text parsed at a time
MAX_LACKEY_LINE = 64 << 10       # longest line a lackey log may have (its records: < 40)
_PAGE_DIGITS = 13                # hex digits of an address above the 3 of the page offset


def open_compressed(path, mode):
    """Open ``path`` in binary ``mode`` ("rb"/"wb"), (de)compressing by its extension."""
    path = os.fspath(path)
    if path.endswith(".gz"):
        return gzip.open(path, mode)
    if path.endswith(".xz"):
        return lzma.open(path, mode)
    return open(path, mode)


# ---------------------------------------------------------------------------------------
# Reading binary traces
# ---------------------------------------------------------------------------------------

def iter_records(path, gfn_limit=None, chunk=CHUNK_RECORDS):
    """Yield the records of a trace as uint64 arrays of at most ``chunk`` records.

    Checks as it goes: a length that is not a multiple of 8, a record of kind 3 and (with
    ``gfn_limit``) a page number ``>= gfn_limit`` raise ``TraceError``.  ``path`` is opened
    once and read front to back, so it may be a FIFO.
    """
    done = 0
    with open_compressed(path, "rb") as f:
        while True:
            buf = _read_full(f, chunk * 8, path)
            if not buf:
                return
            if len(buf) % 8:
                raise TraceError(f"{path}: truncated trace: {done * 8 + len(buf)} bytes is "
                                 f"not a whole number of 8-byte records")
            recs = np.frombuffer(buf, dtype="<u8").astype(np.uint64, copy=False)
            bad = np.flatnonzero((recs & 3) == 3)
            if bad.size:
                raise TraceError(f"{path}: record {done + bad[0]}: unknown kind 3 "
                                 f"(value {int(recs[bad[0]]):#x})")
            if gfn_limit is not None:
                over = np.flatnonzero((recs >> 2) >= gfn_limit)
                if over.size:
                    raise TraceError(
                        f"{path}: record {done + over[0]}: page number "
                        f"{int(recs[over[0]] >> 2):#x} is beyond the address width "
                        f"(page < {gfn_limit:#x})")
            done += recs.size
            yield recs


def _read_full(f, n, path):
    """Read up to n bytes, looping over short reads (decompressors return less).

    A corrupt or cut compressed stream raises ``TraceError`` naming ``path``; an OSError
    of the read itself (``/proc/self/mem``: EIO) names ``path`` too."""
    parts, got = [], 0
    while got < n:
        try:
            b = f.read(n - got)
        except (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile) as e:
            raise TraceError(f"{path}: corrupt compressed data: {e}") from None
        except OSError as e:
            if e.filename is not None or not e.errno:
                raise
            raise OSError(e.errno, e.strerror, os.fspath(path)) from None
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


@dataclass
class TraceSummary:
    """What a pass over a trace found (all it takes to size a VM for it)."""
    records: int
    max_page: int                # -1 for an empty trace
    kinds: tuple                 # records per kind (read, write, exec)
    regions: tuple               # distinct 512^l-page regions touched, for l = 1, 2, ...


def scan_trace(path, gfn_limit, levels=4, chunk=CHUNK_RECORDS, spool=None, spool_limit=None):
    """Validate a whole trace and summarise it, reading it once (``regions``: ``levels`` entries).

    With ``spool`` (a binary file open for writing) the records are also written to it as
    they are read, raw little-endian ``uint64``: all of them, or the first ``spool_limit``.
    Reading back the spool (``read_spool``) then replays the trace without opening or
    decompressing ``path`` again.  Memory stays bounded by ``chunk`` records plus the
    distinct 2M regions (``RegionCounter``); time is linear in the records.
    """
    n, max_page = 0, -1
    kinds = np.zeros(4, dtype=np.int64)
    regions = RegionCounter(gfn_limit)
    left = spool_limit
    for recs in iter_records(path, gfn_limit, chunk):
        pages = recs >> 2
        n += recs.size
        max_page = max(max_page, int(pages.max()))
        kinds += np.bincount((recs & 3).astype(np.intp), minlength=4)
        regions.add(pages)
        if spool is not None and left != 0:
            keep = recs if left is None else recs[:left]
            spool.write(keep.astype("<u8", copy=False).data)
            if left is not None:
                left -= keep.size
    return TraceSummary(n, max_page, tuple(int(k) for k in kinds[:3]), regions.counts(levels))


def read_spool(f, chunk=CHUNK_RECORDS):
    """Yield the records ``scan_trace`` spooled to ``f``, from its start, ``chunk`` at a time.

    No checks: the records were validated on their way in.
    """
    f.flush()
    f.seek(0)
    while True:
        buf = f.read(chunk * 8)
        if not buf:
            return
        yield np.frombuffer(buf, dtype="<u8").astype(np.uint64, copy=False)


def _merge_distinct(a, b):
    """The sorted distinct union of two sorted distinct arrays, in linear time: the stable
    sort is a timsort, which merges two sorted runs in one pass."""
    m = np.concatenate((a, b))
    m.sort(kind="stable")
    return drop_duplicates(m)


class RegionCounter:
    """The distinct 2M regions (``page >> 9``) of a stream of page chunks, in linear time.

    Below ``BITMAP_REGIONS`` regions (a 4-level guest: gfn < 2**36, 2**27 regions) it is a
    bitmap, one bit per region: 16 MiB of zeros that the OS commits only where a region is
    set, set by one vectorised scatter per chunk.  Wider (5 levels: 2**36 regions, an 8 GiB
    bitmap) it keeps sorted runs of distinct regions merged like a binary counter -- a run
    per chunk, and two runs of equal rank merge (linearly) into one of the next rank -- so
    a region takes part in O(log chunks) merges instead of one per chunk, and memory is
    8 bytes per distinct region.
    """

    BITMAP_REGIONS = 1 << 27

    def __init__(self, gfn_limit):
        nregions = -(-gfn_limit // 512)
        self._bits = (np.zeros(-(-nregions // 8), dtype=np.uint8)
                      if nregions <= self.BITMAP_REGIONS else None)
        self._runs = []                                 # [(rank, sorted distinct uint64)]

    def add(self, pages):
        """Count the regions of ``pages`` (uint64 page numbers below ``gfn_limit``)."""
        r = drop_duplicates(np.asarray(pages, dtype=np.uint64) >> np.uint64(9))
        if self._bits is not None:
            np.bitwise_or.at(self._bits, r >> np.uint64(3),
                             np.left_shift(np.uint8(1), (r & np.uint64(7)).astype(np.uint8)))
            return
        run, rank = drop_duplicates(np.sort(r)), 0        # np.unique: the same, slower
        while self._runs and self._runs[-1][0] == rank:
            run, rank = _merge_distinct(self._runs.pop()[1], run), rank + 1
        self._runs.append((rank, run))

    def distinct(self):
        """The distinct regions seen so far, sorted (uint64)."""
        if self._bits is not None:
            nz = np.flatnonzero(self._bits)
            row, bit = np.nonzero(np.unpackbits(self._bits[nz][:, None], axis=1,
                                                bitorder="little"))
            return nz[row].astype(np.uint64) * np.uint64(8) + bit.astype(np.uint64)
        out = np.zeros(0, dtype=np.uint64)
        for _, run in reversed(self._runs):             # smallest first
            out = _merge_distinct(out, run)
        return out

    def counts(self, levels):
        """Distinct 512^l-page regions for l = 1 .. ``levels`` (2M, 1G, 512G, ...)."""
        r, out = self.distinct(), []
        for level in range(levels):
            s = r >> np.uint64(9 * level)               # still sorted
            out.append(int(s.size and 1 + np.count_nonzero(s[1:] != s[:-1])))
        return tuple(out)


# ---------------------------------------------------------------------------------------
# Converting lackey logs
# ---------------------------------------------------------------------------------------

def _byte_table(chars, values=None):
    t = np.zeros(256, dtype=np.uint8)
    for i, c in enumerate(chars.encode()):
        t[c] = 1 if values is None else values[i]
    return t


_IS_HEX = _byte_table("0123456789abcdefABCDEF")
_HEX_VALUE = _byte_table("0123456789abcdefABCDEF", list(range(16)) + list(range(10, 16)))
_IS_DEC = _byte_table("0123456789")
_DATA_KIND = _byte_table("LSM", [KIND_READ + 1, KIND_WRITE + 1, KIND_WRITE + 1])  # kind + 1


def parse_lackey(text, first_line=1, name="<lackey>"):
    """The records (uint64, before duplicate dropping) of complete lackey lines.

    ``text`` is bytes ending in a newline; ``first_line`` is the line number of its first
    line, for error messages.  Vectorised: no Python per line.
    """
    a = np.frombuffer(text, dtype=np.uint8)
    ends = np.flatnonzero(a == 10)                     # the newline ending each line
    starts = np.empty_like(ends)
    starts[:1] = 0
    starts[1:] = ends[:-1] + 1
    length = ends - starts
    first = a[starts]                                  # the newline itself when empty
    second = a[np.minimum(starts + 1, ends)]
    skip = (length == 0) | ((first == ord("=")) & (second == ord("=")))
    s, e = starts[~skip], ends[~skip]
    lines = np.flatnonzero(~skip)                      # index of each record line
    third = a[np.minimum(s + 2, e)]
    first, second = first[~skip], second[~skip]
    data_kind = _DATA_KIND[second]
    instr = (first == ord("I")) & (second == ord(" "))
    ok = (instr | ((first == ord(" ")) & (data_kind > 0))) & (third == ord(" ")) & (e - s >= 6)
    # Exactly one comma per line, with 1..16 hex digits before it and decimal after it.
    commas = np.flatnonzero(a == ord(","))
    ci = np.searchsorted(commas, s)
    ok &= np.searchsorted(commas, e) - ci == 1
    comma = commas[np.minimum(ci, commas.size - 1)] if commas.size else e
    bad_hex = np.zeros(a.size + 1, dtype=np.int32)      # prefix counts of non-hex bytes
    np.cumsum(_IS_HEX[a] ^ 1, out=bad_hex[1:])
    bad_dec = np.zeros(a.size + 1, dtype=np.int32)
    np.cumsum(_IS_DEC[a] ^ 1, out=bad_dec[1:])
    addr0 = s + 3
    comma = np.where(ok, comma, e)
    ok &= (comma - addr0 >= 1) & (comma - addr0 <= 16) & (e - comma >= 2)
    ok &= (bad_hex[comma] - bad_hex[np.minimum(addr0, comma)] == 0)
    ok &= (bad_dec[e] - bad_dec[np.minimum(comma + 1, e)] == 0)
    if not ok.all():
        i = int(np.flatnonzero(~ok)[0])
        line = bytes(a[s[i]:e[i]]).decode("utf-8", "replace")
        raise TraceError(f"{name}:{first_line + int(lines[i])}: not a lackey record: "
                         f"{line[:60]!r}")
    # page = the address's hex digits left of the last three, right-aligned, 13 at most.
    page = np.zeros(s.size, dtype=np.uint64)
    for k in range(_PAGE_DIGITS, 0, -1):
        pos = comma - 3 - k
        digit = _HEX_VALUE[a[np.maximum(pos, 0)]].astype(np.uint64)
        page = (page << np.uint64(4)) | np.where(pos >= addr0, digit, np.uint64(0))
    kind = np.where(instr, KIND_EXEC, data_kind.astype(np.int64) - 1).astype(np.uint64)
    return (page << np.uint64(2)) | kind


def drop_duplicates(recs, previous=None):
    """Drop records equal to the one before them (``previous``: the last of the last chunk)."""
    if recs.size == 0:
        return recs
    keep = np.empty(recs.size, dtype=bool)
    keep[0] = previous is None or recs[0] != previous
    np.not_equal(recs[1:], recs[:-1], out=keep[1:])
    return recs[keep]


class FifoTlb:
    """An N-entry FIFO TLB keyed by the record (page and kind); ``misses`` filters a chunk.

    A hit does not refresh an entry; a miss inserts it and evicts the oldest.  The state
    carries over from chunk to chunk.  This is inherently sequential: it runs in Python,
    over records that are already free of consecutive duplicates.
    """

    def __init__(self, entries):
        if entries < 1:
            raise ValueError("a TLB needs at least one entry")
        self.entries = entries
        self._fifo = collections.deque()
        self._present = set()

    def misses(self, recs):
        keep = np.zeros(recs.size, dtype=bool)
        fifo, present, n = self._fifo, self._present, self.entries
        for i, r in enumerate(recs.tolist()):
            if r in present:
                continue
            keep[i] = True
            present.add(r)
            fifo.append(r)
            if len(fifo) > n:
                present.discard(fifo.popleft())
        return recs[keep]


@dataclass
class ConvertStats:
    lines: int = 0               # lines read
    accesses: int = 0            # lackey records parsed
    records: int = 0             # records written
    bytes_out: int = 0           # uncompressed bytes written


def convert_lackey(src, dst, tlb=None, block=LACKEY_BLOCK):
    """Convert the lackey log ``src`` into the binary trace ``dst`` (streaming).

    ``tlb``: None, or the entries of a FIFO TLB whose misses alone are kept.
    Returns a ``ConvertStats``.  Raises ``TraceError`` on an unparsable line or a line
    longer than ``MAX_LACKEY_LINE``.  ``dst`` is written as ``output_file`` writes: it
    never holds a partial trace, and a failure (also an interrupt) leaves it as it was.
    """
    fifo = FifoTlb(tlb) if tlb is not None else None
    with open_compressed(src, "rb") as fin:
        with output_file(dst) as fout:
            return _convert_lackey(fin, fout, fifo, block, src)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def output_file(dst):
    """A binary file to write ``dst`` through, compressed by its name (``.gz``, ``.xz``).

    A regular file (or a new one) is written as a temporary file beside it (beside the
    file a symbolic link names), renamed over ``dst`` when the block succeeds, and removed
    when it fails: ``dst`` is either what it was or the whole new content, and nothing
    that this function did not create is ever removed.  Anything else that exists (a
    device such as ``/dev/null``, a FIFO) is opened and written in place, never replaced
    or removed.  The new file gets the old one's permission bits, else 0666 less umask.
    """
    dst = os.fspath(dst)
    try:
        st = os.stat(dst)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        with open_compressed(dst, "wb") as f:
            yield f
        return
    target = os.path.realpath(dst)
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target),
                                   prefix=f".{os.path.basename(target)}.", suffix=".part")
    except OSError as e:
        raise OSError(e.errno, e.strerror, dst) from None
    try:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask())
        with open(fd, "wb") as raw:
            if target.endswith(".gz"):
                f = gzip.GzipFile(filename=os.path.basename(target), mode="wb", fileobj=raw)
            elif target.endswith(".xz"):
                f = lzma.LZMAFile(raw, "wb")
            else:
                f = contextlib.nullcontext(raw)
            with f as out:
                yield out
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _convert_lackey(fin, fout, fifo, block, src):
    stats = ConvertStats()
    previous, carry = None, b""
    while True:
        buf = _read_full(fin, block, src)
        text = carry + buf
        if not buf:                                # end of file: the last line
            if not text:
                break
            text, carry = text + (b"" if text.endswith(b"\n") else b"\n"), b""
        else:
            cut = text.rfind(b"\n") + 1
            text, carry = text[:cut], text[cut:]
            if len(carry) > MAX_LACKEY_LINE:        # memory stays bounded by the block
                lineno = stats.lines + text.count(b"\n") + 1
                raise TraceError(f"{os.fspath(src)}:{lineno}: a line longer than "
                                 f"{MAX_LACKEY_LINE:,} bytes: not a lackey log")
            if not text:
                continue
        recs = parse_lackey(text, stats.lines + 1, os.fspath(src))
        stats.lines += text.count(b"\n")
        stats.accesses += recs.size
        recs = drop_duplicates(recs, previous)
        if recs.size:
            previous = recs[-1]
        if fifo is not None:
            recs = fifo.misses(recs)
        out = recs.astype("<u8", copy=False).tobytes()
        fout.write(out)
        stats.records += recs.size
        stats.bytes_out += len(out)
        if not buf:
            break
    return stats
