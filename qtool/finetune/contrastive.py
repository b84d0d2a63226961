"""Contrastive fine-tuning of a sentence-embedding model: InfoNCE over in-batch negatives (every other pair's
positive, and every hard negative of the batch when the data are triplets), cosine or dot similarity divided by a
temperature; retrieval metrics on a held-out split before and after; the result saved by sentence-transformers so
that `SentenceTransformer(output)` loads it. Tokenization and pooling are the model's own."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from qtool.core.errors import QtoolError
from qtool.core.output_dir import atomic_output_dir
from qtool.core.output_marker import check_replaceable
from qtool.core.output_path import check_output_path
from qtool.finetune.embedding_models import load_embedding_model
from qtool.finetune.pair_data import PairData, read_pairs, split_pairs
from qtool.finetune.retrieval_metrics import RetrievalMetrics, retrieval_metrics, similarity_scores
from qtool.finetune.similarity_names import SIMILARITIES

Progress = Callable[[int, int, str], None]
WEIGHT_DECAY = 0.01
WARMUP_FRACTION = 0.1  # of the steps, a linear warm-up before the linear decay to 0
MAX_GRAD_NORM = 1.0
EVAL_KS = (1, 5)


@dataclass
class EmbeddingReport:
    model: str
    output: str
    similarity: str
    temperature: float
    train_pairs: int
    eval_pairs: int
    hard_negatives: bool
    steps: int
    epochs: float  # steps over the steps of one pass through the training pairs
    seconds: float
    before: RetrievalMetrics | None  # None without a held-out split (eval_fraction 0)
    after: RetrievalMetrics | None
    losses: list[float] = field(default_factory=list)  # training loss of each step

    def to_dict(self) -> dict:
        plain = {name: getattr(self, name) for name in ("model", "output", "similarity", "temperature", "train_pairs", "eval_pairs",
                                                         "hard_negatives", "steps", "epochs", "seconds", "losses")}
        plain["before"] = self.before.to_dict() if self.before else None
        plain["after"] = self.after.to_dict() if self.after else None
        return plain


def info_nce_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor | None = None, *, similarity: str = "cosine",
                  temperature: float = 0.05, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of each anchor picking its own positive among the batch's candidates: all B positives,
    then all B hard negatives when given. `exclude` (B, candidates) marks candidates left out of an anchor's
    softmax (another row's copy of its own positive is no negative); it never marks the anchor's own positive."""
    candidates = positives if negatives is None else torch.cat([positives, negatives])
    logits = similarity_scores(anchors, candidates, similarity) / temperature
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
    targets = torch.arange(len(anchors), device=anchors.device)
    return torch.nn.functional.cross_entropy(logits, targets)


def duplicate_positives(positives: list[str], negatives: list[str] | None = None) -> torch.Tensor:
    """The `exclude` mask for a batch: candidate j for anchor i when its text is anchor i's positive text and j is
    not i itself (answers such as "Yes" recur across rows; scoring them as negatives would teach the wrong thing)."""
    candidates = positives + (negatives or [])
    mask = torch.tensor([[text == positive for text in candidates] for positive in positives], dtype=torch.bool)
    mask[torch.arange(len(positives)), torch.arange(len(positives))] = False
    return mask


def embed_batch(model: Any, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings with gradients, through the model's own tokenizer, pooling and normalisation."""
    features = model.preprocess(texts)
    features = {name: value.to(model.device) if torch.is_tensor(value) else value for name, value in features.items()}
    return model(features)["sentence_embedding"]


def encode(model: Any, texts: list[str], batch_size: int) -> torch.Tensor:
    """Sentence embeddings for evaluation: sentence-transformers' own encode (eval mode, no gradients)."""
    return model.encode(texts, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False)


def evaluate_retrieval(model: Any, pairs: PairData, similarity: str, batch_size: int = 32) -> RetrievalMetrics:
    """Each anchor retrieves among the distinct positive texts of `pairs` (a text given twice is one document)."""
    documents = list(dict.fromkeys(pairs.positives))
    row_of = {text: row for row, text in enumerate(documents)}
    relevant = torch.tensor([row_of[text] for text in pairs.positives])
    queries = encode(model, pairs.anchors, batch_size)
    return retrieval_metrics(queries, encode(model, documents, batch_size), relevant.to(queries.device), similarity, EVAL_KS)


def check_settings(*, epochs: int, max_steps: int | None, lr: float, batch_size: int, temperature: float, similarity: str) -> None:
    if similarity not in SIMILARITIES:
        raise QtoolError(f"--similarity {similarity!r} is not a similarity", f"give one of {', '.join(SIMILARITIES)}")
    if batch_size < 2:
        raise QtoolError(f"--batch-size {batch_size} is too small", "give at least 2: the other pairs of a batch are the negatives")
    if epochs < 1:
        raise QtoolError(f"--epochs {epochs} is out of range", "give at least 1")
    if max_steps is not None and max_steps < 1:
        raise QtoolError(f"--max-steps {max_steps} is out of range", "give at least 1, or leave it out to train --epochs passes")
    if not lr > 0 or not math.isfinite(lr):
        raise QtoolError(f"--lr {lr} is out of range", "give a positive learning rate, e.g. 2e-5")
    if not temperature > 0 or not math.isfinite(temperature):
        raise QtoolError(f"--temperature {temperature} is out of range", "give a positive temperature, e.g. 0.05 (scale 20)")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise QtoolError(f"--device {device!r} is not a device", "give auto, cpu, cuda or cuda:N") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise QtoolError(f"--device {device} needs a CUDA GPU and none is visible", "give --device cpu or auto")
    return resolved


def batches_of_epoch(count: int, batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """A seeded shuffle cut into batches; a last batch of one pair (no in-batch negative) joins the previous one."""
    order = torch.randperm(count, generator=generator).tolist()
    batches = [order[start : start + batch_size] for start in range(0, count, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] += batches.pop()
    return batches


def warmup_then_linear_decay(total_steps: int) -> Callable[[int], float]:
    warmup = max(1, round(WARMUP_FRACTION * total_steps))
    return lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def train_embeddings(model: str | Path | Any, data: str | Path | PairData, output: str | Path, *, epochs: int = 1, max_steps: int | None = None,
                     lr: float = 2e-5, batch_size: int = 32, temperature: float = 0.05, similarity: str = "cosine", eval_fraction: float = 0.2,
                     seed: int = 0, progress: Progress | None = None, device: str = "auto", force: bool = False) -> EmbeddingReport:
    """Fine-tune `model` (an alias, a sentence-transformers directory, or a SentenceTransformer, trained in place)
    on the pairs or triplets in `data` and save it to `output`. `max_steps`, when given, replaces `epochs`. The
    retrieval metrics are measured on `eval_fraction` of the rows, held out by `seed`, before and after."""
    check_settings(epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size, temperature=temperature, similarity=similarity)
    # refused outputs fail here, not after the training
    sources = [source for source in (model, data) if isinstance(source, (str, Path)) and Path(source).exists()]
    check_replaceable(check_output_path(output, sources), force)
    pairs = data if isinstance(data, PairData) else read_pairs(data)
    train, held_out = split_pairs(pairs, eval_fraction, seed)
    if len(train) < 2:
        raise QtoolError(f"pair data {pairs.source} holds {len(train)} training pair(s)", "give at least 2: the other pairs of a batch are the negatives")
    target = resolve_device(device)
    started = time.perf_counter()
    if isinstance(model, (str, Path)):
        name, model = str(model), load_embedding_model(model, device=str(target))
    else:
        name = type(model).__name__
        model.to(target)
    before = evaluate_retrieval(model, held_out, similarity, batch_size) if held_out else None

    steps_per_epoch = len(batches_of_epoch(len(train), batch_size, torch.Generator().manual_seed(seed)))
    total = max_steps if max_steps is not None else epochs * steps_per_epoch
    losses = _train_loop(model, train, total, lr=lr, batch_size=batch_size, temperature=temperature, similarity=similarity, seed=seed,
                         device=target, progress=progress)
    after = evaluate_retrieval(model, held_out, similarity, batch_size) if held_out else None
    with atomic_output_dir(Path(output), force=force, what="sentence-transformers embedding model") as staging:
        model.save(str(staging))
    return EmbeddingReport(model=name, output=str(output), similarity=similarity, temperature=temperature, train_pairs=len(train),
                           eval_pairs=len(held_out) if held_out else 0, hard_negatives=train.has_negatives, steps=total,
                           epochs=total / steps_per_epoch, seconds=time.perf_counter() - started, before=before, after=after, losses=losses)


def _train_loop(model: Any, train: PairData, total: int, *, lr: float, batch_size: int, temperature: float, similarity: str, seed: int,
                device: torch.device, progress: Progress | None) -> list[float]:
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay(total))
    order = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    # dropout draws from torch's global generator: seed it for this run only, leaving the caller's stream as it was
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.train()
        try:
            while len(losses) < total:
                for batch in batches_of_epoch(len(train), batch_size, order):
                    if len(losses) == total:
                        break
                    losses.append(_step(model, train.subset(batch), optimizer, parameters, temperature, similarity))
                    schedule.step()
                    if progress is not None:
                        progress(len(losses), total, f"loss {losses[-1]:.4f}")
        finally:
            model.eval()
    return losses


def _step(model: Any, batch: PairData, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], temperature: float, similarity: str) -> float:
    anchors = embed_batch(model, batch.anchors)
    positives = embed_batch(model, batch.positives)
    negatives = embed_batch(model, batch.negatives) if batch.negatives is not None else None
    exclude = duplicate_positives(batch.positives, batch.negatives).to(anchors.device)
    loss = info_nce_loss(anchors, positives, negatives, similarity=similarity, temperature=temperature, exclude=exclude)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
    optimizer.step()
    return loss.item()
