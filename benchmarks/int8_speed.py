"""Speed and weight memory of the ``int8`` backend against float32, bf16 autocast, ``fake``, ``packed`` and OpenVINO.

Models: the bundled mnist-ddpm, and random-initialised models built from the published
configurations of Stable Diffusion 1.5's UNet (64x64 latents, one guided sample: 2 rows,
77 text tokens of width 768) and DiT-XL/2 (32x32 latents, one guided sample). Random
weights are fine for speed (the kernels do not look at the values) but nothing else.
Each model is quantized with the naive method (8-bit weights symmetric, so their codes fit
int8; a few calibration points and, for the large models, min-max ranges: quality is not
measured here), frozen onto ``fake`` and, in copies, onto ``int8`` and each ``--also``
backend (``packed``), and timed with ``accuquant.eval.speed.measure_pipelines``, one
process per model and bit width, each thread count in turn (variants in turn, medians;
bf16 autocast only where the CPU computes in bf16). The large models time one denoiser
call only; the bundled one also a whole 20-step sample. ``--openvino`` also converts the
FP model with OpenVINO (the ``bench`` extra) and times its call in the same process.
``--compile`` also times float32 and the ``--backend`` model compiled by ``torch.compile``
(``Pipeline.compile``; the compile time, in the warm-up call, is reported apart).

    python benchmarks/int8_speed.py --threads 1,2 --repeats 3   # results/int8_speed.{json,md}
    python benchmarks/int8_speed.py --models mnist-ddpm,sd15-unet,dit-xl-2:w4a8   # DiT-XL/2 at W4A8 only
    python benchmarks/int8_speed.py --device cuda --backend cuda-int8 --threads 16 --models sd15-unet \
        --out benchmarks/results/int8_speed_cuda   # on a GPU: fp32, bf16, fp16 against cuda-int8

The models are quantized on the CPU and then moved to ``--device``.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from common import ROOT, cpu_name, sd15_conditions, sd15_unet

from accuquant.eval.speed import COMPILE
from accuquant.io.files import atomic_path

RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("mnist-ddpm", "sd15-unet", "dit-xl-2")


def build(name: str):
    """``(pipeline, calibration conditions for n samples, call conditions)`` of a model."""
    import diffusers

    import accuquant as aq

    ddim = dict(diffusers.DDIMScheduler().config)
    if name == "mnist-ddpm":
        return aq.load("mnist-ddpm"), None, None
    if name == "sd15-unet":
        pipe = aq.Pipeline(sd15_unet(64), ddim, defaults=aq.SamplingDefaults(7.5))
        return pipe, sd15_conditions, sd15_conditions(1)
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_layers=28, num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                          out_channels=8, patch_size=2, sample_size=32,
                                          num_embeds_ada_norm=1000).eval()
    pipe = aq.Pipeline(dit, ddim, denoiser_name="transformer", defaults=aq.SamplingDefaults(4.0, 1000, 1000))
    return pipe, None, None


def run_one(name: str, bits: str, threads: list[int], repeats: int, backend: str = "int8",
            device: str = "cpu", extra: tuple[str, ...] = (), openvino: bool = False,
            compiled: bool = False) -> list[dict]:
    import accuquant as aq
    from accuquant.quant.layers import freeze_model
    from accuquant.eval.speed import measure_pipelines

    torch.set_num_threads(max(threads))
    fp, calib_cond, call_cond = build(name)
    w, a = (int(v) for v in bits[1:].split("a"))
    small = name != "mnist-ddpm"
    kw = dict(steps=2, calib_samples=1, batch_size=1) if small else dict(steps=20, calib_samples=8)
    t0 = time.perf_counter()
    calib = None
    if calib_cond is not None:  # no text encoder: trajectories from given embeddings
        calib = aq.collect_trajectories(fp.denoiser(), aq.make_solver("ddim", fp.scheduler_config, kw["steps"]),
                                        1, cond=calib_cond(1), batch_size=1, progress=False)
    # the large models take min-max ranges (an MSE range search over 860 M weights takes many
    # minutes here, and the kernels' speed does not depend on the ranges)
    init = dict(weight_init="minmax", act_init="minmax") if small else {}
    q = aq.quantize(fp, aq.QuantConfig(weight_bits=w, act_bits=a, weight_symmetric=w == 8, **init), "naive",
                    calib=calib, progress=False, **kw)
    quantize_s = time.perf_counter() - t0
    quant = {"fake": q}
    for b in [backend, *extra] + ([backend + COMPILE] if compiled else []):
        quant[b] = copy.deepcopy(q)
        freeze_model(quant[b].model, b.removesuffix(COMPILE))
        if b.endswith(COMPILE):
            quant[b].compile()
    fp_compiled = copy.deepcopy(fp).compile() if compiled else None
    params = sum(p.numel() for p in fp.model.parameters())
    fp = fp.to(device)
    fp_compiled = fp_compiled.to(device) if fp_compiled is not None else None
    quant = {b: p.to(device) for b, p in quant.items()}
    if call_cond is not None:
        call_cond = call_cond.to(device)
    ov, ov_error = None, None
    if openvino:
        try:
            ov = openvino_model(fp, call_cond)
        except Exception as e:  # a model OpenVINO cannot convert: said in the results, the rest still timed
            ov_error = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    rows = []
    for n in threads:
        torch.set_num_threads(n)
        r = measure_pipelines(quant, fp, batch=1, steps=kw["steps"] if small else 20,
                              repeats=repeats, whole_sample=not small, cond=call_cond, fp_compiled=fp_compiled)
        if ov is not None:
            r["variants"]["openvino"] = time_openvino(ov, n, repeats, r["variants"]["fp32"]["call"]["median_ms"])
        rows.append({"model": name, "bits": bits, "params_m": round(params / 1e6, 1),
                     "quantize_s": round(quantize_s, 1), **r, **({"openvino_error": ov_error} if ov_error else {})})
    return rows


def openvino_model(fp, cond):
    """``(OpenVINO model, inputs, precision, seconds to convert)``: the FP denoiser's one guided
    call converted by OpenVINO (``openvino.convert_model`` on a traced call), to be compiled for
    the CPU in bf16 where the CPU computes in bf16, else in float32."""
    import openvino as ov

    from accuquant.eval.speed import bf16_hardware

    den = fp.denoiser()
    inputs = {}

    class Call(torch.nn.Module):  # the model's own call on the guided batch, as the denoiser makes it
        def __init__(self):
            super().__init__()
            self.model = fp.model

        def forward(self, *args):
            return self.model(*args, return_dict=False)[0]

    def grab(module, args, kwargs):
        inputs["args"] = [a for a in args] + [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        raise StopIteration

    h = fp.model.register_forward_pre_hook(grab, with_kwargs=True)
    x = torch.randn(1, *den.sample_shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            den(x, torch.tensor(500), cond if cond is not None else fp.conditions(1))
    except StopIteration:
        pass
    finally:
        h.remove()
    args = tuple(inputs["args"])
    precision = "bf16" if bf16_hardware() else "f32"
    t0 = time.perf_counter()
    model = ov.convert_model(Call().eval(), example_input=args)
    return model, [a.numpy() for a in args], precision, time.perf_counter() - t0


def time_openvino(ov_model, threads: int, repeats: int, fp32_ms: float) -> dict:
    """Median (min, max) of ``repeats`` calls of the compiled model on ``threads`` threads."""
    import statistics

    import openvino as ov

    model, args, precision, convert_s = ov_model
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                      "INFERENCE_NUM_THREADS": threads})
    request = compiled.create_infer_request()
    request.infer(args)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        request.infer(args)
        times.append(time.perf_counter() - t0)
    med = 1e3 * statistics.median(times)
    return {"call": {"median_ms": round(med, 3), "min_ms": round(1e3 * min(times), 3),
                     "max_ms": round(1e3 * max(times), 3)},
            "call_speedup": round(fp32_ms / med, 3), "precision": precision, "convert_s": round(convert_s, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--bits", default="w8a8,w4a8")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="int8", help="the integer backend to time (int8, or cuda-int8 on a GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--also", default="packed", help="other backends timed beside fake and --backend (comma-separated; "
                   "empty: none)")
    p.add_argument("--openvino", action="store_true", help="also the FP model converted by OpenVINO (bf16 where the "
                   "CPU computes in bf16, else float32; pip install openvino)")
    p.add_argument("--compile", action="store_true", help="also float32 and --backend compiled by torch.compile")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # model,bits: run in this process
    p.add_argument("--out", default=str(RESULTS / "int8_speed"))
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if args.one:
        name, bits = args.one.split(",")
        extra = tuple(b for b in args.also.split(",") if b)
        print(json.dumps(run_one(name, bits, threads, args.repeats, args.backend, args.device, extra, args.openvino,
                                 args.compile)))
        return
    rows = []
    for spec in args.models.split(","):  # model or model:bits,bits
        name, _, only = spec.partition(":")
        for bits in (only.split("+") if only else args.bits.split(",")):
            # one process per model and bit width (its thread counts in turn): a fresh allocator
            out = subprocess.run([sys.executable, __file__, "--one", f"{name},{bits}", "--threads", args.threads,
                                  "--repeats", str(args.repeats), "--backend", args.backend, "--device", args.device,
                                  "--also", args.also] + (["--openvino"] if args.openvino else [])
                                 + (["--compile"] if args.compile else []),
                                 check=True, capture_output=True, text=True).stdout
            for r in json.loads(out.strip().splitlines()[-1]):
                rows.append(r)
                print(f"{name} {bits} {r['threads']} thread(s): " + ", ".join(
                    f"{k} {x['call']['median_ms']:.0f} ms ({x['call_speedup']:.2f}x)" for k, x in r["variants"].items()),
                    flush=True)
            write(rows, args)


def write(rows: list[dict], args) -> None:
    """The results files from the rows measured so far (rewritten after each process)."""
    with atomic_path(Path(args.out).with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2))
    b8 = args.backend
    where = (f"this {rows[0]['cpu_capability']} CPU" if args.device == "cpu" else rows[0].get("gpu", args.device)) \
        if rows else args.device
    first = rows[0]["variants"] if rows else {}
    floats = [f for f in ("bf16", "fp16") if f in first]
    others = [b for b in args.also.split(",") if b]
    ov = ["openvino"] if args.openvino else []
    comp = [b8 + COMPILE] if args.compile else []
    skipped = "; ".join(f"{k} not timed: {why}" for k, why in (rows[0].get("skipped", {}) if rows else {}).items())
    lines = [f"Written by benchmarks/int8_speed.py on {where} ({cpu_name()}): median latency of one denoiser call (one "
             "guided sample: 2 rows), in one process per model and bit width, variants timed in turn; "
             "speed-up is float32's median over the variant's; weights: bytes of the tensors the denoiser holds, "
             "as a ratio of float32's. SD-1.5 UNet and DiT-XL/2 are random-initialised from their published "
             "configurations (speed only). 8-bit weights are symmetric."
             + (" OpenVINO: the FP model converted and compiled for the CPU (bf16 where the CPU computes in bf16, "
                "else float32), timed after the others in the same process." if ov else "")
             + (" `+compile`: compiled by torch.compile (Inductor, weights frozen as constants), compile time "
                "apart: " + "; ".join(f"{r['model']} {r['bits']} {r['threads']} thread(s): fp32 "
                                      f"{r['variants']['fp32' + COMPILE]['compile_s']:.0f} s, {comp[0]} "
                                      f"{r['variants'][r['bits'] + '-' + comp[0]]['compile_s']:.0f} s"
                                      for r in rows) + "." if comp else "")
             + (f" {skipped}." if skipped else ""), "",
             f"| model | bits | threads | fp32 (ms) | {' | '.join(floats + ['fake', b8] + others + ov)} | "
             + "".join(f"{k} | " for k in (["fp32" + COMPILE] + comp if comp else []))
             + f"{b8} layers | "
             f"weights {b8} / fp32 |" + "".join(f" weights {b} / fp32 |" for b in others),
             "| --- " * (8 + len(floats) + 2 * len(others) + len(ov) + 2 * len(comp)) + "|"]
    for r in rows:
        v = r["variants"]
        b = r["bits"]
        on = r["placement"][b8].get(b8, 0)
        total = sum(r["placement"][b8].values())
        cell = lambda k: f"{v[k]['call']['median_ms']:.0f} ms ({v[k]['call_speedup']:.2f}x)"  # noqa: E731
        cells = [cell(f) for f in floats] + [cell(f"{b}-{k}") for k in ["fake", b8] + others] + [
            cell(k) if k in v else "not converted" for k in ov] + (
            [cell("fp32" + COMPILE), cell(f"{b}-{comp[0]}")] if comp else [])
        lines.append(f"| {r['model']} ({r['params_m']} M) | {b} | {r['threads']} | "
                     f"{v['fp32']['call']['median_ms']:.0f} | " + " | ".join(cells) + f" | {on}/{total} | "
                     f"{v[b + '-' + b8]['weights_vs_fp32']:.3f} |"
                     + "".join(f" {v[f'{b}-{k}']['weights_vs_fp32']:.3f} |" for k in others))
    with atomic_path(Path(args.out).with_suffix(".md")) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
