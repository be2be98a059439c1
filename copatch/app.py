"""The web demo of `copatch app`: a Gradio page over one `CoPatch` model, and the callbacks behind it.

The page takes an image (uploaded, or one of the demo scenes) and one or more expressions, one a line,
and shows for each expression:

- the chosen mask over the image (the rest of the image dimmed, the mask outlined in green);
- the candidates the final pick chose from, each with its role (g: the global-local top-1; b_j: the
  best match of CoMap cluster j; top-i without CoMap) and its score (the alpha-mixed spatial score with
  the spatial guidance on, the global-local logit without);
- the CoMap clusters on the patch grid, and the patch-text similarity map they come from;
- the parse (noun phrase, context tokens, relation and direction words, other nouns);
- the chosen mask as a PNG to download (0/255 at the image's size, as `Prediction.save_mask` writes it).

Four switches of the model can be toggled per request (context tokens, patch negation, CoMap, spatial
guidance; `copatch.switches`), to see what each changes on the image. Everything else is the preset's.

The callbacks are plain functions of `CoPatchApp` (`segment`, `callback`, `load_scene`): they need no
browser and no Gradio, and return pictures (PIL), tables and a JSON-able record. `build_blocks` wires
them into a `gradio.Blocks` page and `launch` serves it. Nothing is fetched from the network: the page
uses system fonts, Gradio's analytics and version check are off, and the model is loaded once per
process (requests queue, one at a time).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from copatch.errors import UserError, UserValueError
from copatch.overlay import (BAND_COLOUR, BORDER_COLOUR, CHOSEN_COLOUR, CLUSTER_BEST_COLOUR, CLUSTER_COLOURS,
                             DIM_OUTSIDE_CHOSEN, TEXT_COLOUR, TOP1_COLOUR, display_scale, font_for, line_width,
                             outline, wrap_text)

__all__ = ["CoPatchApp", "AppResult", "ExpressionResult", "DemoScene", "Toggles", "demo_scenes", "build_blocks",
           "launch", "parse_expressions", "MAX_SIDE", "MAX_EXPRESSIONS"]

log = logging.getLogger("copatch.app")

MAX_SIDE = 2048  # the longest image side the page takes (`copatch app --max-side`)
MAX_EXPRESSIONS = 8  # expressions per request
MAX_FILE_SIZE = "25mb"  # uploads larger than this are refused by Gradio itself
KEEP_RUNS = 16  # folders of mask PNGs kept in the app's work dir (older ones are deleted)

# The demo scenes offered in the page: (seed, index) of `copatch.demo.dataset.demo_image`, and how many of
# the scene's expressions go into the text box. The demo CLIP picks right for these (README, "Web demo").
DEMO_SCENE_IDS = ((1, 4, 2), (1, 8, 2), (1, 16, 2), (1, 14, 2), (1, 7, 2))

# Fonts the page uses: the browser's own (Gradio's themes default to web fonts).
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial",
                "sans-serif")
SYSTEM_MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace")

PARSE_HEADERS = ["expression", "noun phrase", "context tokens", "relation", "direction", "other nouns"]
CANDIDATE_HEADERS = ["expression", "candidate", "proposal", "score", "chosen"]

# A dark-to-bright colour ramp (blue-black, purple, red, orange, pale yellow) for the similarity map.
_HEAT = np.array([(0, 0, 4), (87, 16, 110), (188, 55, 84), (249, 142, 9), (252, 255, 164)], dtype=np.float32)


# ------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Toggles:
    """The switches the page toggles (`copatch.switches.Switches`): context tokens (`text_features`
    `context` instead of `noun_phrase`), `negate_patches`, `use_comap` and `spatial_guidance`."""

    context_tokens: bool
    negation: bool
    comap: bool
    spatial_guidance: bool

    @classmethod
    def of(cls, switches: Any) -> "Toggles":
        """The toggles a `Switches` has."""
        return cls(switches.text_features == "context", bool(switches.negate_patches), bool(switches.use_comap),
                   bool(switches.spatial_guidance))

    def apply(self, switches: Any) -> Any:
        """`switches` with these four set."""
        return dataclasses.replace(switches, text_features="context" if self.context_tokens else "noun_phrase",
                                   negate_patches=self.negation, use_comap=self.comap,
                                   spatial_guidance=self.spatial_guidance)


@dataclass
class DemoScene:
    """A scene of the demo world offered in the page: `image` `[H, W, 3] uint8`, `expressions` about it
    (true and unambiguous) and `truth` `[E, H, W] bool`, the mask of the object each one names."""

    name: str
    image: np.ndarray
    expressions: list[str]
    truth: np.ndarray


@dataclass
class ExpressionResult:
    """What the page shows for one expression.

    Attributes:
        text: the expression.
        prediction: the model's `Prediction` (mask `[H, W] bool`, chosen, candidates, scores, clusters).
        parse: noun phrase, context tokens, relation, direction, other nouns, head noun.
        roles: one label per candidate (`g`, `b1`, `b2`; `top-1`, ... without CoMap).
        similarity: `[G, G] float32` the patch-text similarity map (logit scale), or None when no mask
            could be chosen (the model stops before CoMap).
        pictures: `{"mask", "candidates", "clusters", "similarity"}` RGB PIL images.
        mask_file: the chosen mask as a PNG (0/255), or None.
    """

    text: str
    prediction: Any
    parse: dict[str, Any]
    roles: list[str]
    similarity: torch.Tensor | None
    pictures: dict[str, Image.Image] = field(default_factory=dict)
    mask_file: Path | None = None


@dataclass
class AppResult:
    """One request: the image `[H, W, 3] uint8`, one `ExpressionResult` per expression, the number of
    candidate masks, the switches used and the seconds it took."""

    image: np.ndarray
    expressions: list[ExpressionResult]
    num_proposals: int
    switches: Any
    seconds: float

    def record(self) -> dict[str, Any]:
        """A JSON-able summary (the page's "Result (JSON)")."""
        rows = []
        for r in self.expressions:
            p = r.prediction
            rows.append({
                "expression": r.text, "chosen": p.chosen, "score": p.score,
                "candidates": [{"role": role, "proposal": int(c), "score": _finite(s)}
                               for role, c, s in zip(r.roles, p.candidates, p.candidate_scores)],
                "parse": r.parse,
                "mask": {"height": int(p.mask.shape[-2]), "width": int(p.mask.shape[-1]),
                         "area": int(p.mask.sum()), "file": None if r.mask_file is None else r.mask_file.name},
                "clusters": int(p.clusters.shape[0]), "threshold": p.extras.get("threshold"),
                "failure": p.failure,
            })
        return {"image": {"height": int(self.image.shape[0]), "width": int(self.image.shape[1])},
                "num_proposals": self.num_proposals, "seconds": round(self.seconds, 3),
                "switches": dataclasses.asdict(self.switches), "expressions": rows}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(float(x)) else None


# ------------------------------------------------------------------------------------- demo scenes
def demo_scenes() -> list[DemoScene]:
    """The demo scenes of `DEMO_SCENE_IDS` (rendered, not read from disk: pure in their seed and index)."""
    from copatch.demo.dataset import demo_image

    scenes = []
    for seed, index, count in DEMO_SCENE_IDS:
        _, image, masks, chosen, _ = demo_image(seed, index)
        chosen = chosen[:count]
        scenes.append(DemoScene(f"demo scene {index} (seed {seed})", image, [c.text for c in chosen],
                                np.stack([masks[c.target] for c in chosen])))
    return scenes


def parse_expressions(text: str | None, limit: int = MAX_EXPRESSIONS) -> list[str]:
    """The expressions of the text box: one a line, blank lines skipped.

    Raises:
        UserValueError: no expression at all, or more than `limit`.
    """
    texts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not texts:
        raise UserValueError("type an expression (e.g. \"the red circle\"), or several, one a line.")
    if len(texts) > limit:
        raise UserValueError(f"{len(texts)} expressions given; the page takes at most {limit} at a time.")
    return texts


# ------------------------------------------------------------------------------------------ the app
class CoPatchApp:
    """One model behind the page, and the callbacks (usable without a browser).

    Args:
        model: a `CoPatch` with a proposer (`CoPatch.from_preset(...)`); moved nowhere, used as it is.
        preset: the preset's name, shown in the page.
        max_side: images with a longer side are refused with a message.
        max_expressions: expressions per request.
        workdir: where the mask PNGs are written (a new temporary folder by default).
    """

    def __init__(self, model: Any, preset: str = "demo", max_side: int = MAX_SIDE,
                 max_expressions: int = MAX_EXPRESSIONS, workdir: str | os.PathLike | None = None) -> None:
        if getattr(model, "proposer", None) is None:
            raise UserValueError("the app needs a model with a proposer (candidate masks): e.g. "
                                 "CoPatch.from_preset('demo'), or --proposer sam|mask2former|stored.")
        self.model = model
        self.preset = preset
        self.max_side = int(max_side)
        self.max_expressions = int(max_expressions)
        self.base_switches = model.switches
        self.defaults = Toggles.of(model.switches)
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="copatch-app-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one request at a time uses the model (its switches are per request)
        self._runs = itertools.count(1)
        self._scenes: list[DemoScene] | None = None

    @classmethod
    def from_preset(cls, preset: str = "demo", clip_checkpoint: str | None = None, proposer: Any = None,
                    **kwargs: Any) -> "CoPatchApp":
        """Load `CoPatch.from_preset(preset, clip_checkpoint, proposer)` (on the GPU when there is one)."""
        from copatch.module import CoPatch

        model = CoPatch.from_preset(preset, clip_checkpoint=clip_checkpoint, proposer=proposer).eval()
        if torch.cuda.is_available():
            model = model.cuda()
        return cls(model, preset=preset, **kwargs)

    @property
    def scenes(self) -> list[DemoScene]:
        """The demo scenes (rendered on first use)."""
        if self._scenes is None:
            self._scenes = demo_scenes()
        return self._scenes

    def describe(self) -> str:
        """One line about the model: preset, CLIP, proposer, device."""
        proposer = type(self.model.proposer).__name__
        return (f"preset `{self.preset}` ({self.model.hparams.clip_model}), proposer `{proposer}`, "
                f"on {self.model.device.type}")

    # --------------------------------------------------------------------------------- callbacks
    def load_scene(self, name: str | None) -> tuple[np.ndarray | None, str]:
        """Callback of the scene picker: `(image, expressions text)` of the named demo scene."""
        for scene in self.scenes:
            if scene.name == name:
                return scene.image, "\n".join(scene.expressions)
        return None, ""

    def segment(self, image: Any, text: str | None, toggles: Toggles | None = None) -> AppResult:
        """Segment every expression of `text` (one a line) in `image`.

        Args:
            image: an `[H, W, 3]` uint8 array (what Gradio gives), a PIL image or a file path; None is
                refused with a message.
            text: the expressions, one a line.
            toggles: the four switches for this request (None: the preset's).

        Returns:
            An `AppResult`, with every picture drawn and every mask PNG written.

        Raises:
            UserError: no image, an unreadable or too large image, no expression, too many.
        """
        from copatch.api import image_tensor, make_sample

        if image is None:
            raise UserValueError("no image: upload one, or pick a demo scene.")
        texts = parse_expressions(text, self.max_expressions)
        pixels = image_tensor(image)  # [3, H, W] uint8, checked (copatch.api)
        height, width = pixels.shape[-2:]
        if max(height, width) > self.max_side:
            raise UserValueError(f"the image is {width}x{height} pixels; the page takes at most {self.max_side} "
                                 f"pixels a side: make it smaller first (or start the app with a larger "
                                 f"--max-side).")
        if min(height, width) < 2:
            raise UserValueError(f"the image is {width}x{height} pixels: give an image at least 2 pixels a side.")
        toggles = toggles or self.defaults
        model = self.model
        started = time.perf_counter()
        with self._lock:
            switches = toggles.apply(self.base_switches)
            model.switches = switches
            try:
                sample = make_sample(pixels, texts)
                sample.image = sample.image.to(model.device)
                proposals = model.propose(sample)  # once, for the pick and the candidates' pictures alike
                with _recording_similarity(model) as seen:
                    predictions = model.segment(pixels, texts, proposals=proposals)
                parsed = model.parser.parse(texts)  # cached: the parses segment() used
            finally:
                model.switches = self.base_switches
        masks = proposals.masks.detach().cpu().bool()
        similarity = seen if len(seen) == len(texts) else [None] * len(texts)
        run = self._new_run_dir()
        image_np = pixels.permute(1, 2, 0).cpu().numpy()
        results = []
        for k, (pred, parse, sim) in enumerate(zip(predictions, parsed, similarity)):
            grid = None if sim is None else sim.reshape(math.isqrt(sim.numel()), -1)
            roles = candidate_roles(len(pred.candidates), switches.use_comap)
            result = ExpressionResult(pred.text, pred, _parse_record(parse), roles, grid)
            result.pictures = {
                "mask": mask_picture(image_np, pred),
                "candidates": candidates_picture(image_np, masks, pred, roles, switches.spatial_guidance),
                "clusters": clusters_picture(image_np, pred),
                "similarity": similarity_picture(image_np, grid, pred),
            }
            result.mask_file = pred.save_mask(run / f"mask-{k + 1}-{_slug(pred.text)}.png")
            results.append(result)
        return AppResult(image_np, results, int(masks.shape[0]), switches, time.perf_counter() - started)

    def callback(self, image: Any, text: str | None, context_tokens: bool | None = None, negation: bool | None = None,
                 comap: bool | None = None, spatial_guidance: bool | None = None) -> tuple:
        """The page's "Segment" callback: never raises; a bad input gives a message and empty outputs.

        Returns:
            `outputs(result)`: `(status markdown, the four pictures (PIL; chosen masks, candidates, CoMap
            clusters, similarity maps), parse rows, candidate rows, mask PNG paths, JSON record)`; on a bad
            input the message, no pictures and empty tables.
        """
        d = self.defaults
        toggles = Toggles(d.context_tokens if context_tokens is None else bool(context_tokens),
                          d.negation if negation is None else bool(negation),
                          d.comap if comap is None else bool(comap),
                          d.spatial_guidance if spatial_guidance is None else bool(spatial_guidance))
        try:
            result = self.segment(image, text, toggles)
        except UserError as err:
            return _failure(f"**Cannot segment:** {err}")
        except Exception as err:  # a bug: the page says so in one line, the server log has the traceback
            log.exception("copatch app: request failed")
            return _failure(f"**Something went wrong** ({type(err).__name__}: {_one_line(err)}); the server's "
                            "log has the details.")
        return outputs(result)

    def _new_run_dir(self) -> Path:
        n = next(self._runs)
        run = self.workdir / f"run-{n:06d}"
        run.mkdir(parents=True, exist_ok=True)
        old = self.workdir / f"run-{n - KEEP_RUNS:06d}"
        if n > KEEP_RUNS and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        return run


@contextmanager
def _recording_similarity(model: Any) -> Iterator[list[torch.Tensor]]:
    """Within the block, the `[P]` patch scores each `model.comap(scores)` call gets (the similarity
    map of each expression, in order) are appended to the list it yields. `comap` is an extension point
    called once per expression; the wrapper is an instance attribute removed on exit."""
    seen: list[torch.Tensor] = []
    inner = model.comap

    def comap(scores: torch.Tensor) -> Any:
        seen.append(scores.detach().float().cpu().clone())
        return inner(scores)

    model.comap = comap
    try:
        yield seen
    finally:
        del model.comap


def candidate_roles(count: int, use_comap: bool) -> list[str]:
    """Labels of the candidates: `g, b1, b2, ...` (CoMap) or `top-1, top-2, ...` (the baseline)."""
    if use_comap:
        return ["g", *[f"b{j}" for j in range(1, count)]][:count]
    return [f"top-{j + 1}" for j in range(count)]


def _parse_record(parsed: Any) -> dict[str, Any]:
    return {"noun_phrase": parsed.noun_phrase, "target": parsed.target, "context": list(parsed.context),
            "head_noun": parsed.head_noun, "relation": parsed.relation, "direction": parsed.direction,
            "other_nouns": list(parsed.other_nouns)}


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "expression"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


PICTURES = ("mask", "candidates", "clusters", "similarity")


def _failure(message: str) -> tuple:
    return (message, *[None] * len(PICTURES), [], [], [], {})


def outputs(result: AppResult) -> tuple:
    """The page's outputs of a result: `(status, chosen masks, candidates, CoMap clusters, similarity maps,
    parse rows, candidate rows, mask PNG paths, record)`; each picture stacks the expressions top to bottom."""
    parse_rows, candidate_rows, files, notes = [], [], [], []
    for r in result.expressions:
        p = r.prediction
        q = r.parse
        parse_rows.append([r.text, q["noun_phrase"], " ".join(q["context"]) or "-", q["relation"], q["direction"],
                           ", ".join(q["other_nouns"]) or "-"])
        for role, c, s in zip(r.roles, p.candidates, p.candidate_scores):
            candidate_rows.append([r.text, role, int(c), round(float(s), 4) if math.isfinite(s) else "nan",
                                   "yes" if c == p.chosen else ""])
        if r.mask_file is not None:
            files.append(str(r.mask_file))
        if p.failure is not None:
            notes.append(f"- *{r.text}*: {p.failure.get('error', 'no mask could be chosen')}")
    # The three small pictures of an expression get one height, so that their rows line up in the page.
    rows = []
    for r in result.expressions:
        height = max(r.pictures[name].height for name in ("mask", "clusters", "similarity"))
        rows.append({name: _pad_to(picture, height) if name != "candidates" else picture
                     for name, picture in r.pictures.items()})
    pictures = [stack([row[name] for row in rows]) for name in PICTURES]
    h, w = result.image.shape[:2]
    n = len(result.expressions)
    status = (f"{n} expression{'s' if n != 1 else ''} on a {w}x{h} image, {result.num_proposals} candidate "
              f"masks, {result.seconds:.2f} s.")
    if notes:
        status += "\n\nNo mask could be chosen for:\n" + "\n".join(notes)
    return (status, *pictures, parse_rows, candidate_rows, files, result.record())


def _pad_to(picture: Image.Image, height: int) -> Image.Image:
    if picture.height >= height:
        return picture
    out = Image.new("RGB", (picture.width, height), BAND_COLOUR)
    out.paste(picture, (0, 0))
    return out


def stack(pictures: list[Image.Image], gap: int = 6) -> Image.Image:
    """The pictures top to bottom, `gap` px apart, on the caption band's colour."""
    width = max(p.width for p in pictures)
    out = Image.new("RGB", (width, sum(p.height for p in pictures) + gap * (len(pictures) - 1)), BAND_COLOUR)
    y = 0
    for p in pictures:
        out.paste(p, (0, y))
        y += p.height + gap
    return out


# -------------------------------------------------------------------------------------- pictures
def _display(image: np.ndarray) -> tuple[np.ndarray, int]:
    """`(image enlarged by display_scale (nearest), the factor)`: small images get room for text."""
    s = display_scale(*image.shape[:2])
    return (image.repeat(s, 0).repeat(s, 1) if s > 1 else image.copy()), s


def _big(mask: torch.Tensor | np.ndarray, s: int) -> torch.Tensor:
    m = torch.as_tensor(np.asarray(mask)).bool()
    return m.repeat_interleave(s, 0).repeat_interleave(s, 1) if s > 1 else m


def _paint_outline(canvas: np.ndarray, mask: torch.Tensor, colour: tuple[int, int, int], width: int) -> None:
    """A `width` px band inside the mask's edge in `colour`, with a dark line inside it (visible on
    objects of its own colour)."""
    if not bool(mask.any()):
        return
    dark = outline(mask, width + max(1, width // 2)).numpy()
    canvas[dark] = BORDER_COLOUR
    canvas[outline(mask, width).numpy()] = colour


def _dim_outside(canvas: np.ndarray, mask: torch.Tensor) -> None:
    outside = ~mask.numpy()
    canvas[outside] = (canvas[outside].astype(np.float32) * DIM_OUTSIDE_CHOSEN).astype(np.uint8)


def _tint(canvas: np.ndarray, mask: torch.Tensor, colour: tuple[int, int, int], amount: float = 0.4) -> None:
    inside = mask.numpy()
    canvas[inside] = ((1 - amount) * canvas[inside] + amount * np.array(colour, dtype=np.float32)).astype(np.uint8)


def _captioned(panel: np.ndarray, lines: list[str]) -> Image.Image:
    """`panel` with a dark band under it holding the text `lines` (wrapped to its width)."""
    height, width = panel.shape[:2]
    font = font_for(min(height, width))
    pad = max(4, min(height, width) // 64)
    top, bottom = font.getbbox("Hgy|")[1::2]
    line_h = int(math.ceil((bottom - top) * 1.35)) + 1
    wrapped = [piece for line in lines for piece in wrap_text(line, font, width - 2 * pad)]
    out = Image.new("RGB", (width, height + 2 * pad + len(wrapped) * line_h), BAND_COLOUR)
    out.paste(Image.fromarray(panel), (0, 0))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(wrapped):
        draw.text((pad, height + pad + i * line_h), line, fill=TEXT_COLOUR, font=font)
    return out


def mask_picture(image: np.ndarray, pred: Any) -> Image.Image:
    """The chosen mask over the image: the rest dimmed, the mask outlined in green; caption below."""
    canvas, s = _display(image)
    lw = line_width(min(canvas.shape[:2]))
    mask = _big(pred.mask.cpu(), s)
    _dim_outside(canvas, mask)
    _tint(canvas, mask, CHOSEN_COLOUR)
    _paint_outline(canvas, mask, CHOSEN_COLOUR, lw)
    if pred.chosen < 0:
        note = "no mask could be chosen"
    else:
        note = f"chosen: proposal {pred.chosen}, {int(pred.mask.sum())} px"
        if pred.score is not None:
            note += f", score {pred.score:.2f}"
    return _captioned(canvas, [pred.text, note])


def candidates_picture(image: np.ndarray, masks: torch.Tensor, pred: Any, roles: list[str],
                       spatial: bool) -> Image.Image:
    """One tile per candidate (the image dimmed outside it, outlined: g cyan, b_j blue, the chosen one
    green), with its role, proposal index and score under it."""
    canvas, s = _display(image)
    lw = line_width(min(canvas.shape[:2]))
    if not pred.candidates:
        return _captioned(canvas // 2, [pred.text, "no candidates"])
    tiles = []
    what = "spatial score" if spatial else "global-local"
    for role, c, score in zip(roles, pred.candidates, pred.candidate_scores):
        tile = canvas.copy()
        mask = _big(masks[c], s)
        _dim_outside(tile, mask)
        chosen = c == pred.chosen
        colour = CHOSEN_COLOUR if chosen else TOP1_COLOUR if role in ("g", "top-1") else CLUSTER_BEST_COLOUR
        if chosen:
            _tint(tile, mask, CHOSEN_COLOUR)
        _paint_outline(tile, mask, colour, lw)
        value = f"{score:.3f}" if math.isfinite(score) else "nan"
        tiles.append(np.asarray(_captioned(tile, [f"{role}: proposal {c}" + (" (chosen)" if chosen else ""),
                                                  f"{what} {value}"])))
    height = max(t.shape[0] for t in tiles)
    gap = max(2, lw)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, gap), (0, 0)), constant_values=BAND_COLOUR[0]) for t in tiles]
    return Image.fromarray(np.concatenate(tiles, axis=1)[:, :-gap])


def clusters_picture(image: np.ndarray, pred: Any) -> Image.Image:
    """The CoMap clusters on the patch grid over the image (cluster 1 red, 2 orange, 3 yellow)."""
    canvas, s = _display(image)
    height, width = canvas.shape[:2]
    lw = line_width(min(height, width))
    clusters = pred.clusters.cpu().bool()
    grey = canvas.mean(-1, keepdims=True).repeat(3, -1) * 0.6
    canvas = grey.astype(np.uint8)
    if clusters.shape[0]:
        cells = F.interpolate(clusters[None].float(), size=(height, width), mode="nearest")[0].bool()
        for k, cell in enumerate(cells):
            colour = np.array(CLUSTER_COLOURS[k % len(CLUSTER_COLOURS)], dtype=np.float32)
            inside = cell.numpy()
            canvas[inside] = (0.5 * canvas[inside] + 0.5 * colour).astype(np.uint8)
            _paint_outline(canvas, cell, CLUSTER_COLOURS[k % len(CLUSTER_COLOURS)], lw)
        threshold = pred.extras.get("threshold")
        note = f"{clusters.shape[0]} clusters (1 red, 2 orange, 3 yellow)"
        if threshold is not None:
            note += f", threshold {threshold:.2f}"
    else:
        note = "no clusters"
    return _captioned(canvas, [f"CoMap: {pred.text}", note])


def similarity_picture(image: np.ndarray, grid: torch.Tensor | None, pred: Any) -> Image.Image:
    """The patch-text similarity map (bright: similar) on the patch grid over a grey copy of the image,
    with its range under it."""
    canvas, _ = _display(image)
    height, width = canvas.shape[:2]
    if grid is None:
        return _captioned(canvas // 2, [f"similarity: {pred.text}", "not computed (no mask could be chosen)"])
    g = grid.float()
    low, high = float(g.min()), float(g.max())
    unit = (g - low) / (high - low) if high > low else torch.zeros_like(g)
    # Nearest upsampling shows the patch cells, as the clusters' picture does.
    cells = F.interpolate(unit[None, None], size=(height, width), mode="nearest")[0, 0]
    heat = _colour_ramp(cells.clamp(0, 1).numpy())
    grey = canvas.mean(-1, keepdims=True)
    picture = (0.7 * heat + 0.3 * grey).clip(0, 255).astype(np.uint8)
    return _captioned(picture, [f"similarity: {pred.text}",
                                f"{grid.shape[0]}x{grid.shape[1]} patches (bright: similar), S from {low:.2f} to {high:.2f}"])


def _colour_ramp(unit: np.ndarray) -> np.ndarray:
    """`[H, W]` values in [0, 1] -> `[H, W, 3]` float colours of `_HEAT`, linearly interpolated."""
    x = unit * (len(_HEAT) - 1)
    i = np.clip(np.floor(x).astype(np.int64), 0, len(_HEAT) - 2)
    t = (x - i)[..., None]
    return _HEAT[i] * (1 - t) + _HEAT[i + 1] * t


# ------------------------------------------------------------------------------------------- page
def _offline_environment() -> None:
    """No analytics, no version check, no hub: set before Gradio (and huggingface_hub) are imported."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def theme() -> Any:
    """Gradio's default theme with the browser's own fonts (no web fonts)."""
    _offline_environment()
    import gradio as gr

    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(SYSTEM_MONO_FONTS))


CSS = """
#copatch-status { min-height: 2em; }
footer { display: none !important; }
"""

INTRO = """# CoPatch: zero-shot referring image segmentation
Upload an image or pick a demo scene, type one or more expressions (one a line) and press **Segment**.
For each expression: the chosen mask, the candidates with their scores, the CoMap clusters and the
patch-text similarity map, the parse, and the mask as a PNG. The switches change this request only."""


def build_blocks(app: CoPatchApp) -> Any:
    """The page (`gradio.Blocks`, queued: one request at a time) over `app`'s callbacks."""
    _offline_environment()
    import gradio as gr

    d = app.defaults
    with gr.Blocks(title="CoPatch", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown(INTRO)
        gr.Markdown(f"Model: {app.describe()}. Images up to {app.max_side} px a side.", elem_id="copatch-model")
        with gr.Row():
            with gr.Column(scale=2, min_width=320):
                image = gr.Image(label="Image", type="numpy", image_mode="RGB", format="png",
                                 sources=["upload", "clipboard"], elem_id="copatch-image", height=300)
                scene = gr.Dropdown(choices=[s.name for s in app.scenes], value=None, label="or a demo scene",
                                    elem_id="copatch-scene")
                text = gr.Textbox(label="Expressions (one a line; Shift+Enter runs)", lines=3, placeholder="the red circle",
                                  elem_id="copatch-text")
                with gr.Group():
                    context = gr.Checkbox(d.context_tokens, label="context tokens: fuse E(s) with E(N_O + N_C) "
                                          "instead of E(noun phrase)", elem_id="copatch-context")
                    negation = gr.Checkbox(d.negation, label="negation of the exit-layer patch tokens",
                                           elem_id="copatch-negation")
                    comap = gr.Checkbox(d.comap, label="CoMap candidates (off: top-k by global-local score)",
                                        elem_id="copatch-comap")
                    spatial = gr.Checkbox(d.spatial_guidance, label="spatial guidance (off: best global-local "
                                          "score)", elem_id="copatch-spatial")
                run = gr.Button("Segment", variant="primary", elem_id="copatch-run")
            with gr.Column(scale=3, min_width=480):
                status = gr.Markdown("", elem_id="copatch-status")
                with gr.Row():
                    mask = gr.Image(label="Chosen mask", format="png", interactive=False, elem_id="copatch-mask")
                    clusters = gr.Image(label="CoMap clusters", format="png", interactive=False,
                                        elem_id="copatch-clusters")
                    similarity = gr.Image(label="Similarity map", format="png", interactive=False,
                                          elem_id="copatch-similarity")
                cand_picture = gr.Image(label="Candidates and their scores", format="png", interactive=False,
                                        elem_id="copatch-candidates-picture")
                parse = gr.Dataframe(headers=PARSE_HEADERS, label="Parse", interactive=False, wrap=True,
                                     column_widths=["24%", "15%", "15%", "14%", "15%", "17%"], elem_id="copatch-parse")
                candidates = gr.Dataframe(headers=CANDIDATE_HEADERS, label="Candidates", interactive=False,
                                          elem_id="copatch-candidates")
                files = gr.File(label="Chosen masks (PNG, 0/255)", file_count="multiple", interactive=False,
                                elem_id="copatch-masks")
                with gr.Accordion("Result (JSON)", open=False):
                    record = gr.JSON(elem_id="copatch-json")
        scene.change(app.load_scene, scene, [image, text], queue=False)
        inputs = [image, text, context, negation, comap, spatial]
        out = [status, mask, cand_picture, clusters, similarity, parse, candidates, files, record]
        run.click(app.callback, inputs, out, concurrency_limit=1, api_name="segment")
        text.submit(app.callback, inputs, out, concurrency_limit=1, api_name=False)
    blocks.queue(default_concurrency_limit=1, max_size=64)
    return blocks


def launch(app: CoPatchApp, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> Any:
    """Serve the page of `app` at `http://host:port` (offline: no share link, no SSR, no analytics).

    Returns what `Blocks.launch` returns; with `block` it serves until interrupted."""
    blocks = build_blocks(app)
    return blocks.launch(server_name=host, server_port=port, share=False, inbrowser=False, ssr_mode=False,
                         show_error=False, max_file_size=MAX_FILE_SIZE, theme=theme(), css=CSS, mcp_server=False,
                         pwa=False, prevent_thread_lock=not block, allowed_paths=[str(app.workdir)])
