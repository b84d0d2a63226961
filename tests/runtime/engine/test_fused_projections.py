"""The engine's fused q/k/v and gate/up projections (EngineConfig.fuse_projections, on by default where the decode
step runs): greedy output token-identical to transformers' generate on the tiny Llama (float, GPTQ, EXL2), through
the decode step and both prefill paths; the step's line says what was fused and, where a layer's linears cannot be,
why; fused and unfused steps agree; the weights stay one copy and the parts are not called by the engine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qtool.formats.exl2 import Exl2Weight
from qtool.kernels.exl2_linear import Exl2Linear
from qtool.kernels.quant_linear import QuantLinear
from qtool.runtime.engine import Engine, EngineConfig, SamplingParams

PROMPTS = [[1, 5, 9], [1, 40, 41, 42, 43, 44, 45, 46, 47], [1, 77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89]]
NEW_TOKENS = 10
FUSED_ALL = "fused q/k/v and gate/up projections"


def gptq_llama(model: nn.Module, bits_of=lambda name: 4) -> nn.Module:
    """Every decoder linear replaced by a QuantLinear of its RTN-quantized weight (group size 32, no act order),
    `bits_of(name)` bits."""
    from qtool.quant.rtn import rtn_quantize

    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, attribute = name.rpartition(".")
            quantized = rtn_quantize(module.weight.data, bits_of(name), 32).quantized
            setattr(model.model.layers.get_submodule(parent), attribute, QuantLinear.from_quantized(quantized))
    return model


def exl2_llama(model: nn.Module, seed: int) -> nn.Module:
    """Every decoder linear replaced by a random Exl2Linear; the linears of one input (q/k/v, gate/up) share a bit
    plan, permutation and scale maxima, as fusion needs."""
    gen = torch.Generator().manual_seed(seed)
    shared: dict[int, tuple] = {}  # in_features -> (layout, perm, scale maxima)
    for name, module in list(model.model.layers.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        k, n = module.in_features, module.out_features
        if k not in shared:
            layout = ((6, 32), (4, k - 64), (3, 32))
            shared[k] = (layout, torch.randperm(k, generator=gen), torch.full((3,), 0.05).half())
        layout, perm, scale_max = shared[k]
        weight = Exl2Weight(
            codes=torch.cat([torch.randint(0, 1 << b, (r, n), generator=gen) for b, r in layout]).to(torch.int32),
            qscale=torch.randint(1, 17, (len(layout), n), generator=gen, dtype=torch.int32), scale_max=scale_max,
            group_bits=tuple(b for b, _ in layout), group_sizes=tuple(r for _, r in layout), perm=perm)
        parent, _, attribute = name.rpartition(".")
        setattr(model.model.layers.get_submodule(parent), attribute, Exl2Linear.from_weight(weight))
    return model


def engine_of(model, **settings) -> Engine:
    """Prefills chunked by 7 tokens (ragged steps that mix prefill and decode) unless settings say otherwise."""
    return Engine(model, None, EngineConfig(**{**dict(block_size=4, num_blocks=64, max_num_batched_tokens=7,
                                                      fast_decode=True), **settings}))


MODELS = {"float": lambda llama: llama, "gptq": gptq_llama, "exl2": lambda llama: exl2_llama(llama, seed=4)}


@pytest.mark.parametrize("fast_prefill", [False, True])
@pytest.mark.parametrize("kind", list(MODELS))
def test_fused_greedy_equals_transformers_generate(kind, fast_prefill, make_tiny_llama, reference_greedy):
    model = MODELS[kind](make_tiny_llama(seed=2))
    eos = [model.generation_config.eos_token_id]
    expected = [reference_greedy(model, prompt, NEW_TOKENS, eos) for prompt in PROMPTS]
    engine = engine_of(model, fast_prefill=fast_prefill)
    runner = engine.runner
    assert runner.decode_step_reason.endswith(FUSED_ALL), runner.decode_step_reason
    assert all(layer.qkv is not None and layer.gate_up is not None for layer in runner.decode_step.layers)
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    assert [out.token_ids for out in outputs] == expected
    assert runner.fast_decode_steps > 0 and (runner.fast_prefill_steps > 0) == fast_prefill
    # transformers' generate after the engine runs through the parts, now views of the fused tensors
    assert [reference_greedy(model, prompt, NEW_TOKENS, eos) for prompt in PROMPTS] == expected


def test_fused_and_unfused_steps_agree_and_the_line_says_which(make_tiny_llama):
    model = gptq_llama(make_tiny_llama(seed=3))
    unfused, fused = engine_of(model, fuse_projections=False, max_num_batched_tokens=64), engine_of(model, max_num_batched_tokens=64)
    assert unfused.runner.decode_step_reason.endswith("q/k/v and gate/up unfused (fusion off)")
    assert all(layer.qkv is None and layer.gate_up is None for layer in unfused.runner.decode_step.layers)
    assert fused.runner.decode_step_reason.endswith(FUSED_ALL)
    for engine in (unfused, fused):
        for prompt in PROMPTS:
            engine.add_request(prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
        for _ in range(3):
            engine.step()
    chunks = [engine.scheduler.schedule() for engine in (unfused, fused)]
    assert all(chunk.num_tokens == 1 for chunk in chunks[1])
    logits = [engine.runner.execute(batch) for engine, batch in zip((unfused, fused), chunks)]
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.runner.cache.key, unfused.runner.cache.key, rtol=1e-5, atol=1e-6)


def test_a_layer_whose_linears_differ_stays_unfused_and_the_line_says_why(make_tiny_llama, reference_greedy):
    model = gptq_llama(make_tiny_llama(seed=5), bits_of=lambda name: 3 if name == "1.self_attn.k_proj" else 4)
    engine = engine_of(model)
    reason = engine.runner.decode_step_reason
    assert reason.endswith("fused q/k/v in 1 of 2 layers (layer 1: k_proj has bits 3 and q_proj 4), fused gate/up")
    layers = engine.runner.decode_step.layers
    assert layers[0].qkv is not None and layers[1].qkv is None and layers[1].gate_up is not None
    eos = [model.generation_config.eos_token_id]
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    assert [out.token_ids for out in outputs] == [reference_greedy(model, p, NEW_TOKENS, eos) for p in PROMPTS]


def test_exl2_layers_of_their_own_layouts_stay_unfused(make_tiny_llama, make_random_exl2_weights):
    """Linears quantized each with its own bit plan (what EXL2's optimizer does) cannot share one layout."""
    model = make_tiny_llama(seed=6)
    for name, weight in make_random_exl2_weights(model, seed=3).items():
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, Exl2Linear.from_weight(weight))
    reason = engine_of(model).runner.decode_step_reason
    assert "q/k/v unfused (layer 0: k_proj and q_proj have different EXL2 bit plans" in reason, reason


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors`."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


@pytest.mark.parametrize("kind", ["float", "gptq"])
def test_fusion_keeps_one_copy_of_the_weights_and_never_calls_the_parts(kind, make_tiny_llama):
    model = MODELS[kind](make_tiny_llama(seed=7))
    before = storage_bytes([*model.parameters(), *model.buffers()])
    engine = engine_of(model, fast_prefill=False)  # prefill through the module path
    fused = [fused.module for layer in engine.runner.decode_step.layers for fused in (layer.qkv, layer.gate_up)]
    tensors = [*model.parameters(), *model.buffers(), *(t for m in fused for t in (*m.parameters(), *m.buffers()))]
    assert storage_bytes(tensors) == before
    parts = [getattr(layer.self_attn, name) for layer in model.model.layers for name in ("q_proj", "k_proj", "v_proj")]
    parts += [getattr(layer.mlp, name) for layer in model.model.layers for name in ("gate_proj", "up_proj")]
    calls = []
    hooks = [part.register_forward_hook(lambda *_: calls.append(1)) for part in parts]
    engine.generate(PROMPTS, SamplingParams(max_tokens=4, temperature=0))
    for hook in hooks:
        hook.remove()
    assert not calls, "the engine ran a part instead of its fused linear"
    if kind == "gptq":
        assert all(not part._prepared for part in parts), "no backend form of a part was built again"


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "mistral", "granite", "qwen2"])
def test_every_family_of_the_decode_step_fuses_its_projections(family, build_family):
    """Biases (Qwen2), q/k norms (Qwen3), GELU MLPs (Gemma) and multipliers (Granite) alike: the decode step's
    families list both groups in the architecture table, and their linears fuse."""
    from qtool.runtime.engine.model_runner import ModelRunner

    runner = ModelRunner(build_family(family, seed=1), num_blocks=8, block_size=4, fast_decode=True)
    assert runner.decode_step_reason.endswith(FUSED_ALL), runner.decode_step_reason


def test_a_group_the_family_table_does_not_list_is_not_fused(make_tiny_llama):
    from qtool.models.architectures import FUSE_QKV
    from qtool.runtime.engine.decode_step import fuse_layer_projections

    engine = engine_of(make_tiny_llama(seed=8), fuse_projections=False)
    layers, phrase = fuse_layer_projections(engine.runner.decode_step.layers, (FUSE_QKV,))
    assert phrase == ("fused q/k/v, gate/up unfused (layer 0: the family's table lists no fusable group of "
                      "mlp.gate_proj, mlp.up_proj)")
    assert all(layer.qkv is not None and layer.gate_up is None for layer in layers)


def test_an_engine_built_under_inference_mode_leaves_the_model_trainable(make_tiny_llama):
    model = make_tiny_llama(seed=9)
    with torch.inference_mode():
        assert engine_of(model).runner.decode_step_reason.endswith(FUSED_ALL)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.requires_grad and not q_proj.weight.is_inference()
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    assert q_proj.weight.grad is not None and q_proj.weight.grad.abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused layers' Triton GEMV and CUDA graphs need CUDA")
def test_on_the_gpu_fused_triton_steps_agree_with_unfused_ones(make_tiny_llama):
    """float16 GPTQ through the Triton kernels: fused steps replayed from CUDA graphs give the tokens of fused eager
    steps, and one decode step's logits agree with the unfused step's to float16 rounding (other sums, same
    weights); the parts' forms stay dropped."""
    from qtool.kernels.quant_linear import set_model_backend
    from qtool.kernels.registry import BackendRegistry
    from qtool.kernels.triton_backend import TritonBackend
    from qtool.quant.rtn import rtn_quantize

    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    model = make_tiny_llama(seed=10, **shape).to("cuda", torch.float16)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, attribute = name.rpartition(".")
            quantized = QuantLinear.from_quantized(rtn_quantize(module.weight.data.float(), 4, 128).quantized)
            setattr(model.model.layers.get_submodule(parent), attribute, quantized.to("cuda"))
    registry = BackendRegistry({"triton": lambda: TritonBackend(tune=False),
                                "torch": "qtool.kernels.torch_backends:GptqTorchBackend"})
    set_model_backend(model, "triton", registry)
    config = dict(block_size=16, num_blocks=64, max_num_seqs=4, max_num_batched_tokens=64)
    # the fused engines first: the first fusion frees the parts' old tensors, which an unfused engine's graphs
    # captured before it would still read
    engines = {name: Engine(model, None, EngineConfig(**config, **settings)) for name, settings in
               {"fused": {}, "fused-eager": dict(cuda_graphs=False), "unfused": dict(fuse_projections=False)}.items()}
    for name, engine in engines.items():
        assert engine.runner.decode_step_reason.endswith(FUSED_ALL) == (name != "unfused")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    tokens = {name: [out.token_ids for out in engines[name].generate(PROMPTS, params)] for name in ("fused", "fused-eager")}
    assert tokens["fused"] == tokens["fused-eager"]
    assert engines["fused"].runner.decode_graphs is not None and engines["fused"].runner.fast_decode_steps > 0
    logits = []
    for name in ("unfused", "fused-eager"):
        engine = engines[name]
        for prompt in PROMPTS:
            engine.add_request(prompt, params)
        engine.step()  # the prefills
        chunks = engine.scheduler.schedule()
        assert all(chunk.num_tokens == 1 for chunk in chunks)
        logits.append(engine.runner.execute(chunks).double())
    assert ((logits[1] - logits[0]).norm() / logits[0].norm()).item() < 1e-2
    # the unfused engine runs the parts, views of the fused tensors (one copy of the checkpoint's weights)
    for layer, fused in zip(model.model.layers, engines["fused"].runner.decode_step.layers):
        for part, whole in ((layer.self_attn.q_proj, fused.qkv.module), (layer.mlp.up_proj, fused.gate_up.module)):
            assert part.qweight.untyped_storage().data_ptr() == whole.qweight.untyped_storage().data_ptr()
