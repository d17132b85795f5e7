"""How every stage runs as a command: `--help` that runs nothing, a quiet backend start-up,
and one line, no traceback, for an error the user can fix (LAYERWISE_TRACEBACK=1 shows it)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Callable

from pipeline.project.errors import InputError

TRACEBACK_VARIABLE = "LAYERWISE_TRACEBACK"
# What TensorFlow, absl and CUDA print while starting, before absl's logging is set up.
START_UP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} [\d:. ]+\d+ \S+:\d+\]"
    r"|To enable the following instructions|.*oneDNN custom operations are on)"
)


@contextlib.contextmanager
def filtered_stderr():
    """Hold what is written to file descriptor 2 (C++ libraries write there directly) and
    pass on every line that is not start-up noise."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = [
                line
                for line in held.read().decode(errors="replace").splitlines(keepends=True)
                if line.strip() and not START_UP_NOISE.match(line)
            ]
            sys.stderr.write("".join(kept))


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Imports TensorFlow, and lets CUDA look for devices, inside `filtered_stderr`."""

    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        load = spec.loader.exec_module

        def exec_module(module):
            with filtered_stderr():
                load(module)
                module.config.list_physical_devices("GPU")

        spec.loader.exec_module = exec_module
        return spec


def quiet_backend() -> None:
    """Silence the backend's start-up messages whenever it is first imported."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _QuietTensorFlow) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietTensorFlow())


def run_stage(
    name: str,
    doc: str | None,
    work: Callable[[argparse.Namespace], None],
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> None:
    """Parse the stage's arguments (`--help` exits here), then run `work`; an InputError
    exits non-zero with one line naming the stage."""
    parser = argparse.ArgumentParser(
        prog=f"python -m pipeline.{name}",
        description=doc,
        epilog=f"Run by `dvc repro`; reads params.yaml. {TRACEBACK_VARIABLE}=1 shows tracebacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if arguments:
        arguments(parser)
    args = parser.parse_args(argv)
    with one_line_errors(name):
        work(args)


@contextlib.contextmanager
def one_line_errors(name: str):
    """An InputError raised inside exits with `name: message` on one line, no traceback
    (unless LAYERWISE_TRACEBACK is set)."""
    try:
        yield
    except InputError as exc:
        if os.environ.get(TRACEBACK_VARIABLE):
            raise
        raise SystemExit(f"{name}: {' '.join(str(exc).split())}") from None
