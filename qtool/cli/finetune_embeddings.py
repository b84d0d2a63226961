"""`qtool finetune` for sentence-embedding models: contrastive (InfoNCE) training on pairs or triplets, retrieval
on a held-out split before and after, the result saved for sentence-transformers. The lead hooks this command into
the `finetune` group when the data are pairs/triplets or the model is a sentence-embedding model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.table import Table

from qtool.cli.choices import choice_enum, plain
from qtool.cli.finetune_options import Device, Force, JsonReport, OutputDir, PeakLr
from qtool.cli.render import handle_errors, print_json, progress_bar, stderr, stdout
from qtool.finetune.similarity_names import SIMILARITIES

if TYPE_CHECKING:  # imports torch: the command imports it when it runs
    from qtool.finetune.contrastive import EmbeddingReport

Similarity = choice_enum("Similarity", SIMILARITIES)


def retrieval_table(report: EmbeddingReport) -> Table:
    table = Table(title=f"held-out retrieval ({report.eval_pairs} queries, {report.after.documents} documents, {report.similarity})")
    for column in ("", *(f"recall@{k}" for k in report.after.recall), "MRR"):
        table.add_column(column, justify="right")
    for label, metrics in (("before", report.before), ("after", report.after)):
        table.add_row(label, *(f"{value:.3f}" for value in metrics.recall.values()), f"{metrics.mrr:.3f}")
    return table


@handle_errors
def finetune_embeddings(
    model: Annotated[str, typer.Argument(help="The sentence-embedding model: all-minilm-l6-v2 (bundled) or a sentence-transformers directory.")],
    data: Annotated[str, typer.Option("--data", help="Pairs or triplets: JSONL/JSON/CSV/Parquet with anchor/positive (+ negative), query/document or instruction/output columns, or Alpaca seed tasks.")],
    output: OutputDir,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training pairs.")] = 1,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Train this many batches instead of --epochs passes.")] = None,
    lr: PeakLr = 2e-5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Pairs per batch; each anchor's negatives are the batch's other positives (and hard negatives).")] = 32,
    temperature: Annotated[float, typer.Option("--temperature", help="Similarities are divided by it before the softmax (0.05 = scale 20).")] = 0.05,
    similarity: Annotated[Similarity, typer.Option("--similarity", help="Similarity of two embeddings, in training and in the retrieval metrics.")] = Similarity("cosine"),
    eval_fraction: Annotated[float, typer.Option("--eval-fraction", help="Share of the rows held out for the retrieval metrics (0: none).")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the held-out split, the batch order and dropout.")] = 0,
    device: Device = "auto",
    force: Force = False,
    as_json: JsonReport = False,
) -> None:
    """Fine-tune a sentence-embedding model on pairs or triplets (InfoNCE with in-batch negatives)."""
    from qtool.finetune.contrastive import train_embeddings

    with progress_bar("training", enabled=not as_json) as update:
        report = train_embeddings(model, data, output, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, temperature=temperature,
                                  similarity=plain(similarity), eval_fraction=eval_fraction, seed=seed, progress=update, device=device, force=force)
    if as_json:
        print_json(report.to_dict())
        return
    if report.after is not None:
        stdout.print(retrieval_table(report))
    stderr.print(f"{report.steps} steps ({report.epochs:.2f} epochs) on {report.train_pairs} pairs in {report.seconds:.1f} s, "
                 f"final loss {report.losses[-1]:.4f}; saved to {report.output}")
