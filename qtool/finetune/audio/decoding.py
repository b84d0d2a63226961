"""Greedy transcription: the encoder runs once, the decoder one token per step over its KV cache, from the prompt
until every sequence has produced <|endoftext|> (or the length budget ends)."""

from __future__ import annotations

import inspect

import torch
from transformers import WhisperForConditionalGeneration

from qtool.finetune.audio.transcripts import DecoderPrompt

# transformers 5 renamed the forward's `past_key_values` to `cache` (and the output's field with it).
_CACHE = "cache" if "cache" in inspect.signature(WhisperForConditionalGeneration.forward).parameters else "past_key_values"


@torch.no_grad()
def greedy_transcribe(model, features: torch.Tensor, prompt: DecoderPrompt, max_new_tokens: int) -> list[list[int]]:
    """The generated token ids of each [n_mels, n_frames] feature row (prompt excluded, <|endoftext|> kept)."""
    batch = features.shape[0]
    max_new_tokens = min(max_new_tokens, model.config.max_target_positions - len(prompt.ids))
    encoded = model.get_encoder()(features).last_hidden_state
    step_input = torch.tensor([prompt.ids] * batch, device=features.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=features.device)
    cache, generated = None, []
    for _ in range(max_new_tokens):
        out = model(encoder_outputs=(encoded,), decoder_input_ids=step_input, use_cache=True, **{_CACHE: cache})
        cache = out[_CACHE]
        next_ids = out.logits[:, -1].argmax(dim=-1).masked_fill(finished, prompt.eos_id)
        generated.append(next_ids)
        finished |= next_ids == prompt.eos_id
        if finished.all():
            break
        step_input = next_ids[:, None]
    if not generated:
        return [[] for _ in range(batch)]
    return torch.stack(generated, dim=1).tolist()
