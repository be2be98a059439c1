"""The proposal cache's background writer (`ProposalCache(background=True)`): off the main thread, bounded,
flushed, errors raised, and never a torn entry (a writer killed mid-write leaves the old entry or none)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from copatch import proposal_cache
from copatch.proposal_cache import ProposalCache, ProposalCacheWriteError, flush_writes
from copatch.proposals import Proposals, StoredProposals

SETTINGS = {"generator": "test", "threshold": 0.35}


def _image(seed: int, size: tuple[int, int] = (12, 16)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, *size), generator=gen, dtype=torch.uint8)


def _proposals(seed: int, size: tuple[int, int] = (12, 16), n: int = 4) -> Proposals:
    gen = torch.Generator().manual_seed(100 + seed)
    return Proposals(masks=torch.rand(n, *size, generator=gen) > 0.5, scores=torch.rand(n, generator=gen))


@pytest.fixture
def writer(monkeypatch):
    """A fresh writer for the test (the process-wide one stays untouched); drained at the end."""
    fresh = proposal_cache._Writer()
    monkeypatch.setattr(proposal_cache, "_WRITER", fresh)
    yield fresh
    fresh.wait()
    fresh._errors.clear()


def test_background_entries_equal_synchronous_ones_and_are_written_off_the_main_thread(tmp_path, writer,
                                                                                        monkeypatch):
    threads = []
    real = ProposalCache._write

    def recording(self, *args):
        threads.append(threading.current_thread().name)
        return real(self, *args)

    monkeypatch.setattr(ProposalCache, "_write", recording)
    inline = ProposalCache(tmp_path / "inline", SETTINGS)
    background = ProposalCache(tmp_path / "background", SETTINGS, background=True)
    for i in range(5):
        inline.save(i, _image(i), _proposals(i))
        assert background.save(i, _image(i), _proposals(i)) == background.path(i)
    background.flush()
    assert sorted(threads) == ["MainThread"] * 5 + ["copatch-proposal-cache-writer"] * 5
    for i in range(5):  # the same records, byte for byte
        assert background.path(i).read_bytes() == inline.path(i).read_bytes()
        assert torch.equal(background.load(i, _image(i)).masks, _proposals(i).masks)


def test_a_read_waits_for_a_queued_entry_and_the_queue_is_bounded(tmp_path, writer, monkeypatch):
    monkeypatch.setattr(proposal_cache, "MAX_PENDING", 2)
    bounded = proposal_cache._Writer()
    monkeypatch.setattr(proposal_cache, "_WRITER", bounded)
    gate = threading.Event()
    real = ProposalCache._write
    monkeypatch.setattr(ProposalCache, "_write", lambda self, *a: (gate.wait(10), real(self, *a))[1])
    cache = ProposalCache(tmp_path, SETTINGS, background=True)
    for i in range(3):  # one being written (held at the gate) + 2 queued: the queue is full now
        cache.save(i, _image(i), _proposals(i))
    fourth = threading.Thread(target=cache.save, args=(3, _image(3), _proposals(3)))
    fourth.start()
    time.sleep(0.3)
    assert fourth.is_alive(), "save must wait while MAX_PENDING entries are queued"
    assert not cache.path(0).exists()
    threading.Timer(0.3, gate.set).start()
    # A read of a queued entry (from a new cache object too) waits for it instead of missing it.
    assert torch.equal(ProposalCache(tmp_path, SETTINGS).load(3, _image(3)).masks, _proposals(3).masks)
    fourth.join(5)
    flush_writes()
    assert all(cache.path(i).is_file() for i in range(4))


def test_a_failed_write_is_raised_by_the_next_save_and_by_flush(tmp_path, writer, monkeypatch):
    cache = ProposalCache(tmp_path, SETTINGS, background=True)

    gate = threading.Event()

    def disk_full(image_id, proposals, extra=None):
        gate.wait(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache._store, "write", disk_full)
    cache.save(1, _image(1), _proposals(1))
    cache.save(2, _image(2), _proposals(2))
    gate.set()
    writer.wait()
    with pytest.raises(ProposalCacheWriteError, match="No space left") as err:
        cache.save(3, _image(3), _proposals(3))
    assert str(cache.path(1)) in str(err.value) and "1 more entries failed" in str(err.value)
    assert isinstance(err.value.__cause__, OSError)
    assert not writer._pending  # the save that raised queued nothing; saved again, it fails alike
    cache.save(3, _image(3), _proposals(3))
    with pytest.raises(ProposalCacheWriteError, match=str(cache.path(3))):
        cache.flush()
    cache.flush()  # each error is raised once


WRITE_THEN_DIE = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    import copatch.proposals as proposals_module
    from copatch.proposal_cache import ProposalCache
    from copatch.proposals import Proposals

    root = sys.argv[1]
    def image(seed):
        return torch.randint(0, 256, (3, 40, 50), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    def props(seed):
        gen = torch.Generator().manual_seed(seed)
        return Proposals(masks=torch.rand(30, 40, 50, generator=gen) > 0.5, scores=torch.rand(30, generator=gen))
    cache = ProposalCache(root, {"generator": "crash"}, background=True)
    cache.save(1, image(1), props(1))
    cache.flush()
    print("first entry written", flush=True)

    real_dump = json.dump
    def half_then_die(value, f, **kw):  # the writer thread dies half-way through the JSON
        text = json.dumps(value, **kw)
        f.write(text[: len(text) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    proposals_module.json.dump = half_then_die
    cache.save(1, image(1), props(2))   # an overwrite of the good entry, killed mid-write
    cache.save(2, image(2), props(3))   # never reached
    cache.flush()
    print("not reached", flush=True)
""")


def test_a_writer_killed_mid_write_leaves_no_torn_entry(tmp_path):
    root = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", WRITE_THEN_DIE, str(root)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "first entry written" in proc.stdout and "not reached" not in proc.stdout
    cache = ProposalCache(root, {"generator": "crash"})
    entries = sorted(p.name for p in cache.folder.iterdir())
    # The torn bytes are only in a hidden temporary file, which nothing reads.
    torn = [name for name in entries if name.endswith(".tmp")]
    assert len(torn) == 1 and torn[0].startswith(".1.json.")
    assert [n for n in entries if not n.startswith(".")] == ["1.json", "settings.json"]
    json.loads(cache.path(1).read_text())  # whole JSON
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 256, (3, 40, 50), generator=gen, dtype=torch.uint8)
    first = torch.rand(30, 40, 50, generator=torch.Generator().manual_seed(1)) > 0.5
    assert torch.equal(cache.load(1, image).masks, first), "the old entry survives the interrupted overwrite"
    assert cache.load(2, image) is None
    assert StoredProposals(cache.folder).exists(1) and not StoredProposals(cache.folder).exists(2)


class SlowCachingProposer:
    """A proposer writing through a background cache whose writes take a while."""

    def __init__(self, root: Path):
        self.cache = ProposalCache(root, SETTINGS, background=True)

    def __call__(self, sample):
        h, w = sample.size
        masks = torch.zeros(3, h, w, dtype=torch.bool)
        masks[0, : h // 2], masks[1, :, : w // 2], masks[2] = True, True, True
        proposals = Proposals(masks)
        self.cache.save(sample.image_id, sample.image, proposals)
        return proposals


@pytest.mark.slow
def test_predict_returns_only_once_the_cache_is_on_disk(tiny_config, toy_root, tmp_path, writer, monkeypatch):
    from lightning.pytorch import Trainer

    from copatch.datamodules.refer import ReferDataModule
    from copatch.module import CoPatch

    real = ProposalCache._write
    monkeypatch.setattr(ProposalCache, "_write", lambda self, *a: (time.sleep(0.2), real(self, *a))[1])
    torch.manual_seed(0)
    proposer = SlowCachingProposer(tmp_path / "cache")
    model = CoPatch(clip_config=tiny_config, exit_layer=1, gem_depth=3, gem_size=128, proposer=proposer)
    dm = ReferDataModule(str(toy_root), split="val", batch_size=2, limit=4)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            default_root_dir=str(tmp_path)).predict(model, datamodule=dm, return_predictions=False)
    dm.setup("predict")
    ids = [e.image_id for e in dm.dataset.entries]
    assert len(ids) == 4 and all(proposer.cache.path(i).is_file() for i in ids)
    assert not writer._pending
