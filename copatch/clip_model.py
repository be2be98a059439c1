"""Creating the CLIP model: an open_clip name plus local weights, with errors that say what to fix.

Nothing here downloads. `pretrained` is either a local checkpoint file (the normal case on machines
without a model hub) or an open_clip tag, which open_clip resolves through its hub cache; with
`HF_HUB_OFFLINE=1` a tag only works when the file is already cached.

The package ships one tiny config, `copatch-tiny` (a 12-block ViT of width 32 on a 14x14 grid, the
geometry of ViT-B/16 at a fraction of the cost), used by the built-in default run and the tests.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import open_clip
import torch
from torch import nn

from copatch.downloads import download_for_clip, fetch_hint
from copatch.errors import UserError, UserFileNotFound, UserValueError, knob
import copatch.siglip  # noqa: E402,F401  (registers the tiny SigLIP-layout timm tower of copatch-tiny-siglip)

log = logging.getLogger("copatch")

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

# Where each preset's weights come from, and the command that fetches them: copatch.downloads.


class CheckpointError(UserError, RuntimeError):
    """A CLIP checkpoint is missing, unreadable or does not fit the model config (a user error: the
    command line shows its message without a traceback)."""


class CheckpointMissing(CheckpointError, FileNotFoundError):
    """The CLIP checkpoint file does not exist."""


class CheckpointUnreadable(CheckpointError):
    """The CLIP checkpoint file exists but cannot be read (truncated or corrupt download)."""


def register_model_config(path: str | os.PathLike) -> str:
    """Register an open_clip JSON model config; returns the model name (the file's stem)."""
    path = Path(path)
    if not path.is_file():
        raise UserFileNotFound(f"open_clip model config {path} does not exist; give the path of a JSON "
                                f"file with embed_dim, vision_cfg and text_cfg (see {MODEL_CONFIG_DIR}).")
    open_clip.add_model_config(path)
    return path.stem


for _cfg in sorted(MODEL_CONFIG_DIR.glob("*.json")):
    register_model_config(_cfg)


PACKAGE_PREFIX = "package:"


def resolve_checkpoint(pretrained: str | None) -> str | None:
    """`package:<path>` names a file shipped inside the copatch package (the demo CLIP's weights);
    anything else is returned unchanged."""
    if pretrained and pretrained.startswith(PACKAGE_PREFIX):
        return str(Path(__file__).parent / pretrained[len(PACKAGE_PREFIX):])
    return pretrained


def _looks_like_path(pretrained: str) -> bool:
    return os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors", ".ckpt"))


def create_clip(model_name: str, pretrained: str | None = None, model_config: str | None = None) -> nn.Module:
    """Create an open_clip CLIP model in fp32, eval mode, with every parameter frozen.

    Args:
        model_name: an open_clip model name (`ViT-B-16-quickgelu`, `ViT-H-14`, `copatch-tiny`, ...).
            OpenAI weights need a `-quickgelu` name: open_clip does not check this for a file path.
        pretrained: a local checkpoint file (`package:<path>` for one shipped inside copatch), an open_clip
            tag (only from the local hub cache), or None for random weights (masks are then meaningless;
            for tests and smoke runs).
        model_config: optional path of an open_clip JSON config to register first; `model_name` then
            defaults to its stem.
    """
    if model_config is not None:
        model_name = register_model_config(model_config)
    pretrained = resolve_checkpoint(pretrained)
    if model_name not in open_clip.list_models():
        raise UserValueError(f"unknown CLIP model name {model_name!r}: set {knob('clip_model')} to one of "
                             f"open_clip.list_models() (e.g. ViT-B-16-quickgelu, ViT-H-14, copatch-tiny) or pass "
                             f"{knob('clip_config')} <json file>.")
    if pretrained and _looks_like_path(pretrained) and not os.path.isfile(pretrained):
        raise CheckpointMissing(f"CLIP checkpoint {pretrained} does not exist. {_fetch_sentence(model_name, pretrained)} "
                                f"Or set {knob('clip_pretrained')} to the file you have.")
    if pretrained == "openai" and "quickgelu" not in model_name.lower():
        log.warning("OpenAI weights were trained with QuickGELU: use %s-quickgelu, not %s.", model_name, model_name)
    if not pretrained:
        log.warning("CLIP %s has random weights (no clip_pretrained given): the masks are meaningless.",
                    model_name)
    try:
        if pretrained and _mmap_loadable(pretrained):
            model = _random_model(model_name)
            load_weights(model, pretrained)
        else:
            model = open_clip.create_model(model_name, pretrained=pretrained or None, precision="fp32")
    except (RuntimeError, AssertionError, KeyError, ValueError, EOFError, pickle.UnpicklingError, OSError,
            AttributeError) as err:  # AttributeError: a SigLIP checkpoint (logit_bias) into a CLIP config
        # open_clip reports a mismatch as a load_state_dict RuntimeError or an assertion in its pos-embed
        # resize, and an unreadable file as whatever torch.load / safetensors raise: which one it was is
        # decided by reading the file on its own, not by the wording of the error.
        if pretrained and os.path.isfile(pretrained):
            unreadable = _unreadable(pretrained)
            if unreadable:
                raise CheckpointUnreadable(
                    f"CLIP checkpoint {pretrained} is unreadable or truncated ({unreadable}); fetch it again. "
                    f"{_fetch_sentence(model_name, pretrained)}") from err
            raise CheckpointError(
                f"checkpoint {pretrained} does not fit the open_clip config {model_name!r}: {_first_line(err)}. "
                f"Pick the model name that matches the weights (see configs/model/) or the weights for "
                f"this model.") from err
        if pretrained:
            raise CheckpointError(
                f"could not load weights {pretrained!r} for {model_name!r} ({_first_line(err)}). Tags only "
                f"work from the local hub cache here: download the open_clip checkpoint file on a machine with "
                f"internet and pass its path as {knob('clip_pretrained')}.") from err
        raise
    if not getattr(getattr(model.visual, "transformer", None), "batch_first", True):  # a timm tower has none
        raise RuntimeError("copatch needs open_clip >= 2.32 (batch-first transformer blocks); "
                           f"found open_clip {open_clip.__version__}: pip install 'open_clip_torch>=2.32,<4'.")
    return model.eval().requires_grad_(False)


def _mmap_loadable(pretrained: str) -> bool:
    """A local PyTorch checkpoint file (not safetensors or numpy, which open_clip reads its own way)."""
    return os.path.isfile(pretrained) and not pretrained.endswith((".safetensors", ".npz", ".npy"))


class _DropRandomInitWarning(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" for the model that
    `load_weights` fills right after; that warning would be false."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


def _random_model(model_name: str) -> nn.Module:
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        return open_clip.create_model(model_name, pretrained=None, precision="fp32")
    finally:
        root.removeFilter(drop)


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """The state dict of a PyTorch checkpoint file, memory-mapped (`torch.load(mmap=True,
    weights_only=True)`): the tensors are views of the file's pages, read when first used, so reading
    costs no copy in memory. A file of the legacy (non-zip) format, which cannot be mapped, is read
    plainly. Unwrapped as open_clip does: a `state_dict` entry, a `module.` prefix (DDP)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(f"{path} holds no state dict (a {type(checkpoint).__name__})")
    if next(iter(checkpoint)).startswith("module."):
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return checkpoint


def load_weights(model: nn.Module, path: str) -> None:
    """Load the checkpoint `path` into the open_clip `model` with host memory near one copy of it.

    open_clip's own loading (`torch.load` of the whole file, then `load_state_dict` copying into the
    randomly initialised model) holds two copies at its peak: 8.6 GB for ViT-H/14's 3.9 GB file. Here
    the file is memory-mapped (`read_checkpoint`) and its tensors become the model's own
    (`load_state_dict(assign=True)`), so the random ones are freed and the weights are not copied on
    the host; moving the model to a GPU then reads them from the mapped file (the page cache). The
    state dict goes through open_clip's conversions first (other formats, the custom-text layout, the
    shape of logit_scale, position embeddings resized), as `open_clip.load_checkpoint` does. A tensor
    stored in another dtype than the model's (e.g. fp16) is converted (that one is copied).
    """
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    state_dict = convert_state_dict(model, read_checkpoint(path))
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for key in ("logit_scale", "logit_bias"):
        ours = getattr(model, key, None)
        if key in state_dict and ours is not None and ours.ndim != state_dict[key].ndim:
            state_dict[key] = state_dict[key].reshape(ours.shape)
    if "logit_bias" not in state_dict and getattr(model, "logit_bias", None) is not None:
        state_dict["logit_bias"] = torch.zeros_like(state_dict["logit_scale"])
    state_dict.pop("text.transformer.embeddings.position_ids", None)
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    own = model.state_dict(keep_vars=True)
    for key, value in state_dict.items():
        if key in own and value.dtype != own[key].dtype:
            state_dict[key] = value.to(own[key].dtype)
    model.load_state_dict(state_dict, strict=True, assign=True)


def _fetch_sentence(model_name: str, path: str) -> str:
    item = download_for_clip(model_name)
    if item is None:
        return "Put an open_clip-format state_dict for this architecture at that path (copy it again from its source)."
    return fetch_hint(item.key, destination=path)


def _unreadable(path: str) -> str | None:
    """Why the checkpoint file cannot be read as a whole (None when it reads): a truncated or corrupt
    download. Memory-mapped, so probing a large file costs little."""
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    f.get_slice(key)
        else:
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):  # a file torch cannot memory-map (old format): read it plainly
                    raise
                torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read the file is the answer
        return _first_line(err).split(". ")[0][:160]
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return " ".join(text[:3])[:500] if text else type(err).__name__
