"""A proposal cache that cannot hand one image's masks to another: what any proposer stores on disk.

A proposer (Mask2Former, SAM, ...) given a `cache_dir` keeps the proposals it computed so that a
later run over the same images does not recompute them. Image ids alone do not identify an image:
Visual Genome (PhraseCut) ids collide with COCO ids, a dataset can be re-encoded, and the masks also
depend on the proposer's settings. So every entry is keyed by all of what determines it:

- the proposer's settings: `settings` (a small JSON-able dict, e.g. generator name, threshold,
  resize, dtype) -> a digest `sha1(canonical JSON)[:16]` that names a sub-folder of `root`, so that
  proposals made with other settings live apart and are never mixed;
- the image id: the file name `<image_id>.json`, as in the stored-proposal format;
- the image's content: `image_sha1`, the sha1 of the `[3, H, W] uint8` bytes and their shape,
  recorded in the entry and compared on every load.

Layout::

    <root>/<settings digest>/settings.json      # the settings, readable: what this folder holds
    <root>/<settings digest>/<image_id>.json    # stored-proposal format (copatch.proposals) plus
                                                #   "image_sha1": "...", "settings_digest": "..."

Each `<root>/<settings digest>/` folder is a stored-proposal folder: `StoredProposals(folder)` reads
it (the two extra keys are ignored there). `ProposalCache.folder` is that path.

On `load`:
- no entry -> None (compute, then `save`);
- an entry whose `image_sha1` differs (another image with the same id, e.g. a PhraseCut image in
  a cache shared with RefCOCO, or an image file that changed) -> a warning naming the entry, and
  None: the caller recomputes and `save` overwrites it. The other image's masks are never returned.
- an entry (or `settings.json`) recording other settings than ours -> `UserValueError` naming it
  (only a copied or hand-edited folder can get there);
- an entry with no `image_sha1` / `settings_digest` -> `UserValueError` naming it.

Old caches: copatch before this module wrote `<root>/<image_id>.json` and
`<root>/_mask2former_settings.json` with no content hash, so their masks cannot be checked against
the image; a `root` holding such files is refused (`UserValueError`, at construction) with a message
naming the folder and saying to delete those files or pick another `cache_dir`.

The dataset is not part of the key: the content hash alone tells colliding ids apart, so the
answer is always right. Two datasets sharing one `cache_dir` only cost recomputation for their
colliding ids (each run overwrites the other's entry, with a warning); give each dataset its own
`cache_dir` to keep both.

Cost of the content hash (sha1 of the uint8 bytes, one CPU core): 1 ms at 640 x 480, 90 ms at
4000 x 3000 (`image_sha1`).

    cache = ProposalCache("data/proposals/sam", {"generator": "sam", "points_per_side": 32})
    proposals = cache.load(image_id, image)        # image: [3, H, W] uint8; None on a miss
    if proposals is None:
        proposals = compute(image)
        cache.save(image_id, image, proposals)

Background writes (`background=True`, what Mask2Former and SAM use): encoding an entry costs its
image's hash, the masks' copy to the CPU and their RLE encoding, then the JSON write (measured on 2 CPU
cores for 200 masks of 480 x 640: about 90 ms to encode, 140 ms to write), which in the main process
would cap an on-the-fly run near 7-10 images/s. With `background=True`, `save` only queues the entry
(a bounded queue of `MAX_PENDING` entries: a full queue makes `save` wait, so memory stays bounded)
and one writer thread per process does the rest. What it promises:

- nothing torn: each entry is written to a hidden temporary file and renamed over `<image_id>.json`
  (atomic), so a crash or a kill at any moment leaves either the old entry, the new one, or none,
  never a partial one (an interrupted write can leave a `.<image_id>.json.*.tmp` file, which nothing
  reads; delete such files at leisure);
- nothing lost at a clean end: `flush_writes()` waits for every queued entry (`CoPatch` calls it at
  the end of each predict run; `ProposalCache.flush()` / `close()` do the same, and so does the
  interpreter's exit);
- errors surfaced: a failed write (disk full, permissions) is raised as `ProposalCacheWriteError`,
  naming the entry, by the next `save`, `flush` or `close` (so by the end of the predict run at the
  latest), never swallowed;
- reads see the writes: a `load` (or a new `ProposalCache` over the same folder) of an entry still in
  the queue waits for it first.

The tensors handed to `save` are read by the writer thread later: they must not be changed in place
afterwards (proposers return fresh tensors; nothing in copatch writes into them).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import queue
import tempfile
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from copatch.errors import UserError, UserValueError
from copatch.proposals import Proposals, StoredProposals

__all__ = ["ProposalCache", "ProposalCacheWriteError", "flush_writes", "image_sha1", "settings_digest",
           "SETTINGS_FILE", "MAX_PENDING"]

log = logging.getLogger("copatch")

# The settings of a digest folder, for people (and checked on the first load or save).
SETTINGS_FILE = "settings.json"
# Keys this module adds to each stored-proposal record.
_HASH_KEY = "image_sha1"
_DIGEST_KEY = "settings_digest"


def image_sha1(image: Tensor) -> str:
    """sha1 hex digest of a `[3, H, W] uint8` image: its shape and its bytes (C, H, W order).

    The shape goes in so that the same bytes read as another size never match. Cost on one CPU
    core (hashlib sha1, ~400 MB/s; measured): 1.0 ms at 640 x 480 and 90 ms at 4000 x 3000 (36 MB),
    1.4 / 135 ms for a channels-last view (`permute(2, 0, 1)` of a decoded image), which is copied
    first; a GPU image is copied to the CPU first. Against a proposer's forward (Mask2Former: seconds
    on CPU, ~0.1 s on a GPU) it is small at dataset sizes (RefCOCO 640 x 480, VG ~800 x 600).
    """
    if image.ndim != 3 or image.dtype != torch.uint8:
        raise ValueError(f"the image must be [3, H, W] uint8, got {tuple(image.shape)} {image.dtype}")
    # numpy's copy of a channels-last view (`permute(2, 0, 1)` of a decoded image) is ~4x faster
    # than torch's `.contiguous()` for uint8; a contiguous image is hashed in place.
    pixels = np.ascontiguousarray(image.detach().cpu().numpy())
    digest = hashlib.sha1("x".join(str(int(n)) for n in pixels.shape).encode("ascii") + b":")
    digest.update(memoryview(pixels).cast("B"))
    return digest.hexdigest()


def _canonical(settings: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(settings), sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"proposal cache settings must be JSON-able (str/int/float/bool/None): {err}") from err


def settings_digest(settings: Mapping[str, Any]) -> str:
    """16 hex digits naming `settings` (sha1 of the canonical JSON: sorted keys, no spaces)."""
    return hashlib.sha1(_canonical(settings).encode("utf-8")).hexdigest()[:16]


def _write_json_atomic(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # atomic: concurrent ranks write the same content
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _refuse_old_layout(root: Path) -> None:
    """Refuse a `root` holding entries of the old layout (`<root>/<image_id>.json`, no content hash)."""
    if not root.is_dir():
        return
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.endswith(".json") and not entry.name.startswith(".") and entry.is_file():
                raise UserValueError(
                    f"the proposal cache {root} holds proposals cached by an older copatch "
                    f"(e.g. {Path(entry.path).name}) with no record of the image they were made "
                    "from, so they cannot be trusted (image ids of different datasets collide). "
                    f"Delete the *.json files directly in {root} (or the folder), or choose another "
                    "cache_dir; the proposals are recomputed into a checked cache."
                )


# Entries queued for the writer thread at most. Each holds its masks until written (200 masks of
# 480 x 640 are 61 MB, on the GPU when the proposer runs there); a full queue makes `save` wait.
MAX_PENDING = 8


class ProposalCacheWriteError(UserError, OSError):
    """The background writer could not write a proposal cache entry (disk full, permissions, ...)."""


class _Writer:
    """The background writer of a process: one daemon thread, a bounded queue, the paths still queued
    (so that a read of one waits for it) and the errors not yet raised (see the module docstring)."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue(MAX_PENDING)
        self._cond = threading.Condition()
        self._pending: dict[Path, int] = {}
        self._errors: list[ProposalCacheWriteError] = []
        self._thread: threading.Thread | None = None

    def submit(self, path: Path, job: Any) -> None:
        """Queue `job()` (which writes `path`); waits while the queue is full."""
        self.raise_errors()
        with self._cond:
            self._pending[path] = self._pending.get(path, 0) + 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="copatch-proposal-cache-writer",
                                                daemon=True)
                self._thread.start()
        self._queue.put((path, job))

    def _run(self) -> None:
        while True:
            path, job = self._queue.get()
            try:
                job()
            except BaseException as err:  # noqa: BLE001 - handed to the main thread, never swallowed
                error = ProposalCacheWriteError(
                    f"could not write the proposal cache entry {path} ({type(err).__name__}: {err}). The "
                    "predictions are not affected, but this image's proposals are not cached: free disk "
                    f"space or fix the permissions of {path.parent}, or run without cache_dir."
                )
                error.__cause__ = err
                with self._cond:
                    self._errors.append(error)
            finally:
                del job
                with self._cond:
                    left = self._pending[path] - 1
                    if left:
                        self._pending[path] = left
                    else:
                        del self._pending[path]
                    self._cond.notify_all()

    def wait(self, path: Path | None = None, under: Path | None = None) -> None:
        """Wait until `path` (or every queued path under `under`, or every queued path) is written."""
        def busy() -> bool:
            if path is not None:
                return path in self._pending
            if under is not None:
                return any(p.is_relative_to(under) for p in self._pending)
            return bool(self._pending)

        with self._cond:
            while busy():
                self._cond.wait()

    def raise_errors(self) -> None:
        """Raise the first write error not raised yet (naming how many more there were)."""
        with self._cond:
            errors, self._errors = self._errors, []
        if errors:
            first = errors[0]
            if len(errors) > 1:
                first.args = (f"{first.args[0]} ({len(errors) - 1} more entries failed after it)",)
            raise first


_WRITER: _Writer | None = None
_WRITER_LOCK = threading.Lock()


def _writer() -> _Writer:
    global _WRITER
    with _WRITER_LOCK:
        if _WRITER is None:
            _WRITER = _Writer()
        return _WRITER


def flush_writes() -> None:
    """Wait until every proposal cache entry queued in this process is on disk; raise the first write
    error (`ProposalCacheWriteError`) not raised yet. Cheap when nothing is queued."""
    writer = _WRITER
    if writer is not None:
        writer.wait()
        writer.raise_errors()


def _flush_at_exit() -> None:
    writer = _WRITER
    if writer is None:
        return
    writer.wait()
    try:
        writer.raise_errors()
    except ProposalCacheWriteError as err:
        log.error("%s", err)


def _forget_writer_in_child() -> None:
    # A forked child (a DataLoader worker) has no writer thread; its copy of the queue belongs to the parent.
    global _WRITER, _WRITER_LOCK
    _WRITER, _WRITER_LOCK = None, threading.Lock()


atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_writer_in_child)


class ProposalCache:
    """Proposals on disk keyed by settings, image id and image content (see the module docstring).

    Args:
        root: the cache folder (a proposer's `cache_dir`); created on the first `save`.
        settings: what determines the masks besides the image, JSON-able (str / int / float / bool
            / None values, nested lists or dicts allowed). Put in everything that changes a mask.
        background: `save` queues the entry for this process's writer thread and returns at once
            (module docstring: atomic, flushed by `flush` / `close` / `flush_writes`, errors raised by
            the next `save` or `flush`); False writes it before `save` returns.

    Raises:
        UserValueError: `root` holds an old-layout cache (entries without a content hash).
    """

    def __init__(self, root: str | os.PathLike, settings: Mapping[str, Any], background: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.background = background
        # A JSON round trip: what is compared later is exactly what was (or will be) written.
        self.settings: dict[str, Any] = json.loads(_canonical(settings))
        self.digest = settings_digest(self.settings)
        self._store = StoredProposals(self.folder, decode_in_workers=False)
        self._folder_checked = False
        if _WRITER is not None:  # what this process still has queued under root is part of the folder
            _WRITER.wait(under=self.root)
        _refuse_old_layout(self.root)

    def __repr__(self) -> str:
        return f"ProposalCache({str(self.root)!r}, digest={self.digest})"

    @property
    def folder(self) -> Path:
        """`<root>/<settings digest>`: a stored-proposal folder (`StoredProposals(folder)` reads it)."""
        return self.root / self.digest

    def path(self, image_id: int | str) -> Path:
        """Where the entry of `image_id` lives (whether it exists or not)."""
        return self._store.path(image_id)

    def _check_folder(self, create: bool) -> None:
        """Refuse a digest folder whose `settings.json` is not ours; write it when `create`."""
        if self._folder_checked:
            return
        path = self.folder / SETTINGS_FILE
        if path.is_file():
            try:
                theirs = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise UserValueError(
                    f"cannot read the proposal cache settings {path} ({err}): delete {self.folder} "
                    "to recompute its proposals"
                ) from err
            if theirs != self.settings:
                diff = {k: (theirs.get(k), self.settings.get(k))
                        for k in sorted(set(theirs) | set(self.settings))
                        if theirs.get(k) != self.settings.get(k)}
                raise UserValueError(
                    f"the proposal cache folder {self.folder} records other settings than this "
                    f"proposer's (cached vs now: {diff}), although its name is their digest: it was "
                    f"copied or edited by hand. Delete {self.folder} to recompute its proposals."
                )
        elif create:
            _write_json_atomic(path, self.settings)
        else:
            return  # nothing cached yet: check again on the next call
        self._folder_checked = True

    def load(self, image_id: int | str, image: Tensor) -> Proposals | None:
        """The cached proposals of this image (`[N, H, W]` bool masks on the CPU), or None on a miss.

        Args:
            image_id: the dataset's image id.
            image: `[3, H, W] uint8`, the image the proposals are for (any device).

        Returns None, with a warning naming the entry, when the entry of `image_id` was made from
        another image (different content); raises `UserValueError` naming the entry when it lacks
        the checks or records other settings.
        """
        path = self.path(image_id)
        if _WRITER is not None:  # an entry still queued (this or another cache of the process): wait for it
            _WRITER.wait(path=path)
        if not path.is_file():
            return None
        self._check_folder(create=False)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise UserValueError(
                f"corrupt proposal cache entry {path} ({type(err).__name__}: {err}): delete it to "
                "recompute it"
            ) from err
        theirs_hash, theirs_digest = record.get(_HASH_KEY), record.get(_DIGEST_KEY)
        if not isinstance(theirs_hash, str) or not isinstance(theirs_digest, str):
            raise UserValueError(
                f"proposal cache entry {path} records no image content hash or settings digest "
                f"({_HASH_KEY!r}, {_DIGEST_KEY!r}): it was not written by ProposalCache, so it "
                "cannot be checked against the image. Delete it to recompute it."
            )
        if theirs_digest != self.digest:
            raise UserValueError(
                f"proposal cache entry {path} was made with other settings (digest "
                f"{theirs_digest}, this proposer's is {self.digest}): it was copied or moved by "
                f"hand. Delete it to recompute it."
            )
        ours_hash = image_sha1(image)
        if theirs_hash != ours_hash:
            warnings.warn(
                f"proposal cache entry {path} holds another image with id {image_id!r} (content "
                f"sha1 {theirs_hash[:12]}..., this image {ours_hash[:12]}...): another dataset "
                "with colliding image ids shares this cache_dir, or the image file changed. Not "
                "using it; the proposals are recomputed and overwrite it (give each dataset its "
                "own cache_dir to keep both).",
                stacklevel=2,
            )
            return None
        return self._store.load(image_id, size=(int(image.shape[-2]), int(image.shape[-1])))

    def save(self, image_id: int | str, image: Tensor, proposals: Proposals) -> Path:
        """Store `proposals` (`[N, H, W]` bool at the image's size) for this image; returns the path.

        Atomic (a concurrent reader never sees a partial file); overwrites an entry for another
        image with the same id. With `background`, the entry is queued and written by the writer
        thread (the returned path exists once `flush` returns); a write error of an earlier entry is
        raised here (`ProposalCacheWriteError`). `image` and `proposals` must then not be changed in
        place.
        """
        size = (int(image.shape[-2]), int(image.shape[-1]))
        if tuple(proposals.masks.shape[-2:]) != size:
            raise ValueError(
                f"proposals of image {image_id!r} are {tuple(proposals.masks.shape[-2:])} but the "
                f"image is {size}: cache them at the original image size"
            )
        path = self.path(image_id)  # validates the id as a file name before anything is written
        self._check_folder(create=True)
        if not self.background:
            return self._write(image_id, image, proposals)
        _writer().submit(path, lambda: self._write(image_id, image, proposals))
        return path

    def _write(self, image_id: int | str, image: Tensor, proposals: Proposals) -> Path:
        """Hash, RLE-encode and write one entry (atomic: temporary file, then rename)."""
        extra = {_HASH_KEY: image_sha1(image), _DIGEST_KEY: self.digest}
        return self._store.write(image_id, proposals, extra=extra)

    def flush(self) -> None:
        """Wait until every entry this process queued (this cache's and any other's) is on disk; raise the
        first write error not raised yet (`ProposalCacheWriteError`). Nothing to do without `background`."""
        flush_writes()

    def close(self) -> None:
        """`flush`; the cache stays usable (the writer thread is shared and lives with the process)."""
        self.flush()
