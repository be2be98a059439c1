"""One-call use: CoPatch.from_preset and CoPatch.segment, without a Trainer."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from copatch.api import image_tensor
from copatch.demo.dataset import demo_image
from copatch.module import CoPatch
from copatch.presets import PRESETS

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("name", ["vitb32", "vitb16", "vith14"])
def test_python_presets_equal_the_cli_configs(name):
    config = yaml.safe_load((CONFIGS / "model" / f"{name}.yaml").read_text())["model"]
    assert config == {k: v for k, v in PRESETS[name].items() if k in config}
    assert set(PRESETS[name]) <= set(config)


def test_demo_preset_equals_the_demo_config():
    config = yaml.safe_load((CONFIGS / "demo.yaml").read_text())["model"]
    assert {k: config[k] for k in PRESETS["demo"]} == PRESETS["demo"]


def test_missing_checkpoint_of_a_preset_names_the_file(tmp_path):
    with pytest.raises(Exception, match="nope.bin"):
        CoPatch.from_preset("vitb16", clip_checkpoint=str(tmp_path / "nope.bin"))


def test_segment_a_demo_image_from_pil_numpy_and_tensor():
    model = CoPatch.from_preset("demo")
    scene, image, masks, chosen, proposals = demo_image(seed=1, index=0)
    texts = [c.text for c in chosen[:2]]
    outs = [model.segment(Image.fromarray(image), texts, proposals=proposals),
            model.segment(image, texts, proposals=torch.from_numpy(proposals)),
            model.segment(torch.from_numpy(image).permute(2, 0, 1), texts, proposals=proposals)]
    for out in outs:
        assert [s.text for s in out] == texts
        for s in out:
            assert s.mask.shape == image.shape[:2] and s.mask.dtype == torch.bool
            assert s.chosen in s.candidates and len(s.candidate_scores) == len(s.candidates)
            assert torch.equal(s.mask, torch.from_numpy(proposals[s.chosen]))
    assert all(torch.equal(a.mask, b.mask) for a, b in zip(outs[0], outs[1]))


def test_segment_without_proposals_or_proposer_says_what_to_pass():
    # The demo preset brings its own proposer; the others need one or proposals=.
    model = CoPatch.from_preset("demo")
    model.proposer = None
    with pytest.raises(ValueError, match="proposals="):
        model.segment(np.zeros((32, 32, 3), dtype=np.uint8), "the red circle")


def test_image_inputs_are_checked():
    # Shapes and values in detail: tests/test_inputs.py.
    with pytest.raises(ValueError, match=r"\[H, W\], \[H, W, 3\] or \[H, W, 4\], got shape \(4, 4, 2\)"):
        image_tensor(np.zeros((4, 4, 2), dtype=np.uint8))
    assert image_tensor(torch.ones(3, 2, 2)).tolist()[0][0] == [255, 255]


def test_top_level_exports():
    import copatch

    assert copatch.CoPatch is CoPatch and copatch.Switches().parser == "spacy"
