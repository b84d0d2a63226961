"""Simulate q4 KV cache layouts on SmolLM2-135M before building one: every layer's keys/values quantized and
dequantized in place (fake quantization) inside the engine's own model runner, perplexity on the first windows of
wikitext-2 test. CPU only, float32.

    OMP_NUM_THREADS=1 python bench/runtime/kv_q4_layouts.py --windows 3 [--layouts NAME,...] [--json OUT]

Read modes: "all" (every query reads every key quantized, the engine's one-chunk prefill before the own-block read)
and "own" (a query reads the keys of its own block exact and older blocks quantized: what a token-by-token decode
sees when the block being filled is kept exact). Calibration (per-channel key ranges, codebooks) uses the first
windows of wikitext-2 *validation*, never the test windows measured."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass

import torch

from qtool.checkpoints.sources import load_model
from qtool.data.text import tokenize_text
from qtool.runtime.engine.model_runner import ModelRunner, apply_rope

BLOCK = 16
TEST = "/work/shared/data/wikitext-2-raw/wiki.test.raw"
VALID = "/work/shared/data/wikitext-2/wiki.valid.tokens"


def fp16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def uniform(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, levels: int = 16) -> torch.Tensor:
    """x quantized to `levels` evenly spaced values over [low, high] (broadcast), clamped."""
    step = ((high - low) / (levels - 1)).clamp_min(1e-12)
    return ((x - low) / step).round().clamp(0, levels - 1) * step + low


def codebook_round(t: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Each element of t replaced by its nearest codebook entry (codebook sorted, 1-D)."""
    mids = (codebook[1:] + codebook[:-1]) / 2
    return codebook[torch.bucketize(t.contiguous(), mids)]


def kmeans_1d(samples: torch.Tensor, k: int = 16, iters: int = 30) -> torch.Tensor:
    """Lloyd's k-means on scalar samples, started at quantiles."""
    samples = samples.flatten().double()
    centers = torch.quantile(samples[torch.randperm(samples.numel())[:1_000_000]],
                             torch.linspace(0.5 / k, 1 - 0.5 / k, k, dtype=torch.float64))
    for _ in range(iters):
        mids = (centers[1:] + centers[:-1]) / 2
        assign = torch.bucketize(samples, mids)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, samples)
        counts = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, torch.ones_like(samples))
        centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers).sort().values
    return centers.float()


def per_token_asym(x: torch.Tensor, group: int = 64) -> torch.Tensor:
    """Per (token, head) groups along the last dim: fp16 scale + minimum, 16 levels."""
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group, group)
    low = fp16(g.amin(-1, keepdim=True))
    step = fp16((g.amax(-1, keepdim=True) - low) / 15)
    return uniform(g, low, low + 15 * step).reshape(shape)


def per_token_codebook(x: torch.Tensor, codebook: torch.Tensor, group: int = 64) -> torch.Tensor:
    """Per (token, head) group: t = (x - mid) / half-range in [-1, 1], rounded to the codebook (fp16 mid, half)."""
    shape = x.shape
    g = x.reshape(*shape[:-1], shape[-1] // group, group)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    mid, half = fp16((high + low) / 2), fp16((high - low) / 2).clamp_min(1e-8)
    return (codebook_round(((g - mid) / half).clamp(-1, 1), codebook) * half + mid).reshape(shape)


def keep_outliers(x: torch.Tensor, quantized: torch.Tensor, count: int) -> torch.Tensor:
    """quantized with the `count` largest-|x| entries of each vector (last dim) restored exactly."""
    if count == 0:
        return quantized
    index = x.abs().topk(count, dim=-1).indices
    return quantized.scatter(-1, index, x.gather(-1, index))


@dataclass
class Calibration:
    """Per layer, pre-RoPE keys [n, kv_heads, d] and values of the calibration windows."""

    keys_pre: list[torch.Tensor]
    keys_post: list[torch.Tensor]
    values: list[torch.Tensor]


class SimAttention:
    """The runner's attention: quantize-dequantize the layer's whole context by a layout, read it per mode."""

    def __init__(self, runner: ModelRunner, layout: dict, calib: Calibration | None):
        self.runner, self.layout, self.calib = runner, layout, calib
        self.layer = 0
        self.cos_sin = None
        self.stats = {}
        self.record: Calibration | None = None
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
        if kind == "block_channel":  # per block of BLOCK tokens, per channel fp16 scale + min
            n = x.shape[0]
            full = n // BLOCK * BLOCK
            b = x[:full].reshape(-1, BLOCK, *x.shape[1:])
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
        elif kind == "static_channel":  # offline per-channel center/half-range (+ per-token scale + codebook)
            center, half = self.prepared["key_center"][layer], self.prepared["key_half"][layer]
            t = (x - center) / half
            if spec.get("token_scale"):  # per (token, head): one fp16 absmax of t
                s = fp16(t.abs().amax(-1, keepdim=True)).clamp_min(1e-8)
            else:
                s = torch.ones_like(t[..., :1])
            u = (t / s).clamp(-1, 1)
            codebook = self.prepared.get("key_codebook")
            if codebook is not None:
                uq = codebook_round(u, codebook[layer] if codebook.dim() == 2 else codebook)
            else:
                uq = uniform(u, torch.tensor(-1.0), torch.tensor(1.0))
            q = uq * s * half + center
            q = keep_outliers(x, q, 0) if not spec.get("outliers") else self._outliers(x, q, t / s, spec["outliers"])
        elif kind == "token":
            codebook = self.prepared.get("key_codebook_token")
            scaled = x / self.prepared["key_half"][layer] if spec.get("channel_scale") else x
            if codebook is not None:
                q = per_token_codebook(scaled, codebook[layer], spec.get("group", 64))
            else:
                q = per_token_asym(scaled, spec.get("group", 64))
            q = keep_outliers(scaled, q, spec.get("outliers", 0))
            if spec.get("channel_scale"):
                q = q * self.prepared["key_half"][layer]
        else:
            raise ValueError(kind)
        return apply_rope(q, cos, sin) if pre else q

    def _outliers(self, x, q, u, count):
        """Restore the `count` entries of each vector with the largest |u| (normalized) exactly."""
        index = u.abs().topk(count, dim=-1).indices
        return q.scatter(-1, index, x.gather(-1, index))

    def values(self, v: torch.Tensor, layer: int) -> torch.Tensor:
        spec = self.layout.get("values")
        if spec is None:
            return v
        x = v @ self.prepared["rotation"] if spec.get("rotate") else v
        codebook = self.prepared.get("value_codebook")
        if codebook is not None:
            q = per_token_codebook(x, codebook[layer], spec.get("group", 64))
        else:
            q = per_token_asym(x, spec.get("group", 64))
        q = keep_outliers(x, q, spec.get("outliers", 0))
        return q @ self.prepared["rotation"].T if spec.get("rotate") else q

    def __call__(self, query, key_cache, value_cache, batch, scale, sliding_window=None, softcap=None):
        layer = self.layer % len(self.runner.layers)
        self.layer += 1
        n = batch.context_lens[0]
        kv_heads, d = key_cache.shape[-2:]
        k = key_cache.reshape(-1, kv_heads, d)[:n].float()
        v = value_cache.reshape(-1, kv_heads, d)[:n].float()
        if self.record is not None:
            cos, sin = self.rope_tables(n, k.device)
            self.record.keys_pre[layer].append(apply_rope(k, cos, -sin))
            self.record.keys_post[layer].append(k)
            self.record.values[layer].append(v)
        kq, vq = self.keys(k, layer), self.values(v, layer)
        group = query.shape[1] // kv_heads
        q = query.float().transpose(0, 1)  # [heads, n, d]
        expand = lambda t: t.repeat_interleave(group, dim=1).transpose(0, 1)  # noqa: E731
        pos = torch.arange(n)
        causal = pos[None, :] <= pos[:, None]
        own = (pos[None, :] // BLOCK) == (pos[:, None] // BLOCK)
        mode = self.layout.get("read", "all")
        if mode == "own":
            exact_keys = own & causal
        elif mode.startswith("recent"):
            exact_keys = causal & (pos[None, :] > pos[:, None] - int(mode[6:]))
        else:
            exact_keys = torch.zeros_like(causal)
        scores_q = q @ expand(kq).transpose(1, 2)
        scores_e = q @ expand(k).transpose(1, 2)
        scores = torch.where(exact_keys, scores_e, scores_q) * scale
        weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        # values: the own block exact as well in "own"/"recent" modes
        out = (weights * (~exact_keys)) @ expand(vq) + (weights * exact_keys) @ expand(v)
        return out.transpose(0, 1).to(query.dtype)


def window_nll(runner: ModelRunner, ids: torch.Tensor) -> float:
    logits = runner.prompt_logits(ids)
    return torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="sum").item()


def prepare(layout: dict, calib: Calibration, head_dim: int) -> dict:
    from qtool.runtime.engine.kv_quant import rotation

    prepared = {"rotation": rotation(head_dim)}
    keys = layout.get("keys") or {}
    source = calib.keys_pre if keys.get("pre_rope") else calib.keys_post
    if keys.get("kind") in ("static_channel", "token"):
        q = keys.get("quantile", 1.0)
        centers, halves = [], []
        for layer in source:
            x = torch.cat(layer)  # [n, kvh, d]
            if q >= 1.0:
                low, high = x.amin(0), x.amax(0)
            else:
                flat = x.reshape(x.shape[0], -1)
                low = torch.quantile(flat, 1 - q, dim=0).reshape(x.shape[1:])
                high = torch.quantile(flat, q, dim=0).reshape(x.shape[1:])
            center = (high + low) / 2 if keys.get("center", True) else torch.zeros_like(low)
            half = ((high - low) / 2 if keys.get("center", True) else torch.maximum(high.abs(), low.abs()))
            if keys.get("pair_scale"):  # the same scale on both channels a RoPE pair rotates (commutes with RoPE)
                d = half.shape[-1]
                pair = torch.maximum(half[..., : d // 2], half[..., d // 2 :])
                half = torch.cat((pair, pair), -1)
            centers.append(fp16(center))
            halves.append(fp16(half.clamp_min(1e-6)))
        prepared["key_center"], prepared["key_half"] = centers, halves
        if keys.get("nuq"):
            books = []
            for index, layer in enumerate(source):
                x = torch.cat(layer)
                t = (x - centers[index]) / halves[index]
                if keys["kind"] == "token":
                    g = t.reshape(*t.shape[:-1], 1, -1)
                    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
                    u = ((g - (hi + lo) / 2) / ((hi - lo) / 2).clamp_min(1e-8))
                else:
                    s = t.abs().amax(-1, keepdim=True) if keys.get("token_scale") else 1.0
                    u = (t / s).clamp(-1, 1)
                books.append(kmeans_1d(u))
            prepared["key_codebook" if keys["kind"] == "static_channel" else "key_codebook_token"] = torch.stack(books)
    values = layout.get("values") or {}
    if values.get("nuq"):
        books = []
        for layer in calib.values:
            x = torch.cat(layer)
            if values.get("rotate"):
                x = x @ prepared["rotation"]
            group = values.get("group", 64)
            g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            books.append(kmeans_1d((g - (hi + lo) / 2) / ((hi - lo) / 2).clamp_min(1e-8)))
        prepared["value_codebook"] = torch.stack(books)
    return prepared


LAYOUTS = {
    "float": {},
    "cur_vals_only": {"values": {"rotate": True}},
    "kivi_post_vals": {"keys": {"kind": "block_channel"}, "values": {"rotate": True}},
    "kivi_pre_vals": {"keys": {"kind": "block_channel", "pre_rope": True}, "values": {"rotate": True}},
    "eng_post_rot": {"keys": {"kind": "engine_block", "rotate": True}, "values": {"rotate": True}},
    "eng_pre_rot": {"keys": {"kind": "engine_block", "rotate": True, "pre_rope": True}, "values": {"rotate": True}},
    "eng_pre": {"keys": {"kind": "engine_block", "pre_rope": True}, "values": {"rotate": True}},
    "two_pre_rot": {"keys": {"kind": "two_step", "rotate": True, "pre_rope": True}, "values": {"rotate": True}},
    "two_pre": {"keys": {"kind": "two_step", "pre_rope": True}, "values": {"rotate": True}},
    "two_post_rot": {"keys": {"kind": "two_step", "rotate": True}, "values": {"rotate": True}},
    "static_pre": {"keys": {"kind": "static_channel", "pre_rope": True}},
    "static_pre_ts": {"keys": {"kind": "static_channel", "pre_rope": True, "token_scale": True}},
    "static_pre_ts_nuq": {"keys": {"kind": "static_channel", "pre_rope": True, "token_scale": True, "nuq": True}},
    "static_pre_nuq": {"keys": {"kind": "static_channel", "pre_rope": True, "nuq": True}},
    "static_pre_nuq_o1": {"keys": {"kind": "static_channel", "pre_rope": True, "nuq": True, "outliers": 1}},
    "tok_pre_cs": {"keys": {"kind": "token", "pre_rope": True, "channel_scale": True}},
    "tok_post_pair": {"keys": {"kind": "token", "channel_scale": True, "pair_scale": True, "center": False}},
    "tok_post": {"keys": {"kind": "token"}},
    "vals_nuq": {"values": {"rotate": True, "nuq": True}},
    "vals_g32": {"values": {"rotate": True, "group": 32}},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--calib-windows", type=int, default=4)
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
    valid_ids = tokenize_text(tokenizer, open(VALID).read())
    calib_windows = valid_ids[: args.calib_windows * args.seqlen].view(args.calib_windows, args.seqlen)
    layers = len(runner.layers)
    record = SimAttention(runner, {}, None)
    record.record = Calibration([[] for _ in range(layers)], [[] for _ in range(layers)], [[] for _ in range(layers)])
    runner.attention = record
    for ids in calib_windows:
        runner.prompt_logits(ids)
    calib = record.record
    results = []
    for name in args.layouts.split(","):
        for read in args.reads.split(","):
            if name == "float" and read != "all":
                continue
            layout = dict(LAYOUTS[name], read=read)
            attention = SimAttention(runner, layout, calib)
            attention.prepared = prepare(layout, calib, runner.head_dim)
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
