"""Fit time of every head on every cached layer, and on a big synthetic feature matrix.

    python bench/heads_bench.py                       # features/ of the project + 20,000 x 25,088
    python bench/heads_bench.py --skip-big            # only the project's features
    python bench/heads_bench.py --project none        # only the synthetic matrix

Prints a Markdown table. Each fit goes through the real train cell (selection.cells.train_cell)
into a temporary directory; fit seconds include reading the training rows. The big case uses
lighter settings than params.yaml (fewer epochs / trees), shown in the `settings` column, so
that the whole script runs in about 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic.py

from synthetic import write_features

from pipeline.features.store import open_splits
from pipeline.heads.registry import HEAD_NAMES
from pipeline.project.layout import Layout
from pipeline.project.params import load_params
from pipeline.selection.cells import train_cell
from pipeline.selection.params import TrainConfig, TrainParams

BIG_STREAM = {  # train.max_memory_mb 512: the 1.9 GiB float32 matrix is streamed
    "max_memory_mb": 512,
    "logreg": {"max_iter": 5},
    "linear_svm": {"max_iter": 5},
    "random_forest": {"n_estimators": 50},
    "dense": {"epochs": 3, "batch_size": 256},
}
BIG_MEMORY = {  # train.max_memory_mb 8192: read whole, except linear_svm (only with --big-memory)
    "max_memory_mb": 8192,
    "logreg": {"max_iter": 30},
    "linear_svm": {"max_iter": 30},
    "random_forest": {"n_estimators": 20},
    "dense": {"epochs": 3, "batch_size": 256},
}


def settings(head: str, cfg: TrainConfig, path: str) -> str:
    if head in ("logreg", "linear_svm"):
        c = getattr(cfg, head)
        solver = "SGD, max epochs" if path == "stream" else "max_iter"
        return f"C={c.C}, {solver} {c.max_iter}"
    if head == "knn":
        return f"k={cfg.knn.n_neighbors}" + (", random projection 256" if path == "stream" else "")
    if head == "random_forest":
        rf = cfg.random_forest
        return f"{rf.n_estimators} trees" + (", random projection 256" if path == "stream" else "")
    d = cfg.dense
    return f"hidden {d.hidden}, max {d.epochs} epochs, batch {d.batch_size}"


def run(
    case: str, project: Path, layers: list[str], heads: list[str], cfg: TrainConfig, rows: list
) -> None:
    """Fit every head on every layer of the features of the project at `project`; the models
    go to a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        layout = Layout(Path(tmp))
        layout.features.symlink_to(Layout(project).features.resolve())
        for layer in layers:
            for head in heads:
                start = time.perf_counter()
                m = train_cell(layer, head, cfg, None, layout)
                rows.append(
                    [
                        case,
                        layer,
                        f"{m.n_train} x {m.feature_width}",
                        head,
                        m.fit_path,
                        settings(head, cfg, m.fit_path),
                        f"{m.fit_seconds:.2f}",
                        f"{m.val_accuracy:.3f}",
                        f"{time.perf_counter() - start:.1f}",
                    ]
                )
                print("| " + " | ".join(rows[-1]) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--project", default=".", help="the project whose features/ to fit on, or 'none'"
    )
    parser.add_argument("--heads", nargs="+", default=list(HEAD_NAMES), choices=HEAD_NAMES)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--big-rows", type=int, default=20_000)
    parser.add_argument("--big-width", type=int, default=25_088)
    parser.add_argument(
        "--big-memory", action="store_true", help="also fit the big matrix in memory (~7 GB peak)"
    )
    args = parser.parse_args()

    rows: list[list[str]] = []
    print("| case | layer | n x width | head | path | settings | fit s | val acc | cell s |")
    print("|---|---|---|---|---|---|---:|---:|---:|")
    if args.project != "none":
        project = Path(args.project)
        params = project / "params.yaml"
        cfg = load_params(TrainParams, params).train if params.is_file() else TrainConfig()
        layers = list(open_splits(Layout(project))["train"].widths)
        run("project features", project, layers, args.heads, cfg, rows)
    if not args.skip_big:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            project = Path(tmp)
            n_eval = max(2, args.big_rows // 10)
            write_features(
                project,
                {"wide": args.big_width},
                {"train": args.big_rows, "val": n_eval, "test": n_eval},
                n_classes=10,
                seed=0,
            )
            print(
                f"(wrote {args.big_rows} x {args.big_width} float16 "
                f"in {time.perf_counter() - start:.0f} s)"
            )
            run("synthetic", project, ["wide"], args.heads, TrainConfig(**BIG_STREAM), rows)
            if args.big_memory:
                run("synthetic", project, ["wide"], args.heads, TrainConfig(**BIG_MEMORY), rows)


if __name__ == "__main__":
    main()
