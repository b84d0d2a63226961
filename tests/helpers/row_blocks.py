"""The GPU's path of a GPTQ-style solver on the CPU: its blocks of rows through solve_rows (whose row blocks run
their torch reference here) instead of its per-row loop, with the rows each call took recorded."""

from __future__ import annotations

from types import ModuleType


def force_row_blocks(monkeypatch, module: ModuleType) -> list[int]:
    """Make `module` (a solver importing blocks_problem and solve_rows) take its block path; returns the list
    that collects each block call's row count."""
    calls: list[int] = []
    original = module.solve_rows

    def counted(*args):
        calls.append(args[0].shape[0])
        return original(*args)

    monkeypatch.setattr(module, "blocks_problem", lambda tensor: None)
    monkeypatch.setattr(module, "solve_rows", counted)
    return calls
