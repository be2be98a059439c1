"""Shared fixtures. Nothing here downloads: the CLIP is a tiny random open_clip config from
`tests/fixtures`, and datasets are written by code into tmp dirs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TINY_CONFIG = str(FIXTURES / "tiny-clip-b32.json")


@pytest.fixture(scope="session")
def tiny_backbone():
    """A 4-block ViT on a 4x4 grid (64 px, patch 16) with a 1-layer text tower, random weights."""
    from copatch.backbone import ClipBackbone

    torch.manual_seed(0)
    return ClipBackbone(model_config=TINY_CONFIG)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    """The toy REFER dataset (8 images), written once per session."""
    from copatch.datamodules.toy import write_toy_refer

    root = tmp_path_factory.mktemp("toy")
    write_toy_refer(root, num_images=8, seed=0)
    return root


@pytest.fixture(scope="session")
def tiny_config() -> str:
    """Path of the tiny open_clip JSON config."""
    return TINY_CONFIG
