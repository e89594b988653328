"""The comparison report: sample grids, error plots, ``report.md`` and a self-contained
``report.html`` (images embedded), from the records :mod:`accuquant.compare` wrote."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .images import make_grid
from ..io.files import atomic_path

#: column -> (heading, better: "low" | "high", decimals)
COLUMNS = {
    "fid2fp": ("FID to FP", "low", 3),
    "fid": ("FID", "low", 2),
    "sfid": ("sFID", "low", 2),
    "is": ("IS", "high", 3),
    "psnr": ("PSNR dB", "high", 2),
    "ssim": ("SSIM", "high", 4),
    "class_accuracy": ("class acc.", "high", 3),
    "calibration_s": ("calib. s", "low", 0),
    "peak_rss_mb": ("peak RSS MB", "low", 0),
    "weights_mb": ("weights MB", "low", 3),
}
COST = ("calibration_s", "peak_rss_mb", "weights_mb")


def _value(run: dict, col: str):
    return run["cost"].get(col) if col in COST else run["metrics"].get(col)


def _fmt(v, decimals: int) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{decimals}f}"


def table_rows(results: dict) -> list[dict]:
    """Rows of the table, FP first then each bit width's methods, with the best value of
    each column within a bit width marked."""
    fp = {"method": "FP", "bits": "fp32", "cells": {}, "best": set(), "note": ""}
    for col, (_, _, dec) in COLUMNS.items():
        # paired metrics of the FP model against itself say nothing; costs are the quantizers'
        blank = col in COST or col in ("fid2fp", "psnr", "ssim")
        fp["cells"][col] = "" if blank else _fmt(results["fp"].get(col), dec)
    rows = [fp]
    for bits in results["settings"]["bits"]:
        group = [r for r in results["runs"] if r and r["bits"] == bits]
        best = {}
        for col, (_, better, _) in COLUMNS.items():
            vals = [(_value(r, col), r["method"]) for r in group if _value(r, col) is not None]
            if len(vals) > 1:
                target = (min if better == "low" else max)(v for v, _ in vals)
                best[col] = {m for v, m in vals if v == target}
        for r in group:
            cells = {col: _fmt(_value(r, col), dec) for col, (_, _, dec) in COLUMNS.items()}
            if r["metrics"].get("fid2fp_interval"):  # its 95% bootstrap interval
                cells["fid2fp"] += " ({:.3f}..{:.3f})".format(*r["metrics"]["fid2fp_interval"])
            note = "†" if r["cost"].get("init_cached") else ""
            rows.append({"method": r["method"], "bits": bits, "cells": cells, "note": note,
                         "best": {c for c, ms in best.items() if r["method"] in ms}})
    return rows


# ---------------------------------------------------------------------------- images
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def labelled_rows(rows: list[tuple[str, torch.Tensor]], scale: int = 2) -> Image.Image:
    """One image: a row of samples per model, its name on the left."""
    tiles = [(name, Image.fromarray(make_grid(x, nrow=len(x)))) for name, x in rows]
    tiles = [(n, t.resize((t.width * scale, t.height * scale), Image.NEAREST)) for n, t in tiles]
    label_w = 130
    width = label_w + max(t.width for _, t in tiles)
    height = sum(t.height for _, t in tiles)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = _font(16)
    y = 0
    for name, t in tiles:
        canvas.paste(t.convert("RGB"), (label_w, y))
        draw.text((6, y + t.height // 2), name, fill="black", font=font, anchor="lm")
        y += t.height
    return canvas


def sample_grid(results: dict, fp, out: Path, bits: str, quiet: bool) -> Path:
    """FP and every method at ``bits`` from the same seeds and labels."""
    from ..io.load import load_pipeline

    s = results["settings"]
    kw = dict(seed=s["seed"], steps=s["steps"], scheduler=s["scheduler"], device=s["device"], progress=not quiet,
              prompts=s.get("prompts"))
    rows = [("FP", fp.decode(fp.sample(s["grid"], **kw)).cpu())]
    for method in s["methods"]:
        q = load_pipeline(out / "models" / f"{method}-{bits}").to(s["device"])
        rows.append((method, q.decode(q.sample(s["grid"], **kw)).cpu()))
    path = out / f"grid-{bits}.png"
    with atomic_path(path) as tmp:
        labelled_rows(rows).save(tmp, format="PNG")
    return path


def error_plot(results: dict, out: Path, bits: str) -> Path:
    from .analysis import plot

    curves = {r["method"]: r["errors"] for r in results["runs"] if r and r["bits"] == bits}
    path = out / f"errors-{bits}.png"
    plot(curves, path, title=f"{bits.upper()}: error against the FP model along sampling")
    return path


# ---------------------------------------------------------------------------- text
def settings_lines(results: dict) -> list[tuple[str, str]]:
    s, v = results["settings"], results["versions"]
    return [
        ("model", s["model"]),
        ("methods", ", ".join(s["methods"])),
        ("bit widths", ", ".join(s["bits"])),
        ("sampler", f"{s['scheduler']}, {s['steps']} steps"),
        ("paired samples", f"{s['num']} for the table, {s['analyze_num']} for the error curves (seed {s['seed']})"),
        ("calibration", f"{s['calib_samples']} FP trajectories, seed {s['seed']}, each method with its defaults"),
        ("quantization options", " ".join(f"--{k} {','.join(map(str, x)) if isinstance(x, list) else x}"
                                          for k, x in (s.get("quant") or {}).items()) or "the defaults"),
        ("device", s["device"]),
        ("versions", ", ".join(f"{k} {val}" for k, val in v.items())),
        ("wall time", f"{results['wall_s']:.0f} s for this invocation (pairs run now: "
                      f"{', '.join(results['run_now']) or 'none'}); "
                      f"{sum(r['pair_wall_s'] for r in results['runs'] if r):.0f} s for all pairs"),
    ]


NOTES = ("Best value of each column within a bit width in bold. FID to FP, PSNR and SSIM compare each "
         "quantized sample with the FP sample from the same noise and label; FID, sFID, IS and class accuracy "
         "use the feature network named in results.json. Calibration time and peak resident memory are those "
         "of the `accuquant quantize` process of the pair. † started from the cached per-step result of the "
         "same bits and seed, whose time is in the per-step row.")


def markdown_table(results: dict) -> str:
    rows = table_rows(results)
    head = "| method | bits | " + " | ".join(h for h, _, _ in COLUMNS.values()) + " |"
    lines = [head, "|" + " --- |" * (len(COLUMNS) + 2)]
    for r in rows:
        cells = [f"**{r['cells'][c]}**" if c in r["best"] else r["cells"][c] for c in COLUMNS]
        if r["note"]:
            cells[list(COLUMNS).index("calibration_s")] += " " + r["note"]
        lines.append(f"| {r['method']} | {r['bits']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(results: dict, out: Path) -> Path:
    s = results["settings"]
    parts = ["# accuquant comparison", "", markdown_table(results), "", NOTES, ""]
    for bits in s["bits"]:
        parts += [f"## {bits.upper()}", "", f"![samples at {bits}](grid-{bits}.png)", "",
                  f"![error along sampling at {bits}](errors-{bits}.png)", ""]
    parts += ["## Settings", ""] + [f"- {k}: {v}" for k, v in settings_lines(results)] + [""]
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(parts))
    return path


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f3f3f3; } td.name { text-align: left; }
tr.group td { border-top: 2px solid #888; }
td.best { font-weight: bold; background: #e8f5e9; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
.note { color: #555; font-size: 13px; max-width: 1000px; }
"""

_CHECK = """
<script>
window.addEventListener("load", function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
  var t = document.getElementById("results-table");
  document.getElementById("render-status").textContent =
    "rendered: " + ok + "/" + imgs.length + " images loaded, table rows " + (t ? t.rows.length - 1 : 0);
});
</script>
"""


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def write_html(results: dict, out: Path) -> Path:
    s = results["settings"]
    rows = table_rows(results)
    h = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>accuquant comparison</title>",
         f"<style>{_CSS}</style>", "</head><body>", "<h1>accuquant comparison</h1>",
         '<table id="results-table"><thead><tr><th>method</th><th>bits</th>'
         + "".join(f"<th>{html.escape(hd)}</th>" for hd, _, _ in COLUMNS.values()) + "</tr></thead><tbody>"]
    prev = None
    for r in rows:
        cls = ' class="group"' if prev is not None and r["bits"] != prev else ""
        prev = r["bits"]
        cells = []
        for c in COLUMNS:
            text = html.escape(r["cells"][c]) + (" " + r["note"] if c == "calibration_s" and r["note"] else "")
            cells.append(f'<td class="best">{text}</td>' if c in r["best"] else f"<td>{text}</td>")
        h.append(f'<tr{cls}><td class="name">{html.escape(r["method"])}</td><td class="name">{r["bits"]}</td>'
                 + "".join(cells) + "</tr>")
    h += ["</tbody></table>", f'<p class="note">{html.escape(NOTES).replace("**", "")}</p>']
    for bits in s["bits"]:
        h += [f"<h2>{bits.upper()}</h2>",
              "<p>Samples from the same seeds and labels (top row FP):</p>",
              f'<img alt="samples at {bits}" src="{_data_uri(out / f"grid-{bits}.png")}">',
              "<p>Error against the FP model along sampling: accumulated distance of the trajectories and "
              "per-step distance of the network outputs (left), FID to FP of the predicted clean sample "
              "(right):</p>",
              f'<img alt="error along sampling at {bits}" src="{_data_uri(out / f"errors-{bits}.png")}">']
    h += ["<h2>Settings</h2>", "<table>"]
    h += [f'<tr><td class="name">{html.escape(k)}</td><td class="name">{html.escape(str(v))}</td></tr>'
          for k, v in settings_lines(results)]
    h += ["</table>", '<p class="note" id="render-status">rendered: (scripts off)</p>', _CHECK, "</body></html>"]
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(h))
    return path


def write_report(results: dict, fp, out: Path, quiet: bool = False) -> None:
    for bits in results["settings"]["bits"]:
        sample_grid(results, fp, out, bits, quiet)
        error_plot(results, out, bits)
    write_markdown(results, out)
    write_html(results, out)

