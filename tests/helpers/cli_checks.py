"""What every CLI test expects of a refused input (Typer's CliRunner result), and the tiny chat model the `qtool
run` tests load."""

from __future__ import annotations

import re

import pytest

# `qtool run`'s flags for the reply greedy_reply computes (6 new tokens, greedy, on the CPU)
GREEDY = ["--temperature", "0", "--max-new-tokens", "6", "--device", "cpu"]


def one_line_error(result) -> str:
    """Exit 2 and one `error:` line, the last thing on stderr (transformers' loading bars may come before it);
    returns that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def refused_by_typer(result, name: str) -> str:
    """Typer refused a parameter's value: exit 2, and an error that names the option (or the argument's metavar).
    Returns the error text, unwrapped from rich's box."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.stderr).split())
    assert f"Invalid value for '{name}'" in text, text
    return text


def refused_choice(result, name: str, value: str, choices) -> str:
    """Typer refused a value outside a parameter's choices: refused_by_typer, and the error names the value and
    every valid choice. Returns the error text, unwrapped from rich's box."""
    text = refused_by_typer(result, name)
    assert f"'{value}'" in text and all(f"'{choice}'" in text for choice in choices), text
    return text


def stop_model_loads(monkeypatch, error: Exception) -> list[str]:
    """Replaces qtool's load_model (the commands import it when they run) by one that records the source and raises
    `error`: returns the list of sources a command tried to load, so a test can check that a refusal came first."""
    from qtool.checkpoints import sources

    loaded: list[str] = []

    def load_model(source, **kwargs):
        loaded.append(str(source))
        raise error

    monkeypatch.setattr(sources, "load_model", load_model)
    return loaded


def save_model_dir(directory, model, tokenizer):
    """A model directory the CLI can load: the model's weights and config beside its tokenizer."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_rtn_gptq_dir(directory, model, tokenizer):
    """A GPTQ directory the CLI can load: every linear but the head round-to-nearest 4-bit, groups of 32."""
    import torch

    from qtool.checkpoints.gptq_checkpoint import save_quantized_model
    from qtool.quant.rtn import rtn_quantize

    quantized = {
        name: rtn_quantize(module.weight.detach(), 4, 32).quantized
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    return save_quantized_model(directory, model, quantized, tokenizer=tokenizer)


def greedy_reply(model, tokenizer, conversation) -> str:
    """The reply transformers' generate gives greedily (6 new tokens): what `qtool run` with GREEDY must
    print."""
    from qtool.runtime.generate import GenerationSettings, generate

    return generate(model, tokenizer, conversation, GenerationSettings(max_new_tokens=6, temperature=0)).text


def chat_tokenizer_fixture():
    """A module's `tokenizer` fixture: the tiny tokenizer with the tiny chat template. Bind it at the top of a test
    module: `tokenizer = chat_tokenizer_fixture()`."""

    @pytest.fixture(scope="module", name="tokenizer")
    def tokenizer_fixture(make_tiny_tokenizer, tiny_chat_template):
        return make_tiny_tokenizer(chat_template=tiny_chat_template)

    return tokenizer_fixture


def chat_model_fixtures(seed: int):
    """A module's `tokenizer`, `model` (a tiny llama of `seed` over that tokenizer's vocabulary) and `model_dir`
    (both saved where the CLI loads them) fixtures. Bind them at the top of a test module:
    `tokenizer, model, model_dir = chat_model_fixtures(31)`."""

    @pytest.fixture(name="model")
    def model_fixture(make_tiny_llama, tokenizer):
        return make_tiny_llama(seed=seed, vocab_size=len(tokenizer))

    @pytest.fixture(name="model_dir")
    def model_dir_fixture(tmp_path, model, tokenizer):
        return save_model_dir(tmp_path / "tiny", model, tokenizer)

    return chat_tokenizer_fixture(), model_fixture, model_dir_fixture
