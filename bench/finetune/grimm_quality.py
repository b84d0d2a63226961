"""Fine-tuning quality on SmolLM2 (CPU, minutes), the same steps for every row so the gain is read honestly:

1. domain adaptation: LoRA trained on ../shared/data/grimm/train.txt, perplexity on grimm/test.txt before and
   after (a GPTQ/EXL2 directory as --base trains QLoRA on it; --chat-steps 0 runs this part only);
2. chat: LoRA on the Alpaca seed tasks rendered as chat messages (loss on the answers only), the answer loss of
   held-out tasks before and after.

    python bench/finetune/grimm_quality.py --steps 30 --json bench/results/finetune_grimm.json
    python bench/finetune/grimm_quality.py --tiny      # a tiny random model: checks the script runs (seconds)

--steps 0 measures the untrained base only (with --eval-init, also the adapted model before any step: e.g.
--lora-init loftq --loftq-float smollm2-135m on a GPTQ --base).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))  # bench/ holds scripts, not packages: its shared modules import by name

from qtool.checkpoints.sources import load_model  # noqa: E402
from qtool.config.finetune_schema import FinetuneConfig  # noqa: E402
from qtool.eval.perplexity import perplexity  # noqa: E402
from qtool.finetune.data import load_examples  # noqa: E402
from qtool.finetune.job import prepare_model  # noqa: E402
from qtool.finetune.lora_setup import quantized_format  # noqa: E402
from qtool.finetune.packing import make_rows  # noqa: E402
from qtool.finetune.trainer import StepReport, TrainingRun, evaluate, train  # noqa: E402
from run_metadata import print_and_save  # noqa: E402

DATA = REPO.parent / "shared" / "data"
GRIMM = DATA / "grimm"
ALPACA = DATA / "alpaca-seed" / "seed_tasks.jsonl"
HELD_OUT_TASKS = 25


def seed_task_chats(path: Path) -> list[dict]:
    """Each seed task's first instance as one user/assistant exchange."""
    chats = []
    for line in path.read_text().splitlines():
        task = json.loads(line)
        instance = task["instances"][0]
        question = task["instruction"] + (f"\n\n{instance['input']}" if instance["input"].strip() else "")
        chats.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": instance["output"]}]})
    return chats


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def train_lora(model, tokenizer, data_path: Path, settings: FinetuneConfig, device: torch.device):
    data = load_examples(data_path, tokenizer, settings.seqlen)
    peft_model = prepare_model(model, settings)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = train(TrainingRun(model=peft_model, config=settings, rows=make_rows(data.examples, settings.seqlen, settings.packing),
                               pad_id=pad, device=device, progress=report_progress))
    return peft_model.eval(), result


def loss_on(model, tokenizer, path: Path, settings: FinetuneConfig, device: torch.device) -> float:
    data = load_examples(path, tokenizer, settings.seqlen)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return evaluate(model, make_rows(data.examples, settings.seqlen, packing=False), settings, pad, device)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def report_progress(report: StepReport) -> None:
    """A line every 10 steps (and the last): long CPU runs are watched from their log."""
    if report.step % 10 == 0 or report.step == report.total_steps:
        say(f"step {report.step}/{report.total_steps} loss {report.loss:.4f} lr {report.lr:.2e} "
            f"{report.tokens_per_second:.0f} tokens/s")


def perplexities(model, tokenizer, args, stage: str) -> dict:
    """Perplexity on each of --eval-split's grimm files: {split: {ppl, windows, tokens}}."""
    figures = {}
    for split in args.eval_split.split(","):
        result = perplexity(model, tokenizer, (GRIMM / f"{split}.txt").read_text(), seqlen=args.eval_seqlen, windows=args.eval_windows)
        say(f"grimm: {split} ppl {stage} {result.ppl:.3f} ({result.windows} windows of {result.seqlen})")
        figures[split] = {"ppl": result.ppl, "seqlen": result.seqlen, "windows": result.windows, "tokens": result.tokens}
    return figures


def grimm_rows(args, device: torch.device) -> dict:
    loaded = load_model(args.base, device=str(device))
    method = "qlora" if quantized_format(loaded.model) else "lora"
    row = {"base": args.base, "method": method, "eval_split": args.eval_split}
    if not args.no_before:
        row["before"] = perplexities(loaded.model, loaded.tokenizer, args, "before")
    if args.steps == 0 and not args.eval_init:  # the untrained base only
        return row
    warmup = args.warmup if args.warmup is not None else min(3, args.steps // 5)
    settings = FinetuneConfig(method=method, rank=args.rank, alpha=args.alpha or 2 * args.rank, lr=args.lr, max_steps=args.steps,
                              seqlen=args.seqlen, batch_tokens=args.batch_tokens, warmup_steps=warmup, dropout=args.dropout,
                              use_rslora=args.rslora, seed=args.seed, lora_init=args.lora_init, loftq_float=args.loftq_float or "")
    if args.eval_init:  # the adapted model before any step (loftq: the quantization error's rank-r part absorbed)
        row["at_init"] = perplexities(prepare_model(loaded.model, settings), loaded.tokenizer, args, f"at init ({args.lora_init})")
        if args.steps == 0:
            return row
        loaded = load_model(args.base, device=str(device))  # a plain base again for train_lora
    started = time.perf_counter()
    model, result = train_lora(loaded.model, loaded.tokenizer, GRIMM / "train.txt", settings, device)
    seconds = time.perf_counter() - started
    say(f"grimm: trained {args.steps} steps, losses {result.losses[0]:.3f} -> {result.losses[-1]:.3f}")
    row["after"] = perplexities(model, loaded.tokenizer, args, "after")
    row.update({"steps": args.steps, "seqlen": args.seqlen, "batch_tokens": args.batch_tokens, "rank": args.rank,
                "alpha": settings.alpha, "lr": args.lr, "warmup_steps": warmup, "dropout": args.dropout, "rslora": args.rslora,
                "seed": args.seed, "lora_init": args.lora_init, "first_loss": result.losses[0], "last_loss": result.losses[-1],
                "losses": result.losses, "train_seconds": seconds, "tokens_per_second": result.tokens_per_second})
    return row


def chat_rows(args, device: torch.device, work: Path) -> dict:
    chats = seed_task_chats(ALPACA)
    random.Random(0).shuffle(chats)
    held_out = write_jsonl(work / "held_out.jsonl", chats[:HELD_OUT_TASKS])
    training = write_jsonl(work / "train.jsonl", chats[HELD_OUT_TASKS:])
    loaded = load_model(args.base, device=str(device))
    method = "qlora" if quantized_format(loaded.model) else "lora"
    settings = FinetuneConfig(method=method, rank=args.rank, alpha=2 * args.rank, lr=args.lr, max_steps=args.chat_steps,
                              seqlen=args.seqlen, batch_tokens=args.batch_tokens, warmup_steps=min(3, args.chat_steps // 5))
    before = loss_on(loaded.model, loaded.tokenizer, held_out, settings, device)
    say(f"chat: held-out answer loss before {before:.4f}")
    model, result = train_lora(loaded.model, loaded.tokenizer, training, settings, device)
    after = loss_on(model, loaded.tokenizer, held_out, settings, device)
    say(f"chat: held-out answer loss after {after:.4f}")
    return {"base": args.base, "method": method, "steps": args.chat_steps, "train_tasks": len(chats) - HELD_OUT_TASKS,
            "held_out_tasks": HELD_OUT_TASKS, "answer_loss_before": before, "answer_loss_after": after,
            "first_loss": result.losses[0], "last_loss": result.losses[-1]}


def tiny_base(directory: Path) -> str:
    """A tiny random Llama with a ChatML tokenizer (tests/conftest.py's), for --tiny."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_CHAT_TEMPLATE, build_tiny_llama, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(chat_template=TINY_CHAT_TEMPLATE)
    build_tiny_llama(vocab_size=len(tokenizer), initializer_range=0.2).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def eval_splits(text: str) -> str:
    splits = [part.strip() for part in text.split(",") if part.strip()]
    if not splits or any(split not in ("valid", "test") for split in splits):
        raise argparse.ArgumentTypeError(f"{text!r}: use valid, test or valid,test")
    return ",".join(splits)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m", help="float model, or a GPTQ/EXL2 directory (qlora)")
    parser.add_argument("--steps", type=int, default=30, help="LoRA steps on grimm/train.txt")
    parser.add_argument("--chat-steps", type=int, default=30, help="LoRA steps on the seed tasks")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: min(3, steps // 5))")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout")
    parser.add_argument("--rslora", action="store_true", help="scale by alpha/sqrt(rank)")
    parser.add_argument("--seed", type=int, default=0, help="LoRA init, dropout and row order")
    parser.add_argument("--lora-init", choices=("default", "loftq"), default="default",
                        help="loftq: adapters start as the SVD of W_float - W_quantized (QLoRA; needs --loftq-float)")
    parser.add_argument("--loftq-float", default=None, help="the float model the quantized --base was made from")
    parser.add_argument("--eval-init", action="store_true", help="also the perplexity of the adapted model before training")
    parser.add_argument("--eval-split", default="test", type=eval_splits,
                        help="the grimm files perplexity is measured on, comma-separated: valid, test or valid,test "
                             "(choose settings on valid, report test)")
    parser.add_argument("--no-before", action="store_true", help="skip the untrained base's perplexity")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=None, help="first N windows of grimm/test.txt (default: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model and 3 steps: the script runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="grimm-quality-") as work:
        if args.tiny:
            args.base = tiny_base(Path(work) / "tiny")
            args.steps, args.chat_steps = 3, min(args.chat_steps, 3)
            args.seqlen, args.batch_tokens, args.eval_seqlen, args.eval_windows = 64, 128, 64, 2
        figures = {"grimm": grimm_rows(args, device)}
        if args.chat_steps > 0:  # 0: the grimm rows only (a max_steps of 0 would mean whole epochs to the trainer)
            figures["chat"] = chat_rows(args, device, Path(work))
    if args.tiny:
        for row in figures.values():
            row["base"] = "tiny random llama"
    print_and_save(figures, args.json)
    return figures


if __name__ == "__main__":
    main()
