"""Overlay pictures: size, legend, outlines that stay visible, wrapped captions, the writer's limit."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import ImageFont

from copatch.callbacks.overlay_writer import OverlayWriter
from copatch.overlay import (BORDER_COLOUR, CHOSEN_COLOUR, LEGEND, band_top, display_scale, line_width,
                             render_overlay, wrap_text)


def _scene(h: int, w: int, colour=(40, 200, 70)):
    image = torch.zeros(3, h, w, dtype=torch.uint8)
    image[:] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[h // 4: h // 2, w // 4: w // 2] = True
    other = torch.zeros(h, w, dtype=torch.bool)
    other[h // 2:, w // 2:] = True
    clusters = torch.zeros(3, 8, 8, dtype=torch.bool)
    clusters[0, 2:4, 2:4] = True
    clusters[1, 5:7, 5:7] = True
    clusters[2, 0, 0] = True
    return image, mask, torch.stack([other, mask]), clusters


@pytest.mark.parametrize("h, w", [(128, 128), (1200, 1600)])
def test_overlay_has_the_documented_size_and_a_legend(h, w):
    image, mask, candidates, clusters = _scene(h, w)
    picture = render_overlay(image, "the green square", mask, clusters, candidates, truth=mask, iou=1.0, score=0.5)
    s = display_scale(h, w)
    assert s == (2 if h == 128 else 1)
    assert picture.width == 2 * s * w and band_top((h, w)) == s * h < picture.height
    band = np.asarray(picture)[band_top((h, w)):]
    swatch_area = (band == np.array(CHOSEN_COLOUR)).all(-1).sum()
    assert swatch_area >= 25  # the chosen swatch at least 5x5
    for _, colours in LEGEND:  # every legend colour is painted in the band, in an area like a swatch
        for colour in colours:
            assert (band == np.array(colour)).all(-1).sum() >= swatch_area // 2, colour


def test_outlines_have_a_dark_border_and_do_not_tint_the_object():
    # The image has the chosen colour itself: a tint would vanish, the dark-bordered outline does not.
    h = w = 256
    image, mask, _, clusters = _scene(h, w, colour=CHOSEN_COLOUR)
    right = np.asarray(render_overlay(image, "x", mask, clusters[:0]))[:h, w:]
    ys, xs = np.nonzero(mask.numpy())
    y0, x0, cy, cx = ys.min(), xs.min(), int(ys.mean()), int(xs.mean())
    lw = line_width(h)
    assert (right[y0 - 1, cx] == BORDER_COLOUR).all()  # just outside the mask's top edge
    assert (right[y0 + 3 * lw, cx] == BORDER_COLOUR).all()  # just inside the (3 lw wide) chosen band
    assert (right[cy, cx] == CHOSEN_COLOUR).all()  # the object itself is untouched
    assert right[5, 5].max() < min(CHOSEN_COLOUR[1], 255) * 0.5  # outside the chosen mask is dimmed


def test_line_width_and_font_grow_with_the_image():
    assert line_width(1200) > line_width(256) >= 1
    small = render_overlay(*_scene(128, 128)[:1], "a", *_scene(128, 128)[1:2], torch.zeros(0, 8, 8, dtype=torch.bool))
    large = render_overlay(*_scene(1200, 1600)[:1], "a", *_scene(1200, 1600)[1:2],
                           torch.zeros(0, 8, 8, dtype=torch.bool))
    assert large.height - 1200 > 2 * (small.height - 256)  # taller caption band: a bigger font


def test_wrap_text_breaks_long_captions_without_losing_words():
    font = ImageFont.load_default(size=12)
    text = "the small green triangle to the left of the big purple triangle behind the yellow circle " * 3
    lines = wrap_text(text, font, 200)
    assert len(lines) > 3
    assert all(font.getlength(line) <= 200 for line in lines)
    assert " ".join(lines).split() == text.split()
    assert wrap_text("short", font, 200) == ["short"]
    long_word = "x" * 200  # one word wider than the line is cut into pieces, none lost
    pieces = wrap_text(long_word, font, 50)
    assert len(pieces) > 1 and "".join(pieces) == long_word and all(font.getlength(p) <= 50 for p in pieces)


def test_a_long_caption_makes_a_taller_band_not_a_cut_one():
    image, mask, candidates, clusters = _scene(128, 128)
    short = render_overlay(image, "the cat", mask, clusters)
    long = render_overlay(image, "the cat " * 40, mask, clusters)
    assert long.width == short.width and long.height > short.height


def _trainer(root, world_size=1, rank=0):
    return SimpleNamespace(default_root_dir=str(root), world_size=world_size, global_rank=rank,
                           strategy=SimpleNamespace(barrier=lambda name=None: None))


def _pred(i):
    return SimpleNamespace(expression_id=i)


def test_overlay_limit_counts_the_pictures_of_an_earlier_run(tmp_path):
    folder = tmp_path / "overlays"
    folder.mkdir()
    for i in range(10):
        (folder / f"{i}.png").write_bytes(b"")
    writer = OverlayWriter(limit=12)
    writer.on_predict_start(_trainer(tmp_path), None)
    assert writer.quota == 2
    assert writer.wanted(_pred(3))  # redrawing an existing picture adds no file
    assert writer.wanted(_pred(20))
    writer.written = 2
    assert not writer.wanted(_pred(21)) and writer.wanted(_pred(4))


def test_overlay_limit_is_shared_between_ranks(tmp_path):
    quotas = []
    for rank in range(3):
        writer = OverlayWriter(limit=7)
        writer.on_predict_start(_trainer(tmp_path, world_size=3, rank=rank), None)
        quotas.append(writer.quota)
    assert quotas == [3, 2, 2]
