"""The fused training forward against transformers' own forward on tiny random models (CPU, float32: the fused
operations' torch references): the summed token loss and every LoRA gradient agree, for packed rows with ignored
labels, in each family it takes (Llama, Mistral with a window shorter than the row, Qwen2's biased q/k/v, Qwen3's
q/k norms, Gemma's scaled embeddings, 1 + w norms and tanh GELU, Granite's multipliers and logit scaling), on GPTQ and EXL2 bases through the quantized LoRA layers, and with gradient checkpointing (which recomputes each
layer). Families and heads it does not take are refused with a reason, and a run through the trainer with
fused_ops on gives transformers' losses."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from rtn_llama import rtn_quantized_llama
from torch import nn

from qtool.config.finetune_schema import FinetuneConfig
from qtool.finetune.fused_forward import attention_mask, plan_fused_forward, training_forward
from qtool.finetune.quantized_lora import lora_config_for
from qtool.finetune.trainer import summed_token_loss

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMALL = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False)


def family_model(model_type: str, seed: int = 0, **overrides) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **(SMALL | overrides))
    return AutoModelForCausalLM.from_config(config).eval()


def with_lora(model: nn.Module, quantized: bool = False) -> nn.Module:
    if quantized:
        config = lora_config_for(model, 4, 8, 0.0, "all-linear")
    else:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(1)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # B = 0 would leave A's gradients zero on both paths
            param.data.normal_(0.0, 0.1, generator=generator)
    return peft_model.train()


def packed_batch(length: int = 40, seed: int = 2) -> dict[str, torch.Tensor]:
    """Two rows: three packed examples (positions restart) with ignored labels, and one plain sequence."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 320, (2, length), generator=gen)
    first = torch.cat([torch.arange(11), torch.arange(length - 24), torch.arange(13)])
    positions = torch.stack([first, torch.arange(length)])
    labels = ids.clone()
    labels[0, :4] = -100
    labels[0, 11:13] = -100
    return dict(input_ids=ids, position_ids=positions, labels=labels)


def loss_and_grads(model: nn.Module, batch: dict, fused) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = summed_token_loss(model, batch, None, fused)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_training_signal(model: nn.Module, batch: dict, tolerance: float = 2e-5) -> None:
    fused, description = plan_fused_forward(model)
    assert fused is not None, description
    expected_loss, expected = loss_and_grads(model, batch, None)
    loss, grads = loss_and_grads(model, batch, fused)
    assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss)
    assert grads.keys() == expected.keys() and len(grads) > 0
    for name in expected:
        scale = expected[name].abs().max()
        assert scale > 0, name
        assert (grads[name] - expected[name]).abs().max() <= tolerance * scale, name


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}),
    ("mistral", {"sliding_window": 9}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("gemma", {"hidden_activation": "gelu_pytorch_tanh"}),
    ("granite", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.1,
                 "logits_scaling": 4.0}),
])
def test_fused_loss_and_lora_gradients_equal_transformers(model_type, overrides):
    model = with_lora(family_model(model_type, **overrides))
    assert_same_training_signal(model, packed_batch())


def test_each_plan_says_what_it_runs():
    _, qwen3 = plan_fused_forward(with_lora(family_model("qwen3")))
    _, mistral = plan_fused_forward(with_lora(family_model("mistral", sliding_window=9)))
    _, gemma = plan_fused_forward(with_lora(family_model("gemma", hidden_activation="gelu_pytorch_tanh")))
    assert "q/k norms" in qwen3 and "sliding windows [9]" in mistral and "SiLU * up" in mistral
    assert "RMSNorm (1 + w)" in gemma and "(gate) * up unfused" in gemma


def test_fused_forward_on_a_gptq_base(make_tiny_llama):
    model = with_lora(rtn_quantized_llama(make_tiny_llama(0), 4, 64), quantized=True)
    assert_same_training_signal(model, packed_batch(), tolerance=5e-5)


def test_fused_forward_on_an_exl2_base(make_tiny_llama, make_random_exl2_weights):
    from qtool.kernels.exl2_linear import Exl2Linear

    model = make_tiny_llama(0)
    for name, weight in make_random_exl2_weights(model, seed=3).items():
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, Exl2Linear.from_weight(weight))
    assert_same_training_signal(with_lora(model, quantized=True), packed_batch(), tolerance=5e-5)


def test_gradient_checkpointing_recomputes_each_layer_with_the_same_gradients():
    model = with_lora(family_model("llama"))
    batch = packed_batch()
    fused, _ = plan_fused_forward(model)
    _, plain = loss_and_grads(model, batch, fused)
    calls = []
    model.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _, checkpointed = loss_and_grads(model, batch, fused)
    assert len(calls) == 2  # the forward, then the recompute in the backward
    for name in plain:
        assert torch.allclose(checkpointed[name], plain[name], rtol=1e-6, atol=1e-7), name


def test_attention_mask_of_packed_rows_and_windows():
    positions = torch.tensor([[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]])
    assert attention_mask(positions[1:], None) is None
    assert attention_mask(positions[1:], 5) is None
    mask = attention_mask(positions, None)[:, 0]
    assert mask[0, 4].tolist() == [False, False, False, True, True]
    assert mask[1, 4].tolist() == [True] * 5
    windowed = attention_mask(positions[1:], 2)[0, 0]
    assert windowed[4].tolist() == [False, False, False, True, True]


def test_models_the_fused_forward_does_not_take_say_why(make_tiny_llama):
    gemma = family_model("gemma2", query_pre_attn_scalar=16)
    assert plan_fused_forward(gemma) == (None, "its family (gemma2) is not one of gemma, granite, llama, mistral, qwen2, qwen3")
    head_adapter = get_peft_model(make_tiny_llama(0), LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    fused, why = plan_fused_forward(head_adapter)
    assert fused is None and "its head" in why and "not a bias-free linear" in why


def test_fused_ops_setting_picks_the_forward(make_tiny_llama):
    model = with_lora(make_tiny_llama(0))
    cpu = torch.device("cpu")
    assert training_forward(model, "auto", cpu) == (None, "training forward: transformers' (fused_ops auto on cpu)")
    assert training_forward(model, "off", cpu)[0] is None
    fused, line = training_forward(model, "on", cpu)
    assert fused is not None and line.startswith("fused training forward")


def test_a_training_run_with_fused_ops_on_gives_transformers_losses(make_tiny_llama):
    from qtool.finetune.packing import Row
    from qtool.finetune.trainer import TrainingRun, train

    gen = torch.Generator().manual_seed(4)
    rows = [Row(ids, ids, list(range(24))) for ids in torch.randint(0, 320, (8, 24), generator=gen).tolist()]
    settings = FinetuneConfig(max_steps=3, batch_tokens=48, seqlen=24, lr=1e-2, fused_ops="on")
    losses = {}
    for setting in ("off", "on"):
        model = with_lora(make_tiny_llama(0))
        fused, _ = training_forward(model, setting, torch.device("cpu"))
        run = TrainingRun(model=model, config=settings, rows=rows, pad_id=0, device=torch.device("cpu"), fused=fused)
        losses[setting] = train(run).losses
    assert losses["on"][-1] < losses["on"][0]
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-5)


def test_the_memory_estimate_holds_one_chunk_of_logits_on_the_fused_path(make_tiny_llama):
    from qtool.finetune.memory import CHUNK_LOGIT_COPIES, LOGIT_COPIES, estimate_peak_memory
    from qtool.kernels.train_ops import CROSS_ENTROPY_CHUNK_VALUES

    model = with_lora(make_tiny_llama(0))
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    settings = FinetuneConfig(batch_tokens=CROSS_ENTROPY_CHUNK_VALUES // vocab * 3 + 7)
    plain = estimate_peak_memory(model, settings, 2)
    chunked = estimate_peak_memory(model, settings, 2, chunked_loss=True)
    tokens, rows = settings.batch_tokens, CROSS_ENTROPY_CHUNK_VALUES // vocab
    expected = tokens * vocab * 4 * LOGIT_COPIES - (rows * vocab * 4 * CHUNK_LOGIT_COPIES + tokens * hidden * 2)
    assert plain.activations - chunked.activations == expected > 0
    assert (plain.weights, plain.gradients, plain.optimizer) == (chunked.weights, chunked.gradients, chunked.optimizer)
