"""End-to-end decode speed of a Llama-2-7B-shaped model with random weights (no download): every linear a 4-bit
g128 QuantLinear served by a qtool backend, against the same model in bf16 (weights dequantized from the 4-bit
ones, so both compute one function), one token per step from a static KV cache, each step one CUDA graph.

    python bench/runtime/decode.py [--layers 32] [--backend triton] [--steps 200] [--context 512] [--out DIR]
    python bench/runtime/decode.py --tiny --device cpu --steps 3      # smoke test of the code path, no timing value

The model is written here (gpt-fast style: fused qkv and gate/up linears, as both variants use them) rather than
taken from transformers, so that a whole step captures into one graph. Attention reads the whole static cache
(masked), so the KV bytes per token are fixed by --context. Reported: tokens/s of each variant, per-layer time
(from a 0-layer run of the same model: embedding, final norm and lm_head only), and the 32-layer tokens/s
extrapolated from those two.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from qtool.formats.gptq import GPTQ_TENSOR_SUFFIXES
from qtool.kernels.dequant_ref import dequantize_gptq
from qtool.kernels.quant_linear import QuantLinear, set_model_backend


@dataclass(frozen=True)
class Shape:
    dim: int = 4096
    ffn: int = 11008
    heads: int = 32
    vocab: int = 32000
    layers: int = 32

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


TINY = Shape(dim=128, ffn=256, heads=4, vocab=320, layers=2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, dtype, device, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of interleaved pairs (gpt-fast's form: three kernels) on [B, T, H, D], freqs complex
    [T, D/2]. The pairing differs from transformers' halves, which only permutes the random weights here."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * freqs[None, :, None, :]).flatten(-2).to(x.dtype)


class Block(nn.Module):
    """One Llama layer with as few kernels around the linears as plain PyTorch allows (the step is a CUDA graph,
    but each small kernel still costs a few microseconds, comparable to a 4-bit linear)."""

    def __init__(self, shape: Shape, context: int, make_linear, dtype, device):
        super().__init__()
        self.shape = shape
        self.attn_norm, self.ffn_norm = RMSNorm(shape.dim, dtype, device), RMSNorm(shape.dim, dtype, device)
        self.wqkv = make_linear(shape.dim, 3 * shape.dim)
        self.wo = make_linear(shape.dim, shape.dim)
        self.w13 = make_linear(shape.dim, 2 * shape.ffn)
        self.w2 = make_linear(shape.ffn, shape.dim)
        cache = (1, shape.heads, context, shape.head_dim)
        self.register_buffer("k_cache", torch.randn(cache, dtype=dtype, device=device) * 0.1)
        self.register_buffer("v_cache", torch.randn(cache, dtype=dtype, device=device) * 0.1)

    def forward(self, x, pos, freqs, mask):
        b, t, _ = x.shape
        s = self.shape
        qkv = self.wqkv(self.attn_norm(x)).view(b, t, 3 * s.heads, s.head_dim)
        qk = rope(qkv[:, :, : 2 * s.heads], freqs)  # q and k rotated together
        q, k = qk[:, :, : s.heads].transpose(1, 2), qk[:, :, s.heads :].transpose(1, 2)
        v = qkv[:, :, 2 * s.heads :].transpose(1, 2)
        self.k_cache.index_copy_(2, pos, k)
        self.v_cache.index_copy_(2, pos, v)
        attn = nn.functional.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask)
        x = x + self.wo(attn.transpose(1, 2).reshape(b, t, s.dim))
        gate, up = self.w13(self.ffn_norm(x)).split(s.ffn, dim=-1)
        return x + self.w2(nn.functional.silu(gate) * up)


class Decoder(nn.Module):
    def __init__(self, shape: Shape, context: int, make_linear, dtype, device):
        super().__init__()
        self.embed = nn.Embedding(shape.vocab, shape.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(shape, context, make_linear, dtype, device) for _ in range(shape.layers))
        self.norm = RMSNorm(shape.dim, dtype, device)
        self.lm_head = make_linear(shape.dim, shape.vocab)
        inv = 1.0 / (10000 ** (torch.arange(0, shape.head_dim, 2, device=device).float() / shape.head_dim))
        angles = torch.outer(torch.arange(context, device=device).float(), inv)
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles))
        self.register_buffer("positions", torch.arange(context, device=device))

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens [B, T], pos [T] (device tensors: the step has no host sync, so it captures into a graph)."""
        x = self.embed(tokens)
        freqs = self.freqs[pos]
        mask = self.positions[None, :] <= pos[:, None]
        for layer in self.layers:
            x = layer(x, pos, freqs, mask)
        return self.lm_head(self.norm(x))


def random_quant_linear(k: int, n: int, bits: int, group_size: int, gen: torch.Generator, device) -> QuantLinear:
    """GPTQ v2 tensors with random codes and zeros (any int32 word is a valid packing), scales sized so that
    activations keep unit scale through the layers."""
    layer = QuantLinear(k, n, bits, group_size, checkpoint_format="gptq_v2", device=device)
    layer.qweight.copy_(torch.randint(-(1 << 31), 1 << 31, layer.qweight.shape, dtype=torch.int32, generator=gen, device=device))
    layer.qzeros.copy_(torch.randint(-(1 << 31), 1 << 31, layer.qzeros.shape, dtype=torch.int32, generator=gen, device=device))
    spread = math.sqrt(((1 << bits) ** 2 - 1) / 12)  # std of a uniform code
    layer.scales.copy_((torch.rand(layer.scales.shape, generator=gen, device=device) * 0.5 + 0.75) / (spread * math.sqrt(k)))
    layer.g_idx.copy_((torch.arange(k, device=device) // (k if group_size == -1 else group_size)).to(torch.int32))
    return layer


def dense_copy(layer: QuantLinear, dtype) -> nn.Linear:
    linear = nn.Linear(layer.in_features, layer.out_features, bias=False, device=layer.qweight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, "gptq_v2", torch.float32))
    return linear


def build_pair(shape: Shape, context: int, bits: int, group_size: int, dtype, device, seed: int = 0):
    """(quantized model, bf16 model with the dequantized weights); norms and embedding shared in value."""
    gen = torch.Generator(device=device).manual_seed(seed)
    quantized = Decoder(shape, context, lambda k, n: random_quant_linear(k, n, bits, group_size, gen, device), dtype, device)
    with torch.no_grad():
        quantized.embed.weight.normal_(0, 1, generator=gen)
    pending = iter([m for m in quantized.modules() if isinstance(m, QuantLinear)])
    dense = Decoder(shape, context, lambda k, n: dense_copy(next(pending), dtype), dtype, device)
    dense.load_state_dict({k: v for k, v in quantized.state_dict().items() if not k.endswith(GPTQ_TENSOR_SUFFIXES)}, strict=False)
    return quantized.eval(), dense.eval()


class StepRunner:
    """One greedy decode step on device-resident state: logits -> argmax -> next token, position += 1."""

    def __init__(self, model: Decoder, start: int, device):
        self.model = model
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.full((1,), start, dtype=torch.long, device=device)
        self.start = start
        self.graph = None

    def step(self) -> torch.Tensor:
        logits = self.model(self.token, self.pos)
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.pos.add_(1)
        return logits

    def reset(self, token: int = 1) -> None:
        self.token.fill_(token)
        self.pos.fill_(self.start)

    def capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step()

    def tokens_per_second(self, steps: int, use_graph: bool) -> float:
        """Median over 3 runs of `steps` steps, host-timed around a synchronize."""
        rates = []
        for _ in range(3):
            self.reset()
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(steps):
                self.graph.replay() if use_graph else self.step()
            torch.cuda.synchronize()
            rates.append(steps / (time.perf_counter() - began))
        return sorted(rates)[1]


def weight_bytes(model: nn.Module) -> int:
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += sum(t.numel() * t.element_size() for t in (module.qweight, module.qzeros, module.scales))
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def measure(shape: Shape, args, device) -> dict:
    """Build both variants at this depth, check they agree, time them; frees them before returning."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    began = time.time()
    quantized, dense = build_pair(shape, args.context, args.bits, args.group_size, dtype, device)
    chosen = set_model_backend(quantized, args.backend)
    result = {"layers": shape.layers, "backend_layers": chosen, "build_s": round(time.time() - began, 1),
              "weight_bytes_quantized": weight_bytes(quantized), "weight_bytes_dense": weight_bytes(dense)}
    start = args.context // 2  # the cache is pre-filled with random keys and values
    runners = {"quantized": StepRunner(quantized, start, device), "dense": StepRunner(dense, start, device)}
    with torch.inference_mode():
        logits = {name: runner.step().float() for name, runner in runners.items()}  # first call: tunes, warms
        ref = logits["dense"]
        result["logits_rel_err_vs_dense"] = ((logits["quantized"] - ref).norm() / ref.norm()).item()
        if device.type != "cuda":
            for runner in runners.values():
                for _ in range(args.steps):
                    runner.step()
            return result
        for name, runner in runners.items():
            runner.capture()
            result[f"{name}_tok_s_graph"] = runner.tokens_per_second(args.steps, use_graph=True)
            result[f"{name}_tok_s_eager"] = runner.tokens_per_second(max(args.steps // 10, 5), use_graph=False)
    del runners, quantized, dense
    torch.cuda.empty_cache()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--backend", default="triton", help="backend of the quantized model's linears (auto, torch, triton)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--context", type=int, default=512, help="KV cache length (attention reads all of it)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke test on CPU")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/runtime/decode.py needs CUDA (or --tiny --device cpu)", file=sys.stderr)
        return 2
    base = TINY if args.tiny else Shape(layers=args.layers)
    runs = [measure(Shape(**{**asdict(base), "layers": depth}), args, device) for depth in (0, base.layers)]
    report = {"shape": asdict(base), "bits": args.bits, "group_size": args.group_size, "context": args.context,
              "backend": args.backend, "steps": args.steps, "runs": runs}
    if device.type == "cuda":
        report["device"] = torch.cuda.get_device_name(device)
        report["torch"] = torch.__version__
        empty, full = runs
        for name in ("quantized", "dense"):
            head_s = 1 / empty[f"{name}_tok_s_graph"]
            per_layer_s = (1 / full[f"{name}_tok_s_graph"] - head_s) / max(base.layers, 1)
            report[f"{name}_us_per_layer"] = per_layer_s * 1e6
            report[f"{name}_us_head"] = head_s * 1e6
            report[f"{name}_tok_s_32_layers"] = 1 / (head_s + 32 * per_layer_s)
        report["speedup_per_layer"] = report["dense_us_per_layer"] / report["quantized_us_per_layer"]
        report["speedup_32_layers"] = report["quantized_tok_s_32_layers"] / report["dense_tok_s_32_layers"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
