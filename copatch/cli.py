"""The `copatch` command: dispatches to one module per command (`copatch/commands/<name>.py`).

    copatch --help                       # every command with its one-line help
    copatch predict --config configs/demo.yaml
    copatch evaluate outputs/demo [--ground-truth]
    copatch <command> --help

A known user error (missing weights or stanza resources, a config file that does not exist, an unknown
option, an output dir that cannot be written, ...) prints `copatch: error: <message>` in a few lines and
exits non-zero; `--debug` (anywhere) or `COPATCH_DEBUG=1` shows the traceback instead. The dispatcher
imports nothing heavy, so `copatch --help` is fast; a command loads torch and Lightning when it runs.
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any

from copatch import commands
from copatch.commands.errors import EXIT_USAGE, run_command

# Nothing may reach a model hub at run time; huggingface_hub reads this when it is first imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROG = "copatch"


def usage() -> str:
    """`copatch --help`: every command with its one-line help."""
    names = commands.available()
    width = max(len(n) for n in names)
    lines = [f"usage: {PROG} <command> [options]   ({PROG} <command> --help for its options)", "",
             "Zero-shot referring image segmentation with CoPatch.", "", "commands:"]
    lines += [f"  {name:<{width}}  {commands.help_line(name)}" for name in names]
    lines += ["", "options:", "  -h, --help  this list", "  --debug     show the traceback of an error "
              "(or set COPATCH_DEBUG=1)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `copatch` console script; returns the exit status (the console script exits with it)."""
    args = sys.argv[1:] if argv is None else list(argv)
    words = [a for a in args if a != "--debug"]
    if not words or words[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if words else EXIT_USAGE
    name = words[0]
    if name not in commands.available():
        near = difflib.get_close_matches(name, commands.available(), n=1)
        hint = f": did you mean {near[0]}?" if near else "."
        print(f"{PROG}: error: unknown command {name!r}{hint} Commands: {', '.join(commands.available())} "
              f"({PROG} --help).", file=sys.stderr)
        return EXIT_USAGE
    rest = args[args.index(name) + 1:] + (["--debug"] if "--debug" in args[:args.index(name)] else [])
    module = commands.load(name)
    try:
        return run_command(module.main, rest, prog=PROG)
    except SystemExit as done:  # argparse's --help (0) or usage error (2)
        code = done.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1


def __getattr__(name: str) -> Any:
    # `copatch.cli.build_cli` / `CoPatchCLI`, as before the commands got modules of their own.
    if name in ("build_cli", "CoPatchCLI"):
        return getattr(commands.load("predict"), name)
    raise AttributeError(f"module 'copatch.cli' has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
