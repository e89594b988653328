"""Inputs and FP outputs of one block, captured from the running denoiser, in bounded chunks.

Block reconstruction needs, for one block at a time, what the block receives in the
quantized network (its positional and keyword arguments: the hidden states, the time
embedding, the text embeddings...) and what it returns in the full-precision network.
Both are captured with forward hooks that stop the forward pass as soon as the block is
reached, so nothing after it is computed. Only the current block's data is held; it is
stored in chunks, in RAM up to a budget and in safetensors files beyond it.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..io.safetensors import map_file
from .distributed import broadcast_rows, world
from ..config import DEFAULT_MAX_MEMORY, parse_size
from ..quant.quantizers import UniformQuantizer

#: the default RAM budget (``--max-memory``), in bytes
DEFAULT_MAX_BYTES = parse_size(DEFAULT_MAX_MEMORY)


class _Stop(Exception):
    """Raised by a capture hook to end the forward pass at the block."""


@contextmanager
def quantization_disabled(model: nn.Module):
    """Run ``model`` in full precision: every quantizer passes its input through."""
    quants = [m for m in model.modules() if isinstance(m, UniformQuantizer)]
    before = [q.enabled for q in quants]
    for q in quants:
        q.enabled = False
    try:
        yield
    finally:
        for q, e in zip(quants, before):
            q.enabled = e


def block_outputs(out) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """What a block's output is reconstructed on: the tensor, or the tensors of a tuple
    (an MMDiT block returns its text and image streams; ``None`` entries are left out)."""
    if isinstance(out, (tuple, list)):
        tensors = tuple(o for o in out if torch.is_tensor(o))
        return tensors[0] if len(tensors) == 1 else tensors
    return out


def capture(module: nn.Module, run_forward, what: str):
    """Run ``run_forward()`` until ``module`` is first called and return its ``(args, kwargs)``
    (``what="input"``) or its output (``what="output"``, as :func:`block_outputs`)."""
    box = {}

    def pre(mod, args, kwargs):
        box["value"] = (args, kwargs)
        raise _Stop

    def post(mod, args, kwargs, out):
        box["value"] = block_outputs(out)
        raise _Stop

    if what == "input":
        h = module.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        h = module.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            run_forward()
    except _Stop:
        pass
    finally:
        h.remove()
    if "value" not in box:
        raise RuntimeError(f"{type(module).__name__} was not called by the forward pass")
    return box["value"]


class BlockData:
    """Captured ``(inputs, target)`` rows of one block (the target: a tensor, or a tuple of
    tensors for a block with several outputs).

    Tensor arguments whose first dimension is the batch are stored row-wise; every other
    argument (flags, ``None``, shared tensors) is kept once. Rows are grouped in chunks of
    about ``chunk_rows`` (a batch draws its rows from one chunk). At most ``max_bytes`` of
    rows are held in RAM, counting the chunk being filled: rows beyond go, as they come,
    to safetensors files in a temporary folder (under ``spill_dir`` if given) that
    :meth:`close` removes; a batch reads its rows from there through a file mapping, so
    reading holds one batch. Where rows are kept never changes which rows a batch draws.
    """

    def __init__(self, chunk_rows: int = 256, max_bytes: int = DEFAULT_MAX_BYTES, spill_dir: str | Path | None = None):
        self.chunk_rows = chunk_rows
        self.max_ram_bytes = max_bytes
        self.spill_dir = spill_dir
        self._tmp: tempfile.TemporaryDirectory | None = None
        #: per chunk, its parts in row order: tensors in RAM, or a file
        self.chunks: list[list[dict[str, torch.Tensor] | Path]] = []
        self._sizes: list[list[int]] = []  # rows of each part
        self.ram_bytes = 0
        self.rows = 0
        self.spec: tuple | None = None  # (arg slots, kwarg slots, constants)
        self.n_targets: int | None = None  # outputs of a block with several; None: one tensor
        self._open: list[dict[str, torch.Tensor] | Path] = []  # the parts of the chunk being filled
        self._open_sizes: list[int] = []
        self._pending: list[dict[str, torch.Tensor]] = []  # its rows not placed yet
        self._pending_rows = 0
        self._pending_bytes = 0
        self._mapped: dict[Path, dict[str, torch.Tensor]] = {}
        self.peak_ram_bytes = 0  # the most held at once, pending rows included
        self.captured = 0  # rows this process computed (see :func:`collect`)

    # ------------------------------------------------------------------ filling
    def add(self, args: tuple, kwargs: dict, target) -> None:
        self.add_rows(self.row_tensors(args, kwargs, target))

    def row_tensors(self, args: tuple, kwargs: dict, target) -> dict[str, torch.Tensor]:
        """A captured batch as its row tensors by slot, on the CPU (the first batch fixes
        which arguments are rows and keeps the others as constants)."""
        targets = target if isinstance(target, tuple) else (target,)
        rows = targets[0].shape[0]
        if self.spec is None:
            self.n_targets = len(targets) if isinstance(target, tuple) else None
        tensors = {f"target{i}": t.detach().cpu() for i, t in enumerate(targets)}
        if self.spec is None:
            arg_slots, kw_slots, consts = [], {}, {}
            for i, a in enumerate(args):
                batched = torch.is_tensor(a) and a.dim() > 0 and a.shape[0] == rows
                arg_slots.append(f"a{i}" if batched else None)
                if not batched:
                    consts[f"a{i}"] = a
            for k, v in kwargs.items():
                batched = torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows
                kw_slots[k] = f"k.{k}" if batched else None
                if not batched:
                    consts[f"k.{k}"] = v
            self.spec = (arg_slots, kw_slots, consts)
        arg_slots, kw_slots, _ = self.spec
        for slot, a in zip(arg_slots, args):
            if slot is not None:
                tensors[slot] = a.detach().cpu()
        for k, slot in kw_slots.items():
            if slot is not None:
                tensors[slot] = kwargs[k].detach().cpu()
        return tensors

    def add_rows(self, tensors: dict[str, torch.Tensor]) -> None:
        """Store a batch's row tensors (:meth:`row_tensors`)."""
        rows = tensors["target0"].shape[0]
        self._pending.append(tensors)
        self._pending_rows += rows
        self._pending_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        self.rows += rows
        self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes + self._pending_bytes)
        if self.ram_bytes + self._pending_bytes > self.max_ram_bytes:
            self._place(to_disk=True)
        if sum(self._open_sizes) + self._pending_rows >= self.chunk_rows:
            self._close_chunk()

    def _place(self, to_disk: bool) -> None:
        """The pending rows become a part of the open chunk: in RAM, or a file."""
        if not self._pending:
            return
        part = {k: torch.cat([p[k] for p in self._pending]).contiguous() for k in self._pending[0]}
        self._open_sizes.append(self._pending_rows)
        self._pending, self._pending_rows, size, self._pending_bytes = [], 0, self._pending_bytes, 0
        if not to_disk:
            self._open.append(part)
            self.ram_bytes += size
            return
        if self._tmp is None:
            if self.spill_dir is not None:
                Path(self.spill_dir).mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix="accuquant-blockdata-", dir=self.spill_dir)
        path = Path(self._tmp.name) / f"part{len(self.chunks):05d}-{len(self._open):03d}.safetensors"
        save_file(part, str(path))
        self._open.append(path)

    def _close_chunk(self) -> None:
        self._place(to_disk=False)  # add() has already sent to disk what the budget does not hold
        if self._open:
            self.chunks.append(self._open)
            self._sizes.append(self._open_sizes)
        self._open, self._open_sizes = [], []

    def finish(self) -> "BlockData":
        self._close_chunk()
        return self

    @property
    def on_disk(self) -> int:
        """Chunks with rows in files."""
        return sum(any(isinstance(p, Path) for p in c) for c in self.chunks)

    def close(self) -> None:
        self.chunks, self._sizes, self._mapped = [], [], {}
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ------------------------------------------------------------------ reading
    def _part(self, p) -> dict[str, torch.Tensor]:
        if not isinstance(p, Path):
            return p
        if p not in self._mapped:
            self._mapped[p] = map_file(p) or load_file(str(p))
        return self._mapped[p]

    def batch(self, generator: torch.Generator, size: int, device="cpu", shard=None):
        """A random batch: a random chunk, then ``size`` random rows of it (of those, the
        ones ``shard`` keeps: this rank's, in data-parallel calibration).
        Returns ``(args, kwargs, target)`` on ``device``."""
        i = int(torch.randint(len(self.chunks), (1,), generator=generator))
        n = sum(self._sizes[i])
        idx = torch.randperm(n, generator=generator)[: min(size, n)]
        return self._rows(i, idx if shard is None else shard(idx), device)

    def _take(self, i: int, key: str, idx: torch.Tensor) -> torch.Tensor:
        """Rows ``idx`` of chunk ``i``'s tensor ``key``, gathered from its parts."""
        parts, out, start = self.chunks[i], None, 0
        for p, n in zip(parts, self._sizes[i]):
            sel = ((idx >= start) & (idx < start + n)).nonzero().flatten()
            if len(sel):
                rows = self._part(p)[key][idx[sel] - start]
                if out is None:
                    out = rows.new_empty((len(idx), *rows.shape[1:]))
                out[sel] = rows
            start += n
        return out

    def _rows(self, i, idx, device):
        arg_slots, kw_slots, consts = self.spec
        args = [self._take(i, s, idx).to(device) if s is not None else consts[f"a{j}"]
                for j, s in enumerate(arg_slots)]
        kwargs = {k: self._take(i, s, idx).to(device) if s is not None else consts[f"k.{k}"]
                  for k, s in kw_slots.items()}
        if self.n_targets is None:
            return args, kwargs, self._take(i, "target0", idx).to(device)
        return args, kwargs, tuple(self._take(i, f"target{j}", idx).to(device) for j in range(self.n_targets))


def collect(denoiser, module: nn.Module, batches, chunk_rows: int = 256, max_bytes: int = DEFAULT_MAX_BYTES,
            spill_dir: str | Path | None = None) -> BlockData:
    """``module``'s inputs in the (quantized) ``denoiser`` and its outputs in the same network
    with every quantizer off (the FP network: the weights are not held twice), for every
    ``(x, t, cond)`` of ``batches``.

    Under ``torch.distributed`` the ranks share the work: every rank captures the first
    batch (which fixes the layout), then each rank one batch of every ``world size`` in
    turn, and each sends its rows to the others, so every rank holds the rows one process
    would, in the same order (``captured``: the rows this rank computed)."""
    data = BlockData(chunk_rows, max_bytes, spill_dir)
    rank, size = world()

    def one(x, t, cond) -> dict[str, torch.Tensor]:
        def run():
            return denoiser(x, t, cond)

        args, kwargs = capture(module, run, "input")
        with quantization_disabled(denoiser.model):
            target = capture(module, run, "output")
        rows = data.row_tensors(args, kwargs, target)
        data.captured += rows["target0"].shape[0]
        return rows

    batches = iter(batches)
    first = next(batches, None)
    if first is not None:
        layout = one(*first)
        data.add_rows(layout)
        while turn := list(islice(batches, size)):
            mine = one(*turn[rank]) if rank < len(turn) else None
            for k in range(len(turn)):
                data.add_rows(broadcast_rows(mine, k, layout))
    return data.finish()
