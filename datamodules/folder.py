"""Your own images: a folder of pictures plus a list of expressions, one `ImageSample` per image.

Layout (`root` is the folder; image and mask paths are relative to it, or absolute):

    <root>/expressions.jsonl      one JSON object a line:
                                  {"image": "a.jpg", "expression": "the dog on the left",
                                   "id": "dog-1" (optional), "mask": "masks/a-dog.png" (optional)}
    <root>/expressions.csv        or a CSV with a header row naming the same columns
                                  (image, expression, and optionally id, mask; empty cells = not given)
    <root>/a.jpg, ...             the images (anything PIL reads; converted to RGB, no EXIF rotation:
                                  masks and predictions are in the file's stored pixel orientation)

Rules, as the REFER DataModule's:

- A line that cannot be read (not JSON, not an object, no `image` or no `expression`, an empty
  expression, a value of the wrong type, a duplicate id, a mask file that does not exist) is an error
  naming the file and its line number, raised before anything runs (`copatch.errors.UserValueError`,
  `UserFileNotFound` for a missing mask). Blank lines are skipped; other keys are ignored.
- A missing or unreadable image is not an error: the sample carries it in `ImageSample.error` (with a
  black image, of the mask's size when there is one) and its expressions are recorded as failures that
  count as IoU 0 (`copatch.failures`); fix the file and rerun the same command to redo only those.
- Masks (`mask`): a PNG (or any image) at the image's size; every pixel whose greyscale value is not 0
  is the object. The lines of one image must all give a mask or none (an image's ground truth is one
  `[E, H, W]` tensor); across images it may vary, and the metrics (oIoU, mIoU, Pr@X, the top-k oracle,
  exactly as on the benchmarks) count the expressions with a mask only. A mask of another size than
  its image stops the run with the file's name.

Ids. Image ids are the image's path relative to `root` without its suffix, `/` replaced by `__`
(`a.jpg` -> `a`, `sub/b.png` -> `sub__b`): the names that stored proposals use
(`<proposals root>/<image id>.json`, `copatch.proposals`). Two image files with the same id are an
error. Expression ids are the line's `id` when given (kept as written: int or str), else
`<image id>:<line number>` (`a:3`), the 1-based line of the file (in a CSV the header is line 1, and a
record whose quoted cell holds a newline is numbered by its last line). They
stay the same as long as the line stays where it is, which is what resuming a run
(`copatch.run_state`) and the prediction files key on; give ids to be free to reorder lines.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from copatch.datamodules.base import SampleDataModule
from copatch.errors import UserFileNotFound, UserValueError
from copatch.types import Expression, ImageSample

EXPRESSION_FILES = ("expressions.jsonl", "expressions.csv")
_COLUMNS = ("image", "expression", "id", "mask")


@dataclass
class FolderLine:
    """One line of the expressions file, checked. `line` is its 1-based line number."""

    line: int
    image: Path
    image_id: str
    text: str
    id: int | str
    mask: Path | None


@dataclass
class _FolderImage:
    image_id: str
    path: Path
    lines: list[FolderLine] = field(default_factory=list)


def find_expressions_file(root: str | Path, expressions: str | None = None) -> Path:
    """The expressions file: `expressions` (relative to `root`, or absolute), else the first of
    `expressions.jsonl`, `expressions.csv` in `root`. Missing: `UserFileNotFound` naming what was looked for."""
    root = Path(root)
    if not root.is_dir():
        raise UserFileNotFound(f"image folder {root} not found: set data.init_args.root to the folder holding your "
                               "images and expressions.jsonl (or expressions.csv).")
    if expressions is not None:
        path = Path(expressions) if Path(expressions).is_absolute() else root / expressions
        if not path.is_file():
            raise UserFileNotFound(f"expressions file {path} not found: set data.init_args.expressions to a .jsonl "
                                   "or .csv file (relative to data.init_args.root).")
        return path
    for name in EXPRESSION_FILES:
        if (root / name).is_file():
            return root / name
    raise UserFileNotFound(f"no expressions file in {root}: write {root / EXPRESSION_FILES[0]} (one "
                           '{"image": ..., "expression": ...} a line) or expressions.csv, or set '
                           "data.init_args.expressions.")


def image_id_of(relative: str) -> str:
    """The image id of an image path as written in the file (`sub/b.png` -> `sub__b`)."""
    return Path(relative).with_suffix("").as_posix().replace("/", "__")


def _raw_rows(path: Path) -> list[tuple[int, Any]]:
    """`(line number, row)` of every non-blank line: a parsed JSON value, or a CSV row dict."""
    text = path.read_text(encoding="utf-8-sig")  # a BOM from spreadsheet exports is not part of the header
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines(keepends=True))
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in ("image", "expression") if c not in header]
        if missing:
            raise UserValueError(f"{path}:1: the CSV header must name the columns image and expression (and "
                                 f"optionally id, mask); it is {header}, without {', '.join(missing)}.")
        reader.fieldnames = header
        rows = []
        for row in reader:
            # line_num is the line where the record ends: its line, unless a quoted cell holds a newline.
            if None in row:
                raise UserValueError(f"{path}:{reader.line_num}: more cells than the header's {len(header)} "
                                     "columns (quote a cell that holds a comma).")
            rows.append((reader.line_num, {k: (v if v is None else v.strip()) for k, v in row.items()}))
        return [(n, {k: v for k, v in r.items() if v not in (None, "")}) for n, r in rows
                if any(v not in (None, "") for v in r.values())]
    rows = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((number, json.loads(raw)))
        except json.JSONDecodeError as err:
            raise UserValueError(f"{path}:{number}: not a JSON object ({err.msg} at column {err.colno}); each line "
                                 'must be like {"image": "a.jpg", "expression": "the red circle"}.') from err
    return rows


def read_expressions(path: Path, root: Path) -> list[FolderLine]:
    """Every line of the expressions file `path`, checked (see the module docstring for the rules)."""
    lines: list[FolderLine] = []
    seen_ids: dict[str, int] = {}
    for number, row in _raw_rows(path):
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            raise UserValueError(f"{where}: a line must be a JSON object with image and expression, got "
                                 f"{type(row).__name__}.")
        for key in ("image", "expression"):
            if key not in row or row[key] is None:
                raise UserValueError(f"{where}: no {key!r}; each line needs image and expression.")
        for key in ("image", "expression", "mask"):
            if key in row and row[key] is not None and not isinstance(row[key], str):
                raise UserValueError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}.")
        if not row["image"].strip():
            raise UserValueError(f"{where}: 'image' is empty; give the image's file name.")
        if not row["expression"].strip():
            raise UserValueError(f"{where}: the expression is empty; every expression needs at least one word.")
        image = Path(row["image"]) if Path(row["image"]).is_absolute() else root / row["image"]
        # The id comes from the path as written relative to root (an absolute path outside root: its name).
        image_id = image_id_of(str(image.relative_to(root)) if image.is_relative_to(root) else image.name)
        given = row.get("id")
        if given is not None and (isinstance(given, bool) or not isinstance(given, (int, str)) or given == ""):
            raise UserValueError(f"{where}: 'id' must be a non-empty string or an integer, got {given!r}.")
        expr_id = given if given is not None else f"{image_id}:{number}"
        if str(expr_id) in seen_ids:
            raise UserValueError(f"{where}: id {expr_id!r} is already used on line {seen_ids[str(expr_id)]}; ids "
                                 "must be unique.")
        seen_ids[str(expr_id)] = number
        mask = None
        if row.get("mask") is not None:
            mask = Path(row["mask"]) if Path(row["mask"]).is_absolute() else root / row["mask"]
            if not mask.is_file():
                raise UserFileNotFound(f"{where}: mask file {mask} not found; fix the path (relative to {root}) or "
                                       "leave 'mask' out for a line without ground truth.")
        lines.append(FolderLine(number, image, image_id, row["expression"], expr_id, mask))
    if not lines:
        raise UserValueError(f"{path} holds no expressions: write one line per (image, expression).")
    return lines


def read_image(path: Path) -> tuple[torch.Tensor | None, str | None]:
    """`([3, H, W] uint8 RGB, None)`, or `(None, why)` when the file is missing or unreadable."""
    if not path.is_file():
        return None, f"Image not found: {path}. Put the image there or fix its name in the expressions file."
    try:
        with Image.open(path) as im:
            rgb = np.array(im.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return None, f"Cannot read image {path} ({err}); replace it with a readable image file."
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), None


def read_mask(path: Path, line: str) -> np.ndarray:
    """`[H, W] bool`: the non-zero (greyscale) pixels of the mask file `path` of `line` (`file:number`)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) > 0
    except (OSError, ValueError, SyntaxError) as err:
        raise UserValueError(f"{line}: cannot read mask {path} ({err}); write it as a PNG, 0 outside the "
                             "object and non-zero inside.") from err


class FolderDataset(Dataset):
    """The lines of an expressions file grouped by image, in the order images first appear in the file;
    an image's expressions keep the file's order.

    `targets` is `[E, H, W] bool` when the image's lines give masks, else None; `instance_masks` is
    None (a folder has no instance annotations: use a real proposer, not `GroundTruthProposals`).

    Args:
        root: the folder (see the module docstring).
        expressions: the expressions file (relative to `root`, or absolute); None finds
            `expressions.jsonl` or `expressions.csv` in `root`.
        limit: keep only the first `limit` images.
    """

    def __init__(self, root: str | Path, expressions: str | None = None, limit: int | None = None) -> None:
        self.root = Path(root)
        self.file = find_expressions_file(self.root, expressions)
        lines = read_expressions(self.file, self.root)
        images: dict[str, _FolderImage] = {}
        for line in lines:
            image_id = line.image_id
            entry = images.setdefault(image_id, _FolderImage(image_id, line.image))
            if entry.path != line.image:
                raise UserValueError(f"{self.file}:{line.line}: image {line.image} has the id {image_id!r} of "
                                     f"{entry.path} (line {entry.lines[0].line}); rename one of them (ids are the "
                                     "path without its suffix).")
            if entry.lines and (entry.lines[0].mask is None) != (line.mask is None):
                first = entry.lines[0]
                raise UserValueError(f"{self.file}:{line.line}: {'a' if line.mask else 'no'} mask for image "
                                     f"{line.image}, but line {first.line} {'gives none' if line.mask else 'gives one'}; "
                                     "the lines of one image must all give a mask or none.")
            entry.lines.append(line)
        self.entries = list(images.values())[:limit] if limit is not None else list(images.values())

    @property
    def num_expressions(self) -> int:
        return sum(len(e.lines) for e in self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def image_sizes(self) -> list[tuple[int, int]]:
        """`(H, W)` of each image, in index order, from the file headers (PIL reads no pixels); `(1, 1)`
        for an image that cannot be opened (it is recorded as a failure when read)."""
        sizes = []
        for entry in self.entries:
            try:
                with Image.open(entry.path) as im:
                    sizes.append((im.height, im.width))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
                sizes.append((1, 1))
        return sizes

    def __getitem__(self, index: int) -> ImageSample:
        entry = self.entries[index]
        image, error = read_image(entry.path)
        targets = None
        if entry.lines[0].mask is not None:
            masks = [read_mask(line.mask, f"{self.file}:{line.line}") for line in entry.lines]  # type: ignore[arg-type]
            size = image.shape[-2:] if image is not None else masks[0].shape
            for line, mask in zip(entry.lines, masks):
                if mask.shape != tuple(size):
                    raise UserValueError(f"{self.file}:{line.line}: mask {line.mask} is {mask.shape[0]}x{mask.shape[1]} "
                                         f"(HxW) but the image {entry.path} is {size[0]}x{size[1]}; masks must be at "
                                         "the image's size.")
            targets = torch.from_numpy(np.stack(masks))
        if image is None:  # recorded: a black image of the mask's size (1 x 1 without masks)
            height, width = targets.shape[-2:] if targets is not None else (1, 1)
            image = torch.zeros(3, height, width, dtype=torch.uint8)
        return ImageSample(
            image_id=entry.image_id,
            image=image,
            expressions=[Expression(line.id, line.text) for line in entry.lines],
            targets=targets,
            file_name=str(entry.path),
            error=error,
        )


class FolderDataModule(SampleDataModule):
    """Predict-only DataModule over a folder of your own images and an expressions file.

    Args: as `FolderDataset`, plus `batch_size` (images per batch), `num_workers` and `group_by_size`
    (`SampleDataModule`: batches of one model input size, sizes read from the file headers). The candidate
    masks come from the model's proposer: stored proposals named by the image ids
    (`configs/data/folder.yaml`), or SAM / Mask2Former / the demo's colour regions
    (`configs/proposers/`).
    """

    def __init__(self, root: str, expressions: str | None = None, batch_size: int = 1, num_workers: int = 0,
                 limit: int | None = None, group_by_size: bool = False) -> None:
        super().__init__(batch_size, num_workers, group_by_size)
        self.save_hyperparameters()
        self.root, self.expressions, self.limit = root, expressions, limit

    def prepare_data(self) -> None:
        find_expressions_file(self.root, self.expressions)

    def build_dataset(self) -> FolderDataset:
        return FolderDataset(self.root, self.expressions, self.limit)
