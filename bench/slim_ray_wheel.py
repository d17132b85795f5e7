"""A Ray wheel small enough to carry to a GPU host: the same wheel without Ray's Java worker
jar and the dashboard's web client, which Python jobs on a local cluster never load.

Ray's Python 3.12 wheel is 79 MB; without those parts it is about 46 MB. The wheel's
RECORD is rewritten to match, so pip installs it as usual.

    python bench/slim_ray_wheel.py .whl/ray-*.whl   # rewrites it in place
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

DROPPED = ("ray/jars/", "ray/dashboard/client/")


def slim(wheel: Path) -> tuple[int, int]:
    """Rewrite `wheel` without DROPPED; return (bytes before, bytes after)."""
    before = wheel.stat().st_size
    tmp = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(DROPPED):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(DROPPED)).encode()
            dst.writestr(info, data)
    tmp.replace(wheel)
    return before, wheel.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheels", nargs="+", type=Path)
    for wheel in parser.parse_args().wheels:
        before, after = slim(wheel)
        print(f"{wheel.name}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
