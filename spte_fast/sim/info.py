"""``spte-fast trace info``: what a trace holds, in one streaming pass.

``trace_info(path)`` reads a trace of any format (``spte_fast.sim.readers``) once and
returns a dict: the format, the input units (lines, records, instructions), the records
(accesses) and their kinds, distinct 4K pages, distinct 2M and 1G regions, the address
span, and a reuse summary.

Reuse
-----
``retouch_fraction``: the fraction of accesses whose page was touched before (1 - distinct
pages / accesses).  ``reuse interval`` of such an access: the number of accesses since the
previous access to the same 4K page (1: the access just before was to the same page;
kinds do not matter).  The median and the 90th percentile are reported from a histogram of
eighth-octave bins (each reported value is the upper edge of its bin, so within 9 % above
the exact value).  Memory is bounded by the distinct pages (16 bytes each: the page and
the index of its last access), never by the length of the trace.
"""
import numpy as np

from .readers import TraceReader, open_trace

BINS_PER_OCTAVE = 8
_NBINS = 64 * BINS_PER_OCTAVE + 1


class PageTracker:
    """Distinct pages of a stream of page chunks, with each page's last access index, and
    a histogram of reuse intervals (see the module docstring)."""

    def __init__(self):
        self.pages = np.zeros(0, dtype=np.uint64)      # sorted distinct
        self.last = np.zeros(0, dtype=np.int64)        # index of each page's last access
        self.hist = np.zeros(_NBINS, dtype=np.int64)
        self.accesses = 0

    def add(self, pages):
        m = pages.size
        if not m:
            return
        idx = self.accesses + np.arange(m, dtype=np.int64)
        order = np.argsort(pages, kind="stable")
        xs, ix = pages[order], idx[order]
        same = xs[1:] == xs[:-1]
        self._count(ix[1:][same] - ix[:-1][same])
        first = np.concatenate(([True], ~same))
        final = np.concatenate((~same, [True]))
        u, f, lst = xs[first], ix[first], ix[final]
        pos = np.searchsorted(self.pages, u)
        found = pos < self.pages.size
        found[found] = self.pages[pos[found]] == u[found]
        self._count(f[found] - self.last[pos[found]])
        self.last[pos[found]] = lst[found]
        new = ~found
        self.pages = np.insert(self.pages, pos[new], u[new])
        self.last = np.insert(self.last, pos[new], lst[new])
        self.accesses += m

    def _count(self, intervals):
        if intervals.size:
            b = np.ceil(np.log2(intervals.astype(np.float64)) * BINS_PER_OCTAVE)
            self.hist += np.bincount(b.astype(np.intp), minlength=_NBINS)[:_NBINS]

    def quantile(self, q):
        """The upper edge of the histogram bin holding the q-quantile reuse interval
        (None when nothing was reused)."""
        total = int(self.hist.sum())
        if not total:
            return None
        b = int(np.searchsorted(np.cumsum(self.hist), q * total))
        return int(round(2 ** (b / BINS_PER_OCTAVE)))


def trace_info(path, format=None, allow_partial=False, progress=None):
    """The summary of a trace (see the module docstring) as a JSON-ready dict.  ``path``: a
    path (``-``: stdin) or an open ``readers.TraceReader``; ``progress(raw_bytes)`` is
    called per chunk."""
    kinds = np.zeros(4, dtype=np.int64)
    tracker = PageTracker()
    reader = path if isinstance(path, TraceReader) else open_trace(path, format, allow_partial)
    with reader:
        for recs in reader:
            kinds += np.bincount((recs & np.uint64(3)).astype(np.intp), minlength=4)
            tracker.add(recs >> np.uint64(2))
            if progress is not None:
                progress(reader.raw_bytes())
        p = tracker.pages
        n = tracker.accesses

        def regions(shift):
            s = p >> np.uint64(shift)
            return int(s.size and 1 + np.count_nonzero(s[1:] != s[:-1]))
        low = int(p[0]) << 12 if p.size else None
        high = (int(p[-1]) << 12 | 0xfff) if p.size else None
        return {
            "trace": reader.name, "format": reader.format, "compression": reader.compression,
            reader.unit: reader.units, "records": n,
            "kinds": {"read": int(kinds[0]), "write": int(kinds[1]), "exec": int(kinds[2])},
            "distinct_pages": int(p.size), "distinct_2m": regions(9),
            "distinct_1g": regions(18),
            "lowest_address": low, "highest_address": high,
            "span_bytes": (high - low + 1) if p.size else 0,
            "reuse": {"retouch_fraction": (n - int(p.size)) / n if n else 0.0,
                      "median_interval": tracker.quantile(0.5),
                      "p90_interval": tracker.quantile(0.9)},
            "partial": reader.partial,
        }


def _bytes(n):
    from .report import format_bytes
    return format_bytes(n)


def format_info(info, seconds=None):
    """The text ``spte-fast trace info`` prints for ``trace_info``'s dict."""
    k, r = info["kinds"], info["reuse"]
    unit = next(u for u in ("lines", "records", "instructions") if u in info)
    comp = f", {info['compression']}" if info["compression"] else ""
    rows = [
        ("format", f"{info['format']}{comp}: {info[unit]:,} {unit}"),
        ("records", f"{info['records']:,}   reads {k['read']:,}   writes {k['write']:,}   "
                    f"fetches {k['exec']:,}"),
        ("distinct", f"4K pages {info['distinct_pages']:,} "
                     f"({_bytes(4096 * info['distinct_pages'])})   2M regions "
                     f"{info['distinct_2m']:,}   1G regions {info['distinct_1g']:,}"),
    ]
    if info["distinct_pages"]:
        rows.append(("addresses", f"{info['lowest_address']:#x} .. "
                                  f"{info['highest_address']:#x} "
                                  f"(span {_bytes(info['span_bytes'])})"))
    med, p90 = r["median_interval"], r["p90_interval"]
    rows.append(("reuse", f"{100 * r['retouch_fraction']:.2f} % of accesses go to a page "
                          f"touched before" +
                 (f"; reuse interval (accesses since that page's previous access) median "
                  f"<= {med:,}, 90th percentile <= {p90:,}" if med is not None else "")))
    if info["partial"]:
        rows.append(("partial", f"dropped at the end: {info['partial']}"))
    if seconds is not None:
        rows.append(("read in", f"{seconds:.2f} s"))
    return f"{info['trace']}\n" + "".join(f"  {a:<11}{b}\n" for a, b in rows)
