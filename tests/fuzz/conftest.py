"""The valid files every fuzz test mutates, built once per session: a tiny float model directory, a GPTQ and an
EXL2 checkpoint of it, a GGUF file of it, config files, and the short text eval and quantize read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fuzz_originals import Originals


@pytest.fixture(scope="session")
def originals(tmp_path_factory, make_tiny_model_dir, make_tiny_tokenizer, make_random_exl2_weights) -> Originals:
    from transformers import AutoModelForCausalLM

    from qtool.checkpoints.exl2_checkpoint import save_exl2_model
    from qtool.checkpoints.gptq_checkpoint import save_quantized_model
    from qtool.quant.rtn import rtn_quantize

    from fuzz_gguf_writer import write_llama_gguf

    root = tmp_path_factory.mktemp("fuzz-originals")
    tokenizer = make_tiny_tokenizer()
    float_dir = make_tiny_model_dir(root / "float", vocab_size=len(tokenizer))
    model = AutoModelForCausalLM.from_pretrained(str(float_dir), dtype=torch.float32).eval()
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name != "lm_head"}
    gptq_dir = save_quantized_model(root / "gptq", model, {name: rtn_quantize(m.weight.detach(), 4, 32).quantized for name, m in linears.items()}, tokenizer=tokenizer)
    exl2_dir = save_exl2_model(root / "exl2", model, make_random_exl2_weights(model, seed=1), tokenizer=tokenizer)
    (root / "gguf").mkdir()
    gguf_file = write_llama_gguf(root / "gguf" / "tiny.gguf", model, tokenizer)
    text = root / "text.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 30))
    return Originals.write(root, float_dir=float_dir, gptq_dir=gptq_dir, exl2_dir=exl2_dir, gguf_file=gguf_file, text=text)
