"""Where a chunk kernel waits, by source line: Nsight Compute's per-instruction warp-stall samples
(a CSV of scripts/ncu_source.sh) joined with the line info of the same kernel compiled here.

    uv run --with triton==3.6.0 python benchmarks/stall_lines.py ncu-chunk_bwd_kernel.csv bwd
    uv run --with triton==3.6.0 python benchmarks/stall_lines.py ncu-chunk_scan_fwd_kernel.csv \
        scan_fwd SAVE_CKPT=False --top 30

Without a CSV (no GPU run needed) it prints where the instructions are instead: per source line,
helpers' lines (chunk_common.py, triton.language) on their own, and with ``--lines LO-HI`` the
instructions of the kernel's lines LO..HI with the helpers they call (a loop body, say):

    uv run --with triton==3.6.0 python benchmarks/stall_lines.py bwd
    uv run --with triton==3.6.0 python benchmarks/stall_lines.py scan_fwd SAVE_CKPT=False \
        --lines 261-300

The kernel name and constexpr changes are those of benchmarks/sass_counts.py; they must give the
cubin the GPU ran (same Triton, 3.6 on the device, and the same specialisation), which is checked:
the two instruction lists must agree opcode by opcode. Instructions of helper functions
(chunk_common.py, triton.language) count for the last line of the kernel's own file before them,
so a line's share includes the helpers it calls (approximately: the compiler interleaves).
Prints, per line: its share of all samples, the three largest stall reasons, and its instruction
count.
"""

import argparse
import collections
import csv
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sass_counts  # noqa: E402

SASS_LINE = re.compile(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)")
FILE_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')


def local_instructions(kernel, changes):
    """[(opcode, (file name, line) or None)] of the kernel compiled here for sm_90."""
    fn, warps, stages, own = sass_counts.KERNELS[kernel]
    constexprs = {**sass_counts.COMMON, **own}
    constexprs.update({k: v for k, v in changes.items() if k in fn.arg_names})
    compiled = sass_counts.compile_sm90(fn, constexprs, changes.get("warps", warps),
                                        changes.get("stages", stages),
                                        changes.get("maxnreg", sass_counts.CAPS.get(kernel)))
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([os.path.join(tools, "nvdisasm"), "-g", "-c", f.name],
                              capture_output=True, text=True, check=True).stdout
    out, where = [], None
    for line in text.splitlines():
        m = FILE_LINE.search(line)
        if m:
            where = (os.path.basename(m.group(1)), int(m.group(2)))
            continue
        m = SASS_LINE.match(line)
        if m:
            out.append((m.group(1), where))
    return out, os.path.basename(fn.fn.__code__.co_filename), fn.fn.__code__.co_filename


def gpu_samples(path):
    """(header, rows) of an Nsight Compute source-page CSV (--print-source sass)."""
    with open(path, newline="") as f:
        lines = [line for line in f if line.strip()]
    rows = list(csv.reader(lines[1:]))     # the first line names the kernel
    return rows[0], rows[1:]


def kernel_line(local, own_file):
    """For each instruction of ``local``, the line of the kernel's own file it counts for: its
    own, or for a helper's instruction the last line of the kernel's file before it (0 before
    the first)."""
    line, out = 0, []
    for _, where in local:
        if where and where[0] == own_file:
            line = where[1]
        out.append(line)
    return out


def print_instructions(local, own_file, own_path, lines, top):
    """Where the instructions are: per source line, or the sum over the kernel's lines LO-HI."""
    if lines:
        lo, hi = (int(x) for x in lines.split("-"))
        inside = sum(1 for line in kernel_line(local, own_file) if lo <= line <= hi)
        print(f"{len(local)} instructions per warp; lines {lo}-{hi} of {own_file} with the "
              f"helpers they call: {inside}")
        return
    count = collections.Counter(where for _, where in local)
    ops = collections.defaultdict(collections.Counter)
    for op, where in local:
        ops[where][op.split(".")[0]] += 1
    sources = {}
    print(f"{len(local)} instructions per warp")
    for where, n in count.most_common(top):
        text = ""
        if where:
            # the kernels' files, or triton.language's (tl.cumsum, tl.sum, ...)
            for folder in (os.path.dirname(own_path), os.path.dirname(tl.__file__)):
                path = os.path.join(folder, where[0])
                if os.path.exists(path):
                    text = sources.setdefault(path, open(path).read().splitlines())[where[1] - 1]
                    break
        shown = f"{where[0]}:{where[1]}" if where else "(no line)"
        top_ops = " ".join(f"{o}:{c}" for o, c in ops[where].most_common(5))
        print(f"{n:5d}  {shown:22s} {text.strip()[:60]:60s} | {top_ops}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("args", nargs="+", metavar="[CSV] KERNEL [constexpr=value ...]",
                        help="an Nsight Compute CSV (optional), the kernel of sass_counts.py and "
                             "its constexpr changes")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--lines", help="LO-HI: without a CSV, the instructions of these lines")
    args = parser.parse_args()
    csv_path = args.args.pop(0) if args.args[0].endswith(".csv") else None
    kernel, changes = args.args[0], sass_counts.parse_changes(args.args[1:])
    if kernel not in sass_counts.KERNELS:
        parser.error(f"unknown kernel {kernel!r}: one of {sorted(sass_counts.KERNELS)}")
    local, own_file, own_path = local_instructions(kernel, changes)
    if csv_path is None:
        print_instructions(local, own_file, own_path, args.lines, args.top)
        return
    header, rows = gpu_samples(csv_path)
    col = {name: i for i, name in enumerate(header)}
    mismatched = sum(1 for (op, _), row in zip(local, rows)
                     if op.split(".")[0] not in row[col["Source"]])
    if len(local) != len(rows) or mismatched:
        sys.exit(f"the local build ({len(local)} instructions) is not the one profiled "
                 f"({len(rows)}; {mismatched} opcodes differ): check the Triton version and the "
                 "constexprs")
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    total_col = col["Warp Stall Sampling (All Samples)"]
    samples = collections.Counter()
    why = collections.defaultdict(collections.Counter)
    count = collections.Counter()
    for line, row in zip(kernel_line(local, own_file), rows):
        samples[line] += float(row[total_col] or 0)
        count[line] += 1
        for r in reasons:
            why[line][r[len("stall_"):]] += float(row[col[r]] or 0)
    total = sum(samples.values()) or 1.0
    source = open(own_path).read().splitlines()
    everything = collections.Counter()
    for c in why.values():
        everything.update(c)
    print(f"{kernel}: {len(rows)} instructions, {total:.0f} samples; stall reasons: "
          + "  ".join(f"{k}={v / total:.1%}" for k, v in everything.most_common(8)))
    for line, n in samples.most_common(args.top):
        text = source[line - 1].strip()[:72] if line else "(before the first line)"
        top3 = "  ".join(f"{k}={v / total:.1%}" for k, v in why[line].most_common(3))
        print(f"{n / total:6.1%}  L{line:<4d} {text:72s} | {top3} | {count[line]} instr")


if __name__ == "__main__":
    main()
