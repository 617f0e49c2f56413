"""Trace readers: every format ``spte-fast`` reads, streamed in bounded chunks.

``open_trace(path, format=None)`` opens a file (``-``: standard input), recognises gzip and
xz by their magic numbers, recognises the format by the content (or takes ``format``) and
returns a ``TraceReader``: iterating it yields uint64 arrays of spte-fast records
``(page_number << 2) | kind`` (kind 0 read, 1 write, 2 exec), at most ``chunk`` at a time,
whatever the input format.  The input is read once, front to back, so a pipe works; memory
stays bounded by one block of input however long the trace is.

Formats
-------
binary     spte-fast's own records: little-endian uint64 ``(page << 2) | kind``, no header.
lackey     a ``valgrind --tool=lackey --trace-mem=yes`` log: ``I  addr,size`` (fetch),
           `` L addr,size`` (load), `` S addr,size`` (store), `` M addr,size`` (modify:
           a load then a store, two records); ``==pid==`` lines and empty lines skipped.
pinatrace  Pin's ManualExamples/pinatrace.cpp output: ``ip: R addr`` (read) and
           ``ip: W addr`` (write), hexadecimal with or without ``0x``, ending in the line
           ``#eof``; ``#`` lines and empty lines skipped.  The ``ip`` is not replayed (the
           tool records data accesses only).
champsim   ChampSim traces: 64-byte ``input_instr`` records (u64 ip; u8 is_branch,
           branch_taken; u8 destination_registers[2], source_registers[4]; u64
           destination_memory[2], source_memory[4]; little-endian).  Each instruction
           is a fetch of ``ip``, then a load of each nonzero ``source_memory``, then a store
           to each nonzero ``destination_memory``, in that order.

Any of them may be gzip- or xz-compressed (recognised by the magic numbers, not the name).
Detection: gzip/xz by magic; then text whose lines look like lackey records or valgrind
``==pid==`` banners is lackey, text of ``ip: R|W addr`` lines (or ``#eof``) is pinatrace;
binary input is ChampSim when its first 64-byte records are plausible instructions
(``ip`` nonzero, ``is_branch`` and ``branch_taken`` 0 or 1, addresses below 2**57) and a
quarter of its words or more are zero (empty memory operands), else spte-fast records.
Anything else is an error naming the formats known; ``format=`` forces one.

A cut-off end -- a last line without its newline that does not parse (valgrind or Pin
killed), a binary trace whose length is not a whole number of records, a compressed
stream without its end marker, a pinatrace without ``#eof`` -- is an error naming the place,
unless ``allow_partial``: then what precedes it is kept and ``reader.partial`` says what
was dropped.
"""
import gzip
import lzma
import os
import re
import stat
import sys
import zlib

import numpy as np

from .errors import TraceError

FORMATS = {
    "binary": "spte-fast records: little-endian uint64 (page << 2) | kind",
    "lackey": "valgrind --tool=lackey --trace-mem=yes log",
    "pinatrace": "Pin pinatrace text: 'ip: R addr' / 'ip: W addr', '#eof'",
    "champsim": "ChampSim trace: 64-byte input_instr records",
}
KIND_READ, KIND_WRITE, KIND_EXEC = 0, 1, 2
CHUNK_RECORDS = 1 << 20          # records per chunk (8 MiB)
TEXT_BLOCK = 4 << 20             # bytes of text parsed at a time
MAX_LINE = 64 << 10              # the longest line a text trace may have (records: < 40)
HEAD_BYTES = 64 << 10            # what detection looks at
CHAMPSIM_RECORD = 64
CHAMPSIM_DTYPE = np.dtype([("ip", "<u8"), ("is_branch", "u1"), ("branch_taken", "u1"),
                           ("destination_registers", "u1", 2),
                           ("source_registers", "u1", 4),
                           ("destination_memory", "<u8", 2), ("source_memory", "<u8", 4)])
assert CHAMPSIM_DTYPE.itemsize == CHAMPSIM_RECORD
_PAGE_DIGITS = 13                # hex digits of an address above the 3 of the page offset
_GZIP_MAGIC, _XZ_MAGIC = b"\x1f\x8b", b"\xfd7zXZ\x00"
_KNOWN = ("binary, lackey, pinatrace, champsim (any of them gzip- or xz-compressed); "
          "--trace-format forces one")


def display_name(path):
    return "<stdin>" if os.fspath(path) == "-" else os.fspath(path)


# ---------------------------------------------------------------------------------------
# Byte streams: a raw file or stdin, a peeked head put back in front, decompression
# ---------------------------------------------------------------------------------------

class _Stream:
    """A binary reader that returns ``head`` first, then the rest of ``f``; counts the
    bytes it took from ``f`` (``raw_bytes``) when it is the raw input."""

    def __init__(self, f, head=b""):
        self._f, self._head, self.raw_bytes = f, head, 0

    def read(self, n=-1):
        if self._head:
            if n < 0 or n >= len(self._head):
                out, self._head = self._head, b""
                if n >= 0:
                    n -= len(out)
                if n:
                    out += self._read(n)
                return out
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._read(n)

    def _read(self, n):
        b = self._f.read(n)
        self.raw_bytes += len(b)
        return b

    def readable(self):
        return True


def read_full(f, n, name, allow_partial=False, on_cut=None):
    """Read up to n bytes, looping over short reads (decompressors return less).

    A corrupt or cut compressed stream raises ``TraceError`` naming ``name``; with
    ``allow_partial`` a stream cut before its end marker ends there (``on_cut(message)``
    is called).  An OSError of the read itself names ``name`` too."""
    parts, got = [], 0
    while got < n:
        try:
            b = f.read(n - got)
        except EOFError as e:
            if allow_partial:
                if on_cut:
                    on_cut(f"the compressed stream is cut off ({e})")
                break
            raise TraceError(f"{name}: corrupt compressed data: {e} (cut off? "
                             f"--allow-partial keeps what precedes the cut)") from None
        except (lzma.LZMAError, zlib.error, gzip.BadGzipFile) as e:
            raise TraceError(f"{name}: corrupt compressed data: {e}") from None
        except OSError as e:
            if e.filename is not None or not e.errno:
                raise
            raise OSError(e.errno, e.strerror, name) from None
        if not b:
            break
        parts.append(b)
        got += len(b)
    return b"".join(parts)


def _open_raw(path):
    """(file, size or None, close?) of ``path``; ``-`` is standard input."""
    if os.fspath(path) == "-":
        f = sys.stdin.buffer
        try:
            st = os.fstat(f.fileno())
            size = st.st_size if stat.S_ISREG(st.st_mode) else None
        except (OSError, ValueError):
            size = None
        return f, size, False
    f = open(path, "rb")
    try:
        st = os.fstat(f.fileno())
    except OSError:
        f.close()
        raise
    if stat.S_ISDIR(st.st_mode):
        f.close()
        raise TraceError(f"{display_name(path)}: is a directory")
    return f, (st.st_size if stat.S_ISREG(st.st_mode) else None), True


# ---------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------

_LACKEY_START = re.compile(rb"^(I  | [LSM] )[0-9a-fA-F]")
_PIN_START = re.compile(rb"^(0[xX])?[0-9a-fA-F]+: [RW] ")
_BANNER = re.compile(rb"^==\d+==")
_TEXT_BYTES = np.zeros(256, dtype=bool)
_TEXT_BYTES[[9, 10, 13] + list(range(32, 127))] = True


def _champsim_problem(head):
    """Why ``head`` is not the start of a ChampSim trace, or None."""
    n = len(head) // CHAMPSIM_RECORD
    if n == 0:
        return "shorter than one 64-byte record"
    r = np.frombuffer(head[:n * CHAMPSIM_RECORD], dtype=CHAMPSIM_DTYPE)
    mem = np.concatenate([r["destination_memory"].ravel(), r["source_memory"].ravel()])
    if (r["ip"] == 0).any():
        return "an instruction with ip 0"
    if (r["is_branch"] > 1).any() or (r["branch_taken"] > 1).any():
        return "is_branch / branch_taken not 0 or 1"
    if (mem >= 1 << 57).any():
        return "a memory operand beyond 57 bits"
    return None


def _binary_problem(head):
    w = np.frombuffer(head[:len(head) // 8 * 8], dtype="<u8")
    bad = np.flatnonzero((w & 3) == 3)
    if bad.size:
        return f"record {int(bad[0])}: unknown kind 3 (value {int(w[bad[0]]):#x})"
    return None


def detect(head, name, at_eof):
    """The format of a trace whose (decompressed) first bytes are ``head``."""
    if not head:
        raise TraceError(f"{name}: empty trace")
    a = np.frombuffer(head, dtype=np.uint8)
    if _TEXT_BYTES[a].all():
        lines = head.split(b"\n")
        if not at_eof and len(lines) > 1:
            lines = lines[:-1]                      # the last one may be cut by the peek
        shown = None
        for line in lines[:1000]:
            line = line.rstrip(b"\r")
            if _BANNER.match(line) or _LACKEY_START.match(line):
                return "lackey"
            if _PIN_START.match(line) or line.strip() == b"#eof":
                return "pinatrace"
            if line.strip() and not line.startswith(b"#") and shown is None:
                shown = line
        what = (f"first line {shown[:60].decode('ascii', 'replace')!r}" if shown is not None
                else "no record lines")
        raise TraceError(f"{name}: text that is no trace format spte-fast knows ({what}); "
                         f"known: {_KNOWN}")
    if len(head) >= CHAMPSIM_RECORD and not a.any():
        raise TraceError(f"{name}: starts with {len(head):,} zero bytes: no trace format "
                         f"spte-fast knows; known: {_KNOWN}")
    champ, binary = _champsim_problem(head), _binary_problem(head)
    if champ is None and binary is not None:
        return "champsim"
    if champ is None and binary is None:
        w = np.frombuffer(head[:len(head) // 8 * 8], dtype="<u8")
        return "champsim" if 4 * np.count_nonzero(w == 0) >= w.size else "binary"
    if binary is None:
        return "binary"
    raise TraceError(f"{name}: no trace format spte-fast knows (as spte-fast records: "
                     f"{binary}; as ChampSim: {champ}); known: {_KNOWN}")


# ---------------------------------------------------------------------------------------
# The reader
# ---------------------------------------------------------------------------------------

def open_trace(path, format=None, allow_partial=False, chunk=CHUNK_RECORDS):
    """A ``TraceReader`` over ``path`` (``-`` for stdin); close it (or use ``with``)."""
    if format is not None and format not in FORMATS:
        raise TraceError(f"unknown trace format {format!r} (one of {', '.join(FORMATS)})")
    return TraceReader(path, format, allow_partial, chunk)


class TraceReader:
    """Iterate for record chunks (uint64).  Attributes, complete once iterated:

    ``format``, ``compression`` (None, ``gzip``, ``xz``), ``name``; ``units`` input
    units read (``unit``: lines, records or instructions); ``records`` records yielded;
    ``partial`` None, or what ``allow_partial`` dropped at the end; ``size`` the input's
    bytes when it is a regular file; ``raw_bytes()`` input bytes consumed so far.
    """

    def __init__(self, path, format, allow_partial, chunk):
        self.name = display_name(path)
        self.allow_partial = allow_partial
        self.chunk = chunk
        self.block = TEXT_BLOCK
        self.partial = None
        self.units = self.records = 0
        raw, self.size, self._close = _open_raw(path)
        self._raw_file = raw
        try:
            head = read_full(raw, 6, self.name)
            self._raw = _Stream(raw, head)
            self._raw.raw_bytes = len(head)
            # The magic numbers decide; a name ending in .gz or .xz insists (so data that
            # is not what the name says is corrupt compressed data).
            low = self.name.lower()
            self.compression = ("gzip" if low.endswith(".gz") or head[:2] == _GZIP_MAGIC
                                else "xz" if low.endswith(".xz") or head[:6] == _XZ_MAGIC
                                else None)
            if self.compression == "gzip":
                data = gzip.GzipFile(fileobj=self._raw, mode="rb")
            elif self.compression == "xz":
                data = lzma.LZMAFile(self._raw, "rb")
            else:
                data = self._raw
            head = read_full(data, HEAD_BYTES, self.name, allow_partial, self._cut)
            at_eof = len(head) < HEAD_BYTES
            self.format = format or detect(head, self.name, at_eof)
            self._data = _Stream(data, head)
        except BaseException:
            self.close()
            raise
        self.unit = {"binary": "records", "champsim": "instructions"}.get(self.format, "lines")

    def _cut(self, message):
        self.partial = message

    def raw_bytes(self):
        return self._raw.raw_bytes

    def close(self):
        f, self._raw_file = self._raw_file, None
        if f is not None and self._close:
            f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __iter__(self):
        gen = {"binary": self._binary, "champsim": self._champsim,
               "lackey": self._lackey, "pinatrace": self._pinatrace}[self.format]
        for recs in gen():
            if recs.size:
                self.records += recs.size
                yield recs

    def _read(self, n):
        return read_full(self._data, n, self.name, self.allow_partial, self._cut)

    # -- binary formats -------------------------------------------------------------------

    def _fixed(self, size, what):
        """Yield whole ``size``-byte records as bytes, a chunk at a time."""
        per = max(1, self.chunk * 8 // size)
        while True:
            buf = self._read(per * size)
            if not buf:
                return
            if len(buf) % size:                     # a short read: the end of the input
                cut = len(buf) % size
                total = self.units * size + len(buf)
                if not self.allow_partial:
                    raise TraceError(
                        f"{self.name}: truncated trace: {total} bytes is not a whole number "
                        f"of {size}-byte {what} (cut off? --allow-partial keeps the whole "
                        f"{what} before the cut)")
                self.partial = f"{cut} bytes after the last whole {size}-byte record"
                buf = buf[:-cut]
            self.units += len(buf) // size
            yield buf

    def _binary(self):
        done = 0
        for buf in self._fixed(8, "records"):
            recs = np.frombuffer(buf, dtype="<u8").astype(np.uint64, copy=False)
            bad = np.flatnonzero((recs & 3) == 3)
            if bad.size:
                raise TraceError(f"{self.name}: record {done + bad[0]}: unknown kind 3 "
                                 f"(value {int(recs[bad[0]]):#x})")
            done += recs.size
            yield recs

    def _champsim(self):
        for buf in self._fixed(CHAMPSIM_RECORD, "instructions"):
            yield champsim_records(np.frombuffer(buf, dtype=CHAMPSIM_DTYPE))

    # -- text formats ---------------------------------------------------------------------

    def _lines(self):
        """Yield (text of whole lines ending in newline, number of its first line, last):
        ``last`` when it is the end.  A last line without a newline is passed on with
        one appended; ``self._unterminated`` says so."""
        carry, lineno = b"", 1
        self._unterminated = False
        while True:
            buf = self._read(self.block)
            text = carry + buf
            if not buf:
                if text:
                    self._unterminated = not text.endswith(b"\n")
                    yield text + (b"\n" if self._unterminated else b""), lineno, True
                return
            cut = text.rfind(b"\n") + 1
            text, carry = text[:cut], text[cut:]
            if len(carry) > MAX_LINE:               # memory stays bounded by the block
                where = lineno + text.count(b"\n")
                raise TraceError(f"{self.name}:{where}: a line longer than {MAX_LINE:,} "
                                 f"bytes: not a {self.format} trace")
            if text:
                yield text, lineno, False
                lineno += text.count(b"\n")

    def _parse_text(self, parse):
        for text, lineno, last in self._lines():
            n = text.count(b"\n")
            try:
                recs = parse(text, lineno, self.name)
            except _BadLine as e:
                if not (last and self._unterminated and e.index == n - 1):
                    raise TraceError(e.message) from None
                if not self.allow_partial:
                    raise TraceError(f"{e.message}: the last line is cut off (no newline); "
                                     f"--allow-partial keeps what precedes it") from None
                self.partial = f"line {lineno + n - 1}, cut off"
                cut = text.rfind(b"\n", 0, len(text) - 1) + 1
                text, n = text[:cut], n - 1
                recs = parse(text, lineno, self.name) if text else _EMPTY
            self.units += n
            yield recs

    def _lackey(self):
        return self._parse_text(parse_lackey)

    def _pinatrace(self):
        self._eof_line = None
        for recs in self._parse_text(self._parse_pin):
            yield recs
        if self._eof_line is None:
            if not self.allow_partial:
                raise TraceError(f"{self.name}: no '#eof' line at the end: the trace is cut "
                                 f"off (Pin did not finish); --allow-partial keeps what it has")
            self.partial = self.partial or "no '#eof' line at the end"

    def _parse_pin(self, text, first_line, name):
        if self._eof_line is not None:
            if text.strip():
                raise TraceError(f"{name}: text after the '#eof' line "
                                 f"(line {self._eof_line})")
            return _EMPTY
        m = re.search(rb"(?m)^#eof\r?$", text)
        if m:
            self._eof_line = first_line + text.count(b"\n", 0, m.start())
            rest, text = text[m.end():], text[:m.start()]
            if rest.strip():
                raise TraceError(f"{name}: text after the '#eof' line "
                                 f"(line {self._eof_line})")
        return parse_pinatrace(text, first_line, name) if text else _EMPTY


_EMPTY = np.zeros(0, dtype=np.uint64)


class _BadLine(Exception):
    def __init__(self, message, index):
        self.message, self.index = message, index


# ---------------------------------------------------------------------------------------
# Vectorised parsers (no Python per line or record)
# ---------------------------------------------------------------------------------------

def champsim_records(r):
    """The records of ChampSim ``input_instr`` rows, in program order: per instruction
    the fetch of ``ip``, its loads (nonzero ``source_memory``), its stores (nonzero
    ``destination_memory``)."""
    kinds = np.array([KIND_EXEC] + [KIND_READ] * 4 + [KIND_WRITE] * 2, dtype=np.uint64)
    addr = np.empty((r.size, 7), dtype=np.uint64)
    addr[:, 0] = r["ip"]
    addr[:, 1:5] = r["source_memory"]
    addr[:, 5:7] = r["destination_memory"]
    keep = addr != 0
    keep[:, 0] = True
    recs = ((addr >> np.uint64(12)) << np.uint64(2)) | kinds
    return recs[keep]


def _byte_table(chars, values=None):
    t = np.zeros(256, dtype=np.uint8)
    for i, c in enumerate(chars.encode()):
        t[c] = 1 if values is None else values[i]
    return t


_IS_HEX = _byte_table("0123456789abcdefABCDEF")
_HEX_VALUE = _byte_table("0123456789abcdefABCDEF", list(range(16)) + list(range(10, 16)))
_IS_DEC = _byte_table("0123456789")
_DATA_KIND = _byte_table("LSM", [KIND_READ + 1, KIND_WRITE + 1, 3 + 1])   # kind + 1; M: 3


def _lines_of(a):
    ends = np.flatnonzero(a == 10)                      # the newline ending each line
    starts = np.empty_like(ends)
    starts[:1] = 0
    starts[1:] = ends[:-1] + 1
    return starts, ends


def _prefix_bad(a, table):
    """Prefix counts of bytes that are not in ``table``."""
    out = np.zeros(a.size + 1, dtype=np.int32)
    np.cumsum(table[a] ^ 1, out=out[1:])
    return out


def _hex_pages(a, begin, end):
    """Page numbers of the hex numbers a[begin:end] (1..16 digits): the digits left of the
    last three, right-aligned."""
    page = np.zeros(begin.size, dtype=np.uint64)
    for k in range(_PAGE_DIGITS, 0, -1):
        pos = end - 3 - k
        digit = _HEX_VALUE[a[np.maximum(pos, 0)]].astype(np.uint64)
        page = (page << np.uint64(4)) | np.where(pos >= begin, digit, np.uint64(0))
    return page


def _fail(a, s, e, lines, ok, first_line, name, what):
    i = int(np.flatnonzero(~ok)[0])
    line = bytes(a[s[i]:e[i]]).decode("utf-8", "replace")
    raise _BadLine(f"{name}:{first_line + int(lines[i])}: not a {what}: {line[:60]!r}",
                   int(lines[i]))


def parse_lackey(text, first_line=1, name="<lackey>"):
    """The records of complete lackey lines (``text``: bytes ending in a newline;
    ``first_line``: the number of its first line, for errors).  An ``M`` line is two
    records, a read and a write of its page.  A bad line raises ``_BadLine``."""
    a = np.frombuffer(text, dtype=np.uint8)
    starts, ends = _lines_of(a)
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
    bad_hex, bad_dec = _prefix_bad(a, _IS_HEX), _prefix_bad(a, _IS_DEC)
    addr0 = s + 3
    comma = np.where(ok, comma, e)
    ok &= (comma - addr0 >= 1) & (comma - addr0 <= 16) & (e - comma >= 2)
    ok &= (bad_hex[comma] - bad_hex[np.minimum(addr0, comma)] == 0)
    ok &= (bad_dec[e] - bad_dec[np.minimum(comma + 1, e)] == 0)
    if not ok.all():
        _fail(a, s, e, lines, ok, first_line, name, "lackey record")
    page = _hex_pages(a, addr0, comma)
    kind = np.where(instr, KIND_EXEC, data_kind.astype(np.int64) - 1).astype(np.uint64)
    modify = kind == 3
    if modify.any():                                   # M: a read, then a write
        page = np.repeat(page, 1 + modify)
        kind = np.repeat(kind, 1 + modify)
        first_of = np.flatnonzero(kind == 3)
        kind[first_of[::2]] = KIND_READ
        kind[first_of[1::2]] = KIND_WRITE
    return (page << np.uint64(2)) | kind


def parse_pinatrace(text, first_line=1, name="<pinatrace>"):
    """The records of complete pinatrace lines ``ip: R addr`` / ``ip: W addr``
    (``#`` lines and empty lines skipped; a carriage return before the newline allowed)."""
    a = np.frombuffer(text, dtype=np.uint8)
    starts, ends = _lines_of(a)
    ends = ends - ((ends > starts) & (a[np.maximum(ends - 1, 0)] == 13))   # CR LF
    first = a[np.minimum(starts, a.size - 1)]
    skip = (ends == starts) | (first == ord("#"))
    s, e = starts[~skip], ends[~skip]
    lines = np.flatnonzero(~skip)
    colons = np.flatnonzero(a == ord(":"))
    ci = np.searchsorted(colons, s)
    ok = np.searchsorted(colons, e) - ci == 1
    colon = colons[np.minimum(ci, colons.size - 1)] if colons.size else e
    colon = np.where(ok, colon, s)
    last = a.size - 1

    def x0(p, stop):                                   # skip an optional 0x
        return p + 2 * ((a[np.minimum(p, last)] == ord("0")) & (p + 2 < stop)
                        & ((a[np.minimum(p + 1, last)] | 0x20) == ord("x")))
    bad_hex = _prefix_bad(a, _IS_HEX)
    ip0 = x0(s, colon)
    ok &= (colon - ip0 >= 1) & (colon - ip0 <= 16)
    ok &= bad_hex[colon] - bad_hex[np.minimum(ip0, colon)] == 0
    op = a[np.minimum(colon + 2, last)]
    ok &= (a[np.minimum(colon + 1, last)] == ord(" ")) & ((op == ord("R")) | (op == ord("W")))
    ok &= a[np.minimum(colon + 3, last)] == ord(" ")
    addr0 = x0(colon + 4, e)
    ok &= (e - addr0 >= 1) & (e - addr0 <= 16)
    ok &= bad_hex[np.maximum(e, addr0)] - bad_hex[np.minimum(addr0, e)] == 0
    if not ok.all():
        _fail(a, s, e, lines, ok, first_line, name, "pinatrace record")
    kind = np.where(op == ord("W"), KIND_WRITE, KIND_READ).astype(np.uint64)
    return (_hex_pages(a, addr0, e) << np.uint64(2)) | kind
