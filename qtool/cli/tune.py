"""`qtool tune MODEL`: time the Triton GPTQ kernels' candidate plans for every quantized linear of a model at the
given batch sizes, ahead of use, into the plan cache that run and eval read (without it they use default plans)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from qtool.cli.choices import ModelDtype, complete_device, plain
from qtool.cli.render import MODEL_LOADING, handle_errors, print_json, progress_bar, stderr, stdout
from qtool.core.errors import QtoolError
from qtool.kernels.default_plans import DEFAULT_BATCH_SIZES

if TYPE_CHECKING:  # imports torch: the command imports it when it runs
    from qtool.runtime.kernel_tuning import TuneResult


def parse_batch_sizes(text: str) -> list[int]:
    """--batch-sizes: comma-separated integers >= 1."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(size < 1 for size in sizes):
        raise QtoolError(f"--batch-sizes {text!r} is not a list of batch sizes", "give integers >= 1 separated by commas, e.g. 1,8,64")
    return sizes


def plans_table(result: TuneResult) -> Table:
    table = Table(title=f"kernel plans on {result.gpu} ({result.dtype})")
    for column in ("K -> N", "bits", "M", "plan", "source"):
        table.add_column(column, overflow="fold")
    for plan in result.plans:
        table.add_row(f"{plan.in_features} -> {plan.out_features}", str(plan.bits), str(plan.m_bucket), plan.plan, plan.source)
    return table


@handle_errors
def tune(
    model: Annotated[str, typer.Argument(help="The GPTQ model (directory, Hub id or alias).")],
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Rows per call to tune for, comma-separated; each is tuned as its power-of-two bucket.")] = ",".join(map(str, DEFAULT_BATCH_SIZES)),
    device: Annotated[str, typer.Option("--device", rich_help_panel=MODEL_LOADING, autocompletion=complete_device, help="The GPU to tune on: auto, cuda or cuda:N (a CUDA GPU is needed).")] = "auto",
    dtype: Annotated[Optional[ModelDtype], typer.Option("--dtype", rich_help_panel=MODEL_LOADING, help="Dtype the model runs in (default bfloat16; the kernels take float16 or bfloat16).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plans and where they went as JSON.")] = False,
) -> None:
    """Tune the Triton GPTQ kernels for a model ahead of use (run and eval read the plans)."""
    sizes = parse_batch_sizes(batch_sizes)
    from qtool.runtime.kernel_tuning import tune_model, tuning_device

    tuning_device(device)  # no GPU: one line before any bar is drawn
    with progress_bar("tuning", enabled=not as_json) as update:
        result = tune_model(model, sizes, device=device, dtype=plain(dtype), progress=update)
    if as_json:
        print_json(result.to_dict())
        return
    stdout.print(plans_table(result))
    stderr.print(f"{result.tuned} plans tuned, {result.stored_before} tuned before, for {result.shapes} layer shapes "
                 f"({result.layers} layers) in {result.seconds:.1f} s; plans in {result.plan_cache}")
