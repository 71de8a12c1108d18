"""`make bench`: every benchmark, each printing its table; full runs' tables also land in
benchmarks/results/ (a --quick smoke run leaves the committed results alone).

usage: python benchmarks/run_all.py [--quick]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK = {
    "throughput.py": ["--events", "50000"],
    "replay_speed.py": ["--events", "200000"],
    "detection.py": ["--quick", "--out", "/dev/null"],
}


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    (HERE / "results").mkdir(exist_ok=True)
    for script in ("throughput.py", "replay_speed.py", "detection.py"):
        if not (HERE / script).exists():
            continue
        args = QUICK[script] if quick else []
        print(f"\n$ python benchmarks/{script} {' '.join(args)}", flush=True)
        out = subprocess.run(
            [sys.executable, str(HERE / script), *args], capture_output=True, text=True
        )
        sys.stderr.write(out.stderr[-2000:] if out.returncode else "")
        print(out.stdout, flush=True)
        if out.returncode:
            return out.returncode
        if script != "detection.py" and not quick:  # detection.py writes its own file
            (HERE / "results" / script.replace(".py", ".md")).write_text(out.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
