"""The demo CLIP training script: its data stream and a two-step run end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_demo_clip.py"


@pytest.fixture(scope="module")
def script(load_script):
    return load_script(SCRIPT)


def test_batches_are_deterministic_and_hold_hard_negative_pairs(script):
    images, captions = script.make_batch(np.random.default_rng([script.TRAIN_STREAM, 0]), 64, 0.4)
    again, captions_again = script.make_batch(np.random.default_rng([script.TRAIN_STREAM, 0]), 64, 0.4)
    assert captions == captions_again and all(np.array_equal(a, b) for a, b in zip(images, again))
    assert len(images) == 64 and all(im.shape == (64, 64, 3) and im.dtype == np.uint8 for im in images)
    pairs = [(captions[i], captions[i + 1]) for i in range(0, 2 * (int(round(0.4 * 64)) // 2), 2)]
    for a, b in pairs:  # each pair differs in exactly one word
        wa, wb = a.split(), b.split()
        assert len(wa) == len(wb) and sum(x != y for x, y in zip(wa, wb)) == 1, (a, b)
    tokenizer = script.open_clip.get_tokenizer("copatch-demo")
    assert max(len(tokenizer.encode(c)) for c in captions) <= 22  # + start and end tokens <= context 24


def test_swapped_location_captions_stay_true(script):
    rng = np.random.default_rng(3)
    for _ in range(50):
        (image, caption), (mirrored, swapped) = script.location_pair(rng)
        assert script.swap_words(swapped) == caption and swapped != caption
        assert not np.array_equal(image, mirrored)


@pytest.mark.slow
def test_two_step_run_saves_loadable_fp16_weights(script, tmp_path):
    out = tmp_path / "copatch-demo.pt"
    script.main(["--max-steps", "2", "--batch-size", "16", "--warmup", "1", "--eval-samples", "8",
                 "--out", str(out)])
    from copatch.clip_model import create_clip

    create_clip("copatch-demo", str(out))
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["steps"] == 2 and info["settings"]["pairs"] == 0.4
    assert {"single_colour", "crop_shape", "refer_crop", "refer_crop_hard"} <= set(info["eval"])
