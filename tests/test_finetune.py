"""Fine-tuning from the best head: conversion, freezing, BN, fallback, keep-initial, disabled path.

Tiny on purpose: MobileNetV2 (it has BatchNormalization) at 32x32 with the registry's seeded
random weights, 60 bundled digits, 1-2 epochs. The heads are fitted here on features from the
extract stage's own extractor and saved in the train stage's layout (models/heads/<cell>/).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import joblib
import numpy as np
import pytest
from conftest import REPO, subprocess_env
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC
from synthetic import write_features

from pipeline.backbones.keras_apps import load_backbone
from pipeline.data.ingest import prepare
from pipeline.data.prepared import load_split
from pipeline.data.sources import source_record
from pipeline.features.store import open_splits
from pipeline.finetuning.params import FinetuneConfig, FinetuneParams
from pipeline.heads.saved import expected_head
from pipeline.inputs.params import check
from pipeline.project.layout import MODEL_FILES, SPLITS, Layout
from pipeline.project.params import ConfigError
from pipeline.project.provenance import expected_features
from pipeline.project.records import BestChoice, Fingerprint, HeadRecord, RankedCell, file_sha256

BACKBONE, LAYER, REDUCTION, UNFREEZE = "mobilenet_v2", "block_5_add", "avg", "block_4_expand"
LINEAR = {
    "logreg": lambda: LogisticRegression(max_iter=2000),
    "linear_svm": lambda: LinearSVC(max_iter=5000),
    "sgd_log": lambda: SGDClassifier(loss="log_loss", random_state=0),
    "sgd_hinge": lambda: SGDClassifier(loss="hinge", random_state=0),
}


RAW = {
    "data": {"source": "digits", "image_size": 32, "limit": 60},
    "backbone": {"name": BACKBONE, "weights": "random"},
    "extract": {"layers": {LAYER: REDUCTION}, "precision": "float32", "storage_dtype": "float32"},
    "train": {"layers": [LAYER], "heads": ["logreg", "linear_svm", "knn", "random_forest"]},
}
_, RECORD = check(RAW)  # the backbone as scan resolves it
PARAMS = FinetuneParams.model_validate(RAW)


def scaled(clf, *middle):
    return Pipeline([("scaler", StandardScaler()), *middle, ("classifier", clf)])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Prepared digits, scan's records, the seeded backbone, and every split's features as the
    extract stage writes them."""
    import keras

    from pipeline.features.extractor import build_extractor
    from pipeline.features.job import extract_all

    layout = Layout(tmp_path_factory.mktemp("finetune"))
    meta, _ = prepare(PARAMS.data, layout)
    source_record(PARAMS.data).write(layout.source_record)
    RECORD.write(layout.backbone_record)
    data = {s: load_split(s, layout=layout) for s in SPLITS}
    extractor, weights = build_extractor(RECORD)
    fingerprint = Fingerprint(
        **expected_features(PARAMS, meta, layout),
        weights_used=weights,
        precision="float32",
        image_size=32,
        versions={},
    )
    extract_all(extractor, meta, fingerprint, 32, layout=layout)
    feats = {s: ff.read(LAYER) for s, ff in open_splits(layout).items()}
    backbone, _ = load_backbone(RECORD, [LAYER])
    keras.mixed_precision.set_dtype_policy("float32")
    return {
        "layout": layout,
        "meta": meta,
        "data": data,
        "features": feats,
        "backbone": backbone,
        "fingerprint": fingerprint,
    }


def project_on(world, root: Path) -> Layout:
    """A project at `root` that reads the world's prepared data, scan records and features."""
    layout = Layout(root)
    for shared in ("data", "features"):
        (root / shared).symlink_to(world["layout"].root / shared)
    return layout


def save_head(world, layout: Layout, head: str, model):
    """A trained head in the train stage's layout: model.joblib|model.keras + head.json."""
    provenance = expected_head(LAYER, head, PARAMS.train, world["fingerprint"])
    directory = layout.cell_dir(LAYER, head)
    directory.mkdir(parents=True, exist_ok=True)
    name = MODEL_FILES[provenance["kind"]]
    if provenance["kind"] == "sklearn":
        joblib.dump(model, directory / name)
    else:
        model.save(directory / name)
    HeadRecord(
        **provenance,
        model=name,
        model_sha256=file_sha256(directory / name),
        reduction=REDUCTION,
        feature_width=int(world["features"]["train"].shape[1]),
        class_names=world["meta"].class_names,
        fit_path="memory",
        fit_on="train",
    ).write(directory / "head.json")
    return provenance["cell"]


def best_choice(layout: Layout, cells: list[str], vals: list[float]) -> BestChoice:
    """models/best.json as select writes it, over trained heads in `layout`."""
    ranking = []
    for cell, val in zip(cells, vals):
        folder = layout.cell_dir(*cell.rsplit("-", 1))
        record = HeadRecord.read(folder / "head.json", "-")
        ranking.append(
            RankedCell(
                cell=cell,
                layer=record.layer,
                head=record.head,
                kind=record.kind,
                val_accuracy=val,
                val_macro_f1=val,
                model=str(folder / record.model),
                model_sha256=record.model_sha256,
            )
        )
    top = ranking[0]
    return BestChoice(
        **{k: getattr(top, k) for k in ("cell", "layer", "head", "kind", "model")},
        metric="val_accuracy",
        value=top.val_accuracy,
        features=HeadRecord.read(Path(top.model).parent / "head.json", "-").features.digest,
        selection="val",
        cv_folds=None,
        selection_note="the val split alone",
        tie_break=None,
        ranking=ranking,
    )


def fit_sklearn(world, clf):
    return clf.fit(world["features"]["train"], world["data"]["train"][1])


def dense_head(world, epochs: int = 2):
    """The train stage's own Keras head (heads.dense.build_dense), fitted on the features."""
    from pipeline.heads.dense import build_dense
    from pipeline.heads.registry import DenseConfig

    x, y = world["features"]["train"], world["data"]["train"][1]
    cfg = DenseConfig(hidden=[16], dropout=0.5, epochs=epochs)
    model = build_dense(x.shape[1], 10, cfg, x.mean(0), x.var(0) + 1e-6)
    model.fit(x, y, epochs=epochs, verbose=0)
    return model


def assemble_from(world, head_model, backbone=None, unfreeze=UNFREEZE, augment=False):
    from pipeline.finetuning.assembly import assemble

    return assemble(
        backbone or world["backbone"], RECORD, LAYER, REDUCTION, head_model, unfreeze, augment
    )


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize("name", list(LINEAR))
def test_linear_head_becomes_dense_with_identical_predictions(world, name):
    """Scaler folded into one Dense: logits equal the decision function, and the whole model's
    predictions on the validation images equal the frozen pipeline's."""
    import keras

    from pipeline.finetuning.conversion import linear_head, linear_head_weights

    pipe = fit_sklearn(world, scaled(LINEAR[name]()))
    feats = world["features"]["val"]
    head = linear_head(*linear_head_weights(pipe, 10))
    logits = keras.Model(head.inputs, head.get_layer("head_logits").output).predict(
        feats, verbose=0
    )
    decision = pipe.decision_function(feats)
    np.testing.assert_allclose(logits, decision, rtol=1e-4, atol=1e-4 * np.abs(decision).max())
    assert len(head.layers) == 3  # input, one Dense (scaler folded in), softmax
    probs = assemble_from(world, head).model.predict(np.asarray(world["data"]["val"][0]), verbose=0)
    np.testing.assert_array_equal(np.argmax(probs, axis=1), pipe.predict(feats))
    if name == "logreg":  # multinomial: the softmax is predict_proba itself
        np.testing.assert_allclose(probs, pipe.predict_proba(feats), atol=1e-4)


def test_binary_pipelines_and_missing_classes_fold_exactly():
    from pipeline.finetuning.conversion import linear_head, linear_head_weights

    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 12)) * rng.uniform(0.01, 50, 12) + rng.normal(size=12) * 10
    y2, y3 = (x[:, 0] + x[:, 1] > np.median(x[:, 0] + x[:, 1])).astype(int), rng.integers(0, 3, 80)
    binary = scaled(LogisticRegression()).fit(x, y2)
    np.testing.assert_allclose(
        linear_head(*linear_head_weights(binary, 2)).predict(x, verbose=0),
        binary.predict_proba(x),
        atol=1e-5,
    )
    # classes absent from the head's training data are never predicted
    partial = scaled(LogisticRegression()).fit(x[y3 != 1], y3[y3 != 1])
    probs = linear_head(*linear_head_weights(partial, 3)).predict(x, verbose=0)
    assert probs[:, 1].max() < 1e-6
    np.testing.assert_array_equal(np.argmax(probs, axis=1), partial.predict(x))


def test_keras_head_loads_its_trained_weights(world, tmp_path):
    from pipeline.finetuning.conversion import HeadSpec, head_to_keras
    from pipeline.heads.saved import read_head

    trained = dense_head(world)
    layout = Layout(tmp_path)
    cell = save_head(world, layout, "dense", trained)
    folder = layout.cell_dir(LAYER, "dense")
    spec = HeadSpec(cell, folder, read_head(folder))
    model, frozen_predict = head_to_keras(spec, 10)
    feats = world["features"]["val"]
    np.testing.assert_allclose(
        model.predict(feats, verbose=0), trained.predict(feats, verbose=0), atol=1e-6
    )
    probs = assemble_from(world, model).model.predict(
        np.asarray(world["data"]["val"][0]), verbose=0
    )
    np.testing.assert_array_equal(np.argmax(probs, axis=1), frozen_predict(feats))


def test_fallback_to_the_best_expressible_head(world, tmp_path):
    from pipeline.finetuning.conversion import choose_head

    layout = Layout(tmp_path)
    cells = [
        save_head(world, layout, "knn", fit_sklearn(world, scaled(KNeighborsClassifier(3)))),
        save_head(
            world,
            layout,
            "random_forest",
            fit_sklearn(world, scaled(RandomForestClassifier(5, random_state=0))),
        ),
        save_head(world, layout, "linear_svm", fit_sklearn(world, scaled(LinearSVC()))),
        save_head(world, layout, "logreg", fit_sklearn(world, scaled(LogisticRegression()))),
    ]
    best = best_choice(layout, cells, [0.9 - i / 10 for i in range(len(cells))])
    fp = world["fingerprint"]
    start = choose_head(best, PARAMS.train, fp, 10, layout)
    assert start.spec.cell == cells[2]  # linear_svm: the best one Keras can express
    assert "knn" in start.fallback and "random_forest" in start.fallback and "#3" in start.fallback
    only_logreg = best_choice(layout, cells[3:], [0.6])
    assert choose_head(only_logreg, PARAMS.train, fp, 10, layout).fallback is None


# ---------------------------------------------------------------- freezing


def test_training_changes_only_unfrozen_layers_and_keeps_bn_statistics(world):
    """After a training epoch: layers below `unfreeze` bit-identical to the pretrained ones,
    every BatchNormalization (moving statistics, gamma, beta) untouched, the rest changed."""
    import keras

    from pipeline.finetuning.conversion import linear_head, linear_head_weights
    from pipeline.finetuning.recipe import image_batches

    backbone, _ = load_backbone(RECORD, [LAYER])
    pretrained = {
        layer.name: [w.numpy().copy() for w in layer.weights] for layer in backbone.layers
    }
    head = linear_head(*linear_head_weights(fit_sklearn(world, scaled(LogisticRegression())), 10))
    assembly = assemble_from(world, head, backbone=backbone, augment=True)
    model = assembly.model
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(image_batches(*world["data"]["train"], 16, shuffle=True), epochs=1, verbose=0)

    names = [layer.name for layer in assembly.trunk.layers]
    start = names.index(UNFREEZE)
    frozen = changed = bns = 0
    for i, layer in enumerate(assembly.trunk.layers):
        now = [w.numpy() for w in layer.weights]
        same = all(np.array_equal(a, b) for a, b in zip(now, pretrained[layer.name]))
        if isinstance(layer, keras.layers.BatchNormalization):
            assert same, f"BatchNormalization {layer.name} changed"
            bns += 1
        elif i < start and now:
            assert same, f"frozen layer {layer.name} changed"
            frozen += 1
        elif now:
            assert not same, f"unfrozen layer {layer.name} did not train"
            changed += 1
    assert frozen >= 5 and changed >= 2 and bns >= 10
    assert assembly.trainable_layers == [
        n for n in names[start:] if not n.endswith("_BN") and pretrained[n]
    ]


def test_convnext_fine_tunes_from_a_residual_sum(world):
    """ConvNeXt's block ends are `add` operations, not layers: the assembly taps add_14,
    computes the extract stage's features before training, and one epoch trains the top of the
    trunk only."""
    import keras

    from pipeline.features.extractor import build_extractor
    from pipeline.finetuning.assembly import assemble
    from pipeline.finetuning.conversion import linear_head, linear_head_weights
    from pipeline.finetuning.recipe import image_batches

    layer = "add_14"
    raw = {
        **RAW,
        "backbone": {"name": "convnext_tiny", "weights": "random"},
        "extract": {**RAW["extract"], "layers": {layer: "avg"}},
        "train": {"layers": [layer], "heads": ["logreg"]},
    }
    _, record = check(raw)
    images, labels = world["data"]["train"]
    extractor, _ = build_extractor(record)
    features = np.asarray(extractor(images))  # one layer: one output
    head = linear_head(*linear_head_weights(scaled(LogisticRegression()).fit(features, labels), 10))
    backbone, _ = load_backbone(record, [layer])
    assembly = assemble(backbone, record, layer, "avg", head, None, augment=False)
    reduced, _ = assembly.probe(images)
    np.testing.assert_allclose(np.asarray(reduced), features, rtol=1e-4, atol=1e-4)

    before = [w.numpy().copy() for w in assembly.trunk.weights]
    assembly.model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    assembly.model.fit(image_batches(images, labels, 16, shuffle=True), epochs=1, verbose=0)
    moved = [not np.array_equal(a, w.numpy()) for a, w in zip(before, assembly.trunk.weights)]
    assert assembly.trainable_layers and any(moved) and not moved[0]  # the stem stays


def test_unknown_unfreeze_layer_lists_valid_ones(world):
    from pipeline.finetuning.conversion import FinetuneError

    with pytest.raises(FinetuneError, match=r"unknown layer 'block_99_expand'.*block_4_expand"):
        assemble_from(world, dense_head(world, epochs=1), unfreeze="block_99_expand")


def test_unfreeze_above_the_heads_layer_says_nothing_trains(world):
    assembly = assemble_from(world, dense_head(world, epochs=1), unfreeze="block_16_expand")
    assert assembly.trainable_layers == []
    assert "nothing in the backbone is trainable" in assembly.note


def test_mixed_precision_keeps_the_head_and_output_float32(world):
    import keras

    from pipeline.finetuning.conversion import linear_head, linear_head_weights

    head_pipe = fit_sklearn(world, scaled(LogisticRegression()))
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        backbone, _ = load_backbone(RECORD, [LAYER])
        assembly = assemble_from(
            world, linear_head(*linear_head_weights(head_pipe, 10)), backbone=backbone
        )
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert assembly.trunk.get_layer("Conv1").compute_dtype == "bfloat16"
    assert assembly.trunk.get_layer("Conv1").variable_dtype == "float32"
    assert keras.backend.standardize_dtype(assembly.model.output.dtype) == "float32"
    probs = assembly.model.predict(np.asarray(world["data"]["val"][0]), verbose=0)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)


# ---------------------------------------------------------------- the stage


def test_stage_falls_back_keeps_the_initial_state_and_reports(world, tmp_path):
    """knn is best -> logreg is used and the report says so; a destructive learning rate never
    beats the starting point on validation, so the initial weights are restored exactly."""
    import keras

    from pipeline.finetuning.job import finetune

    layout = project_on(world, tmp_path)
    knn = save_head(world, layout, "knn", fit_sklearn(world, scaled(KNeighborsClassifier(3))))
    logreg = save_head(world, layout, "logreg", fit_sklearn(world, scaled(LogisticRegression())))
    best_choice(layout, [knn, logreg], [0.6, 0.5]).write(layout.best)
    cfg = {
        "enabled": True,
        "unfreeze": UNFREEZE,
        "learning_rate": 1.0,
        "head_epochs": 1,
        "epochs": 2,
        "patience": 2,
        "batch_size": 16,
        "precision": "float32",
    }
    report = finetune(PARAMS.model_copy(update={"finetune": FinetuneConfig(**cfg)}), layout)

    schema = {
        "layer",
        "head",
        "backbone",
        "weights",
        "feature_width",
        "model_file",
        "n_train",
        "val_accuracy",
        "val_macro_f1",
        "test_accuracy",
        "test_macro_f1",
        "fit_seconds",
    }
    assert schema <= set(report) and report["enabled"] is True
    assert report["started_from"] == logreg and "knn" in report["fallback"]
    assert report["conversion_agreement"] == 1.0
    assert report["best_epoch"] == 0 and report["epochs_run"] >= 1
    assert report["val_accuracy"] == report["start_val_accuracy"]
    assert report["kept"] == "the starting head"
    assert json.loads(layout.finetune_metrics.read_text()) == report
    assert json.loads(layout.finetune_status.read_text())["config"]["unfreeze"] == UNFREEZE
    history = layout.finetune_history.read_text().splitlines()
    assert (
        history[0] == "epoch,phase,loss,accuracy,val_loss,val_accuracy"
        and len(history) == report["epochs_run"] + 2
    )

    saved = keras.saving.load_model(layout.finetuned_model, compile=False)
    val_x, val_y = world["data"]["val"]
    acc = float(np.mean(np.argmax(saved.predict(np.asarray(val_x), verbose=0), axis=1) == val_y))
    assert acc == report["val_accuracy"]
    pretrained, _ = load_backbone(RECORD, [LAYER])
    trunk = next(layer for layer in saved.layers if layer.name.startswith(f"{BACKBONE}_to_"))
    for layer in (layer for layer in trunk.layers if layer.weights):  # restored bit for bit
        for a, b in zip(layer.weights, pretrained.get_layer(layer.name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_disabled_stage_writes_stubs_fast_without_tensorflow(tmp_path):
    (tmp_path / "params.yaml").write_text("finetune:\n  enabled: false\n")
    write_features(
        tmp_path,
        {"a": 4},
        {"train": 8, "val": 4, "test": 4},
        n_classes=2,
        backbone={"name": "resnet50", "weights": "x.weights.h5"},
        weights_used="file:sha256:abc",
    )
    check = (
        "import runpy, sys; runpy.run_module('pipeline.finetune', run_name='__main__'); "
        "heavy = {m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras', 'sklearn', 'jax', 'torch'}; "
        "assert not heavy, heavy"
    )
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", check],
        check=False,
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.perf_counter() - t0
    assert result.returncode == 0, result.stderr
    assert "disabled" in result.stdout and elapsed < 10
    report = json.loads((tmp_path / "metrics" / "finetune.json").read_text())
    assert report == {"enabled": False, "backbone": "resnet50", "weights": "file:sha256:abc"}
    assert (
        json.loads((tmp_path / "models" / "finetuned" / "status.json").read_text())["enabled"]
        is False
    )
    assert (tmp_path / "plots" / "finetune" / "history.csv").read_text().startswith("epoch,")
    assert str(REPO) in subprocess_env()["PYTHONPATH"]


def test_precision_param_is_validated_and_auto_resolves():
    from pipeline.features.precision import resolve_precision

    assert check({"finetune": {"precision": "auto"}})[0].finetune.precision == "auto"
    with pytest.raises(ConfigError, match="finetune.precision"):
        check({"finetune": {"precision": "bf16"}})
    assert resolve_precision("mixed_float16") == "mixed_float16"
    import tensorflow as tf

    if not tf.config.list_physical_devices("GPU"):
        assert resolve_precision("auto") == "float32"  # a CPU: float32 is the fastest there


def test_an_epoch_tied_on_accuracy_with_lower_loss_beats_the_start():
    """Keras logs val_accuracy in float32 (44/49 -> 0.8979591727), the starting value is
    float64 (0.8979591837): the tie must still be broken by the loss."""
    import keras

    from pipeline.finetuning.recipe import keep_best

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    keep = keep_best({"val_accuracy": 44 / 49, "val_loss": 0.360}, patience=2, n_val=49)
    keep.set_model(model)
    keep.on_train_begin()
    keep.on_epoch_end(0, {"val_accuracy": float(np.float32(44 / 49)), "val_loss": 0.286})
    assert keep.best_epoch == 1
    keep.on_epoch_end(1, {"val_accuracy": float(np.float32(43 / 49)), "val_loss": 0.1})
    assert keep.best_epoch == 1  # one image fewer is worse, whatever the loss


def test_default_unfreeze_is_the_top_quarter_of_the_trunk():
    import keras

    from pipeline.finetuning.assembly import default_unfreeze

    _, vgg16 = check({"data": {"image_size": 32}, "backbone": {"weights": "random"}})
    vgg, _ = load_backbone(vgg16, ["block5_pool"])
    trunk = keras.Model(vgg.inputs, vgg.get_layer("block5_pool").output)
    assert default_unfreeze(trunk) == "block5_conv1"  # 13 conv layers: the top 3


def test_head_phase_trains_the_head_alone_then_layer_rates_fall_to_the_bottom(world):
    """Phase 1 (LP) moves only the head; in phase 2 the lowest unfrozen layer gets `decay`
    times the top's rate, geometric in between."""

    from pipeline.finetuning.conversion import linear_head, linear_head_weights
    from pipeline.finetuning.recipe import image_batches, layer_rates, optimizer

    head = linear_head(*linear_head_weights(fit_sklearn(world, scaled(LogisticRegression())), 10))
    assembly = assemble_from(world, head, augment=False)
    before = [w.numpy().copy() for w in assembly.trunk.weights]
    head_before = [w.numpy().copy() for w in head.weights]
    cfg = FinetuneConfig(learning_rate=1e-2, warmup_epochs=0, epochs=1, head_epochs=1)
    assembly.train_backbone(False)
    batches = image_batches(*world["data"]["train"], 16, shuffle=True)
    assembly.model.compile(optimizer(cfg, len(batches), 1, {}), "sparse_categorical_crossentropy")
    assembly.model.fit(batches, epochs=1, verbose=0)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, assembly.trunk.weights))
    assert not all(np.array_equal(a, w.numpy()) for a, w in zip(head_before, head.weights))

    assembly.train_backbone(True)
    rates = layer_rates(assembly, 0.25)
    layers = assembly.trainable_layers
    share = {
        name: rates[assembly.trunk.get_layer(name).trainable_weights[0].path] for name in layers
    }
    assert share[layers[0]] == pytest.approx(0.25) and share[layers[-1]] == pytest.approx(1.0)
    assert list(share.values()) == sorted(share.values())
    assert {v.path for v in assembly.model.trainable_variables} - set(rates) == {
        v.path for v in head.trainable_weights
    }


def test_layerwise_rates_scale_each_variables_step_and_the_schedule_warms_up():
    import keras

    from pipeline.finetuning.recipe import optimizer

    cfg = FinetuneConfig(optimizer="sgd", learning_rate=0.1, weight_decay=0, warmup_epochs=1)
    a, b = keras.Variable(np.zeros(3), name="a"), keras.Variable(np.zeros(3), name="b")
    opt = optimizer(cfg, per_epoch=10, epochs=5, rates={b.path: 0.5})
    schedule = opt.learning_rate if callable(opt.learning_rate) else opt._learning_rate
    assert float(schedule(0)) == pytest.approx(0.001)  # warm-up from 1 % of the peak
    assert float(schedule(10)) == pytest.approx(0.1)  # the peak after one epoch
    assert float(schedule(50)) == pytest.approx(0.0, abs=1e-6)  # cosine to zero
    opt.build([a, b])
    opt.apply([np.ones(3), np.ones(3)], [a, b])
    np.testing.assert_allclose(b.numpy(), a.numpy() * 0.5)
    assert a.numpy()[0] < 0


def test_augmentation_is_a_crop_and_flip_in_training_and_the_identity_otherwise():
    from pipeline.finetuning.augment import RandomResizedCropFlip

    ramp = np.tile(np.arange(16, dtype="float32")[None, None, :, None], (8, 16, 1, 3))
    layer = RandomResizedCropFlip(min_scale=0.5, seed=0)
    np.testing.assert_array_equal(np.asarray(layer(ramp)), ramp)
    out = np.asarray(layer(ramp, training=True))[:, 0, :, 0]
    steps = np.diff(out, axis=1)
    rising, falling = (steps > 0).all(axis=1), (steps < 0).all(axis=1)
    assert (rising | falling).all()  # each row a stretched crop of the ramp, maybe mirrored
    assert rising.any() and falling.any()  # both orientations occur in a batch of 8
    spans = out.max(axis=1) - out.min(axis=1)
    assert (spans <= 15 + 1e-4).all() and spans.min() < 15 * 0.95  # crops, not the whole width
    again = RandomResizedCropFlip(min_scale=0.5, seed=0)
    np.testing.assert_array_equal(np.asarray(again(ramp, training=True))[:, 0, :, 0], out)


def test_flip_only_and_vertical_flip_keep_every_pixel():
    from pipeline.finetuning.augment import RandomResizedCropFlip

    ramp = np.tile(np.arange(16, dtype="float32")[None, None, :, None], (8, 16, 1, 3))
    out = np.asarray(RandomResizedCropFlip(min_scale=1.0, seed=0)(ramp, training=True))
    same = [np.array_equal(o, ramp[0]) for o in out]
    mirrored = [np.array_equal(o, ramp[0][:, ::-1]) for o in out]
    assert all(a or b for a, b in zip(same, mirrored)) and any(same) and any(mirrored)
    rows = np.transpose(ramp, (0, 2, 1, 3))  # a ramp down the rows
    layer = RandomResizedCropFlip(min_scale=1.0, seed=0, vflip=True)
    out = np.asarray(layer(rows, training=True))
    upright = [np.array_equal(o, rows[0]) for o in out]
    flipped = [np.array_equal(o, rows[0][::-1]) for o in out]
    assert all(a or b for a, b in zip(upright, flipped)) and any(upright) and any(flipped)
    assert layer.get_config()["vflip"] is True


def test_stacked_reads_train_and_val_as_one_array_in_the_order_asked():
    from pipeline.finetuning.recipe import Stacked

    train, val = np.arange(10)[:, None] * 10, np.arange(5)[:, None] + 1000
    both = Stacked(train, val)
    assert len(both) == 15
    np.testing.assert_array_equal(both[np.array([14, 0, 9, 10, 3])][:, 0], [1004, 0, 90, 1000, 30])
