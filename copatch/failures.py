"""Inputs that cannot be evaluated, without stopping the run.

Some bad inputs concern one image only: its file is missing or unreadable (or is not the image the
annotations were made on), its stored proposals file is missing or corrupt, or the proposer gave no
usable candidate mask (none, or only empty ones; see `CoPatch.image_side`). The run goes on: every
expression of that image is written as a prediction with an empty mask and a `failure` record
`{"kind", "file", "error"}`, counted as IoU 0 in every metric (never skipped, so a broken file cannot
raise the scores), logged per rank in `failures.rank<R>.jsonl` as it happens, and listed in
`failures.jsonl` at the end of the run. An empty (or whitespace-only) expression concerns that
expression only: it is recorded the same way (kind `expression`, the file being its image's), and the
image's other expressions are predicted as usual.

Rerunning the same command in the same output dir retries exactly the failed expressions (the ones
that succeeded are kept), so fixing the files and rerunning is enough.

Inputs that mean the setup is wrong stay errors with a message naming the file or id and the fix:
ground truth of the wrong size, an unknown backbone name, a checkpoint of another architecture, a
stored-proposal folder that does not exist at all.
"""

from __future__ import annotations

from typing import Any

# What went wrong, as written in the `kind` field.
IMAGE = "image"  # the image file is missing, unreadable, or not of the annotated size
PROPOSALS = "proposals"  # the stored proposals file is missing or corrupt
NO_PROPOSALS = "no_proposals"  # the proposer gave no usable candidate mask (zero masks, or all empty)
EXPRESSION = "expression"  # the expression is empty or whitespace only: there is nothing to look for


class InputFailure(Exception):
    """One image cannot be evaluated; its expressions are recorded as failures (IoU 0).

    Args:
        kind: `image`, `proposals`, `no_proposals` or `expression`.
        file: the file at fault (image or proposals file).
        message: what is wrong and how to fix it.
    """

    def __init__(self, kind: str, file: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.file, self.message = kind, file, message

    def record(self) -> dict[str, str]:
        """The `failure` field of the image's predictions."""
        return {"kind": self.kind, "file": self.file, "error": self.message}


def is_empty_expression(text: object) -> bool:
    """Whether an expression has no word at all (empty or whitespace only, or not a string)."""
    return not isinstance(text, str) or not text.strip()


def empty_expression(expression_id: object, image_id: object, text: object, file: str) -> InputFailure:
    """The failure of one empty expression of image `image_id`, whose file is `file`."""
    return InputFailure(EXPRESSION, file,
                        f"expression {expression_id!r} of image {image_id!r} is empty ({text!r}): there is no word "
                        "to look for. Fix or drop it in the dataset's annotations, then rerun the same command.")


def failure_line(record: dict[str, Any]) -> dict[str, Any]:
    """The `failures*.jsonl` line of a prediction line (or record) that failed."""
    failure = record["failure"]
    return {"id": record["id"], "image_id": record["image_id"], "kind": failure["kind"],
            "file": failure["file"], "error": failure["error"]}


def summary(failures: list[dict[str, Any]], total: int, path: str) -> str:
    """One paragraph for the end of a run: how many failed, of which kind, and where to look."""
    if not failures:
        return ""
    kinds: dict[str, int] = {}
    for f in failures:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    images = len({str(f["image_id"]) for f in failures})
    by_kind = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    first = failures[0]
    return (f"{len(failures)} of {total} expressions ({images} images) could not be evaluated and count as IoU 0 "
            f"({by_kind}); the list is in {path}. First: id {first['id']!r}: {first['error']} "
            "Fix the files and rerun the same command: only the failed expressions are recomputed.")
