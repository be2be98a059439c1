"""The web demo's callbacks (`copatch.app`) with the demo CLIP, no browser: image + expressions ->
pictures, parse, candidates and a mask PNG equal to the API's; bad input -> a message, never a raise;
the page builds offline; `copatch app`'s command-line errors."""

from __future__ import annotations

import dataclasses
import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

from copatch.app import (CANDIDATE_HEADERS, PARSE_HEADERS, CoPatchApp, Toggles, candidate_roles, demo_scenes,
                         parse_expressions)
from copatch.comap import similarity_map
from copatch.errors import UserError, UserValueError

HAS_GRADIO = importlib.util.find_spec("gradio") is not None


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> CoPatchApp:
    return CoPatchApp.from_preset("demo", workdir=tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def scene():
    return demo_scenes()[0]


def _mask_png(path) -> np.ndarray:
    pixels = np.asarray(Image.open(path))
    assert pixels.dtype == np.uint8 and set(np.unique(pixels)) <= {0, 255}
    return pixels == 255


def test_parse_expressions_one_a_line():
    assert parse_expressions(" the red circle \n\n  the star\n") == ["the red circle", "the star"]
    for empty in (None, "", "  \n \t\n"):
        with pytest.raises(UserValueError, match="type an expression"):
            parse_expressions(empty)
    with pytest.raises(UserValueError, match="at most 2"):
        parse_expressions("a\nb\nc", limit=2)


def test_candidate_roles():
    assert candidate_roles(3, use_comap=True) == ["g", "b1", "b2"]
    assert candidate_roles(2, use_comap=False) == ["top-1", "top-2"]


def test_demo_scenes_are_lossless_pictures_with_true_expressions(app, scene):
    assert len(app.scenes) >= 3
    assert scene.image.dtype == np.uint8 and scene.image.shape[2] == 3
    assert len(scene.expressions) == len(scene.truth) >= 1
    image, text = app.load_scene(scene.name)
    assert np.array_equal(image, scene.image) and text.splitlines() == scene.expressions
    assert app.load_scene(None) == (None, "") and app.load_scene("no such scene") == (None, "")


def test_callback_gives_pictures_parse_and_the_api_mask(app, scene):
    text = "\n".join(scene.expressions)
    status, mask_pic, cand_pic, cluster_pic, sim_pic, parse_rows, cand_rows, files, record = \
        app.callback(scene.image, text)
    texts = scene.expressions
    assert status.startswith(f"{len(texts)} expressions on a 128x128 image"), status
    for picture in (mask_pic, cand_pic, cluster_pic, sim_pic):
        assert isinstance(picture, Image.Image) and picture.mode == "RGB"
        assert picture.width >= 256 and picture.height >= len(texts) * 256  # one panel per expression, stacked
    assert [row[0] for row in parse_rows] == texts and all(len(r) == len(PARSE_HEADERS) for r in parse_rows)
    assert all(len(r) == len(CANDIDATE_HEADERS) for r in cand_rows)
    api = app.model.segment(scene.image, texts)  # the API, for the same inputs
    assert len(files) == len(texts) == len(record["expressions"])
    for k, (pred, rec, path) in enumerate(zip(api, record["expressions"], files)):
        assert np.array_equal(_mask_png(path), pred.mask.numpy())
        assert rec["chosen"] == pred.chosen and [c["proposal"] for c in rec["candidates"]] == pred.candidates
        assert [c["score"] for c in rec["candidates"]] == pytest.approx(pred.candidate_scores)
        assert rec["parse"]["noun_phrase"] == pred.extras["noun_phrase"]
        assert rec["parse"]["relation"] == pred.extras["relation"]
        rows = [r for r in cand_rows if r[0] == pred.text]
        assert [r[2] for r in rows] == pred.candidates and [r[1] for r in rows] == ["g", "b1", "b2"][:len(rows)]
        # The demo CLIP picks the right object on these scenes: "shows a right mask".
        truth = torch.from_numpy(scene.truth[k])
        assert float((pred.mask & truth).sum() / (pred.mask | truth).sum()) > 0.9, pred.text
    assert record["switches"] == dataclasses.asdict(app.base_switches)


def test_parse_shows_noun_phrase_context_relation_and_direction(app, scene):
    result = app.segment(scene.image, "the star left of the yellow square\nthe star on the left")
    first, second = (r.parse for r in result.expressions)
    assert first["noun_phrase"] == "the star" and first["relation"] == "left"
    assert "yellow square" in " ".join(first["context"]) and first["other_nouns"] == ["the yellow square"]
    assert second["direction"] == "left" and set(first) >= {"noun_phrase", "context", "relation", "direction"}


def test_similarity_map_is_the_models(app, scene):
    from copatch.api import make_sample

    text = scene.expressions[0]
    result = app.segment(scene.image, text)
    grid = result.expressions[0].similarity
    g = app.model.backbone.grid
    assert grid.shape == (g, g)
    # Recomputed from the model's public stages: image side, parse, text features, similarity map.
    model = app.model
    sample = make_sample(scene.image, [text])
    with torch.no_grad():
        _, feats = model.image_side(sample)
        texts = model.encode_text(model.parse(sample))
        expected = similarity_map(feats.patch_embeddings, texts.fused, model.switches.similarity_norm)[0]
    assert torch.allclose(grid.flatten(), expected.float().cpu(), atol=1e-4)
    assert "comap" not in vars(model)  # the recording wrapper is gone


@pytest.mark.parametrize("toggles", [Toggles(True, True, True, True), Toggles(False, False, True, True),
                                     Toggles(False, True, False, True), Toggles(False, True, True, False)])
def test_toggles_change_this_request_only_and_match_the_api(app, scene, toggles):
    model = app.model
    base = model.switches
    text = scene.expressions[0]
    result = app.segment(scene.image, text, toggles)
    assert model.switches == base and Toggles.of(result.switches) == toggles
    model.switches = toggles.apply(base)
    try:
        expected = model.segment(scene.image, text)[0]
    finally:
        model.switches = base
    got = result.expressions[0].prediction
    assert torch.equal(got.mask, expected.mask) and got.candidates == expected.candidates
    if not toggles.comap:
        assert result.expressions[0].roles[0] == "top-1"


def test_concurrent_requests_take_turns(app, scene):
    from concurrent.futures import ThreadPoolExecutor

    text = scene.expressions[0]
    plain, ablated = app.defaults, Toggles(True, False, False, False)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: app.segment(scene.image, text, t), [plain, ablated] * 3))
    assert [Toggles.of(r.switches) for r in results] == [plain, ablated] * 3
    for a, b in zip(results[::2], results[1::2]):
        assert torch.equal(a.expressions[0].prediction.mask, results[0].expressions[0].prediction.mask)
        assert b.expressions[0].roles[0] == "top-1"  # CoMap off in every ablated request
    assert app.model.switches == app.base_switches


def test_callback_toggle_arguments(app, scene):
    *_, record = app.callback(scene.image, scene.expressions[0], True, False, False, False)
    sw = record["switches"]
    assert (sw["text_features"], sw["negate_patches"], sw["use_comap"], sw["spatial_guidance"]) == \
        ("context", False, False, False)
    assert app.model.switches == app.base_switches


@pytest.mark.parametrize("image, text, message", [
    (None, "the red circle", "no image"),
    ("scene", "", "type an expression"),
    ("scene", " \n  ", "type an expression"),
    ("scene", "\n".join(["the star"] * 9), "at most 8"),
    (np.zeros((4000, 64, 3), np.uint8), "the red circle", "at most 2048 pixels a side"),
    (np.zeros((1, 1, 3), np.uint8), "the red circle", "at least 2 pixels"),
    (np.zeros((8, 8), np.float32) + 7.0, "the red circle", "float"),
    ("/no/such/image.png", "the red circle", "not"),
])
def test_bad_input_gives_a_message_not_a_raise(app, scene, image, text, message):
    image = scene.image if isinstance(image, str) and image == "scene" else image
    status, *pictures, parse_rows, cand_rows, files, record = app.callback(image, text)
    assert status.startswith("**Cannot segment:**") and message in status, status
    assert "Traceback" not in status and pictures == [None] * 4
    assert parse_rows == cand_rows == files == [] and record == {}


def test_an_image_without_candidates_says_so(app):
    flat = np.full((64, 64, 3), 90, np.uint8)  # one region, the whole image: no proposal
    status, mask_pic, *_, files, record = app.callback(flat, "the red circle")
    assert "No mask could be chosen" in status and mask_pic is not None
    assert record["expressions"][0]["chosen"] == -1 and not _mask_png(files[0]).any()


def test_a_bug_gives_one_line_and_restores_the_switches(app, scene, monkeypatch):
    def broken(sample):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(app.model, "propose", broken)
    status, *_ = app.callback(scene.image, "the star", False, False, False, False)
    assert status.startswith("**Something went wrong** (RuntimeError: boom second line)")
    assert app.model.switches == app.base_switches


def test_a_model_without_proposer_is_refused(app):
    class Bare:
        proposer = None

    with pytest.raises(UserValueError, match="proposer"):
        CoPatchApp(Bare())


def test_mask_folders_are_pruned(app, scene, tmp_path, monkeypatch):
    import copatch.app as module

    small = CoPatchApp(app.model, workdir=tmp_path)
    monkeypatch.setattr(module, "KEEP_RUNS", 2)
    for _ in range(4):
        small.segment(scene.image, "the star")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-000003", "run-000004"]


# ---- the page ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAS_GRADIO, reason="gradio is not installed (pip install -e '.[app]')")
def test_page_builds_with_system_fonts_and_no_analytics(app):
    import os

    from gradio.themes.utils.fonts import GoogleFont

    from copatch.app import build_blocks, theme

    blocks = build_blocks(app)
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and blocks.analytics_enabled is False
    ids = {getattr(b, "elem_id", None) for b in blocks.blocks.values()}
    assert {"copatch-image", "copatch-text", "copatch-run", "copatch-mask", "copatch-masks"} <= ids
    t = theme()
    assert not any(isinstance(f, GoogleFont) for f in [*t._font, *t._font_mono])
    assert t._stylesheets == [] and t._font_css == []  # no web font, not even Gradio's bundled one


# ---- the command ------------------------------------------------------------------------------------

def test_command_help_and_errors(capsys, monkeypatch):
    from copatch.cli import main as cli
    from copatch.commands import app as command
    import copatch.app as module

    assert command.MAX_SIDE == module.MAX_SIDE
    assert cli(["app", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--preset" in out and "--port" in out and "--host" in out and "copatch app" in out
    assert cli(["app", "--port", "0"]) == 1
    assert "--port 0 is not a port number" in capsys.readouterr().err
    assert cli(["app", "--preset", "nope"]) == 1
    assert "unknown --preset 'nope'" in capsys.readouterr().err or not HAS_GRADIO
    assert cli(["app", "--preset", "vitb16"]) == 1
    assert "--preset vitb16 needs candidate masks" in capsys.readouterr().err or not HAS_GRADIO
    monkeypatch.setattr(command.importlib.util, "find_spec", lambda name: None)
    assert cli(["app"]) == 1
    assert "pip install 'copatch[app]'" in capsys.readouterr().err


def test_command_names_a_busy_port(monkeypatch):
    from copatch.commands import app as command
    import copatch.app as module

    if not HAS_GRADIO:
        pytest.skip("gradio is not installed")

    class FakeApp:
        @classmethod
        def from_preset(cls, *args, **kwargs):
            return cls()

        def describe(self):
            return "fake"

    def busy(app, host, port):
        raise OSError(f"Cannot find empty port in range: {port}-{port}.")

    monkeypatch.setattr(module, "CoPatchApp", FakeApp)
    monkeypatch.setattr(module, "launch", busy)
    with pytest.raises(UserError, match="cannot serve on 127.0.0.1:7999 .* pass another --port"):
        command.main(["--port", "7999"])
