"""The newer keras.applications families end to end through `dvc repro`, at 32 px on 60
digits: ConvNeXt (whose block ends are residual sums: operations, not layers), DenseNet,
EfficientNetV2 and MobileNetV3, each extracting its auto layers, trained, ranked and evaluated
on them. (ConvNeXt's fine-tuning from an operation: tests/test_finetune.py.)"""

from __future__ import annotations

import json
import sys

import yaml
from conftest import dvc_repo, leaderboard, ran, sh

from pipeline.backbones.registry import get_backbone

NEWER_FAMILIES = ["convnext_tiny", "densenet121", "efficientnet_v2_b0", "mobilenet_v3_small"]


def test_the_newer_families_run_end_to_end_through_dvc_repro(tmp_path):
    params = {
        "data": {"image_size": 32, "limit": 60},
        "backbone": {"name": NEWER_FAMILIES[0], "weights": "random"},
        "extract": {"batch_size": 16},
        "train": {"heads": ["logreg"], "cv": {"folds": 0}},
    }
    root = dvc_repo(tmp_path / "repo", params)  # extract.layers: auto, train.layers: all
    for i, name in enumerate(NEWER_FAMILIES):
        if i:
            written = yaml.safe_load((root / "params.yaml").read_text())
            written["backbone"]["name"] = name
            (root / "params.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
        output = sh(root, sys.executable, "-m", "dvc", "repro")
        assert {"extract", "train@logreg", "select", "evaluate"} <= ran(output), output
        assert ("prepare" in ran(output)) == (i == 0), output
        ranked = {row["layer"] for row in leaderboard(root)}
        assert ranked == set(get_backbone(name).auto(32))
        test = json.loads((root / "metrics" / "test.json").read_text())
        assert test["backbone"] == name and test["frozen"]["test_accuracy"] > 0.1, test
