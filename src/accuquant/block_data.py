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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import AccuQuantError
from .quantizers import UniformQuantizer

_UNITS = {"": 2**20, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(value) -> int:
    """Bytes of a memory size: ``"4GB"``, ``"512MB"``, ``"1.5g"`` (binary units) or a bare
    number of megabytes (``2048``)."""
    text = str(value).strip().lower().replace(" ", "")
    num = text.rstrip("kmgib")
    unit = text[len(num):]
    try:
        size = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise AccuQuantError(f"memory size {value!r}: expected a number with a unit, e.g. 4GB or 512MB") from None
    if not size >= 0 or size == float("inf"):
        raise AccuQuantError(f"memory size {value!r}: expected a finite size of at least 0")
    return int(size)


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
    about ``chunk_rows``; chunks beyond ``max_bytes`` in RAM go to safetensors files in a
    temporary folder (under ``spill_dir`` if given) that is removed by :meth:`close`.
    Where the rows are does not change which rows a batch draws.
    """

    def __init__(self, chunk_rows: int = 256, max_bytes: int = 2 * 2**30, spill_dir: str | Path | None = None):
        self.chunk_rows = chunk_rows
        self.max_ram_bytes = max_bytes
        self.spill_dir = spill_dir
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.chunks: list[dict[str, torch.Tensor] | Path] = []
        self.ram_bytes = 0
        self.rows = 0
        self.spec: tuple | None = None  # (arg slots, kwarg slots, constants)
        self.n_targets: int | None = None  # outputs of a block with several; None: one tensor
        self._pending: list[dict[str, torch.Tensor]] = []
        self._pending_rows = 0
        self._loaded: tuple[int, dict] | None = None

    # ------------------------------------------------------------------ filling
    def add(self, args: tuple, kwargs: dict, target) -> None:
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
        self._pending.append(tensors)
        self._pending_rows += rows
        self.rows += rows
        if self._pending_rows >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        chunk = {k: torch.cat([p[k] for p in self._pending]).contiguous() for k in self._pending[0]}
        self._pending, self._pending_rows = [], 0
        size = sum(t.numel() * t.element_size() for t in chunk.values())
        if self.ram_bytes + size <= self.max_ram_bytes:
            self.chunks.append(chunk)
            self.ram_bytes += size
            return
        if self._tmp is None:
            if self.spill_dir is not None:
                Path(self.spill_dir).mkdir(parents=True, exist_ok=True)
            self._tmp = tempfile.TemporaryDirectory(prefix="accuquant-blockdata-", dir=self.spill_dir)
        path = Path(self._tmp.name) / f"chunk{len(self.chunks):05d}.safetensors"
        save_file(chunk, str(path))
        self.chunks.append(path)

    def finish(self) -> "BlockData":
        self._flush()
        return self

    @property
    def on_disk(self) -> int:
        return sum(isinstance(c, Path) for c in self.chunks)

    def close(self) -> None:
        self.chunks, self._loaded = [], None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # ------------------------------------------------------------------ reading
    def _chunk(self, i: int) -> dict[str, torch.Tensor]:
        c = self.chunks[i]
        if not isinstance(c, Path):
            return c
        if self._loaded is None or self._loaded[0] != i:
            self._loaded = (i, load_file(str(c)))
        return self._loaded[1]

    def batch(self, generator: torch.Generator, size: int, device="cpu", shard=None):
        """A random batch: a random chunk, then ``size`` random rows of it (of those, the
        ones ``shard`` keeps: this rank's, in data-parallel calibration).
        Returns ``(args, kwargs, target)`` on ``device``."""
        i = int(torch.randint(len(self.chunks), (1,), generator=generator))
        chunk = self._chunk(i)
        n = chunk["target0"].shape[0]
        idx = torch.randperm(n, generator=generator)[: min(size, n)]
        return self._rows(chunk, idx if shard is None else shard(idx), device)

    def _rows(self, chunk, idx, device):
        arg_slots, kw_slots, consts = self.spec
        args = [chunk[s][idx].to(device) if s is not None else consts[f"a{i}"] for i, s in enumerate(arg_slots)]
        kwargs = {k: chunk[s][idx].to(device) if s is not None else consts[f"k.{k}"] for k, s in kw_slots.items()}
        if self.n_targets is None:
            return args, kwargs, chunk["target0"][idx].to(device)
        return args, kwargs, tuple(chunk[f"target{i}"][idx].to(device) for i in range(self.n_targets))


def collect(denoiser, module: nn.Module, batches, chunk_rows: int = 256, max_bytes: int = 2 * 2**30,
            spill_dir: str | Path | None = None) -> BlockData:
    """``module``'s inputs in the (quantized) ``denoiser`` and its outputs in the same network
    with every quantizer off (the FP network: the weights are not held twice), for every
    ``(x, t, cond)`` of ``batches``."""
    data = BlockData(chunk_rows, max_bytes, spill_dir)
    for x, t, cond in batches:
        def run(x=x, t=t, cond=cond):
            return denoiser(x, t, cond)

        args, kwargs = capture(module, run, "input")
        with quantization_disabled(denoiser.model):
            target = capture(module, run, "output")
        data.add(args, kwargs, target)
    return data.finish()
