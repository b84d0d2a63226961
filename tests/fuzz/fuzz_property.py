"""The property every malformed input must meet, for one command's invocation: a non-zero exit with exactly one
error line naming the file (validate: a report with an error), no traceback, nothing written; exit 0 only where
the kind's oracle says the mutated file is still valid."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from fuzz_commands import WRITES_OUTPUT, Invocation, invoke
from fuzz_mutation import Mutation
from fuzz_originals import Originals
from fuzz_validity import still_valid

KEEP_DIR = os.environ.get("QTOOL_FUZZ_KEEP")  # where failing inputs are written (the last one is the shrunk one)


def check_mutation(originals: Originals, kind: str, command: str, mutation: Mutation) -> None:
    with tempfile.TemporaryDirectory(prefix="qtool-fuzz-") as directory:
        workspace = Path(directory)
        model = originals.workspace(kind, workspace, mutation.content)
        invocation = invoke(command, workspace, model, originals.text, originals.float_dir)
        try:
            assert_property(invocation, originals, kind, mutation, workspace / originals.kinds[kind].target)
        except AssertionError:
            keep_failing_case(kind, command, mutation)
            raise


def assert_property(inv: Invocation, originals: Originals, kind: str, mutation: Mutation, file: Path) -> None:
    context = f"{inv.command} on {kind} with {mutation.description}\nexit {inv.exit_code}\nstdout: {inv.stdout[-2000:]}\nstderr: {inv.stderr[-3000:]}"
    assert inv.exception is None, f"uncaught {type(inv.exception).__name__}: {inv.exception}\n{context}"
    assert "Traceback" not in inv.stdout + inv.stderr, context
    written = {path for path in inv.after if path not in inv.before and not path.startswith("out")}
    assert not written, f"files appeared next to the input: {sorted(written)}\n{context}"
    changed = {path for path in inv.before if path in inv.after and inv.before[path] != inv.after[path]}
    assert not changed, f"inputs changed: {sorted(changed)}\n{context}"
    if inv.exit_code == 0:
        assert not mutation.must_fail, f"exit 0 on an input invalid by construction\n{context}"
        assert still_valid(originals, kind, mutation.content), f"exit 0 but the oracle says the file is not valid\n{context}"
        if inv.command in WRITES_OUTPUT:
            assert inv.output.is_dir(), context
        return
    assert not inv.output.exists(), f"{inv.output} exists after a failed run\n{context}"
    assert not any(path.startswith(".out") for path in inv.after), f"partial output left: {sorted(inv.after)}\n{context}"
    if inv.command == "validate" and inv.exit_code == 1:
        report = json.loads(inv.stdout)
        assert report["ok"] is False and any(f["level"] == "error" for f in report["findings"]), context
        return
    assert inv.exit_code == 2, context
    errors = [line for line in inv.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line\n{context}"
    if still_valid(originals, kind, mutation.content) and not mutation.must_fail:
        return  # a valid input refused for another reason (no Hub for the default wikitext): the file is not to blame
    # the file itself, its directory, or a file of that directory (a config.json whose widths no longer fit the
    # tensors is reported on the tensor file)
    names = (file.name, str(file.parent), *(p.name for p in file.parent.iterdir()))
    assert any(name in errors[0] for name in names), f"the error line does not name {file.name} or {file.parent}\n{context}"


def keep_failing_case(kind: str, command: str, mutation: Mutation) -> None:
    if not KEEP_DIR:
        return
    directory = Path(KEEP_DIR) / kind
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"{command}"
    stem.with_suffix(".bin").write_bytes(mutation.content)
    stem.with_suffix(".txt").write_text(f"{mutation.description} ({command} failed)\n")
