"""bench/finetune/grimm_quality.py --tiny: the script runs end to end on a tiny random model and reports each
figure it promises."""

from __future__ import annotations

import math

import pytest

from bench_scripts import load_bench_script


@pytest.mark.slow
def test_tiny_mode_reports_every_figure(tmp_path):
    script = load_bench_script("finetune/grimm_quality")
    figures = script.main(["--tiny", "--json", str(tmp_path / "out.json")])
    assert (tmp_path / "out.json").is_file()
    for key in ("first_loss", "last_loss", "tokens_per_second"):
        assert math.isfinite(figures["grimm"][key]) and figures["grimm"][key] > 0, key
    for stage in ("before", "after"):
        assert set(figures["grimm"][stage]) == {"test"}  # the default split
        assert math.isfinite(figures["grimm"][stage]["test"]["ppl"]) and figures["grimm"][stage]["test"]["ppl"] > 1, stage
    assert figures["grimm"]["method"] == "lora" and figures["grimm"]["steps"] == 3
    assert figures["chat"]["held_out_tasks"] == 25 and figures["chat"]["train_tasks"] == 150
    assert math.isfinite(figures["chat"]["answer_loss_before"]) and math.isfinite(figures["chat"]["answer_loss_after"])


@pytest.mark.slow
def test_chat_steps_zero_reports_the_grimm_rows_only(tmp_path):
    script = load_bench_script("finetune/grimm_quality")
    figures = script.main(["--tiny", "--chat-steps", "0", "--eval-split", "valid,test", "--eval-init", "--json", str(tmp_path / "out.json")])
    assert set(figures) == {"grimm"} and figures["grimm"]["steps"] == 3
    grimm = figures["grimm"]
    assert set(grimm["before"]) == set(grimm["at_init"]) == set(grimm["after"]) == {"valid", "test"}
    # default init: B = 0, so the adapted model before training is the base itself
    for split in ("valid", "test"):
        assert grimm["at_init"][split]["ppl"] == pytest.approx(grimm["before"][split]["ppl"], rel=1e-6)
        assert math.isfinite(grimm["after"][split]["ppl"])


def test_seed_tasks_become_one_exchange_each():
    script = load_bench_script("finetune/grimm_quality")
    chats = script.seed_task_chats(script.ALPACA)
    assert len(chats) == 175
    roles = {tuple(m["role"] for m in chat["messages"]) for chat in chats}
    assert roles == {("user", "assistant")}
    assert chats[1]["messages"][0]["content"] == "What is the relation between the given pairs?\n\nNight : Day :: Right : Left"
