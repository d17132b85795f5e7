"""Making the prepared data set (data/prepared): every usable image of the source decoded and
resized once, on every core, into arrays; or with data.prepared: manifest, each usable file
listed with its sha256 (extract decodes them). data.prepared reads it back.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.arrays import NpyWriter
from pipeline.data.decoding import DataError, decode_file, decode_workers, identify, resize
from pipeline.data.files import RemoteFile, sha256sum_line
from pipeline.data.sources import FolderListing, Split, load, source_record
from pipeline.project.layout import SPLITS, Layout, PreparedFiles
from pipeline.project.params import DataConfig
from pipeline.project.provenance import code_digest
from pipeline.project.records import PreparedRecord, file_sha256


class _Hashed:
    """A file whose bytes, once read, leave their sha256 behind (read once, for both)."""

    def __init__(self, file: Path | RemoteFile):
        self.file, self.sha256 = file, None

    def read_bytes(self) -> bytes:
        data = self.file.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        return data


def decode_split(name: str, split: Split, cfg: DataConfig) -> Iterator[tuple]:
    """Decode and resize a split once, in order: (index, (image, sha256 of the file or None),
    None) for each usable item, (index, None, reason) for each unusable file. Files are decoded
    on decode_workers threads (PIL releases the GIL while it decodes and resizes)."""
    size = cfg.image_size
    if split.images is not None:
        for i, a in enumerate(tqdm(split.images, desc=f"resize {name}", unit="img", leave=False)):
            image = resize(Image.fromarray(np.asarray(a, np.uint8)), size, cfg.interpolation)
            yield i, (image, None), None
        return

    def decode(path: Path | RemoteFile) -> tuple[np.ndarray, str | None]:
        hashed = _Hashed(path)
        return decode_file(hashed, size, cfg.interpolation), hashed.sha256

    yield from _over_files(f"decode {name}", split.paths, cfg, decode)


def list_split(name: str, split: Split, cfg: DataConfig) -> Iterator[tuple]:
    """For a manifest: (index, sha256 of the file, None) for each file PIL can identify,
    (index, None, reason) for the others; nothing is decoded."""

    def check(path: Path | RemoteFile) -> str:
        data = path.read_bytes()
        identify(data)
        return hashlib.sha256(data).hexdigest()

    yield from _over_files(f"list {name}", split.paths, cfg, check)


def _over_files(desc: str, files: list[Path], cfg: DataConfig, work) -> Iterator[tuple]:
    """(index, work(file), None) or (index, None, reason), in order, on decode_workers threads;
    what is queued is dropped when the caller stops early."""

    def attempt(path: Path):
        try:
            return work(path), None
        except ValueError as exc:
            return None, str(exc)
        except OSError as exc:  # gone since the listing, unreadable
            return None, f"cannot be read: {exc.strerror or exc}"

    workers = decode_workers(cfg)
    pool = ThreadPoolExecutor(workers)
    try:
        results = pool.map(attempt, files)
        bar = tqdm(results, total=len(files), desc=f"{desc} ({workers} threads)", unit="img")
        for i, (value, reason) in enumerate(bar):
            yield i, value, reason
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def prepare(cfg: DataConfig, layout: Layout = Layout()) -> tuple[PreparedRecord, list[dict]]:
    """Write data/prepared/ (layout.PreparedFiles): each split's images (decoded once, streamed
    to disk; with data.prepared=manifest a listing of files and sha256s instead) and labels,
    manifest.csv, report.json and the PreparedRecord; return (record, skipped). Written into
    `<prepared>.partial` and renamed: never seen half-made. Byte-identical files in two splits
    are a warning (data.on_duplicate: fail stops instead)."""
    source, code = source_record(cfg), code_digest("prepare")  # what this run reads
    found = load(cfg)
    if found.skipped and cfg.on_bad_image == "fail":
        first = found.skipped[0]
        raise DataError(
            f"{cfg.path.rstrip('/')}/{first['path']}: {first['reason']} "
            f"(data.on_bad_image=fail; {len(found.skipped)} such entries)"
        )
    out = layout.prepared
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        record, skipped, twins = _write_prepared(cfg, PreparedFiles(tmp), found, source, code)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if twins:
        print(
            f"prepare: warning: {_twins_message(twins, layout.prepared_files.report)}",
            file=sys.stderr,
        )
    return record, skipped


def _write_prepared(cfg, out: PreparedFiles, found: FolderListing, source, code):
    class_names, splits = found.class_names, found.splits
    side, skipped, labels, written = cfg.image_size, list(found.skipped), {}, []
    first_seen, twins = {}, []  # sha256 -> (split, id) of its first file; files with a twin
    with out.manifest.open("w", newline="") as manifest_file:
        manifest = csv.writer(manifest_file, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n")
        manifest.writerow(["split", "index", "label", "source"])
        for name in SPLITS:
            split = splits[name]
            listed = cfg.prepared == "manifest"
            if listed:
                written.append(out.files(name))
                out_file = written[-1].open("w", newline="")
                items = list_split(name, split, cfg)
            else:
                written.append(out.images(name))
                out_file = NpyWriter(written[-1], (side, side, 3), np.uint8, len(split.labels))
                items = decode_split(name, split, cfg)
            keep = []
            for i, value, reason in items:
                if value is None:
                    if cfg.on_bad_image == "fail":
                        raise DataError(f"{split.paths[i]}: {reason} (data.on_bad_image=fail)")
                    skipped.append({"path": split.ids[i], "split": name, "reason": reason})
                    continue
                manifest.writerow([name, len(keep), class_names[split.labels[i]], split.ids[i]])
                if listed:  # value: the file's sha256
                    digest = value
                    out_file.write(sha256sum_line(digest, split.ids[i]))
                else:  # value: the decoded image and the file's sha256
                    image, digest = value
                    out_file.append(image)
                twin = first_seen.setdefault(digest, (name, split.ids[i])) if digest else None
                if twin and twin[0] != name:
                    twins.append({"path": split.ids[i], "split": name, "twin": twin[1]})
                keep.append(i)
            out_file.close()
            labels[name] = split.labels[keep].astype(np.int32)
            written.append(out.labels(name))
            np.save(written[-1], labels[name])
    counts = np.bincount(labels["train"], minlength=len(class_names))
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        raise DataError(f"no usable training images left for class(es): {', '.join(empty)}")
    for name in SPLITS:
        if len(labels[name]) == 0:
            raise DataError(f"the {name} split is empty: add images or change the fractions")
    if twins and cfg.on_duplicate == "fail":
        raise DataError(f"{_twins_message(twins)} (data.on_duplicate=fail)")
    report = {"skipped": skipped, "n_skipped": len(skipped)}
    out.report.write_text(
        json.dumps({**report, "duplicates": twins, "n_duplicates": len(twins)}, indent=2) + "\n"
    )
    record = PreparedRecord(
        data=cfg.provenance(),
        source=source.digest,
        code=code,
        class_names=class_names,
        counts={name: len(labels[name]) for name in SPLITS},
        image_size=side,
        sha256={f.name: file_sha256(f) for f in sorted(written)},
    )
    record.write(out.record)
    return record, skipped, twins


def _twins_message(twins: list[dict], report: Path | None = None) -> str:
    pairs = "; ".join(f"{t['path']} = {t['twin']}" for t in twins[:3])
    where = f"; all in {report}" if report else ""
    return (
        f"{len(twins)} file(s) are byte-identical to a file of an earlier split ({pairs}"
        f"{', ...' if len(twins) > 3 else ''}{where}): a model is scored on images it trained "
        "on. Remove the copies, or set data.on_duplicate: fail to stop on them, warn to go on"
    )
