"""``accuquant models``: the model families accuquant handles, from the adapters' registry."""

from __future__ import annotations


def add_parser(sub) -> None:
    sp = sub.add_parser("models", help="the supported model families: pipeline and denoiser classes, default "
                        "sampler, what stays in FP, quantized attention, integer backends")
    sp.add_argument("--json", action="store_true", help="print one JSON list")


def table() -> str:
    """The families as a markdown table (``accuquant models``, and the README's, generated from it)."""
    from ..models import families

    rows = [c.describe() for c in families()]
    head = ["family", "pipeline", "denoiser", "conditions", "sampler", "kept in FP by default", "attention quantized",
            "int8 / cuda-int8"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        media = "" if r["media"] == "image" else f" ({r['media']})"
        cells = [r["family"] + media, f"`{r['pipeline']}`", f"`{r['denoiser']}`", r["conditioning"], r["sampler"],
                 ", ".join(f"`{k}`" for k in r["keep_fp"]) or "none", ", ".join(r["attention"]),
                 " / ".join("yes" if r[b] else "no" for b in ("int8", "cuda-int8"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run(args) -> None:
    import json

    from ..models import families

    print(json.dumps([c.describe() for c in families()], indent=2) if args.json else table())
