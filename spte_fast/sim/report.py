"""Reports of a ``SimResult``: the text summary, the JSON document and the plot.

``summary(result)`` is the table ``spte-fast simulate`` prints, ``to_json(result)`` the
document of ``--json`` (``result.to_dict()``, indented), ``plot(result, path)`` the PNG of
``--plot`` (needs matplotlib, the optional ``[plot]`` extra; imported only here).
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
    rows += [
        ("faults", f"fixed {r['fixed']:,}   fast {r['fast']:,}   spurious {r['spurious']:,}   "
                   f"emulate {r['emulate']:,}   retries {r['retry']:,}"),
        ("leaves", f"4K {st['pages_4k']:,}   2M {st['pages_2m']:,}   1G {st['pages_1g']:,}   "
                   f"MMIO SPTEs created {st['mmio_sptes_created']:,}"),
    ]
    rows.append(("page tables", f"{'level':>5} {'pages':>12} {'bytes':>11}"))
    for lvl in range(c["root_level"], 0, -1):
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


def to_json(result, **extra):
    """``result.to_dict()`` plus ``extra`` keys, as one indented JSON document."""
    return json.dumps({**result.to_dict(), **extra}, indent=2)


def plot(result, path):
    """Page-table pages per level and the fault rate, per chunk, over the run, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s, c = result.samples, result.config
    x = [p.faults for p in s]
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    for i in range(c.root_level - 1, -1, -1):
        top.plot(x, [p.pt_pages[i] for p in s], marker=".", label=f"L{i + 1}")
    top.set_yscale("symlog")
    top.set_ylabel("page-table pages")
    top.legend(loc="lower right", ncol=5, fontsize="small")
    x = [p.accesses for p in s]
    if c.mode == "access":
        bottom.plot(x, [p.accesses_per_s / 1e6 for p in s], marker=".", label="accesses")
    bottom.plot(x, [p.faults_per_s / 1e6 for p in s], marker=".", label="faults")
    bottom.set_ylabel("M/s (per chunk)")
    bottom.set_xlabel("records")
    bottom.legend(loc="lower right", fontsize="small")
    bottom.set_ylim(bottom=0)
    level = {1: "4K", 2: "2M", 3: "1G"}[c.max_level]
    fig.suptitle(f"spte-fast: {result.source['workload']} ({c.layout}, {c.root_level}-level, "
                 f"max {level}, {c.vcpus} vCPU)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
