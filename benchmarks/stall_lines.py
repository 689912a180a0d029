"""Summarise Nsight Compute source-page CSVs (scripts/ncu_source.sh): the source lines, or SASS
instructions, with the most warp-stall samples, and the stall reasons of each.

    python3 benchmarks/stall_lines.py ncu-chunk_bwd_kernel-cuda.csv [ncu-chunk_bwd_kernel-sass.csv]
"""

import csv
import sys


def rows_of(path):
    with open(path, newline="") as f:
        lines = [line for line in f if line.strip() and not line.startswith("==")]
    return list(csv.DictReader(lines))


def number(text):
    try:
        return float(str(text).replace(",", ""))
    except ValueError:
        return 0.0


def summary(path, top=30):
    rows = rows_of(path)
    if not rows:
        print(f"{path}: no rows")
        return
    cols = list(rows[0])
    total_col = next((c for c in cols if c.startswith("Warp Stall Sampling (All")), None)
    if total_col is None:
        print(f"{path}: columns {cols}")
        return
    reasons = [c for c in cols if "stall" in c.lower() and not c.startswith("Warp Stall Sampling")]
    label = next((c for c in ("Source", "Address") if c in cols), cols[0])
    line_col = next((c for c in cols if c.strip("# ").lower() in ("line", "#")), None)
    total = sum(number(r[total_col]) for r in rows) or 1.0
    print(f"== {path}: {len(rows)} rows, {total:.0f} samples")
    for r in sorted(rows, key=lambda r: -number(r[total_col]))[:top]:
        share = number(r[total_col]) / total
        where = f"{r[line_col]:>5} " if line_col else ""
        why = sorted(((number(r[c]), c) for c in reasons), reverse=True)[:3]
        why = " ".join(f"{c}={v:.0f}" for v, c in why if v)
        print(f"{share:6.1%} {where}{r[label].strip()[:90]}  {why}")


if __name__ == "__main__":
    for p in sys.argv[1:]:
        summary(p)
