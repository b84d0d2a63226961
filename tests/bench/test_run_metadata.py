"""bench/run_metadata.py, the fields every bench result line carries: the command is the one that reruns the script
from the repo root (arguments quoted), a library that is not installed is None instead of an error, and the commit
is this checkout's HEAD, or $QTOOL_COMMIT where git cannot say; the figures a script prints are those it saves."""

import json
import shlex
import subprocess

import torch

from bench_scripts import BENCH, load_bench_script


def test_command_reruns_the_script_from_the_repo_root():
    meta = load_bench_script("run_metadata")
    argv = ["--out", "/tmp/a b.jsonl", "--note", "it's"]
    command = meta.command_line(BENCH / "serve" / "serve_bench.py", argv)
    assert shlex.split(command) == ["bench/serve/serve_bench.py", *argv]


def test_every_field_on_a_cpu_and_a_missing_library_is_none():
    meta = load_bench_script("run_metadata")
    row = meta.run_metadata(torch.device("cpu"), BENCH / "runtime" / "runtime_bench.py", ["--tiny"],
                            libraries=("transformers", "no_such_module_here"))
    assert row["torch"] == torch.__version__ and row["no_such_module_here"] is None
    assert row["transformers"] and row["device"] and row["python"] and row["date"].endswith("+00:00")
    assert row["command"] == "bench/runtime/runtime_bench.py --tiny"


def test_commit_is_the_environment_s_else_head(monkeypatch):
    meta = load_bench_script("run_metadata")
    monkeypatch.delenv("QTOOL_COMMIT", raising=False)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=meta.REPO, capture_output=True, text=True).stdout.strip()
    assert meta.git_commit() == (head or None) and (not head or head.startswith(meta.git_commit(short=True)))

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setenv("QTOOL_COMMIT", "abc1234")  # named by the device command: wins over a stale .git
    assert meta.git_commit() == "abc1234"
    monkeypatch.setattr(subprocess, "run", no_git)
    assert meta.git_commit() == "abc1234"
    monkeypatch.delenv("QTOOL_COMMIT")
    assert meta.git_commit() is None


def test_the_saved_figures_are_the_printed_ones(tmp_path, capsys):
    meta = load_bench_script("run_metadata")
    figures = {"rows": [{"op": "aten::mm", "seconds": 0.125}], "note": "it's"}
    meta.print_and_save(figures, tmp_path / "new" / "out.json")
    printed = capsys.readouterr().out
    assert json.loads(printed) == figures and (tmp_path / "new" / "out.json").read_text() == printed
    meta.print_and_save(figures, None)
    assert json.loads(capsys.readouterr().out) == figures
