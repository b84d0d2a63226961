"""Linear sensitivities (empirical Fisher of each linear's output times its channel energies), computed layer by
layer, against a direct autograd computation through the model's own forward on a tiny random Llama, and the
model left as it was."""

import logging

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


# ---- where the kept inputs wait, and the memory ladder: neither changes a value ----


def uneven_windows(seed: int) -> list[torch.Tensor]:
    """Two lengths: the planned rung runs two batches of two windows through each layer."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 320, (length,), generator=gen) for length in (23, 23, 17, 17)]


class OutOfMemory:
    """Stands in for `function` in qtool.quant.sensitivity: counts its calls, and raises torch.OutOfMemoryError as
    a GPU would for a call whose hidden states (`tokens_of(args)`) have more than `cap` tokens, or for the calls
    numbered in `fail_calls` (1-based)."""

    def __init__(self, monkeypatch, function: str, tokens_of, cap: int | None = None, fail_calls: set[int] = frozenset()):
        import qtool.quant.sensitivity as sensitivity

        self.real, self.tokens_of, self.cap, self.fail_calls = getattr(sensitivity, function), tokens_of, cap, set(fail_calls)
        self.calls: list[int] = []  # tokens per call
        self.raised = 0
        monkeypatch.setattr(sensitivity, function, self)

    def __call__(self, *args, **kwargs):
        tokens = self.tokens_of(*args)
        self.calls.append(tokens)
        if (self.cap is not None and tokens > self.cap) or len(self.calls) in self.fail_calls:
            self.raised += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory (a test's cap: {tokens} tokens)")
        return self.real(*args, **kwargs)


def layer_tokens(layer, inputs, samples):
    return sum(inputs.hidden_states[k].shape[0] * inputs.hidden_states[k].shape[1] for k in samples)


def head_tokens(model, hidden):
    return hidden.shape[0] * hidden.shape[1]


@pytest.fixture(scope="module")
def weighed(make_tiny_llama):
    model = make_tiny_llama(seed=7, num_hidden_layers=3)
    windows = uneven_windows(3)
    return model, windows, linear_sensitivities(model, windows)


@pytest.mark.parametrize("tier", ["device", "host", "disk"])
def test_every_tier_gives_the_same_sensitivities(weighed, tmp_path, tier):
    from qtool.quant.activation_store import ActivationStore

    model, windows, free = weighed
    seen: dict[str, list[str]] = {}

    def watch(done, total, detail=""):
        if store.folder is not None:
            seen[detail] = sorted(f.name for f in store.folder.iterdir())

    with ActivationStore(tier, torch.device("cpu"), tmp_path / "out") as store:
        got = linear_sensitivities(model, windows, store=store, progress=watch)
    assert got == free
    if tier == "disk":
        # every layer's inputs, then the last layer's outputs, went to files of their own (one generation per
        # file: the folder shows the newest, the older ones live on as long as their mappings)
        assert seen["weighing: loss gradients"] == ["activations-00004.bin"]
        assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_out_of_memory_in_batched_forwards_goes_on_one_window_at_a_time(weighed, monkeypatch, caplog):
    model, windows, free = weighed
    layers = OutOfMemory(monkeypatch, "run_layer_batch", layer_tokens, cap=23)  # two windows in one call "do not fit"
    with caplog.at_level(logging.WARNING, logger="qtool.quant.memory_ladder"):
        got = linear_sensitivities(model, windows)
    assert got == free
    # the first forward ran out; the pass stayed on the rung that fits: the head in pieces, backwards one window each
    assert [r.getMessage() for r in caplog.records] == [
        "weighing: forward through layer 1/3: out of GPU memory as planned; redoing it with one sample per batch"]
    assert layers.raised == 1 and max(layers.calls[1:]) == 23


def test_out_of_memory_in_the_head_runs_it_in_pieces(make_tiny_llama, monkeypatch, caplog):
    from qtool.quant.sensitivity import HEAD_PIECE_TOKENS

    model = make_tiny_llama(seed=8, max_position_embeddings=640)
    gen = torch.Generator().manual_seed(4)
    windows = [torch.randint(0, 320, (length,), generator=gen) for length in (600, 301)]
    free = linear_sensitivities(model, windows)
    head = OutOfMemory(monkeypatch, "head_logits", head_tokens, cap=HEAD_PIECE_TOKENS)  # a whole window "does not fit"
    with caplog.at_level(logging.WARNING, logger="qtool.quant.memory_ladder"):
        got = linear_sensitivities(model, windows)
    assert got == free
    assert [r.getMessage() for r in caplog.records] == [
        "weighing: loss gradients: out of GPU memory as planned; redoing it with one sample per batch"]
    # 599 and 300 predictions, redone in pieces of 256
    assert head.calls == [599, 256, 256, 87, 256, 44] and HEAD_PIECE_TOKENS == 256


def test_out_of_memory_midway_through_a_backward_keeps_the_windows_done(weighed, monkeypatch, caplog):
    model, windows, free = weighed
    probe = OutOfMemory(monkeypatch, "run_layer_batch", layer_tokens)
    linear_sensitivities(model, windows)
    # calls: 2 batches per layer forward, then per layer backward (layer 3, 2, 1); fail layer 2's second batch
    assert probe.calls == [46, 34] * 6
    monkeypatch.undo()
    squeezed = OutOfMemory(monkeypatch, "run_layer_batch", layer_tokens, fail_calls={10})
    with caplog.at_level(logging.WARNING, logger="qtool.quant.memory_ladder"):
        got = linear_sensitivities(model, windows)
    assert got == free
    assert [r.getMessage() for r in caplog.records] == [
        "weighing: backward through layer 2/3: out of GPU memory as planned; redoing it with one sample per batch"]
    # the first batch's windows were not redone: the rest of layer 2 and all of layer 1 ran a window at a time
    assert squeezed.calls == [46, 34] * 3 + [46, 34, 46, 34, 17, 17, 23, 23, 17, 17]
