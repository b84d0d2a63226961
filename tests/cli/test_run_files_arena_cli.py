"""`qtool run --file`, `--arena` and `--chat-template` through the Typer app: the reply is the greedy reply to the
conversation built independently here, the arena's table and --json hold each model's own reply, bad inputs are
one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qtool.cli.main import app

from cli_checks import GREEDY, chat_tokenizer_fixture, greedy_reply, one_line_error, save_model_dir

runner = CliRunner()
tokenizer = chat_tokenizer_fixture()


@pytest.fixture
def models(make_tiny_llama, tokenizer):
    return {seed: make_tiny_llama(seed=seed, vocab_size=len(tokenizer)) for seed in (41, 42)}


@pytest.fixture
def model_dirs(tmp_path, models, tokenizer):
    root = tmp_path / "models"
    return {seed: save_model_dir(root / f"tiny-{seed}", model, tokenizer) for seed, model in models.items()}


def test_files_go_in_front_of_the_prompt(tmp_path, model_dirs, models, tokenizer):
    (tmp_path / "a.py").write_text("print('the fox')\n")
    (tmp_path / "notes.md").write_text("lazy dog\n")
    result = runner.invoke(app, ["run", str(model_dirs[41]), "--file", str(tmp_path / "a.py"), "--file",
                                 str(tmp_path / "notes.md"), "--prompt", "what is this", "--json"] + GREEDY)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    content = ("<file name=\"a.py\">\nprint('the fox')\n\n</file>\n\n<file name=\"notes.md\">\nlazy dog\n\n</file>\n\n"
               "what is this")
    assert data["text"] == greedy_reply(models[41], tokenizer, [{"role": "user", "content": content}])
    assert [f["name"] for f in data["context"]["files"]] == ["a.py", "notes.md"] and data["context"]["cuts"] == []


def test_a_file_too_long_for_the_context_is_cut_and_said(tmp_path, model_dirs, models, tokenizer, tiny_words):
    import random

    rng = random.Random(5)
    (tmp_path / "long.txt").write_text(" ".join(rng.choice(tiny_words) for _ in range(400)))  # past 256 positions
    result = runner.invoke(app, ["run", str(model_dirs[41]), "--file", str(tmp_path / "long.txt"), "--prompt", "sum up"] + GREEDY)
    assert result.exit_code == 0, result.output
    assert "context: cut" in result.stderr and "from the end of long.txt" in result.stderr
    result = runner.invoke(app, ["run", str(model_dirs[41]), "--file", str(tmp_path / "long.txt"), "--prompt", "sum up", "--json"] + GREEDY)
    context = json.loads(result.stdout)["context"]
    assert context["prompt_tokens"] <= 256 - 6 < context["original_tokens"]
    assert context["files"][0]["cut_tokens"] > 0


def test_arena_table_and_json_hold_each_models_reply(model_dirs, models, tokenizer):
    conversation = [{"role": "user", "content": "the quick fox"}]
    expected = {str(model_dirs[s]): greedy_reply(models[s], tokenizer, conversation) for s in models}
    result = runner.invoke(app, ["run", "--arena", str(model_dirs[41]), str(model_dirs[42]), "--prompt", "the quick fox", "--json"] + GREEDY)
    assert result.exit_code == 0, result.output
    replies = json.loads(result.stdout)["replies"]
    assert {r["name"]: r["text"] for r in replies} == expected
    assert all(r["tokens"] == 6 and r["time_to_first_token"] > 0 and r["tokens_per_second"] > 0 for r in replies)
    result = runner.invoke(app, ["run", "--arena", str(model_dirs[41]), str(model_dirs[42]), "--prompt", "the quick fox"] + GREEDY,
                           env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    table = result.stdout
    assert "tokens/s" in table and "first token" in table
    for name, text in expected.items():
        assert name in table and text.strip().split()[0] in table


def test_chat_template_file_replaces_the_tokenizers(tmp_path, model_dirs, models, tokenizer):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant] ")
    result = runner.invoke(app, ["run", str(model_dirs[42]), "--chat-template", str(template), "--prompt", "the fox", "--json"] + GREEDY)
    assert result.exit_code == 0, result.output
    import copy

    edited = copy.deepcopy(tokenizer)
    edited.chat_template = template.read_text()
    expected = greedy_reply(models[42], edited, [{"role": "user", "content": "the fox"}])
    assert expected != greedy_reply(models[42], tokenizer, [{"role": "user", "content": "the fox"}])
    assert json.loads(result.stdout)["text"] == expected


@pytest.mark.parametrize("args, message", [
    (["--arena", "{a}"], "--arena needs at least two models"),
    (["{a}", "{b}"], "qtool run takes one MODEL, got 2"),
    (["{a}", "--file", "{missing}"], "--file"),
    (["{a}", "--file", "{pdf}"], "PDF files are not read"),
    (["{a}", "--chat-template", "{bad}"], "the chat template does not render"),
    (["{a}", "--chat-template", "{bad}", "--raw"], "--chat-template and --raw exclude each other"),
    (["--arena", "{a}", "{b}", "--speculate", "ngram"], "--arena compares plain replies"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, model_dirs, args, message):
    (tmp_path / "paper.pdf").write_bytes(b"%PDF-1.5 ...")
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    names = dict(a=model_dirs[41], b=model_dirs[42], missing=tmp_path / "none.py", pdf=tmp_path / "paper.pdf", bad=tmp_path / "bad.jinja")
    result = runner.invoke(app, ["run", *[a.format(**names) for a in args], "--prompt", "hi"] + GREEDY)
    assert message in one_line_error(result)
