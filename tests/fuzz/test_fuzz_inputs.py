"""Property-based fuzzing of every kind of input qtool reads: each example mutates a valid file and runs one of
the commands that read that kind; fuzz_property says what must hold."""

from __future__ import annotations


import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_budget import FUZZ_SETTINGS
from fuzz_checkpoint_configs import checkpoint_config_mutations
from fuzz_commands import COMMANDS_OF_KIND
from fuzz_configs import config_mutations
from fuzz_gguf import gguf_mutations
from fuzz_oracles import parse_config
from fuzz_property import check_mutation
from fuzz_safetensors import safetensors_mutations


def mutations_of(originals, kind: str) -> st.SearchStrategy:
    content = originals.original_bytes(kind)
    if kind.endswith("-safetensors"):
        return safetensors_mutations(content)
    if kind == "gguf":
        return gguf_mutations(content)
    if kind.startswith("config-"):
        syntax = kind.removeprefix("config-")
        return config_mutations(content, parse_config(content, syntax), syntax)
    return checkpoint_config_mutations(content)


@pytest.mark.parametrize("kind", sorted(COMMANDS_OF_KIND))
def test_malformed_input_is_refused_cleanly(originals, kind):
    @FUZZ_SETTINGS
    @given(data=st.data())
    def property_holds(data):
        mutation = data.draw(mutations_of(originals, kind), label="mutation")
        command = data.draw(st.sampled_from(COMMANDS_OF_KIND[kind]), label="command")
        check_mutation(originals, kind, command, mutation)

    property_holds()
