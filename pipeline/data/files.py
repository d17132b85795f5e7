"""The files under data.path: a local (or shared) folder, or any filesystem URI that pyarrow
reads (s3://, gs://, file://); hidden names (a component starting with '.') are left out."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pipeline.project.errors import InputError


def is_uri(root: str) -> bool:
    return "://" in str(root)


@dataclass(frozen=True)
class RemoteFile:
    """A file under a URI root; reads like a Path (`read_bytes`), prints as its URI."""

    root: str
    rel: str

    def read_bytes(self) -> bytes:
        return tree(self.root).read(self.rel)

    def __str__(self) -> str:
        return f"{self.root.rstrip('/')}/{self.rel}"


class Tree:
    """One root: its listing, and each file by its path relative to the root (posix)."""

    def __init__(self, root: str):
        self.root = str(root)
        self._fs = None
        if is_uri(self.root):
            try:
                from pyarrow import fs
            except ImportError:
                raise InputError(
                    f"data.path={self.root!r} is a URI, which needs pyarrow: "
                    "pip install 'layerwise[ray]'"
                ) from None
            try:
                self._fs, self._base = fs.FileSystem.from_uri(self.root)
            except (ValueError, OSError) as exc:
                raise InputError(f"data.path={self.root!r}: {exc}") from None
            self._base = self._base.rstrip("/")

    def is_dir(self) -> bool:
        if self._fs is None:
            return Path(self.root).is_dir()
        from pyarrow import fs

        return self._fs.get_file_info(self._base).type == fs.FileType.Directory

    def walk(self) -> tuple[list[str], list[tuple[str, int, int]]]:
        """(every folder, every file as (path, length, mtime in ns)), relative and sorted."""
        folders, files = [], []
        if self._fs is None:
            for folder, dirs, names in os.walk(self.root):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                rel = Path(folder).relative_to(self.root).as_posix()
                prefix = "" if rel == "." else f"{rel}/"
                folders.extend(prefix + d for d in dirs)
                for name in names:
                    if not name.startswith("."):
                        st = os.stat(os.path.join(folder, name))
                        files.append((prefix + name, st.st_size, st.st_mtime_ns))
        else:
            from pyarrow import fs

            infos = self._fs.get_file_info(fs.FileSelector(self._base, recursive=True))
            for info in infos:
                rel = info.path[len(self._base) + 1 :]
                if any(part.startswith(".") for part in rel.split("/")):
                    continue
                if info.type == fs.FileType.Directory:
                    folders.append(rel)
                elif info.type == fs.FileType.File:
                    files.append((rel, info.size, info.mtime_ns or 0))
        return sorted(folders), sorted(files)

    def file(self, rel: str) -> Path | RemoteFile:
        return Path(self.root) / rel if self._fs is None else RemoteFile(self.root, rel)

    def read(self, rel: str) -> bytes:
        if self._fs is None:
            return (Path(self.root) / rel).read_bytes()
        with self._fs.open_input_stream(f"{self._base}/{rel}") as f:
            return f.read()


@cache
def tree(root: str) -> Tree:
    """The Tree of `root`, made once per process (a URI's filesystem client is costly)."""
    return Tree(root)
