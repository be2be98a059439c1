"""Cache expression parses in memory and, optionally, on disk across runs.

Why: the reference pipeline parses every sentence about 8 times (once per text feature and spatial
cue); RefCOCO/RefCOCO+/RefCOCOg repeat many strings across and within splits; and a parse depends
on the text and the parser only, never on the image. So :class:`CachedParser` parses each distinct
string once per process, and with ``cache_dir`` it also keeps the parses as JSON lines that a
later run (or another process, such as another DDP rank) reuses.

On-disk format: every process appends only to its own file ``parses-<hostname>-<pid>.jsonl`` in
``cache_dir`` (so concurrent writers never interleave lines) and, on first use, reads every
``*.jsonl`` file there. A line is::

    {"key": <CachedParser.identity>, "text": <input text>, "parsed": {<ParsedExpression fields>}}

The identity (parser class, model name, library and model versions, and a hash of the parsing
rules) is part of every line; lines whose key differs from the current parser's identity are
ignored, so a cache written by another backend, model or version is never used. Torn or corrupt
lines (such as the last line of a killed run) are skipped with a warning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import hashlib
import json
import os
import re
import socket
import typing
import warnings
from pathlib import Path
from typing import Any, Sequence

from copatch.prepare import find_prepared
from copatch.text import parsing
from copatch.text.parsing import (
    ExpressionParser,
    ParsedExpression,
    SpacyParser,
    StanzaParser,
    _check_texts,
)

_FIELDS: tuple[dataclasses.Field, ...] = dataclasses.fields(ParsedExpression)
# Fields stored as JSON lists that must come back as tuples (ParsedExpression is hashable/frozen).
_TUPLE_FIELDS: frozenset[str] = frozenset(
    name for name, hint in typing.get_type_hints(ParsedExpression).items()
    if typing.get_origin(hint) is tuple
)


class CachedParser:
    """An :class:`~copatch.text.parsing.ExpressionParser` that wraps ``parser`` with a cache.

    Each distinct text is given to ``parser`` at most once per process: a :meth:`parse` call sends
    all its misses (deduplicated, in first-seen order) in a single ``parser.parse`` call. With
    ``cache_dir`` the parses also persist as JSON lines (see the module docstring); the line
    format keys every parse by :attr:`identity`.

    ``hits`` and ``misses`` count input texts: each text of a :meth:`parse` call is one or the
    other; a text repeated within one call is a miss once and a hit for its repeats.
    """

    def __init__(
        self, parser: ExpressionParser, cache_dir: str | os.PathLike[str] | None = None
    ) -> None:
        self.parser = parser
        self.cache_dir: Path | None = Path(cache_dir) if cache_dir is not None else None
        self.hits = 0
        self.misses = 0
        self._memory: dict[str, ParsedExpression] = {}
        self._identity: str | None = None
        self._disk_loaded = False
        self._write_failed = False  # after a failed write (full disk, read-only folder) no more are tried
        # Own files already checked for a torn last line (the path changes with the pid after fork).
        self._checked_files: set[Path] = set()

    def clear(self) -> None:
        """Forget the parses held in memory and the counters (the disk cache is read again on next use)."""
        self._memory.clear()
        self._disk_loaded = False
        self.hits = self.misses = 0

    # ------------------------------------------------------------------------------- identity
    @property
    def identity(self) -> str:
        """What determines the parse: parser class, model, versions (computed once, lazily).

        For :class:`SpacyParser` this loads the spaCy model (parsing needs it anyway) to read its
        ``meta["version"]``. Stored with every line on disk; lines of another identity are ignored.
        """
        if self._identity is None:
            self._identity = _identity_of(self.parser)
        return self._identity

    # ---------------------------------------------------------------------------------- parse
    def parse(self, texts: Sequence[str]) -> list[ParsedExpression]:
        # Validate first, so an empty text raises even when the other texts are cached.
        texts = _check_texts(texts)
        if self.cache_dir is not None and not self._disk_loaded:
            self._load_disk()
        missing = list(dict.fromkeys(t for t in texts if t not in self._memory))
        if missing:
            parsed = self.parser.parse(missing)
            if len(parsed) != len(missing):
                raise RuntimeError(
                    f"{type(self.parser).__qualname__}.parse returned {len(parsed)} results "
                    f"for {len(missing)} texts"
                )
            self._memory.update(zip(missing, parsed))
            if self.cache_dir is not None and not self._write_failed:
                self._append(list(zip(missing, parsed)))
        self.misses += len(missing)
        self.hits += len(texts) - len(missing)
        return [self._memory[t] for t in texts]

    # ----------------------------------------------------------------------------------- disk
    def _own_file(self) -> Path:
        assert self.cache_dir is not None
        host = re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"
        return self.cache_dir / f"parses-{host}-{os.getpid()}.jsonl"

    def _load_disk(self) -> None:
        assert self.cache_dir is not None
        self._disk_loaded = True
        if not self.cache_dir.is_dir():
            return
        key = self.identity
        for path in sorted(self.cache_dir.glob("*.jsonl")):
            try:
                data = path.read_bytes()
            except OSError as err:  # unreadable file: a cache must never stop the run
                warnings.warn(f"Parse cache: cannot read {path}: {err}; ignoring it", stacklevel=3)
                continue
            for lineno, raw in enumerate(data.split(b"\n"), start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                    if record["key"] != key:
                        continue  # another parser/model/version: never used
                    text, parsed = record["text"], _decode(record["parsed"])
                    if not isinstance(text, str):
                        raise TypeError("text is not a string")
                except (ValueError, KeyError, TypeError) as err:
                    warnings.warn(
                        f"Parse cache: skipping torn or corrupt line {lineno} of {path} ({err})",
                        stacklevel=3,
                    )
                    continue
                self._memory.setdefault(text, parsed)

    def _append(self, items: list[tuple[str, ParsedExpression]]) -> None:
        assert self.cache_dir is not None
        key = self.identity
        payload = "".join(
            json.dumps({"key": key, "text": text, "parsed": dataclasses.asdict(parsed)},
                       ensure_ascii=False) + "\n"
            for text, parsed in items
        )
        path = self._own_file()
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            if path not in self._checked_files:
                # Pids repeat (e.g. across container restarts): if an earlier process with our name was
                # killed mid-line, start on a fresh line so our first record is not glued to its tail.
                self._checked_files.add(path)
                if path.exists() and path.stat().st_size > 0:
                    with path.open("rb") as f:
                        f.seek(-1, os.SEEK_END)
                        if f.read(1) != b"\n":
                            payload = "\n" + payload
            # One write per parse() call, flushed now, so a killed run loses at most its last line.
            with path.open("a", encoding="utf-8", newline="\n") as f:
                f.write(payload)
                f.flush()
        except OSError as err:  # a full disk or a read-only folder must not stop a run: stop writing
            warnings.warn(f"Parse cache: cannot write {path}: {err}; parses are no longer written to "
                          f"{self.cache_dir} in this process", stacklevel=3)
            self._write_failed = True



@dataclass(frozen=True)
class ParseInput:
    """Parsing a sample's expressions as a `copatch.prepare.PrepareStep`, so that DataLoader workers
    do it (`CoPatch(parse_in_workers=True)`): the main process then only looks the parses up.

    The step runs the model's own `CachedParser` (a copy in each worker, with its own cache file),
    so the parses are the ones the main process would make; the key is the parser's identity. The
    result is plain data, `{text: {field: value}}`: Lightning's batch transfer rebuilds dataclasses
    and refuses frozen ones such as `ParsedExpression`.
    """

    parser: CachedParser

    def key(self, size: tuple[int, int]) -> str:
        return f"parse:{self.parser.identity}"

    def __call__(self, sample: Any) -> dict[str, dict[str, Any]]:
        # Empty expressions are left out: the module records them as failures without parsing them.
        texts = [e.text for e in sample.expressions if e.text.strip()]
        return {t: dataclasses.asdict(p) for t, p in zip(texts, self.parser.parse(texts))}

    def lookup(self, sample: Any) -> list[ParsedExpression] | None:
        """The parses of `sample.expressions` made in a worker, in order, or None if any is missing."""
        found = find_prepared(sample, self)
        if not isinstance(found, dict) or any(e.text not in found for e in sample.expressions):
            return None
        return [ParsedExpression(**{k: tuple(v) if k in _TUPLE_FIELDS else v for k, v in found[e.text].items()})
                for e in sample.expressions]


def _decode(fields: Any) -> ParsedExpression:
    """Rebuild a ParsedExpression from its JSON dict, checking every field's type."""
    if not isinstance(fields, dict):
        raise TypeError("parsed is not an object")
    names = {f.name for f in _FIELDS}
    if set(fields) != names:
        raise KeyError(f"fields {sorted(set(fields) ^ names)} differ from ParsedExpression")
    values: dict[str, Any] = {}
    for name, value in fields.items():
        if name in _TUPLE_FIELDS:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise TypeError(f"{name} is not a list of strings")
            values[name] = tuple(value)
        elif isinstance(value, str):
            values[name] = value
        else:
            raise TypeError(f"{name} is not a string")
    return ParsedExpression(**values)


# ----------------------------------------------------------------------------------- identity
def _rules_hash() -> str:
    """Hash of the parsing rules' source, so editing the rules invalidates old caches."""
    try:
        return hashlib.sha256(Path(parsing.__file__).read_bytes()).hexdigest()[:12]
    except OSError:
        return "unknown"


def _spacy_parts(parser: SpacyParser) -> list[str]:
    import spacy  # SpacyParser needs it; a missing spaCy fails here as parsing would

    nlp = parser._load()  # the model's own version: a re-trained model of the same name differs
    meta = getattr(nlp, "meta", None) or {}
    return [f"model={parser.model}", f"spacy={spacy.__version__}",
            f"model_version={meta.get('version', 'unknown')}"]


def _identity_of(parser: Any) -> str:
    if isinstance(parser, CachedParser):
        return parser.identity
    cls = type(parser)
    # The exact class comes first: a subclass may change the rules, so it gets its own identity (one
    # that changes its rules in place should get a new cache dir); it keeps its base's versions.
    parts = [f"{cls.__module__}.{cls.__qualname__}"]
    if isinstance(parser, SpacyParser):
        parts += _spacy_parts(parser)
    elif isinstance(parser, StanzaParser):
        if parser._pipeline is not None:  # injected pipeline: name it by its class
            pipe = type(parser._pipeline)
            parts.append(f"pipeline={pipe.__module__}.{pipe.__qualname__}")
        else:
            directory = parser.resources_dir or os.environ.get("STANZA_RESOURCES_DIR")
            if directory is None:
                try:
                    from stanza.resources.common import DEFAULT_MODEL_DIR as directory
                except ImportError:
                    directory = ""
            parts.append(f"resources={os.path.basename(os.path.normpath(str(directory)))}")
        try:
            import stanza

            parts.append(f"stanza={stanza.__version__}")
        except ImportError:
            parts.append("stanza=none")
        spatial = parser.spatial
        if spatial is None:
            parts.append("spatial=none")
        else:
            parts.append(f"spatial=({_identity_of(spatial)})")
    else:
        model = getattr(parser, "model", "")
        if isinstance(model, (str, int, float)):  # only plain values: repr of objects can vary
            parts.append(f"model={model}")
    if isinstance(parser, (SpacyParser, StanzaParser)):
        parts.append(f"rules={_rules_hash()}")
    return "|".join(parts)
