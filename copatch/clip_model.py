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
        model = open_clip.create_model(model_name, pretrained=pretrained or None, precision="fp32")
    except (RuntimeError, AssertionError, KeyError, ValueError, EOFError, pickle.UnpicklingError, OSError) as err:
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
    if not getattr(model.visual.transformer, "batch_first", True):
        raise RuntimeError("copatch needs open_clip >= 2.32 (batch-first transformer blocks); "
                           f"found open_clip {open_clip.__version__}: pip install 'open_clip_torch>=2.32,<4'.")
    return model.eval().requires_grad_(False)


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
