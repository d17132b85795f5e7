"""`layerwise`: start a project on your own images, list backbones and their layers, and show
a project's results. The stages themselves run under `dvc repro`."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.backbones import BACKBONE_NAMES, BACKBONES, get_backbone, layer_table
from pipeline.errors import InputError
from pipeline.files import is_uri
from pipeline.stage import TRACEBACK_VARIABLE, one_line_errors

PACKAGE = Path(__file__).resolve().parent
TEMPLATES = PACKAGE / "templates"  # not named dvc.yaml: DVC would collect it as a pipeline
GITIGNORE = "__pycache__/\n/.cache/\n/dvc_plots/\n"


def init(target: Path, images: str, backbone: str, image_size: int | None, weights: str) -> None:
    """A git + DVC project in `target` for the class folders under `images`: this package's
    stage code, dvc.yaml, and params.yaml set to the folder (by absolute path, so queued and
    `--temp` experiments find it), the backbone and its input side."""
    from ruamel.yaml import YAML

    from pipeline.config import parse_params
    from pipeline.sources import load_source

    target = Path(target).resolve()
    if shutil.which("git") is None:
        raise InputError("git is not installed: DVC projects live in git repositories")
    if target.exists() and any(target.iterdir()):
        raise InputError(f"{target} is not empty; give a new or empty directory")
    yaml = YAML()  # round trip: params.yaml keeps its comments
    params = yaml.load((TEMPLATES / "params.template.yaml").read_text())
    spec = get_backbone(backbone)
    params["data"].update(
        source="folder",
        path=images if is_uri(images) else str(Path(images).resolve()),
        image_size=image_size or spec.top_size,
        limit=None,
    )
    weights = str(Path(weights).resolve()) if Path(weights).is_file() else weights
    params["backbone"].update(name=spec.name, weights=weights)
    checked = parse_params(json.loads(json.dumps(params)))
    classes, splits = load_source(checked.data)

    (target / "pipeline").mkdir(parents=True)
    for module in PACKAGE.glob("*.py"):
        shutil.copy(module, target / "pipeline" / module.name)
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
        f"{checked.data.image_size} px, layers {', '.join(checked.extract.layers)}"
    )
    if committed.returncode:
        print("git could not commit (no user.name/user.email?): commit before `dvc exp run`")
    print(f"next: cd {target} && dvc repro && layerwise show")


def backbones() -> None:
    """Each backbone: default input side, parameters, suggested layers (auto first)."""
    rows = [("backbone", "input", "min", "parameters (no top / top)", "extract.layers: auto")]
    for b in BACKBONES.values():
        rows.append(
            (
                b.name,
                f"{b.top_size}",
                f"{b.min_size}",
                f"{b.parameters[0] / 1e6:.1f}M / {b.parameters[1] / 1e6:.1f}M",
                ", ".join(b.auto_layers),
            )
        )
    _table(rows)
    print(
        "\nauto takes layers of the classification top (fc2) only at the input side of the top. "
        "`layerwise layers NAME` lists every layer with its shape."
    )


def layers(name: str, image_size: int | None) -> None:
    """Every layer of `name` at `image_size`: output shape, width under each reduction, and
    which are suggested (block ends) or taken by `extract.layers: auto`."""
    from pipeline.backbones import load_backbone
    from pipeline.layers import reduced_width

    spec = get_backbone(name)
    size = image_size or spec.top_size
    table = layer_table(name)
    wanted = list(table["base"]) + (list(table["top"]) if size == spec.top_size else [])
    model, _ = load_backbone(name, "random", size, wanted)
    auto = spec.auto(size)
    rows = [("layer", "output", "none", "avg", "grid2", "")]
    for layer in model.layers:
        shape = tuple(layer.output.shape[1:])
        spatial = len(shape) == 3
        mark = "auto" if layer.name in auto else "*" if layer.name in spec.feature_layers else ""
        rows.append(
            (
                layer.name,
                "x".join(str(d) for d in shape),
                str(reduced_width(shape, "none")),
                str(reduced_width(shape, "avg")) if spatial else "-",
                str(reduced_width(shape, "grid2")) if spatial else "-",
                mark,
            )
        )
    _table(rows)
    top = "" if size == spec.top_size else f"; its classification top needs {spec.top_size} px"
    print(
        f"\n{name} at {size} px: {len(rows) - 1} layers{top}. auto: taken by "
        "`extract.layers: auto`; *: other block ends. Widths are features per image."
    )


def show(root: Path) -> None:
    """The leaderboard and the test metrics of the project in `root`."""
    board, test = root / "reports" / "leaderboard.md", root / "metrics" / "test.json"
    if not board.is_file():
        raise InputError(f"{board} not found: run `dvc repro` in {root} first")
    print(board.read_text())
    if test.is_file():
        result = json.loads(test.read_text())
        for name, m in result.items():
            if isinstance(m, dict) and "test_accuracy" in m:
                low, high = m.get("test_accuracy_ci95") or (None, None)
                ci = f" [{low:.3f}, {high:.3f}]" if low is not None else ""
                print(
                    f"{name}: test accuracy {m['test_accuracy']:.4f}{ci}, macro-F1 "
                    f"{m['test_macro_f1']:.4f}" + (f" ({m['cell']})" if "cell" in m else "")
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
    i.add_argument("--backbone", default="vgg16", choices=BACKBONE_NAMES)
    i.add_argument("--image-size", type=int, help="input side (default: the backbone's)")
    i.add_argument(
        "--weights", default="auto", help="auto | imagenet | random | a .weights.h5 file"
    )
    sub.add_parser("backbones", help="backbones with input size, parameters, suggested layers")
    la = sub.add_parser("layers", help="a backbone's layers, output shapes and widths")
    la.add_argument("name", choices=BACKBONE_NAMES)
    la.add_argument("--image-size", type=int, help="input side (default: the backbone's)")
    s = sub.add_parser("show", help="the leaderboard and test metrics of a project")
    s.add_argument("dir", type=Path, nargs="?", default=Path("."))
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    with one_line_errors(f"layerwise {args.command}"):
        if args.command == "init":
            init(args.dir, args.images, args.backbone, args.image_size, args.weights)
        elif args.command == "backbones":
            backbones()
        elif args.command == "layers":
            layers(args.name, args.image_size)
        else:
            show(args.dir)


if __name__ == "__main__":
    main()
