import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from copatch.gem import (gem_heatmaps, gem_patch_features, gem_text_prompt, gem_transform,
                         resize_positional_embedding)


def _written_out_gem(model, pixels, depth, iters=1, temperature=None):
    """GEM spelled out token by token, head by head: an independent check of `gem_patch_features`."""
    visual = model.visual
    blocks = list(visual.transformer.resblocks)
    patch = visual.conv1.kernel_size[0]
    grid = pixels.shape[-1] // patch
    width = visual.class_embedding.shape[0]

    # Embedding with a bicubic, antialiased positional grid.
    pos = visual.positional_embedding
    old = int(math.sqrt(pos.shape[0] - 1))
    pos_grid = torch.stack([pos[1 + r * old: 1 + (r + 1) * old] for r in range(old)])     # [G, G, W]
    pos_grid = F.interpolate(pos_grid.permute(2, 0, 1)[None], size=(grid, grid), mode="bicubic",
                             antialias=True, align_corners=False)[0].permute(1, 2, 0)
    pos_new = torch.cat([pos[:1], pos_grid.reshape(grid * grid, width)])
    conv = visual.conv1(pixels)
    tokens = [torch.cat([visual.class_embedding[None],
                         torch.stack([conv[b, :, r, c] for r in range(grid) for c in range(grid)])]) + pos_new
              for b in range(pixels.shape[0])]
    x = visual.ln_pre(torch.stack(tokens))

    first = len(blocks) - depth + 1
    gem = None
    for i, block in enumerate(blocks):
        if i >= first:
            gem = x.clone() if gem is None else gem
            y = block.ln_1(x)
            attn = block.attn
            heads = attn.num_heads
            d = width // heads
            wq, wk, wv = (attn.in_proj_weight[j * width:(j + 1) * width] for j in range(3))
            bq, bk, bv = (attn.in_proj_bias[j * width:(j + 1) * width] for j in range(3))
            out = torch.zeros_like(y)
            for b in range(y.shape[0]):
                norms = torch.stack([y[b, t].norm() for t in range(y.shape[1])])
                t_inv = norms.mean() / math.sqrt(d) if temperature is None else temperature
                q_all, k_all, v_all = y[b] @ wq.T + bq, y[b] @ wk.T + bk, y[b] @ wv.T + bv
                for h in range(heads):
                    cols = slice(h * d, (h + 1) * d)
                    v = v_all[:, cols]
                    acc = torch.zeros_like(v)
                    for z in (q_all[:, cols], k_all[:, cols], v):
                        for _ in range(iters):
                            z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
                            z = torch.softmax(t_inv * z @ z.T, dim=1) @ z
                        z = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
                        acc = acc + torch.softmax(t_inv * z @ z.T, dim=1) @ v
                    out[b, :, cols] = acc / 3
            gem = gem + block.ls_1(out @ attn.out_proj.weight.T + attn.out_proj.bias)
        x = block(x)
    feats = visual.ln_post(gem[:, 1:]) @ visual.proj
    return feats / feats.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("depth, iters, size", [(2, 1, 128), (3, 1, 128), (3, 2, 128), (5, 1, 64)])
def test_patch_features_equal_a_written_out_gem(tiny_backbone, depth, iters, size):
    model = tiny_backbone.model
    torch.manual_seed(1)
    pixels = torch.randn(2, 3, size, size)
    got = gem_patch_features(model, pixels, depth=depth, iters=iters)
    with torch.no_grad():
        ref = _written_out_gem(model, pixels, depth, iters)
    grid = size // 16
    assert got.shape == (2, grid * grid, model.visual.proj.shape[1])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2, grid * grid))


def test_fixed_temperature_is_used(tiny_backbone):
    model = tiny_backbone.model
    pixels = torch.randn(1, 3, 128, 128)
    got = gem_patch_features(model, pixels, depth=3, temperature=0.7)
    with torch.no_grad():
        ref = _written_out_gem(model, pixels, 3, temperature=0.7)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, gem_patch_features(model, pixels, depth=3), atol=1e-4)


def test_model_is_left_unchanged(tiny_backbone):
    model = tiny_backbone.model
    pixels = torch.randn(1, 3, 64, 64)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_out = model.encode_image(pixels)
    gem_patch_features(model, torch.randn(1, 3, 128, 128), depth=3)
    assert model.visual.positional_embedding.shape == (17, 24)
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in model.visual.transformer.resblocks)
    assert torch.equal(model.encode_image(pixels), before_out)


def test_depth_out_of_range_is_refused(tiny_backbone):
    with pytest.raises(ValueError, match="depth"):
        gem_patch_features(tiny_backbone.model, torch.randn(1, 3, 64, 64), depth=6)


def test_positional_embedding_resize_matches_interpolate():
    torch.manual_seed(0)
    pos = torch.randn(1 + 14 * 14, 8)
    got = resize_positional_embedding(pos, 28)
    grid = pos[1:].T.reshape(1, 8, 14, 14)
    ref = F.interpolate(grid, size=(28, 28), mode="bicubic", antialias=True, align_corners=False)
    assert got.shape == (1 + 28 * 28, 8)
    assert torch.equal(got[0], pos[0])
    torch.testing.assert_close(got[1:], ref[0].reshape(8, -1).T)
    # Antialiasing changes the kernel even when upsampling: the flag is not a no-op here.
    plain = F.interpolate(grid, size=(28, 28), mode="bicubic", align_corners=False)
    assert not torch.allclose(got[1:], plain[0].reshape(8, -1).T, atol=1e-3)
    assert resize_positional_embedding(pos, 14) is pos


def test_heatmaps_are_min_max_per_expression():
    patches = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]), dim=-1)
    text = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 2.0]])   # un-normalised on purpose
    maps = gem_heatmaps(patches, text, size=8)
    assert maps.shape == (2, 8, 8) and maps.dtype == torch.float32
    assert maps.min() >= 0 and maps.max() <= 1
    torch.testing.assert_close(maps.amin(dim=(1, 2)), torch.zeros(2))
    torch.testing.assert_close(maps.amax(dim=(1, 2)), torch.ones(2))
    # Row-major grid: patch 0 is top-left, patch 2 bottom-left.
    assert maps[0, 0, 0] == 1 and maps[1, -1, 0] == 1 and maps[1, 0, -1] == 0
    # Same as scaling the text: only the direction counts.
    torch.testing.assert_close(gem_heatmaps(patches, 3 * text, size=8), maps)
    # Bilinear, align_corners=False, then min-max, by hand for the first expression.
    scores = (patches @ F.normalize(text, dim=-1).T)[:, 0].reshape(1, 1, 2, 2)
    up = F.interpolate(scores, size=(8, 8), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(maps[0], (up - up.min()) / (up.max() - up.min()))


def test_text_prompt():
    assert gem_text_prompt("man in red shirt") == "a photo of a man in red shirt."


def test_transform_resizes_and_normalises():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 30, 50), dtype=torch.uint8)
    out = gem_transform(image, size=16)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    # At the target size the resize is the identity; only ToTensor + Normalize remain.
    same = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(gem_transform(same, size=16), (same.float() / 255 - mean) / std)
    # A flat image stays flat through PIL's bicubic.
    flat = torch.full((3, 37, 23), 200, dtype=torch.uint8)
    torch.testing.assert_close(gem_transform(flat, size=16), ((torch.full((3, 16, 16), 200.0) / 255) - mean) / std)


def test_images_of_a_batch_give_the_features_of_one_image_at_a_time(tiny_backbone):
    # `CoPatch.gem_together` runs the GEM inputs of a batch's images in one forward.
    torch.manual_seed(2)
    pixels = torch.randn(3, 3, 128, 128)
    together = gem_patch_features(tiny_backbone.model, pixels, depth=3)
    alone = torch.cat([gem_patch_features(tiny_backbone.model, pixels[i:i + 1], depth=3) for i in range(3)])
    assert torch.equal(together, alone)
