"""`copatch segment IMAGE... --expression TEXT [...]`: masks for your own images, no dataset needed.

For every (image, expression) it writes, under `--out` (default `outputs/segment`):

    masks/<image stem>_<k>.png       the chosen mask, 0/255, at the image's size (k: the expression's index)
    overlays/<image stem>_<k>.png    the picture of `copatch.overlay.render_overlay` (CoMap clusters left;
                                     candidates and the chosen mask right; the expression as caption)
    predictions.jsonl                one line: image, expression, mask and overlay paths, the chosen
                                     candidate, the candidates and their scores, the parse (noun phrase,
                                     context, relation, direction) and the other `Prediction.extras`

The demo preset (the default) runs with nothing but the install, on pictures like the demo world's
(flat-colour shapes: `copatch.demo.proposer.ColourRegionProposer`). Photographs need real weights:
`--preset vitb16` with the CLIP file, and SAM or Mask2Former (`--proposer sam --proposer-dir DIR`), or
proposals of your own (`--proposals FILE.json`, the stored format of `copatch.proposals`).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from copatch.commands.options import add_model_options

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach a model hub at run time

HELP = "masks for your own images: copatch segment IMAGE... --expression TEXT (offline with the demo preset)"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")

EXAMPLES = """examples:
  copatch segment scene.png --expression "the red circle" --expression "the star on the left"
  copatch segment photos/ --expressions phrases.txt --preset vitb16 --proposer sam \\
      --proposer-dir weights/sam-vit-huge --clip-checkpoint weights/vitb16-openai.bin --out outputs/photos
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="copatch segment", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Segment what each expression refers to in each image; writes a PNG mask, an overlay "
                    "and a JSONL line per (image, expression). The demo preset needs no download but suits "
                    "flat-colour pictures only: real photos need real weights (README, 'Your own images').")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("-e", "--expression", action="append", default=[], metavar="TEXT",
                        help="an expression, applied to every image (repeat for more)")
    parser.add_argument("--expressions", metavar="FILE",
                        help="one expression a line (for every image), or a .jsonl of {\"image\", \"expression\"} "
                             "(image paths relative to the file's folder)")
    add_model_options(parser, "<image stem>.json")
    parser.add_argument("--proposals", metavar="FILE.json", help="candidate masks of the (single) image, in the "
                                                                 "stored-proposal format (copatch/proposals.py)")
    parser.add_argument("--max-side", type=int, default=None, metavar="PX",
                        help="work on a copy of each larger image with this longer side (proposals included) and "
                             "upsample the mask to the image's size: less memory and time on large photos "
                             "(default: full size)")
    parser.add_argument("--out", default="outputs/segment", metavar="DIR", help="output folder (default: %(default)s)")
    return parser


def _error(message: str) -> Exception:
    from copatch.errors import UserValueError

    return UserValueError(message)


def _image_files(paths: list[str]) -> list[Path]:
    """The image files named (a folder: its image files, sorted); a missing path is an error."""
    from copatch.errors import UserFileNotFound

    files: list[Path] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UserFileNotFound(f"folder {path} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise UserFileNotFound(f"image {path} not found: give existing image files or folders.")
    return files


def _jobs(args: argparse.Namespace) -> list[tuple[Path, list[str]]]:
    """`[(image file, its expressions)]`, in the order given, every expression checked non-empty."""
    from copatch.errors import UserFileNotFound

    texts = list(args.expression)
    pairs: list[tuple[Path, str]] = []
    if args.expressions:
        file = Path(args.expressions)
        if not file.is_file():
            raise UserFileNotFound(f"expressions file {file} not found (--expressions).")
        lines = file.read_text(encoding="utf-8-sig").splitlines()
        if file.suffix.lower() == ".jsonl":
            for number, raw in enumerate(lines, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                    image, text = row["image"], row["expression"]
                    if not isinstance(image, str) or not isinstance(text, str):
                        raise TypeError("image and expression must be strings")
                except (ValueError, KeyError, TypeError) as err:
                    raise _error(f"{file}:{number}: expected {{\"image\": \"a.jpg\", \"expression\": \"...\"}} "
                                 f"({type(err).__name__}: {err}).") from err
                if not text.strip():
                    raise _error(f"{file}:{number}: the expression is empty; give at least one word.")
                image_path = Path(image) if Path(image).is_absolute() else file.parent / image
                if not image_path.is_file():
                    raise UserFileNotFound(f"{file}:{number}: image {image_path} not found.")
                pairs.append((image_path, text))
        else:
            texts += [line for line in lines if line.strip()]
    for k, text in enumerate(texts):
        if not text.strip():
            raise _error(f"expression {k + 1} is empty: every --expression needs at least one word.")
    images = _image_files(args.images) if args.images else []
    if not pairs and not images:
        raise _error("no image given: name image files or folders (or --expressions FILE.jsonl).")
    if images and not texts:
        raise _error("no expression given: add --expression \"the red circle\" (or --expressions FILE).")
    jobs: dict[Path, list[str]] = {}
    for image in images:
        jobs.setdefault(image, []).extend(texts)
    for image, text in pairs:
        jobs.setdefault(image, []).append(text)
    if args.proposals and len(jobs) != 1:
        raise _error(f"--proposals gives the masks of one image, but {len(jobs)} images are named: use "
                     "--proposer stored --proposer-dir DIR (one <image stem>.json each) for several.")
    return list(jobs.items())


def _proposer(args: argparse.Namespace) -> Any:
    """The proposer of `--proposer` (None with `--proposals`)."""
    if args.proposals:
        return None
    name = args.proposer or ("demo" if args.preset == "demo" else None)
    if name is None:
        raise _error(f"--preset {args.preset} needs candidate masks for photos: --proposer sam or mask2former with "
                     "--proposer-dir (their model folder), --proposer stored, or --proposals FILE.json.")
    if name == "demo":
        from copatch.demo.proposer import ColourRegionProposer

        return ColourRegionProposer()
    if not args.proposer_dir:
        raise _error(f"--proposer {name} needs --proposer-dir DIR ("
                     + ("the folder of <image stem>.json files)." if name == "stored" else "its model folder)."))
    if name == "stored":
        from copatch.proposals import StoredProposals

        return StoredProposals(args.proposer_dir, decode_in_workers=False)
    if name == "sam":
        try:
            from copatch.sam import SamProposer
        except ImportError as err:
            raise _error(f"--proposer sam is not available in this install ({err}).") from err
        return SamProposer(model_dir=args.proposer_dir)
    from copatch.mask2former import Mask2FormerProposer

    return Mask2FormerProposer(model_dir=args.proposer_dir)


def _read_proposals(path: str, size: tuple[int, int]) -> Any:
    """The masks of `--proposals FILE.json` (stored format), checked against the image size `(H, W)`."""
    import torch

    from copatch.errors import UserFileNotFound
    from copatch.masks import decode_rle
    from copatch.proposals import Proposals

    file = Path(path)
    if not file.is_file():
        raise UserFileNotFound(f"proposals file {file} not found (--proposals).")
    try:
        record = json.loads(file.read_text(encoding="utf-8"))
        height, width = int(record["height"]), int(record["width"])
        masks = decode_rle(record["masks"], height, width)
        scores = record.get("scores")
        scores = None if scores is None else torch.tensor(scores, dtype=torch.float32)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise _error(f"{file} is not in the stored-proposal format ({type(err).__name__}: {err}); see "
                     "copatch/proposals.py.") from err
    if (height, width) != tuple(size):
        raise _error(f"{file} holds {height}x{width} (HxW) masks but the image is {size[0]}x{size[1]}: proposals "
                     "must be at the image's size.")
    return Proposals(masks, scores)


def _read_image(path: Path) -> Any:
    """`[H, W, 3] uint8` of an image file; an unreadable file is a short error."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise _error(f"cannot read image {path} ({err}); give a PNG or JPEG file PIL can open.") from err


def main(argv: list[str]) -> int:
    """`copatch segment ...`; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.max_side is not None and args.max_side < 1:
        raise _error(f"--max-side {args.max_side}: give the longer side in pixels to work at (e.g. 1024), at least 1.")
    jobs = _jobs(args)  # every input checked before the model is built
    proposer = _proposer(args)
    images = [(path, _read_image(path), texts) for path, texts in jobs]

    import numpy as np
    import torch
    from PIL import Image

    from copatch.api import make_sample
    from copatch.module import CoPatch
    from copatch.overlay import render_overlay
    from copatch.presets import PRESETS
    from copatch.resize import resize_masks
    from copatch.run_state import jsonable

    if args.preset not in PRESETS:
        raise _error(f"unknown --preset {args.preset!r}: use one of {', '.join(sorted(PRESETS))}.")
    model = CoPatch.from_preset(args.preset, clip_checkpoint=args.clip_checkpoint, proposer=proposer,
                                max_side=args.max_side).eval()
    if torch.cuda.is_available():
        model = model.cuda()

    out = Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    stems: dict[str, int] = {}
    records = []
    for path, pixels, texts in images:
        # Two images with the same stem (a/x.png, b/x.png) get x, x-2: no output overwrites another.
        count = stems[path.stem] = stems.get(path.stem, 0) + 1
        stem = path.stem if count == 1 else f"{path.stem}-{count}"
        sample = make_sample(pixels, texts, image_id=stem)
        sample.image = sample.image.to(model.device)
        # The proposals once, for the pick and the overlay's candidates alike (with --max-side, computed on
        # the reduced image; the overlay gets its candidates back at the image's size).
        proposals = _read_proposals(args.proposals, sample.size) if args.proposals else \
            model.propose(model.working_sample(sample))
        preds = model.segment(pixels, texts, proposals=proposals)
        masks = proposals.masks.cpu()
        for k, pred in enumerate(preds):
            mask_file, overlay_file = out / "masks" / f"{stem}_{k}.png", out / "overlays" / f"{stem}_{k}.png"
            mask = pred.mask.cpu()
            Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(mask_file)
            candidates = resize_masks(masks[pred.candidates], sample.size) if pred.candidates else None
            render_overlay(sample.image.cpu(), pred.text, mask, pred.clusters, candidates).save(overlay_file)
            record = {"image": str(path), "expression": pred.text, "mask": str(mask_file),
                      "overlay": str(overlay_file), "chosen": pred.chosen, "candidates": pred.candidates,
                      "candidate_scores": pred.candidate_scores, "num_proposals": int(masks.shape[0]),
                      **jsonable(pred.extras)}
            if pred.failure is not None:
                record["failure"] = pred.failure
            records.append(record)
            where = "no candidate mask" if pred.chosen < 0 else f"candidate {pred.chosen} of {masks.shape[0]}"
            print(f"{path}  {pred.text!r}: {where} -> {mask_file}, {overlay_file}")
    jsonl = out / "predictions.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} masks to {out / 'masks'}, overlays to {out / 'overlays'}, one line each in {jsonl}")
    return 0
