"""SamProposer: SAM's automatic mask generator on a tiny random SAM, against a NumPy re-implementation
of segment-anything's post-processing (grid, IoU / stability filters, box NMS, small regions)."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")
scipy_ndimage = pytest.importorskip("scipy.ndimage")

from copatch.errors import UserFileNotFound, UserValueError  # noqa: E402
from copatch.sam import (  # noqa: E402
    PRED_IOU_THRESH,
    SamProposer,
    connected_components,
    masks_to_boxes,
    remove_small_regions,
)
from copatch.types import ImageSample  # noqa: E402

S = 64  # the tiny encoder's input size (real SAM: 1024)
R = 16  # its low-res mask size (real SAM: 256)
ROOT = Path(__file__).resolve().parents[1]


def tiny_sam_config() -> transformers.SamConfig:
    vision = transformers.SamVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=S, patch_size=16,
        output_channels=32, window_size=2, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=16)
    prompt = transformers.SamPromptEncoderConfig(
        hidden_size=32, image_size=S, patch_size=16, image_embedding_size=S // 16, mask_input_channels=4)
    decoder = transformers.SamMaskDecoderConfig(
        hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=32)
    return transformers.SamConfig(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                                  mask_decoder_config=decoder.to_dict())


def tiny_sam2_config() -> transformers.Sam2Config:
    hiera = transformers.Sam2HieraDetConfig(
        hidden_size=8, num_attention_heads=1, image_size=[S, S], blocks_per_stage=[1, 1, 2, 1],
        embed_dim_per_stage=[8, 16, 32, 64], num_attention_heads_per_stage=[1, 1, 1, 1],
        window_size_per_stage=[4, 4, 4, 2], global_attention_blocks=[3],
        window_positional_embedding_background_size=[2, 2])
    vision = transformers.Sam2VisionConfig(
        backbone_config=hiera.to_dict(), backbone_channel_list=[64, 32, 16, 8],
        backbone_feature_sizes=[[S // 4] * 2, [S // 8] * 2, [S // 16] * 2], fpn_hidden_size=32)
    prompt = transformers.Sam2PromptEncoderConfig(hidden_size=32, image_size=S, patch_size=16, mask_input_channels=4)
    decoder = transformers.Sam2MaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2,
                                                 iou_head_hidden_dim=32)
    return transformers.Sam2Config(vision_config=vision.to_dict(), prompt_encoder_config=prompt.to_dict(),
                                   mask_decoder_config=decoder.to_dict())


def rescaled(model: nn.Module) -> nn.Module:
    """Fan-in scaled random weights: transformers 5 initialises this tiny SAM's matrices at ~1e-10,
    so that its image embedding (~1e-20) would not depend on the image at all."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
    return model


@pytest.fixture(scope="module")
def sam2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like facebook/sam2.1-hiera-*, with a tiny random SAM 2."""
    folder = tmp_path_factory.mktemp("sam2") / "sam2-tiny"
    torch.manual_seed(0)
    rescaled(transformers.Sam2Model(tiny_sam2_config())).save_pretrained(folder)
    transformers.Sam2Processor(image_processor=transformers.Sam2ImageProcessor(
        size={"height": S, "width": S})).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like facebook/sam-vit-base, with a tiny random model."""
    folder = tmp_path_factory.mktemp("sam") / "sam-vit-tiny"
    torch.manual_seed(0)
    rescaled(transformers.SamModel(tiny_sam_config())).save_pretrained(folder)
    processor = transformers.SamProcessor(image_processor=transformers.SamImageProcessor(
        size={"longest_edge": S}, pad_size={"height": S, "width": S}))
    processor.save_pretrained(folder)
    return folder


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)


NO_FILTER = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


# ------------------------------------------------------------------------- crafted decoder outputs
def crafted(points: np.ndarray, blobs: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic decoder output for `[P, 2]` float32 points (resized frame): per point, 3 discs
    centred on it, radii 1.5 / 3 / 5 low-res pixels, logit slopes and predicted IoUs from a hash of
    the point, so that some masks pass each filter and some do not, and neighbours overlap. `blobs`
    adds a small island beside each disc and a small hole in the largest one."""
    p = points.astype(np.float64)
    u = (np.arange(R) + 0.5)[None, None, :]
    v = (np.arange(R) + 0.5)[None, :, None]
    logits, ious = [], []
    for k, radius in enumerate((1.5, 3.0, 5.0)):
        h = np.abs(np.sin(p[:, 0] * 12.9898 + p[:, 1] * 78.233 + k * 3.1)) * 43758.5453 % 1.0
        slope = np.array([2.0, 20.0, 200.0])[(h * 3).astype(int) % 3]
        cx, cy = p[:, 0] / (S / R), p[:, 1] / (S / R)
        dist = np.sqrt((u - cx[:, None, None]) ** 2 + (v - cy[:, None, None]) ** 2)
        logit = slope[:, None, None] * (radius - dist)
        if blobs:
            island = np.sqrt((u - cx[:, None, None] - radius - 2.5) ** 2 + (v - cy[:, None, None]) ** 2)
            logit = np.maximum(logit, slope[:, None, None] * (0.9 - island))
            if k == 2:
                logit = np.minimum(logit, slope[:, None, None] * (dist - 0.6))
        logits.append(logit)
        ious.append(0.8 + 0.2 * (h * 7.77 % 1.0))
    return (np.stack(logits, 1).astype(np.float32), np.stack(ious, 1).astype(np.float32))


def crafted_decode(calls: list[int] | None = None, blobs: bool = False):
    def decode(embedding: torch.Tensor, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if calls is not None:
            calls.append(len(points))
        logits, ious = crafted(points.cpu().numpy(), blobs)
        return torch.from_numpy(logits), torch.from_numpy(ious)
    return decode


def np_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return np.zeros(4, np.float32)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)


def np_nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    keep, dead = [], np.zeros(len(boxes), bool)
    for i in order:
        if dead[i]:
            continue
        keep.append(int(i))
        for j in order:
            if dead[j] or j == i:
                continue
            iw = max(0.0, min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0]))
            ih = max(0.0, min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1]))
            inter = iw * ih
            union = area[i] + area[j] - inter
            if union > 0 and inter / union > thresh:
                dead[j] = True
        dead[i] = True
    return keep


def np_small_regions(mask: np.ndarray, area: int, mode: str) -> tuple[np.ndarray, bool]:
    """segment-anything's `remove_small_regions`, with scipy's labelling in place of OpenCV's."""
    holes = mode == "holes"
    labels, n = scipy_ndimage.label(holes ^ mask, structure=np.ones((3, 3)))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area]
    if not small:
        return mask, False
    fill = [0] + small
    if not holes:
        fill = [i for i in range(n + 1) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]
    return np.isin(labels, fill), True


def reference(h: int, w: int, pps: int, iou_t: float, stab_t: float, offset: float, nms_t: float,
              min_area: int = 0, blobs: bool = False, sam2: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """segment-anything's generator (one crop) on the crafted decoder, written out plainly; `sam2`:
    sam2's (square resize: points scaled by S / W, S / H; logits resized straight to H x W)."""
    scale = S / max(h, w)
    rh, rw = int(h * scale + 0.5), int(w * scale + 0.5)
    side = np.linspace(1 / (2 * pps), 1 - 1 / (2 * pps), pps)
    xs, ys = np.meshgrid(side, side)
    if sam2:
        pts = np.stack([xs.ravel() * w / w * S, ys.ravel() * h / h * S], 1).astype(np.float32)
    else:
        pts = np.stack([xs.ravel() * w * (rw / w), ys.ravel() * h * (rh / h)], 1).astype(np.float32)
    low, iou = crafted(pts, blobs)
    masks, scores = [], []
    for lo, s in zip(low.reshape(-1, R, R), iou.ravel()):
        if iou_t > 0 and not s > iou_t:
            continue
        up = torch.from_numpy(lo)[None, None]
        if not sam2:
            up = F.interpolate(up, (S, S), mode="bilinear", align_corners=False)[..., :rh, :rw]
        up = F.interpolate(up, (h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
        outer = (up > -offset).sum()
        stab = (up > offset).sum() / outer if outer else math.nan
        if stab_t > 0 and not stab >= stab_t:
            continue
        masks.append(up > 0)
        scores.append(s)
    masks_a = np.array(masks).reshape(-1, h, w)
    scores_a = np.array(scores, np.float32)
    keep = np_nms(np.array([np_box(m) for m in masks_a]).reshape(-1, 4), scores_a, nms_t)
    masks_a, scores_a = masks_a[keep], scores_a[keep]
    if min_area > 0:
        new, unchanged = [], []
        for m in masks_a:
            m, a = np_small_regions(m, min_area, "holes")
            m, b = np_small_regions(m, min_area, "islands")
            new.append(m)
            unchanged.append(0.0 if a or b else 1.0)
        masks_a = np.array(new).reshape(-1, h, w)
        keep = np_nms(np.array([np_box(m) for m in masks_a]).reshape(-1, 4), np.array(unchanged), nms_t)
        masks_a, scores_a = masks_a[keep], scores_a[keep]
    return masks_a, scores_a


# ----------------------------------------------------------------------------------------- tests
def test_loads_folder_and_gives_masks_at_original_size(sam_dir: Path) -> None:
    proposer = SamProposer(sam_dir, points_per_side=4, **NO_FILTER)
    saved = transformers.SamModel.from_pretrained(sam_dir, local_files_only=True).state_dict()
    ours = proposer.model.state_dict()
    assert all(torch.equal(ours[k], saved[k]) for k in saved)
    for h, w in ((30, 50), (41, 23)):
        out = proposer(ImageSample(image=image(h, w), image_id=f"{h}x{w}", expressions=[]))
        # No filter and NMS at 1.0: every one of the 4 x 4 points gives its 3 masks.
        assert out.masks.shape == (48, h, w) and out.masks.dtype == torch.bool
        assert out.scores.shape == (48,) and out.scores.dtype == torch.float32
        assert torch.all(out.scores[:-1] >= out.scores[1:])  # NMS order: decreasing predicted IoU


def test_missing_or_incomplete_folder_names_it_and_the_command(tmp_path: Path) -> None:
    with pytest.raises(UserFileNotFound, match=r"sam-vit-base does not exist.*hf download facebook/sam-vit-base"):
        SamProposer(tmp_path / "sam-vit-base")
    (tmp_path / "sam-vit-huge").mkdir()
    (tmp_path / "sam-vit-huge" / "config.json").write_text('{"model_type": "sam"}')
    with pytest.raises(UserFileNotFound, match=r"processor config.*hf download facebook/sam-vit-huge"):
        SamProposer(tmp_path / "sam-vit-huge")
    with pytest.raises(UserValueError, match="exactly one"):
        SamProposer()


def test_postprocessing_matches_numpy_reference(sam_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = dict(pred_iou_thresh=0.88, stability_score_thresh=0.95, stability_score_offset=1.0,
                    box_nms_thresh=0.7)
    h, w = 30, 50
    expected, exp_scores = reference(h, w, 8, 0.88, 0.95, 1.0, 0.7)
    # The crafted outputs exercise every stage: some masks fail each filter, NMS removes others.
    raw, _ = reference(h, w, 8, 0.0, 0.0, 1.0, 1.0)
    after_iou, _ = reference(h, w, 8, 0.88, 0.0, 1.0, 1.0)
    before_nms, _ = reference(h, w, 8, 0.88, 0.95, 1.0, 1.0)
    assert len(raw) > len(after_iou) > len(before_nms) > len(expected) > 3
    for batch in (1, 7, 64, 500):
        proposer = SamProposer(sam_dir, points_per_side=8, points_per_batch=batch, **settings)
        calls: list[int] = []
        monkeypatch.setattr(proposer, "decode", crafted_decode(calls))
        out = proposer.propose_batch([image(h, w)])[0]
        assert calls == [min(batch, 64 - i) for i in range(0, 64, batch)]
        assert out.masks.shape == (len(expected), h, w)
        assert np.array_equal(out.masks.numpy(), expected)
        np.testing.assert_array_equal(out.scores.numpy(), exp_scores)


def test_small_region_removal_matches_reference(sam_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h, w, area = 37, 45, 40
    args = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=0.7)
    plain, _ = reference(h, w, 6, 0.0, 0.0, 1.0, 0.7, blobs=True)
    expected, exp_scores = reference(h, w, 6, 0.0, 0.0, 1.0, 0.7, min_area=area, blobs=True)
    # The option changes masks (holes filled, islands dropped) and which survive the second NMS.
    assert plain.sum() != expected.sum()
    for m in expected:
        assert scipy_ndimage.label(m, structure=np.ones((3, 3)))[1] <= 1
    proposer = SamProposer(sam_dir, points_per_side=6, min_mask_region_area=area, **args)
    monkeypatch.setattr(proposer, "decode", crafted_decode(blobs=True))
    out = proposer.propose_batch([image(h, w)])[0]
    assert np.array_equal(out.masks.numpy(), expected)
    np.testing.assert_array_equal(out.scores.numpy(), exp_scores)


@pytest.mark.parametrize("seed", range(6))
def test_connected_components_and_small_regions_against_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    mask = rng.random((23, 31) if seed < 4 else (90, 121)) < (0.3 + 0.1 * seed)
    if seed == 5:  # one long snake: runs joined only at alternating row ends
        mask = np.zeros((23, 31), bool)
        mask[::2, :] = True
        mask[1::4, -1] = True
        mask[3::4, 0] = True
        assert scipy_ndimage.label(mask, structure=np.ones((3, 3)))[1] == 1
    labels = connected_components(torch.from_numpy(mask)).numpy()
    ref, n = scipy_ndimage.label(mask, structure=np.ones((3, 3)))
    assert ((labels > 0) == mask).all()
    # Same partition: each reference label maps to one of ours and back.
    pairs = {(a, b) for a, b in zip(ref[mask], labels[mask])}
    assert len(pairs) == n == len(np.unique(labels[mask]))
    for area in (1, 3, 10, 1000):
        for mode in ("holes", "islands"):
            got, changed = remove_small_regions(torch.from_numpy(mask), area, mode)
            exp, exp_changed = np_small_regions(mask, area, mode)
            assert changed == exp_changed and np.array_equal(got.numpy(), exp)


def test_boxes_are_inclusive_and_empty_is_zero() -> None:
    masks = torch.zeros(3, 5, 6, dtype=torch.bool)
    masks[0, 1:3, 2:5] = True
    masks[1, 4, 0] = True
    boxes = masks_to_boxes(masks)
    assert boxes.tolist() == [[2, 1, 4, 2], [0, 4, 0, 4], [0, 0, 0, 0]]
    assert np.array_equal(boxes.numpy(), np.array([np_box(m) for m in masks.numpy()]))


def test_points_per_batch_and_propose_batch_do_not_change_masks(sam_dir: Path) -> None:
    imgs = [image(30, 50, 1), image(41, 23, 2)]
    one = SamProposer(sam_dir, points_per_side=4, points_per_batch=64, **NO_FILTER)
    small = SamProposer(sam_dir, points_per_side=4, points_per_batch=5, **NO_FILTER)
    together = one.propose_batch(imgs, [1, 2])
    for i, img in enumerate(imgs):
        alone = one.propose_batch([img])[0]
        batched = small.propose_batch([img])[0]
        assert alone.masks.shape == (48, *img.shape[-2:])
        assert torch.equal(together[i].masks, alone.masks) and torch.equal(batched.masks, alone.masks)
        torch.testing.assert_close(together[i].scores, alone.scores)


def test_cache_rerun_does_not_call_the_model(sam_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    imgs, ids = [image(30, 50, 1), image(20, 33, 2)], ["a", 7]
    first = SamProposer(sam_dir, cache_dir=tmp_path / "cache", points_per_side=4, **NO_FILTER)
    made = first.propose_batch(imgs, ids)
    again = SamProposer(sam_dir, cache_dir=tmp_path / "cache", points_per_side=4, **NO_FILTER)
    calls: list[str] = []
    monkeypatch.setattr(again.model, "get_image_embeddings", lambda *a, **k: calls.append("encoder"))
    monkeypatch.setattr(again, "decode", lambda *a, **k: calls.append("decoder"))
    loaded = again.propose_batch(imgs, ids)
    assert calls == []
    for m, l in zip(made, loaded):
        assert torch.equal(m.masks, l.masks)
        torch.testing.assert_close(m.scores, l.scores)
    # Other settings must not reuse those masks: the model runs again.
    other = SamProposer(sam_dir, cache_dir=tmp_path / "cache", points_per_side=3, **NO_FILTER)
    decoded: list[int] = []
    real_decode = other.decode
    monkeypatch.setattr(other, "decode", lambda e, p: decoded.append(len(p)) or real_decode(e, p))
    out = other.propose_batch(imgs[:1], ids[:1])[0]
    assert decoded == [9] and out.masks.shape == (27, 30, 50)


def test_bf16_switch_and_bad_dtype(sam_dir: Path) -> None:
    out = SamProposer(sam_dir, points_per_side=3, dtype="bfloat16", **NO_FILTER).propose_batch([image(30, 50)])[0]
    assert out.masks.shape == (27, 30, 50) and out.masks.dtype == torch.bool
    assert out.scores.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        SamProposer(sam_dir, dtype="int3")


def test_bad_image_is_a_clear_error(sam_dir: Path) -> None:
    proposer = SamProposer(sam_dir, points_per_side=2)
    with pytest.raises(UserValueError, match=r"image 'x' must be a \[3, H, W\] uint8"):
        proposer.propose_batch([torch.zeros(3, 8, 8)], ["x"])


@pytest.mark.parametrize(("hidden", "layers", "heads", "globals_", "params_m"), [
    (768, 12, 12, (2, 5, 8, 11), 93.7),  # sam-vit-base = SamConfig() defaults
    (1280, 32, 16, (7, 15, 23, 31), 641.1),  # sam-vit-huge (HybridGL's)
])
def test_real_size_configs_build_offline(hidden: int, layers: int, heads: int, globals_: tuple, params_m: float) -> None:
    vision = transformers.SamVisionConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                          global_attn_indexes=list(globals_))
    config = transformers.SamConfig(vision_config=vision.to_dict())
    with torch.device("meta"):  # shapes only: no memory, no download
        model = transformers.SamModel(config)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e6 - params_m) < 0.1
    assert transformers.SamConfig().vision_config.hidden_size == 768  # the defaults are ViT-B


def test_config_file_names_real_arguments() -> None:
    cfg = yaml.safe_load((ROOT / "configs/proposers/sam.yaml").read_text())["model"]["proposer"]
    assert cfg["class_path"] == "copatch.sam.SamProposer"
    params = inspect.signature(SamProposer).parameters
    assert set(cfg["init_args"]) <= set(params)
    for name in ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh",
                 "min_mask_region_area", "points_per_batch"):
        default = PRED_IOU_THRESH if name == "pred_iou_thresh" else params[name].default  # None: by model
        assert cfg["init_args"][name] == default  # SAM's defaults, written out


def test_preprocessing_agrees_with_the_processors(sam_dir: Path, sam2_dir: Path) -> None:
    from PIL import Image

    img = image(30, 50, 4)
    pil = Image.fromarray(img.permute(1, 2, 0).numpy())
    for folder, cls in ((sam_dir, transformers.SamProcessor), (sam2_dir, transformers.Sam2Processor)):
        theirs = cls.from_pretrained(folder, local_files_only=True)(images=pil, return_tensors="pt")["pixel_values"]
        ours, _ = SamProposer(folder, points_per_side=1).preprocess([img])
        # Same resize, normalisation and padding; resampling code differs by a grey level here and there.
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() < 0.05


def test_sam2_folder_gives_masks_and_matches_reference(sam2_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proposer = SamProposer(sam2_dir, points_per_side=4, **NO_FILTER)
    assert proposer.sam2
    out = proposer.propose_batch([image(30, 50), image(41, 23)])
    assert [tuple(o.masks.shape) for o in out] == [(48, 30, 50), (48, 41, 23)]
    assert SamProposer(sam2_dir, points_per_side=4).pred_iou_thresh == 0.8  # sam2's default
    with pytest.raises(UserValueError, match="min_mask_region_area"):
        SamProposer(sam2_dir, min_mask_region_area=100)

    h, w = 30, 50
    expected, exp_scores = reference(h, w, 8, 0.88, 0.95, 1.0, 0.7, sam2=True)
    assert len(expected) > 3
    proposer = SamProposer(sam2_dir, points_per_side=8, points_per_batch=10, pred_iou_thresh=0.88)
    monkeypatch.setattr(proposer, "decode", crafted_decode())
    got = proposer.propose_batch([image(h, w)])[0]
    assert np.array_equal(got.masks.numpy(), expected)
    np.testing.assert_array_equal(got.scores.numpy(), exp_scores)


def test_can_be_named_as_proposer_in_a_cli_config(sam_dir: Path, tmp_path: Path) -> None:
    """`CoPatch(proposer=...)` is typed `MaskProposer`; jsonargparse must accept this class there,
    with the init_args of configs/proposers/sam.yaml."""
    from jsonargparse import ArgumentParser

    from copatch.proposals import MaskProposer

    init_args = yaml.safe_load((ROOT / "configs/proposers/sam.yaml").read_text())["model"]["proposer"]["init_args"]
    init_args.update(model_dir=str(sam_dir), cache_dir=str(tmp_path / "cache"), points_per_side=2,
                     dtype="bfloat16")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--proposer", type=MaskProposer)
    cfg = parser.parse_args(["--proposer", json.dumps({"class_path": "copatch.sam.SamProposer",
                                                       "init_args": init_args})])
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    built = instantiate(cfg).proposer
    assert isinstance(built, SamProposer) and built.forward_dtype == torch.bfloat16
    assert built.points_per_side == 2 and built.pred_iou_thresh == 0.88


def test_is_a_frozen_eval_submodule(sam_dir: Path) -> None:
    proposer = SamProposer(sam_dir, points_per_side=2)
    parent = nn.Module()
    parent.proposer = proposer
    parent.train()  # Lightning does this
    assert not proposer.training and not proposer.model.training
    assert not any(p.requires_grad for p in proposer.parameters())
    assert "proposer.pixel_mean" not in parent.state_dict()


def test_resize_prepared_in_a_worker_is_used(sam_dir: Path) -> None:
    proposer = SamProposer(sam_dir, points_per_side=3, **NO_FILTER)
    img, other = image(30, 50, 1), image(30, 50, 2)
    step = proposer.input_step()
    key = step.key((30, 50))
    assert key == "sam:38x64"
    sample = ImageSample(image=other, image_id=1, expressions=[])
    # A prepared input is taken as this image's resize: feeding the other image's proves it is used.
    with_prepared = proposer.propose_batch([img], [1], [{key: step(sample)}])[0]
    # (The random model's masks hardly depend on the image; its predicted IoUs do.)
    from_other, from_img = proposer.propose_batch([other])[0], proposer.propose_batch([img])[0]
    assert torch.equal(with_prepared.masks, from_other.masks)
    assert torch.equal(with_prepared.scores, from_other.scores)
    assert not torch.equal(with_prepared.scores, from_img.scores)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_follows_the_module_device(sam_dir: Path) -> None:
    proposer = SamProposer(sam_dir, points_per_side=4, **NO_FILTER)
    img = image(30, 50)
    cpu = proposer.propose_batch([img])[0]
    proposer.to("cuda")
    gpu = proposer.propose_batch([img.cuda()])[0]
    assert gpu.masks.is_cuda and (cpu.masks != gpu.masks.cpu()).float().mean() < 0.01
    bf16 = SamProposer(sam_dir, points_per_side=4, dtype="bfloat16", **NO_FILTER).to("cuda")
    assert bf16.propose_batch([img.cuda()])[0].masks.shape == (48, 30, 50)


def test_copatch_segments_with_sam_candidates(sam_dir: Path, tiny_config: str) -> None:
    """The proposer inside CoPatch: `segment` picks one of SAM's masks (via `propose_batch`)."""
    from copatch.module import CoPatch

    proposer = SamProposer(sam_dir, points_per_side=3, **NO_FILTER)
    torch.manual_seed(0)
    model = CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, proposer=proposer)
    img = image(30, 50, 5)
    preds = model.segment(img.permute(1, 2, 0).numpy(), ["the thing on the left"])
    masks = proposer.propose_batch([img])[0].masks
    assert len(preds) == 1 and preds[0].mask.shape == (30, 50)
    assert 0 <= preds[0].chosen < len(masks) and torch.equal(preds[0].mask, masks[preds[0].chosen])
