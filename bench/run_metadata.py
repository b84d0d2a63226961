"""What a bench result says about the run that measured it: the UTC date, the device, the library versions, the git
commit and the command line, so that a number in bench/results can be traced to the machine, the code and the
flags behind it. One helper for every bench script; the scripts import it by name with bench/ on sys.path (bench/
holds scripts, not packages); and the one way a script prints its figures and saves them (print_and_save)."""

from __future__ import annotations

import datetime
import importlib
import json
import os
import platform
import shlex
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git_commit(short: bool = False) -> str | None:
    """$QTOOL_COMMIT when set (the device machine's copy of .git can be older than the tree it was sent: the command
    names the commit it sends), else HEAD of this checkout; None when neither knows."""
    if os.environ.get("QTOOL_COMMIT"):
        return os.environ["QTOOL_COMMIT"]
    command = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        commit = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or None


def device_name(device) -> str:
    """The GPU's name for a CUDA device, else the CPU's (as much as the platform tells)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def command_line(script: str | Path, argv: list[str]) -> str:
    """The command that runs it again from the repo root: the script's path in the repo and its arguments, quoted
    for a shell."""
    path = Path(script).resolve()
    shown = path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
    return shlex.join([shown, *argv])


def library_versions(*names: str) -> dict[str, str | None]:
    """Each named module's __version__, None for one that is not installed (a row then says so instead of failing)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = None
    return versions


def run_metadata(device, script: str | Path, argv: list[str], libraries: tuple[str, ...] = ()) -> dict:
    """The fields every result line of a bench run carries: date (UTC, to the second), device, torch's version and
    each of `libraries`', python's, git_commit and command (script: the bench file, normally __file__; argv: its
    arguments)."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        **library_versions("torch", *libraries),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "command": command_line(script, list(argv)),
    }


def print_and_save(figures: dict, path: Path | None) -> None:
    """Print a run's figures as indented JSON and, where `path` is given, write the same text there (its folder
    made), so that what a run showed and what it saved cannot differ."""
    text = json.dumps(figures, indent=2)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
