"""Everything CoPatch computes from an image alone, once per image (never per expression).

- Global-local mask embeddings (Global-Local CLIP, method-notes a.3):
  - global: one ViT pass over the whole image in which, from block `L - token_mask_blocks` on, the
    batch is expanded to one copy per mask and each copy's patch tokens are scaled by its mask resized
    to the patch grid (`copatch.hooks.mask_patch_tokens`);
  - local: each mask's bounding box, outside-mask pixels filled with a constant, resized to the CLIP
    input and encoded by the full ViT;
  - mixed: `v * global + (1 - v) * local`.
- Exit-layer patch embeddings (`ClipBackbone.project_patches`), captured in the same ViT pass as the
  global embeddings when the exit layer comes before the first masked block.

The reference code's quirks are reproduced by default and each is a switch (`copatch.switches`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from copatch.backbone import IMAGENET_MEAN, IMAGENET_STD, ClipBackbone
from copatch.hooks import capture_block_outputs, mask_patch_tokens
from copatch.masks import masks_to_boxes, unique_masks
from copatch.siglip import pixel_masked_embeddings
from copatch.switches import Switches


@dataclass
class ImageFeatures:
    """Text-independent features of one image.

    Attributes:
        masks: `[N, H, W] bool` the proposals.
        boxes: `[N, 4] int64` XYXY inclusive pixel boxes (zeros for an empty mask).
        mask_embeddings: `[N, D]` the v-mixed global-local embeddings (not L2-normalised).
        patch_embeddings: `[G*G, D]` exit-layer patch embeddings, row-major over the grid.
        gem_patches: `[G'*G', D']` L2-normalised GEM patch features, when the spatial guidance needs them.
    """

    masks: torch.Tensor
    boxes: torch.Tensor
    mask_embeddings: torch.Tensor
    patch_embeddings: torch.Tensor
    gem_patches: torch.Tensor | None = None


def normalize_image(image: torch.Tensor, switches: Switches, backbone: ClipBackbone) -> torch.Tensor:
    """`[3, H, W] uint8` -> `[3, H, W] float32` normalised with ImageNet (reference) or CLIP mean/std."""
    if switches.input_norm == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = backbone.clip_mean, backbone.clip_std
    return TF.normalize(image.float() / 255.0, list(mean), list(std))


def crop_fill_value(switches: Switches, device: torch.device) -> torch.Tensor:
    """`[3, 1, 1]` value put outside the mask in a crop, in normalised space.

    The reference writes the ImageNet mean's numbers (0.485, 0.456, 0.406) into the already normalised
    image, which is about RGB (152, 142, 127) rather than the mean colour (0 after normalising).
    """
    if switches.crop_fill == "raw_mean_values":
        return torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    return torch.zeros(3, 1, 1, device=device)


def crop_boxes(boxes: torch.Tensor, height: int, width: int) -> list[tuple[int, int, int, int]]:
    """XYXY inclusive boxes -> `(top, left, height, width)` crops as the reference takes them.

    A box of zero width (x1 == x2, which includes an empty mask's zero box) runs to the right edge, and
    of zero height to the bottom; the crop is `x2 - x1` wide, so the box's last column and row are cut.
    """
    crops = []
    for x1, y1, x2, y2 in boxes.tolist():
        if x1 == x2:
            x2 = width
        if y1 == y2:
            y2 = height
        crops.append((y1, x1, y2 - y1, x2 - x1))
    return crops


@torch.no_grad()
def local_embeddings(backbone: ClipBackbone, image: torch.Tensor, masks: torch.Tensor, boxes: torch.Tensor,
                     fill: torch.Tensor, chunk: int = 64, batched: bool = False) -> torch.Tensor:
    """Masked bounding-box crops through the full encoder: `[N, D]`.

    Masking commutes with cropping, so each crop is cut from the image and the mask first and blended
    after, never materialising `N` full-resolution images.

    `batched=False` (default) crops and resizes one proposal at a time, exactly as the reference's
    `resized_crop`. `batched=True` makes every crop of a chunk in a few batched operations
    (`crop_batches`): a handful of kernels per chunk instead of about five per proposal, for GPUs,
    where the per-proposal loop is launch-bound. Its resize is the same antialiased bilinear map written
    as two matrix products, so it rounds differently: crops differ by up to a few 1e-7 of the
    normalised pixel range (README, "Performance"), which can flip a near tie between two proposals.
    """
    size = [backbone.input_size, backbone.input_size]
    out = []
    crops = crop_boxes(boxes, image.shape[-2], image.shape[-1])
    if batched:
        return torch.cat([backbone.encode_image(batch) for batch in crop_batches(image, masks, crops, fill,
                                                                                  backbone.input_size, chunk)])
    for start in range(0, len(crops), chunk):
        batch = []
        for i, (top, left, h, w) in enumerate(crops[start:start + chunk], start=start):
            m = masks[i, top:top + h, left:left + w].to(image.dtype)
            region = image[:, top:top + h, left:left + w] * m + (1 - m) * fill
            batch.append(TF.resize(region, size, antialias=True))
        out.append(backbone.encode_image(torch.stack(batch)))
    return torch.cat(out)


def aa_bilinear_weights(in_sizes: torch.Tensor, out_size: int, width: int) -> torch.Tensor:
    """Resize matrices of antialiased bilinear interpolation (`F.interpolate(..., "bilinear",
    antialias=True)`, align_corners False): `[n]` input lengths -> `[n, out_size, width]` float32 rows,
    zero beyond each input's length (`width` >= every length).

    The triangle filter widened by the scale when downsampling, normalised per output pixel, as
    PyTorch's `_upsample_bilinear2d_aa` computes its weights.
    """
    device = in_sizes.device
    scale = in_sizes.to(torch.float32)[:, None] / out_size                       # [n, 1]
    support = torch.where(scale >= 1, scale, torch.ones_like(scale))
    invscale = torch.where(scale >= 1, 1.0 / scale, torch.ones_like(scale))
    centre = scale * (torch.arange(out_size, device=device, dtype=torch.float32)[None, :] + 0.5)  # [n, out]
    low = torch.clamp(torch.trunc(centre - support + 0.5), min=0)
    high = torch.minimum(torch.trunc(centre + support + 0.5), in_sizes.to(torch.float32)[:, None])
    j = torch.arange(width, device=device, dtype=torch.float32)[None, None, :]  # [1, 1, width]
    w = torch.clamp(1 - ((j - centre[..., None] + 0.5) * invscale[..., None]).abs(), min=0)
    w = torch.where((j >= low[..., None]) & (j < high[..., None]), w, 0.0)
    total = w.sum(-1, keepdim=True)
    return w / torch.where(total > 0, total, torch.ones_like(total))


def crop_batches(image: torch.Tensor, masks: torch.Tensor, crops: list[tuple[int, int, int, int]],
                  fill: torch.Tensor, size: int, chunk: int = 64):
    """The masked crops of `local_embeddings`, resized to `size`, made in batches: yields `[c, 3, size, size]`
    chunks in the order of `crops` (`(top, left, height, width)`).

    Each chunk gathers its crops into one padded `[c, 3, h_max, w_max]` stack (one indexing kernel for
    the pixels, one for the masks), blends them with `fill`, and resizes them all with two batched
    matrix products by `aa_bilinear_weights` (zero on the padding). Crops of similar size share a
    chunk (sorted by area) to keep the padding small.
    """
    device, n = image.device, len(crops)
    if n == 0:
        return
    order = sorted(range(n), key=lambda i: crops[i][2] * crops[i][3])
    geometry = torch.tensor(crops, dtype=torch.int64).to(device, non_blocking=True)  # [n, 4]: top, left, h, w
    results: list[tuple[list[int], torch.Tensor]] = []
    for start in range(0, n, chunk):
        rows = order[start:start + chunk]
        h_max, w_max = max(crops[i][2] for i in rows), max(crops[i][3] for i in rows)
        g = geometry.index_select(0, torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True))
        top, left, h, w = g.unbind(1)
        ys = torch.minimum(top[:, None] + torch.arange(h_max, device=device), (top + h - 1)[:, None])  # [c, h_max]
        xs = torch.minimum(left[:, None] + torch.arange(w_max, device=device), (left + w - 1)[:, None])
        src = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        m = masks[src[:, None, None], ys[:, :, None], xs[:, None, :]].to(image.dtype)[:, None]  # [c, 1, h, w]
        pixels = image[:, ys[:, :, None], xs[:, None, :]].transpose(0, 1)                     # [c, 3, h, w]
        region = pixels * m + (1 - m) * fill
        wy = aa_bilinear_weights(h, size, h_max)[:, None]                                     # [c, 1, S, h]
        wx = aa_bilinear_weights(w, size, w_max)[:, None]                                     # [c, 1, S, w]
        results.append((rows, wy @ region @ wx.transpose(-1, -2)))
    # Back to the order of `crops`, in chunks of `chunk` (what the encoder gets).
    flat = torch.cat([r for _, r in results])
    where = torch.empty(n, dtype=torch.int64)
    where[torch.tensor([i for rows, _ in results for i in rows])] = torch.arange(n)
    flat = flat.index_select(0, where.to(device, non_blocking=True))
    for start in range(0, n, chunk):
        yield flat[start:start + chunk]


@torch.no_grad()
def image_features(backbone: ClipBackbone, image: torch.Tensor, masks: torch.Tensor, switches: Switches, *,
                   exit_layer: int, visual_mix: float, token_mask_blocks: int = 3,
                   batched_crops: bool = False) -> ImageFeatures:
    """All text-independent features of one image.

    Args:
        backbone: the CLIP wrapper.
        image: `[3, H, W] uint8` RGB.
        masks: `[N, H, W] bool` proposals (N may be 0).
        switches: behaviour switches (normalisation, crop fill, feature mix, negation).
        exit_layer: 0-based block whose output gives the patch embeddings.
        visual_mix: v, the weight of the global (token-masked) embedding.
        token_mask_blocks: how many final blocks get token masking (3: blocks 9-11 of a 12-block ViT).
        batched_crops: make the local crops in batches (`local_embeddings`); off, one at a time, exact.
    """
    backbone.check_layer(exit_layer)
    if masks.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"proposal masks are {tuple(masks.shape[-2:])} but the image is {tuple(image.shape[-2:])}: "
                         "proposals must be at the image's original resolution.")
    normed = normalize_image(image, switches, backbone)
    size = [backbone.input_size, backbone.input_size]
    resized = TF.resize(normed, size, antialias=True)[None]
    start = backbone.num_blocks - token_mask_blocks
    n = masks.shape[0]

    # A SigLIP (timm) tower's global embeddings are pixel-masked images in the reference (copatch.siglip).
    pixel_global = getattr(backbone, "is_timm", False) and switches.siglip_global == "pixels"
    # The global pass and the patch capture share blocks 0..start-1; when the exit layer is inside the
    # masked blocks its tokens would be masked, so it then gets its own plain pass.
    shared = exit_layer < start and n > 0 and not pixel_global
    if n > 0:
        # Identical proposals (Mask2Former gives many empty and duplicate masks) are encoded once.
        distinct, inverse = unique_masks(masks)
        if pixel_global:
            global_emb = pixel_masked_embeddings(backbone.encode_image, resized, distinct)[inverse]
        else:
            grid = [backbone.grid, backbone.grid]
            weights = TF.resize(distinct[:, None].to(normed.dtype), grid, antialias=True).flatten(1)
            with capture_block_outputs(backbone.blocks, [exit_layer] if shared else []) as captured, \
                    mask_patch_tokens(backbone.blocks, start, weights, getattr(backbone, "prefix_tokens", 1)):
                global_emb = backbone.encode_image(resized)[inverse]
    head = {"head": switches.siglip_patch_head} if getattr(backbone, "is_timm", False) else {}
    if shared:
        patches = backbone.project_patches(captured[exit_layer], switches.negate_patches, **head)[0]
    else:
        patches = backbone.patch_features(resized, exit_layer, switches.negate_patches, **head)[0]

    if n == 0:
        empty = patches.new_zeros(0, patches.shape[-1])
        return ImageFeatures(masks, masks_to_boxes(masks), empty, patches)
    distinct_boxes = masks_to_boxes(distinct)  # full-resolution reductions: once per distinct mask
    boxes = distinct_boxes[inverse]
    local_emb = local_embeddings(backbone, normed, distinct, distinct_boxes,
                                 crop_fill_value(switches, normed.device), batched=batched_crops)[inverse]
    if switches.mask_feature_mix == "normalized":
        global_emb, local_emb = F.normalize(global_emb, dim=-1), F.normalize(local_emb, dim=-1)
    mixed = visual_mix * global_emb + (1 - visual_mix) * local_emb
    return ImageFeatures(masks, boxes, mixed, patches)
