#!/usr/bin/env python3
"""Markdown tables from the benchmark's CSV (kernels/results/decode_h100.csv), for the chapters to include.

  python3 kernels/bench/csv_to_tables.py kernels/results/decode_h100.csv > kernels/results/decode_h100_tables.md
"""
import sys

VERSIONS = ["v1_naive", "v2_gqa", "v3_split", "v4_mma", "v5_pipelined", "best"]


def main(path):
    header, rows = {}, []
    with open(path) as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("# "):
            key, _, value = line[2:].partition(": ")
            header[key] = value
    data = [line for line in lines if not line.startswith("#")]
    cols = data[0].split(",")
    rows = [dict(zip(cols, line.split(","))) for line in data[1:]]
    shapes = list(dict.fromkeys(r["shape"] for r in rows if r["shape"] != "all"))
    by = {(r["shape"], r["impl"]): r for r in rows}
    ceiling = float(rows[0]["read_ceiling_gbps"])

    def cell(r):
        if r is None or not r.get("ms_median"):
            return "failed" if r is not None else "–"
        return f"{float(r['ms_median']):.3f} ms · {float(r['pct_of_read_ceiling']):.0f}%"

    out = [f"Measured on {header.get('gpu')} (driver {header.get('driver')}, CUDA {header.get('cuda')}, "
           f"PyTorch {header.get('torch')}), {header.get('date')}, commit `{header.get('commit')[:12]}…`; "
           f"read ceiling {ceiling:.0f} GB/s (a read-only streaming kernel in the same run). Cells: median of 50 "
           f"calls · percent of the read ceiling. Command: `{header.get('command')}`.", ""]
    out += ["**The project's versions**", ""]
    out.append("| shape | " + " | ".join(VERSIONS) + " |")
    out.append("|---|" + "---|" * len(VERSIONS))
    for s in shapes:
        out.append(f"| {s} | " + " | ".join(cell(by.get((s, v))) for v in VERSIONS) + " |")
    peers = list(dict.fromkeys(r["impl"] for r in rows if r.get("source") == "peer"))
    out += ["", "**Best against the peers** (the bar: the fastest peer of the same run)", ""]
    out.append("| shape | best | " + " | ".join(peers) + " | best / fastest peer |")
    out.append("|---|---|" + "---|" * len(peers) + "---|")
    for s in shapes:
        best = by.get((s, "best"))
        timed = [(float(by[(s, p)]["ms_median"]), p) for p in peers
                 if (s, p) in by and by[(s, p)].get("ms_median") and by[(s, p)].get("status") == "ok"]
        fastest = min(timed)
        ratio = float(best["ms_median"]) / fastest[0]
        verdict = f"{ratio:.3f} ({'faster' if ratio <= 1 else 'slower'} than {fastest[1]})"
        out.append(f"| {s} | {cell(best)} | " + " | ".join(cell(by.get((s, p))) for p in peers) + f" | {verdict} |")
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1])
