"""`CoPatch(max_side=...)`: large images run at a reduced size, the chosen mask comes back at full size.

On the demo preset (tiny CLIP, flat-colour proposer), with demo scenes (128 x 128) and their copies
upscaled by pixel repetition.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from copatch.commands.segment import main as segment_command
from copatch.demo.dataset import demo_image
from copatch.errors import UserValueError
from copatch.module import CoPatch
from copatch.proposals import Proposals, StoredProposals
from copatch.resize import reduced_size, resize_image, resize_masks
from copatch.types import Expression, ImageSample

K = 4  # upscaling factor of the large copies


def upscale(a: np.ndarray, k: int = K, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    return a.repeat(k, axes[0]).repeat(k, axes[1])


@pytest.fixture(scope="module")
def models() -> dict:
    off = CoPatch.from_preset("demo")
    return {"off": off, "128": CoPatch.from_preset("demo", max_side=128),
            "64": CoPatch.from_preset("demo", max_side=64)}


@pytest.fixture(scope="module")
def scene():
    _, image, masks, chosen, proposals = demo_image(seed=1, index=0)
    return image, masks, [c.text for c in chosen][:3], proposals


def test_sizes_and_resizers():
    assert reduced_size((3000, 4000), None) == (3000, 4000)
    assert reduced_size((3000, 4000), 4000) == (3000, 4000)
    assert reduced_size((3000, 4000), 1024) == (768, 1024)
    assert reduced_size((4000, 3000), 640) == (640, 480)
    assert reduced_size((5000, 1), 100) == (100, 1)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[0, :4, :4] = True
    masks[1, 3, 5] = True  # pixel (3, 5) is the centre pick of output pixel (1, 2) at 2x down
    small = resize_masks(masks, (4, 4))
    assert small.dtype == torch.bool and small.shape == (2, 4, 4)
    assert small[0].tolist() == [[True, True, False, False]] * 2 + [[False] * 4] * 2
    assert small[1].nonzero().tolist() == [[1, 2]]
    assert torch.equal(resize_masks(small, (8, 8)), torch.from_numpy(upscale(small.numpy(), 2, (1, 2))))
    assert resize_masks(masks, (8, 8)) is masks
    image = torch.from_numpy(upscale(np.arange(48, dtype=np.uint8).reshape(3, 4, 4), 3, (1, 2)))
    assert torch.equal(resize_image(image, (4, 4)), torch.arange(48, dtype=torch.uint8).reshape(3, 4, 4))


def test_bad_max_side_is_a_user_error():
    for bad in (0, -5, 2.5, True):
        with pytest.raises(UserValueError, match="max_side"):
            CoPatch.from_preset("demo", max_side=bad)


def test_mask_at_the_original_size(models, scene):
    image, _, texts, proposals = scene
    tall = image[:, :100]  # 128 x 100: worked on at 64 x 50
    model = models["64"]
    assert model.working_sample(ImageSample(0, torch.from_numpy(tall).permute(2, 0, 1), [])).size == (64, 50)
    for preds in (model.segment(tall, texts), model.segment(tall, texts, proposals=proposals[:, :, :100])):
        for p in preds:
            assert p.mask.shape == (128, 100) and p.mask.dtype == torch.bool and p.chosen >= 0
            assert p.mask.device.type == "cpu"


def test_a_max_side_the_image_fits_changes_nothing(models, scene):
    image, _, texts, proposals = scene
    sample = ImageSample(0, torch.from_numpy(image).permute(2, 0, 1), [])
    assert models["128"].working_sample(sample) is sample
    for given in (None, proposals):
        off = models["off"].segment(image, texts, proposals=given)
        fits = models["128"].segment(image, texts, proposals=given)
        for a, b in zip(off, fits):
            assert torch.equal(a.mask, b.mask) and (a.chosen, a.candidates) == (b.chosen, b.candidates)
            assert a.candidate_scores == b.candidate_scores and a.score == b.score and a.extras == b.extras


def test_an_upscaled_scene_at_its_original_size_gives_the_original_picks(models, scene):
    image, _, texts, proposals = scene
    big = upscale(image)
    for given, big_given in ((None, None), (proposals, upscale(proposals, axes=(1, 2)))):
        small = models["off"].segment(image, texts, proposals=given)
        large = models["128"].segment(big, texts, proposals=big_given)
        for a, b in zip(small, large):
            assert (a.chosen, a.candidates, a.candidate_scores) == (b.chosen, b.candidates, b.candidate_scores)
            assert b.mask.shape == big.shape[:2]
            assert torch.equal(b.mask, torch.from_numpy(upscale(a.mask.numpy())))
    # Full-size proposals are downsampled; proposals at the reduced size are taken as they are.
    same = models["128"].segment(big, texts, proposals=proposals)
    assert [p.chosen for p in same] == [p.chosen for p in small]
    with pytest.raises(UserValueError, match=r"or the max_side size \(128, 128\)"):
        models["128"].segment(big, texts, proposals=proposals[:, :100])


def numpy_iou(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int]:
    return int((pred & truth).sum()), int((pred | truth).sum())


def test_metrics_are_computed_at_full_size(models, scene):
    image, _, texts, proposals = scene
    model = models["64"]  # the 512 x 512 copy is worked on at 64 x 64: masks come back in 8 x 8 blocks
    big, big_props = upscale(image), upscale(proposals, axes=(1, 2))
    rng = np.random.default_rng(0)
    # Full-resolution ground truth with detail no 64 x 64 mask can hold: the full-size pick, 3 pixels
    # eroded on one side, with a speckle of flipped pixels.
    truths = []
    for p in models["off"].segment(image, texts, proposals=proposals):
        t = big_props[p.chosen].copy()
        t[:, 3:] &= t[:, :-3]
        t ^= rng.random(t.shape) < 0.01
        truths.append(t)
    sample = ImageSample(7, torch.from_numpy(big).permute(2, 0, 1),
                         [Expression(i, t) for i, t in enumerate(texts)],
                         targets=torch.from_numpy(np.stack(truths)),
                         proposals=Proposals(torch.from_numpy(big_props)))
    model.metric.reset()
    model.oracle_metric.reset()
    preds = model.predict_image(sample)
    total_i = total_u = 0
    for p, t in zip(preds, truths):
        m = p.mask.numpy()
        assert m.shape == t.shape
        i, u = numpy_iou(m, t)
        assert (p.inter, p.union) == (i, u) and p.iou == pytest.approx(i / u)
        total_i, total_u = total_i + i, total_u + u
        # The oracle: the best of the pool's reduced proposals, upsampled (8 x 8 blocks), at full size.
        small = resize_masks(torch.from_numpy(big_props), (64, 64)).numpy()
        best = max(numpy_iou(upscale(small[j], 8), t) for j in p.extras["oracle_pool"])
        assert (p.oracle_inter, p.oracle_union) == best
    assert float(model.metric.compute()["oIoU"]) == pytest.approx(100 * total_i / total_u)
    assert 0 < total_i < total_u  # detail no 64 x 64 mask holds is counted at 512 x 512


def test_stored_proposals_are_downsampled(models, scene, tmp_path):
    image, _, texts, proposals = scene
    big, big_props = upscale(image), upscale(proposals, axes=(1, 2))
    StoredProposals(tmp_path).write(3, Proposals(torch.from_numpy(big_props)))
    model = models["128"]
    keep, model.proposer = model.proposer, StoredProposals(tmp_path, decode_in_workers=False)
    try:
        sample = ImageSample(3, torch.from_numpy(big).permute(2, 0, 1), [Expression(0, texts[0])])
        work = model.working_sample(sample)
        assert work.size == (128, 128) and torch.equal(work.proposals.masks, torch.from_numpy(proposals))
        [pred] = model.predict_image(sample)
        missing = ImageSample(4, sample.image, sample.expressions)  # no file: a recorded failure, full-size mask
        [failed] = model.predict_image(missing)
    finally:
        model.proposer = keep
    assert pred.chosen == models["off"].segment(image, texts[0], proposals=proposals)[0].chosen
    assert failed.failure["kind"] == "proposals" and failed.mask.shape == big.shape[:2]


def test_a_batching_proposer_gets_the_reduced_images(models):
    seen = []

    class Batching:
        def __call__(self, sample):
            raise AssertionError("propose_batch is used")

        def propose_batch(self, images, image_ids, prepared):
            seen.extend(tuple(im.shape) for im in images)
            return [Proposals(torch.ones(1, *im.shape[-2:], dtype=torch.bool)) for im in images]

    model = models["64"]
    keep = model.proposer
    model.proposer = Batching()
    try:
        samples = [ImageSample(i, torch.zeros(3, *hw, dtype=torch.uint8), []) for i, hw in
                   enumerate([(256, 128), (32, 48)])]
        done = model.propose_together(samples)
    finally:
        model.proposer = keep
    assert seen == [(3, 64, 32), (3, 32, 48)]
    assert [tuple(s.proposals.masks.shape[-2:]) for s in done] == [(64, 32), (32, 48)]


def test_segment_command_max_side(models, scene, tmp_path):
    image, _, texts, _ = scene
    path = tmp_path / "big.png"
    Image.fromarray(upscale(image)).save(path)
    out = tmp_path / "out"
    assert segment_command([str(path), "-e", texts[0], "--max-side", "128", "--out", str(out)]) == 0
    written = np.asarray(Image.open(out / "masks" / "big_0.png"))
    assert written.shape == (128 * K, 128 * K)
    expected = models["off"].segment(image, texts[0])[0]
    assert np.array_equal(written == 255, upscale(expected.mask.numpy()))
    record = json.loads((out / "predictions.jsonl").read_text())
    assert record["chosen"] == expected.chosen
    with pytest.raises(UserValueError, match="--max-side 0"):
        segment_command([str(path), "-e", texts[0], "--max-side", "0", "--out", str(out)])


def test_large_image_benchmark_runs_small(load_script):
    import argparse
    from pathlib import Path

    bench = load_script(Path(__file__).parents[1] / "benchmarks" / "large_image.py")
    threads = torch.get_num_threads()  # the worker sets it for the whole process
    rows = [bench.worker(argparse.Namespace(mode=mode, size="96x128", proposals=4, expressions=2, threads=threads))
            for mode in ("64",)]
    assert [r["size"] for r in rows] == ["96x128"] and all(len(r["chosen"]) == 2 for r in rows)
    assert all(r["seconds"] > 0 and r["peak_rss_gib"] > 0 for r in rows)
