"""`layerwise`: start a project on your own images, list backbones and their layers, show a
project's results and run its exported classifier on new images. The stages themselves run
under `dvc repro`."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.backbones.registry import BACKBONE_NAMES, get_backbone
from pipeline.data.files import is_uri
from pipeline.project.errors import BackboneError, InputError
from pipeline.project.stage import TRACEBACK_VARIABLE, one_line_errors

PACKAGE = Path(__file__).resolve().parent
TEMPLATES = PACKAGE / "templates"  # not named dvc.yaml: DVC would collect it as a pipeline
GITIGNORE = "__pycache__/\n/.cache/\n/dvc_plots/\n"


def init(target: Path, images: str, backbone: str, image_size: int | None, weights: str) -> None:
    """A git + DVC project in `target` for the class folders under `images`: this package's
    stage code, dvc.yaml, and params.yaml set to the folder (by absolute path, so queued and
    `--temp` experiments find it), the backbone and its input side."""
    from ruamel.yaml import YAML

    from pipeline.data.sources import load_source
    from pipeline.inputs.params import check

    target = Path(target).resolve()
    if shutil.which("git") is None:
        raise InputError("git is not installed: DVC projects live in git repositories")
    existing = next(p for p in (target, *target.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{existing} is a file, not a directory; give a new or empty directory")
    if target.exists() and any(target.iterdir()):
        raise InputError(f"{target} is not empty; give a new or empty directory")
    yaml = YAML()  # round trip: params.yaml keeps its comments
    params = yaml.load((TEMPLATES / "params.template.yaml").read_text())
    spec = get_backbone(backbone)
    params["data"].update(
        source="folder",
        path=images if is_uri(images) else str(Path(images).resolve()),
        image_size=image_size or spec.facts.top_side,
        limit=None,
    )
    weights = str(Path(weights).resolve()) if Path(weights).is_file() else weights
    params["backbone"].update(name=spec.name, weights=weights)
    checked, resolved = check(json.loads(json.dumps(params)))
    classes, splits = load_source(checked.data)

    ignore = shutil.ignore_patterns("__pycache__", TEMPLATES.name)
    shutil.copytree(PACKAGE, target / "pipeline", ignore=ignore)
    shutil.copy(TEMPLATES / "dvc.template.yaml", target / "dvc.yaml")
    with (target / "params.yaml").open("w") as f:
        yaml.dump(params, f)
    (target / ".gitignore").write_text(GITIGNORE)
    dvc = [sys.executable, "-m", "dvc"]
    for command in (["git", "init", "-q"], [*dvc, "init", "-q"], ["git", "add", "-A"]):
        subprocess.run(command, cwd=target, check=True)
    committed = subprocess.run(
        ["git", "commit", "-q", "-m", "layerwise init"], cwd=target, capture_output=True
    )
    images_found = sum(len(s.labels) for s in splits.values())
    print(
        f"{target}: {images_found} images in {len(classes)} classes ({', '.join(classes[:8])}"
        f"{', ...' if len(classes) > 8 else ''}); {spec.name} at "
        f"{checked.data.image_size} px, layers {', '.join(resolved.layers)}"
    )
    if committed.returncode:
        print("git could not commit (no user.name/user.email?): commit before `dvc exp run`")
    print(f"next: cd {target} && dvc repro && layerwise show")


def backbones() -> None:
    """Each backbone: default input side, minimum side, patch size, parameters, `auto` layers."""
    from tqdm import tqdm

    from pipeline.backbones.facts import cache_dir
    from pipeline.backbones.registry import cached_facts

    rows = [("backbone", "input", "min", "patch", "parameters", "extract.layers: auto")]
    missing = sum(not cached_facts(name) for name in BACKBONE_NAMES)
    names = tqdm(
        BACKBONE_NAMES,
        desc=f"building {missing} backbones once for their layer facts ({cache_dir()})",
        unit="backbone",
        leave=False,
        disable=not missing,
    )
    absent = []
    for name in names:
        try:
            b = get_backbone(name)
        except BackboneError:  # a KerasHub row without keras-hub installed
            absent.append(name)
            continue
        base, top = b.facts.parameters
        tokens = b.facts.tokens
        rows.append(
            (
                name,
                str(b.facts.top_side),
                str(b.min_side),
                str(tokens.patch_size) if tokens else "-",
                f"{base / 1e6:.1f}M" + (f" / {top / 1e6:.1f}M" if top != base else ""),
                ", ".join(f"{k}:{v}" if tokens else k for k, v in b.auto(b.facts.top_side).items()),
            )
        )
    _table(rows)
    print(
        "\nauto at the input side shown; classification-top layers (VGG's fc2) only there; "
        "parameters without / with the classification top. `layerwise layers NAME` lists every "
        "layer with its shape."
    )
    if absent:
        from pipeline.backbones.hub import EXTRA

        print(f"{len(absent)} KerasHub backbones ({', '.join(absent[:3])}, ...) need: {EXTRA}")


def layer_rows(spec, model, size: int) -> list[tuple[str, ...]]:
    """One row per tap of `model` (`spec` built at input side `size`): name, output shape,
    width under none, avg and grid2, and whether `auto` takes it or it ends a block (*)."""
    from pipeline.features.reductions import reduced_width

    auto, ends = spec.auto(size), set(spec.block_ends())
    rows = []
    for name, shape in spec.tap_shapes(model, size):
        pools = len(shape) == 3 or (len(shape) == 2 and spec.facts.tokens is not None)
        rows.append(
            (
                name,
                "x".join(str(d) for d in shape),
                str(reduced_width(shape, "none")),
                str(reduced_width(shape, "avg")) if pools else "-",
                str(reduced_width(shape, "grid2")) if pools else "-",
                "auto" if name in auto else "*" if name in ends else "",
            )
        )
    return rows


def layers(name: str, image_size: int | None) -> None:
    """Every layer of `name` at `image_size`: output shape, width under each reduction, and
    which are block ends (*) or taken by `extract.layers: auto`."""
    spec = get_backbone(name)
    top = spec.facts.top_side
    size = image_size or top
    problem = spec.layer_problem(size, {})
    if problem:
        raise InputError(problem)
    rows = layer_rows(spec, spec.build_unweighted(size), size)
    _table([("layer", "output", "none", "avg", "grid2", ""), *rows])
    note = "" if size == top or spec.facts.tokens else f"; its classification top needs {top} px"
    print(
        f"\n{name} at {size} px: {len(rows)} layers{note}. auto: taken by "
        "`extract.layers: auto`; *: other block ends. Widths are features per image."
    )


WIDTH = 100  # `layerwise show` fits this many columns unless --wide


def layers_view(layers: list[str]) -> str:
    """The `dvc exp show` command whose columns are each layer's best selection accuracy."""
    return f"dvc exp show --drop '.*' --keep 'Experiment|^({'|'.join(layers)})$'"


def stale_stages(root: Path, seconds: float = 60) -> list[str] | None:
    """The stages `dvc status` lists as changed in `root` (not `scan`, which always runs), or
    None when DVC cannot tell (not a DVC project, or no answer within `seconds`)."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "status", "--json"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=seconds,
        )
        status = json.loads(done.stdout or "null")
    except (subprocess.TimeoutExpired, ValueError):
        return None
    if done.returncode or not isinstance(status, dict):
        return None
    return [name for name, why in status.items() if why != ["always changed"]]


@contextlib.contextmanager
def damaged(path: Path, root: Path):
    """A results file that is truncated, hand-edited or from another version: one line."""
    try:
        yield
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise InputError(
            f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:80]}): "
            f"it is damaged or was written by another version; run `dvc repro` in {root}"
        ) from None


def show(root: Path, wide: bool = False) -> None:
    """The leaderboard, the test metrics and the exported winner of the project in `root`, in
    100 columns (`wide`: the whole leaderboard.md), after a warning when they are stale."""
    import textwrap

    from pipeline.project.layout import Layout

    layout = Layout(root)
    board = layout.leaderboard_md
    if not board.is_file():
        raise InputError(f"{board} not found: run `dvc repro` in {root} first")
    stale = stale_stages(root)
    if stale:
        print(
            textwrap.fill(
                f"STALE (run `dvc repro`): `dvc status` lists changed stages "
                f"({', '.join(stale[:4])}{', ...' if len(stale) > 4 else ''}); these results "
                "predate the change",
                WIDTH,
            )
            + "\n"
        )
    if wide:
        print(board.read_text())
    else:
        with damaged(layout.leaderboard_csv, root):
            _leaderboard(layout)
    lines = []
    if not wide and layout.select_metrics.is_file():
        with damaged(layout.select_metrics, root):
            tie = json.loads(layout.select_metrics.read_text()).get("tie_break")
        lines += [f"tie: {tie}"] if tie else []
    if layout.test_metrics.is_file():
        with damaged(layout.test_metrics, root):
            lines += _test_lines(json.loads(layout.test_metrics.read_text()))
    if layout.card.is_file():
        from pipeline.project.records import ClassifierCard

        card = ClassifierCard.read(layout.card, f"dvc repro export (in {root})")
        lines.append(
            f"exported: {card.cell} ({card.source}), test accuracy {card.test.accuracy:.4f}, "
            f"in {layout.classifier}: {card.why}"
        )
        lines.append(
            "`layerwise predict IMAGES...` runs it; mistakes: "
            f"{layout.errors_csv}, {layout.mistakes_png}"
        )
    for line in lines:
        print(textwrap.fill(line, WIDTH, subsequent_indent="  "))
    if layout.layer_metrics.is_file():  # a command to copy: not wrapped
        with damaged(layout.layer_metrics, root):
            layers = list(json.loads(layout.layer_metrics.read_text()))
        print(f"each layer across experiments:\n  {layers_view(layers)}")


def _leaderboard(layout) -> None:
    """reports/leaderboard.csv in seven columns."""
    import csv

    from pipeline.project.records import short

    with layout.leaderboard_csv.open(newline="") as f:
        ranked = list(csv.DictReader(f))
    top = ranked[0]
    estimate = f"cv{top['cv_folds']}" if top["selection"] == "cv" else "val"
    print(
        f"{top['backbone']} ({short(top['weights'])} weights): {len(ranked)} cells, ranked "
        f"by {estimate} accuracy (test: for reference only)\n"
    )
    rows = [("#", "cell", "est", "val acc", "95% interval", "test acc", "fit s")]
    for r in ranked:
        low, high = (float(v) for v in r["val_accuracy_ci95"].strip("()[]").split(","))
        cell = r["cell"] if len(r["cell"]) <= 40 else r["cell"][:39] + "\u2026"
        est = f"cv{r['cv_folds']}" if r["selection"] == "cv" else "val"
        rows.append(
            (
                r["rank"],
                cell,
                est,
                f"{float(r['val_accuracy']):.4f}",
                f"[{low:.3f}, {high:.3f}]",
                f"{float(r['test_accuracy']):.4f}",
                f"{float(r['fit_seconds']):.2f}",
            )
        )
    _table(rows)
    print()


def _test_lines(result: dict) -> list[str]:
    """One line per model of metrics/test.json."""
    lines = []
    for name, m in result.items():
        if isinstance(m, dict) and "test_accuracy" in m:
            low, high = m.get("test_accuracy_ci95") or (None, None)
            ci = f" [{float(low):.3f}, {float(high):.3f}]" if low is not None else ""
            where = m.get("cell") or f"from {m.get('started_from')}"
            lines.append(
                f"{name}: test accuracy {float(m['test_accuracy']):.4f}{ci}, macro-F1 "
                f"{float(m['test_macro_f1']):.4f} ({where})"
            )
    return lines


def predict(args: argparse.Namespace) -> None:
    """Rows of the exported classifier's predictions (`--top`: of the backbone's own ImageNet
    top); a summary on stderr."""
    from pipeline.winner import predict as winner

    if args.top:
        from pipeline.winner.imagenet import backbone_of, top_classifier

        name, weights = backbone_of(args.project) if not args.backbone else (args.backbone, None)
        classifier, note = top_classifier(name, args.weights or weights or "auto")
        if note:
            print(f"note: {note}", file=sys.stderr)
    else:
        classifier = winner.exported(args.project)
    r = winner.predict_files(args.paths, classifier, args.out, args.batch_size)
    print(
        f"predicted {r['images']} images ({r['per_second']:.1f} images/s), "
        f"{r['failed']} could not be read" + (f"; rows in {args.out}" if args.out else ""),
        file=sys.stderr,
    )


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="layerwise",
        description=__doc__,
        epilog=f"{TRACEBACK_VARIABLE}=1 shows tracebacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("init", help="a git + DVC project for a folder of class folders")
    i.add_argument("dir", type=Path, help="the new project's directory (new or empty)")
    i.add_argument(
        "--images",
        required=True,
        help="a folder of class folders (optionally train/ val/ test/ inside), or its "
        "s3:// or gs:// URI (with the `ray` extra)",
    )
    i.add_argument("--backbone", default="vgg16", help="`layerwise backbones` lists them")
    i.add_argument("--image-size", type=int, help="input side (default: the backbone's)")
    i.add_argument(
        "--weights", default="auto", help="auto | imagenet | random | a .weights.h5 file"
    )
    sub.add_parser("backbones", help="backbones with input size, parameters, suggested layers")
    la = sub.add_parser("layers", help="a backbone's layers, output shapes and widths")
    la.add_argument("name", help="a backbone, as `layerwise backbones` lists them")
    la.add_argument("--image-size", type=int, help="input side (default: the backbone's)")
    s = sub.add_parser("show", help="the leaderboard and test metrics of a project")
    s.add_argument("dir", type=Path, nargs="?", default=Path("."))
    s.add_argument("--wide", action="store_true", help="the whole leaderboard (wider lines)")
    pr = sub.add_parser("predict", help="the project's exported classifier on image files")
    pr.add_argument("paths", nargs="+", help="image files, folders (recursively) or globs")
    pr.add_argument("--project", type=Path, default=Path("."), help="the project (default: .)")
    pr.add_argument("--out", type=Path, help="a .csv or .jsonl file (default: CSV on stdout)")
    pr.add_argument("--batch-size", type=int, default=32)
    pr.add_argument(
        "--top",
        action="store_true",
        help="the backbone with its own ImageNet top instead (1,000 classes; rows list the 5 "
        "most probable)",
    )
    pr.add_argument(
        "--backbone",
        help="with --top: a keras.applications backbone (default: the project's backbone.name)",
    )
    pr.add_argument(
        "--weights",
        help="with --top: imagenet | auto | a .weights.h5 file with "
        "the top (default: the project's backbone.weights)",
    )
    return p


@contextlib.contextmanager
def _closed_pipe():
    """Output piped into a reader that stops early (`| head`): stop quietly, as `ls` does."""
    try:
        yield
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    with one_line_errors(f"layerwise {args.command}"), _closed_pipe():
        if args.command == "init":
            init(args.dir, args.images, args.backbone, args.image_size, args.weights)
        elif args.command == "backbones":
            backbones()
        elif args.command == "layers":
            layers(args.name, args.image_size)
        elif args.command == "predict":
            predict(args)
        else:
            show(args.dir, args.wide)


if __name__ == "__main__":
    main()
