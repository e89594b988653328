"""``accuquant compare``: quantize one model with several methods and bit widths, score every
result against the FP model, and write one report (:mod:`accuquant.report`).

Layout of the output directory::

    compare.json                  the settings (a rerun with other settings is refused)
    models/<method>-<bits>/       each quantized model, as ``accuquant quantize`` saves it
    models/<method>-<bits>.cost.json  its calibration cost (a model without one is redone)
    runs/fp.json                  FP metrics
    runs/<method>-<bits>.json     metrics, calibration cost and error curve of one pair
    report.md, report.html, results.json, grid-<bits>.png, errors-<bits>.png

Each quantization runs as its own ``accuquant quantize`` process, so its wall time and
peak resident memory are its own (learning methods with ``--resume``: an interrupted
comparison continues inside the interrupted calibration). A pair whose record exists is
skipped, unless an older version of its method made it; FP calibration trajectories, FP
samples and the per-step initialisation that AccuQuant starts from come from the cache
(:func:`accuquant.cache.cache_dir`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..config import DEFAULT_CALIB_SAMPLES, DEFAULT_STEPS, parse_bits_label
from ..errors import AccuQuantError
from ..io.files import atomic_path, check_not_inside, clean_stale

#: what ``accuquant compare`` runs when not told
DEFAULT_METHODS = ("naive", "per-step", "accuquant")
DEFAULT_BITS = ("w8a8", "w4a8", "w3a8", "w4a6")


def _key(d: dict) -> dict:
    """The settings (a dict of :class:`CompareSettings`) that a pair's record depends on: all but
    methods, bits and device, and the defaults added since the first comparisons (the fake
    backend, no prompts) left out, so that earlier comparisons keep their key."""
    return {k: v for k, v in d.items() if k not in ("methods", "bits", "device")
            and not (k == "backend" and v == "fake") and not (k in ("prompts", "quant") and v is None)}


@dataclasses.dataclass
class CompareSettings:
    """What a comparison runs; a JSON round-trip of this is ``compare.json``."""

    model: str  # a path, or bundled:<name> for a model shipped with the package
    methods: list[str]
    bits: list[str]
    num: int = 1000  # paired samples per evaluation
    steps: int = DEFAULT_STEPS
    scheduler: str | None = None  # None: the model's default solver (resolved before anything is written)
    calib_samples: int = DEFAULT_CALIB_SAMPLES
    seed: int = 0
    analyze_num: int = 256  # paired samples for the error curves
    grid: int = 10  # samples per row of the sample grids
    device: str = "cpu"
    backend: str = "fake"  # what runs the quantized layers while they are scored
    #: what a text-conditioned model is calibrated and scored on (None: its default prompts)
    prompts: list[str] | None = None
    #: quantization options of every pair, by ``accuquant quantize`` flag (``{"weight-group": 64,
    #: "outliers": ["smooth", "lowrank"]}``); a recipe's own apply where these leave them unset
    quant: dict | None = None

    def check(self) -> None:
        from ..backends import check_backend
        from ..methods import method_class

        check_backend(self.backend, self.device)

        if not self.methods:
            raise AccuQuantError("methods: give at least one method")
        for m in self.methods:
            method_class(m)
        self.quant_flags()
        if not self.bits:
            raise AccuQuantError("bits: give at least one bit width")
        for b in self.bits:
            parse_bits_label(b)
        if len(set(self.methods)) != len(self.methods) or len(set(self.bits)) != len(self.bits):
            raise AccuQuantError("methods and bits must not repeat an entry")
        if self.num < 2 or self.analyze_num < 2:
            raise AccuQuantError("num and analyze_num must be at least 2 (FID needs two samples)")
        if self.grid < 1:
            raise AccuQuantError("grid must be at least 1")
        if self.prompts is not None and (isinstance(self.prompts, str) or not self.prompts
                                         or not all(isinstance(p, str) and p.strip() for p in self.prompts)):
            raise AccuQuantError("prompts: expected a non-empty list of prompts")

    def quant_flags(self) -> list[str]:
        """``quant`` as ``accuquant quantize`` flags (a list value: the flag repeated), checked
        by building the config they give."""
        from ..config import QuantConfig

        known = {f: field for f, field in QuantConfig.flags().items() if f not in ("weight-bits", "act-bits")}
        out, kw = [], {}
        for flag, v in (self.quant or {}).items():
            if flag not in known:
                raise AccuQuantError(f"quant: {flag!r} is not a quantization option of compare (bits: --bits)")
            for item in (v if isinstance(v, list) else [v]):
                out += ["--" + flag, str(item)]
            kw[known[flag].name] = tuple(v) if isinstance(v, list) else v
        QuantConfig(**kw)  # a bad value is refused here, naming its field
        return out

    def run_key(self) -> dict:
        """What a pair's record depends on (method and bits aside)."""
        return _key(dataclasses.asdict(self))


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _current(record: dict | None, key: dict, version: int) -> bool:
    """``record`` (a pair's record or cost stamp) was written under these settings by this
    version of its method (one without a version predates versions: taken as current)."""
    return bool(record) and record.get("key") == key and record.get("method_version", version) == version


def prepare_out(out: Path, settings: CompareSettings) -> None:
    """Create ``out`` or accept an earlier comparison with the same settings there; refuse
    anything else before any work is done."""
    marker = out / "compare.json"
    if out.exists() and not out.is_dir():
        raise AccuQuantError(f"{out}: exists and is not a directory")
    clean_stale(marker)  # a run killed while writing the marker left only its temporary
    if out.is_dir() and any(out.iterdir()):
        old = _read_json(marker)
        if old is None:
            raise AccuQuantError(f"{out}: exists, is not empty and holds no comparison")
        old_key = _key(old)
        new_key = settings.run_key()
        if old_key != new_key:
            diff = sorted(k for k in {*new_key, *old_key} if old_key.get(k) != new_key.get(k))
            raise AccuQuantError(f"{out}: holds a comparison with other settings ({', '.join(diff)}); "
                                 "choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(marker, dataclasses.asdict(settings))


def quantize_process(settings: CompareSettings, method: str, bits: str, out: Path, quiet: bool,
                     extra: list[str] | tuple = ()) -> dict:
    """Run ``accuquant quantize`` for one pair in its own process (``extra``: more flags);
    its wall time and peak RSS."""
    w, a = parse_bits_label(bits)
    from ..bundled import resolve_ref

    cmd = [sys.executable, "-m", "accuquant", "quantize", "--model", resolve_ref(settings.model), "--method", method,
           "--weight-bits", str(w or "none"), "--act-bits", str(a or "none"), "--steps", str(settings.steps),
           "--scheduler", settings.scheduler, "--calib-samples", str(settings.calib_samples),
           "--seed", str(settings.seed), "--device", settings.device, "--out", str(out), "--summary", "0",
           "--overwrite"]
    if method != "naive":
        cmd.append("--resume")
    if quiet:
        cmd.append("--quiet")
    for p in settings.prompts or ():
        cmd += ["--prompt", p]
    cmd += settings.quant_flags() + list(extra)
    # The child's output goes to files, not pipes: pipes read only after the wait would
    # block a child that writes more than a pipe holds.
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out_f, stderr=err_f if quiet else None, text=True)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except KeyboardInterrupt:
            proc.wait()  # the child got the interrupt too: let it save its checkpoint
            raise
        wall = time.perf_counter() - t0
        out_f.seek(0)
        err_f.seek(0)
        stdout, stderr = out_f.read(), err_f.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        err = stderr.strip().splitlines()
        why = err[-1] if err else f"exit status {code}"
        raise AccuQuantError(f"quantizing with {method} at {bits} failed: {why}")
    meta = json.loads((out / "accuquant.json").read_text())
    log = meta.get("method_log", {})
    init = log.get("init") or {}
    return {
        "quantize_wall_s": round(wall, 1),
        "calibration_s": round(sum(meta.get("timing_s", {}).values()), 1),
        "init_cached": bool(init.get("cached")),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "weights_mb": round(sum(f.stat().st_size for f in out.rglob("*.safetensors")) / 2**20, 3),
        "summary_line": stdout.strip().splitlines()[0] if stdout.strip() else "",
    }


def run_compare(settings: CompareSettings, out: str | Path, quiet: bool = False, log=print) -> dict:
    """Run every (method, bits) pair not done yet, then write the report; returns ``results.json``'s content."""
    from ..version import __version__
    from .analysis import error_accumulation
    from ..bundled import resolve_ref
    from .evaluation import evaluate, to_json_safe
    from ..io.load import load_pipeline
    from .report import write_report

    from ..methods import METHODS, base_method
    from ..cache import cache_dir

    settings.check()
    out = Path(out)
    check_not_inside(out, resolve_ref(settings.model))  # never write into (or over) the model compared
    t_start = time.perf_counter()
    fp = load_pipeline(resolve_ref(settings.model)).to(settings.device)
    if settings.scheduler is None:
        settings = dataclasses.replace(settings, scheduler=fp.sampling_settings()[1])
    prepare_out(out, settings)
    cached = sum(1 for _ in cache_dir().rglob("*.safetensors")) if cache_dir().is_dir() else 0
    key = settings.run_key()
    ev = dict(num=settings.num, steps=settings.steps, seed=settings.seed, scheduler=settings.scheduler,
              device=settings.device, progress=not quiet, prompts=settings.prompts)
    an = dict(num=settings.analyze_num, steps=settings.steps, seed=settings.seed, scheduler=settings.scheduler,
              device=settings.device, progress=not quiet, prompts=settings.prompts,
              x0_points=settings.steps)  # x0 FID at every step
    fp_path = out / "runs" / "fp.json"
    fp_rec = _read_json(fp_path)
    if not fp_rec or fp_rec.get("key") != key:
        log("FP model: sampling and scoring")
        fp_rec = {"key": key, "metrics": to_json_safe(evaluate(fp, **ev))}
        _write_json(fp_path, fp_rec)
    pairs = [(m, b) for b in settings.bits for m in settings.methods]
    done_now = []
    for k, (method, bits) in enumerate(pairs, 1):
        name = f"{method}-{bits}"
        rec_path = out / "runs" / f"{name}.json"
        version = METHODS[base_method(method)].Config.VERSION
        rec = _read_json(rec_path)
        if _current(rec, key, version):
            log(f"[{k}/{len(pairs)}] {method} {bits}: done earlier, kept")
            continue
        t0 = time.perf_counter()
        model_dir = out / "models" / name
        stamp_path = out / "models" / f"{name}.cost.json"
        stamp = _read_json(stamp_path)
        if _current(stamp, key, version) and (model_dir / "accuquant.json").is_file():
            log(f"[{k}/{len(pairs)}] {method} {bits}: quantized earlier, kept")
            cost = stamp["cost"]
        else:
            log(f"[{k}/{len(pairs)}] {method} {bits}: quantizing")
            stamp_path.unlink(missing_ok=True)
            cost = quantize_process(settings, method, bits, model_dir, quiet)
            _write_json(stamp_path, {"key": key, "method_version": version, "cost": cost})
        q = load_pipeline(model_dir, device=settings.device, backend=settings.backend)
        log(f"[{k}/{len(pairs)}] {method} {bits}: scoring {settings.num} paired samples")
        metrics = to_json_safe(evaluate(q, base=fp, **ev))
        log(f"[{k}/{len(pairs)}] {method} {bits}: error curves on {settings.analyze_num} paired samples")
        errors = error_accumulation(q, base=fp, **an)
        rec = {"key": key, "method": method, "method_version": version, "bits": bits, "metrics": metrics,
               "cost": cost, "errors": errors,
               "pair_wall_s": round(time.perf_counter() - t0, 1)}
        _write_json(rec_path, rec)
        done_now.append(name)
        del q
    runs = [_read_json(out / "runs" / f"{m}-{b}.json") for m, b in pairs]
    import diffusers
    import torch

    results = {
        "settings": dataclasses.asdict(settings),
        "versions": {"accuquant": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
                     "python": sys.version.split()[0], "cpu_threads": torch.get_num_threads()},
        "fp": fp_rec["metrics"],
        "runs": runs,
        "run_now": done_now,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "cache_files_at_start": cached,  # 0: nothing (trajectories, samples, results) was reused from earlier work
    }
    log("writing the report: grids, error plots, tables")
    write_report(results, fp, out, quiet=quiet)
    _write_json(out / "results.json", results)
    return results
