"""One way for every command to turn a known user error into a short message and an exit code.

`run_command(main, argv)` runs a command's `main`; a known user error (a `copatch.errors.UserError`, a
config file that does not exist, an unknown option, an output dir that cannot be written, ...) is
printed as

    copatch: error: <message, a few lines>

with no traceback, and the exit code is 2 for a bad command line (as argparse) and 1 for the rest.
`--debug` anywhere on the command line, or `COPATCH_DEBUG=1`, lets the exception through with its
traceback. Anything not recognised as a user error is never hidden: it propagates unchanged.

This module imports nothing heavy: `copatch --help` loads it.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterable

__all__ = ["run_command", "user_message", "debug_requested", "strip_debug", "nearest_option", "EXIT_USAGE",
           "EXIT_ERROR", "MAX_LINES"]

EXIT_USAGE = 2  # a bad command line (argparse's code)
EXIT_ERROR = 1  # any other known user error
MAX_LINES = 6  # a message is cut to this many lines (a long message is a bug in the message)
WIDTH = 110

# Option names a command offers, for "did you mean" (filled by the command that parses: see predict.py).
KNOWN_OPTIONS: list[str] = []

_UNION_NOISE = "Does not validate against any of the Union subtypes"


def debug_requested(argv: Iterable[str]) -> bool:
    """`--debug` on the command line or `COPATCH_DEBUG` set to anything but 0/false/empty."""
    env = os.environ.get("COPATCH_DEBUG", "").strip().lower()
    return "--debug" in argv or env not in ("", "0", "false", "no")


def strip_debug(argv: list[str]) -> list[str]:
    """`argv` without the `--debug` flag (no command defines it; the dispatcher takes it)."""
    return [a for a in argv if a != "--debug"]


def nearest_option(given: str, known: Iterable[str]) -> str | None:
    """The known option closest to `given` (`--model.exit_layr` -> `--model.exit_layer`), or None."""
    name = given.split("=", 1)[0]
    match = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return match[0] if match else None


def _union_message(text: str) -> str:
    """jsonargparse's "Does not validate against any of the Union subtypes ... Errors: - A - B ... Given
    value: ..." reduced to the errors that are not "Expected a <type>" (ours, when a class raised)."""
    errors = re.findall(r"^\s*- (.*)$", text, flags=re.MULTILINE)
    ours = [e for e in errors if not e.startswith(("Expected a", "Not a valid", "Type <class", _UNION_NOISE))
            and "Given value" not in e]
    if ours:
        return "\n".join(dict.fromkeys(ours))
    # Only type mismatches: name the option, the value given and the types it takes.
    key = re.search(r'Parser key "([^"]+)"', text)
    given = re.search(r"Given value: (.*)$", text, flags=re.MULTILINE)
    types = re.findall(r"<class '(?:[\w.]+\.)?(\w+)'>", (re.search(r"Subtypes: \[(.*?)\]", text) or [""])[0])
    if key and given:
        takes = " or ".join("null" if t == "NoneType" else t for t in dict.fromkeys(types)) or "another type"
        hint = (" (a class path such as copatch.text.parsing.StanzaParser; to pick the parser by name use "
                "--model.switches.parser stanza|spacy)" if key.group(1) == "model.parser" else
                " (a class path, or class_path: and init_args: in a config file)" if "NoneType" in types else "")
        return f"--{key.group(1)} {given.group(1).strip()!r} is not valid: it takes {takes}{hint}."
    return text.split("\n", 1)[0]


def _chain(err: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _argument_message(text: str) -> str:
    text = text.strip()
    if _UNION_NOISE in text:
        return _union_message(text)
    unknown = re.match(r"unrecognized arguments: (.*)", text)
    if unknown:
        words = [w for w in unknown.group(1).split() if w.startswith("-")] or unknown.group(1).split()[:1]
        lines = []
        for word in words:
            hint = nearest_option(word, KNOWN_OPTIONS)
            lines.append(f"unknown option {word.split('=', 1)[0]}" + (f": did you mean {hint}?" if hint else ""))
        return "\n".join(lines)
    missing = re.match(r"""Parser key "config": File does not exist: '?([^']*)'?""", text)
    if missing:
        return f"config file {missing.group(1)} does not exist: check the --config path (the shipped ones are in configs/)."
    # 'Parser key "model.exit_layer":\n  Expected a <class 'int'>. Got value: x': the option, the value, the type.
    typed = re.match(r"""Parser key "([^"]+)":\s*Expected a <class '(?:[\w.]+\.)?(\w+)'>\. Got value: (.*)$""", text,
                     flags=re.DOTALL)
    if typed:
        return f"--{typed.group(1)} {typed.group(3).strip()!r} is not valid: it takes {typed.group(2)}."
    return text


def user_message(err: BaseException) -> tuple[str, int] | None:
    """The short message and exit code of a known user error, or None when `err` is not one."""
    from copatch.errors import UserError

    for cause in _chain(err):
        if isinstance(cause, UserError):
            return str(cause), EXIT_ERROR
    if isinstance(err, argparse.ArgumentError) or type(err).__name__ == "ArgumentError":
        return _argument_message(str(err)), EXIT_USAGE
    if _UNION_NOISE in str(err):  # a class in the config raised while jsonargparse instantiated it
        return _union_message(str(err)), EXIT_ERROR
    for cause in _chain(err):
        if isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            where = f" {cause.filename}" if cause.filename else ""
            return (f"cannot write{where}: {cause.strerror}. Choose a writable output dir with "
                    f"--trainer.default_root_dir."), EXIT_ERROR
    return None


def _short(message: str) -> str:
    lines: list[str] = []
    for paragraph in message.strip().splitlines() or [""]:
        lines.extend(textwrap.wrap(paragraph, WIDTH, subsequent_indent="  ", break_on_hyphens=False,
                                   break_long_words=False) or [""])
    if len(lines) > MAX_LINES:
        lines = lines[:MAX_LINES - 1] + ["  ... (rerun with --debug for the whole message and the traceback)"]
    return "\n".join(lines)


def run_command(main: Callable[[list[str]], int | None], argv: list[str], prog: str = "copatch") -> int:
    """Run `main(argv)` and return its exit code; a known user error becomes `prog: error: <message>` on
    stderr and a non-zero code. `--debug` is taken out of `argv`; with it (or COPATCH_DEBUG=1) errors
    propagate with their traceback."""
    debug = debug_requested(argv)
    argv = strip_debug(argv)
    if debug:
        return main(argv) or 0
    try:
        return main(argv) or 0
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only known user errors are caught; others are re-raised
        known = user_message(err)
        if known is None:
            raise
        message, code = known
        print(f"{prog}: error: {_short(message)}", file=sys.stderr)
        return code
