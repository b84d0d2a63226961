"""`qtool run`'s engine flags through the Typer app: --max-batch and --cache-blocks reach the engine and its --json
stats (one reply and --batch), replies unchanged; bad values and --gpu-memory-fraction on a CPU are refused in one
line before the model loads."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from qtool.cli.main import app
from qtool.runtime.engine import EngineConfig

from cli_checks import GREEDY, chat_model_fixtures, greedy_reply, one_line_error, refused_by_typer, stop_model_loads

runner = CliRunner()
tokenizer, model, model_dir = chat_model_fixtures(seed=33)


def test_one_reply_reports_the_engine_it_had(model_dir, model, tokenizer):
    result = runner.invoke(app, ["run", str(model_dir), "--prompt", "the fox", "--json", "--cache-blocks", "37",
                                 "--max-batch", "2"] + GREEDY)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["engine"] == {"max_batch": 2, "cache_blocks": 37, "gpu_memory_fraction": None}
    assert data["text"] == greedy_reply(model, tokenizer, [{"role": "user", "content": "the fox"}])
    default = json.loads(runner.invoke(app, ["run", str(model_dir), "--prompt", "the fox", "--json"] + GREEDY).stdout)
    assert default["engine"]["cache_blocks"] not in (None, 37) and default["engine"]["max_batch"] == 1


def test_a_batch_runs_under_the_given_cap_and_cache(tmp_path, model_dir, model, tokenizer):
    requests = tmp_path / "requests.jsonl"
    prompts = ["the fox", "what is the capital", "the dog", "a cat"]
    requests.write_text("".join(json.dumps({"id": i, "prompt": text}) + "\n" for i, text in enumerate(prompts)))
    output = tmp_path / "replies.jsonl"
    result = runner.invoke(app, ["run", str(model_dir), "--batch", str(requests), "--output", str(output), "--json",
                                 "--max-batch", "1", "--cache-blocks", "9"] + GREEDY)
    assert result.exit_code == 0, result.output
    totals = json.loads(result.stdout)
    assert totals["engine"] == {"max_batch": 1, "cache_blocks": 9, "gpu_memory_fraction": None}
    assert [json.loads(line)["text"] for line in output.read_text().splitlines()] == \
        [greedy_reply(model, tokenizer, text) for text in prompts]


def test_the_help_names_the_engines_block_size():
    text = " ".join(runner.invoke(app, ["run", "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"}).stdout.split())
    assert re.search(rf"in blocks of {EngineConfig().block_size} tokens", text)


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    return stop_model_loads(monkeypatch, AssertionError("the model was loaded"))


@pytest.mark.parametrize("extra, message", [
    (["--gpu-memory-fraction", "0.8"], "--gpu-memory-fraction sizes the KV cache from a GPU's memory"),
    (["--gpu-memory-fraction", "1.5"], "--gpu-memory-fraction 1.5 must be in (0, 1]"),
    (["--gpu-memory-fraction", "nan"], "--gpu-memory-fraction nan must be in (0, 1]"),
    (["--gpu-memory-fraction", "0"], "--gpu-memory-fraction 0.0 must be in (0, 1]"),
    (["--gpu-memory-fraction", "0.5", "--cache-blocks", "8"], "both size the KV cache"),
])
def test_bad_engine_sizes_are_one_line_before_the_model_loads(loads, extra, message):
    result = runner.invoke(app, ["run", "some-model", "--prompt", "hi", "--device", "cpu", *extra])
    assert message in one_line_error(result)
    assert loads == []


@pytest.mark.parametrize("option", ["--max-batch", "--cache-blocks"])
def test_counts_are_refused_by_typer(loads, option):
    result = runner.invoke(app, ["run", "some-model", "--prompt", "hi", "--device", "cpu", option, "0"])
    refused_by_typer(result, option)
    assert loads == []
