"""EXL2 quantization of a tiny random Llama end to end: the target bpw is met, the checkpoint loads (through
load_model) and computes what the returned weights say, measurement.json is written and reused for another
target without measuring again, and bad requests fail before any work."""

import json
import random

import pytest
import torch

from qtool.configs.errors import QtoolError
from qtool.convert.exl2_checkpoint import exl2_weights_of, load_exl2_model
from qtool.quant.exl2_pipeline import quantize_model_exl2
from qtool.runtime.sources import load_model

WORDS = "the quick brown fox jumps over lazy dog what is capital of france paris river city old new".split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator([" ".join(WORDS)] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from conftest import build_tiny_llama

    root = tmp_path_factory.mktemp("exl2pipe")
    tokenizer = tiny_tokenizer()
    model = build_tiny_llama(seed=3, vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, head_dim=32, num_attention_heads=4)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.1)
    model.save_pretrained(root / "float")
    tokenizer.save_pretrained(root / "float")
    text = root / "calib.txt"
    rng = random.Random(1)
    text.write_text(" ".join(rng.choice(WORDS) for _ in range(3000)))
    return root, text


def test_quantize_meets_target_and_loads(setup):
    root, text = setup
    result = quantize_model_exl2(root / "float", root / "q45", 4.5, head_bits=6, calibration=text, samples=4, seqlen=64, device="cpu")
    assert result.measured
    assert abs(result.bits_per_weight - 4.5) <= 0.02
    loaded = load_model(root / "q45", device="cpu", dtype="float32")
    config = loaded.quantization_config
    assert config["quant_method"] == "exl2" and config["bits"] == 4.5 and config["head_bits"] == 6
    weights = exl2_weights_of(loaded.model)
    assert "lm_head" in weights and len(weights) == 15
    measured_bits = sum(w.storage_bits() for n, w in weights.items() if n != "lm_head")
    measured_weights = sum(w.in_features * w.out_features for n, w in weights.items() if n != "lm_head")
    assert measured_bits / measured_weights == pytest.approx(result.bits_per_weight)
    # the file computes what its weights say: a float copy holding them gives the same logits
    float_model = load_model(root / "float", device="cpu", dtype="float32").model
    with torch.no_grad():
        for param in float_model.parameters():
            param.copy_(param.half().float())  # the checkpoint stores float tensors as float16
        for name, w in weights.items():
            float_model.get_submodule(name).weight = torch.nn.Parameter(w.dequantize())
        ids = torch.tensor([[0, 5, 17, 33, 80, 120, 7, 250]])
        torch.testing.assert_close(loaded.model(ids).logits, float_model(ids).logits, rtol=1e-5, atol=1e-5)
    # errors are relative output errors, small at 4.5 bpw
    assert all(0 <= e < 0.05 for e in result.errors.values())
    measurement = json.loads((root / "q45" / "measurement.json").read_text())
    assert measurement["version"] == 1 and len(measurement["linears"]) == 14


def test_measurement_reused_for_another_target(setup):
    root, text = setup
    if not (root / "q45").exists():  # when run alone
        quantize_model_exl2(root / "float", root / "q45", 4.5, head_bits=6, calibration=text, samples=4, seqlen=64, device="cpu")
    result = quantize_model_exl2(root / "float", root / "q3", 3.0, calibration=text, samples=4, seqlen=64, device="cpu", measurement=root / "q45" / "measurement.json")
    assert not result.measured and abs(result.bits_per_weight - 3.0) <= 0.02
    low = exl2_weights_of(load_exl2_model(root / "q3", dtype=torch.float32))
    high = exl2_weights_of(load_exl2_model(root / "q45", dtype=torch.float32))
    assert sum(w.code_bits() for w in low.values()) < sum(w.code_bits() for n, w in high.items() if n != "lm_head")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_bpw=9.0), "out of range"),
        (dict(target_bpw=4.0, head_bits=5), "--head-bits 5"),
    ],
)
def test_bad_requests(setup, kwargs, message):
    root, text = setup
    with pytest.raises(QtoolError, match=message):
        quantize_model_exl2(root / "float", root / "bad", calibration=text, device="cpu", **kwargs)
    assert not (root / "bad").exists()
