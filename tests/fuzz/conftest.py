"""The valid files every fuzz test mutates, built once per session: a tiny float model directory, a GPTQ and an
EXL2 checkpoint of it, a GGUF file of it, config files, and the short text eval and quantize read."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
import torch

import qtool
from fuzz_originals import Originals


def import_every_qtool_module() -> None:
    """Hypothesis mixes into its draws constants it collects from the source of every local module in sys.modules
    (hypothesis.internal.conjecture.providers, "local constants"), so even a derandomized run draws other examples
    when other modules were imported before it: the gguf kind passed alone and failed after the other kinds or in
    the whole suite, on examples only the larger pool produced. With every qtool module imported at collection,
    a kind draws the same examples alone, after the other kinds, or in a whole-suite run."""
    for module in pkgutil.walk_packages(qtool.__path__, "qtool."):
        if not module.name.endswith("__main__"):  # `python -m qtool` runs the CLI on import
            importlib.import_module(module.name)


import_every_qtool_module()


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
