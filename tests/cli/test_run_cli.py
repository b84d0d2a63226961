"""`qtool run` through the Typer app: streamed and JSON replies, prompts from stdin, the multi-turn chat loop
keeping its history, and bad inputs as one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qtool.cli.main import app
from qtool.cli.run import chat_loop
from qtool.runtime.reply import ReplyGenerator
from qtool.runtime.generate import GenerationSettings

from cli_checks import GREEDY, chat_model_fixtures, greedy_reply, one_line_error

runner = CliRunner()
tokenizer, model, model_dir = chat_model_fixtures(seed=31)


def test_json_reply_is_the_greedy_chat_reply(model_dir, model, tokenizer):
    result = runner.invoke(app, ["run", str(model_dir), "--prompt", "the fox", "--system", "be brief", "--json"] + GREEDY)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"text", "tokens", "seconds", "tokens_per_second", "time_to_first_token", "finish_reason", "engine"}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}]
    assert data["text"] == greedy_reply(model, tokenizer, messages)
    assert data["tokens"] == 6


def test_stream_goes_to_stdout_and_speed_to_stderr(model_dir, model, tokenizer):
    result = runner.invoke(app, ["run", str(model_dir), "--prompt", "the fox"] + GREEDY)
    assert result.exit_code == 0, result.output
    assert result.stdout == greedy_reply(model, tokenizer, [{"role": "user", "content": "the fox"}]) + "\n"
    assert "6 tokens in" in result.stderr and "tokens/s" in result.stderr


def test_raw_skips_the_template(model_dir, model, tokenizer):
    result = runner.invoke(app, ["run", str(model_dir), "--prompt", "the fox", "--raw", "--json"] + GREEDY)
    assert json.loads(result.stdout)["text"] == greedy_reply(model, tokenizer, "the fox")


def test_prompt_read_from_stdin_when_not_a_terminal(model_dir, model, tokenizer):
    result = runner.invoke(app, ["run", str(model_dir), "--json"] + GREEDY, input="what is the capital\n")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"] == greedy_reply(model, tokenizer, [{"role": "user", "content": "what is the capital"}])


def test_missing_chat_template_falls_back_to_raw(tmp_path, model, make_tiny_tokenizer):
    directory = tmp_path / "plain"
    model.save_pretrained(directory)
    plain_tokenizer = make_tiny_tokenizer()
    plain_tokenizer.save_pretrained(directory)
    result = runner.invoke(app, ["run", str(directory), "--prompt", "the fox", "--json"] + GREEDY)
    assert result.exit_code == 0, result.output
    assert "no chat template" in result.stderr
    assert json.loads(result.stdout)["text"] == greedy_reply(model, plain_tokenizer, "the fox")


def test_chat_loop_keeps_history_and_reset_forgets_it(model, tokenizer, capsys):
    settings = GenerationSettings(max_new_tokens=6, temperature=0)
    lines = iter(["the fox", "what is the capital", "/reset", "what is the capital", "/exit", "never read"])
    turns = chat_loop(ReplyGenerator(model, tokenizer), settings, "be brief", False, lambda: next(lines))
    assert turns == 3
    system = [{"role": "system", "content": "be brief"}]
    first = greedy_reply(model, tokenizer, system + [{"role": "user", "content": "the fox"}])
    history = system + [{"role": "user", "content": "the fox"}, {"role": "assistant", "content": first}]
    second = greedy_reply(model, tokenizer, history + [{"role": "user", "content": "what is the capital"}])
    fresh = greedy_reply(model, tokenizer, system + [{"role": "user", "content": "what is the capital"}])
    assert second != fresh, "the test needs the history to change the reply"
    assert capsys.readouterr().out == f"{first}\n{second}\n{fresh}\n"


def test_raw_chat_loop_continues_the_text(model, tokenizer, capsys):
    lines = iter(["the fox", " and the dog", None])
    assert chat_loop(ReplyGenerator(model, tokenizer), GenerationSettings(max_new_tokens=6, temperature=0), None, True, lambda: next(lines)) == 2
    first = greedy_reply(model, tokenizer, "the fox")
    second = greedy_reply(model, tokenizer, "the fox" + first + " and the dog")
    assert capsys.readouterr().out == f"{first}\n{second}\n"


# --dtype int4 is outside the option's choices, refused by Typer: test_choices.py.
@pytest.mark.parametrize(
    "extra, match",
    [
        (["--prompt", "hi", "--device", "tpu"], "--device tpu is not valid"),
        (["--prompt", "hi", "--temperature", "-1"], "--temperature -1.0 must not be negative"),
        (["--prompt", "hi", "--top-p", "0"], "--top-p 0.0 must be in (0, 1]"),
        ([], "no prompt: --prompt was not given and stdin is empty"),
    ],
)
def test_bad_inputs_are_one_line_errors(model_dir, extra, match):
    assert match in one_line_error(runner.invoke(app, ["run", str(model_dir)] + extra, input=""))


def test_missing_model_is_one_line():
    assert "not found" in one_line_error(runner.invoke(app, ["run", "./no/such/model", "--prompt", "hi", "--device", "cpu"]))


def test_batch_file_replies_in_input_order_equal_each_prompt_alone(tmp_path, model_dir, model, tokenizer):
    requests = tmp_path / "requests.jsonl"
    # past q4's first 64-token block, which each query reads exact: later ones read the earlier blocks quantized
    prompts = [" ".join([text] * 28) for text in ("the fox", "what is the capital", "the dog")]
    requests.write_text("".join(json.dumps({"id": f"r{i}", "prompt": text}) + "\n" for i, text in enumerate(prompts)))
    output = tmp_path / "replies.jsonl"
    result = runner.invoke(app, ["run", str(model_dir), "--batch", str(requests), "--output", str(output), "--json"] + GREEDY)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["requests"] == 3
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["r0", "r1", "r2"]
    assert [row["text"] for row in rows] == [greedy_reply(model, tokenizer, text) for text in prompts]
    again = runner.invoke(app, ["run", str(model_dir), "--batch", str(requests), "--output", str(output)] + GREEDY)
    assert again.exit_code == 2 and "already exists" in again.output


def test_batch_needs_an_output_and_output_needs_a_batch(tmp_path, model_dir):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    no_output = runner.invoke(app, ["run", str(model_dir), "--batch", str(requests)] + GREEDY)
    assert no_output.exit_code == 2 and "--batch needs --output" in no_output.output
    no_batch = runner.invoke(app, ["run", str(model_dir), "--prompt", "hi", "--output", str(tmp_path / "o.jsonl")] + GREEDY)
    assert no_batch.exit_code == 2 and "--output goes with --batch" in no_batch.output


def test_kv_cache_flag_reaches_the_engine(model_dir, model, tokenizer):
    from dataclasses import replace

    from qtool.runtime.reply import CHAT_ENGINE_CONFIG

    replies = ReplyGenerator(model, tokenizer, replace(CHAT_ENGINE_CONFIG, kv_cache="q4", block_size=None))
    expected = replies.reply([{"role": "user", "content": "the fox"}], GenerationSettings(max_new_tokens=6, temperature=0))
    assert replies.engine.runner.cache.is_quantized
    result = runner.invoke(app, ["run", str(model_dir), "--prompt", "the fox", "--kv-cache", "q4", "--json"] + GREEDY)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["text"] == expected.text


def test_kv_cache_flag_reaches_a_batch(tmp_path, model_dir, model, tokenizer):
    from qtool.runtime.batch import run_batch
    from qtool.runtime.batch_file import read_batch_requests
    from qtool.runtime.engine import EngineConfig

    requests = tmp_path / "requests.jsonl"
    # past q4's first 64-token block, which each query reads exact: later ones read the earlier blocks quantized
    prompts = [" ".join([text] * 28) for text in ("the fox", "what is the capital", "the dog")]
    requests.write_text("".join(json.dumps({"id": i, "prompt": text}) + "\n" for i, text in enumerate(prompts)))
    settings = GenerationSettings(max_new_tokens=16, temperature=0)

    def replies(kind: str) -> list[str]:
        result = run_batch(model, tokenizer, read_batch_requests(requests), settings, engine_config=EngineConfig(kv_cache=kind))
        return [output.text for output in result.outputs]

    expected = replies("q4")
    assert expected != replies("auto"), "this model's q4 replies differ from the float cache's: the test can tell"
    output = tmp_path / "replies.jsonl"
    result = runner.invoke(app, ["run", str(model_dir), "--batch", str(requests), "--output", str(output),
                                 "--kv-cache", "q4", "--json", "--temperature", "0", "--max-new-tokens", "16",
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["text"] for line in output.read_text().splitlines()] == expected
