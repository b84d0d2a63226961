"""The embedding fine-tuning command through Typer's CliRunner, on an app built here (the lead hooks the command
into `qtool finetune`): a run that writes a model sentence-transformers loads and a report, and one-line refusals."""

from __future__ import annotations

import json

import pytest
import typer
from tiny_embedding_model import save_tiny_sentence_model, word_pairs
from typer.testing import CliRunner

from qtool.cli.finetune_embeddings import finetune_embeddings

from cli_checks import one_line_error

runner = CliRunner()


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    app = typer.Typer()
    app.command("finetune-embeddings")(finetune_embeddings)
    app.command("other")(lambda: None)  # two commands: the name stays a subcommand, as in the finetune group
    return app


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_sentence_model(tmp_path_factory.mktemp("tiny-st"))


@pytest.fixture
def triplets_file(tmp_path):
    path = tmp_path / "triplets.jsonl"
    path.write_text("".join(json.dumps({"anchor": a, "positive": p, "negative": n}) + "\n" for a, p, n in word_pairs(20, seed=6)))
    return path


def test_trains_saves_and_reports_json(app, tiny_model_dir, triplets_file, tmp_path):
    from sentence_transformers import SentenceTransformer

    result = runner.invoke(app, ["finetune-embeddings", str(tiny_model_dir), "--data", str(triplets_file), "--output", str(tmp_path / "out"),
                                 "--max-steps", "4", "--batch-size", "6", "--lr", "1e-3", "--similarity", "dot", "--eval-fraction", "0.25",
                                 "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["steps"], report["train_pairs"], report["eval_pairs"], report["hard_negatives"]) == (4, 15, 5, True)
    assert report["similarity"] == "dot" and set(report["after"]["recall"]) == {"1", "5"} and 0 < report["before"]["mrr"] <= 1
    assert SentenceTransformer(str(tmp_path / "out"), device="cpu").encode(["a red cat"]).shape == (1, 36)


def test_table_without_json(app, tiny_model_dir, triplets_file, tmp_path):
    result = runner.invoke(app, ["finetune-embeddings", str(tiny_model_dir), "--data", str(triplets_file), "-o", str(tmp_path / "out"),
                                 "--max-steps", "1", "--batch-size", "8", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "recall@1" in result.stdout and "MRR" in result.stdout and "before" in result.stdout and "after" in result.stdout
    assert "saved to" in result.stderr


def test_bad_data_is_one_line_naming_the_file_and_row(app, tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "document": "d"}\n{"query": "q2", "document": null}\n')
    result = runner.invoke(app, ["finetune-embeddings", str(tiny_model_dir), "--data", str(bad), "-o", str(tmp_path / "out"), "--device", "cpu"])
    line = one_line_error(result)
    assert str(bad) in line and "row 2" in line and "'document'" in line
    assert not (tmp_path / "out").exists()


def test_bad_options_are_refused_naming_them(app, tiny_model_dir, triplets_file, tmp_path):
    common = ["finetune-embeddings", str(tiny_model_dir), "--data", str(triplets_file), "-o", str(tmp_path / "out"), "--device", "cpu"]
    assert "--batch-size" in one_line_error(runner.invoke(app, [*common, "--batch-size", "1"]))
    assert "--temperature" in one_line_error(runner.invoke(app, [*common, "--temperature", "0"]))
    assert "all-minilm-l6-v2" in one_line_error(runner.invoke(app, ["finetune-embeddings", str(tmp_path / "nope"), "--data", str(triplets_file),
                                                                   "-o", str(tmp_path / "out")]))
    result = runner.invoke(app, [*common, "--similarity", "euclid"])
    assert result.exit_code == 2 and "cosine" in result.stderr and "dot" in result.stderr
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("not qtool's")
    assert "out" in one_line_error(runner.invoke(app, [*common, "--force"]))  # never replaces a folder qtool did not write
