"""CLIP checkpoints are memory-mapped and assigned (`copatch.clip_model.load_weights`): the same model as
open_clip's own loading, `torch.load(mmap=True, weights_only=True)`, and no second copy in memory."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import open_clip
import pytest
import torch

from copatch.clip_model import create_clip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_config):
    """A random-weights checkpoint of the tiny test CLIP, written by the test."""
    torch.manual_seed(3)
    model = create_clip("ignored", model_config=tiny_config)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path, model


def _equal_models(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def test_the_checkpoint_is_memory_mapped_and_gives_open_clips_model(checkpoint, tiny_config, monkeypatch, caplog):
    path, original = checkpoint
    calls = []
    real_load = torch.load

    def spying_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spying_load)
    with caplog.at_level(logging.WARNING):
        loaded = create_clip("ignored", str(path), model_config=tiny_config)
    assert calls and all(c.get("mmap") is True and c.get("weights_only") is True for c in calls)
    assert not any("No pretrained weights loaded" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(torch, "load", real_load)
    reference = open_clip.create_model("tiny-clip-b32", pretrained=str(path), precision="fp32").eval()
    _equal_models(loaded, original)
    _equal_models(loaded, reference)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    # The weights are the file's pages (assigned, not copied into the random init).
    assert not loaded.visual.conv1.weight.untyped_storage().resizable()
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(image), reference.encode_image(image), rtol=0, atol=0)


def test_wrapped_fp16_and_legacy_checkpoints(checkpoint, tiny_config, tmp_path):
    path, original = checkpoint
    state = original.state_dict()
    wrapped = tmp_path / "wrapped.pt"  # a training checkpoint of a DDP model: state_dict + "module." prefix
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    _equal_models(create_clip("ignored", str(wrapped), model_config=tiny_config), original)

    half = tmp_path / "half.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, half)
    from_half = create_clip("ignored", str(half), model_config=tiny_config)
    assert all(p.dtype == torch.float32 for p in from_half.parameters())
    torch.testing.assert_close(from_half.visual.conv1.weight, original.visual.conv1.weight.half().float(),
                               rtol=0, atol=0)

    legacy = tmp_path / "legacy.pt"  # the pre-1.6 format cannot be memory-mapped: read plainly
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    _equal_models(create_clip("ignored", str(legacy), model_config=tiny_config), original)


PEAK = textwrap.dedent("""
    import gc, sys, torch
    import open_clip
    from copatch.clip_model import create_clip
    name, path = sys.argv[1:]

    def status(key):  # kB in /proc/self/status
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

    def extra_peak(load):
        # The peak RSS of `load()` above the RSS before it: the high-water mark is reset first
        # (`5` into /proc/self/clear_refs, Linux >= 4.0).
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
        model = load()
        peak = status("VmHWM") - before
        del model
        gc.collect()
        return peak

    print(extra_peak(lambda: open_clip.create_model(name)),
          extra_peak(lambda: create_clip(name, path)),
          extra_peak(lambda: open_clip.create_model(name, pretrained=path, precision="fp32")))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="measures with Linux's /proc/self/clear_refs")
def test_peak_host_memory_stays_near_one_copy(tmp_path):
    """A ViT-S/16 random checkpoint (~240 MB; measured for ViT-B/16's 571 MB file as well, README): the mmap
    + assign load needs no more memory than building the model at all, open_clip's own load a second copy.
    One fresh process, the three loads in turn, each measured by its own peak RSS above the RSS before it."""
    name, path = "ViT-S-16", tmp_path / "vits16.pt"
    torch.manual_seed(0)
    torch.save(open_clip.create_model(name).state_dict(), path)
    size = path.stat().st_size
    # A fixed mmap threshold: every large block is its own mapping, handed back to the system when freed, so
    # a later load cannot reuse memory an earlier one left behind (glibc's default threshold grows).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", PEAK, name, str(path)], capture_output=True, text=True,
                         check=True, timeout=600, env=env)
    base, ours, theirs = (int(v) for v in out.stdout.split()[-3:])
    print(f"file {size / 2**20:.0f} MiB; peak RSS above the imports: random model {base / 2**20:.0f} MiB, "
          f"copatch load {ours / 2**20:.0f} MiB, open_clip load {theirs / 2**20:.0f} MiB")
    assert ours - base < 0.25 * size
    assert theirs - base > 0.75 * size
