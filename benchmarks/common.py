"""Helpers the benchmark scripts share."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def settings(args) -> dict:
    """The command's options, with the output path relative to the repository."""
    return {**vars(args), "out": os.path.relpath(args.out, ROOT)}


def parse_options(text: str) -> dict:
    """``"key=value,key=value"`` as method options: integers, floats (``3e-4``) or strings."""
    opts = {}
    for kv in filter(None, text.split(",")):
        k, v = kv.split("=")
        try:
            opts[k] = int(v)
        except ValueError:
            try:
                opts[k] = float(v)
            except ValueError:
                opts[k] = v
    return opts
