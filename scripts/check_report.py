"""Open a comparison's report.html in headless Chromium: check that every image loaded and
the results table is there, and save a screenshot beside the report.

    python scripts/check_report.py runs/compare/report.html   # exit 0 when it renders

The report sets a status line once the page has loaded ("rendered: N/N images loaded,
table rows R"); Chromium's DOM dump after the load shows it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, *args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--virtual-time-budget=5000", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout


def check(report: Path, screenshot: Path | None = None) -> tuple[int, int, int]:
    """``(images loaded, images, table rows)`` as the page itself counted them."""
    browser = chromium()
    if browser is None:
        raise SystemExit("check_report: no chromium on this machine (apt install chromium)")
    url = report.resolve().as_uri()
    dom = _run(browser, "--dump-dom", url)
    m = re.search(r"rendered: (\d+)/(\d+) images loaded, table rows (\d+)", dom)
    if not m:
        raise SystemExit(f"check_report: {report}: the page did not finish loading (no status line)")
    if screenshot is not None:
        _run(browser, f"--screenshot={screenshot.resolve()}", "--window-size=1280,2400", url)
    return int(m[1]), int(m[2]), int(m[3])


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    report = Path(sys.argv[1])
    shot = report.with_name("report-screenshot.png")
    ok, n, rows = check(report, shot)
    print(f"{report}: {ok}/{n} images loaded, {rows} table rows; screenshot {shot}")
    return 0 if ok == n and n > 0 and rows > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
