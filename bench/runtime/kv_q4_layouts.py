"""Simulate q4 KV cache layouts on SmolLM2-135M before building one: every layer's keys/values quantized and
dequantized in place (fake quantization) inside the engine's own model runner, perplexity on the first windows of
wikitext-2 test. CPU only, float32.

    OMP_NUM_THREADS=1 python bench/runtime/kv_q4_layouts.py --windows 3 [--layouts NAME,...] [--json OUT]

Read modes: "all" (every query reads every key and value quantized, the last partial block's keys aside: the engine's
one-chunk prefill, which `qtool eval --engine` runs) and "own" (a query reads its own block's keys and values exact,
older blocks quantized: what a token-by-token decode would see if the block being filled were staged for values as
the engine stages it for keys); "own_keys": the own block's keys exact, values all quantized."""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from qtool.checkpoints.sources import load_model
from qtool.data.text import tokenize_text
from qtool.runtime.engine.model_runner import ModelRunner, apply_rope

BLOCK = 16
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
TEST = "/work/shared/data/wikitext-2-raw/wiki.test.raw"


def fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def uniform(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, levels: int = 16) -> torch.Tensor:
    """x quantized to `levels` evenly spaced values over [low, high] (broadcast), clamped."""
    step = ((high - low) / (levels - 1)).clamp_min(1e-12)
    return ((x - low) / step).round().clamp(0, levels - 1) * step + low


def per_token_asym(x: torch.Tensor, group: int = 64, clip: bool = False) -> torch.Tensor:
    """Per (token, head) groups along the last dim: fp16 scale + minimum, 16 levels; with clip, the range narrowed
    about its middle by the ratio (of CLIP_RATIOS) of least squared error, group by group."""
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group, group)
    best, best_error = None, None
    for ratio in CLIP_RATIOS if clip else (1.0,):
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        middle, half = (hi + lo) / 2, (hi - lo) / 2 * ratio
        low = fp16(middle - half)
        step = fp16(2 * half / 15)
        q = uniform(g, low, low + 15 * step)
        error = (q - g).square().sum(-1, keepdim=True)
        best = q if best is None else torch.where(error < best_error, q, best)
        best_error = error if best_error is None else torch.minimum(error, best_error)
    return best.reshape(shape)


class SimAttention:
    """The runner's attention: quantize-dequantize the layer's whole context by a layout, read it per mode."""

    def __init__(self, runner: ModelRunner, layout: dict):
        self.runner, self.layout = runner, layout
        self.layer = 0
        self.cos_sin = None
        self.prepared: dict = {}

    def rope_tables(self, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos_sin is None or self.cos_sin[0].shape[0] < n:
            positions = torch.arange(n, device=device)
            cos, sin = self.runner.rotary(torch.zeros(1, n, 1), positions.unsqueeze(0))
            self.cos_sin = (cos[0], sin[0])
        return self.cos_sin[0][:n], self.cos_sin[1][:n]

    def keys(self, k_post: torch.Tensor, layer: int) -> torch.Tensor:
        """The keys as the layout stores and returns them (post-RoPE, fake-quantized)."""
        spec = self.layout.get("keys")
        if spec is None:
            return k_post
        cos, sin = self.rope_tables(k_post.shape[0], k_post.device)
        pre = spec.get("pre_rope", False)
        x = apply_rope(k_post, cos, -sin) if pre else k_post
        kind = spec["kind"]
        if kind == "block_channel":  # per group of tokens (BLOCK, or the spec's group), per channel fp16 scale + min
            n = x.shape[0]
            group = spec.get("group", BLOCK)
            full = n // group * group
            b = x[:full].reshape(-1, group, *x.shape[1:])
            low = fp16(b.amin(1, keepdim=True))
            step = fp16((b.amax(1, keepdim=True) - low) / 15)
            q = torch.cat((uniform(b, low, low + 15 * step).reshape(full, *x.shape[1:]), x[full:]))
        elif kind == "engine_block":  # the engine's q4 keys: int8 zero per channel, fp16 scale per (block, head)
            from qtool.runtime.engine.kv_quant import dequantize_q4_channels, quantize_q4_channels

            n = x.shape[0]
            full = n // BLOCK * BLOCK
            rot = self.prepared["rotation"] if spec.get("rotate") else torch.eye(x.shape[-1])
            b = x[:full].reshape(-1, BLOCK, *x.shape[1:]) @ rot
            packed, zeros, scales = quantize_q4_channels(b, torch.ones(b.shape[:2], dtype=torch.bool))
            deq = dequantize_q4_channels(packed, zeros.unsqueeze(1), scales.unsqueeze(1)) @ rot.T
            q = torch.cat((deq.reshape(full, *x.shape[1:]), x[full:]))
        elif kind == "two_step":  # int8 zero point per channel in units of its own per-head step, codes' step
            n = x.shape[0]
            full = n // BLOCK * BLOCK
            rot = self.prepared["rotation"] if spec.get("rotate") else torch.eye(x.shape[-1])
            b = x[:full].reshape(-1, BLOCK, *x.shape[1:]) @ rot  # [B, rows, heads, d]
            low, high = b.amin(1, keepdim=True), b.amax(1, keepdim=True)
            zstep = fp16(low.abs().amax(-1, keepdim=True) / 127).clamp_min(2**-24)
            zero = torch.floor(low / zstep) * zstep
            step = fp16((high - zero).amax(-1, keepdim=True) / 15).clamp_min(2**-24)
            deq = ((b - zero) / step).round().clamp(0, 15) * step + zero
            q = torch.cat(((deq @ rot.T).reshape(full, *x.shape[1:]), x[full:]))
        else:
            raise ValueError(kind)
        return apply_rope(q, cos, sin) if pre else q

    def values(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        spec = self.layout.get("values")
        if spec is None:
            return v
        x = v @ self.prepared["rotation"] if spec.get("rotate") else v
        q = per_token_asym(x, spec.get("group", 64), spec.get("clip", False))
        return q @ self.prepared["rotation"].T if spec.get("rotate") else q

    def __call__(self, query, key_cache, value_cache, batch, scale, sliding_window=None, softcap=None):
        layer = self.layer % len(self.runner.layers)
        self.layer += 1
        n = batch.context_lens[0]
        kv_heads, d = key_cache.shape[-2:]
        k = key_cache.reshape(-1, kv_heads, d)[:n].float()
        v = value_cache.reshape(-1, kv_heads, d)[:n].float()
        kq, vq = self.keys(k, layer), self.values(v, layer)
        group = query.shape[1] // kv_heads
        q = query.float().transpose(0, 1)  # [heads, n, d]
        expand = lambda t: t.repeat_interleave(group, dim=1).transpose(0, 1)  # noqa: E731
        pos = torch.arange(n)
        causal = pos[None, :] <= pos[:, None]
        own_block = self.layout.get("own_block", BLOCK)
        own = (pos[None, :] // own_block) == (pos[:, None] // own_block)
        mode = self.layout.get("read", "all")
        exact_values = None  # as exact_keys
        if mode == "own":
            exact_keys = own & causal
        elif mode == "own_keys":  # the own block's keys exact, every value quantized (no staging of values)
            exact_keys, exact_values = own & causal, torch.zeros_like(causal)
        elif mode.startswith("recent"):
            exact_keys = causal & (pos[None, :] > pos[:, None] - int(mode[6:]))
        else:
            exact_keys = torch.zeros_like(causal)
        scores_q = q @ expand(kq).transpose(1, 2)
        scores_e = q @ expand(k).transpose(1, 2)
        scores = torch.where(exact_keys, scores_e, scores_q) * scale
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        # values: the own block exact as well in "own"/"recent" modes
        exact_values = exact_keys if exact_values is None else exact_values
        out = (weights * (~exact_values)) @ expand(vq) + (weights * exact_values) @ expand(v)
        return out.transpose(0, 1).to(query.dtype)


def window_nll(runner: ModelRunner, ids: torch.Tensor) -> float:
    logits = runner.prompt_logits(ids)
    return torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()


def prepare(head_dim: int) -> dict:
    from qtool.runtime.engine.kv_quant import rotation

    return {"rotation": rotation(head_dim)}


# name -> what is quantized and how; "values": per token, groups of 64, float16 scale + minimum (the engine's),
# Hadamard-rotated. Figures: bench/RESULTS.md, "KV cache kinds".
LAYOUTS = {
    "float": {},
    "values_only": {"values": {"rotate": True}},
    "values_only_clipped": {"values": {"rotate": True, "clip": True}},
    "channel_fp16_after_rope": {"keys": {"kind": "block_channel"}, "values": {"rotate": True}},
    "channel_fp16_before_rope": {"keys": {"kind": "block_channel", "pre_rope": True}, "values": {"rotate": True}},
    # per channel over 64 tokens, and (read "own") the query's own 64-token block exact: the engine's q4 layout
    "channel_fp16_before_rope_64": {"keys": {"kind": "block_channel", "pre_rope": True, "group": 64},
                                    "values": {"rotate": True}, "own_block": 64},
    "engine_after_rope": {"keys": {"kind": "engine_block", "rotate": True}, "values": {"rotate": True}},
    "engine_before_rope": {"keys": {"kind": "engine_block", "rotate": True, "pre_rope": True},
                           "values": {"rotate": True}},
    "engine_before_rope_unrotated": {"keys": {"kind": "engine_block", "pre_rope": True}, "values": {"rotate": True}},
    "zero_step_before_rope": {"keys": {"kind": "two_step", "rotate": True, "pre_rope": True},
                              "values": {"rotate": True}},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--reads", default="all,own")
    parser.add_argument("--json")
    args = parser.parse_args()
    loaded = load_model("smollm2-135m", device="cpu", dtype=torch.float32)
    model, tokenizer = loaded.model, loaded.tokenizer
    runner = ModelRunner(model, num_blocks=-(-args.seqlen // BLOCK), block_size=BLOCK, fast_decode=False)
    test_ids = tokenize_text(tokenizer, open(TEST).read())
    windows = test_ids[: args.windows * args.seqlen].view(args.windows, args.seqlen)
    results = []
    for name in args.layouts.split(","):
        for read in args.reads.split(","):
            if name == "float" and read != "all":
                continue
            layout = dict(LAYOUTS[name], read=read)
            attention = SimAttention(runner, layout)
            attention.prepared = prepare(runner.head_dim)
            runner.attention = attention
            start = time.time()
            nll = sum(window_nll(runner, ids) for ids in windows)
            ppl = math.exp(nll / (args.windows * (args.seqlen - 1)))
            results.append({"layout": name, "read": read, "ppl": ppl})
            print(f"{name:24s} {read:8s} {ppl:.4f}  ({time.time() - start:.0f} s)", flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"windows": args.windows, "seqlen": args.seqlen, "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
