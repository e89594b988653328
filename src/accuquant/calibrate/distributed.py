"""Data-parallel calibration on ``torch.distributed``.

Run under ``torchrun --nproc-per-node N -m accuquant quantize ...`` (or from Python, in
processes that called ``torch.distributed.init_process_group`` themselves), calibration
splits its work by sample: every rank collects its share of the FP trajectories and they
are gathered; per-step's block data is captured by the ranks in turn and shared
(:func:`accuquant.block_data.collect`); every rank draws the same batches from the same
seeded generators (the engine's) and computes the loss on its own rows of each batch
(:func:`shard`); the engine sums the gradients, each weighted by its rank's share of the
rows (:func:`sum_over_ranks`), so every rank takes the same optimiser step. Checkpoints hold nothing rank-specific, so a
run resumes on any number of ranks. Only rank 0 writes (checkpoints, caches, output).

``N`` ranks compute exactly what one process computes with the batch cut into ``N``
micro-batches (``micro_batches=N``: the engine's gradient accumulation, which bounds
memory the same way), bit for bit with the same threads per process; against one
process on whole batches they differ by float rounding, which Adam's first steps, of
size ``lr`` whatever the gradient's magnitude, turn into different step sizes wherever
a gradient is near zero.

A rank that dies stops the others: torchrun ends the group, and collectives time out
after ``ACCUQUANT_DIST_TIMEOUT`` seconds (default 600) otherwise.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from ..errors import AccuQuantError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` outside a process group."""
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def is_main() -> bool:
    return world()[0] == 0


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group torchrun describes in the environment (``WORLD_SIZE`` > 1):
    gloo on the CPU, NCCL on CUDA. Returns whether this process is part of a group."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise AccuQuantError("this torch build has no torch.distributed: run one process")
    timeout = datetime.timedelta(seconds=float(os.environ.get("ACCUQUANT_DIST_TIMEOUT", "600")))
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    return True


def _piece(n: int, j: int, pieces: int) -> range:
    """Piece ``j`` of ``n`` rows cut into ``pieces`` contiguous pieces (sizes differ by one at most)."""
    return range(j * n // pieces, (j + 1) * n // pieces)


def rows(n: int) -> range:
    """This rank's contiguous share of ``n`` rows."""
    rank, size = world()
    return _piece(n, rank, size)


def shard(idx: torch.Tensor, part: int = 0, parts: int = 1) -> tuple[torch.Tensor, float]:
    """This rank's part of a batch's row indices (its ``part``-th of ``parts`` micro-batches),
    and its share of the batch's rows: the batch is cut into ``world size x parts``
    contiguous pieces, rank by rank."""
    rank, size = world()
    pieces, j = size * parts, rank * parts + part
    if len(idx) < pieces:
        raise AccuQuantError(f"a batch of {len(idx)} rows cannot be split into {pieces} pieces ({size} ranks x "
                             f"{parts} micro-batches): use a larger batch or fewer pieces")
    r = _piece(len(idx), j, pieces)
    return idx[r.start:r.stop], len(r) / len(idx)


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """The rows of every rank's ``t`` (its share as given by :func:`rows`), in rank order."""
    if not active():
        return t
    size = dist.get_world_size()
    counts = torch.tensor([t.shape[0]], dtype=torch.long)
    all_counts = [torch.zeros_like(counts) for _ in range(size)]
    dist.all_gather(all_counts, counts)
    most = int(max(c.item() for c in all_counts))
    padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(c.item())] for p, c in zip(parts, all_counts)])


def broadcast_rows(tensors: dict[str, torch.Tensor] | None, src: int,
                   like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank ``src``'s ``tensors`` (``None`` elsewhere) on every rank: the keys, dtypes and
    trailing shapes of ``like``, the number of rows ``src``'s. Returned on ``like``'s device."""
    if not active():
        return tensors
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = dist.get_rank() == src
    n = torch.tensor([next(iter(tensors.values())).shape[0] if mine else 0], device=dev)
    dist.broadcast(n, src)
    out = {}
    for k, ref in like.items():
        t = tensors[k].to(dev).contiguous() if mine else torch.empty((int(n), *ref.shape[1:]), dtype=ref.dtype,
                                                                        device=dev)
        dist.broadcast(t, src)
        out[k] = tensors[k] if mine else t.to(ref.device)
    return out


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (unchanged in one process)."""
    if active():
        dist.all_reduce(t)
    return t
