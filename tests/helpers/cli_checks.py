"""What every CLI test expects of a refused input (Typer's CliRunner result)."""

from __future__ import annotations

import re


def one_line_error(result) -> str:
    """Exit 2 and one `error:` line, the last thing on stderr (transformers' loading bars may come before it);
    returns that line."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    return errors[0]


def refused_choice(result, name: str, value: str, choices) -> str:
    """Typer refused a value outside a parameter's choices: exit 2, and an error that names the option (or the
    argument's metavar), the value and every valid choice. Returns the error text, unwrapped from rich's box."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(re.sub("[│╭╮╰╯─]", " ", result.stderr).split())
    assert f"Invalid value for '{name}'" in text, text
    assert f"'{value}'" in text and all(f"'{choice}'" in text for choice in choices), text
    return text


def save_model_dir(directory, model, tokenizer):
    """A model directory the CLI can load: the model's weights and config beside its tokenizer."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def greedy_reply(model, tokenizer, conversation) -> str:
    """The reply transformers' generate gives greedily (6 new tokens): what `qtool run` must print."""
    from qtool.runtime.generate import GenerationSettings, generate

    return generate(model, tokenizer, conversation, GenerationSettings(max_new_tokens=6, temperature=0)).text
