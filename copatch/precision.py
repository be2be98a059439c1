"""TF32 for fp32 work on NVIDIA GPUs: an opt-in speed switch (`CoPatch(allow_tf32=True)`,
`--model.allow_tf32 true`).

On Ampere and later GPUs TF32 runs fp32 matmuls and convolutions on the tensor cores with a 10-bit
mantissa (inputs rounded, fp32 accumulation): several times the fp32 matmul throughput, results no
longer bit-equal to fp32, so near-tie picks can change. PyTorch's own defaults: fp32 matmuls exact
(`torch.backends.cuda.matmul.allow_tf32 = False`), cuDNN convolutions in TF32
(`torch.backends.cudnn.allow_tf32 = True`; CLIP's patch embedding and Mask2Former's convolutions).

`allow_tf32=False` (the default) leaves both settings as they are, so a run stays as exact as PyTorch
makes it; `True` turns both on for the predict run and puts them back afterwards. Nothing changes on a
CPU device (the settings are CUDA's only).
"""

from __future__ import annotations

import torch

__all__ = ["set_tf32", "restore_tf32"]


def set_tf32(enabled: bool, device: torch.device | str) -> tuple[bool, bool] | None:
    """Allow TF32 for fp32 matmuls and cuDNN convolutions when `enabled` and `device` is CUDA.

    Returns:
        The previous `(matmul.allow_tf32, cudnn.allow_tf32)` to hand to `restore_tf32`, or None when
        nothing was changed (not enabled, or not a CUDA device).
    """
    if not enabled or torch.device(device).type != "cuda":
        return None
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return before


def restore_tf32(before: tuple[bool, bool] | None) -> None:
    """Put back what `set_tf32` changed (None: nothing to do)."""
    if before is not None:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
