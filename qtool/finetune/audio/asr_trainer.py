"""`train_asr`: fine-tune a Whisper-architecture model on (audio, transcript) pairs. Features are computed once,
the decoder is trained with teacher forcing on the transcript after its prompt (AdamW, warm-up then linear decay,
gradient clipping), and the model is measured before and after on the evaluation set: mean token loss and the
word error rate of its greedy transcripts. The result is saved as a transformers model directory."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from qtool.core.errors import QtoolError
from qtool.core.output_dir import atomic_output_dir
from qtool.core.output_marker import check_replaceable
from qtool.finetune.audio.decoding import greedy_transcribe
from qtool.finetune.audio.features import FeatureShape, log_mel_spectrogram, mel_filters, pad_or_trim
from qtool.finetune.audio.model_files import feature_extractor_for, load_whisper, save_whisper
from qtool.finetune.audio.speech_data import SpeechExample, load_audio, read_speech_jsonl
from qtool.finetune.audio.transcripts import IGNORE_INDEX, DecoderPrompt, decoder_prompt, training_pair, transcript_ids, transcript_text
from qtool.finetune.audio.wer import word_error_rate

Progress = Callable[[int, int, str], None]
FEATURE_BATCH = 16  # clips per STFT call: bounds the memory of the complex spectrum


@dataclass
class SpeechSet:
    """Examples ready for the model: features [N, n_mels, n_frames], decoder inputs and labels per example."""

    texts: list[str]
    features: torch.Tensor
    inputs: list[list[int]]
    labels: list[list[int]]
    encoded: torch.Tensor | None = None  # the frozen encoder's outputs [N, positions, width], computed once


@dataclass
class AsrReport:
    model: str
    output: str
    steps: int
    train_examples: int
    eval_examples: int
    eval_on: str  # "eval data" or "training data" (no --eval-data given)
    trained: str  # "encoder and decoder" or "decoder (encoder frozen)"
    loss_before: float
    loss_after: float
    wer_before: float
    wer_after: float
    train_loss_first: float
    train_loss_last: float
    seconds: float
    device: str
    samples: list[dict] = field(default_factory=list)  # a few references with the transcripts before and after

    def to_dict(self) -> dict:
        return asdict(self)


def prepare_speech(examples: list[SpeechExample], tokenizer, config, prompt: DecoderPrompt, option: str) -> SpeechSet:
    """Load, check and featurize every clip; tokenize every transcript. A clip longer than the encoder's window
    or a transcript longer than the decoder's positions is refused (it would be cut and mis-aligned)."""
    shape = FeatureShape.of_model(config)
    waves, inputs, labels = [], [], []
    for example in examples:
        wave = load_audio(example.audio)
        if wave.numel() > shape.n_samples:
            raise QtoolError(f"{option}: audio {example.audio} lasts {wave.numel() / 16000:.2f} s, longer than the model's {shape.seconds:g} s window",
                             "cut the clip (Whisper models read at most one window) or drop it")
        pair = training_pair(prompt, transcript_ids(tokenizer, example.text))
        if len(pair[0]) > config.max_target_positions:
            raise QtoolError(f"{option}: the transcript of {example.audio} is {len(pair[0])} tokens with its prompt, over the model's {config.max_target_positions}",
                             "split the clip and its transcript")
        waves.append(wave)
        inputs.append(pair[0])
        labels.append(pair[1])
    filters = mel_filters(shape.n_mels)
    features = torch.cat([log_mel_spectrogram(pad_or_trim(waves[i:i + FEATURE_BATCH], shape.n_samples), shape.n_mels, filters)
                          for i in range(0, len(waves), FEATURE_BATCH)])
    return SpeechSet(texts=[e.text for e in examples], features=features, inputs=inputs, labels=labels)


def collate(data: SpeechSet, indices: list[int], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """One batch: decoder inputs right-padded with the pad id, labels with the ignored index."""
    width = max(len(data.inputs[i]) for i in indices)
    inputs = torch.full((len(indices), width), pad_id, dtype=torch.long)
    labels = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
    for row, i in enumerate(indices):
        inputs[row, : len(data.inputs[i])] = torch.tensor(data.inputs[i])
        labels[row, : len(data.labels[i])] = torch.tensor(data.labels[i])
    batch = {"input_features": data.features[indices].to(device), "decoder_input_ids": inputs.to(device), "labels": labels.to(device)}
    if data.encoded is not None:
        batch["encoded"] = data.encoded[indices].to(device)
    return batch


def token_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the labelled tokens, their count)."""
    if "encoded" in batch:
        logits = model(encoder_outputs=(batch["encoded"],), decoder_input_ids=batch["decoder_input_ids"]).logits
    else:
        logits = model(input_features=batch["input_features"], decoder_input_ids=batch["decoder_input_ids"]).logits
    labels = batch["labels"]
    total = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((labels != IGNORE_INDEX).sum())


@torch.no_grad()
def encode_all(model, features: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """The encoder's outputs for every feature row, on the CPU (a frozen encoder gives the same ones every epoch)."""
    encoder = model.get_encoder()
    return torch.cat([encoder(features[i:i + batch_size].to(device)).last_hidden_state.cpu() for i in range(0, len(features), batch_size)])


@torch.no_grad()
def evaluate(model, tokenizer, data: SpeechSet, prompt: DecoderPrompt, batch_size: int, device: torch.device) -> tuple[float, float, list[str]]:
    """(mean token loss, corpus WER of greedy transcripts, the transcripts) on `data`."""
    was_training = model.training
    model.eval()
    loss_sum, tokens, hypotheses = 0.0, 0, []
    longest = max(len(labels) for labels in data.labels)
    for start in range(0, len(data.texts), batch_size):
        indices = list(range(start, min(start + batch_size, len(data.texts))))
        batch = collate(data, indices, model.config.pad_token_id, device)
        total, count = token_loss(model, batch)
        loss_sum, tokens = loss_sum + float(total), tokens + count
        # Room for a few more tokens than the longest reference, so an over-long transcript counts as insertions.
        generated = greedy_transcribe(model, batch["input_features"], prompt, max_new_tokens=longest + 8)
        hypotheses += [transcript_text(tokenizer, ids, prompt) for ids in generated]
    model.train(was_training)
    return loss_sum / tokens, word_error_rate(data.texts, hypotheses).wer, hypotheses


@dataclass
class AsrScore:
    loss: float
    wer: float
    examples: int


def evaluate_asr(model: str | Path, data: str | Path, *, batch_size: int = 8, device: str = "auto", language: str = "en") -> AsrScore:
    """Mean token loss and greedy-transcript WER of the Whisper model directory `model` on the speech JSONL `data`."""
    run_on = resolve_device(device)
    examples = read_speech_jsonl(data, "--eval-data")
    net, tokenizer = load_whisper(model)
    prompt = decoder_prompt(tokenizer, net.config, language)
    speech = prepare_speech(examples, tokenizer, net.config, prompt, "--eval-data")
    loss, wer, _ = evaluate(net.to(run_on), tokenizer, speech, prompt, batch_size, run_on)
    return AsrScore(loss=loss, wer=wer, examples=len(examples))


def learning_rate_factor(step: int, max_steps: int) -> float:
    """Linear warm-up over the first tenth of the steps, then linear decay to zero."""
    warmup = max(1, max_steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup))


def check_settings(max_steps: int, lr: float, batch_size: int) -> None:
    if max_steps < 1:
        raise QtoolError(f"--max-steps {max_steps} is not a step count", "give an integer >= 1")
    if not (lr > 0 and math.isfinite(lr)):
        raise QtoolError(f"--lr {lr} is not a learning rate", "give a positive number, e.g. 1e-4 (pretrained) or 1e-3 (from scratch)")
    if batch_size < 1:
        raise QtoolError(f"--batch-size {batch_size} is not a batch size", "give an integer >= 1")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QtoolError(f"--device {device}: no CUDA GPU is visible", "use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise QtoolError(f"--device {device!r} is not a device", "use auto, cpu, cuda or cuda:N") from None


def train_asr(model: str | Path, data: str | Path, output: str | Path, *, max_steps: int = 200, lr: float = 1e-4,
              batch_size: int = 8, eval_data: str | Path | None = None, seed: int = 0, progress: Progress | None = None,
              device: str = "auto", language: str = "en", freeze_encoder: bool = False, force: bool = False) -> AsrReport:
    """Fine-tune the Whisper model in directory `model` on the speech JSONL `data` for `max_steps` optimizer
    steps and save it to `output`; loss and WER are measured on `eval_data` (the training data if None).
    `freeze_encoder` trains the decoder alone on encoder outputs computed once: the usual choice for a pretrained
    model and little data, and several times cheaper per step (the encoder reads a full window every clip)."""
    check_settings(max_steps, lr, batch_size)
    check_replaceable(Path(output), force)  # before minutes of training, not after
    started = time.perf_counter()
    run_on = resolve_device(device)
    train_examples = read_speech_jsonl(data, "--data")
    eval_examples = read_speech_jsonl(eval_data, "--eval-data") if eval_data is not None else train_examples
    net, tokenizer = load_whisper(model)
    feature_extractor_for(net.config)  # refuses a window the saved extractor could not describe, before training
    prompt = decoder_prompt(tokenizer, net.config, language)
    train_set = prepare_speech(train_examples, tokenizer, net.config, prompt, "--data")
    eval_set = train_set if eval_data is None else prepare_speech(eval_examples, tokenizer, net.config, prompt, "--eval-data")
    net.to(run_on)
    if freeze_encoder:
        net.get_encoder().requires_grad_(False)
        train_set.encoded = encode_all(net.eval(), train_set.features, batch_size, run_on)

    loss_before, wer_before, hyp_before = evaluate(net, tokenizer, eval_set, prompt, batch_size, run_on)
    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: learning_rate_factor(step, max_steps))
    net.train()
    queue: list[int] = []
    losses = []
    for step in range(max_steps):
        if len(queue) < batch_size:  # a fresh shuffle of the whole set each epoch; small sets repeat within a batch's reach
            queue += torch.randperm(len(train_set.texts), generator=order).tolist()
        indices, queue = queue[:batch_size], queue[batch_size:]
        total, count = token_loss(net, collate(train_set, indices, net.config.pad_token_id, run_on))
        loss = total / count
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if progress is not None:
            progress(step + 1, max_steps, f"loss {losses[-1]:.3f}")
    net.eval().requires_grad_(True)
    loss_after, wer_after, hyp_after = evaluate(net, tokenizer, eval_set, prompt, batch_size, run_on)

    with atomic_output_dir(Path(output), force=force, what="fine-tuned speech recognizer") as staging:
        save_whisper(staging, net.to("cpu"), tokenizer, prompt)
    samples = [{"reference": ref, "before": before, "after": after} for ref, before, after in zip(eval_set.texts, hyp_before, hyp_after)][:3]
    return AsrReport(model=str(model), output=str(output), steps=max_steps, train_examples=len(train_examples), eval_examples=len(eval_examples),
                     eval_on="eval data" if eval_data is not None else "training data",
                     trained="decoder (encoder frozen)" if freeze_encoder else "encoder and decoder", loss_before=loss_before, loss_after=loss_after,
                     wer_before=wer_before, wer_after=wer_after, train_loss_first=losses[0], train_loss_last=losses[-1],
                     seconds=time.perf_counter() - started, device=str(run_on), samples=samples)
