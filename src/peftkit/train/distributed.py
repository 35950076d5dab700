"""Training on several processes with ``torch.distributed``: process groups, DDP and FSDP2.

A launcher (``torchrun --nproc-per-node N``, ``accelerate launch``, or anything that sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) starts one process per rank;
:func:`process_group` joins them (gloo on the CPU, NCCL on CUDA). Every rank holds the same model
(seeded alike) and draws the same global batch; each trains on its own slice of the rows
(:func:`shard_rows`), and gradients are averaged, so N processes reproduce one process with the
same global batch.

Two ways to place the model:

- :func:`wrap_ddp`: ``DistributedDataParallel``; every rank keeps a whole copy. Only parameters
  that require grad (the adapters) are synchronised, so a frozen base costs no communication;
  every trainable parameter must take part in every forward (DDP's default contract).
- :func:`shard_fsdp`: FSDP2's ``fully_shard`` (one group per transformer block, named by the HF
  model's ``_no_split_modules``, then the root), for models that do not fit one device. FSDP2 is
  chosen over FSDP1 because it shards each parameter on its own (as a ``DTensor``), so a frozen
  base and trainable adapters can live in one block: FSDP1 flattens a block's parameters into one
  buffer, which needs ``use_orig_params=True`` and still allocates gradient storage for the frozen
  part of a mixed buffer. FSDP2 also runs on the CPU with gloo, which lets it be tested here.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files, logs and shows progress."""
        return self.rank == 0


def current() -> DistInfo:
    """The running process group's view (a single process when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by the launcher (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextlib.contextmanager
def process_group(device: str | None = None, timeout_s: float = 1800) -> Iterator[DistInfo]:
    """Join the launcher's process group for the duration of the block (nothing to do for one process).

    Args:
        device: ``cpu`` forces gloo; otherwise NCCL when CUDA is available (each rank then uses
            ``cuda:LOCAL_RANK``, made the current device), else gloo.
        timeout_s: how long a collective may wait for the other ranks.

    Yields:
        :class:`DistInfo`. A group initialised by the caller is used as it is and left open; one
        created here is destroyed on exit.
    """
    if launched_world_size() <= 1 or dist.is_initialized():
        yield current()
        return
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield current()
    finally:
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum of ``values`` over all ranks (float64); the input when not distributed."""
    if not current().enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (JSON-like objects); ``[obj]`` when not distributed."""
    info = current()
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. a time-stamped folder name)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (nothing to do for one process)."""
    if current().enabled:
        dist.barrier()


def shard_rows(n: int, info: DistInfo) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of an ``n``-row global batch that rank ``info.rank`` trains on: contiguous
    slices, the first ``n % world_size`` ranks one row longer (``torch.tensor_split``'s rule)."""
    base, extra = divmod(n, info.world_size)
    lo = info.rank * base + min(info.rank, extra)
    return lo, lo + base + (info.rank < extra)


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s random streams (dropout masks): ``seed`` itself on rank 0, so one
    process is seeded exactly as asked, and far-apart values on other ranks, so that each rank draws
    its own masks, reproducibly."""
    return seed + 1_000_003 * rank


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(model)`` (rank 0's parameters and buffers are broadcast at the start)."""
    if device.type != "cuda":
        return DistributedDataParallel(model)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return DistributedDataParallel(model, device_ids=[index])


def shard_fsdp(model: nn.Module, device: torch.device) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all ranks and return it.

    Each module whose class is named in an HF model's ``_no_split_modules`` (its transformer
    blocks) becomes one FSDP group, gathered only while it runs; the root takes the rest. Every
    rank must have built the model identically (same seed); nothing is broadcast.

    Raises:
        RuntimeError: FSDP2 (``torch.distributed.fsdp.fully_shard``, torch >= 2.6) is missing.
    """
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:  # pragma: no cover - old torch
        raise RuntimeError("--fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") from err
    mesh = init_device_mesh(device.type, (current().world_size,))
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or [])}
    for module in list(model.modules())[1:]:
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside ``model``, a DDP wrapper (FSDP2 shards in place, so it is the module itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def local(t: Tensor) -> Tensor:
    """This rank's shard of ``t``, a sharded (``DTensor``) parameter or state; other tensors as they are."""
    return t.to_local() if hasattr(t, "to_local") else t


def full(t: Tensor) -> Tensor:
    """The whole tensor of ``t``, a sharded (``DTensor``) one (other tensors as they are); a collective, so every
    rank must call it."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
