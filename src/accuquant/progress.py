"""Progress bars (tqdm), written to stderr and silent when disabled."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int, desc: str, disable: bool = False):
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True)
