"""`qtool eval` through the Typer app: JSON and table output, --compare, and bad inputs as one-line errors."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from qtool.cli.main import app

from cli_checks import one_line_error, save_model_dir
from perplexity_reference import reference_perplexity

runner = CliRunner()


@pytest.fixture(scope="module")
def tokenizer(make_tiny_tokenizer):
    return make_tiny_tokenizer()


@pytest.fixture
def model_dir(tmp_path, make_tiny_llama, tokenizer):
    return save_model_dir(tmp_path / "tiny", make_tiny_llama(seed=21, vocab_size=len(tokenizer)), tokenizer)


@pytest.fixture
def text_file(tmp_path, tiny_words):
    rng = random.Random(8)
    path = tmp_path / "eval.txt"
    path.write_text("\n".join(" ".join(rng.choice(tiny_words) for _ in range(rng.randint(3, 12))) for _ in range(30)) + "\n")
    return path


def test_json_result_matches_reference(model_dir, text_file, make_tiny_llama, tokenizer):
    result = runner.invoke(app, ["eval", str(model_dir), "--perplexity", str(text_file), "--seqlen", "32", "--windows", "3", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data) == {"model", "ppl", "windows", "seqlen", "tokens", "seconds", "tokens_per_second"}
    assert (data["model"], data["windows"], data["seqlen"], data["tokens"]) == (str(model_dir), 3, 32, 93)
    ids = tokenizer.backend_tokenizer.encode(text_file.read_text(), add_special_tokens=False).ids
    expected, _ = reference_perplexity(make_tiny_llama(seed=21, vocab_size=len(tokenizer)), ids, 32, 3)
    assert data["ppl"] == pytest.approx(expected, rel=1e-5)
    assert "perplexity" not in result.stderr  # no progress bar with --json


def test_table_output_and_progress_on_stderr(model_dir, text_file):
    result = runner.invoke(app, ["eval", str(model_dir), "--perplexity", str(text_file), "--seqlen", "32", "--windows", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "perplexity of" in result.stdout and "ppl" in result.stdout
    assert "2/2" in result.stderr  # the bar reached window 2 of 2


def test_compare_json(tmp_path, model_dir, text_file, make_tiny_llama, tokenizer):
    half = tmp_path / "half"
    make_tiny_llama(seed=21, vocab_size=len(tokenizer)).half().save_pretrained(half)
    tokenizer.save_pretrained(half)
    args = ["eval", "--compare", str(model_dir), str(half), "--perplexity", str(text_file), "--seqlen", "32", "--windows", "2", "--device", "cpu", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [m["model"] for m in data["models"]] == [str(model_dir), str(half)]
    assert [m["bits_per_weight"] for m in data["models"]] == [32, 16]
    assert data["recommendation"].startswith(str(half))
    table = runner.invoke(app, args[:-1])
    assert table.exit_code == 0, table.output
    assert "recommended: " in table.stdout and "float16" in table.stdout


# --dtype int3 is outside the option's choices, refused by Typer: test_choices.py.
@pytest.mark.parametrize(
    "extra, match",
    [
        (["--perplexity", "{tmp}/missing.txt"], "missing.txt: no such file"),
        (["--perplexity", "{tmp}/empty.txt"], "empty.txt: the file is empty"),
        (["--perplexity", "{tmp}/short.txt", "--seqlen", "200"], "fewer than one window of --seqlen 200"),
        (["--perplexity", "{text}", "--seqlen", "1000"], "longer than the model's context"),
        (["--perplexity", "{text}", "--windows", "99", "--seqlen", "32"], "--windows 99 asks for more windows"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, model_dir, text_file, extra, match):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("the quick brown fox")
    args = ["eval", str(model_dir), "--device", "cpu"] + [a.format(tmp=tmp_path, text=text_file) for a in extra]
    assert match in one_line_error(runner.invoke(app, args))


def test_unknown_device_is_one_line_error(model_dir, text_file):
    line = one_line_error(runner.invoke(app, ["eval", str(model_dir), "--perplexity", str(text_file), "--device", "tpu"]))
    assert "--device tpu is not valid" in line


def test_several_models_need_compare(model_dir, text_file):
    line = one_line_error(runner.invoke(app, ["eval", str(model_dir), str(model_dir), "--perplexity", str(text_file)]))
    assert "add --compare" in line


def test_compare_needs_two_models(model_dir, text_file):
    line = one_line_error(runner.invoke(app, ["eval", "--compare", str(model_dir), "--perplexity", str(text_file), "--device", "cpu"]))
    assert "at least two models" in line


def test_missing_model_is_one_line(text_file):
    assert "not found" in one_line_error(runner.invoke(app, ["eval", "./no/such/model", "--perplexity", str(text_file), "--device", "cpu"]))


# --engine: the logits come from the engine's model runner (its attention, its paged KV cache). float32 on the
# CPU computes the same sums in another order: equal within float rounding.
ENGINE_ARGS = ["--seqlen", "40", "--windows", "2", "--device", "cpu", "--json"]


def engine_ppl(model_dir, text_file, *extra):
    result = runner.invoke(app, ["eval", str(model_dir), "--perplexity", str(text_file), *ENGINE_ARGS, "--engine", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_engine_ppl_equals_the_forwards(model_dir, text_file, make_tiny_llama, tokenizer):
    data = engine_ppl(model_dir, text_file)
    assert (data["engine"], data["kv_cache"], data["windows"], data["tokens"]) == (True, "auto", 2, 78)
    ids = tokenizer.backend_tokenizer.encode(text_file.read_text(), add_special_tokens=False).ids
    expected, _ = reference_perplexity(make_tiny_llama(seed=21, vocab_size=len(tokenizer)), ids, 40, 2)
    assert data["ppl"] == pytest.approx(expected, rel=1e-5)


def test_engine_ppl_with_quantized_kv_caches(model_dir, text_file):
    """Stated bounds on the ppl's change, from the logit bounds of tests/runtime/engine/test_kv_cache_kinds.py:
    |delta logit| <= 1.4% (q8) or 24% (q4) of the largest |logit|, under 0.85 on this tiny model. A token's NLL
    (logsumexp of the logits minus its own) moves by at most twice the largest logit change, so the ppl ratio stays
    within exp(2 * 0.014 * 0.85) < 1.024 (q8) and exp(2 * 0.24 * 0.85) < 1.51 (q4). Measured: 0.02% and 0.1%."""
    base = engine_ppl(model_dir, text_file)["ppl"]
    q8, q4 = (engine_ppl(model_dir, text_file, "--kv-cache", kind) for kind in ("q8", "q4"))
    assert q8["kv_cache"] == "q8" and q4["kv_cache"] == "q4"
    assert q8["ppl"] != base and q4["ppl"] != base  # the cache kind is in the path
    assert abs(q8["ppl"] / base - 1) <= 0.024
    assert abs(q4["ppl"] / base - 1) <= 0.51


def test_engine_table_names_the_cache(model_dir, text_file):
    result = runner.invoke(app, ["eval", str(model_dir), "--perplexity", str(text_file), *ENGINE_ARGS[:-1], "--engine", "--kv-cache", "q8"])
    assert result.exit_code == 0, result.output
    assert "(engine, kv cache q8)" in result.stdout


@pytest.mark.parametrize("extra, match", [
    (["--kv-cache", "q8"], "--kv-cache goes with --engine"),
    (["--engine", "--compare", "{model}"], "--engine cannot be combined with --compare yet"),
])
def test_engine_flag_misuse_is_one_line(model_dir, text_file, extra, match):
    args = ["eval", str(model_dir), "--perplexity", str(text_file), "--device", "cpu"] + [a.format(model=model_dir) for a in extra]
    assert match in one_line_error(runner.invoke(app, args))


def test_engine_refuses_a_family_it_cannot_take(tmp_path, text_file, tokenizer):
    from transformers import PhiConfig, PhiForCausalLM

    directory = tmp_path / "phi"
    config = PhiConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                       bos_token_id=1, eos_token_id=2)
    PhiForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    args = ["eval", str(directory), "--perplexity", str(text_file), *ENGINE_ARGS[:-1], "--engine"]
    line = one_line_error(runner.invoke(app, args))
    assert "--engine: the engine does not run model type 'phi' yet" in line and "drop --engine" in line
