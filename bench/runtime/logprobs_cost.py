"""What logprobs cost the engine, and whether they are right on the device: a random Llama (Llama-2-7B-shaped by
default, `--vocab` sets the vocabulary the log-softmax and top-k run over) decodes `--batch` requests of
`--new-tokens` sampled tokens each, with logprobs off, logprobs=0 (the chosen token's) and logprobs=20 (the most
alternatives), on one warm engine (CUDA graphs on a GPU); tokens/s per mode is the median of `--repeats` runs.
Then one greedy request with logprobs=5 is checked against log_softmax of the model's own forward logits over the
same tokens (the test suite's check, here in the model's dtype on the device): the largest difference of a chosen
token's logprob, and how often the top-5 ids agree.

    python bench/runtime/logprobs_cost.py [--layers 32] [--batch 32] [--new-tokens 128] [--vocab 32000] [--out r.json]
    python bench/runtime/logprobs_cost.py --tiny --device cpu      # smoke test of the code path, no timing value
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from qtool.runtime.engine import Engine, EngineConfig, SamplingParams

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
TINY = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
MODES = {"off": None, "logprobs=0": 0, "logprobs=20": 20}


def random_llama(tiny: bool, layers: int, vocab: int, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, vocab_size=vocab, **(TINY if tiny else LLAMA2_7B)))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def timed_run(engine: Engine, prompts: list[list[int]], new_tokens: int, logprobs: int | None, device) -> float:
    params = [SamplingParams(max_tokens=new_tokens, temperature=0.8, seed=i, ignore_eos=True, logprobs=logprobs)
              for i in range(len(prompts))]
    if device.type == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - began
    assert all(len(o.token_ids) == new_tokens for o in outputs)
    assert all((o.logprobs is None) == (logprobs is None) for o in outputs)
    assert engine.stats().preemptions == 0, "the cache is too small for the batch: timings would include recompute"
    return sum(len(o.token_ids) for o in outputs) / seconds


def check_against_forward(engine: Engine, model, prompt: list[int], new_tokens: int) -> dict:
    out = engine.generate(prompt, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, logprobs=5))[0]
    device = model.lm_head.weight.device
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out.token_ids], device=device), use_cache=False).logits[0].float()
    reference = logits[len(prompt) - 1 : -1].log_softmax(dim=-1).cpu()
    chosen = torch.tensor([entry.logprob for entry in out.logprobs])
    expected = reference[torch.arange(len(out.token_ids)), torch.tensor(out.token_ids)]
    same_top = sum({t for t, _ in entry.top} == set(reference[i].topk(5).indices.tolist())
                   for i, entry in enumerate(out.logprobs))
    return {"max_abs_logprob_diff": float((chosen - expected).abs().max()), "top5_sets_equal": same_top / len(out.logprobs),
            "tokens": len(out.token_ids)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama: the code path in seconds on a CPU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--layers", type=int, default=None, help="default: 32 (2 with --tiny)")
    parser.add_argument("--vocab", type=int, default=None, help="default: 32000 (320 with --tiny)")
    parser.add_argument("--batch", type=int, default=None, help="requests decoded together; default 32 (4 with --tiny)")
    parser.add_argument("--context", type=int, default=None, help="prompt tokens; default 256 (16 with --tiny)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (8 with --tiny)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the result as JSON here too")
    args = parser.parse_args()
    tiny = args.tiny
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    layers = args.layers or (2 if tiny else 32)
    vocab = args.vocab or (320 if tiny else 32000)
    batch, context = args.batch or (4 if tiny else 32), args.context or (16 if tiny else 256)
    new_tokens = args.new_tokens or (8 if tiny else 128)

    model = random_llama(tiny, layers, vocab, dtype, device)
    # room for every request's whole context at once: no preemption inside a timed run
    blocks = batch * -(-(context + new_tokens + 16) // 16)
    engine = Engine(model, None, EngineConfig(num_blocks=blocks, max_num_seqs=batch,
                                              max_num_batched_tokens=max(2048, context)))
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, vocab, (context,), generator=generator).tolist() for _ in range(batch)]
    timed_run(engine, prompts[:2], 4, 20, device)  # warm-up: the logprob path's own first calls
    rates = {name: [] for name in MODES}
    for _ in range(args.repeats):
        for name, logprobs in MODES.items():  # interleaved, so drift hits every mode alike
            rates[name].append(timed_run(engine, prompts, new_tokens, logprobs, device))
    median = {name: statistics.median(values) for name, values in rates.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."), "layers": layers, "vocab": vocab, "batch": batch,
        "context": context, "new_tokens": new_tokens, "repeats": args.repeats,
        "tokens_per_s": median, "relative_to_off": {name: median[name] / median["off"] for name in median},
        "check": check_against_forward(engine, model, prompts[0], new_tokens),
    }
    print("| mode | tokens/s | vs off |\n|---|---|---|")
    for name in MODES:
        print(f"| {name} | {median[name]:.1f} | {result['relative_to_off'][name]:.3f} |")
    print("check against the model's forward:", json.dumps(result["check"]))
    if args.out:
        with open(args.out, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
