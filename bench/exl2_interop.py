"""EXL2 compatibility with the real thing, on a CUDA machine where exllamav2 0.3.2 is importable (its extension
builds on first import): qtool-written EXL2 models loaded by ExLlamaV2, and a model quantized by ExLlamaV2's own
converter loaded by qtool. Each pair is compared per linear (ExLlamaV2's reconstructed float16 weight against
qtool's dequantization, bit for bit) and by logits on fixed ids. Prints one JSON summary and writes it to --out.

    python bench/exl2_interop.py --work /tmp/exl2_interop --out $OUT/exl2_interop.json [--skip-converter]
    (bench/exl2_interop.sh installs the wheels and runs it on the lent GPU machine)

Seen on an H200 (torch 2.11+cu130, exllamav2 0.3.2 built in 116 s), 2026-12-01: every quantized linear of the
qtool-written models reconstructs bit for bit in ExLlamaV2 (mixed 8/6/5/4/3/2-bit with act order and a quantized
head: 15/15; GPTQ->EXL2 conversion: 14/14), once ExLlamaV2's MLP permutation folding is accounted for; a model
from ExLlamaV2's converter read by qtool: attention and head 9/9 bit-equal (its MLP linears were compared before
that accounting existed). Logits were NOT comparable: the unquantized float16 model already differs between
transformers and ExLlamaV2 on this tiny config (relative 1.05, no top-1 agreement), so the cause is outside the
quantized weights and still open.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

RESULTS: dict = {"stages": {}}


def stage(name):
    """Run one stage, record its result or its error, go on with the next."""

    def wrap(fn):
        def run(*args, **kwargs):
            began = time.perf_counter()
            try:
                RESULTS["stages"][name] = {"ok": True, **(fn(*args, **kwargs) or {})}
            except Exception as exc:  # a failing stage is a result too
                RESULTS["stages"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-3000:]}
            RESULTS["stages"][name]["seconds"] = round(time.perf_counter() - began, 1)
            print(json.dumps({name: RESULTS["stages"][name]}, default=str)[:4000], flush=True)

        return run

    return wrap


def tiny_tokenizer(directory: Path, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = "the quick brown fox jumps over the lazy dog what is the capital of france paris is a city on a river".split()
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([" ".join(words)] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def float_model(directory: Path, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights of std 0.05 so that every linear moves the logits
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.05)
    model.to(torch.float16).save_pretrained(str(directory))
    tiny_tokenizer(directory, 300)
    return model


def random_mixed_exl2(model, seed: int):
    """Random codes and scales over layouts using every EXL2 width, random permutations, head quantized."""
    from qtool.convert.exl2_format import Exl2Weight

    gen = torch.Generator().manual_seed(seed)
    layouts = {256: [(8, 32), (6, 32), (5, 64), (4, 64), (3, 32), (2, 32)], 512: [(6, 128), (4, 256), (3, 64), (2, 64)]}
    weights = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layout = layouts[module.in_features]
            weights[name] = Exl2Weight(
                codes=torch.cat([torch.randint(0, 1 << b, (r, module.out_features), generator=gen) for b, r in layout]).to(torch.int32),
                qscale=torch.randint(1, 17, (len(layout), module.out_features), generator=gen, dtype=torch.int32),
                # a step of about 0.1 / 2**(bits-1): weights of similar size at every width
                scale_max=torch.tensor([0.4 / (1 << (b - 1)) for b, _ in layout]).mul(torch.rand(len(layout), generator=gen) + 0.5).half(),
                group_bits=tuple(b for b, _ in layout),
                group_sizes=tuple(r for _, r in layout),
                perm=torch.randperm(module.in_features, generator=gen),
            )
    return weights


def exllamav2_model(directory: Path):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    config = ExLlamaV2Config(str(directory))
    config.max_seq_len = 256
    model = ExLlamaV2(config)
    model.load()
    return model


def compare(directory: Path, ids: torch.Tensor) -> dict:
    """ExLlamaV2 vs qtool on one EXL2 directory: every quantized linear's float16 weight, and the logits."""
    from exllamav2.linear import ExLlamaV2Linear

    from qtool.convert.exl2_checkpoint import load_exl2_model
    from qtool.kernels.exl2_linear import Exl2Linear

    ex = exllamav2_model(directory)
    with torch.no_grad():
        ex_logits = ex.forward(ids.cpu()).float().cuda()
    ours = load_exl2_model(directory, device="cuda", dtype=torch.float16, backend="torch")
    modules = {name: m for name, m in ours.named_modules() if isinstance(m, Exl2Linear)}
    weights = {"compared": 0, "bit_equal": 0, "max_abs_diff": 0.0, "differing": []}
    for key, module in ex.modules_dict.items():
        if not isinstance(module, ExLlamaV2Linear) or module.q_handle is None:
            continue
        mine = modules[key].dequantized_weight(torch.float16).T  # [in, out]
        # ExLlamaV2's MLP loads down_proj without its row permutation and permutes the output columns of
        # gate_proj/up_proj by it instead (mlp.py: unmap / output_map), so its reconstructions are permuted so
        mlp, _, leaf = key.rpartition(".")
        down = modules.get(f"{mlp}.down_proj")
        if leaf == "down_proj":
            mine = mine[down.q_perm.long()]
        elif leaf in ("gate_proj", "up_proj") and down is not None:
            mine = mine[:, down.q_perm.long()]
        theirs = module.get_weight_tensor_dq()[:, : mine.shape[1]]
        weights["compared"] += 1
        diff = float((theirs.float() - mine.float()).abs().max())
        weights["max_abs_diff"] = max(weights["max_abs_diff"], diff)
        if torch.equal(theirs, mine):
            weights["bit_equal"] += 1
        else:
            weights["differing"].append(key)
    with torch.no_grad():
        torch_logits = ours(ids).logits.float()
        for m in modules.values():
            m.set_backend("triton")
        triton_logits = ours(ids).logits.float()
    ex.unload()

    def stats(a, b):
        return {
            "max_abs_diff": float((a - b).abs().max()),
            "rel_fro": float((a - b).norm() / b.norm()),
            "top1_agree": float((a.argmax(-1) == b.argmax(-1)).float().mean()),
        }

    return {
        "weights": weights,
        "logits_qtool_torch_vs_exllamav2": stats(torch_logits, ex_logits),
        "logits_qtool_triton_vs_exllamav2": stats(triton_logits, ex_logits),
        "logits_scale": float(ex_logits.abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/exl2_interop"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-converter", action="store_true")
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor([[1, 17, 250, 9, 41, 128, 77, 5, 199, 64, 12, 290, 3, 33, 101, 7]], device="cuda")

    @stage("environment")
    def environment():
        import triton
        import transformers

        info = {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__, "transformers": transformers.__version__,
                "device": torch.cuda.get_device_name(0)}
        began = time.perf_counter()
        import exllamav2  # noqa: F401  (builds or loads the extension)
        from exllamav2.ext import exllamav2_ext  # noqa: F401

        info["exllamav2_import_seconds"] = round(time.perf_counter() - began, 1)
        info["exllamav2"] = getattr(exllamav2, "__version__", "?")
        return info

    @stage("float_model")
    def make_float():
        float_model(work / "float")
        return {}

    @stage("float_model_hf_vs_exllamav2")
    def float_reference():
        """The unquantized model in both: how far the two forwards differ with no quantization at all."""
        from transformers import AutoModelForCausalLM

        ex = exllamav2_model(work / "float")
        with torch.no_grad():
            theirs = ex.forward(ids.cpu()).float().cuda()
            hf = AutoModelForCausalLM.from_pretrained(str(work / "float"), dtype=torch.float16).cuda().eval()
            mine = hf(ids).logits.float()
        ex.unload()
        return {"max_abs_diff": float((mine - theirs).abs().max()), "rel_fro": float((mine - theirs).norm() / theirs.norm()),
                "top1_agree": float((mine.argmax(-1) == theirs.argmax(-1)).float().mean()), "config": json.loads((work / "float" / "config.json").read_text())}

    @stage("qtool_gptq_to_exl2_loaded_by_exllamav2")
    def qtool_converted():
        from transformers import AutoModelForCausalLM

        from qtool.convert.checkpoint import save_quantized_model
        from qtool.convert.convert import convert_checkpoint
        from qtool.quant.rtn import rtn_quantize

        model = AutoModelForCausalLM.from_pretrained(str(work / "float"), dtype=torch.float32)
        quantized = {n: rtn_quantize(m.weight.detach(), 4, 128).quantized for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
        save_quantized_model(work / "gptq", model, quantized, force=True)
        report = convert_checkpoint("gptq", "exl2", work / "gptq", work / "qtool_exl2", force=True)
        return {"conversion_bpw": report.bits_per_weight, **compare(work / "qtool_exl2", ids)}

    @stage("qtool_mixed_widths_loaded_by_exllamav2")
    def qtool_mixed():
        from transformers import AutoModelForCausalLM

        from qtool.convert.exl2_checkpoint import save_exl2_model

        model = AutoModelForCausalLM.from_pretrained(str(work / "float"), dtype=torch.float32)
        save_exl2_model(work / "qtool_mixed", model, random_mixed_exl2(model, 1), {"calibration": {"dataset": "random codes"}}, force=True)
        return compare(work / "qtool_mixed", ids)

    @stage("exllamav2_converter_loaded_by_qtool")
    def exllamav2_converted():
        out = work / "ex_exl2"
        cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", str(work / "float"), "-o", str(work / "ex_job"),
               "-cf", str(out), "-b", "4.0", "-hb", "6", "-r", "8", "-mr", "4", "-l", "256", "-ml", "256", "-nr"]
        (work / "ex_job").mkdir(exist_ok=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        (work / "converter.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"convert_exl2 exited {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
        return compare(out, ids)

    environment()
    make_float()
    float_reference()
    qtool_mixed()  # every width, permutations, a quantized head: the most telling check first
    qtool_converted()
    if not args.skip_converter:
        exllamav2_converted()
    text = json.dumps(RESULTS, indent=2, default=str)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
