import pytest
import torch

from copatch.hooks import capture_block_outputs, mask_patch_tokens


def test_captured_block_output_equals_forward_intermediates(tiny_backbone):
    visual = tiny_backbone.model.visual
    x = torch.randn(2, 3, 64, 64)
    for layer in range(tiny_backbone.num_blocks):
        with capture_block_outputs(tiny_backbone.blocks, [layer]) as captured:
            visual(x)
        ref = visual.forward_intermediates(x, indices=[layer], output_fmt="NLC", output_extra_tokens=True)
        assert torch.equal(captured[layer][:, 1:], ref["image_intermediates"][0])
        assert torch.equal(captured[layer][:, :1], ref["image_intermediates_prefix"][0])


def test_hooks_are_removed_even_after_an_exception(tiny_backbone):
    blocks = tiny_backbone.blocks
    with pytest.raises(RuntimeError):
        with capture_block_outputs(blocks, [1]), mask_patch_tokens(blocks, 2, torch.ones(3, 16)):
            raise RuntimeError("boom")
    assert all(not b._forward_hooks and not b._forward_pre_hooks for b in blocks)


def test_out_of_range_block_is_refused(tiny_backbone):
    with pytest.raises(IndexError, match="out of range"):
        with capture_block_outputs(tiny_backbone.blocks, [7]):
            pass


def test_token_masking_equals_a_manual_forward(tiny_backbone):
    """Blocks >= start see patch tokens scaled by each mask; CLS untouched; one output per mask."""
    visual = tiny_backbone.model.visual
    x = torch.randn(1, 3, 64, 64)
    weights = torch.rand(3, 16)
    start = 2
    with mask_patch_tokens(tiny_backbone.blocks, start, weights):
        hooked = visual(x)

    tokens = visual._embeds(x)
    for block in tiny_backbone.blocks[:start]:
        tokens = block(tokens)
    manual = []
    for w in weights:
        t = tokens.clone()
        for block in tiny_backbone.blocks[start:]:
            t = torch.cat([t[:, :1], t[:, 1:] * w[None, :, None]], dim=1)
            t = block(t)
        manual.append(visual.ln_post(t[:, 0]) @ visual.proj)
    torch.testing.assert_close(hooked, torch.cat(manual), rtol=1e-5, atol=1e-6)
