"""What every CLI test expects of a refused input (Typer's CliRunner result)."""

from __future__ import annotations


def one_line_error(result) -> str:
    """Exit 2 and one `error:` line, the last thing on stderr (transformers' loading bars may come before it);
    returns that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]
