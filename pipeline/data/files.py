"""The files under data.path: a local (or shared) folder, or any filesystem URI that pyarrow
reads (s3://, gs://, file://), listed by one rule.

- Hidden names (a component starting with '.') are left out.
- A local folder (a plain path, or a URI pyarrow resolves to the local filesystem) is listed
  once per real folder: a symlink to a folder is followed unless that folder is listed
  already (by its own path or another link), which also stops every loop; a link to a file
  is that file. A dangling link, a loop, an unreadable entry, a name that is not UTF-8 and
  anything that is not a regular file or folder is a skipped entry with its reason.
- Every call into a URI's filesystem has a deadline (data.timeout_s).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

from pipeline.project.deadline import with_deadline
from pipeline.project.errors import InputError
from pipeline.project.params import DataConfig

DEFAULT_TIMEOUT_S = DataConfig.model_fields["timeout_s"].default


def is_uri(root: str) -> bool:
    return "://" in str(root)


@dataclass(frozen=True)
class RemoteFile:
    """A file under a URI root; reads like a Path (`read_bytes`), prints as its URI."""

    root: str
    rel: str
    timeout_s: float = DEFAULT_TIMEOUT_S

    def read_bytes(self) -> bytes:
        return tree(self.root, self.timeout_s).read(self.rel)

    def __str__(self) -> str:
        return f"{self.root.rstrip('/')}/{self.rel}"


class Listing(NamedTuple):
    """A root's folders, files as (path, length, mtime in ns) and skipped entries as
    (path, reason); paths relative to the root (posix), each list sorted."""

    folders: list[str]
    files: list[tuple[str, int, int]]
    skipped: list[tuple[str, str]]

    @classmethod
    def empty(cls) -> Listing:
        return cls([], [], [])

    def sort(self) -> Listing:
        return Listing(*(sorted(part) for part in self))


class Tree:
    """One root: its listing, and each file by its path relative to the root (posix)."""

    def __init__(self, root: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.root, self.timeout_s = str(root), timeout_s
        self._fs, self._local = None, self.root
        if is_uri(self.root):
            try:
                from pyarrow import fs
            except ImportError:
                raise InputError(
                    f"data.path={self.root!r} is a URI, which needs pyarrow: "
                    "pip install 'layerwise[ray]'"
                ) from None
            try:
                remote, base = self._call("connecting", fs.FileSystem.from_uri, self.root)
            except ValueError as exc:  # not a filesystem pyarrow knows
                raise InputError(
                    f"data.path={self.root!r}: {exc}; give a folder, or a URI pyarrow reads "
                    "(s3://, gs://, file://, ...)"
                ) from None
            if isinstance(remote, fs.LocalFileSystem):  # file://: listed as a plain path is
                self._local = base
            else:
                self._fs, self._base = remote, base.rstrip("/")

    def _call(self, what: str, call, *args):
        """A filesystem call under the deadline; what goes wrong is one InputError."""
        try:
            return with_deadline(self.timeout_s, what, call, *args)
        except TimeoutError as exc:
            problem = exc
        except OSError as exc:
            problem = " ".join(str(exc).split())
        raise InputError(
            f"data.path={self.root!r} is not reachable ({what}: {problem}); check the address, "
            "the network and the credentials pyarrow uses, or raise data.timeout_s for a slow "
            "filesystem, then run `dvc repro` again"
        )

    def is_dir(self) -> bool:
        if self._fs is None:
            return Path(self._local).is_dir()
        from pyarrow import fs

        info = self._call("looking it up", self._fs.get_file_info, self._base)
        return info.type == fs.FileType.Directory

    def walk(self) -> Listing:
        """Every folder, file and skipped entry below the root (the module's rule)."""
        if self._fs is None:
            return _local_listing(self._local)
        from pyarrow import fs

        selector = fs.FileSelector(self._base, recursive=True)
        out = Listing.empty()
        for info in self._call("listing it", self._fs.get_file_info, selector):
            rel = info.path[len(self._base) + 1 :]
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            if info.type == fs.FileType.Directory:
                out.folders.append(rel)
            elif info.type == fs.FileType.File:
                out.files.append((rel, info.size, info.mtime_ns or 0))
        return out.sort()

    def file(self, rel: str) -> Path | RemoteFile:
        """The file `rel`: a Path under a plain path, else a RemoteFile (shown as its URI)."""
        if is_uri(self.root):
            return RemoteFile(self.root, rel, self.timeout_s)
        return Path(self._local) / rel

    def read(self, rel: str) -> bytes:
        if self._fs is None:
            return (Path(self._local) / rel).read_bytes()

        def read() -> bytes:
            with self._fs.open_input_stream(f"{self._base}/{rel}") as f:
                return f.read()

        return self._call(f"reading {rel}", read)


def _local_listing(root: str) -> Listing:
    """The module's rule over a local folder: real folders first, then each link to a folder
    whose real folder is not listed yet (links found inside it join the queue)."""
    out, links = Listing.empty(), []
    top = os.stat(root)
    seen = {(top.st_dev, top.st_ino): ""}  # each real folder listed -> its path here

    def listed_as(rel: str, st: os.stat_result) -> str | None:
        """Where this real folder is listed already, or None (and it is now `rel`)."""
        key = (st.st_dev, st.st_ino)
        if key in seen:
            return seen[key]
        seen[key] = rel
        return None

    def walk(path: str, rel: str) -> None:
        stack = [(path, rel)]
        while stack:
            path, rel = stack.pop()
            try:
                with os.scandir(path) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                out.skipped.append((rel or ".", f"folder cannot be read: {exc.strerror}"))
                continue
            for entry in reversed(entries):  # the stack pops them in name order
                name = f"{rel}/{entry.name}" if rel else entry.name
                if not entry.name.startswith("."):
                    _entry(entry, name, stack)

    def _entry(entry: os.DirEntry, name: str, stack: list) -> None:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            readable = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            out.skipped.append((readable, "its name is not valid UTF-8: rename it"))
            return
        try:
            st = os.stat(entry.path)  # through a link, to what it points at
        except OSError as exc:
            if entry.is_symlink():
                target = os.readlink(entry.path)
                reason = f"a dangling symlink (to {target}: {exc.strerror})"
            else:
                reason = f"cannot be read: {exc.strerror}"
            out.skipped.append((name, reason))
            return
        if stat.S_ISDIR(st.st_mode):
            if entry.is_symlink():
                links.append((name, entry.path, st))
            elif (already := listed_as(name, st)) is None:
                out.folders.append(name)
                stack.append((entry.path, name))
            else:
                out.skipped.append((name, f"the same folder as {already}/: listed once"))
        elif stat.S_ISREG(st.st_mode):
            out.files.append((name, st.st_size, st.st_mtime_ns))
        else:
            out.skipped.append((name, "not a regular file (a device, socket or pipe)"))

    walk(root, "")
    for name, path, st in links:  # grows while linked folders are walked
        already = listed_as(name, st)
        if already is None:
            out.folders.append(name)
            walk(path, name)
        elif already == "" or name.startswith(f"{already}/"):
            where = f"{already}/" if already else "data.path itself"
            out.skipped.append((name, f"a symlink loop (it leads back to {where}): not followed"))
        else:
            out.skipped.append((name, f"a symlink to {already}/, listed there: not followed"))
    return out.sort()


def sha256sum_line(digest: str, name: str) -> str:
    """One line of `sha256sum` output, escaped as GNU coreutils does: a name holding a
    backslash, a newline or a carriage return starts the line with a backslash."""
    escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    mark = "\\" if escaped != name else ""
    return f"{mark}{digest}  {escaped}\n"


def read_sha256sum(text: str) -> list[tuple[str, str]]:
    """(sha256, name) of each line `sha256sum_line` wrote (lines end at '\\n' alone)."""
    entries = []
    for line in text.split("\n"):
        if not line:
            continue
        escaped = line.startswith("\\")
        digest, _, name = line[escaped:].partition("  ")
        if escaped:
            name = _unescape(name)
        entries.append((digest, name))
    return entries


def _unescape(name: str) -> str:
    out, chars = [], iter(name)
    for c in chars:
        if c == "\\":
            c = {"n": "\n", "r": "\r"}.get(nxt := next(chars, ""), nxt)
        out.append(c)
    return "".join(out)


@cache
def tree(root: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Tree:
    """The Tree of `root`, made once per process (a URI's filesystem client is costly)."""
    return Tree(root, timeout_s)
