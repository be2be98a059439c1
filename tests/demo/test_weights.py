"""The shipped demo CLIP weights: present, small, and loading through the local-checkpoint path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from copatch.demo import MODEL_NAME, WEIGHTS, WEIGHTS_INFO
from copatch.demo import world

MAX_BYTES = 20 * 1024 * 1024


def test_weights_file_ships_and_is_small():
    assert WEIGHTS.is_file(), f"{WEIGHTS} is missing: run scripts/train_demo_clip.py"
    assert WEIGHTS.stat().st_size < MAX_BYTES
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    info = json.loads(WEIGHTS_INFO.read_text())
    assert info["model"] == MODEL_NAME and info["steps"] > 0 and "eval" in info


@pytest.fixture(scope="module")
def model():
    from copatch.clip_model import create_clip

    return create_clip(MODEL_NAME, str(WEIGHTS))


def test_weights_load_through_create_clip(model):
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert tuple(model.visual.image_size) == (64, 64)
    assert 8.0e6 < sum(p.numel() for p in model.parameters()) < 8.4e6


def test_weights_load_through_the_backbone():
    from copatch.backbone import ClipBackbone

    backbone = ClipBackbone(MODEL_NAME, str(WEIGHTS))
    assert backbone.input_size == 64 and backbone.grid == 8 and backbone.num_blocks == 6


@torch.no_grad()
def test_trained_model_knows_colours(model):
    """A sanity check that the weights are trained: colour of single objects (solved early in training)."""
    import open_clip

    rng = np.random.default_rng(5)
    objects, images = [], []
    for _ in range(24):
        obj = world.sample_object(rng, size="big")
        scene = world.make_scene(rng, world.place(rng, [obj], 64, 64), 64, 64)
        objects.append(obj)
        images.append(world.render(scene)[0])
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    pixels = (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255 - mean) / std
    tokens = open_clip.get_tokenizer(MODEL_NAME)([f"a {c} object" for c in world.COLOUR_NAMES])
    prompts = [f"a {c} {s}" for c in world.COLOUR_NAMES for s in world.SHAPES]
    text = F.normalize(model.encode_text(open_clip.get_tokenizer(MODEL_NAME)(prompts)), dim=-1)
    image = F.normalize(model.encode_image(pixels), dim=-1)
    predicted = [prompts[k].split()[1] for k in (image @ text.T).argmax(1).tolist()]
    accuracy = np.mean([p == o.colour for p, o in zip(predicted, objects)])
    assert tokens.shape[1] == 24
    assert accuracy >= 0.9, accuracy
