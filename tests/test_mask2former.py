"""Tests of `copatch.mask2former` on a tiny random-weight Mask2Former (no files, no downloads)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

pytest.importorskip("transformers")

from transformers import Mask2FormerConfig, SwinConfig  # noqa: E402

from copatch.errors import UserError, UserFileNotFound, UserValueError  # noqa: E402
from copatch.mask2former import (  # noqa: E402
    Mask2FormerProposer,
    resize_shortest_edge_size,
)
from copatch.proposal_cache import ProposalCache, image_sha1  # noqa: E402
from copatch.proposals import MaskProposer, StoredProposals  # noqa: E402
from copatch.types import Expression, ImageSample  # noqa: E402

NUM_QUERIES = 7
# Two images of different sizes and aspect ratios (one landscape, one portrait).
SIZES = [(48, 64), (70, 40)]


def tiny_config() -> Mask2FormerConfig:
    """A 4-stage Swin with 1 block per stage, 1 pixel-decoder layer, 2 decoder layers, 7 queries.

    Built from a config object only: no backbone checkpoint is fetched. GroupNorm(32, .) in the
    pixel decoder needs the feature sizes to be multiples of 32.
    """
    swin = SwinConfig(
        embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"], drop_path_rate=0.0,
    )
    return Mask2FormerConfig(
        backbone_config=swin, num_queries=NUM_QUERIES, hidden_dim=32, feature_size=32,
        mask_feature_size=32, encoder_feedforward_dim=16, dim_feedforward=16, encoder_layers=1,
        decoder_layers=2, num_attention_heads=2, num_labels=5,
    )


def _spread_logits(proposer: Mask2FormerProposer, target_std: float = 2.0) -> None:
    """Random init gives mask logits of a tiny spread (~±0.2 or far less, depending on the
    transformers version), i.e. all pixels above the 0.35 threshold. Scaling the mask-embedding
    head (the logits are linear in it) spreads them so that masks are partly on, partly off."""
    head = dict(proposer.model.named_modules())[
        "model.transformer_module.decoder.mask_predictor.mask_embedder"
    ]
    last = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    pixels, _ = proposer.preprocess(_images())
    with torch.no_grad():
        std = proposer.model(pixel_values=pixels).masks_queries_logits.std().item()
        last.weight.mul_(target_std / std)
        last.bias.mul_(target_std / std)


# Most tests resize to a short side of 64 (long side <= 100) instead of 800/1333: the same code
# path, 100x faster on CPU. The reference sizes are tested on their own below.
SMALL = {"min_size": 64, "max_size": 100}


def _make(seed: int = 0, **kwargs) -> Mask2FormerProposer:
    torch.manual_seed(seed)
    proposer = Mask2FormerProposer.from_config(tiny_config(), **{**SMALL, **kwargs})
    _spread_logits(proposer)
    return proposer


def _images() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    images = []
    for h, w in SIZES:
        # A smooth gradient plus noise: resizing it exercises real interpolation.
        base = torch.linspace(0, 255, w).expand(h, w)[None].repeat(3, 1, 1)
        noise = torch.randint(-40, 40, (3, h, w), generator=gen)
        images.append((base + noise).clamp(0, 255).to(torch.uint8))
    return images


def _sample(image: torch.Tensor, image_id: int | str) -> ImageSample:
    return ImageSample(image_id=image_id, image=image, expressions=[Expression(id=1, text="a dog")])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The tiny model's ops are too small to gain from threads; on a busy machine intra-op
    threads spin and wait for cores, which made this file 5x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def proposer(_one_thread) -> Mask2FormerProposer:
    return _make(0)


# ------------------------------------------------------------------------------------ resize rule
@pytest.mark.parametrize(
    ("size", "expected"),
    [
        # short side 480 -> 800, scale 5/3: 640 * 5/3 = 1066.67 -> 1067 (1067 <= 1333)
        ((480, 640), (800, 1067)),
        ((640, 480), (1067, 800)),
        # 427 -> 800: 640 * 800/427 = 1199.06 -> 1199
        ((427, 640), (800, 1199)),
        # 300 -> 800 makes 2000 -> 5333.3 > 1333, so long side -> 1333, short: 800*1333/5333.3
        # = 199.95 -> 200
        ((300, 2000), (200, 1333)),
        ((2000, 300), (1333, 200)),
        # 40 -> 800 makes 70 -> 1400 > 1333: long 1333, short 800*1333/1400 = 761.71 -> 762
        ((70, 40), (1333, 762)),
        # 48 -> 800 makes 64 -> 1066.67 -> 1067
        ((48, 64), (800, 1067)),
        # square: both to 800 (also when shrinking)
        ((100, 100), (800, 800)),
        ((1600, 1600), (800, 800)),
        # already at size: unchanged
        ((800, 1200), (800, 1200)),
    ],
)
def test_resize_rule_by_hand(size: tuple[int, int], expected: tuple[int, int]) -> None:
    assert resize_shortest_edge_size(*size) == expected
    assert resize_shortest_edge_size(*size, 800, 1333) == expected


# ------------------------------------------------------------------------------------ preprocess
def test_preprocess_resizes_normalises_and_pads() -> None:
    proposer = _make(0, min_size=800, max_size=1333)  # the reference sizes
    images = _images()
    pixels, sizes = proposer.preprocess(images)
    assert sizes == [(800, 1067), (1333, 762)]
    # Padded to the largest resized size, rounded up to a multiple of 32: 1333->1344, 1067->1088.
    assert pixels.shape == (2, 3, 1344, 1088) and pixels.dtype == torch.float32
    mean = np.array([123.675, 116.28, 103.53], dtype=np.float32)[:, None, None]
    std = np.array([58.395, 57.12, 57.375], dtype=np.float32)[:, None, None]
    for b, (image, (h, w)) in enumerate(zip(images, sizes)):
        # Independent: PIL bilinear on the uint8 HWC image (what detectron2's ResizeTransform does).
        pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((w, h), Image.BILINEAR)
        arr = np.asarray(pil).astype(np.float32).transpose(2, 0, 1)
        expected = torch.from_numpy((arr - mean) / std)
        torch.testing.assert_close(pixels[b, :, :h, :w], expected, rtol=0, atol=1e-6)
        # Zero padding after normalisation (ImageList.from_tensors pads with 0).
        assert not pixels[b, :, h:, :].any() and not pixels[b, :, :, w:].any()


# ----------------------------------------------------------------------------- outputs and shapes
@pytest.mark.parametrize("reference_size", [False, True])
def test_batch_of_two_sizes_gives_all_queries_at_original_size(
    proposer: Mask2FormerProposer, reference_size: bool
) -> None:
    if reference_size:  # 800 / 1333 as the reference (input 1344 x 1088 padded: ~3 s on CPU)
        proposer = _make(0, min_size=800, max_size=1333)
        assert (proposer.min_size, proposer.max_size) == (800, 1333)
    images = _images()
    out = proposer.propose_batch(images)
    assert len(out) == 2
    assert proposer.num_queries == NUM_QUERIES
    for props, (h, w) in zip(out, SIZES):
        assert props.masks.shape == (NUM_QUERIES, h, w)
        assert props.masks.dtype == torch.bool
        assert props.scores is not None and props.scores.shape == (NUM_QUERIES,)
        assert props.scores.dtype == torch.float32
        assert ((props.scores > 0) & (props.scores < 1)).all()
        # Outputs are ordinary tensors (not inference tensors): callers may edit them.
        assert not props.masks.is_inference()
        props.masks[0] = False
    again = proposer.propose_batch(images)
    coverage = torch.cat([p.masks.flatten(1).float().mean(1) for p in again])
    # The test model really produces partial masks, so the comparisons below are meaningful.
    assert ((coverage > 0) & (coverage < 1)).any()


def test_masks_equal_independent_postprocessing() -> None:
    # batching="largest": both images in one forward, padded to the larger (detectron2's batching).
    proposer = _make(0, batching="largest")
    images = _images()
    out = proposer.propose_batch(images)
    pixels, sizes = proposer.preprocess(images)
    with torch.no_grad():
        raw = proposer.model(pixel_values=pixels)
    logits = raw.masks_queries_logits  # [B, Q, Hp/4, Wp/4]
    # Resized by the rule: 48x64 -> 64x85 (64/48 = 4/3, 64*4/3 = 85.3 -> 85); 70x40 -> 112x64,
    # 112 > 100 so *100/112 -> 100x57.1 -> 100x57. Padded: 100 -> 128, 85 -> 96.
    assert sizes == [(64, 85), (100, 57)]
    assert pixels.shape[-2:] == (128, 96)
    assert logits.shape == (2, NUM_QUERIES, 128 // 4, 96 // 4)
    # Upsample the whole batch to the padded input (as the reference's MaskFormer.forward), then
    # per image crop the valid region and resize to the original size (sem_seg_postprocess).
    up = F.interpolate(logits, size=pixels.shape[-2:], mode="bilinear", align_corners=False)
    for b, ((h, w), (oh, ow)) in enumerate(zip(sizes, SIZES)):
        crop = up[b : b + 1, :, :h, :w]
        full = F.interpolate(crop, size=(oh, ow), mode="bilinear", align_corners=False)[0]
        expected = full.sigmoid() > 0.35
        assert torch.equal(out[b].masks, expected)
        scores = raw.class_queries_logits[b].softmax(-1)[:, :-1].max(-1).values
        torch.testing.assert_close(out[b].scores, scores)


def _forward_batches(proposer: Mask2FormerProposer) -> tuple[list, object]:
    """Record the batch shape of each model forward."""
    shapes: list[tuple[int, ...]] = []
    handle = proposer.model.register_forward_pre_hook(
        lambda _m, args, kwargs: shapes.append(tuple(kwargs["pixel_values"].shape)), with_kwargs=True)
    return shapes, handle


def test_same_size_batching_equals_one_image_at_a_time(proposer: Mask2FormerProposer) -> None:
    a, b = _images()
    a2 = a.flip(-1).contiguous()  # same size as a, other content
    images = [a, b, a2]
    singles = [proposer.propose_batch([image])[0] for image in images]
    shapes, handle = _forward_batches(proposer)
    try:
        batched = proposer.propose_batch(images)
    finally:
        handle.remove()
    # The two images of one padded size go through together, the third alone; nothing is padded
    # beyond what an image gets alone.
    assert sorted(s[0] for s in shapes) == [1, 2]
    assert {s[-2:] for s in shapes} == {proposer.padded_size(a.shape[-2:]), proposer.padded_size(b.shape[-2:])}
    for one, many in zip(singles, batched):
        assert torch.equal(one.masks, many.masks)
        torch.testing.assert_close(one.scores, many.scores)


def test_largest_batching_is_one_forward() -> None:
    proposer = _make(0, batching="largest")
    shapes, handle = _forward_batches(proposer)
    try:
        out = proposer.propose_batch(_images())
    finally:
        handle.remove()
    assert len(shapes) == 1 and shapes[0][0] == 2
    assert [tuple(p.masks.shape[-2:]) for p in out] == SIZES
    with pytest.raises(ValueError, match="batching= must be"):
        _make(0, batching="padded")


def test_resize_prepared_in_a_worker_is_used(proposer: Mask2FormerProposer) -> None:
    image = _images()[0]
    step = proposer.input_step()
    key = step.key(tuple(image.shape[-2:]))
    assert torch.equal(step(_sample(image, 5)), proposer.preprocess([image])[0][0, :, :64, :85].mul(
        proposer.pixel_std).add(proposer.pixel_mean).round().to(torch.uint8))
    own = proposer.propose_batch([image])[0]
    # A prepared resize is taken as is: a different (flipped) one gives the flipped image's masks.
    other = image.flip(-1).contiguous()
    flipped = proposer.propose_batch([other])[0]
    used = proposer.propose_batch([image], prepared=[{key: step(_sample(other, 5))}])[0]
    assert torch.equal(used.masks, flipped.masks) and not torch.equal(used.masks, own.masks)
    # One prepared for another size is ignored.
    stale = proposer.propose_batch([image], prepared=[{"mask2former:1x1": step(_sample(other, 5))}])[0]
    assert torch.equal(stale.masks, own.masks)
    sample = _sample(image, 5)
    sample.prepared[key] = step(sample)
    assert torch.equal(proposer(sample).masks, own.masks)


def test_single_call_is_a_batch_of_one(proposer: Mask2FormerProposer) -> None:
    image = _images()[1]
    single = proposer(_sample(image, 5))
    batch = proposer.propose_batch([image])[0]
    assert isinstance(proposer, MaskProposer)
    assert torch.equal(single.masks, batch.masks) and torch.equal(single.scores, batch.scores)


def test_threshold_and_scores_options() -> None:
    image = _images()[0]
    low = _make(0, threshold=0.1, scores=False).propose_batch([image])[0]
    high = _make(0, threshold=0.9).propose_batch([image])[0]
    assert low.scores is None and high.scores is not None
    assert (low.masks | ~high.masks).all()  # a higher threshold only removes pixels
    assert low.masks.sum() > high.masks.sum()


def test_outer_autocast_is_ignored_without_dtype(proposer: Mask2FormerProposer) -> None:
    images = _images()
    plain = proposer.propose_batch(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = proposer.propose_batch(images)
    for a, b in zip(plain, under):
        assert torch.equal(a.masks, b.masks)


def test_bf16_forward_runs_and_keeps_float32_outputs() -> None:
    proposer = _make(0, dtype="bfloat16")
    assert proposer.forward_dtype == torch.bfloat16
    out = proposer.propose_batch(_images())
    for props, (h, w) in zip(out, SIZES):
        assert props.masks.shape == (NUM_QUERIES, h, w) and props.masks.dtype == torch.bool
        assert props.scores.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        _make(0, dtype="int8")


def test_is_a_frozen_eval_submodule(proposer: Mask2FormerProposer) -> None:
    parent = nn.Module()
    parent.proposer = proposer
    parent.train()  # Lightning does this; the proposer must stay in eval (Swin drop-path)
    assert not proposer.training and not proposer.model.training
    assert not any(p.requires_grad for p in proposer.parameters())
    assert any(m is proposer.model for m in parent.modules())
    assert "proposer.pixel_mean" not in parent.state_dict()  # buffers are not persistent
    parent.to("cpu")
    assert proposer.device == torch.device("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_follows_the_module_device() -> None:
    proposer = _make(0)
    images = _images()
    cpu = proposer.propose_batch(images)
    proposer.to("cuda")
    assert proposer.device.type == "cuda" and next(proposer.model.parameters()).is_cuda
    gpu = proposer.propose_batch([im.cuda() for im in images])
    for a, b in zip(cpu, gpu):
        assert b.masks.is_cuda
        assert (a.masks != b.masks.cpu()).float().mean() < 0.01  # kernels differ slightly
    bf16 = Mask2FormerProposer.from_config(tiny_config(), dtype="bfloat16").to("cuda")
    assert bf16.propose_batch([images[0]])[0].masks.shape == (NUM_QUERIES, *SIZES[0])


def test_rejects_bad_images(proposer: Mask2FormerProposer) -> None:
    with pytest.raises(ValueError, match=r"\[3, H, W\] uint8"):
        proposer.propose_batch([torch.zeros(3, 8, 8)])
    with pytest.raises(ValueError, match=r"image 'x'"):
        proposer.propose_batch([torch.zeros(1, 8, 8, dtype=torch.uint8)], ["x"])
    assert proposer.propose_batch([]) == []


# ------------------------------------------------------------------------------------------ cache
def _count_forwards(proposer: Mask2FormerProposer) -> list[int]:
    """Wrap the model's forward; the returned list holds the number of images it was run on."""
    calls: list[int] = []
    forward = proposer.model.forward

    def counted(*args, **kwargs):
        calls.append(int(kwargs["pixel_values"].shape[0]))
        return forward(*args, **kwargs)

    proposer.model.forward = counted
    return calls


def test_cache_is_written_and_reused_without_the_model(tmp_path: Path) -> None:
    cache = tmp_path / "proposals"
    first = _make(0, cache_dir=str(cache))
    images = _images()
    computed = [first(_sample(images[0], 11)), *first.propose_batch([images[1]], ["img-12"])]
    folder = ProposalCache(cache, first.settings()).folder
    assert folder.parent == cache
    assert StoredProposals(folder).exists(11) and StoredProposals(folder).exists("img-12")
    assert json.loads((folder / "settings.json").read_text())["threshold"] == 0.35
    record = json.loads((folder / "11.json").read_text())
    assert record["image_sha1"] == image_sha1(images[0])

    # Different random weights (same architecture): everything must come from the cache.
    second = _make(1, cache_dir=cache)
    calls = _count_forwards(second)
    again = [second(_sample(images[0], 11)), *second.propose_batch([images[1]], ["img-12"])]
    assert calls == []
    for a, b in zip(computed, again):
        assert torch.equal(a.masks, b.masks)
        assert torch.equal(a.scores, b.scores)
    # An image id not in the cache does need the model, once.
    second(_sample(images[0], 13))
    assert calls == [1]


def test_colliding_id_with_the_same_size_never_gets_the_other_images_masks(tmp_path: Path) -> None:
    """A COCO image and a Visual Genome image with one id and one size, in one cache_dir."""
    coco = _images()[0]
    gen = torch.Generator().manual_seed(9)
    vg = torch.randint(0, 256, coco.shape, generator=gen, dtype=torch.uint8)
    cached = _make(0, cache_dir=tmp_path)
    coco_masks = cached(_sample(coco, 139)).masks
    expected = _make(0)(_sample(vg, 139)).masks  # independent: no cache at all
    assert not torch.equal(expected, coco_masks)  # else the test could not tell them apart

    calls = _count_forwards(cached)
    entry = ProposalCache(tmp_path, cached.settings()).path(139)
    with pytest.warns(UserWarning, match="another image with id 139") as warned:
        got = cached(_sample(vg, 139)).masks
    assert str(entry) in str(warned[0].message)
    assert calls == [1] and torch.equal(got, expected)
    # The entry now holds the VG image: served from the cache, no model call.
    assert torch.equal(cached(_sample(vg, 139)).masks, expected) and calls == [1]


def test_other_settings_are_cached_apart(tmp_path: Path) -> None:
    image = _images()[0]
    _make(0, cache_dir=tmp_path)(_sample(image, 1))
    other = _make(0, cache_dir=tmp_path, threshold=0.5)
    calls = _count_forwards(other)
    masks = other(_sample(image, 1)).masks
    assert calls == [1]  # not the 0.35 masks of the same image
    assert torch.equal(masks, _make(0, threshold=0.5)(_sample(image, 1)).masks)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_cache_folder_with_other_settings_is_refused_naming_it(tmp_path: Path) -> None:
    proposer = _make(0, cache_dir=tmp_path)
    proposer(_sample(_images()[0], 1))
    settings = ProposalCache(tmp_path, proposer.settings()).folder / "settings.json"
    edited = {**json.loads(settings.read_text()), "batching": "largest"}
    settings.write_text(json.dumps(edited))
    with pytest.raises(UserValueError, match="other settings") as err:
        _make(0, cache_dir=tmp_path)(_sample(_images()[0], 1))
    assert str(settings.parent) in str(err.value) and "batching" in str(err.value)


def test_old_cache_without_content_hash_is_refused(tmp_path: Path) -> None:
    """The layout before `copatch.proposal_cache`: `<cache_dir>/<id>.json` + a settings file."""
    StoredProposals(tmp_path).write(1, _make(0)(_sample(_images()[0], 1)))
    (tmp_path / "_mask2former_settings.json").write_text(json.dumps({"generator": "mask2former"}))
    with pytest.raises(UserValueError, match="older copatch") as err:
        _make(0, cache_dir=tmp_path)
    assert str(tmp_path) in str(err.value) and "Delete" in str(err.value)


def test_loads_a_saved_model_from_a_local_folder(tmp_path: Path) -> None:
    reference = _make(0)
    folder = tmp_path / "m2f"
    reference.model.save_pretrained(folder)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    with pytest.warns(UserWarning, match="7 queries.*200"):
        loaded = Mask2FormerProposer(folder, **SMALL)
    assert loaded.model_dir == folder and loaded.num_queries == NUM_QUERIES
    saved, back = reference.model.state_dict(), loaded.model.state_dict()
    assert saved.keys() == back.keys()
    assert all(torch.equal(saved[k], back[k]) for k in saved)  # every weight came from the folder
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    images = _images()
    for a, b in zip(reference.propose_batch(images), loaded.propose_batch(images)):
        assert torch.equal(a.masks, b.masks)
        torch.testing.assert_close(a.scores, b.scores)


def test_missing_model_folder_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as info:
        Mask2FormerProposer(missing)
    message = str(info.value)
    assert str(missing) in message and "does not exist" in message
    assert "facebook/mask2former-swin-large-coco-panoptic" in message
    assert "config.json" in message and "model.safetensors" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        Mask2FormerProposer(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "mask2former"}))
    with pytest.raises(FileNotFoundError, match=r"has no weights"):
        Mask2FormerProposer(empty)
    (empty / "config.json").write_text(json.dumps({"model_type": "maskformer"}))
    (empty / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserValueError, match="not 'mask2former'"):
        Mask2FormerProposer(empty)


HF_COMMAND = ("hf download facebook/mask2former-swin-large-coco-panoptic --local-dir")


# Bytes kept (int) or the fraction kept (float): inside the length field, inside the JSON header,
# in the data.
@pytest.mark.parametrize("keep", [4, 1000, 0.5, 0.999])
def test_truncated_safetensors_names_the_file_and_the_fix(tmp_path: Path, keep: float) -> None:
    folder = tmp_path / "m2f"
    _make(0).model.save_pretrained(folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    cut = keep if isinstance(keep, int) else int(len(data) * keep)
    weights.write_bytes(data[:cut])  # an interrupted download
    with pytest.raises(UserValueError) as err:
        Mask2FormerProposer(folder, **SMALL)
    message = str(err.value)
    assert f"Mask2Former weights {weights} are unreadable" in message
    assert "truncated" in message and "fetch it again" in message
    assert f"{HF_COMMAND} {folder}" in message


def test_unloadable_weights_name_the_file(tmp_path: Path) -> None:
    """A weights file the library itself rejects: its error is wrapped in ours, naming the file."""
    folder = tmp_path / "m2f"
    _make(0).model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not a torch file at all")
    with pytest.raises(UserValueError, match="Mask2Former weights .*pytorch_model.bin are unreadable"):
        Mask2FormerProposer(folder, **SMALL)


def test_folder_errors_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserFileNotFound):
        Mask2FormerProposer(tmp_path / "missing")
    for bad in ({"threshold": 1.5}, {"batching": "biggest"}, {"dtype": "int8"}):
        with pytest.raises(UserError, match=next(iter(bad))):
            Mask2FormerProposer.from_config(tiny_config(), **bad)


def test_needs_exactly_one_source(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Mask2FormerProposer()
    with pytest.raises(ValueError, match="exactly one"):
        Mask2FormerProposer(tmp_path, config=tiny_config())


def test_missing_transformers_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config()
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    with pytest.raises(ImportError, match=r'pip install "copatch\[mask2former\]"'):
        Mask2FormerProposer.from_config(config)


def test_can_be_named_as_proposer_in_a_cli_config(tmp_path: Path) -> None:
    """`CoPatch(proposer=...)` is typed `MaskProposer`; jsonargparse (LightningCLI) must accept
    this class for it, which needs an explicit `__call__(sample) -> Proposals` signature."""
    from jsonargparse import ArgumentParser

    folder = tmp_path / "m2f"
    _make(0).model.save_pretrained(folder)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--proposer", type=MaskProposer)
    init_args = {"model_dir": str(folder), "cache_dir": str(tmp_path / "cache"),
                 "dtype": "bfloat16", "min_size": 64, "max_size": 100}
    cfg = parser.parse_args(["--proposer", json.dumps(
        {"class_path": "copatch.mask2former.Mask2FormerProposer", "init_args": init_args})])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    with pytest.warns(UserWarning, match="queries"):
        built = instantiate(cfg).proposer
    assert isinstance(built, Mask2FormerProposer) and built.forward_dtype == torch.bfloat16
    assert built(_sample(_images()[0], 1)).masks.shape == (NUM_QUERIES, *SIZES[0])
