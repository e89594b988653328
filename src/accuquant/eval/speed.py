"""``accuquant speed``: how fast a quantized model runs on each backend, against its FP base.

One process times, in alternating order so that other load falls on all alike: the FP
base in float32, the FP base under bfloat16 autocast where the CPU computes in bf16 (and
float16 autocast on a GPU), and
the quantized model on each backend asked for. Per variant it reports the median (and min, max) over ``repeats`` of
one denoiser call (the guided batch: ``2 x batch`` rows with guidance) and of a whole
``batch``-sample run of ``steps`` steps, and the ratio of float32's median to each
variant's (above 1: faster than float32). It also gives the bytes of the tensors each
variant's denoiser holds (:func:`accuquant.backends.placement.resident_bytes`; bf16 autocast casts on the
fly and holds float32's), as a ratio of float32's. A backend named ``NAME+compile`` is the
model on ``NAME`` compiled by ``torch.compile`` (:mod:`accuquant.backends.compiled`), timed
beside float32 compiled (``fp32+compile``); the compilation, in the warm-up call, is
reported apart (``compile_s``: the first call's time less the median call's).
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from ..config import DEFAULT_STEPS
from ..backends.placement import placement, resident_bytes
from .evaluation import base_of
from ..io.load import load_pipeline


COMPILE = "+compile"  # a backend name's suffix: the model on that backend, compiled


def bf16_hardware() -> bool:
    """Whether this CPU computes in bf16 (AVX512-BF16 or AMX); elsewhere bf16 autocast runs
    emulated kernels (a 3x3 convolution about 100x slower than float32 on an AVX2 CPU)."""
    from ..backends.int8 import cpu_flags

    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _stats(times: list[float]) -> dict:
    return {"median_ms": round(1e3 * statistics.median(times), 3), "min_ms": round(1e3 * min(times), 3),
            "max_ms": round(1e3 * max(times), 3)}


def measure(path: str, backends: list[str], batch: int = 2, steps: int = DEFAULT_STEPS, repeats: int = 5,
            threads: int | None = None, base: str | None = None, device: str = "cpu") -> dict:
    """Latency of the FP base (float32, bf16 autocast) and of ``path`` on each of ``backends``."""
    if threads is not None:
        torch.set_num_threads(threads)
    quant = {b: load_pipeline(path, device=device, backend=b.removesuffix(COMPILE)) for b in backends}
    fp = base_of(next(iter(quant.values())), base).to(device)
    fp_compiled = None
    if any(b.endswith(COMPILE) for b in backends):
        for b, p in quant.items():
            if b.endswith(COMPILE):
                p.compile()
        fp_compiled = base_of(next(iter(quant.values())), base).to(device).compile()
    return {"model": str(path), **measure_pipelines(quant, fp, batch, steps, repeats, fp_compiled=fp_compiled)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_pipelines(quant: dict, fp, batch: int = 2, steps: int = DEFAULT_STEPS, repeats: int = 5,
                      whole_sample: bool = True, cond=None, fp_compiled=None) -> dict:
    """:func:`measure` on pipelines in memory: ``quant`` maps a backend name to the quantized
    pipeline frozen onto it, ``fp`` is their base; ``whole_sample=False`` times one
    denoiser call only (for models whose whole sample takes minutes); ``cond``: the call's
    conditions, when the pipeline cannot make them (a denoiser without its text encoder);
    ``fp_compiled``: a compiled copy of ``fp``, timed as ``fp32+compile``."""
    first = next(iter(quant.values()))
    device = next(fp.model.parameters()).device
    variants = {"fp32": (fp, contextlib.nullcontext)}
    skipped = {}
    if device.type == "cpu" and not bf16_hardware():
        skipped["bf16"] = "no bf16 arithmetic on this CPU (AVX512-BF16 or AMX): oneDNN's bf16 kernels emulate it"
    else:
        variants["bf16"] = (fp, lambda: torch.autocast(device.type, torch.bfloat16))
    if device.type == "cuda":
        variants["fp16"] = (fp, lambda: torch.autocast("cuda", torch.float16))
    if fp_compiled is not None:
        variants["fp32" + COMPILE] = (fp_compiled, contextlib.nullcontext)
    variants.update({f"{first.quant.config.label}-{b}": (p, contextlib.nullcontext) for b, p in quant.items()})
    steps_, solver = first.sampling_settings(steps, None)
    den0 = fp.denoiser()
    x = torch.randn(batch, *den0.sample_shape, generator=torch.Generator().manual_seed(0)).to(device)
    cond = cond if cond is not None else fp.conditions(batch, device=device)
    t = first.solver(steps_, solver).timesteps[steps_ // 2]  # a mid-trajectory step
    calls: dict[str, list[float]] = {k: [] for k in variants}
    samples: dict[str, list[float]] = {k: [] for k in variants}
    first_call: dict[str, float] = {}
    with torch.inference_mode():
        for k, (p, ctx) in variants.items():  # warm-up: first-call allocation, kernel selection, compilation
            with ctx():
                _sync(device)
                t0 = time.perf_counter()
                p.denoiser()(x, t, cond)
                _sync(device)
                first_call[k] = time.perf_counter() - t0
        for _ in range(repeats):
            for k, (p, ctx) in variants.items():
                den = p.denoiser()
                with ctx():
                    _sync(device)
                    t0 = time.perf_counter()
                    den(x, t, cond)
                    _sync(device)
                    calls[k].append(time.perf_counter() - t0)
                    if whole_sample:
                        t0 = time.perf_counter()
                        p.sample(batch, steps=steps_, scheduler=solver, batch_size=batch, progress=False)
                        _sync(device)
                        samples[k].append(time.perf_counter() - t0)
    ref_call = statistics.median(calls["fp32"])
    ref_sample = statistics.median(samples["fp32"]) if whole_sample else None
    ref_bytes = resident_bytes(fp.model)
    rows = {}
    for k, (p, _) in variants.items():
        held = resident_bytes(p.model)
        rows[k] = {"call": _stats(calls[k]), "call_speedup": round(ref_call / statistics.median(calls[k]), 3),
                   "weights_mb": round(held / 2**20, 3), "weights_vs_fp32": round(held / ref_bytes, 3)}
        if k.endswith(COMPILE):
            rows[k]["compile_s"] = round(first_call[k] - statistics.median(calls[k]), 2)
        if whole_sample:
            rows[k].update(sample=_stats(samples[k]),
                           sample_speedup=round(ref_sample / statistics.median(samples[k]), 3))
    where = {b: {kind: len(v) for kind, v in placement(p.model).items()} for b, p in quant.items()}
    return {"batch": batch, "guided": den0.guided, "steps": steps_, "solver": solver,
            "repeats": repeats, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
            "placement": where, "variants": rows, **({"skipped": skipped} if skipped else {})}


def format_speed(r: dict) -> str:
    lines = [f"{r['model']}: batch {r['batch']}{' (guided: twice the rows)' if r['guided'] else ''}, "
             f"{r['steps']} {r['solver']} steps, {r['threads']} thread(s), medians of {r['repeats']} "
             f"({r['cpu_capability']})",
             f"{'variant':>14}  {'denoiser call':>14}  {'x fp32':>7}  {'whole sample':>13}  {'x fp32':>7}  "
             f"{'weights':>10}  {'x fp32':>6}"]
    for k, v in r["variants"].items():
        sample = (f"{v['sample']['median_ms'] / 1e3:>11.2f} s  {v['sample_speedup']:>7.2f}" if "sample" in v
                  else f"{'-':>13}  {'-':>7}")
        lines.append(f"{k:>14}  {v['call']['median_ms']:>11.2f} ms  {v['call_speedup']:>7.2f}  {sample}  "
                     f"{v['weights_mb']:>7.2f} MB  {v['weights_vs_fp32']:>6.3f}")
    for k, v in r["variants"].items():
        if "compile_s" in v:
            lines.append(f"{k}: compiled in {v['compile_s']:.1f} s (its first call, apart from the times above)")
    for b, where in r["placement"].items():
        lines.append(f"{b}: " + ", ".join(f"{n} layers on {kind}" for kind, n in where.items()))
    for k, why in r.get("skipped", {}).items():
        lines.append(f"{k}: not timed ({why})")
    return "\n".join(lines)
