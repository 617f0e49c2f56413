"""Print the side-by-side ratios of one pytest-benchmark run.

    pytest bench --benchmark-only --benchmark-json=bench.json
    python bench/ratios.py bench.json

For each group: every benchmark's median, its rate (items/s from extra_info)
and its time per item relative to the fastest in the group — all measured in
the same run, which is what makes them comparable on a noisy machine.
"""
import json
import sys
from collections import defaultdict


def main(path):
    with open(path) as f:
        data = json.load(f)
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"] or b["name"]].append(b)
    for group in sorted(groups):
        rows = groups[group]
        best = min(r["extra_info"].get("ns_per_item", r["stats"]["median"] * 1e9) for r in rows)
        print(f"\n{group}")
        for r in sorted(rows, key=lambda r: r["extra_info"].get("ns_per_item", 0)):
            ns = r["extra_info"].get("ns_per_item", r["stats"]["median"] * 1e9)
            rate = next((v for k, v in r["extra_info"].items() if k.endswith("_per_s")), None)
            name = r["name"].split("::")[-1]
            rate_s = f"{rate / 1e6:10.2f} M/s" if rate else " " * 14
            print(f"  {name:48s} {ns:12.2f} ns/item {rate_s}  x{ns / best:8.2f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench.json")
