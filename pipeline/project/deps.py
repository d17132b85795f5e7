"""dvc.yaml's code deps, derived: each stage depends on the files of every module its command
imports (provenance.stage_modules) and on scan's records of the libraries that code imports.

`python -m pipeline.project.deps` rewrites them in dvc.yaml (comments and other deps kept);
`--check` only says whether they are current (tests/test_provenance.py runs the same check).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.project.layout import Layout
from pipeline.project.provenance import LIBRARIES, PACKAGE, stage_libraries, stage_modules


def stage_module(command: str) -> str:
    """`python -m pipeline.train --head x` -> `train`."""
    return command.split(f"{PACKAGE.name}.", 1)[1].split()[0]


def derived_deps(name: str, stage: dict) -> list[str]:
    """The stage's deps with its code and library records as its command's imports give them;
    other deps (data, features, ...) first, as listed."""
    module = stage_module(stage["cmd"])
    records = {str(Layout().library_record(d)) for d in LIBRARIES.values()}
    kept = [
        d
        for d in stage.get("deps", [])
        if not str(d).startswith(f"{PACKAGE.name}/") and d not in records
    ]
    libraries = (
        [] if name == "scan" else [str(Layout().library_record(d)) for d in stage_libraries(module)]
    )
    return kept + libraries + list(stage_modules(module))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.project.deps", description=__doc__)
    parser.add_argument("dvc_yaml", nargs="?", default="dvc.yaml", type=Path)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    from ruamel.yaml import YAML

    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)
    yaml.width = 100
    document = yaml.load(args.dvc_yaml.read_text())
    stale = []
    for name, stage in document["stages"].items():
        want = derived_deps(name, stage)
        if list(stage.get("deps", [])) != want:
            stale.append(name)
            if not args.check:
                deps = stage["deps"]
                comments = {str(d): deps.ca.items.get(i) for i, d in enumerate(deps)}
                deps.clear()
                deps.extend(want)
                for i, d in enumerate(want):
                    if comments.get(d):
                        deps.ca.items[i] = comments[d]
    if args.check:
        if stale:
            sys.exit(f"{args.dvc_yaml}: stale code deps in {', '.join(stale)}: run `{parser.prog}`")
        return
    with args.dvc_yaml.open("w") as f:
        yaml.dump(document, f)
    print(
        f"{args.dvc_yaml}: " + (f"rewrote the deps of {', '.join(stale)}" if stale else "current")
    )


if __name__ == "__main__":
    main()
