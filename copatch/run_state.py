"""The state of a run on disk: prediction lines, resume, and the fingerprint of the setup.

An output dir holds (see `copatch.callbacks.prediction_writer.PredictionWriter`):

    run.json                     what defines the results (model, proposer, checkpoints, data, precision)
    predictions.rank<R>.jsonl    one JSON line per expression, appended and fsync'ed per batch, per rank
    failures.rank<R>.jsonl       one line per expression that could not be evaluated, per rank
    metrics.json, failures.jsonl written at the end of a run (or by `copatch evaluate`)

While a run goes on, lines are only appended, a batch at a time, and flushed to disk before the
next batch starts, so a killed run leaves complete lines plus at most one torn last line per file; readers drop a last
line that has no newline, and the next run on that rank truncates it before appending. Files
written whole (run.json, metrics.json, failures.jsonl) go to a temporary file first and are renamed
over the old one, so a reader sees the old or the new file, never half of one.

Resume: an expression with a line in any `predictions.rank*.jsonl` (whatever the world size of the
run that wrote it) is not computed again, except a failed one, which is retried; its new line carries
`attempt` one above the highest attempt already written for that id (a line without `attempt` is
attempt 1).

One final line per expression (`final_lines`): of the lines of one id, a successful line wins over a
failed one, and among those the highest `attempt`; `metrics.json`, `failures.jsonl` and the next
run's skip list all follow that one line. At the end of a run, once every rank has written, rank 0
compacts the files (`compact_predictions`): every superseded line is removed, each file replaced
through a rename, so a finished run leaves exactly one line per expression. A kill in the middle of
compacting leaves each file either as it was or compacted: only superseded lines are ever removed, so
the final lines, and what they decide, stay the same.

Fingerprint: a run refuses an output dir whose `run.json` was written by another setup, so that
results of two setups never mix in one set of metrics.

The run's bookkeeping lives here and in the writer, not in `CoPatch`: the resume filter
(`pending_sample`), the model's fingerprint and setup record (`model_fingerprint`, `describe_setup`,
behind `CoPatch.fingerprint()` / `CoPatch.describe()`) and `metrics.json` of a run without a writer
(`write_metrics`); the end-of-run results from the lines are the writer's `on_predict_epoch_end`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any, Iterable

from copatch.failures import failure_line

RUN_FILE = "run.json"
METRICS_FILE = "metrics.json"
FAILURES_FILE = "failures.jsonl"
_RANK_FILE = re.compile(r"^predictions\.rank(\d+)\.jsonl$")
_FAILURE_RANK_FILE = re.compile(r"^failures\.rank(\d+)\.jsonl$")
_HASH_BYTES = 1 << 20  # a checkpoint is identified by its size and its first and last MiB


class RunMismatchError(ValueError):
    """The output dir holds results of another setup."""


# ------------------------------------------------------------------------------------------ files
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it back at once
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file: 0o666 less the umask (0o644 under the usual 022)."""
    return 0o666 & ~_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename (readers never see half a file).

    The file gets the mode of any other file written here (`file_mode`, 0644 under the usual umask),
    not the 0600 of the temporary file `mkstemp` makes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, file_mode())
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


def attempt(line: dict[str, Any]) -> int:
    """How many times the line's expression had been computed when the line was written (1 if unsaid)."""
    value = line.get("attempt", 1)
    return value if isinstance(value, int) else 1


def _rank(line: dict[str, Any]) -> tuple[bool, int]:
    # What decides between two lines of one id: success first, then the later attempt.
    return (not line.get("failure"), attempt(line))


def final_lines(lines: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The final line of every expression id (`id_key`): a successful line wins over a failed one,
    then the highest `attempt`; of equal lines, the first read. Removing any line that is not final
    never changes which line is (what makes `compact_predictions` safe to interrupt)."""
    chosen: dict[str, dict[str, Any]] = {}
    for line in lines:
        key = id_key(line["id"])
        old = chosen.get(key)
        if old is None or _rank(line) > _rank(old):
            chosen[key] = line
    return chosen


latest_predictions = final_lines  # the former name


def attempts(lines: Iterable[dict[str, Any]]) -> dict[str, int]:
    """The highest `attempt` written for every id (`id_key`): a retry writes one more."""
    out: dict[str, int] = {}
    for line in lines:
        key = id_key(line["id"])
        out[key] = max(out.get(key, 0), attempt(line))
    return out


def failure_files(root: str | os.PathLike) -> list[Path]:
    """Every `failures.rank<R>.jsonl` in `root`, by rank."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _FAILURE_RANK_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


def compact_predictions(root: str | os.PathLike) -> int:
    """Remove every superseded line from the prediction files of `root`; returns how many were removed.

    Only for the end of a run, once no rank writes any more (under DDP: rank 0, after a barrier); never
    while a run appends to the dir. Each `predictions.rank<R>.jsonl` that holds a superseded line (or a
    torn last line) is rewritten with its final lines in their order, through a temporary file and a
    rename; then each `failures.rank<R>.jsonl` is rewritten to list the failed final lines of rank R.
    Killed at any point, every final line is still in some file.
    """
    root = Path(root)
    files = prediction_files(root)
    per_file = [(path, read_jsonl(path)) for path in files]
    final = {id(line) for line in final_lines(line for _, lines in per_file for line in lines).values()}
    removed = 0
    kept_per_rank: dict[str, list[dict[str, Any]]] = {}
    for path, lines in per_file:
        kept = [line for line in lines if id(line) in final]
        removed += len(lines) - len(kept)
        torn = not path.read_bytes().endswith(b"\n") and path.stat().st_size > 0
        if len(kept) != len(lines) or torn:
            atomic_write_text(path, "".join(json.dumps(line) + "\n" for line in kept))
        kept_per_rank[_RANK_FILE.match(path.name).group(1)] = kept
    for path in failure_files(root):  # ranks of an earlier, larger run that now hold nothing failed
        if _FAILURE_RANK_FILE.match(path.name).group(1) not in kept_per_rank:
            atomic_write_text(path, "")
    for rank, kept in kept_per_rank.items():
        path = root / f"failures.rank{rank}.jsonl"
        text = "".join(json.dumps(failure_line(line)) + "\n" for line in kept if line.get("failure"))
        if text or path.exists():
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                atomic_write_text(path, text)
    return removed


def completed_ids(lines: Iterable[dict[str, Any]]) -> set[str]:
    """Ids (as `id_key`) that a resumed run skips: those with a line that did not fail."""
    return {id_key(line["id"]) for line in lines if not line.get("failure")}


def pending_sample(sample: Any, skip_ids: set[str]) -> Any:
    """`sample` (an `ImageSample`) without the expressions whose ids (`id_key`) are in `skip_ids`
    (already written by an earlier run), or None when none is left, so that the image is not worked
    on at all. `targets` (`[E, H, W] bool` or None) keeps the rows of the expressions kept."""
    if not skip_ids:
        return sample
    keep = [i for i, e in enumerate(sample.expressions) if id_key(e.id) not in skip_ids]
    if len(keep) == len(sample.expressions):
        return sample
    if not keep:
        return None
    targets = sample.targets[keep] if sample.targets is not None else None
    return dataclasses.replace(sample, expressions=[sample.expressions[i] for i in keep], targets=targets)


def write_metrics(root: str | os.PathLike, metrics: dict[str, float], setup: dict[str, Any]) -> None:
    """Write `root/metrics.json` as `{"metrics", "setup"}` for a run without prediction lines (no
    `PredictionWriter`: the metrics come from the module's own metric states). With prediction lines,
    `copatch.evaluate.evaluate_run` writes it from the lines instead."""
    atomic_write_text(Path(root) / METRICS_FILE, json.dumps({"metrics": metrics, "setup": setup}, indent=2))


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


# ------------------------------------------------------------------------------ the model's setup
# Hyperparameters that name weights files: the fingerprint of a run holds the files' contents instead.
WEIGHT_HPARAMS = ("clip_pretrained", "gem_pretrained", "clip_config")
# Hyperparameters that do not change a single prediction: left out of the fingerprint.
NOT_PREDICTION_HPARAMS = ("save_in_checkpoint", "parse_cache_dir", "parse_in_workers")

# Knobs added after runs had been written, at the value that does what the code did before them: left
# out of the fingerprint at that value, so that such a run still resumes. Set to anything else, they
# are in it (a run with another value is another setup).
LATER_HPARAM_DEFAULTS: dict[str, Any] = {"max_side": None, "allow_tf32": False, "batched_crops": False}
LATER_SWITCH_DEFAULTS: dict[str, Any] = {"siglip_global": "pixels", "siglip_patch_head": "norm"}


def model_fingerprint(model: Any, given_parser: Any = None) -> dict[str, Any]:
    """What defines a `CoPatch` model's predictions, for `run.json` (`CoPatch.fingerprint()`).

    Hyperparameters (switches included) without those of `NOT_PREDICTION_HPARAMS`, the content of the
    weights files (`WEIGHT_HPARAMS`, compared by `file_fingerprint`), the proposer and its settings,
    the parser the user gave (`given_parser`; None when the model builds its own from its
    hyperparameters), and for random weights a sha256 of the weights themselves
    (`model.full_state_dict()`).
    """
    # Imported here: the rest of this module reads and writes files only, without the model stack.
    import torch

    from copatch.clip_model import resolve_checkpoint
    from copatch.text.parse_cache import CachedParser

    hparams = {k: v for k, v in jsonable(dict(model.hparams)).items()
               if not k.startswith("_") and k not in NOT_PREDICTION_HPARAMS}
    for key, default in LATER_HPARAM_DEFAULTS.items():
        if key in hparams and hparams[key] == default:
            del hparams[key]
    if isinstance(hparams.get("switches"), dict):
        switches = hparams["switches"].get("init_args", hparams["switches"])
        for key, default in LATER_SWITCH_DEFAULTS.items():
            if key in switches and switches[key] == default:
                del switches[key]
    for key in WEIGHT_HPARAMS:  # compared by content, so a moved or renamed file is the same setup
        hparams[key] = file_fingerprint(resolve_checkpoint(hparams.get(key)))
    out: dict[str, Any] = {"class": f"{type(model).__module__}.{type(model).__qualname__}", "hparams": hparams,
                           "proposer": object_fingerprint(model.proposer) if model.proposer is not None else None}
    if given_parser is not None:  # the parser itself, not the cache around it
        given = given_parser.parser if isinstance(given_parser, CachedParser) else given_parser
        out["parser"] = object_fingerprint(given)
    if not model.hparams.clip_pretrained or (model.hparams.gem_model and not model.hparams.gem_pretrained):
        digest = hashlib.sha256()
        for name, tensor in sorted(model.full_state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out["random_weights_sha256"] = digest.hexdigest()
    return out


def describe_setup(model: Any) -> dict[str, Any]:
    """What produced a `CoPatch` model's results (`CoPatch.describe()`, the `setup` of `metrics.json`):
    hyperparameters, switches, the proposer's class, whether it is the oracle, and versions."""
    import platform  # here, as in `model_fingerprint`: only a run that has a model needs these

    import lightning.pytorch as pl
    import open_clip
    import torch

    hp = {k: v for k, v in model.hparams.items() if k != "switches"}
    return {"hparams": hp, "switches": asdict(model.switches), "proposer": type(model.proposer).__name__,
            "oracle": model.is_oracle,
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                         "lightning": pl.__version__, "python": platform.python_version()}}
