"""The `copatch` commands, one small module each: `copatch/commands/<name>.py` defines

    HELP: str                          # one line, shown by `copatch --help`
    def main(argv: list[str]) -> int   # the command's arguments (after its name); the exit status

and raises `copatch.errors.UserError` (or lets a known user error through) for anything the user can
fix: `copatch.commands.errors.run_command` prints it as `copatch: error: ...` for every command alike.

`copatch --help` must start fast, so it reads each module's `HELP` from its source (a string literal)
instead of importing it: a command module may import torch and Lightning at its top.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

__all__ = ["ORDER", "available", "help_line", "load"]

# The commands in the order `copatch --help` lists them; those whose module is missing are left out.
ORDER = ("predict", "evaluate", "segment", "compare", "app")

_HERE = Path(__file__).parent


def available() -> list[str]:
    """The commands whose module exists, in `ORDER`."""
    return [name for name in ORDER if (_HERE / f"{name}.py").is_file()]


def help_line(name: str) -> str:
    """The command's `HELP`, read from its source without importing it (imported when not a literal)."""
    source = (_HERE / f"{name}.py").read_text(encoding="utf-8")
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        if any(isinstance(t, ast.Name) and t.id == "HELP" for t in targets) and node.value is not None:
            try:
                return str(ast.literal_eval(node.value))
            except ValueError:
                break
    return str(getattr(load(name), "HELP", ""))


def load(name: str):  # -> module
    """Import the command's module."""
    return importlib.import_module(f"copatch.commands.{name}")
