"""`qtool convert` through the Typer app: JSON and table output, the output evaluated by `qtool eval`, and bad
requests as one red line with exit code 2."""

import json
import random

import pytest
import torch
from typer.testing import CliRunner

from qtool.cli.main import app
from qtool.checkpoints.exl2_checkpoint import load_exl2_model

from cli_checks import save_rtn_gptq_dir
from perplexity_reference import reference_perplexity

runner = CliRunner()


@pytest.fixture
def tokenizer(make_tiny_tokenizer):
    return make_tiny_tokenizer()


@pytest.fixture
def gptq_dir(tmp_path, make_tiny_llama, tokenizer):
    return save_rtn_gptq_dir(tmp_path / "gptq", make_tiny_llama(seed=4, vocab_size=len(tokenizer)), tokenizer)


@pytest.fixture
def text_file(tmp_path, tiny_words):
    rng = random.Random(3)
    path = tmp_path / "text.txt"
    path.write_text(" ".join(rng.choice(tiny_words) for _ in range(600)))
    return path


def test_json_report_and_eval_of_the_output(tmp_path, gptq_dir, text_file, tokenizer):
    out = tmp_path / "exl2"
    result = runner.invoke(app, ["convert", "gptq", "exl2", str(gptq_dir), str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["source_format"] == "gptq" and report["target_format"] == "exl2"
    assert report["lossless"] is False and report["logits_max_abs_diff"] > 0
    assert len(report["linears"]) == 14 and all(linear["rel_error"] < 0.1 for linear in report["linears"])
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "exl2"
    # `qtool eval` loads the EXL2 output through load_model; its ppl is that of an independent loop over the
    # same windows with the model loaded here
    evaluated = runner.invoke(app, ["eval", str(out), "--perplexity", str(text_file), "--seqlen", "32", "--windows", "3", "--device", "cpu", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    ppl = json.loads(evaluated.stdout)["ppl"]
    model = load_exl2_model(out, dtype=torch.float32)
    ids = tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert ppl == pytest.approx(reference_perplexity(model, ids, 32, 3)[0], rel=1e-4)


def test_table_output_and_force(tmp_path, gptq_dir):
    out = tmp_path / "f16"
    result = runner.invoke(app, ["convert", "gptq", "float", str(gptq_dir), str(out)])
    assert result.exit_code == 0, result.output
    assert "lossless" in result.stdout and "bit-equal" in result.stdout
    again = runner.invoke(app, ["convert", "gptq", "float", str(gptq_dir), str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert runner.invoke(app, ["convert", "gptq", "float", str(gptq_dir), str(out), "--force"]).exit_code == 0


def test_round_trip_through_the_cli(tmp_path, gptq_dir):
    exl2, back = tmp_path / "exl2", tmp_path / "back"
    assert runner.invoke(app, ["convert", "gptq", "exl2", str(gptq_dir), str(exl2)]).exit_code == 0
    result = runner.invoke(app, ["convert", "exl2", "gptq", str(exl2), str(back), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["lossless"] is True and report["logits_max_abs_diff"] == 0.0


# A format name outside SRC_FORMAT's or DST_FORMAT's choices (gptx) is refused by Typer: test_choices.py.
@pytest.mark.parametrize(
    "args, message",
    [
        (["gptq", "gptq"], "both gptq"),
        (["exl2", "float"], "is a gptq checkpoint, not exl2"),
        (["gptq", "exl2", "--bits", "4"], "apply to exl2 -> gptq only"),
    ],
)
def test_bad_requests_are_one_line(tmp_path, gptq_dir, args, message):
    formats, options = args[:2], args[2:]
    result = runner.invoke(app, ["convert", *formats, str(gptq_dir), str(tmp_path / "out"), *options])
    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_source(tmp_path):
    result = runner.invoke(app, ["convert", "gptq", "exl2", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert result.exit_code == 2 and "not a checkpoint directory" in result.stderr


def test_listed_in_help():
    assert "convert" in runner.invoke(app, ["--help"]).stdout


def test_requantize_to_a_new_bpw(tmp_path, gptq_dir, text_file, tokenizer):
    out = tmp_path / "exl2_45"
    args = ["convert", "gptq", "exl2", str(gptq_dir), str(out), "--bpw", "4.5", "--calibration", str(text_file), "--samples", "4", "--seqlen", "32", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert abs(report["bits_per_weight"] - 4.5) <= 0.02 and report["lossless"] is False
    assert (out / "measurement.json").exists()
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bits"] == 4.5 and config["calibration"]["rows"] == 4
    # the reported logits change is the one measured here
    from qtool.checkpoints.gptq_checkpoint import load_quantized_model
    from qtool.convert.convert import check_ids

    source = load_quantized_model(gptq_dir, dtype=torch.float32)
    ids = check_ids(tokenizer, source.config.vocab_size)
    with torch.no_grad():
        diff = load_exl2_model(out, dtype=torch.float32)(ids).logits.double() - source(ids).logits.double()
    assert report["logits_max_abs_diff"] == pytest.approx(float(diff.abs().max()), rel=1e-9)


def test_requantize_to_fit_a_vram_budget(tmp_path, gptq_dir, text_file):
    """--target-vram picks the bpw; the note shows the arithmetic and the bpw reached fits it."""
    out = tmp_path / "exl2_vram"
    config = json.loads((gptq_dir / "config.json").read_text())
    # a budget that leaves 3.3 bpw for the decoder linears after the float16 tensors, cache and scratch
    hidden, inter, vocab, layers = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    linear_weights = layers * (hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * inter)
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    fixed = 2 * (embeddings + (2 * layers + 1) * hidden)
    kv = 2 * layers * kv_heads * head_dim * 32 * 2
    scratch = 32 * vocab * 4 + 32 * inter * 3 * 2
    budget = (fixed + kv + scratch + linear_weights * 3.305 / 8) / 1e9
    args = ["convert", "gptq", "exl2", str(gptq_dir), str(out), "--target-vram", f"{budget:.12f}", "--context-length", "32",
            "--calibration", str(text_file), "--samples", "4", "--seqlen", "32", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert any(note.startswith("--target-vram: 3.30 bpw") for note in report["notes"]), report["notes"]
    assert 3.25 <= report["bits_per_weight"] <= 3.32


# --head-bits 5 is outside the option's choices, refused by Typer: test_choices.py.
@pytest.mark.parametrize(
    "args, message",
    [
        (["--bpw", "4.0"], "needs calibration text"),
        (["--target-vram", "4.0"], "--target-vram re-quantizes, which needs calibration text"),
        (["--bpw", "4.0", "--target-vram", "4.0", "--calibration", "wikitext"], "--bpw and --target-vram both choose"),
        (["--bpw", "9", "--calibration", "wikitext"], "out of range"),
        (["--calibration", "wikitext"], "applies with --bpw or --target-vram only"),
    ],
)
def test_requantize_refusals(tmp_path, gptq_dir, args, message):
    result = runner.invoke(app, ["convert", "gptq", "exl2", str(gptq_dir), str(tmp_path / "o"), *args])
    assert result.exit_code == 2 and message in result.stderr
