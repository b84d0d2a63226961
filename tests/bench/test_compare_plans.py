"""bench/kernels/compare_plans.py on small bench JSONs written here: families are named from the plan strings, the best
of each family and the old/new ratios come out of the timings put in, failed candidates are left out."""

import gzip
import json
from pathlib import Path

from bench_scripts import load_bench_script


def left(mode, bn, staged=False, ahead=False):
    return (f"left(block_m=16, block_n={bn}, block_k=128, split_k=2, mode={mode}, num_warps=4, num_stages=4, "
            f"staged_words={staged}, scale_ahead={ahead})")


def write_run(path: Path, candidates: list, gz: bool = False) -> str:
    body = {"meta": {}, "rows": [{"model": "llama2-7b", "linear": "o_proj", "bits": 4, "M": 16,
                                  "candidates": candidates}]}
    opener = gzip.open if gz else open
    with opener(path, "wt") as out:
        json.dump(body, out)
    return str(path)


def test_families_and_their_best_times(tmp_path):
    compare = load_bench_script("kernels/compare_plans")
    assert compare.plan_family(left(3, 64, True, True)) == "left:3+staged+ahead"
    assert compare.plan_family(left(2, 64)) == "left:2"
    assert compare.plan_family(left(2, 64) + ", stream_programs=0") == "left:2"
    assert compare.plan_family(left(2, 64).replace(")", ", stream_programs=132)")) == "left:2+stream"
    assert compare.plan_family("gemv(block_n=1024, units=4, split_k=64, num_warps=4)") == "gemv"
    assert compare.plan_family("dequant") == "dequant"
    run = write_run(tmp_path / "a.json.gz", [
        [left(3, 64), 0.010], [left(3, 128), 0.012], [left(3, 64, ahead=True), 0.009],
        [left(2, 64), 0.020], [left(1, 64, staged=True), "wrong result (relative error nan)"],
    ], gz=True)
    lines = compare.describe_run(compare.load_rows(run))
    assert lines == ["llama2-7b o_proj 4-bit M=16: left:3+ahead 9.0  left:3 10.0  left:2 20.0 (us, fastest first)"]
    assert compare.describe_run(compare.load_rows(run), "left:2") == [
        "llama2-7b o_proj 4-bit M=16: left:2 20.0 (us, fastest first)"]


def test_two_runs_compare_family_by_family(tmp_path):
    compare = load_bench_script("kernels/compare_plans")
    old = write_run(tmp_path / "old.json", [[left(3, 64), 0.010], [left(3, 128), 0.020], [left(2, 64), 0.020]])
    new = write_run(tmp_path / "new.json", [[left(3, 64), 0.012], [left(3, 128), 0.010], [left(2, 64), 0.030],
                                            [left(3, 64, ahead=True), 0.001]])
    lines = compare.compare_runs(compare.load_rows(old), compare.load_rows(new))
    # left:3 best 0.010 -> 0.010; per plan 1.2 and 0.5 (median 0.85); a family only one run has is left out
    assert lines == ["llama2-7b o_proj 4-bit M=16: left:2 1.50, median 1.50 over 1; left:3 1.00, median 0.85 over 2"]
