"""Inputs are checked, never guessed: what `CoPatch.segment` (and `copatch.api`) accepts, how, and the
message for what it refuses; images and proposals with no usable mask; over-long expressions."""

import math
import warnings

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from copatch.api import as_proposals, image_tensor
from copatch.errors import UserError, UserFileNotFound, UserTypeError, UserValueError
from copatch.module import CoPatch
from copatch.proposals import Proposals
from copatch.switches import Switches
from copatch.text import features

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)  # [H, W, 3]


def masks_for(h: int = 40, w: int = 48) -> np.ndarray:
    """Three [H, W] bool proposals: two boxes and an empty mask in the middle."""
    m = np.zeros((3, h, w), dtype=bool)
    m[0, :h // 2, :w // 2] = True
    m[2, h // 3:, w // 3:] = True
    return m


@pytest.fixture(scope="module")
def model(tiny_config):
    torch.manual_seed(0)
    return CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128)


def chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------- images
def test_float_images_must_be_in_0_1():
    expected = chw(IMAGE)
    assert torch.equal(image_tensor(expected.float() / 255), expected)  # x / 255 * 255 rounds back to x
    assert torch.equal(image_tensor(IMAGE.astype(np.float32) / 255), expected)
    for bad in (expected.float(), IMAGE.astype(np.float64)):  # 0-255 floats
        with pytest.raises(UserValueError, match=rf"a float image must hold values in \[0, 1\], got values in "
                                                 rf"\[{IMAGE.min()}, {IMAGE.max()}\]: divide 0-255 floats by 255"):
            image_tensor(bad)
    with pytest.raises(UserValueError, match=r"got values in \[-0.5, 0.5\]"):
        image_tensor(torch.full((3, 2, 2), 0.5) - torch.tensor([1.0, 0, 0])[:, None, None])
    nan = torch.zeros(3, 2, 2)
    nan[0, 0, 0] = float("nan")
    with pytest.raises(UserValueError, match=r"got values in \[nan, nan\]"):
        image_tensor(nan)


def test_integer_and_bool_images():
    expected = chw(IMAGE)
    assert torch.equal(image_tensor(IMAGE.astype(np.int64)), expected)
    assert torch.equal(image_tensor(IMAGE.astype(np.uint16)), expected)
    assert torch.equal(image_tensor(expected.to(torch.int32)), expected)
    with pytest.raises(UserValueError, match=r"8-bit values in \[0, 255\], got uint16 values in \[0, 1000\]"):
        image_tensor(np.array([[0, 1000]], dtype=np.uint16))
    with pytest.raises(UserValueError, match=r"got torch.int64 values in \[-1, 3\]"):
        image_tensor(torch.tensor([[[-1, 3]]] * 3))
    with pytest.raises(UserTypeError, match="a bool array is a mask, not an image"):
        image_tensor(IMAGE > 128)
    with pytest.raises(UserTypeError, match="a bool tensor is a mask, not an image"):
        image_tensor(torch.from_numpy(IMAGE > 128).permute(2, 0, 1))
    with pytest.raises(UserTypeError, match="got dtype <U1"):
        image_tensor(np.array([["a"]]))


def test_grayscale_and_rgba_arrays_are_read_as_pil_reads_them():
    gray = IMAGE[..., 0]
    rgba = np.dstack([IMAGE, RNG.integers(0, 256, IMAGE.shape[:2], dtype=np.uint8)])
    # PIL is the reference: its own convert("RGB") of the same pixels.
    from_pil_gray = chw(np.asarray(Image.fromarray(gray, "L").convert("RGB")))
    from_pil_rgba = chw(np.asarray(Image.fromarray(rgba, "RGBA").convert("RGB")))
    assert torch.equal(image_tensor(gray), from_pil_gray)
    assert torch.equal(image_tensor(gray[..., None]), from_pil_gray)
    assert torch.equal(image_tensor(torch.from_numpy(gray)), from_pil_gray)
    assert torch.equal(image_tensor(rgba), from_pil_rgba)
    assert torch.equal(image_tensor(chw(rgba)), from_pil_rgba)
    assert torch.equal(image_tensor(Image.fromarray(rgba, "RGBA")), from_pil_rgba)


def test_image_shapes_that_are_not_images_are_refused():
    with pytest.raises(UserValueError, match=r"got shape \(3, 40, 48\) \(channels first\? numpy images are channels "
                                             r"last: use .transpose\(1, 2, 0\)\)"):
        image_tensor(np.ascontiguousarray(IMAGE.transpose(2, 0, 1)))
    with pytest.raises(UserValueError, match=r"got shape \(40, 48, 3\) \(channels last\? .*permute\(2, 0, 1\)\)"):
        image_tensor(torch.from_numpy(IMAGE))
    with pytest.raises(UserValueError, match="the image has no pixels: its size is 0x5"):
        image_tensor(np.zeros((0, 5, 3), dtype=np.uint8))
    with pytest.raises(UserTypeError, match="image must be a PIL image, a file path, .* got list"):
        image_tensor([[1, 2]])


def test_image_file_paths(tmp_path):
    png = tmp_path / "scene.png"
    Image.fromarray(IMAGE).save(png)
    expected = chw(IMAGE)
    assert torch.equal(image_tensor(png), expected) and torch.equal(image_tensor(str(png)), expected)
    missing = tmp_path / "nope.png"
    with pytest.raises(UserFileNotFound, match=rf"image file {missing} not found: pass the path of an existing"):
        image_tensor(str(missing))
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image at all" * 10)
    with pytest.raises(UserValueError, match=rf"cannot read image file {garbage}: .*truncated: replace it"):
        image_tensor(garbage)
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.read_bytes()[: png.stat().st_size // 2])  # a real PNG header, half the pixels
    with pytest.raises(UserValueError, match=rf"cannot read image file {cut}: .*truncated"):
        image_tensor(cut)


def test_segment_takes_every_image_form_alike(model, tmp_path):
    png = tmp_path / "scene.png"
    Image.fromarray(IMAGE).save(png)
    proposals = masks_for()
    reference = model.segment(IMAGE, "the left box", proposals=proposals)[0]
    for image in (png, str(png), Image.fromarray(IMAGE), chw(IMAGE), chw(IMAGE).float() / 255):
        out = model.segment(image, "the left box", proposals=proposals)[0]
        assert (out.chosen, out.candidates) == (reference.chosen, reference.candidates)
        assert out.candidate_scores == reference.candidate_scores
    gray = model.segment(IMAGE[..., 1], "the left box", proposals=proposals)[0]
    assert gray.failure is None and gray.mask.shape == (40, 48)


# ------------------------------------------------------------------------------------ proposals
def test_soft_proposals_are_refused_and_0_1_masks_accepted():
    hard = masks_for()
    for form in (hard.astype(np.float32), torch.from_numpy(hard).float(), hard.astype(np.uint8), hard.tolist()):
        assert torch.equal(as_proposals(form, (40, 48)).masks, torch.from_numpy(hard))
    soft = hard * 0.6 + 0.2  # sigmoid-like probabilities: every value is "truthy"
    with pytest.raises(UserValueError, match=r"proposals must be bool masks \(or hold only 0 and 1\), got float64 "
                                             r"masks with other values \(e.g. 0.8; range \[0.2, 0.8\]\). Soft masks "
                                             r"are not thresholded for you: pass e.g. proposals=probabilities > 0.5"):
        as_proposals(soft, (40, 48))
    with pytest.raises(UserValueError, match=r"got torch.uint8 masks .*range \[0, 255\].*masks != 0 for 0/255"):
        as_proposals(torch.from_numpy(hard.astype(np.uint8) * 255), (40, 48))
    nan = hard.astype(np.float32)
    nan[0, 0, 0] = np.nan
    with pytest.raises(UserValueError, match=r"e.g. nan"):
        as_proposals(nan, (40, 48))


def test_proposals_of_the_wrong_shape_or_type_are_refused():
    with pytest.raises(UserValueError, match=r"at the image size \(40, 48\), got \(40, 48\) \(one mask\? add a "
                                             r"leading axis: mask\[None\]\)"):
        as_proposals(masks_for()[0], (40, 48))
    with pytest.raises(UserValueError, match=r"at the image size \(40, 48\), got \(3, 48, 40\)"):
        as_proposals(Proposals(torch.from_numpy(masks_for(48, 40))), (40, 48))
    with pytest.raises(UserTypeError, match="proposals must be .* got str of dtype <U4"):
        as_proposals("mask", (40, 48))
    with pytest.raises(UserTypeError, match="proposals must be .* got list of dtype object"):
        as_proposals([None], (40, 48))
    given = Proposals(torch.from_numpy(masks_for()))
    assert as_proposals(given, (40, 48)) is given


def test_segment_refuses_soft_proposals_in_api_words(model):
    with pytest.raises(UserValueError, match="Soft masks are not thresholded"):
        model.segment(IMAGE, "the left box", proposals=masks_for() * 0.5 + 0.25)


# ---------------------------------------------------------------------------------- expressions
@pytest.mark.parametrize("expressions, error, message", [
    (5, UserTypeError, "segment() expressions must be a string or a list of strings, got int"),
    (b"the dog", UserTypeError, "segment() expressions must be a string or a list of strings, got bytes: decode "
                                "bytes first (.decode())"),
    (["the dog", None], UserTypeError, "segment() expressions must be a string or a list of strings, got NoneType "
                                       "at position 1 of the list"),
    ([1, 2], UserTypeError, "segment() expressions must be a string or a list of strings, got int at position 0 "
                            "of the list"),
    ({"the dog"}, UserTypeError, "segment() expressions must be a string or a list of strings, got set"),
    ([], UserValueError, "segment() needs at least one expression, got an empty list"),
    ("", UserValueError, "segment() expression 0 ('') is empty: every expression needs at least one word"),
    (["the dog", " \t"], UserValueError, "segment() expression 1 (' \\t') is empty: every expression needs at "
                                         "least one word"),
])
def test_bad_expressions_are_errors_in_api_words(model, expressions, error, message):
    with pytest.raises(error) as err:
        model.segment(IMAGE, expressions, proposals=masks_for())
    assert str(err.value) == message and isinstance(err.value, UserError)


def test_a_tuple_of_expressions_is_a_list(model):
    out = model.segment(IMAGE, ("the left box", "the right box"), proposals=masks_for())
    assert [p.text for p in out] == ["the left box", "the right box"]


# ------------------------------------------------------------------------- no usable proposals
def check_no_proposals(out, size, *phrases):
    for p in out:
        assert p.failure["kind"] == "no_proposals" and p.chosen == -1
        assert p.candidates == [] and p.candidate_scores == [] and not any(map(math.isnan, p.candidate_scores))
        assert p.mask.shape == size and not p.mask.any()
        assert all(phrase in p.failure["error"] for phrase in phrases), p.failure["error"]


def test_all_empty_proposals_give_a_recorded_no_proposals_result(model):
    out = model.segment(IMAGE, ["the left box", "the dog"], proposals=np.zeros((4, 40, 48), dtype=bool))
    check_no_proposals(out, (40, 48), "the given proposals gave 4 candidate masks for image 0, all of them empty",
                       "no mask can be chosen")
    none = model.segment(IMAGE, "the dog", proposals=np.zeros((0, 40, 48), dtype=bool))
    check_no_proposals(none, (40, 48), "gave 0 candidate masks")


def test_a_1x1_image_gives_a_recorded_no_proposals_result(model):
    # Before: chosen 0 with NaN scores (the spatial coherence of a whole-image mask is 0/0).
    pixel = np.full((1, 1, 3), 200, dtype=np.uint8)
    for proposals in (np.ones((2, 1, 1), dtype=bool), np.array([[[True]], [[False]]])):
        check_no_proposals(model.segment(pixel, "the dot", proposals=proposals), (1, 1),
                           "(1x1), each empty or the whole image, whose spatial coherence is undefined (0/0)")
    check_no_proposals(model.segment(pixel, "the dot", proposals=np.zeros((2, 1, 1), dtype=bool)), (1, 1),
                       "all of them empty")


def test_usable_proposals_rule(model, tiny_config):
    full, empty, part = torch.ones(1, 4, 4, dtype=torch.bool), torch.zeros(1, 4, 4, dtype=torch.bool), \
        torch.zeros(1, 4, 4, dtype=torch.bool)
    part[0, 0, 0] = True
    assert model.usable_proposals(torch.cat([empty, part])) and model.usable_proposals(torch.cat([full, part]))
    assert not model.usable_proposals(torch.cat([empty, empty])) and not model.usable_proposals(empty[:0])
    assert not model.usable_proposals(torch.cat([full, empty]))  # the spatial guidance cannot score a whole image
    torch.manual_seed(0)
    no_guidance = CoPatch(clip_config=tiny_config, exit_layer=1, switches=Switches(spatial_guidance=False))
    assert no_guidance.usable_proposals(torch.cat([full, empty]))


def test_empty_masks_stay_candidates_when_one_is_usable(tiny_config):
    # As in the reference, no mask is dropped: every stage sees all N, and indices are into all N.
    seen = []

    class Watch(CoPatch):
        def encode_image(self, sample, masks):
            seen.append(masks.shape[0])
            return super().encode_image(sample, masks)

    torch.manual_seed(0)
    out = Watch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128).segment(
        IMAGE, "the box", proposals=masks_for())[0]
    assert seen == [3] and out.failure is None and 0 <= out.chosen < 3
    assert torch.equal(out.mask, torch.from_numpy(masks_for()[out.chosen]))


# ------------------------------------------------------------------------------ long expressions
def test_a_long_expression_is_truncated_with_one_warning(model):
    tokenizer = open_clip.get_tokenizer(model.backbone.model_name)
    context = tokenizer.context_length  # 32 for the tiny test CLIP, 77 for the real ones
    long = " ".join(["the red circle left of the blue square"] * 5)
    n = len(tokenizer.encode(long)) + 2  # counted here independently: BPE tokens, start and end
    assert n > context
    features._WARNED_LONG.discard(long)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.segment(IMAGE, [long, "a dog"], proposals=masks_for())
        model.clear_caches()  # encoded again: still one warning per expression string
        model.segment(IMAGE, [long], proposals=masks_for())
    messages = [str(w.message) for w in caught if "context" in str(w.message)]
    assert messages == [f"expression {long[:40]!r}... has {n} tokens, more than the text encoder's context of "
                        f"{context} tokens (tiny-clip-b32; start and end tokens included): it is truncated, only "
                        f"its first {context - 2} word tokens are encoded."]
    # What is encoded is the truncated token sequence, as open_clip's tokenizer cuts it.
    tokens = tokenizer([long])
    assert tokens[0, -1] == tokenizer.eot_token_id and (tokens[0] != 0).sum() == context


def test_short_expressions_do_not_warn(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.segment(IMAGE, ["the left box", "the dog"], proposals=masks_for())
