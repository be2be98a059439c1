"""Global-local mask embeddings and exit-layer patches against written-out computations."""

import dataclasses

import pytest
import torch
import torchvision.transforms.functional as TF

from copatch.backbone import IMAGENET_MEAN, IMAGENET_STD
from copatch.image_features import crop_boxes, image_features
from copatch.switches import Switches


def _masks(h: int, w: int) -> torch.Tensor:
    m = torch.zeros(4, h, w, dtype=torch.bool)
    m[0, 5:30, 10:40] = True
    m[1, 40:, :20] = True
    m[1, 0:3, 60:] = True  # two parts far apart: a wide box
    m[2, 20, 33] = True  # one pixel: zero-size box, runs to the image edge
    # m[3] stays empty: its zero box crops the whole (mean-filled) image
    return m


def _reference_embeddings(backbone, image, masks, v, start, fill):
    """The reference loop: per mask, full-resolution masked image, crop, encode; per mask, token masking."""
    normed = TF.normalize(image.float() / 255, list(IMAGENET_MEAN), list(IMAGENET_STD))
    size = [backbone.input_size] * 2
    resized = TF.resize(normed, size, antialias=True)[None]
    visual = backbone.model.visual
    out = []
    for m in masks:
        weights = TF.resize(m[None].float(), [backbone.grid] * 2, antialias=True).flatten()
        tokens = visual._embeds(resized)
        for b, block in enumerate(backbone.blocks):
            if b >= start:
                tokens = torch.cat([tokens[:, :1], tokens[:, 1:] * weights[None, :, None]], dim=1)
            tokens = block(tokens)
        glob = visual.ln_post(tokens[:, 0]) @ visual.proj
        mf = m.float()
        masked = normed * mf + (1 - mf) * fill
        ys, xs = torch.nonzero(m, as_tuple=True)
        x1, y1, x2, y2 = (xs.min(), ys.min(), xs.max(), ys.max()) if len(xs) else (0, 0, 0, 0)
        x1, y1, x2, y2 = int(x1), int(y1), int(x2), int(y2)
        x2 = image.shape[2] if x1 == x2 else x2
        y2 = image.shape[1] if y1 == y2 else y2
        crop = TF.resized_crop(masked, y1, x1, y2 - y1, x2 - x1, size, antialias=True)
        local = backbone.encode_image(crop[None])
        out.append(v * glob + (1 - v) * local)
    return torch.cat(out), resized


@pytest.mark.parametrize("exit_layer", [0, 3])  # before the masked blocks (shared pass) and inside them
def test_global_local_embeddings_match_the_reference_loop(tiny_backbone, exit_layer):
    torch.manual_seed(1)
    image = torch.randint(0, 256, (3, 70, 90), dtype=torch.uint8)
    masks = _masks(70, 90)
    masks = torch.cat([masks, masks[:1]])  # a duplicate proposal: encoded once, mapped back
    fill = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    feats = image_features(tiny_backbone, image, masks, Switches(), exit_layer=exit_layer, visual_mix=0.95,
                           token_mask_blocks=3)
    expected, resized = _reference_embeddings(tiny_backbone, image, masks, 0.95, start=1, fill=fill)
    torch.testing.assert_close(feats.mask_embeddings, expected, rtol=1e-4, atol=1e-5)
    patches = tiny_backbone.patch_features(resized, exit_layer)[0]
    torch.testing.assert_close(feats.patch_embeddings, patches, rtol=1e-5, atol=1e-5)
    assert feats.boxes[3].tolist() == [0, 0, 0, 0]


def test_crop_boxes_follow_the_reference_rule():
    boxes = torch.tensor([[10, 5, 39, 29], [0, 0, 0, 0], [33, 20, 33, 20]])
    assert crop_boxes(boxes, 70, 90) == [(5, 10, 24, 29), (0, 0, 70, 90), (20, 33, 50, 57)]


def test_switches_change_the_embeddings(tiny_backbone):
    torch.manual_seed(2)
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    masks = _masks(64, 64)
    kw = dict(exit_layer=0, visual_mix=0.9)
    ref = image_features(tiny_backbone, image, masks, Switches(), **kw)
    for change in [dict(input_norm="clip"), dict(crop_fill="mean_colour"), dict(mask_feature_mix="normalized")]:
        other = image_features(tiny_backbone, image, masks, dataclasses.replace(Switches(), **change), **kw)
        assert not torch.allclose(other.mask_embeddings, ref.mask_embeddings), change
    no_neg = image_features(tiny_backbone, image, masks, Switches(negate_patches=False), **kw)
    assert not torch.allclose(no_neg.patch_embeddings, ref.patch_embeddings)
    assert torch.equal(no_neg.mask_embeddings, ref.mask_embeddings)


def test_no_proposals_still_gives_patch_features(tiny_backbone):
    image = torch.randint(0, 256, (3, 40, 50), dtype=torch.uint8)
    feats = image_features(tiny_backbone, image, torch.zeros(0, 40, 50, dtype=torch.bool), Switches(),
                           exit_layer=1, visual_mix=0.95)
    assert feats.mask_embeddings.shape == (0, 24) and feats.patch_embeddings.shape == (16, 24)


def test_masks_of_the_wrong_size_are_refused(tiny_backbone):
    image = torch.zeros(3, 40, 50, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"\(40, 49\).*\(40, 50\)"):
        image_features(tiny_backbone, image, torch.zeros(2, 40, 49, dtype=torch.bool), Switches(),
                       exit_layer=1, visual_mix=0.95)


def test_input_normalisation_and_crop_fill_switches(tiny_backbone):
    from copatch.image_features import crop_fill_value, normalize_image

    image = torch.full((3, 2, 2), 255, dtype=torch.uint8)
    imagenet = normalize_image(image, Switches(), tiny_backbone)
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)]
    torch.testing.assert_close(imagenet[:, 0, 0], torch.tensor(expected))
    clip = normalize_image(image, Switches(input_norm="clip"), tiny_backbone)
    expected = [(1 - m) / s for m, s in zip(tiny_backbone.clip_mean, tiny_backbone.clip_std)]
    torch.testing.assert_close(clip[:, 0, 0], torch.tensor(expected))
    assert crop_fill_value(Switches(), torch.device("cpu")).flatten().tolist() == pytest.approx(list(IMAGENET_MEAN))
    assert crop_fill_value(Switches(crop_fill="mean_colour"), torch.device("cpu")).abs().sum() == 0


@pytest.mark.parametrize("h, w", [(1, 1), (7, 5), (64, 64), (70, 90), (300, 500), (3, 640), (64, 1000)])
def test_resize_matrices_are_the_antialiased_bilinear_resize(h, w):
    from copatch.image_features import aa_bilinear_weights

    torch.manual_seed(0)
    x = torch.randn(3, h, w)
    wy = aa_bilinear_weights(torch.tensor([h]), 64, h)[0]
    wx = aa_bilinear_weights(torch.tensor([w]), 64, w)[0]
    expected = TF.resize(x, [64, 64], antialias=True)
    torch.testing.assert_close(wy @ x @ wx.T, expected, rtol=0, atol=2e-6)


def test_batched_crops_are_the_per_proposal_crops_within_rounding(tiny_backbone):
    from copatch.image_features import crop_batches
    from copatch.masks import masks_to_boxes

    torch.manual_seed(3)
    image = torch.randn(3, 70, 90)
    masks = torch.cat([_masks(70, 90), torch.rand(9, 70, 90) > 0.7])
    fill = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    crops = crop_boxes(masks_to_boxes(masks), 70, 90)
    loop = []
    for i, (top, left, h, w) in enumerate(crops):
        m = masks[i, top:top + h, left:left + w].float()
        loop.append(TF.resize(image[:, top:top + h, left:left + w] * m + (1 - m) * fill, [64, 64], antialias=True))
    chunks = list(crop_batches(image, masks, crops, fill, 64, chunk=5))
    assert [c.shape[0] for c in chunks] == [5, 5, 3]
    torch.testing.assert_close(torch.cat(chunks), torch.stack(loop), rtol=0, atol=2e-6)
    # Through the encoder, on the module's switch.
    kw = dict(exit_layer=0, visual_mix=0.5, token_mask_blocks=3)
    exact = image_features(tiny_backbone, (image.clamp(-2, 2) * 60 + 128).to(torch.uint8), masks, Switches(), **kw)
    fast = image_features(tiny_backbone, (image.clamp(-2, 2) * 60 + 128).to(torch.uint8), masks, Switches(),
                          batched_crops=True, **kw)
    torch.testing.assert_close(fast.mask_embeddings, exact.mask_embeddings, rtol=0, atol=1e-5)
    assert torch.equal(fast.patch_embeddings, exact.patch_embeddings)
