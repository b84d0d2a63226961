"""Generation: greedy against a manual argmax loop, sampling settings honoured, chat template vs raw prompts,
streaming, seeds that do not leak, bad settings."""

from __future__ import annotations

import pytest
import torch

from qtool.core.errors import QtoolError
from qtool.runtime.generate import GenerationSettings, generate, prompt_ids


def greedy_reference(model, ids: torch.Tensor, steps: int, stop: int) -> list[int]:
    """Argmax of the full forward pass at every step (no cache), stopping after the stop token."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids).logits[0, -1].argmax())
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            if token == stop:
                break
    return new


@pytest.fixture
def model(make_tiny_llama, tokenizer):
    return make_tiny_llama(seed=4, vocab_size=len(tokenizer))


def test_chat_prompt_uses_the_template_and_raw_prompt_does_not(tokenizer):
    chat = prompt_ids(tokenizer, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the fox"}])[0].tolist()
    assert tokenizer.decode(chat) == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nthe fox<|im_end|>\n<|im_start|>assistant\n"
    raw = prompt_ids(tokenizer, "the fox")[0].tolist()
    assert raw == [tokenizer.bos_token_id] + tokenizer.backend_tokenizer.encode("the fox", add_special_tokens=False).ids


@pytest.mark.parametrize("seed", [4, 9])
def test_greedy_matches_manual_argmax_loop(make_tiny_llama, tokenizer, seed):
    model = make_tiny_llama(seed=seed, vocab_size=len(tokenizer))
    messages = [{"role": "user", "content": "what is the capital of france"}]
    pieces: list[str] = []
    result = generate(model, tokenizer, messages, GenerationSettings(max_new_tokens=10, temperature=0), on_text=pieces.append)
    expected = greedy_reference(model, prompt_ids(tokenizer, messages), 10, tokenizer.eos_token_id)
    assert result.token_ids == expected and result.tokens == len(expected)
    assert result.text == tokenizer.decode(expected, skip_special_tokens=True)
    assert "".join(pieces) == result.text
    assert result.tokens_per_second == pytest.approx(result.tokens / result.seconds)


def test_generation_stops_at_the_end_token(model, tokenizer):
    """An output layer whose only signal is a bias on the end token: the reply is that one token, shown empty."""
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 1.0
    model.lm_head = head
    result = generate(model, tokenizer, "the fox", GenerationSettings(max_new_tokens=8, temperature=0))
    assert (result.tokens, result.text) == (1, "")


def test_top_k_one_sampling_is_greedy(model, tokenizer):
    greedy = generate(model, tokenizer, "the quick", GenerationSettings(max_new_tokens=8, temperature=0))
    top1 = generate(model, tokenizer, "the quick", GenerationSettings(max_new_tokens=8, temperature=1.5, top_k=1, seed=0))
    assert top1.text == greedy.text


@pytest.mark.parametrize("top_k", [0, 20])
def test_top_k_limits_the_choice_and_zero_switches_it_off(make_tiny_llama, tokenizer, top_k):
    """Nearly uniform next-token odds in a strict order (ties would defeat top-k), the end token excluded:
    100 samples visit many ids unless top-k keeps only the k likeliest."""
    model = make_tiny_llama(seed=0, vocab_size=len(tokenizer), max_position_embeddings=512)
    head = torch.nn.Linear(model.config.hidden_size, len(tokenizer), bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(-1e-3 * torch.arange(len(tokenizer)))
        head.bias[tokenizer.eos_token_id] = -1e9
    model.lm_head = head
    settings = GenerationSettings(max_new_tokens=100, temperature=1.0, top_p=1.0, top_k=top_k, seed=0)
    seen = set(generate(model, tokenizer, "the", settings).token_ids)
    if top_k:
        likeliest = [i for i in range(len(tokenizer)) if i != tokenizer.eos_token_id][:top_k]
        assert seen <= set(likeliest) and len(seen) > top_k // 2
    else:
        assert len(seen) > 60  # transformers' own default (top_k=50) would cap it at 50


def test_seed_repeats_the_sample_and_leaves_global_rng_alone(model, tokenizer):
    settings = GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=123)
    state = torch.get_rng_state()
    first = generate(model, tokenizer, "the quick", settings)
    assert torch.equal(torch.get_rng_state(), state)
    again = generate(model, tokenizer, "the quick", settings)
    others = {generate(model, tokenizer, "the quick", GenerationSettings(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=s)).text for s in range(3)}
    assert first.text == again.text
    assert len(others | {first.text}) > 1  # a random 300-token model at temperature 1 samples different replies


def test_prompt_longer_than_context_is_refused(make_tiny_llama, tokenizer):
    model = make_tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=16)
    with pytest.raises(QtoolError, match="the model's context is 16"):
        generate(model, tokenizer, "the quick brown fox jumps over the lazy dog " * 4, GenerationSettings(temperature=0))


def test_conversation_without_chat_template_asks_for_raw(model, make_tiny_tokenizer):
    with pytest.raises(QtoolError, match="no chat template") as info:
        generate(model, make_tiny_tokenizer(), [{"role": "user", "content": "hi"}])
    assert "--raw" in info.value.hint


@pytest.mark.parametrize(
    "settings, match",
    [
        (GenerationSettings(max_new_tokens=0), "--max-new-tokens 0"),
        (GenerationSettings(temperature=-0.1), "--temperature -0.1"),
        (GenerationSettings(top_p=0), "--top-p 0"),
        (GenerationSettings(top_p=1.5), "--top-p 1.5"),
        (GenerationSettings(top_k=-1), "--top-k -1"),
    ],
)
def test_bad_settings(model, tokenizer, settings, match):
    with pytest.raises(QtoolError, match=match):
        generate(model, tokenizer, "hi", settings)


@pytest.mark.slow
def test_smollm2_knows_the_capital_of_france(smollm2_path):
    from qtool.checkpoints.sources import load_model

    loaded = load_model("smollm2-135m", device="cpu", dtype="float32")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = generate(loaded.model, loaded.tokenizer, messages, GenerationSettings(max_new_tokens=40, temperature=0))
    print(f"SmolLM2: {result.text!r} ({result.tokens} tokens, {result.tokens_per_second:.1f} tokens/s)")
    assert "Paris" in result.text


@pytest.mark.parametrize("settings", [GenerationSettings(max_new_tokens=4, temperature=0), GenerationSettings(max_new_tokens=4, seed=1)],
                         ids=["greedy", "sampled"])
def test_nan_logits_stop_generation_with_an_error(model, tokenizer, settings):
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    pieces = []
    with pytest.raises(QtoolError, match=r"^the logits of models/broken hold NaN or infinite values"):
        generate(model, tokenizer, "the fox", settings, on_text=pieces.append, name="models/broken")
    assert pieces == []  # refused at the first step: nothing was streamed
