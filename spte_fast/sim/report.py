"""Reports of a ``SimResult``: the text summary, the JSON document and the plot.

``summary(result)`` is the table ``spte-fast simulate`` prints, ``to_json(result)`` the
document of ``--json`` (``result.to_dict()``, indented), ``samples_csv(result, f)`` the time
series of ``-o DIR``'s ``samples.csv``, ``comparison(results)`` the table of ``--layout a,b``
and ``plot(result, path)`` the image of ``--plot`` (needs matplotlib, the optional
``[plot]`` extra; imported only here).
"""
import json

TITLE = "spte-fast simulate"


def format_bytes(n):
    """1536 -> '1.5 KiB' (binary units; whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def summary(result, title=TITLE):
    """The human summary table of a run."""
    res = result.to_dict()
    c, st, r, z = res["config"], res["stats"], res["results"], res["zaps"]
    what = f"trace {c['trace']}" if c["source"] == "trace" else f"{c['workload']} workload"
    hw = res["hardware"]
    if c["mode"] == "access":
        rows = [
            ("throughput", f"{res['accesses_per_s'] / 1e6:.2f} M accesses/s and "
                           f"{res['faults_per_s'] / 1e6:.2f} M faults/s in the batch calls "
                           f"({res['fault_s']:.3f} s); {res['overall_accesses_per_s'] / 1e6:.2f}"
                           f" M accesses/s overall ({res['elapsed_s']:.3f} s wall)"),
            ("accesses", f"{res['accesses']:,}   hardware hits {r['hits']:,}   page walks "
                         f"{hw['hw_walks']:,}   A/D bits set by the CPU {hw['hw_ad_sets']:,}"),
            ("exits", f"EPT violation / #NPF {hw['exits_ept_violation']:,}   "
                      f"misconfiguration / RSVD {hw['exits_misconfig']:,}"),
        ]
    else:
        rows = [
            ("throughput", f"{res['faults_per_s'] / 1e6:.2f} M faults/s in the fault path "
                           f"({res['fault_s']:.3f} s); {res['overall_faults_per_s'] / 1e6:.2f} "
                           f"M/s overall ({res['elapsed_s']:.3f} s wall)"),
        ]
    if c["source"] == "trace":
        (unit, units), = c["trace_units"].items()
        rows.insert(0, ("trace", f"{c['trace_format']}: {units:,} {unit} -> "
                                 f"{c['trace_records']:,} records read, "
                                 f"{res['accesses']:,} replayed" +
                                 (f" (dropped at the end: {c['trace_partial']})"
                                  if c.get("trace_partial") else "")))
    rows += mmu_rows(st, r, c["root_level"])
    rows += [
        ("zaps", f"2M ranges {z['gfn_range']:,} ({z['gfn_range_flushed']:,} flushed)   "
                 f"zap_all {z['all']:,} ({z['all_flushed']:,} flushed)"),
        ("audit", res["audit"]),
    ]
    count = (f"{res['accesses']:,} accesses" if c["mode"] == "access"
             else f"{res['faults']:,} faults")
    head = (f"{title}: {what}, {count}, "
            f"{format_bytes(c['guest_bytes'])} guest in {len(c['memslots'])} memslot(s)\n"
            f"layout {c['layout']} (non-present {c['nonpresent_value']}), {c['root_level']}-level "
            f"root, max level {c['max_level'].upper()}, {c['vcpus']} vCPU(s), seed {c['seed']}\n")
    return head + "\n" + "".join(f"  {k:<13}{v}\n" for k, v in rows)


def mmu_rows(st, r, root_level):
    """The summary rows of what KVM did (``vm.stats`` ``st``, the exits' results ``r``):
    faults, leaves, page tables per level, table initialisation, TLB flushes."""
    rows = [
        ("faults", f"fixed {r['fixed']:,}   fast {r['fast']:,}   spurious {r['spurious']:,}   "
                   f"emulate {r['emulate']:,}   retries {r['retry']:,}"),
        ("leaves", f"4K {st['pages_4k']:,}   2M {st['pages_2m']:,}   1G {st['pages_1g']:,}   "
                   f"MMIO SPTEs created {st['mmio_sptes_created']:,}"),
        ("page tables", f"{'level':>5} {'pages':>12} {'bytes':>11}"),
    ]
    for lvl in range(root_level, 0, -1):
        n = st[f"pt_pages_l{lvl}"]
        rows.append(("", f"{'L' + str(lvl):>5} {n:>12,} {format_bytes(n * 4096):>11}"))
    rows.append(("", f"{'total':>5} {st['pt_pages']:>12,} "
                     f"{format_bytes(st['pt_pages'] * 4096):>11}"
                     f"   (allocated {st['tables_allocated']:,}, freed {st['tables_freed']:,})"))
    rows += [
        ("table init", f"cache fills {st['cache_fills']:,} (memset64)   zero-inits "
                       f"{st['cache_zero_inits']:,}   bytes written "
                       f"{format_bytes(st['init_bytes_written'])}"),
        ("TLB flushes", f"full {st['tlb_flushes']:,}   ranged {st['tlb_flushes_ranged']:,}"),
    ]
    return rows


def to_json(result, **extra):
    """``result.to_dict()`` plus ``extra`` keys, as one indented JSON document."""
    return json.dumps({**result.to_dict(), **extra}, indent=2)


def csv_columns(root_level):
    """The columns of ``samples_csv`` for a ``root_level``-level run."""
    return (["accesses", "seconds", "faults", "hits", "fixed", "fast", "spurious", "emulate",
             "retry", "leaves_4k", "leaves_2m", "leaves_1g"] +
            [f"tables_l{lvl}" for lvl in range(1, root_level + 1)] +
            ["pt_bytes", "working_set_pages", "accesses_per_s", "faults_per_s"])


def samples_csv(result, f):
    """Write the time series (one row per sample, ``csv_columns``) to the text file ``f``."""
    import csv
    w = csv.writer(f, lineterminator="\n")
    w.writerow(csv_columns(result.config.root_level))
    for p in result.samples:
        r = p.results or {}
        w.writerow([p.accesses, f"{p.seconds:.6f}", p.faults, r.get("hits", 0),
                    r.get("fixed", 0), r.get("fast", 0), r.get("spurious", 0),
                    r.get("emulate", 0), r.get("retry", 0), *p.leaves, *p.pt_pages,
                    p.pt_bytes, p.working_set, f"{p.accesses_per_s:.1f}",
                    f"{p.faults_per_s:.1f}"])


COMPARISON_ROWS = (
    ("non-present", lambda d: d["config"]["nonpresent_value"]),
    ("accesses", lambda d: f"{d['accesses']:,}"),
    ("hits", lambda d: f"{d['results'].get('hits', 0):,}"),
    ("faults", lambda d: f"{d['faults']:,}"),
    ("  fixed", lambda d: f"{d['results']['fixed']:,}"),
    ("  fast", lambda d: f"{d['results']['fast']:,}"),
    ("  spurious", lambda d: f"{d['results']['spurious']:,}"),
    ("  emulate", lambda d: f"{d['results']['emulate']:,}"),
    ("A/D set by CPU", lambda d: f"{d['hardware']['hw_ad_sets']:,}"),
    ("leaves 4K", lambda d: f"{d['stats']['pages_4k']:,}"),
    ("leaves 2M", lambda d: f"{d['stats']['pages_2m']:,}"),
    ("leaves 1G", lambda d: f"{d['stats']['pages_1g']:,}"),
    ("page tables", lambda d: f"{d['stats']['pt_pages']:,}"),
    ("  bytes", lambda d: format_bytes(4096 * d["stats"]["pt_pages"])),
    ("cache fills", lambda d: f"{d['stats']['cache_fills']:,}"),
    ("zero-inits", lambda d: f"{d['stats']['cache_zero_inits']:,}"),
    ("init bytes", lambda d: format_bytes(d["stats"]["init_bytes_written"])),
    ("M accesses/s", lambda d: f"{d['accesses_per_s'] / 1e6:.2f}"),
    ("M faults/s", lambda d: f"{d['faults_per_s'] / 1e6:.2f}"),
    ("audit", lambda d: d["audit"]),
)


def comparison(results, title=TITLE):
    """One table of several runs of the same input, a column per run (its layout)."""
    docs = [r.to_dict() for r in results]
    c = docs[0]["config"]
    what = f"trace {c['trace']}" if c["source"] == "trace" else f"{c['workload']} workload"
    head = (f"{title}: {what}, {docs[0]['accesses']:,} records, "
            f"{format_bytes(c['guest_bytes'])} guest, {c['root_level']}-level root, max "
            f"level {c['max_level'].upper()}, {c['vcpus']} vCPU(s), mode {c['mode']}\n\n")
    cols = [[d["config"]["layout"]] + [fn(d) for _, fn in COMPARISON_ROWS] for d in docs]
    widths = [max(len(x) for x in col) for col in cols]
    names = ["layout"] + [name for name, _ in COMPARISON_ROWS]
    lw = max(len(n) for n in names)
    lines = []
    for i, name in enumerate(names):
        lines.append(f"  {name:<{lw}}  " + "  ".join(f"{col[i]:>{w}}"
                                                   for col, w in zip(cols, widths)))
    return head + "\n".join(lines) + "\n"


def run_name(result):
    """The trace's file name, or the workload's name."""
    import os
    src = result.source
    return os.path.basename(src["trace"]) if src.get("source") == "trace" else \
        f"{src['workload']} workload"


def plot(result, path):
    """Growth over the run -- the working set and the leaves, the page tables per level,
    the access and fault rates -- against the records done, as an image (PNG, SVG, PDF
    by ``path``'s extension)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter
    s, c = result.samples, result.config
    x = [p.accesses for p in s]
    fig, (top, mid, bottom) = plt.subplots(3, 1, sharex=True, figsize=(10, 8.5))
    legend = dict(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                  fontsize="small", frameon=False)
    top.plot(x, [p.working_set for p in s], color="black", lw=2,
             label="working set\n(4K pages accessed)")
    for i, (name, colour) in enumerate((("4K", "C0"), ("2M", "C1"), ("1G", "C2"))):
        ys = [p.leaves[i] for p in s]
        if any(ys):
            top.plot(x, ys, color=colour, label=f"{name} leaves")
    top.set_yscale("symlog", linthresh=1)
    top.set_ylabel("pages")
    top.set_title("working set and mapped leaves", fontsize="medium", loc="left")
    top.legend(**legend)
    for i in range(c.root_level - 1, -1, -1):
        mid.plot(x, [p.pt_pages[i] for p in s], label=f"L{i + 1} tables")
    mid.set_yscale("symlog", linthresh=1)
    mid.set_ylabel("page-table pages")
    mid.set_title(f"page tables (total at the end {format_bytes(s[-1].pt_bytes)})",
                  fontsize="medium", loc="left")
    mid.legend(**legend)
    if c.mode == "access":
        bottom.plot(x, [p.accesses_per_s / 1e6 for p in s], label="accesses")
    bottom.plot(x, [p.faults_per_s / 1e6 for p in s], label="faults (exits)")
    bottom.set_ylabel("M per second")
    bottom.set_title(f"rates in the batch calls, per {result.stats_interval:,} records",
                     fontsize="medium", loc="left")
    bottom.set_xlabel("records (accesses) replayed")
    bottom.xaxis.set_major_formatter(EngFormatter())
    bottom.legend(**legend)
    bottom.set_ylim(bottom=0)
    for ax in (top, mid, bottom):
        ax.grid(True, alpha=0.3)
    level = {1: "4K", 2: "2M", 3: "1G"}[c.max_level]
    fig.suptitle(f"spte-fast: {run_name(result)} -- {c.layout}, {c.root_level}-level, "
                 f"max {level}, {c.vcpus} vCPU(s), {result.accesses:,} records")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
