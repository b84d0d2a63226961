"""Linear sensitivities (empirical Fisher of each linear's output times its channel energies), computed layer by
layer, against a direct autograd computation through the model's own forward on a tiny random Llama, and the
model left as it was."""

import pytest
import torch
from torch import nn

from qtool.quant.sensitivity import linear_sensitivities


def named_linears(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear) and ".layers." in name}


def direct_sensitivities(model, linears, windows):
    """The same quantity with autograd.grad on captured outputs, in float64 sums."""
    totals = {name: 0.0 for name in linears}
    fisher = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in linears.items()}
    energy = {name: torch.zeros(m.out_features, dtype=torch.float64) for name, m in linears.items()}
    count = 0
    for window in windows:
        outputs = {}
        handles = [m.register_forward_hook(lambda mod, args, out, name=name: outputs.__setitem__(name, out)) for name, m in linears.items()]
        ids = window.reshape(1, -1)
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits[0, :-1]
        loss = nn.functional.cross_entropy(logits.float(), ids[0, 1:])
        names = list(linears)
        grads = torch.autograd.grad(loss, [outputs[n] for n in names])
        for handle in handles:
            handle.remove()
        for name, grad in zip(names, grads):
            fisher[name] += grad[0].double().square().sum(0)
            energy[name] += outputs[name][0].detach().double().square().sum(0)
        count += ids.shape[1]
    for name in linears:
        totals[name] = float((fisher[name] * energy[name] / count).sum())
    return totals


def test_sensitivities_match_a_direct_computation(make_tiny_llama):
    model = make_tiny_llama(seed=5)
    gen = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, 320, (23,), generator=gen) for _ in range(3)]
    linears = named_linears(model)
    got = linear_sensitivities(model, windows)
    want = direct_sensitivities(model, linears, windows)
    assert set(got) == set(linears) and len(got) == 14
    for name in linears:
        assert got[name] == pytest.approx(want[name], rel=1e-5), name
    assert all(v > 0 for v in got.values())
    # the loss cares unevenly: the spread between linears is what the optimizer uses
    assert max(got.values()) > 3 * min(got.values())
    # a subset by name gives the same numbers for those linears
    some = {"model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"}
    assert linear_sensitivities(model, windows, names=some) == {n: got[n] for n in some}


def test_model_left_as_it_was(make_tiny_llama):
    model = make_tiny_llama(seed=6)
    model.train()
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linears = named_linears(model)
    linear_sensitivities(model, [torch.arange(17) % 320])
    assert model.training and not frozen.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if p is not frozen)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # no hook stays behind: a forward after it keeps no graph-bound state
    assert all(not m._forward_hooks for m in linears.values())
