"""bench/finetune/asr_espeak.py in its --tiny mode: speaks train and held-out Grimm sentences, trains a random
Whisper a few steps and reports WER before and after."""

from __future__ import annotations

import pytest
from bench_scripts import load_bench_script

from qtool.finetune.audio.espeak_corpus import espeak_available


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (Debian: apt-get install espeak-ng); it speaks the clips")
def test_tiny_run_reports_held_out_wer(tmp_path):
    bench = load_bench_script("finetune/asr_espeak")
    result = bench.main(["--tiny", "--work", str(tmp_path), "--device", "cpu", "--json-out", str(tmp_path / "r.json")])
    assert (result["train_examples"], result["eval_examples"], result["eval_on"]) == (4, 2, "eval data")
    assert 0.0 <= result["wer_after"] and result["loss_after"] < result["loss_before"]
    assert (tmp_path / "r.json").is_file() and (tmp_path / "tuned" / "config.json").is_file()
