"""The cost of a head-only experiment against the full run, on the default data and params.

In a fresh git + DVC repository holding this checkout's pipeline and params.yaml (with
--set overrides), it times `dvc repro`, then `dvc exp run -S train.logreg.C=0.3` (one head
re-runs), and prints one table row per configuration; the goal is a head-only experiment
under 10 % of the full run.

    python bench/experiment_bench.py                       # cross-validation on (default)
    python bench/experiment_bench.py --set train.cv.folds=0
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def run(cwd: Path, *cmd: str) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return seconds, result.stdout


def repository(root: Path, overrides: list[str]) -> Path:
    shutil.copytree(
        REPO / "pipeline", root / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, last = key.split(".")
        section = params
        for part in parents:
            section = section[part]
        section[last] = yaml.safe_load(value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "bench@example.invalid"],
        ["git", "config", "user.name", "bench"],
        [sys.executable, "-m", "dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "bench"],
    ):
        run(root, *cmd)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], help="param override, a.b=value")
    args = parser.parse_args()
    dvc = [sys.executable, "-m", "dvc"]
    with tempfile.TemporaryDirectory() as tmp:
        root = repository(Path(tmp), args.set)
        full, _ = run(root, *dvc, "repro")
        run(root, "git", "add", "-A")
        run(root, "git", "commit", "-qm", "baseline")
        head, out = run(root, *dvc, "exp", "run", "-S", "train.logreg.C=0.3")
        stages = [line.split("'")[1] for line in out.splitlines() if "Running stage" in line]
    print("| settings | `dvc repro` s | head-only `dvc exp run` s | share | stages run |")
    print("|---|---:|---:|---:|---|")
    print(
        f"| {' '.join(args.set) or 'defaults'} | {full:.1f} | {head:.1f} | "
        f"{100 * head / full:.1f} % | {', '.join(stages)} |"
    )


if __name__ == "__main__":
    main()
