"""Hostile and careless image folders (issue 21): one listing for paths and URIs (symlinks
followed once, never round a loop, a dangling link skipped and reported), one rule for split
folders, byte-identical files across splits reported, names that break line-based files,
and an unreachable URI ending in one line within its deadline."""

from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import SMALL_PARAMS, deep_merge, dvc, dvc_repo, ran, write_image

from pipeline.data.files import tree
from pipeline.data.prepared import load_split, split_sources
from pipeline.data.sources import load_source
from pipeline.project.params import DataConfig
from pipeline.project.records import PreparedRecord

FOLDER = {"source": "folder", "limit": None, "image_size": 32}


def one_line(info: pytest.ExceptionInfo, stage: str) -> str:
    message = str(info.value.code)
    assert message.startswith(f"{stage}: ") and "\n" not in message, message
    return message


def prepared(project) -> tuple[dict, list[list[str]]]:
    """report.json and the rows of manifest.csv (header left out)."""
    report = json.loads((project.prepared / "report.json").read_text())
    with (project.prepared / "manifest.csv").open(newline="") as f:
        rows = list(csv.reader(f))[1:]
    return report, rows


def stages(project, path: str, **data) -> tuple[dict, list[list[str]]]:
    project.write_params(data={**FOLDER, "path": path, **data})
    project.main("scan")
    project.main("prepare")
    return prepared(project)


def same_listing(folder: Path):
    """The listing of `folder` as a plain path, after checking its file:// URI's is equal."""
    plain, uri = tree(str(folder)).walk(), tree(folder.as_uri()).walk()
    assert plain == uri
    return plain


# ---------------------------------------------------------------- cases 1, 10, 17: symlinks


def test_a_symlink_loop_is_not_followed_and_labels_stay_true(project, make_image_folder):
    photos = make_image_folder(project.root.parent / "photos", {"cat": 10, "dog": 10})
    (photos / "cat" / "loop").symlink_to("..")
    (photos / "kitty").symlink_to("cat")  # the same folder again: listed once
    listing = same_listing(photos)
    assert len(listing.files) == 20

    report, rows = stages(project, photos.as_uri())
    scanned = json.loads(project.layout.source_record.read_text())
    assert scanned["files"] == 20
    sources = [source for _, _, _, source in rows]
    assert len(sources) == len(set(sources)) == 20  # each image in one split only
    assert all(source.split("/")[0] == label for _, _, label, source in rows)
    reasons = {s["path"]: s["reason"] for s in report["skipped"]}
    assert "loop" in reasons["cat/loop"] and "cat/" in reasons["kitty"]


def test_a_dangling_symlink_is_a_skipped_file(project, make_image_folder):
    photos = make_image_folder(project.root.parent / "photos", {"cat": 6, "dog": 6})
    (photos / "dog" / "gone.jpg").symlink_to(photos / "nowhere.jpg")
    assert same_listing(photos).skipped[0][0] == "dog/gone.jpg"

    report, rows = stages(project, str(photos))
    assert len(rows) == 12
    [entry] = report["skipped"]
    assert entry["path"] == "dog/gone.jpg" and "dangling symlink" in entry["reason"]

    project.write_params(data={**FOLDER, "path": str(photos), "on_bad_image": "fail"})
    with pytest.raises(SystemExit) as info:
        project.main("prepare")
    assert "gone.jpg" in one_line(info, "prepare")


def test_a_symlinked_class_folder_is_used_through_a_path_as_through_a_uri(
    project, make_image_folder
):
    photos = make_image_folder(project.root.parent / "photos", {"cat": 10})
    elsewhere = make_image_folder(project.root.parent / "elsewhere", {"dog": 10})
    (photos / "dog").symlink_to(elsewhere / "dog")
    assert len(same_listing(photos).files) == 20

    report, rows = stages(project, str(photos))
    assert sorted(label for _, _, label, _ in rows) == ["cat"] * 10 + ["dog"] * 10
    assert report["skipped"] == []


def test_a_class_name_with_a_comma_keeps_manifest_rows_whole(project, make_image_folder):
    photos = make_image_folder(project.root.parent / "photos", {"a,b": 6, 'say "hi"': 6})
    _, rows = stages(project, str(photos))
    assert {len(row) for row in rows} == {4}
    assert sorted({label for _, _, label, _ in rows}) == ["a,b", 'say "hi"']
    for split in ("train", "val", "test"):
        labels = [label for name, _, label, _ in rows if name == split]
        sources = split_sources(project.layout.prepared_files, split)
        assert [s.split("/")[0] for s in sources] == labels


# ---------------------------------------------------------------- case 11: names with newlines


def test_names_with_line_breaks_survive_a_manifest(project, make_image_folder):
    photos = make_image_folder(project.root.parent / "photos", {"a": 6, "b": 6})
    odd = ["a/two\nlines.png", "b/para\u2028graph.png", "a/back\\slash.png"]
    for name in odd:
        write_image(photos / name)
    report, _ = stages(project, str(photos), prepared="manifest")
    assert report["skipped"] == []

    record = PreparedRecord.read(project.layout.prepared_files.record, "-")
    listed = []
    for split in ("train", "val", "test"):
        images, labels = load_split(split, record, layout=project.layout)
        assert images[:].shape == (len(labels), 32, 32, 3)
        listed += images.files
        assert images.files == split_sources(project.layout.prepared_files, split)
    assert sorted(listed) == sorted(name for name, _, _ in tree(str(photos)).walk().files)
    assert set(odd) <= set(listed)


# ---------------------------------------------------------------- case 2: split folders


@pytest.mark.parametrize(
    "folders, named",
    [
        (("train", "val", "validation"), "val/ and validation/"),
        (("train", "Test", "test"), "Test/ and test/"),
        (("train", "extra"), "extra/"),
        (("val", "test"), "no train/"),
    ],
)
def test_split_folders_follow_one_rule(project, make_image_folder, folders, named):
    photos = make_image_folder(
        project.root.parent / "photos",
        layout="split",
        splits={folder: {"a": 4, "b": 4} for folder in folders},
    )
    project.write_params(data={**FOLDER, "path": str(photos)})
    project.main("scan")
    with pytest.raises(SystemExit) as info:
        project.main("prepare")
    message = one_line(info, "prepare")
    assert named in message and "train/, val/ (or validation/) and test/" in message


def test_split_folder_names_are_matched_in_any_case(tmp_path, make_image_folder):
    photos = make_image_folder(
        tmp_path / "photos",
        layout="split",
        splits={"Train": {"a": 6, "b": 6}, "VALIDATION": {"a": 2, "b": 2}, "test": {"a": 2}},
    )
    cfg = DataConfig(source="folder", path=str(photos), limit=None)
    _, splits = load_source(cfg)
    assert {name: len(s.ids) for name, s in splits.items()} == {"train": 12, "val": 4, "test": 2}
    assert all(i.startswith("VALIDATION/") for i in splits["val"].ids)


# ---------------------------------------------------------------- case 3: twins across splits


def test_byte_identical_files_across_splits_warn_or_fail(tmp_path, make_image_folder):
    photos = make_image_folder(
        tmp_path / "photos",
        layout="split",
        splits={"train": {"a": 6, "b": 6}, "test": {"a": 3, "b": 3}},
    )
    copies = [
        ("train/a/train_a_001.png", "test/a/copy.png"),
        ("train/b/train_b_004.png", "test/b/copy.png"),
        ("train/b/train_b_005.png", "test/b/again.png"),
    ]
    for original, copy in copies:
        shutil.copy(photos / original, photos / copy)
    params = deep_merge(SMALL_PARAMS, {"data": {**FOLDER, "path": str(photos)}})
    root = dvc_repo(tmp_path / "repo", params)

    output = dvc(root, "repro", "prepare")
    assert "prepare" in ran(output) and "Traceback" not in output
    assert f"warning: {len(copies)} file(s) are byte-identical" in output
    assert f"{copies[0][1]} = {copies[0][0]}" in output
    report = json.loads((root / "data" / "prepared" / "report.json").read_text())
    assert report["n_duplicates"] == len(copies)
    assert sorted((d["path"], d["twin"]) for d in report["duplicates"]) == sorted(
        (copy, original) for original, copy in copies
    )

    text = (root / "params.yaml").read_text()
    (root / "params.yaml").write_text(text.replace("on_duplicate: warn", "on_duplicate: fail"))
    output = dvc(root, "repro", "prepare", check=False)
    assert "prepare" in ran(output) and "Traceback" not in output  # DVC tracks the param
    [line] = [line for line in output.splitlines() if line.startswith("prepare: ")]
    assert f"{len(copies)} file(s)" in line and "data.on_duplicate=fail" in line


# ---------------------------------------------------------------- case 8: an unreachable URI


def test_an_unreachable_uri_is_one_line_within_its_deadline(tmp_path, monkeypatch):
    """Offline, pyarrow's GCS client retries for minutes: data.timeout_s ends it. (With
    network the bucket's absence is the answer, also one line.)"""
    from pipeline import cli

    templates = tmp_path / "templates"
    templates.mkdir()
    text = (cli.TEMPLATES / "params.template.yaml").read_text()
    assert "timeout_s: 60 " in text
    (templates / "params.template.yaml").write_text(text.replace("timeout_s: 60 ", "timeout_s: 2 "))
    shutil.copy(cli.TEMPLATES / "dvc.template.yaml", templates)
    monkeypatch.setattr(cli, "TEMPLATES", templates)

    uri, start = "gs://nonexistent-bucket/photos", time.monotonic()
    with pytest.raises(SystemExit) as info:
        cli.main(["init", str(tmp_path / "p"), "--images", uri, "--weights", "random"])
    assert time.monotonic() - start < 30
    message = one_line(info, "layerwise init")
    assert repr(uri) in message
    assert "data.timeout_s" in message or "not a directory" in message
    assert not (tmp_path / "p").exists()
