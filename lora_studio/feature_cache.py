"""Cached frozen features: what the frozen lower blocks make of each example, computed once.

With LoRA on the top N blocks only, the blocks below are a fixed function of the tokens (no
dropout, no adapter): their output for an example is the same in every epoch. So it is computed
the first time the example comes up, without gradients, and read from here every time after.
Filling as batches come (rather than in a pass before training) means the first epoch costs what
the plain path costs, a short run never pays for rows it does not reach, and each row's values
are computed in the very batch the plain path would compute them in.

Storage is fp16 (fp32 once a value falls outside fp16's range), one row per example, in memory
up to MEMORY_LIMIT_BYTES and past that in a memory-mapped file. A complete file is kept under the
studio home, keyed by everything the values depend on (the exact token ids, the base weights, the
number of blocks, the weights' dtype, autocast, device kind, quantization, the library versions):
a change to any of them means a new cache, and a resumed or repeated run with the same key reads
the file instead of computing.

A kept cache proves what it serves: its `meta.json` holds the values' SHA-256, checked (with
every value finite) each time the cache is opened. A cache that fails a check (a file overwritten,
truncated or garbled, non-finite values) is logged in one line, moved aside and rebuilt. A cache
is filled in a private temporary folder and renamed into place whole, so two runs filling the
same cache at once never see each other's unfinished file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .home import studio_home

log = logging.getLogger(__name__)

MEMORY_LIMIT_BYTES = 1 << 30  # past 1 GiB, features live on disk (memory-mapped) instead of in RAM
KEEP_ON_DISK = 3  # complete disk caches kept (most recently used); older ones are deleted
FP16_MAX = 65000.0  # just under fp16's largest finite value (65504)
FORMAT = 2  # of the folder (meta.json + values.bin); part of every key
CHECK_CHUNK_BYTES = 64 << 20  # the checksum and finiteness pass reads this much at a time
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32}

# (input_ids [batch, seq], attention_mask [batch, seq]) -> hidden states [batch, seq, dim]
LowerBlocks = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cache_key(token_rows: Sequence[Sequence[int]], **identity: object) -> str:
    """A hash of the exact token ids and of everything else the features depend on."""
    identity = {**identity, "format": FORMAT}
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for ids in token_rows:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:24]


class FeatureCache:
    """Per-example lower-block features, filled on first use: row i is values[offsets[i]:offsets[i + 1]]."""

    def __init__(
        self,
        key: str,
        token_rows: Sequence[Sequence[int]],
        dim: int,
        lower: LowerBlocks,
        limit_bytes: int | None = None,
    ):
        self.token_rows, self.dim, self.lower = token_rows, dim, lower
        self.offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in token_rows])]).tolist()
        self.folder = studio_home() / "feature-cache" / key  # where a complete disk cache lives
        limit = MEMORY_LIMIT_BYTES if limit_bytes is None else limit_bytes
        self.on_disk = self.offsets[-1] * dim * 2 > limit
        self._tmp: Path | None = None  # the disk cache being filled, renamed to `folder` when complete
        self._drop_tmp: weakref.finalize | None = None  # removes an unfinished one when the run ends
        if not ((self.folder / "meta.json").is_file() and self._open_complete()):
            self._allocate(torch.float16)
        log.info(
            "cached features: %d examples, %d tokens, %s %s",
            len(token_rows),
            self.offsets[-1],
            "read from" if self.filled.all() else "filled as they come, in",
            self.folder if self.on_disk else "memory",
        )

    @property
    def location(self) -> str:
        return str(self.folder) if self.on_disk else "memory"

    def rows(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """The features of these examples, computing (in one batch) those not cached yet."""
        missing = [i for i in dict.fromkeys(indices) if not self.filled[i]]
        if missing:
            self._fill(missing)
        return [self.values[self.offsets[i] : self.offsets[i + 1]] for i in indices]

    # --- filling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _fill(self, indices: list[int]) -> None:
        width = max(len(self.token_rows[i]) for i in indices)
        ids = torch.zeros(len(indices), width, dtype=torch.long)
        mask = torch.zeros(len(indices), width, dtype=torch.long)
        for j, i in enumerate(indices):  # right padding: real tokens never attend to the padding
            ids[j, : len(self.token_rows[i])] = torch.as_tensor(self.token_rows[i])
            mask[j, : len(self.token_rows[i])] = 1
        hidden = self.lower(ids, mask).float().cpu()
        if self.values.dtype == torch.float16 and not (hidden.abs() <= FP16_MAX).all():
            log.info("cached features: a value exceeds fp16's range, storing fp32 instead")
            self._allocate(torch.float32, keep=self.values)
        for j, i in enumerate(indices):
            self.values[self.offsets[i] : self.offsets[i + 1]] = hidden[j, : len(self.token_rows[i])]
            self.filled[i] = True
        if self.on_disk and self.filled.all():
            self._publish()

    def _allocate(self, dtype: torch.dtype, keep: torch.Tensor | None = None) -> None:
        shape = (self.offsets[-1], self.dim)
        if not self.on_disk:
            self.values = torch.zeros(shape, dtype=dtype)
        else:
            self.close()  # an fp16 file being replaced: its mapping stays readable until `keep` goes
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}-", dir=self.folder.parent))
            self._drop_tmp = weakref.finalize(self, shutil.rmtree, self._tmp, ignore_errors=True)
            array = np.memmap(self._tmp / "values.bin", dtype=_NUMPY[dtype], mode="w+", shape=shape)
            self._array, self.values = array, torch.from_numpy(array)
        if keep is None:
            self.filled = np.zeros(len(self.token_rows), dtype=bool)
        else:
            self.values.copy_(keep.to(dtype))

    def _publish(self) -> None:
        """Rename the finished file's folder into place (a cache on disk is always whole)."""
        self._array.flush()
        digest, finite = _checksum(self._tmp / "values.bin", self.values.dtype)
        if not finite:  # the lower blocks made inf or nan: keep nothing another run would trust
            log.warning("cached features: the lower blocks gave non-finite values; not kept on disk")
            return
        meta = {
            "offsets": self.offsets,
            "dim": self.dim,
            "dtype": str(self.values.dtype).removeprefix("torch."),
            "sha256": digest,
            "key": self.folder.name,
        }
        (self._tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(self._tmp, self.folder)
        except OSError:  # a concurrent run published the same cache first: ours is identical
            pass
        self.close()
        log.info("cached features: complete, kept in %s for runs with the same data and base", self.folder)
        _clean_up(self.folder.parent)

    def _open_complete(self) -> bool:
        """Serve the kept cache if it passes every check; else log why, move it aside and return False."""
        try:
            dtype = self._verify()
            array = np.memmap(
                self.folder / "values.bin", dtype=_NUMPY[dtype], mode="c", shape=(self.offsets[-1], self.dim)
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("cached features: %s is damaged (%s); rebuilding it", self.folder, e)
            _discard(self.folder)
            return False
        self.values, self.on_disk = torch.from_numpy(array), True
        self.filled = np.ones(len(self.token_rows), dtype=bool)
        os.utime(self.folder)  # most recently used: kept by the clean-up
        return True

    def _verify(self) -> torch.dtype:
        """The stored dtype, once meta.json matches this cache and values.bin its checksum, all finite."""
        meta = json.loads((self.folder / "meta.json").read_text())  # a ValueError when garbled
        if meta["key"] != self.folder.name or meta["offsets"] != self.offsets or meta["dim"] != self.dim:
            raise ValueError("meta.json describes other data")
        dtype = {"float16": torch.float16, "float32": torch.float32}[meta["dtype"]]
        size = (self.folder / "values.bin").stat().st_size
        expected = self.offsets[-1] * self.dim * _NUMPY[dtype]().itemsize
        if size != expected:
            raise ValueError(f"values.bin holds {size} bytes, expected {expected}")
        digest, finite = _checksum(self.folder / "values.bin", dtype)
        if digest != meta["sha256"]:
            raise ValueError("values.bin does not match its checksum")
        if not finite:
            raise ValueError("values.bin holds non-finite values")
        return dtype

    def close(self) -> None:
        """Drop an unfinished disk cache (a run that ended before every example came up)."""
        if self._drop_tmp is not None:
            self._drop_tmp()
        self._tmp = self._drop_tmp = None


def _checksum(path: Path, dtype: torch.dtype) -> tuple[str, bool]:
    """(SHA-256 of the file, whether every value is finite), in one pass of bounded memory."""
    h, finite, item = hashlib.sha256(), True, _NUMPY[dtype]().itemsize
    with open(path, "rb") as f:
        while chunk := f.read(CHECK_CHUNK_BYTES - CHECK_CHUNK_BYTES % item):
            h.update(chunk)
            finite = finite and bool(np.isfinite(np.frombuffer(chunk, dtype=_NUMPY[dtype])).all())
    return h.hexdigest(), finite


def _discard(folder: Path) -> None:
    """Move a damaged cache out of the way at once (a rename: atomic), then delete it."""
    aside = folder.with_name(f".damaged-{folder.name}-{os.getpid()}")
    try:
        os.rename(folder, aside)
    except OSError:  # another run moved it first
        return
    shutil.rmtree(aside, ignore_errors=True)


def _clean_up(root: Path) -> None:
    """Keep the KEEP_ON_DISK most recently used caches (an open memory map survives deletion)."""
    caches = sorted(
        (p for p in root.iterdir() if not p.name.startswith(".") and (p / "meta.json").is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    for old in caches[:-KEEP_ON_DISK]:
        shutil.rmtree(old, ignore_errors=True)
        log.info("cached features: removed the least recently used %s", old)
