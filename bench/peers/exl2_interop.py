"""EXL2 compatibility with the real thing, on a CUDA machine where exllamav2 0.3.2 is importable (its extension
builds on first import): qtool-written EXL2 models loaded by ExLlamaV2, and a model quantized by ExLlamaV2's own
converter loaded by qtool. Each pair is compared per linear (ExLlamaV2's reconstructed float16 weight against
qtool's dequantization, bit for bit) and by logits on fixed ids. Prints one JSON summary and writes it to --out.

    python bench/peers/exl2_interop.py --work /tmp/exl2_interop --out $OUT/exl2_interop.json [--skip-converter]
    (bench/device/exl2_interop.sh installs the wheels and runs it on the lent GPU machine)

Why ExLlamaV2 runs with no_sdpa here (read in exllamav2 v0.3.2's source; a CPU run of its `_attn_torch` with the
extension stubbed agrees): with no flash-attn and no xformers installed, and a torch that has `causal_lower_right`,
attention goes through attn.py `_attn_torch`'s SDPA branch, where
`if self.layer_idx in attn_params.block_diag_layers or causal:` (added in commit 2e630ae, in every release since
0.2.9) takes `get_block_diag_mask()`, which is None without packed
sequences, so `scaled_dot_product_attention` runs with no mask: every position attends to the whole sequence.
Setting `config.no_sdpa` takes the matmul branch, which adds the causal mask of attn_params.py
`build_single_attn_mask`. So every ExLlamaV2 here runs with no_sdpa (see `exllamav2_model`), the float stage
measures both settings against transformers and against a float32 reference with and without the causal mask,
and `float_model_per_module` compares ExLlamaV2's state after every module with that reference. The config is
read as transformers means it (`exllamav2_config_check`); transformers 5 writes rope_theta only inside
rope_parameters, where ExLlamaV2 does not look, so `legacy_config_keys` copies it to the top level.

What it measured (per linear, logits, device and date): bench/RESULTS.md, "Interop".
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

RESULTS: dict = {"stages": {}}

# float16 forwards against each other or against a float32 reference: a relative (Frobenius) difference of the
# logits below this is rounding; the causal-mask bug above gives about 1
AGREE_REL = 0.02


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
    legacy_config_keys(directory)
    tiny_tokenizer(directory, 300)
    return model


def legacy_config_keys(directory: Path) -> dict:
    """Copy into config.json's top level the keys ExLlamaV2 0.3.2 reads there but transformers 5 nests; the ones added.

    transformers 5 writes rope_theta only inside rope_parameters; ExLlamaV2's config.py reads top-level "rope_theta"
    and otherwise falls back on its architecture default (10000, right here only by coincidence). transformers 5
    ignores a top-level rope_theta when rope_parameters is there, so the copy changes nothing on its side.
    ExLlamaV2 reads neither dtype nor torch_dtype (it runs float16), so those need nothing.
    """
    path = directory / "config.json"
    config = json.loads(path.read_text())
    added = {}
    theta = (config.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in config:
        config["rope_theta"] = added["rope_theta"] = theta
    if added:
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return added


def exllamav2_config_check(ex_config, hf_config) -> dict:
    """What ExLlamaV2 read from config.json next to what transformers reads, and the fields where they differ."""
    lm = ex_config.arch.lm
    rope = getattr(hf_config, "rope_parameters", None) or {}
    pairs = {  # ExLlamaV2's value, the value transformers' Llama uses
        "vocab_size": (ex_config.vocab_size, hf_config.vocab_size),
        "hidden_size": (ex_config.hidden_size, hf_config.hidden_size),
        "intermediate_size": (ex_config.intermediate_size, hf_config.intermediate_size),
        "num_hidden_layers": (ex_config.num_hidden_layers, hf_config.num_hidden_layers),
        "num_attention_heads": (ex_config.num_attention_heads, hf_config.num_attention_heads),
        "num_key_value_heads": (ex_config.num_key_value_heads, hf_config.num_key_value_heads),
        "head_dim": (ex_config.head_dim, getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads),
        "norm_eps": (ex_config.norm_eps, hf_config.rms_norm_eps),
        "rope_theta": (float(ex_config.rotary_embedding_base), float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 0.0)))),
        "rope_scaling": (bool(ex_config.alt_rope_method) or ex_config.scale_pos_emb != 1.0, rope.get("rope_type", "default") != "default"),
        "partial_rotary_factor": (ex_config.partial_rotary_factor, rope.get("partial_rotary_factor", 1.0)),
        "rope_style": (lm.rope_style.name, "NEOX"),  # transformers' rotate_half
        "hidden_act": (lm.mlp_act_func, hf_config.hidden_act),
        "lm_head": (lm.keys["lm_head"], "model.embed_tokens" if hf_config.tie_word_embeddings else "lm_head"),
        "scales (logit, embedding, residual)": ((ex_config.logit_scale, ex_config.scale_emb, ex_config.scale_depth), (1, 1, 1)),
        "softcapping (attention, final)": ((ex_config.attn_logit_softcapping, ex_config.final_logit_softcapping), (None, None)),
        "norm constant bias, normalized embeddings": ((lm.norm_constant_bias, lm.normalize_embeddings), (0, False)),
    }
    return {
        "read": {key: ours for key, (ours, _) in pairs.items()},
        "mismatches": {key: {"exllamav2": ours, "transformers": theirs} for key, (ours, theirs) in pairs.items() if ours != theirs},
    }


def reference_states(model, ids: torch.Tensor, causal: bool = True) -> list[tuple[str, torch.Tensor]]:
    """A Llama forward written out in float32 from the model's weights: the state after each of ExLlamaV2's modules.

    In ExLlamaV2's order (embedding, per layer attention then MLP, each with its norm and residual inside, final
    norm, head); causal=False lets every position attend to the whole sequence, which is what ExLlamaV2's SDPA
    branch does. Independent of both implementations, and checked against transformers in the float stage.
    """
    config = model.config
    weight = {name: tensor.float() for name, tensor in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", getattr(config, "rope_theta", 10000.0))
    batch, length = ids.shape
    device = ids.device

    def rms_norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * w

    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()

    def rope(x):  # neox style: rotate the two halves of each head
        first, second = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return x * cos + torch.cat([-second, first], -1) * sin

    mask = torch.full((length, length), float("-inf"), device=device).triu(1) if causal else torch.zeros(length, length, device=device)
    x = weight["model.embed_tokens.weight"][ids]
    states = [("embedding", x)]
    for layer in range(config.num_hidden_layers):
        w = {name.removeprefix(f"model.layers.{layer}."): t for name, t in weight.items() if name.startswith(f"model.layers.{layer}.")}
        h = rms_norm(x, w["input_layernorm.weight"])
        q = (h @ w["self_attn.q_proj.weight"].T).view(batch, length, heads, head_dim).transpose(1, 2)
        k = (h @ w["self_attn.k_proj.weight"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = (h @ w["self_attn.v_proj.weight"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)  # query head j reads kv head j // groups
        scores = rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(head_dim) + mask
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, heads * head_dim)
        x = x + attended @ w["self_attn.o_proj.weight"].T
        states.append((f"layer {layer} attention", x))
        h = rms_norm(x, w["post_attention_layernorm.weight"])
        x = x + (torch.nn.functional.silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T
        states.append((f"layer {layer} mlp", x))
    x = rms_norm(x, weight["model.norm.weight"])
    states.append(("final norm", x))
    states.append(("head", x @ model.get_output_embeddings().weight.float().T))
    return states


def logit_stats(mine: torch.Tensor, reference: torch.Tensor) -> dict:
    """How far one forward's output is from a reference's, over the same positions (shapes must match)."""
    if mine.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(mine.shape)} vs reference {tuple(reference.shape)}")
    mine, reference = mine.float().to(reference.device), reference.float()
    return {
        "max_abs_diff": float((mine - reference).abs().max()),
        "rel_fro": float((mine - reference).norm() / reference.norm()),
        "top1_agree": float((mine.argmax(-1) == reference.argmax(-1)).float().mean()),
    }


def per_position_rel(mine: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """Relative difference at each position: a wrong causal mask spares no position after the first layer."""
    mine, reference = mine.float().to(reference.device), reference.float()
    return [round(float(r), 4) for r in ((mine - reference).norm(dim=-1) / reference.norm(dim=-1)).flatten()]


def random_mixed_exl2(model, seed: int):
    """Random codes and scales over layouts using every EXL2 width, random permutations, head quantized."""
    from qtool.formats.exl2 import Exl2Weight

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


def exllamav2_model(directory: Path, sdpa: bool = False):
    """ExLlamaV2 0.3.2 on one directory, loaded on the GPU (embedding on the CPU, so ids go in as int64 on the CPU).

    sdpa=False sets config.no_sdpa: without flash-attn/xformers, attn.py `_attn_torch`'s SDPA branch drops the
    causal mask (`... block_diag_layers or causal:` -> get_block_diag_mask() is None without packed sequences) while
    its matmul branch adds it. sdpa=True keeps the library's default, to measure that.
    """
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    config = ExLlamaV2Config(str(directory))
    config.max_seq_len = 256
    config.no_sdpa = not sdpa  # read by _attn_torch at every call
    model = ExLlamaV2(config)
    model.load()
    return model


def exllamav2_states(model, ids: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """ExLlamaV2's state after each module and its logits, in module order, through forward_chunk with no cache.

    forward_chunk's extract_state_indices keeps the input of module i, i.e. the output of module i - 1
    (model.forward drops them, so it is called directly).
    """
    head = model.head_layer_idx
    with torch.inference_mode():
        result = model.forward_chunk(input_ids=ids.cpu(), extract_state_indices=list(range(1, head + 1)))
    names = [f"{type(module).__name__} {module.key}" for module in model.modules]
    return [(names[i - 1], result["states"][i]) for i in range(1, head + 1)] + [(names[head], result["logits"])]


def compare(directory: Path, ids: torch.Tensor) -> dict:
    """ExLlamaV2 vs qtool on one EXL2 directory: every quantized linear's float16 weight, and the logits."""
    from exllamav2.linear import ExLlamaV2Linear

    from qtool.checkpoints.exl2_checkpoint import load_exl2_model
    from qtool.kernels.exl2_linear import Exl2Linear

    keys_added = legacy_config_keys(directory)
    ex = exllamav2_model(directory)
    with torch.no_grad():
        ex_logits = ex.forward(ids.cpu()).float().cuda()  # no cache: logits for every position, [1, len(ids), vocab]
    ours = load_exl2_model(directory, device="cuda", dtype=torch.float16, backend="torch")
    config_mismatches = exllamav2_config_check(ex.config, ours.config)["mismatches"]
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
    return {
        "config_keys_added": keys_added,
        "exllamav2_config_mismatches": config_mismatches,
        "weights": weights,
        "logits_qtool_torch_vs_exllamav2": logit_stats(torch_logits, ex_logits),
        "logits_qtool_triton_vs_exllamav2": logit_stats(triton_logits, ex_logits),
        "logits_scale": float(ex_logits.abs().max()),
    }


def float_verdict(result: dict) -> str:
    """One line from the float stage's numbers: which explanation they support."""

    def agree(stats):
        return stats["rel_fro"] < AGREE_REL

    shipped, no_sdpa = result["exllamav2_as_shipped"], result["exllamav2_no_sdpa"]
    if not agree(result["reference_causal_vs_transformers"]):
        return "the float32 reference disagrees with transformers itself: fix reference_states before reading the rest"
    if not agree(no_sdpa["vs_transformers"]):
        return "ExLlamaV2 differs from transformers even with the causal matmul attention: see float_model_per_module for the first module off"
    if agree(shipped["vs_transformers"]):
        return "ExLlamaV2 agrees with transformers with and without SDPA (flash-attn or xformers in use, or the mask bug absent)"
    if agree(shipped["vs_reference_bidirectional"]):
        return "confirmed: ExLlamaV2's default SDPA attention has no causal mask; with config.no_sdpa it agrees with transformers"
    return "ExLlamaV2 agrees with config.no_sdpa only, but its default differs otherwise than by the missing causal mask"


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
        from exllamav2 import attn as ex_attn

        # which attention ExLlamaV2 will use: flash-attn and xformers mask causally, its SDPA branch does not
        info["exllamav2_attention"] = {"flash_attn": ex_attn.has_flash_attn, "xformers": ex_attn.has_xformers, "lower_right_sdpa": ex_attn.has_lower_right_sdpa}
        return info

    @stage("float_model")
    def make_float():
        float_model(work / "float")
        return {"config": json.loads((work / "float" / "config.json").read_text())}

    def float_hf():
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(work / "float"), dtype=torch.float16).cuda().eval()

    @stage("float_model_hf_vs_exllamav2")
    def float_reference():
        """The unquantized model in both, before anything quantized: ExLlamaV2 as shipped and with config.no_sdpa,
        against transformers and against the float32 reference with and without the causal mask."""
        hf = float_hf()
        with torch.no_grad():
            hf_logits = hf(ids).logits.float()
            causal = reference_states(hf, ids, causal=True)[-1][1]
            bidirectional = reference_states(hf, ids, causal=False)[-1][1]
        result = {
            "reference_causal_vs_transformers": logit_stats(causal, hf_logits),
            "reference_bidirectional_vs_transformers": logit_stats(bidirectional, hf_logits),
        }
        for label, sdpa in (("exllamav2_as_shipped", True), ("exllamav2_no_sdpa", False)):
            ex = exllamav2_model(work / "float", sdpa=sdpa)
            with torch.no_grad():
                logits = ex.forward(ids.cpu()).float().cuda()
            result.setdefault("exllamav2_config", exllamav2_config_check(ex.config, hf.config))
            ex.unload()
            result[label] = {
                "logits_shape": list(logits.shape),
                "vs_transformers": logit_stats(logits, hf_logits),
                "vs_reference_causal": logit_stats(logits, causal),
                "vs_reference_bidirectional": logit_stats(logits, bidirectional),
                "per_position_rel_vs_transformers": per_position_rel(logits, hf_logits),
            }
        result["verdict"] = float_verdict(result)
        return result

    @stage("float_model_per_module")
    def float_per_module():
        """ExLlamaV2's state after every module against the float32 reference, causal and not, for both attention
        settings: the first module that leaves the causal reference is where the two forwards part."""
        hf = float_hf()
        with torch.no_grad():
            causal, bidirectional = reference_states(hf, ids, causal=True), reference_states(hf, ids, causal=False)
        result = {}
        for label, sdpa in (("exllamav2_as_shipped", True), ("exllamav2_no_sdpa", False)):
            ex = exllamav2_model(work / "float", sdpa=sdpa)
            states = exllamav2_states(ex, ids)
            ex.unload()
            if len(states) != len(causal):
                raise RuntimeError(f"ExLlamaV2 has {len(states)} modules, the reference {len(causal)}: {[n for n, _ in states]}")
            rows = [
                {"exllamav2": name, "reference": ref_name,
                 "rel_vs_causal": logit_stats(state, c)["rel_fro"], "rel_vs_bidirectional": logit_stats(state, b)["rel_fro"]}
                for (name, state), (ref_name, c), (_, b) in zip(states, causal, bidirectional)
            ]
            result[label] = rows
            result[f"{label}_first_module_off_causal"] = next((row["reference"] for row in rows if row["rel_vs_causal"] >= AGREE_REL), None)
        return result

    @stage("qtool_gptq_to_exl2_loaded_by_exllamav2")
    def qtool_converted():
        from transformers import AutoModelForCausalLM

        from qtool.checkpoints.gptq_checkpoint import save_quantized_model
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

        from qtool.checkpoints.exl2_checkpoint import save_exl2_model

        model = AutoModelForCausalLM.from_pretrained(str(work / "float"), dtype=torch.float32)
        save_exl2_model(work / "qtool_mixed", model, random_mixed_exl2(model, 1), {"calibration": {"dataset": "random codes"}}, force=True)
        return compare(work / "qtool_mixed", ids)

    @stage("exllamav2_converter_loaded_by_qtool")
    def exllamav2_converted():
        out = work / "ex_exl2"
        cmd = [sys.executable, "-m", "exllamav2.conversion.convert_exl2", "-i", str(work / "float"), "-o", str(work / "ex_job"),
               "-cf", str(out), "-b", "4.0", "-hb", "6", "-r", "8", "-mr", "4", "-l", "256", "-ml", "256", "-nr"]
        (work / "ex_job").mkdir(exist_ok=True)
        # its calibration forwards go through the same attention: EXLLAMA_NO_SDPA keeps them causal
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "EXLLAMA_NO_SDPA": "1"})
        (work / "converter.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"convert_exl2 exited {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
        return compare(out, ids)

    environment()
    make_float()
    float_reference()
    float_per_module()
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
