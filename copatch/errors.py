"""Known user errors: a short message naming the file or option and the fix, shown without a traceback.

Raise a `UserError` (or one of its subclasses, which are also the matching built-in exception, so
`except FileNotFoundError` keeps working) where the cause is something the user can fix: a missing
weights file, a missing stanza folder, a config file that does not exist, a bad value. The command line
prints `copatch: error: <message>` and exits non-zero (`--debug` or `COPATCH_DEBUG=1` shows the
traceback); Python callers get the exception as usual.

Options are named in the words of the interface in use: write `knob("clip_pretrained")` in the message,
and it reads `--model.clip_pretrained` on the command line, `clip_checkpoint=` inside
`CoPatch.from_preset`, `clip_pretrained=` when `CoPatch(...)` is called directly. An interface sets its
words with `with interface_words(...)`.

    raise UserFileNotFound(f"CLIP weights {path} not found: put the file there or set {knob('clip_pretrained')}")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["UserError", "UserFileNotFound", "UserValueError", "UserTypeError", "knob", "interface_words",
           "cli_words", "python_words"]


class UserError(Exception):
    """An error the user can fix; its message names the file or option and the fix."""


class UserFileNotFound(UserError, FileNotFoundError):
    """A file or folder the user must provide is missing or unreadable."""


class UserValueError(UserError, ValueError):
    """A value (option, input, file content) is wrong."""


class UserTypeError(UserError, TypeError):
    """An argument has the wrong type."""


def python_words(name: str) -> str:
    """`proposer.init_args.model_dir` -> `model_dir=` (a keyword argument of the call in use)."""
    return f"{name.rsplit('.', 1)[-1]}="


def cli_words(name: str) -> str:
    """`clip_pretrained` -> `--model.clip_pretrained`; a name with a section (`data.init_args.root`,
    `trainer.default_root_dir`) is taken as it is."""
    if name.split(".", 1)[0] in ("data", "trainer", "model"):
        return f"--{name}"
    return f"--model.{name}"


_WORDS: ContextVar[Callable[[str], str]] = ContextVar("copatch_interface_words", default=python_words)


def knob(name: str) -> str:
    """How the option `name` (a `CoPatch` argument, dotted below it: `proposer.init_args.model_dir`) is
    spelled in the interface in use."""
    return _WORDS.get()(name)


@contextmanager
def interface_words(words: Callable[[str], str] | Mapping[str, str]) -> Iterator[None]:
    """Within the block, `knob()` spells options with `words`: a function, or a mapping of the names
    that differ (e.g. `{"clip_pretrained": "clip_checkpoint="}`) over the current words."""
    if isinstance(words, Mapping):
        outer, table = _WORDS.get(), dict(words)

        def spell(name: str) -> str:
            return table[name] if name in table else outer(name)
    else:
        spell = words
    token = _WORDS.set(spell)
    try:
        yield
    finally:
        _WORDS.reset(token)
