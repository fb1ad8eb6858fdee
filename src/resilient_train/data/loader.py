"""Datasets, samplers and loaders whose output depends only on (seed, epoch, position).

Bit-exact resume needs three things from the data pipeline, and this module provides all of them:

* every clip is a pure function of where it comes from (``(seed, split, index)`` for the synthetic
  set, the file's bytes for a folder of videos: :mod:`.video`), never of how many clips were read before;
* the order of an epoch is a pure function of ``(seed, epoch)``, and a run resumed at batch ``b``
  sees exactly the remaining batches of that same order (:class:`ResumableSampler`);
* nothing here draws from the process-global generators (Python ``random``, NumPy, torch). In
  particular :func:`build_loader` gives the ``DataLoader`` its own ``torch.Generator``: without one,
  every ``iter(loader)`` draws the workers' base seed from the global torch RNG, which would make
  the model's random numbers depend on how many times a loader was iterated.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .synthetic import SyntheticVideoDataset, check_positive, mix_seed

if TYPE_CHECKING:
    from .probes import ProbeCache

__all__ = [
    "ResumableSampler",
    "SequentialResumableSampler",
    "build_data",
    "build_loader",
    "batches_per_epoch",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Samplers and loaders
# --------------------------------------------------------------------------------------------------


def _check_start(length: int, start_index: int) -> tuple[int, int]:
    length, start_index = int(length), int(start_index)
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if not 0 <= start_index <= length:
        raise ValueError(f"start_index must be in [0, {length}], got {start_index}")
    return length, start_index


class ResumableSampler(Sampler[int]):
    """A permutation of ``range(length)`` fixed by ``(seed, epoch)``, started at ``start_index``.

    The permutation comes from a private ``torch.Generator`` seeded from ``(seed, epoch)`` alone, so
    a run resumed at batch ``b`` with ``start_index = b * batch_size`` sees exactly the indices the
    uninterrupted run would have seen from that point on.

    With ranks (``world_size > 1``) every rank computes the same permutation and takes its own
    slice of each global batch: global batch ``g`` is ``perm[g*W*B : (g+1)*W*B]`` and rank ``r``
    reads ``perm[(g*W + r)*B : (g*W + r + 1)*B]`` (``B = batch_size``). ``start_index`` is then
    ``b * W * B``; only whole global batches are yielded, so every rank runs the same number of steps.
    """

    def __init__(
        self,
        length: int,
        *,
        seed: int,
        epoch: int,
        start_index: int = 0,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
    ) -> None:
        self.length, self.start_index = _check_start(length, start_index)
        self.seed = int(seed)
        self.epoch = int(epoch)
        check_positive(world_size=world_size, batch_size=batch_size)
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.rank, self.world_size, self.batch_size = int(rank), int(world_size), int(batch_size)

    def permutation(self) -> list[int]:
        """The whole epoch's order, including the positions skipped by ``start_index``."""
        g = torch.Generator()
        g.manual_seed(mix_seed(self.seed, self.epoch))
        return torch.randperm(self.length, generator=g).tolist()

    def _indices(self) -> list[int]:
        perm = self.permutation()
        if self.world_size == 1:
            return perm[self.start_index :]
        step, b = self.world_size * self.batch_size, self.batch_size
        out: list[int] = []
        for start in range(self.start_index, self.length - step + 1, step):
            out += perm[start + self.rank * b : start + (self.rank + 1) * b]
        return out

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.length - self.start_index
        return (self.length - self.start_index) // (self.world_size * self.batch_size) * self.batch_size


class SequentialResumableSampler(Sampler[int]):
    """``start_index, start_index + 1, ..., length - 1``."""

    def __init__(self, length: int, *, start_index: int = 0) -> None:
        self.length, self.start_index = _check_start(length, start_index)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start_index, self.length))

    def __len__(self) -> int:
        return self.length - self.start_index


_MISSING = object()


def _cfg_get(cfg: Any, key: str, default: Any = _MISSING) -> Any:
    """``cfg.key`` for a DictConfig, dataclass or any object; a missing or ``???`` value gives ``default``."""
    try:
        value = getattr(cfg, key)
    except Exception as exc:  # AttributeError, omegaconf's ConfigAttributeError / MissingMandatoryValue
        if default is _MISSING:
            raise ValueError(f"data config has no value for data.{key}") from exc
        return default
    if value == "???" and default is not _MISSING:
        return default
    return value


def build_data(
    data_cfg: Any, seed: int, probes: ProbeCache | None = None
) -> tuple[Dataset, Dataset, dict[str, Any] | None]:
    """The (train, val) datasets described by the ``data`` config group, and the data's fingerprint
    (``None`` for synthetic data: the config alone determines it). ``probes``: the run's probe cache
    (:mod:`.probes`) for ``data=folder``, read and filled, never written here."""
    name = _cfg_get(data_cfg, "name")
    if name == "folder":
        from .folder import build_folder_datasets

        path = _cfg_get(data_cfg, "path", None)
        if path is None or str(path) in ("", "???"):
            raise ValueError("data.path must name a folder of videos when data.name='folder'")
        return build_folder_datasets(data_cfg, probes)
    if name != "synthetic":
        raise ValueError(f"unknown data.name {name!r}; expected 'synthetic' or 'folder'")
    common = dict(
        seed=seed,
        num_frames=int(_cfg_get(data_cfg, "num_frames")),
        image_size=int(_cfg_get(data_cfg, "image_size")),
        channels=int(_cfg_get(data_cfg, "channels", 3)),
        num_shapes=int(_cfg_get(data_cfg, "num_shapes", 3)),
    )
    train = SyntheticVideoDataset(split="train", length=int(_cfg_get(data_cfg, "train_size")), **common)
    val = SyntheticVideoDataset(split="val", length=int(_cfg_get(data_cfg, "val_size")), **common)
    return train, val, None


def batches_per_epoch(dataset: Dataset, data_cfg: Any, world_size: int = 1) -> int:
    """Full global batches per epoch (``world_size`` ranks x ``data.batch_size`` clips; the rest is dropped)."""
    batch_size = int(_cfg_get(data_cfg, "batch_size"))
    check_positive(batch_size=batch_size, world_size=world_size)
    return len(dataset) // (batch_size * world_size)  # type: ignore[arg-type]


def build_loader(
    dataset: Dataset,
    data_cfg: Any,
    *,
    seed: int,
    epoch: int,
    start_batch: int = 0,
    shuffle: bool = True,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over one epoch, starting at (global) batch ``start_batch`` of that epoch's fixed order.

    Iterating it never touches the global RNGs: the order comes from :class:`ResumableSampler` and
    the loader's worker base seed from its own generator seeded from ``(seed, epoch)``. With ranks,
    this rank's slice of every global batch (see :class:`ResumableSampler`). ``pin_memory``: batches
    in page-locked memory, for copies to a GPU that do not block (the same bits as without).
    """
    # Long on purpose: argument checks, then the sampler and the loader: one straight path.
    batch_size = int(_cfg_get(data_cfg, "batch_size"))
    num_workers = int(_cfg_get(data_cfg, "num_workers", 0))
    check_positive(batch_size=batch_size)
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
    length = len(dataset)  # type: ignore[arg-type]
    n_batches = length // (batch_size * world_size)
    if not 0 <= int(start_batch) <= n_batches:
        raise ValueError(f"start_batch must be in [0, {n_batches}] (batches per epoch), got {start_batch}")
    start_index = int(start_batch) * batch_size * world_size
    sampler: Sampler[int]
    if shuffle:
        sampler = ResumableSampler(
            length,
            seed=seed,
            epoch=epoch,
            start_index=start_index,
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
        )
    else:
        if world_size != 1:
            raise ValueError("an unshuffled loader (evaluation) is read by one rank only")
        sampler = SequentialResumableSampler(length, start_index=start_index)

    generator = torch.Generator()
    generator.manual_seed(mix_seed(seed, epoch, 0x5EED))
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = False
        if "fork" in multiprocessing.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=True,
        num_workers=num_workers,
        generator=generator,
        pin_memory=pin_memory,
        **kwargs,
    )
