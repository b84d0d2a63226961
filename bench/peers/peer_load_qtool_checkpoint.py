"""Interop check: checkpoints written by qtool's save_quantized_model must load in transformers (GPTQModel backend)
and in GPTQModel itself with the same logits as qtool's own loader and as a plain dequantized float model.

Run in the peer venv (it calls the main venv for the qtool side):
    /work/venv-peer/bin/python bench/peers/peer_load_qtool_checkpoint.py [--work /tmp/qtool-interop] [--json-out FILE]
The qtool side alone (main venv):  /work/venv/bin/python bench/peers/peer_load_qtool_checkpoint.py write DIR
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

MAIN_PYTHON = "/work/venv/bin/python"
LOADERS = ("transformers", "transformers_backend_torch", "gptqmodel")
VOCAB_SIZE = 512
# name -> (bits, group_size, checkpoint_format, symmetric, act_order, hidden, intermediate)
CASES = {
    "w4_g32_sym_v1": (4, 32, "gptq", True, False, 128, 256),
    "w4_g32_asym_v1": (4, 32, "gptq", False, False, 128, 256),
    "w4_g32_asym_v2": (4, 32, "gptq_v2", False, False, 128, 256),
    "w4_g64_asym_actorder_v1": (4, 64, "gptq", False, True, 128, 256),
    "w3_g32_asym_v1": (3, 32, "gptq", False, False, 128, 256),
    "w2_g32_asym_v1": (2, 32, "gptq", False, False, 128, 256),
    "w8_perchannel_sym_v1": (8, -1, "gptq", True, False, 128, 256),
    "w8_g32_asym_v2": (8, 32, "gptq_v2", False, False, 128, 256),
    # 96 and 160 are not multiples of 64: the last group of every linear is partial.
    "w4_g64_partial_sym_v1": (4, 64, "gptq", True, False, 96, 160),
    "w4_g64_partial_asym_v2": (4, 64, "gptq_v2", False, False, 96, 160),
}


# ---------------------------------------------------------------- qtool side (main venv)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), VOCAB_SIZE)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def random_quantized_weight(out_features, in_features, bits, group_size, symmetric, act_order, min_zero, gen):
    from qtool.formats.quantized_weight import QuantizedWeight

    groups = 1 if group_size == -1 else -(-in_features // group_size)
    width = in_features if group_size == -1 else group_size
    rows = torch.randperm(in_features, generator=gen) if act_order else torch.arange(in_features)
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[rows] = (torch.arange(in_features) // width).to(torch.int32)  # act order: groups scattered over rows
    codes = torch.randint(0, 2**bits, (out_features, in_features), generator=gen, dtype=torch.int32)
    if symmetric:
        zeros = torch.full((groups, out_features), 2 ** (bits - 1), dtype=torch.int32)
    else:
        # v1 stores zero-1, so qtool refuses a true zero of 0 there (min_zero 1); v2 takes the whole range.
        zeros = torch.randint(min_zero, 2**bits, (groups, out_features), generator=gen, dtype=torch.int32)
    # Weight std ~0.08 whatever the bit width, so the logits are far from flat.
    scales = (0.16 / 2**bits) * (0.5 + torch.rand(groups, out_features, generator=gen))
    scales = scales.to(torch.float16).to(torch.float32)  # what the checkpoint can hold
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, bits=bits, group_size=group_size)


def write_case(out: Path, name: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from qtool.checkpoints.gptq_checkpoint import load_quantized_model, save_quantized_model

    bits, group_size, fmt, symmetric, act_order, hidden, intermediate = CASES[name]
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=hidden // 32, num_key_value_heads=2 if hidden % 64 == 0 else 1,
                         head_dim=32, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, 0.1)  # logits of magnitude ~10
        for p in model.parameters():  # float16 is what the checkpoint stores for unquantized tensors
            p.copy_(p.to(torch.float16).to(torch.float32))
    quantized = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module_name.startswith("model.layers."):
            quantized[module_name] = random_quantized_weight(
                module.out_features, module.in_features, bits, group_size, symmetric, act_order,
                0 if fmt == "gptq_v2" else 1, gen)
    directory = save_quantized_model(out / name, model, quantized, tokenizer=build_tokenizer(), checkpoint_format=fmt, force=True)

    input_ids = torch.randint(3, VOCAB_SIZE, (2, 12), generator=gen)
    with torch.no_grad():
        for module_name, qw in quantized.items():
            model.get_submodule(module_name).weight.copy_(qw.dequantize(torch.float32))
        dequant_logits = model(input_ids=input_ids).logits
        qtool_logits = load_quantized_model(directory, device="cpu", dtype=torch.float32)(input_ids=input_ids).logits
        qtool_logits_fp16 = load_quantized_model(directory, device="cpu", dtype=torch.float16)(input_ids=input_ids).logits
    torch.save(input_ids, directory / "input_ids.pt")
    torch.save(dequant_logits, directory / "dequant_logits.pt")
    torch.save(qtool_logits, directory / "qtool_logits.pt")
    torch.save(qtool_logits_fp16, directory / "qtool_logits_fp16.pt")


# ---------------------------------------------------------------- peer side (peer venv)


def compare(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    logits, reference = logits.float(), reference.float()
    return {
        "max_abs_diff": (logits - reference).abs().max().item(),
        "reference_max_abs": reference.abs().max().item(),
        "argmax_agree": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item(),
    }


def check_case(directory: Path, atol: float) -> dict:
    from gptqmodel import BACKEND, GPTQModel
    from transformers import AutoModelForCausalLM, GPTQConfig

    bits = json.loads((directory / "quantize_config.json").read_text())["bits"]
    input_ids = torch.load(directory / "input_ids.pt")
    dequant = torch.load(directory / "dequant_logits.pt")
    qtool_fp16 = torch.load(directory / "qtool_logits_fp16.pt")
    result = {
        "qtool_loader_fp32_vs_dequant": compare(torch.load(directory / "qtool_logits.pt"), dequant),
        "qtool_loader_fp16_vs_dequant": compare(qtool_fp16, dequant),
    }
    loaders = {
        "transformers": lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float16, device_map="cpu"),
        # Only the loading attributes (backend) of this config override the checkpoint's quantization_config.
        "transformers_backend_torch": lambda: AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float16, device_map="cpu", quantization_config=GPTQConfig(bits=bits, backend="torch")),
        "gptqmodel": lambda: GPTQModel.load(str(directory), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16).model,
    }
    for loader, load in loaders.items():
        try:
            model = load()
            with torch.no_grad():
                logits = model(input_ids=input_ids).logits
            kernels = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "qweight")})
            result[loader] = {**compare(logits, dequant), "kernels": kernels,
                              "max_abs_diff_vs_qtool_fp16": compare(logits, qtool_fp16)["max_abs_diff"]}
            result[loader]["ok"] = result[loader]["max_abs_diff"] <= atol
        except Exception as exc:  # report every loader's outcome, not just the first failure
            result[loader] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    return result


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "write":
        out = Path(sys.argv[2])
        for name in CASES:
            write_case(out, name)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/qtool-interop")
    parser.add_argument("--main-python", default=MAIN_PYTHON)
    parser.add_argument("--atol", type=float, default=5e-2,
                        help="vs the float32 dequantized model, on logits of magnitude ~10 (the peers run float16)")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel 7.7.0 fails on 2 cores without it
    subprocess.run([args.main_python, __file__, "write", args.work], check=True)
    report = {name: check_case(Path(args.work) / name, args.atol) for name in CASES}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    failed = [f"{name}/{loader}" for name, r in report.items() for loader in LOADERS if not r[loader]["ok"]]
    print("FAILED: " + ", ".join(failed) if failed else "all loaded with matching logits", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
