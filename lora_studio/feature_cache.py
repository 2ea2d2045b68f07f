"""Cached frozen features: what the frozen lower blocks make of each example, computed once.

With LoRA on the top N blocks only, the blocks below are a fixed function of the tokens (no
dropout, no adapter): their output for an example is the same in every epoch. So it is computed
once, without gradients, and training reads it from here instead of running those blocks again.

Storage is fp16 (fp32 if a value does not fit fp16's range), one row per example, in memory up
to MEMORY_LIMIT_BYTES and past that in a memory-mapped file under the studio home, keyed by
everything the values depend on (the exact token ids, the base weights, the number of blocks,
the compute dtype, the library versions): a change to any of them builds a new cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from .home import studio_home

log = logging.getLogger(__name__)

MEMORY_LIMIT_BYTES = 1 << 30  # past 1 GiB, features live on disk (memory-mapped) instead of in RAM
KEEP_ON_DISK = 3  # disk caches kept (most recently used); older ones are deleted
BATCH_TOKENS = 4096  # tokens per forward pass while building
FP16_MAX = 65000.0  # just under fp16's largest finite value (65504)
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32}

# (input_ids [batch, seq], attention_mask [batch, seq]) -> hidden states [batch, seq, dim]
LowerBlocks = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FeatureTable:
    """Per-example hidden states stored end to end: row i is values[offsets[i]:offsets[i + 1]]."""

    def __init__(self, values: torch.Tensor, offsets: Sequence[int], location: str):
        self.values = values
        self.offsets = list(offsets)
        self.location = location  # "memory" or the cache folder

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def row(self, i: int) -> torch.Tensor:
        return self.values[self.offsets[i] : self.offsets[i + 1]]


def cache_key(token_rows: Sequence[Sequence[int]], **identity: object) -> str:
    """A hash of the exact token ids and of everything else the features depend on."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for ids in token_rows:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:24]


def load_or_build(
    key: str,
    token_rows: Sequence[Sequence[int]],
    lower: LowerBlocks,
    dim: int,
    limit_bytes: int | None = None,
) -> FeatureTable:
    """The features of `token_rows`: from the disk cache when `key` is there, else built now."""
    limit = MEMORY_LIMIT_BYTES if limit_bytes is None else limit_bytes
    offsets = np.concatenate([[0], np.cumsum([len(ids) for ids in token_rows])]).tolist()
    folder = studio_home() / "feature-cache" / key
    if (folder / "meta.json").is_file():
        table = _open(folder)
        os.utime(folder)  # most recently used: kept by the clean-up
        log.info("cached features: reusing %s", folder)
        return table
    started = time.perf_counter()
    on_disk = offsets[-1] * dim * 2 > limit
    table = _build(token_rows, offsets, lower, dim, folder if on_disk else None)
    log.info(
        "cached features of %d examples (%d tokens, %s, %s) in %.1f s",
        len(token_rows),
        offsets[-1],
        str(table.values.dtype).removeprefix("torch."),
        table.location,
        time.perf_counter() - started,
    )
    return table


def _build(
    token_rows: Sequence[Sequence[int]],
    offsets: list[int],
    lower: LowerBlocks,
    dim: int,
    folder: Path | None,
) -> FeatureTable:
    """Run the lower blocks over all rows; fp16 storage, or fp32 when a value does not fit fp16."""
    for dtype in (torch.float16, torch.float32):
        if folder is None:
            store = torch.empty(offsets[-1], dim, dtype=dtype)
            if _fill(store, token_rows, offsets, lower):
                return FeatureTable(store, offsets, "memory")
        else:
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
            try:
                array = np.memmap(
                    tmp / "values.bin", dtype=_NUMPY[dtype], mode="w+", shape=(offsets[-1], dim)
                )
                if _fill(torch.from_numpy(array), token_rows, offsets, lower):
                    array.flush()
                    return _publish(tmp, folder, offsets, dim, dtype)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("a feature exceeds fp16's range: storing fp32 instead")
    raise AssertionError("fp32 storage cannot overflow")


@torch.no_grad()
def _fill(
    store: torch.Tensor, token_rows: Sequence[Sequence[int]], offsets: list[int], lower: LowerBlocks
) -> bool:
    """Write every row's features into `store`; False if one does not fit its dtype."""
    limit = FP16_MAX if store.dtype == torch.float16 else float("inf")
    order = sorted(range(len(token_rows)), key=lambda i: -len(token_rows[i]))
    for batch in _batches(order, token_rows):
        width = len(token_rows[batch[0]])  # longest first
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros(len(batch), width, dtype=torch.long)
        for j, i in enumerate(batch):  # right padding: real tokens never attend to the padding
            ids[j, : len(token_rows[i])] = torch.as_tensor(token_rows[i])
            mask[j, : len(token_rows[i])] = 1
        hidden = lower(ids, mask).float().cpu()
        for j, i in enumerate(batch):
            row = hidden[j, : len(token_rows[i])]
            if not torch.isfinite(row).all() or row.abs().max() > limit:
                return False
            store[offsets[i] : offsets[i + 1]] = row.to(store.dtype)
    return True


def _batches(order: list[int], token_rows: Sequence[Sequence[int]]) -> list[list[int]]:
    batches: list[list[int]] = []
    for i in order:
        if batches and len(token_rows[batches[-1][0]]) * (len(batches[-1]) + 1) <= BATCH_TOKENS:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def _publish(tmp: Path, folder: Path, offsets: list[int], dim: int, dtype: torch.dtype) -> FeatureTable:
    """Rename the finished folder into place (so a cache on disk is always whole) and open it."""
    meta = {"offsets": offsets, "dim": dim, "dtype": str(dtype).removeprefix("torch.")}
    (tmp / "meta.json").write_text(json.dumps(meta))
    try:
        os.rename(tmp, folder)
    except OSError:  # a concurrent run published the same cache first: use that one
        pass
    _clean_up(folder.parent)
    return _open(folder)


def _open(folder: Path) -> FeatureTable:
    meta = json.loads((folder / "meta.json").read_text())
    dtype = getattr(torch, meta["dtype"])
    array = np.memmap(
        folder / "values.bin", dtype=_NUMPY[dtype], mode="c", shape=(meta["offsets"][-1], meta["dim"])
    )
    return FeatureTable(torch.from_numpy(array), meta["offsets"], str(folder))


def _clean_up(root: Path) -> None:
    """Keep the KEEP_ON_DISK most recently used caches (an open memory map survives deletion)."""
    caches = sorted(
        (p for p in root.iterdir() if not p.name.startswith(".") and (p / "meta.json").is_file()),
        key=lambda p: p.stat().st_mtime,
    )
    for old in caches[:-KEEP_ON_DISK]:
        shutil.rmtree(old, ignore_errors=True)
        log.info("cached features: removed the least recently used %s", old)
