"""Summarizes Nsight Compute's per-instruction export of one kernel (`ncu -i R.ncu-rep --page source --csv
--print-source sass`, written by bench/device/gpu_check.sh's `profile` stage): where the sampled warps stalled, the
instructions that drew the most samples, the executed instruction mix per weight value, and the instructions
with bank-conflicted shared-memory accesses. Runs anywhere (plain Python, no ncu needed).

    python bench/kernels/ncu_summary.py profile/left_7b_qkv_m16.sass.csv --values 50331648
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"


def _int(text: str) -> int:
    return int(text.replace(",", "") or 0)


def read_instructions(path: str) -> list[dict[str, str]]:
    """One dict per SASS instruction (the rows under the header line that names 'Source')."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    header_at = next(i for i, row in enumerate(rows) if "Source" in row)
    header = rows[header_at]
    return [dict(zip(header, row)) for row in rows[header_at + 1:] if len(row) == len(header)]


def opcode(source: str) -> str:
    """'@!P0 LDGSTS.E.128 [R1], ...' -> 'LDGSTS'."""
    words = source.split()
    if words and words[0].startswith("@"):
        words = words[1:]
    return words[0].split(".")[0] if words else "?"


def summarize(path: str, values: int | None, top: int = 12) -> str:
    instructions = read_instructions(path)
    stall_columns = [c for c in instructions[0] if c.startswith("stall_") and "Not Issued" not in c]
    total = sum(_int(i[SAMPLES]) for i in instructions) or 1
    reasons = collections.Counter()
    for inst in instructions:
        for column in stall_columns:
            reasons[column[6:]] += _int(inst[column])
    lines = [f"{path}: {total} samples over {len(instructions)} instructions",
             "stalls: " + ", ".join(f"{name} {100 * n / total:.1f}%" for name, n in reasons.most_common(10))]
    for inst in sorted(instructions, key=lambda i: -_int(i[SAMPLES]))[:top]:
        main = max(stall_columns, key=lambda c: _int(inst[c]))
        lines.append(f"  {100 * _int(inst[SAMPLES]) / total:5.1f}% {main[6:]:13s} {inst['Source'].strip()[:90]}")
    executed = collections.Counter()
    for inst in instructions:
        executed[opcode(inst["Source"])] += _int(inst["Instructions Executed"])
    if values:
        warp_total = sum(executed.values())
        lines.append(f"executed: {32 * warp_total / values:.2f} thread instructions per weight value: "
                     + ", ".join(f"{op} {32 * n / values:.2f}" for op, n in executed.most_common(14)))
    conflicted = [i for i in instructions if _int(i.get("L1 Wavefronts Shared Excessive", "0"))]
    for inst in sorted(conflicted, key=lambda i: -_int(i["L1 Wavefronts Shared Excessive"]))[:4]:
        lines.append(f"  shared wavefronts {inst['L1 Wavefronts Shared Excessive']} excessive of "
                     f"{inst['L1 Wavefronts Shared']}: {inst['Source'].strip()[:80]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", help="ncu source-page exports (--csv --print-source sass)")
    parser.add_argument("--values", type=int, default=None, help="weight values the kernel reads (K x N)")
    args = parser.parse_args(argv)
    status = 0
    for path in args.csv:
        try:
            print(summarize(path, args.values), "\n")
        except (OSError, StopIteration, IndexError, KeyError) as exc:
            print(f"{path}: not an ncu source export ({type(exc).__name__}: {exc})", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
