"""The state of a run on disk: prediction lines, resume, and the fingerprint of the setup.

An output dir holds (see `copatch.callbacks.prediction_writer.PredictionWriter`):

    run.json                     what defines the results (model, proposer, checkpoints, data, precision)
    predictions.rank<R>.jsonl    one JSON line per expression, appended and fsync'ed per batch, per rank
    failures.rank<R>.jsonl       one line per expression that could not be evaluated, per rank
    metrics.json, failures.jsonl written at the end of a run (or by `copatch evaluate`)

Lines are only ever appended, a batch at a time, and flushed to disk before the next batch starts,
so a killed run leaves complete lines plus at most one torn last line per file; readers drop a last
line that has no newline, and the next run on that rank truncates it before appending. Files
written whole (run.json, metrics.json, failures.jsonl) go to a temporary file first and are renamed
over the old one, so a reader sees the old or the new file, never half of one.

Resume: an expression with a line in any `predictions.rank*.jsonl` (whatever the world size of the
run that wrote it) is not computed again, except a failed one, which is retried. If a line's id
appears more than once (a retried failure), a successful line wins over a failed one.

Fingerprint: a run refuses an output dir whose `run.json` was written by another setup, so that
results of two setups never mix in one set of metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
FAILURES_FILE = "failures.jsonl"
_RANK_FILE = re.compile(r"^predictions\.rank(\d+)\.jsonl$")
_HASH_BYTES = 1 << 20  # a checkpoint is identified by its size and its first and last MiB


class RunMismatchError(ValueError):
    """The output dir holds results of another setup."""


# ------------------------------------------------------------------------------------------ files
def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Append one JSON line per record in a single write, then flush and fsync."""
    data = "".join(json.dumps(r) + "\n" for r in records)
    if not data:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, repair: bool = False) -> list[dict[str, Any]]:
    """The complete lines of a JSONL file; a last line without a newline (torn by a kill) is dropped.

    Args:
        path: the file (a missing file reads as empty).
        repair: also truncate the torn last line from the file, so that appending can go on.

    A complete line that is not a JSON object is an error naming the file and line: the file was
    damaged by something other than an interrupted append.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # 0 when there is no complete line
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    records = []
    for number, line in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}, is not JSON ({err}): the file is damaged. Delete that "
                             "line (the next run computes its expression again) or the whole output dir.") from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {number}, is not a JSON object")
        records.append(record)
    return records


def prediction_files(root: str | os.PathLike) -> list[Path]:
    """Every `predictions.rank<R>.jsonl` in `root`, by rank."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _RANK_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def read_predictions(root: str | os.PathLike) -> list[dict[str, Any]]:
    """All complete prediction lines of all ranks, in rank then line order."""
    return [r for path in prediction_files(root) for r in read_jsonl(path)]


def id_key(expression_id: Any) -> str:
    """Expression ids compared as strings (JSON keeps ints and strings apart, datasets do not mix them)."""
    return str(expression_id)


def latest_predictions(lines: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """One line per expression id: a successful line wins over a failed one (a retried failure),
    otherwise the first line read."""
    chosen: dict[str, dict[str, Any]] = {}
    for line in lines:
        key = id_key(line["id"])
        old = chosen.get(key)
        if old is None or (old.get("failure") and not line.get("failure")):
            chosen[key] = line
    return chosen


def completed_ids(lines: Iterable[dict[str, Any]]) -> set[str]:
    """Ids (as `id_key`) that a resumed run skips: those with a line that did not fail."""
    return {id_key(line["id"]) for line in lines if not line.get("failure")}


# ------------------------------------------------------------------------------------ fingerprint
def jsonable(value: Any) -> Any:
    """A JSON-ready copy of a config value (dataclasses become dicts, paths and dtypes strings)."""
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def _simple(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, os.PathLike)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_simple(v) for v in value)
    return type(value).__module__ == "torch" and type(value).__name__ == "dtype"


def object_fingerprint(obj: Any) -> dict[str, Any]:
    """Class path and the public plain-valued attributes of an object (e.g. a proposer's settings)."""
    cls = type(obj)
    attrs = {k: jsonable(v) for k, v in sorted(vars(obj).items()) if not k.startswith("_") and _simple(v)}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "args": attrs}


def file_fingerprint(path: str | None) -> dict[str, Any] | None:
    """Size and a hash of the first and last MiB of a weights file (a tag or None passes through)."""
    if not path:
        return None
    if not os.path.isfile(path):
        return {"tag": path}
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(_HASH_BYTES))
        if size > _HASH_BYTES:
            f.seek(max(_HASH_BYTES, size - _HASH_BYTES))
            digest.update(f.read())
    return {"size": size, "sha256_head_tail": digest.hexdigest()}  # not the path: a moved file is the same


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs."""
    a, b = _flatten(old), _flatten(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            out.append(f"{key}: {_short(a.get(key, '<absent>'))} -> {_short(b.get(key, '<absent>'))}")
    return out


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_run(root: str | os.PathLike) -> dict[str, Any] | None:
    """The parsed `run.json` of `root`, or None."""
    path = Path(root) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunMismatchError(f"{path} is damaged ({err}); delete the output dir {root} or use another "
                               "--trainer.default_root_dir.") from err


def check_run(root: str | os.PathLike, fingerprint: dict[str, Any]) -> bool:
    """Refuse `root` when its `run.json` was written by a setup other than `fingerprint`.

    Returns whether a matching `run.json` exists. Raises `RunMismatchError` naming the output dir and
    the differing keys, or when the dir holds predictions without a `run.json`.
    """
    root = Path(root)
    run = read_run(root)
    if run is None:
        if any(read_jsonl(p) for p in prediction_files(root)):
            raise RunMismatchError(
                f"{root} holds predictions but no {RUN_FILE}, so it is unknown which setup made them. Use a new "
                f"--trainer.default_root_dir, or delete {root} to start over.")
        return False
    diff = differences(run.get("fingerprint", {}), jsonable(fingerprint))
    if diff:
        shown = "; ".join(diff[:12]) + (f"; ... ({len(diff) - 12} more)" if len(diff) > 12 else "")
        raise RunMismatchError(
            f"{root} holds results of another setup ({root / RUN_FILE} differs: {shown}). Results of two setups "
            f"must not mix: use a new --trainer.default_root_dir for this setup, or delete {root} to start over.")
    return True


def write_run(root: str | os.PathLike, fingerprint: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write `run.json`: the compared `fingerprint` and informative `meta` (never compared)."""
    atomic_write_text(Path(root) / RUN_FILE,
                      json.dumps({"fingerprint": jsonable(fingerprint), "meta": jsonable(meta)}, indent=2) + "\n")
