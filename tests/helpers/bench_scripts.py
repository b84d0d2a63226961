"""bench/ holds scripts in folders by purpose, not packages: tests load one of them as a module by its path."""

import importlib.util
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_bench_script(path: str) -> ModuleType:
    """bench/<path>.py (e.g. "kernels/read_floor"), imported as a module named after the file."""
    file = BENCH / f"{path}.py"
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
