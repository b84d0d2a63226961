"""`qtool run --speculate ngram` and `--draft MODEL`: the greedy reply is the plain greedy reply, the acceptance is
reported, and the bad combinations are one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qtool.cli.main import app
from qtool.runtime.generate import GenerationSettings, generate

from cli_checks import one_line_error, save_model_dir

runner = CliRunner()
GREEDY = ["--temperature", "0", "--max-new-tokens", "12", "--device", "cpu", "--raw"]
PROMPT = "the quick brown fox the quick brown fox the quick"


@pytest.fixture(scope="module")
def tokenizer(make_tiny_tokenizer):
    return make_tiny_tokenizer()


@pytest.fixture
def model(make_tiny_llama, tokenizer):
    return make_tiny_llama(seed=1, vocab_size=len(tokenizer))


@pytest.fixture
def model_dir(tmp_path, model, tokenizer):
    return save_model_dir(tmp_path / "tiny", model, tokenizer)


def greedy_text(model, tokenizer) -> str:
    return generate(model, tokenizer, PROMPT, GenerationSettings(max_new_tokens=12, temperature=0)).text


@pytest.mark.parametrize("flags, drafter", [(["--speculate", "ngram"], "ngram"), (["--draft", "{dir}"], "draft")])
def test_speculative_reply_is_the_greedy_reply(model_dir, model, tokenizer, flags, drafter):
    flags = [flag.format(dir=model_dir) for flag in flags]  # the model as its own draft
    result = runner.invoke(app, ["run", str(model_dir), "--prompt", PROMPT, *flags] + GREEDY)
    assert result.exit_code == 0, result.output
    assert result.stdout == greedy_text(model, tokenizer) + "\n"
    assert f"speculative decoding ({drafter}):" in result.stderr and "drafted tokens accepted" in result.stderr
    data = json.loads(runner.invoke(app, ["run", str(model_dir), "--prompt", PROMPT, "--json", *flags] + GREEDY).stdout)
    assert data["text"] == greedy_text(model, tokenizer)


def test_a_sampled_reply_is_warned_that_it_decodes_plainly(model_dir):
    result = runner.invoke(app, ["run", str(model_dir), "--prompt", PROMPT, "--speculate", "ngram", "--temperature",
                                 "0.7", "--max-new-tokens", "4", "--device", "cpu", "--raw"])
    assert result.exit_code == 0, result.output
    assert "greedy replies only" in result.stderr


def test_batch_with_a_draft_equals_plain_greedy(tmp_path, model_dir, model, tokenizer):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "prompt": PROMPT}) + "\n")
    output = tmp_path / "out.jsonl"
    result = runner.invoke(app, ["run", str(model_dir), "--batch", str(requests), "--output", str(output), "--draft",
                                 str(model_dir), "--json"] + GREEDY)
    assert result.exit_code == 0, result.output
    assert json.loads(output.read_text())["text"] == greedy_text(model, tokenizer)


def test_bad_combinations_are_one_line_errors(tmp_path, model_dir, make_tiny_llama, make_tiny_tokenizer):
    base = ["run", str(model_dir), "--prompt", "hi"] + GREEDY
    assert "--speculate draft needs --draft MODEL" in one_line_error(runner.invoke(app, base + ["--speculate", "draft"]))
    both = runner.invoke(app, base + ["--speculate", "ngram", "--draft", str(model_dir)])
    assert "--draft goes with --speculate draft" in one_line_error(both)
    other = tmp_path / "other"
    other_tokenizer = make_tiny_tokenizer(vocab_size=280)
    make_tiny_llama(vocab_size=len(other_tokenizer)).save_pretrained(other)
    other_tokenizer.save_pretrained(other)
    assert "tokenizer differs" in one_line_error(runner.invoke(app, base + ["--draft", str(other)]))
