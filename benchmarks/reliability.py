"""The reliability report: kills resumed identically, bad inputs refused, concurrent runs.

* kills: read from ``benchmarks/results/kill_resume.json`` (``kill_resume.py`` writes it:
  per job, how many of its killed-and-resumed runs saved the uninterrupted run's model bit
  for bit and left no temporary file);
* bad inputs: every case of ``tests/test_bad_inputs.py`` run (one line on stderr, exit
  status 2, no traceback, nothing written), and the full-disk case;
* concurrent runs: ``--pairs`` times, two quantizations started at once on one cache
  (``tests/test_reliability.py``: both succeed with the same model, every cache entry valid).

    python benchmarks/reliability.py --pairs 3    # writes benchmarks/results/reliability.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from common import ROOT


def pytest_counts(*args: str) -> dict:
    """Run pytest on ``args``; the passed and failed counts from its summary line."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                       capture_output=True, text=True, env=env)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|skipped)", last)}
    return {"passed": counts.get("passed", 0), "failed": counts.get("failed", 0) + counts.get("error", 0),
            "skipped": counts.get("skipped", 0), "summary": last}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=3, help="concurrent pairs of runs")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/reliability"))
    args = p.parse_args()
    kills_file = ROOT / "benchmarks/results/kill_resume.json"
    kills = json.loads(kills_file.read_text()) if kills_file.exists() else {"jobs": []}
    bad = pytest_counts("tests/test_bad_inputs.py", "-k", "bad_input or full_disk")
    pairs = [pytest_counts("tests/test_reliability.py", "-k", "two_runs") for _ in range(args.pairs)]
    doc = {
        "kills": [{k: j[k] for k in ("job", "trials", "interrupted", "identical", "uninterrupted_s")}
                  for j in kills["jobs"]],
        "bad_inputs": bad,
        "concurrent_pairs": {"tried": args.pairs, "succeeded": sum(x["passed"] == 1 and not x["failed"] for x in pairs)},
    }
    tmp = Path(args.out + ".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(args.out + ".json")
    lines = ["| check | tried | as required |", "| --- | --- | --- |"]
    for j in doc["kills"]:
        lines.append(f"| `{j['job']}` killed (SIGKILL or SIGINT, {j['interrupted']} of them before it finished) "
                     f"and resumed: bit-identical model, no temporary file left | {j['trials']} | {j['identical']} |")
    lines.append(f"| bad inputs (`tests/test_bad_inputs.py`): one line, exit status 2, nothing written | "
                 f"{bad['passed'] + bad['failed']} | {bad['passed']} |")
    c = doc["concurrent_pairs"]
    lines.append(f"| two quantizations at once on one cache: both succeed, same model, every cache entry valid | "
                 f"{c['tried']} | {c['succeeded']} |")
    Path(args.out + ".md").write_text(
        "Written by benchmarks/reliability.py (kills: benchmarks/kill_resume.py, on a tiny class-conditional "
        "UNet, 3 DDIM steps; every fifth kill lands the moment a file is being written).\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
