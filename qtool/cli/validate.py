"""`qtool validate PATH`: check a config file, a quantized checkpoint or a float model directory, and show the
findings as a table or JSON. Exit 0 when clean or only warnings, 1 on errors, 2 when PATH cannot be read."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from qtool.cli.choices import complete_device
from qtool.cli.render import findings_table, handle_errors, print_json, stdout


@handle_errors
def validate(
    path: Annotated[str, typer.Argument(help="A config file (.yaml/.json/.toml), a preset name, or a model directory.")],
    config: Annotated[Optional[str], typer.Option("--config", help="With a float model directory: check this config against the model and the device.")] = None,
    device: Annotated[str, typer.Option("--device", autocompletion=complete_device, help="Device whose free memory the --config check uses: auto, cpu, cuda, cuda:N.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Validate a config file, a quantized checkpoint or a float model directory."""
    # dispatch imports torch only for model directories, so a config file or preset validates without it
    from qtool.validate.dispatch import validate_path

    report = validate_path(path, config_file=config, device=device)
    if as_json:
        print_json(report.to_dict())
    else:
        title = f"{report.kind.replace('_', ' ')} {report.path}: " + ("ok" if report.ok else "errors found")
        if report.findings:
            stdout.print(findings_table(report.findings, title))
        else:
            stdout.print(f"{title}, nothing to report")
    raise typer.Exit(0 if report.ok else 1)
