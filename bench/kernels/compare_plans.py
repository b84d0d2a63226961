"""What the tuner's timings in bench/kernels/kernels.py's JSON say about plan families (kind, tile mode, feeding knobs):
the best time of each family per row, and between two runs the change of each family on the candidates both timed.

    python3 bench/kernels/compare_plans.py bench/results/kernels_h200_run34_2026-12-02.json.gz
    python3 bench/kernels/compare_plans.py OLD.json.gz NEW.json --family left:3   # only families starting with left:3

A family is "gemv", "dequant", "gemm:<mode>" or "left:<mode>" plus "+staged" / "+ahead" for the knobs that are on
and "+stream" for stream-K launches.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import statistics
from pathlib import Path

KNOBS = (("staged_words", "staged"), ("scale_ahead", "ahead"))


def load_rows(path: str) -> dict[tuple[str, str, int, int], dict[str, float]]:
    """(model, linear, bits, M) -> {plan description: ms} of the candidates that ran and were right."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as handle:
        body = json.load(handle)
    rows = {}
    for row in body["rows"]:
        timed = {plan: ms for plan, ms in row.get("candidates", []) if isinstance(ms, (int, float))}
        rows[(row["model"], row["linear"], row["bits"], row["M"])] = timed
    return rows


def plan_family(plan: str) -> str:
    kind = plan.split("(", 1)[0]
    fields = dict(re.findall(r"(\w+)=(\w+)", plan))
    if "mode" in fields:
        kind += f":{fields['mode']}"
    knobs = "".join(f"+{short}" for name, short in KNOBS if fields.get(name) == "True")
    return kind + knobs + ("+stream" if fields.get("stream_programs", "0") != "0" else "")


def best_by_family(timed: dict[str, float]) -> dict[str, float]:
    best: dict[str, float] = {}
    for plan, ms in timed.items():
        family = plan_family(plan)
        best[family] = min(best.get(family, ms), ms)
    return best


def row_label(key) -> str:
    model, linear, bits, m = key
    return f"{model} {linear} {bits}-bit M={m}"


def describe_run(rows, family_prefix: str = "") -> list[str]:
    lines = []
    for key in sorted(rows, key=lambda k: (k[3], k[0], k[1], k[2])):
        best = {f: ms for f, ms in best_by_family(rows[key]).items() if f.startswith(family_prefix)}
        if best:
            cells = "  ".join(f"{f} {ms * 1e3:.1f}" for f, ms in sorted(best.items(), key=lambda item: item[1]))
            lines.append(f"{row_label(key)}: {cells} (us, fastest first)")
    return lines


def compare_runs(old, new, family_prefix: str = "") -> list[str]:
    """Per row and family: new/old of the family's best time, and the median new/old over the plans both timed."""
    lines = []
    for key in sorted(set(old) & set(new), key=lambda k: (k[3], k[0], k[1], k[2])):
        best_old, best_new = best_by_family(old[key]), best_by_family(new[key])
        cells = []
        for family in sorted(set(best_old) & set(best_new)):
            if not family.startswith(family_prefix):
                continue
            shared = [new[key][p] / old[key][p] for p in old[key]
                      if p in new[key] and plan_family(p) == family]
            median = f", median {statistics.median(shared):.2f} over {len(shared)}" if shared else ""
            cells.append(f"{family} {best_new[family] / best_old[family]:.2f}{median}")
        if cells:
            lines.append(f"{row_label(key)}: " + "; ".join(cells))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="one bench_kernels JSON (.gz or not) to describe, or two to compare")
    parser.add_argument("--family", default="", help="only plan families starting with this, e.g. left:3")
    args = parser.parse_args()
    if len(args.runs) > 2:
        parser.error("give one run or two")
    runs = [load_rows(path) for path in args.runs]
    if len(runs) == 1:
        lines = describe_run(runs[0], args.family)
    else:
        print(f"new/old: {Path(args.runs[1]).name} against {Path(args.runs[0]).name} (below 1: faster now)")
        lines = compare_runs(runs[0], runs[1], args.family)
    print("\n".join(lines) if lines else "no rows with timed candidates")


if __name__ == "__main__":
    main()
