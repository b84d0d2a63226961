"""How --help draws options, in one place: the Typer command classes every qtool command (and the root) is built
with. A flag takes no value, so its row shows no type."""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand, TyperGroup, TyperOption


class _FlagsShowNoType:
    """This Typer's rich help prints an option's metavar where there is one, else its type, and it does so for
    flags too (`--force <bool>`, even `--help <bool>`). An empty metavar on every flag, set where the help reads the
    parameters, covers ours and Typer's own (--help, --install-completion) alike."""

    def get_params(self, ctx: Any) -> list:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
                param.metavar = ""
        return params


class QtoolCommand(_FlagsShowNoType, TyperCommand):
    """Each command (quantize, convert, validate, eval, run)."""


class QtoolGroup(_FlagsShowNoType, TyperGroup):
    """The root command `qtool`."""
