"""Memory-access traces: reading them (any format), the binary trace format, converting.

Readers for every input format -- spte-fast's binary records, valgrind lackey logs, Pin
pinatrace text, ChampSim traces; gzip or xz; ``-`` for stdin -- are in
``spte_fast.sim.readers`` (``open_trace``).  ``scan_trace`` reads a trace once, front to
back (so it may come from a pipe): it validates it, summarises what sizing a VM takes, and
can spool the records to a plain file that ``read_spool`` replays.  ``convert`` writes any
trace as a compact binary one.

Binary trace format
-------------------
A file of little-endian ``uint64`` records and nothing else (no header)::

    record = (page_number << 2) | kind

``page_number`` is the 4 KiB page of the access (``address >> 12``); ``kind`` is

* 0 read  -- lackey ``L`` (load), pinatrace ``R``, a ChampSim source operand,
* 1 write -- lackey ``S`` (store), pinatrace ``W``, a ChampSim destination operand,
* 2 exec  -- lackey ``I`` (instruction fetch), a ChampSim instruction's ``ip``,
* 3 is invalid.

A lackey ``M`` (modify) is a load and a store: a read record, then a write record.  The
kind doubles as ``Vcpu.fault_batch``'s access bits (bit 0 write, bit 1 exec), so a decoded
chunk is faulted as ``fault_batch(records >> 2, access=records & 3)``.  The length of a
file must be a multiple of 8.  Compression is recognised by the magic numbers when reading
and chosen by the name when writing: ``.gz`` (gzip), ``.xz`` (xz/LZMA), anything else
plain.  Everything streams in bounded chunks: no input is ever held in memory whole.

Converting (``spte-fast trace convert``)
----------------------------------------
Any input format (detected by content, or ``--trace-format``) from a file or stdin (``-``)
to a binary trace in a file or on stdout (``-o -``, uncompressed).  Lackey records are the
lines ``I  addr,size``, `` L addr,size``, `` S addr,size`` and `` M addr,size`` (``addr``
hexadecimal, ``size`` decimal); valgrind's ``==pid==`` lines and empty lines are skipped,
and any other line is an error naming its line number.  Consecutive duplicate records are
dropped.  With a TLB of N entries only the misses of a FIFO TLB keyed by the record itself
(page and kind: a read, a write and an instruction fetch of one page are three entries, so
the first write to a page that was only read is kept) are written.  ``--allow-partial``
keeps what precedes a cut-off end (a last line without its newline that does not parse, a
compressed stream without its end marker, a last partial binary record).
"""
import collections
import contextlib
import gzip
import lzma
import os
import stat
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from . import readers as _readers
from .errors import TraceError
from .readers import KIND_EXEC, KIND_READ, KIND_WRITE, open_trace  # noqa: F401

KIND_NAMES = ("read", "write", "exec")
CHUNK_RECORDS = _readers.CHUNK_RECORDS     # records per chunk when reading a trace (8 MiB)
LACKEY_BLOCK = _readers.TEXT_BLOCK         # bytes of text parsed at a time
MAX_LACKEY_LINE = _readers.MAX_LINE        # longest line a text trace may have
MAX_GFN_5LEVEL = 1 << 45


def open_compressed(path, mode):
    """Open ``path`` in binary ``mode`` ("rb"/"wb"), (de)compressing by its extension."""
    path = os.fspath(path)
    if path.endswith(".gz"):
        return gzip.open(path, mode)
    if path.endswith(".xz"):
        return lzma.open(path, mode)
    return open(path, mode)


# ---------------------------------------------------------------------------------------
# Reading traces
# ---------------------------------------------------------------------------------------

def _reader(source, format=None, allow_partial=False, chunk=CHUNK_RECORDS):
    """(reader, close?) of a path or an open ``TraceReader``."""
    if isinstance(source, _readers.TraceReader):
        return source, False
    return open_trace(source, format, allow_partial, chunk), True


def check_width(recs, done, gfn_limit, name):
    """Raise ``TraceError`` for the first record whose page is ``>= gfn_limit`` (the
    address width of the root), saying what would make it fit."""
    over = np.flatnonzero((recs >> np.uint64(2)) >= np.uint64(gfn_limit))
    if not over.size:
        return
    page = int(recs[over[0]] >> np.uint64(2))
    if gfn_limit < MAX_GFN_5LEVEL and page < MAX_GFN_5LEVEL:
        hint = "; --root-level 5 gives the guest 57-bit physical addresses"
    elif page >= MAX_GFN_5LEVEL:
        hint = ("; no x86 guest-physical address is that high: it looks guest-virtual, and "
                "guest paging (which would translate it) is not modelled yet")
    else:
        hint = ""
    raise TraceError(f"{name}: record {done + int(over[0])}: page number {page:#x} is "
                     f"beyond the address width (page < {gfn_limit:#x}, address "
                     f"{page << 12:#x}){hint}")


def iter_records(path, gfn_limit=None, chunk=CHUNK_RECORDS, format=None,
                 allow_partial=False):
    """Yield the records of a trace (any format) as uint64 arrays of at most ``chunk``.

    Checks as it goes: a malformed input (a binary length that is not a multiple of 8, a
    record of kind 3, a line that does not parse) and (with ``gfn_limit``) a page number
    ``>= gfn_limit`` raise ``TraceError``.  ``path`` is opened once and read front to
    back, so it may be a FIFO (or ``-``, stdin).
    """
    with open_trace(path, format, allow_partial, chunk) as reader:
        done = 0
        for recs in reader:
            if gfn_limit is not None:
                check_width(recs, done, gfn_limit, reader.name)
            done += recs.size
            yield recs


@dataclass
class TraceSummary:
    """What a pass over a trace found (all it takes to size a VM for it)."""
    records: int
    max_page: int                # -1 for an empty trace
    kinds: tuple                 # records per kind (read, write, exec)
    regions: tuple               # distinct 512^l-page regions touched, for l = 1, 2, ...
    format: str = "binary"       # the input format (readers.FORMATS)
    units: int = 0               # input units read: lines, records or instructions
    unit: str = "records"
    partial: str = None          # what --allow-partial dropped at the end, or None
    name: str = ""


def scan_trace(path, gfn_limit, levels=4, chunk=CHUNK_RECORDS, spool=None, spool_limit=None,
               format=None, allow_partial=False):
    """Validate a whole trace and summarise it, reading it once (``regions``: ``levels`` entries).

    ``path``: a path (``-``: stdin) or an open ``readers.TraceReader``.  With ``spool`` (a
    binary file open for writing) the records are also written to it as they are read, raw
    little-endian ``uint64``: all of them, or the first ``spool_limit``.  Reading back the
    spool (``read_spool``) then replays the trace without opening or decompressing ``path``
    again.  Memory stays bounded by ``chunk`` records plus the distinct 2M regions
    (``RegionCounter``); time is linear in the records.
    """
    reader, close = _reader(path, format, allow_partial, chunk)
    try:
        n, max_page = 0, -1
        kinds = np.zeros(4, dtype=np.int64)
        regions = RegionCounter(gfn_limit)
        left = spool_limit
        for recs in reader:
            check_width(recs, n, gfn_limit, reader.name)
            pages = recs >> np.uint64(2)
            n += recs.size
            max_page = max(max_page, int(pages.max()))
            kinds += np.bincount((recs & np.uint64(3)).astype(np.intp), minlength=4)
            regions.add(pages)
            if spool is not None and left != 0:
                keep = recs if left is None else recs[:left]
                spool.write(keep.astype("<u8", copy=False).data)
                if left is not None:
                    left -= keep.size
    finally:
        if close:
            reader.close()
    return TraceSummary(n, max_page, tuple(int(k) for k in kinds[:3]), regions.counts(levels),
                        format=reader.format, units=reader.units, unit=reader.unit,
                        partial=reader.partial, name=reader.name)


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
# Converting
# ---------------------------------------------------------------------------------------

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
    lines: int = 0               # input units read (lines of a text trace, else records)
    accesses: int = 0            # records read
    records: int = 0             # records written
    bytes_out: int = 0           # uncompressed bytes written
    format: str = ""             # the input format
    unit: str = "lines"          # what ``lines`` counts: lines, records or instructions
    partial: str = None          # what --allow-partial dropped at the end, or None


def convert_lackey(src, dst, tlb=None, block=LACKEY_BLOCK, allow_partial=False):
    """Convert the lackey log ``src`` into the binary trace ``dst`` (``convert`` with the
    format forced to lackey; ``block``: bytes of text parsed at a time)."""
    with open_trace(src, "lackey", allow_partial) as reader:
        reader.block = block
        with output_file(dst) as fout:
            return convert(reader, fout, tlb)


def convert(reader, fout, tlb=None, progress=None):
    """Write the records of ``reader`` (a ``readers.TraceReader``) to the binary file
    ``fout``, consecutive duplicates dropped, only the misses of an N-entry FIFO TLB with
    ``tlb``.  ``progress(raw_bytes_so_far)`` is called per chunk.  Returns a
    ``ConvertStats``; raises ``TraceError`` on malformed input."""
    fifo = FifoTlb(tlb) if tlb is not None else None
    stats = ConvertStats(format=reader.format, unit=reader.unit)
    previous = None
    for recs in reader:
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
        if progress is not None:
            progress(reader.raw_bytes())
    stats.lines = reader.units
    stats.partial = reader.partial
    return stats


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def output_file(dst):
    """A binary file to write ``dst`` through, compressed by its name (``.gz``, ``.xz``);
    ``-`` is standard output (never compressed).

    A regular file (or a new one) is written as a temporary file beside it (beside the
    file a symbolic link names), renamed over ``dst`` when the block succeeds, and removed
    when it fails: ``dst`` is either what it was or the whole new content, and nothing
    that this function did not create is ever removed.  Anything else that exists (a
    device such as ``/dev/null``, a FIFO) is opened and written in place, never replaced
    or removed.  The new file gets the old one's permission bits, else 0666 less umask.
    """
    dst = os.fspath(dst)
    if dst == "-":                              # standard output, uncompressed
        out = sys.stdout.buffer
        yield out
        out.flush()
        return
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
