"""The speech fine-tuning command through Typer's CliRunner, on an app built here (the lead registers it under
`qtool finetune`): a short run reports loss and WER as JSON and writes a model transformers reloads; bad data is
one error line."""

from __future__ import annotations

import json

import typer
from cli_checks import one_line_error
from speech_clips import TINY_SIZE, tone, write_wav
from transformers import WhisperForConditionalGeneration
from typer.testing import CliRunner

from qtool.cli.finetune_audio import finetune_audio
from qtool.finetune.audio.char_tokenizer import character_tokenizer
from qtool.finetune.audio.random_whisper import write_random_whisper


def app() -> typer.Typer:
    built = typer.Typer()
    built.command("finetune")(finetune_audio)
    built.command("other")(lambda: None)  # two commands, so the test names the one it runs as the lead's app will
    return built


def clips(tmp_path, rows):
    for name, _ in rows:
        write_wav(tmp_path / name, tone(0.6, 22050, freqs=(300.0 + 40 * len(name),)), 22050)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"audio": name, "text": text}) + "\n" for name, text in rows))
    return data


def test_a_short_run_reports_json_and_writes_a_reloadable_model(tmp_path):
    model = write_random_whisper(tmp_path / "tiny", character_tokenizer(), TINY_SIZE, seed=1)
    data = clips(tmp_path, [("a.wav", "the king"), ("bb.wav", "a wolf ran")])
    result = CliRunner().invoke(app(), ["finetune", str(model), "--data", str(data), "--output", str(tmp_path / "out"),
                                        "--max-steps", "3", "--lr", "1e-3", "--batch-size", "2", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["steps"] == 3 and report["train_examples"] == 2 and report["eval_on"] == "training data"
    assert 0.0 <= report["wer_after"] and report["loss_after"] > 0
    reloaded = WhisperForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert reloaded.config.max_source_positions == 150
    assert (tmp_path / "out" / "preprocessor_config.json").is_file() and (tmp_path / "out" / "tokenizer.json").is_file()


def test_bad_data_is_one_error_line(tmp_path):
    model = write_random_whisper(tmp_path / "tiny", character_tokenizer(), TINY_SIZE, seed=1)
    data = clips(tmp_path, [("a.wav", "")])
    result = CliRunner().invoke(app(), ["finetune", str(model), "--data", str(data), "--output", str(tmp_path / "out")])
    assert "line 1 has an empty 'text'" in one_line_error(result)
    result = CliRunner().invoke(app(), ["finetune", str(model), "--data", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "out")])
    assert "--data" in one_line_error(result) and "none.jsonl: no such file" in result.stderr
    assert not (tmp_path / "out").exists()
