import pytest
import torch

from copatch.backbone import ClipBackbone


def _manual_block_output(visual, x, layer):
    tokens = visual._embeds(x)
    for block in visual.transformer.resblocks[: layer + 1]:
        tokens = block(tokens)
    return tokens


@pytest.mark.parametrize("negate", [True, False])
def test_patch_features_equal_a_manual_forward(tiny_backbone, negate):
    visual = tiny_backbone.model.visual
    x = torch.randn(2, 3, 64, 64)
    layer = 2
    tokens = _manual_block_output(visual, x, layer)[:, 1:]
    sign = -1.0 if negate else 1.0
    # LayerNorm written out: (x - mean) / sqrt(var + eps) * gamma + beta, then the projection.
    t = sign * tokens
    ln = visual.ln_post
    normed = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + ln.eps)
    expected = (normed * ln.weight + ln.bias) @ visual.proj
    got = tiny_backbone.patch_features(x, layer, negate=negate)
    assert got.shape == (2, tiny_backbone.grid ** 2, visual.proj.shape[1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_negation_only_flips_the_normalised_part(tiny_backbone):
    """LN(-x) = beta - gamma * x_hat, so LN(x) + LN(-x) = 2 * beta before the projection."""
    visual = tiny_backbone.model.visual
    x = torch.randn(1, 3, 64, 64)
    tokens = _manual_block_output(visual, x, 1)[:, 1:]
    total = visual.ln_post(tokens) + visual.ln_post(-tokens)
    torch.testing.assert_close(total, 2 * visual.ln_post.bias.expand_as(total), rtol=1e-5, atol=1e-5)


def test_geometry_of_the_tiny_model(tiny_backbone):
    assert (tiny_backbone.input_size, tiny_backbone.grid, tiny_backbone.num_blocks) == (64, 4, 4)


def test_exit_layer_out_of_range_names_the_valid_range(tiny_backbone):
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        tiny_backbone.patch_features(torch.randn(1, 3, 64, 64), 4)


def test_text_encoder_is_batched_and_raw(tiny_backbone):
    emb = tiny_backbone.encode_text(["a red circle", "the blue square"])
    assert emb.shape == (2, 24)
    assert not torch.allclose(emb.norm(dim=-1), torch.ones(2))
