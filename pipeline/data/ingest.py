"""Making the prepared data set (data/prepared): every usable image of the source decoded and
resized once, on every core, into arrays; or with data.prepared: manifest, each usable file
listed with its sha256 (extract decodes them). data.prepared reads it back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data.arrays import NpyWriter
from pipeline.data.decoding import DataError, decode_file, decode_workers, identify, resize
from pipeline.data.files import RemoteFile
from pipeline.data.sources import Split, load_source, source_record
from pipeline.project.layout import SPLITS, Layout, PreparedFiles
from pipeline.project.params import DataConfig
from pipeline.project.provenance import code_digest
from pipeline.project.records import PreparedRecord, file_sha256


def decode_split(name: str, split: Split, cfg: DataConfig) -> Iterator[tuple]:
    """Decode and resize a split once, in order: (index, image, None) for each usable item,
    (index, None, reason) for each unusable file. Files are decoded on decode_workers threads
    (PIL releases the GIL while it decodes and resizes)."""
    size = cfg.image_size
    if split.images is not None:
        for i, a in enumerate(tqdm(split.images, desc=f"resize {name}", unit="img", leave=False)):
            yield i, resize(Image.fromarray(np.asarray(a, np.uint8)), size, cfg.interpolation), None
        return
    yield from _over_files(
        f"decode {name}", split.paths, cfg, lambda path: decode_file(path, size, cfg.interpolation)
    )


def list_split(name: str, split: Split, cfg: DataConfig) -> Iterator[tuple]:
    """For a manifest: (index, sha256 of the file, None) for each file PIL can identify,
    (index, None, reason) for the others; nothing is decoded."""

    def check(path: Path | RemoteFile) -> str:
        data = path.read_bytes()
        identify(data)
        return hashlib.sha256(data).hexdigest()

    yield from _over_files(f"list {name}", split.paths, cfg, check)


def _over_files(desc: str, files: list[Path], cfg: DataConfig, work) -> Iterator[tuple]:
    """(index, work(file), None) or (index, None, reason), in order, on decode_workers threads."""

    def attempt(path: Path):
        try:
            return work(path), None
        except ValueError as exc:
            return None, str(exc)

    workers = decode_workers(cfg)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(attempt, files)
        bar = tqdm(results, total=len(files), desc=f"{desc} ({workers} threads)", unit="img")
        for i, (value, reason) in enumerate(bar):
            yield i, value, reason


def prepare(cfg: DataConfig, layout: Layout = Layout()) -> tuple[PreparedRecord, list[dict]]:
    """Write data/prepared/ (layout.PreparedFiles): each split's images (decoded once, streamed
    to disk; with data.prepared=manifest a listing of files and sha256s instead) and labels,
    manifest.csv, report.json and the PreparedRecord; return (record, skipped). Written into
    `<prepared>.partial` and renamed: never seen half-made."""
    source, code = source_record(cfg), code_digest("prepare")  # what this run reads
    class_names, splits = load_source(cfg)
    out = layout.prepared
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        record, skipped = _write_prepared(
            cfg, PreparedFiles(tmp), class_names, splits, source, code
        )
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return record, skipped


def _write_prepared(cfg, out: PreparedFiles, class_names, splits, source, code):
    side, skipped, labels, written = cfg.image_size, [], {}, []
    with out.manifest.open("w") as manifest:
        manifest.write("split,index,label,source\n")
        for name in SPLITS:
            split = splits[name]
            listed = cfg.prepared == "manifest"
            if listed:
                written.append(out.files(name))
                out_file = written[-1].open("w")
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
                manifest.write(
                    f"{name},{len(keep)},{class_names[split.labels[i]]},{json.dumps(split.ids[i])}\n"
                )
                if listed:  # value: the file's sha256
                    out_file.write(f"{value}  {split.ids[i]}\n")
                else:  # value: the decoded image
                    out_file.append(value)
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
    out.report.write_text(
        json.dumps({"skipped": skipped, "n_skipped": len(skipped)}, indent=2) + "\n"
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
    return record, skipped
