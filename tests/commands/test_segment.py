"""`copatch segment` end to end on a demo scene: mask, overlay and JSONL, the mask equal to the API's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from copatch.cli import main as cli
from copatch.commands.segment import main as segment
from copatch.demo.dataset import demo_image
from copatch.module import CoPatch
from copatch.proposals import Proposals, StoredProposals

TEXTS = ["the red circle", "the green circle at the top"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray, list]:
    _, image, masks, chosen, proposals = demo_image(seed=1, index=12)  # holds both TEXTS
    path = tmp_path_factory.mktemp("scene") / "scene12.png"
    Image.fromarray(image).save(path)
    return path, image, proposals, chosen


def test_writes_mask_overlay_and_jsonl_equal_to_the_api(scene, tmp_path, capsys):
    path, image, _, _ = scene
    out = tmp_path / "out"
    assert segment([str(path), "--expression", TEXTS[0], "-e", TEXTS[1], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["expression"] for r in lines] == TEXTS
    api = CoPatch.from_preset("demo").segment(image, TEXTS)
    for k, (record, pred) in enumerate(zip(lines, api)):
        mask_file = out / "masks" / f"scene12_{k}.png"
        assert record["mask"] == str(mask_file) and str(mask_file) in printed
        written = np.asarray(Image.open(mask_file))
        assert written.dtype == np.uint8 and set(np.unique(written)) <= {0, 255}
        assert np.array_equal(written == 255, pred.mask.numpy())
        assert record["chosen"] == pred.chosen and record["candidates"] == pred.candidates
        assert record["candidate_scores"] == pytest.approx(pred.candidate_scores)
        assert record["noun_phrase"] == pred.extras["noun_phrase"] and "relation" in record
        overlay = Image.open(record["overlay"])
        assert overlay.width >= 2 * image.shape[1] and overlay.height > image.shape[0]  # two panels, a caption
    assert "predictions.jsonl" in printed


def test_a_folder_an_expressions_file_and_stored_proposals(scene, tmp_path):
    path, image, proposals, _ = scene
    StoredProposals(tmp_path / "props").write("scene12", Proposals(torch.from_numpy(proposals)))
    phrases = tmp_path / "phrases.txt"
    phrases.write_text(TEXTS[0] + "\n\n")
    out = tmp_path / "out"
    assert segment([str(path.parent), "--expressions", str(phrases), "--proposer", "stored",
                    "--proposer-dir", str(tmp_path / "props"), "--out", str(out)]) == 0
    expected = CoPatch.from_preset("demo").segment(image, TEXTS[0], proposals=proposals)[0]
    assert np.array_equal(np.asarray(Image.open(out / "masks" / "scene12_0.png")) == 255, expected.mask.numpy())
    # The same masks through --proposals FILE.json, and a JSONL of {image, expression}.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": str(path), "expression": TEXTS[0]}) + "\n")
    assert segment(["--expressions", str(pairs), "--proposals", str(tmp_path / "props" / "scene12.json"),
                    "--out", str(tmp_path / "out2")]) == 0
    record = json.loads((tmp_path / "out2" / "predictions.jsonl").read_text())
    assert record["chosen"] == expected.chosen and record["num_proposals"] == len(proposals)


def test_bad_inputs_are_short_errors(scene, tmp_path, capsys):
    path = scene[0]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    cases = [([str(tmp_path / "nope.png"), "-e", "x"], "nope.png not found"),
             ([str(broken), "-e", "x"], "cannot read image"),
             ([str(path), "-e", "  "], "empty"),
             ([str(path)], "no expression given"),
             ([str(path), "-e", "x", "--preset", "vitb16"], "needs candidate masks")]
    for argv, words in cases:
        assert cli(["segment", *argv, "--out", str(tmp_path / "out")]) != 0
        err = capsys.readouterr().err
        assert err.startswith("copatch: error:") and words in err and "Traceback" not in err
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_help_has_two_examples(capsys):
    with pytest.raises(SystemExit):
        segment(["--help"])
    text = capsys.readouterr().out
    assert text.count("copatch segment ") >= 3 and "--expression" in text
