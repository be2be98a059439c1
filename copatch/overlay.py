"""Pictures of what CoPatch chose: the image, the CoMap clusters, the candidates and the pick.

`render_overlay` draws two panels side by side, then the expression as a caption and a legend:
- left: the image with the CoMap clusters as outlines of their patch cells (cluster 1 red, 2 orange,
  3 yellow) and the ground truth as a white outline when it is known;
- right: the image dimmed outside the chosen mask, the candidates as outlines (global-local top-1 g
  cyan, best match of a CoMap cluster b_j blue) and the chosen mask as a wider green outline drawn
  inside them (so a chosen g shows cyan outside, green inside).

Every outline is a coloured line with a dark border on both sides, never a tint: it stays visible on
objects of its own colour. Line widths and the font grow with the image; images smaller than
`min_side` pixels are enlarged (nearest neighbour, an integer factor) first so that the text fits.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

CLUSTER_COLOURS = [(235, 45, 45), (255, 150, 20), (255, 235, 40)]
TOP1_COLOUR = (40, 230, 240)
CLUSTER_BEST_COLOUR = (80, 130, 255)
CHOSEN_COLOUR = (60, 240, 80)
TRUTH_COLOUR = (255, 255, 255)
BORDER_COLOUR = (0, 0, 0)
BAND_COLOUR = (24, 24, 24)  # background of the caption and legend
TEXT_COLOUR = (255, 255, 255)
DIM_OUTSIDE_CHOSEN = 0.45  # right panel: brightness kept outside the chosen mask

# (label, colours) of the legend, in reading order; the clusters share one entry.
LEGEND = [("chosen", [CHOSEN_COLOUR]), ("global-local top-1 (g)", [TOP1_COLOUR]),
          ("cluster candidates (b_j)", [CLUSTER_BEST_COLOUR]), ("CoMap clusters 1, 2, 3", CLUSTER_COLOURS),
          ("ground truth", [TRUTH_COLOUR])]


def contour(mask: np.ndarray) -> np.ndarray:
    """`[H, W] bool` -> the mask's inner boundary pixels (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def _dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """`[H, W] bool` dilated by a `(2 radius + 1)` square.

    Separable running-window counts (cumulative sums), so the cost does not grow with the radius
    (max pooling on the CPU took seconds for a 1600x1200 picture)."""
    if radius <= 0:
        return mask
    x = mask.to(torch.int32)
    for dim in (0, 1):
        c = torch.cumsum(F.pad(x.unsqueeze(0), (0, 0, radius + 1, radius) if dim == 0 else (radius + 1, radius))[0],
                         dim=dim)
        n = x.shape[dim]
        x = (c.narrow(dim, 2 * radius + 1, n) - c.narrow(dim, 0, n)).clamp_(max=1)
    return x.bool()


def outline(mask: torch.Tensor, width: int) -> torch.Tensor:
    """`[H, W] bool` -> the band of the mask's pixels within `width - 1` pixels of its edge (`[H, W] bool`).

    The band lies inside the mask, so a mask that fills the image still shows its outline."""
    mask = mask.bool()
    # Pixels outside the image count as background: a mask touching the border gets an edge there.
    padded = F.pad(mask[None, None].float(), (1, 1, 1, 1))[0, 0].bool()
    eroded = ~_dilate(~padded, width)[1:-1, 1:-1]
    return mask & ~eroded


def _draw_outline(canvas: np.ndarray, mask: torch.Tensor, colour: Sequence[int], width: int, border: int) -> None:
    """Paint `mask`'s outline (`width` px) in `colour` with a `border` px dark line on both sides.

    Works on the mask's bounding box (plus the border) only: masks are mostly small next to the image."""
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    if not len(rows):
        return
    h, w = mask.shape
    y0, y1 = max(0, int(rows[0]) - border), min(h, int(rows[-1]) + 1 + border)
    x0, x1 = max(0, int(cols[0]) - border), min(w, int(cols[-1]) + 1 + border)
    # Edges of the box that are the image's edges stay edges (outline pads outside as background).
    band = outline(mask[y0:y1, x0:x1], width)
    ring = _dilate(band, border) & ~band
    view = canvas[y0:y1, x0:x1]
    view[ring.numpy()] = BORDER_COLOUR
    view[band.numpy()] = colour


def display_scale(height: int, width: int, min_side: int = 256) -> int:
    """The integer factor an `H x W` image is enlarged by so that its short side reaches `min_side`."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def line_width(side: int) -> int:
    """Outline width in pixels for panels whose short side is `side` (2 at 256 px, 9 at 1200)."""
    return max(1, round(side / 128))


def font_for(side: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The caption font for panels whose short side is `side`: 12 px at 256 (the smallest), 48 at 1200.

    Pillow >= 10.1 ships a scalable default font (no file needed, works offline); a Pillow without
    FreeType falls back to its fixed bitmap font."""
    size = max(12, round(side / 25))
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def wrap_text(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, max_width: float) -> list[str]:
    """Split `text` into lines no wider than `max_width` pixels in `font`, breaking between words, and
    inside a word only when the word alone is too wide. Joining the lines with spaces gives `text`'s words
    back (runs of whitespace become one space); an empty text is one empty line."""
    def fits(s: str) -> bool:
        return font.getlength(s) <= max_width

    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}" if current else word
        if fits(trial):
            current = trial
            continue
        if current:
            lines.append(current)
        # A word wider than the line is cut into pieces that fit (at least one character each).
        while not fits(word) and len(word) > 1:
            cut = max(1, max(i for i in range(1, len(word) + 1) if fits(word[:i]) or i == 1))
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    lines.append(current)
    return lines


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    top, bottom = font.getbbox("Hgy|")[1::2]
    return int(math.ceil((bottom - top) * 1.35)) + 1


def _legend_rows(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int, pad: int,
                 swatch: int) -> list[list[tuple[str, list[tuple[int, int, int]], int]]]:
    """The legend's entries laid out in rows that fit `width`: each `(label, colours, entry width)`."""
    rows: list[list] = [[]]
    used = pad
    for label, colours in LEGEND:
        entry = len(colours) * (swatch + 2) + pad // 2 + int(math.ceil(font.getlength(label))) + 2 * pad
        if rows[-1] and used + entry > width:
            rows.append([])
            used = pad
        rows[-1].append((label, colours, entry))
        used += entry
    return rows


def render_overlay(image: torch.Tensor, text: str, chosen: torch.Tensor, clusters: torch.Tensor,
                   candidates: torch.Tensor | None = None, top1_first: bool = True,
                   truth: torch.Tensor | None = None, iou: float | None = None, score: float | None = None,
                   min_side: int = 256) -> Image.Image:
    """Draw one prediction.

    Args:
        image: `[3, H, W] uint8`.
        text: the expression.
        chosen: `[H, W] bool` the chosen mask.
        clusters: `[k, G, G] bool` CoMap clusters on the patch grid.
        candidates: `[C, H, W] bool` candidate masks, g first when `top1_first`, or None.
        truth: `[H, W] bool` ground truth, or None.
        iou: shown in the caption when given.
        score: the prediction's confidence (`Prediction.score`), shown in the caption when given.
        min_side: images whose short side is smaller are enlarged by `display_scale(H, W, min_side)`
            (nearest neighbour) before drawing; 1 keeps the image's size.

    Returns:
        An RGB image `(2 s W) x (s H + band)`, `s = display_scale(H, W, min_side)`: the two panels on
        top, then a dark band with the wrapped caption and the legend (its height depends on the text
        and the width).
    """
    height, width = (int(v) for v in image.shape[-2:])
    s = display_scale(height, width, min_side)
    H, W = s * height, s * width
    side = min(H, W)
    lw, border = line_width(side), max(1, line_width(side) // 2)

    def big(mask: torch.Tensor) -> torch.Tensor:  # [H, W] bool at the display size, on the CPU
        mask = mask.detach().cpu().bool()
        return mask.repeat_interleave(s, 0).repeat_interleave(s, 1) if s > 1 else mask

    base = image.detach().cpu()
    if s > 1:
        base = base.repeat_interleave(s, 1).repeat_interleave(s, 2)
    base = base.permute(1, 2, 0).numpy().astype(np.uint8)
    left, right = base.copy(), base.copy()
    if clusters.shape[0]:
        # Nearest upsampling shows the patch cells the clusters are made of.
        cells = F.interpolate(clusters[None].float().cpu(), size=(H, W), mode="nearest")[0].bool()
        for k, cell in enumerate(cells):
            _draw_outline(left, cell, CLUSTER_COLOURS[k % len(CLUSTER_COLOURS)], lw, border)
    if truth is not None:
        _draw_outline(left, big(truth), TRUTH_COLOUR, lw, border)
    chosen_big = big(chosen)
    outside = (~chosen_big).numpy()
    right[outside] = (right[outside].astype(np.float32) * DIM_OUTSIDE_CHOSEN).astype(np.uint8)
    # The chosen outline first and three times as wide; the candidates' thinner outlines (and their
    # dark borders) go over its outer part, so a chosen candidate shows its own colour outside and
    # green inside.
    _draw_outline(right, chosen_big, CHOSEN_COLOUR, 3 * lw, border)
    if candidates is not None:
        for c, cand in enumerate(candidates):
            colour = TOP1_COLOUR if (c == 0 and top1_first) else CLUSTER_BEST_COLOUR
            _draw_outline(right, big(cand), colour, lw, border)
    panels = np.concatenate([left, right], axis=1)

    font = font_for(side)
    pad = max(4, side // 64)
    line_h = _line_height(font)
    notes = [f"IoU {iou:.2f}"] if iou is not None else []
    if score is not None:
        notes.append(f"score {score:.2f}")
    caption = text if not notes else f"{text}  ({', '.join(notes)})"
    lines = wrap_text(caption, font, 2 * W - 2 * pad)
    swatch = max(6, line_h * 2 // 3)
    rows = _legend_rows(font, 2 * W, pad, swatch)
    band = pad + len(lines) * line_h + pad // 2 + len(rows) * line_h + pad
    out = Image.new("RGB", (2 * W, H + band), BAND_COLOUR)
    out.paste(Image.fromarray(panels), (0, 0))
    draw = ImageDraw.Draw(out)
    y = H + pad
    for line in lines:
        draw.text((pad, y), line, fill=TEXT_COLOUR, font=font)
        y += line_h
    y += pad // 2
    for row in rows:
        x = pad
        for label, colours, entry in row:
            top = y + (line_h - swatch) // 2
            for colour in colours:
                draw.rectangle([x, top, x + swatch - 1, top + swatch - 1], fill=colour, outline=BORDER_COLOUR)
                x += swatch + 2
            draw.text((x + pad // 2, y), label, fill=TEXT_COLOUR, font=font)
            x += entry - len(colours) * (swatch + 2)
        y += line_h
    return out


def band_top(image_size: tuple[int, int], min_side: int = 256) -> int:
    """Where the caption-and-legend band starts in `render_overlay`'s picture of an `(H, W)` image."""
    return display_scale(*image_size, min_side) * image_size[0]


def save_png_atomic(picture: Image.Image, path: str | os.PathLike) -> None:
    """Write `picture` to `path` as PNG through a temporary file in the same folder, so that a killed
    run never leaves a truncated file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format="PNG")
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs are readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def contact_sheet(paths: Sequence[str | os.PathLike], columns: int = 2, gap: int = 6) -> Image.Image:
    """Overlay pictures tiled row by row (`columns` per row, `gap` px apart, on the band colour), as in
    README's figure: `contact_sheet(sorted(Path("outputs/demo/overlays").glob("*.png"))[:6])`."""
    pictures = [Image.open(p).convert("RGB") for p in paths]
    if not pictures:
        raise ValueError("contact_sheet: no pictures given")
    cell_w = max(p.width for p in pictures)
    rows = [pictures[i:i + columns] for i in range(0, len(pictures), columns)]
    row_h = [max(p.height for p in row) for row in rows]
    sheet = Image.new("RGB", (columns * cell_w + (columns - 1) * gap, sum(row_h) + (len(rows) - 1) * gap),
                      (255, 255, 255))
    y = 0
    for row, h in zip(rows, row_h):
        for c, p in enumerate(row):
            sheet.paste(p, (c * (cell_w + gap), y))
        y += h + gap
    return sheet
