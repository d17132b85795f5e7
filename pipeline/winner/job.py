"""The export job: the winner as one classifier, its card with its test report, and its
mistakes on the test split."""

from __future__ import annotations

import numpy as np

from pipeline.data.decoding import decode_workers
from pipeline.data.prepared import load_split, split_sources
from pipeline.finetuning.params import FinetuneParams
from pipeline.project.layout import Layout
from pipeline.project.records import ClassifierCard
from pipeline.selection.scoring import split_report
from pipeline.winner.choice import choose_winner, needs
from pipeline.winner.classifier import build_classifier, save_classifier
from pipeline.winner.mistakes import mistakes, mistakes_png, write_errors

INPUT = (
    "uint8 RGB images, (batch, height, width, 3), any size: resized inside to image_side "
    "(antialiased Keras resizing; `layerwise predict` resizes with PIL first, as prepare did)"
)


def predict_images(model, images, batch_size: int) -> np.ndarray:
    """Class probabilities of `images` (prepared rows, read a batch at a time)."""
    out = [
        np.asarray(model.predict_on_batch(np.asarray(images[i : i + batch_size])))
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def export(params: FinetuneParams, layout: Layout = Layout()) -> ClassifierCard:
    """Build and save the winner's classifier, score it on the test split, write the card,
    errors.csv and mistakes.png."""
    winner = choose_winner(params, layout)
    prepared = winner.prepared
    model = build_classifier(winner, params.data.interpolation)
    images, labels = load_split("test", prepared, decode_workers(params.data), layout)
    probs = predict_images(model, images, params.finetune.batch_size)
    report = split_report(labels, probs.argmax(axis=1), prepared.class_names)
    card = ClassifierCard(
        model=layout.classifier.name,
        needs=needs(winner.backbone),
        input=INPUT,
        class_names=prepared.class_names,
        image_side=winner.backbone.image_size,
        interpolation=params.data.interpolation,
        backbone=winner.backbone.name,
        weights=winner.weights,
        layer=winner.layer,
        reduction=winner.reduction,
        head=winner.head_name,
        cell=winner.cell,
        source=winner.source,
        why=winner.why,
        test=report,
    )
    save_classifier(model, layout.classifier)
    card.write(layout.card)
    order = mistakes(labels, probs)
    sources = split_sources(layout.prepared_files, "test")
    write_errors(layout.errors_csv, sources, prepared.class_names, labels, probs, order)
    mistakes_png(
        layout.mistakes_png,
        images,
        prepared.class_names,
        labels,
        probs,
        order,
        f"{winner.cell} ({winner.source}): the {min(len(order), 16)} most confident of "
        f"{len(order)} mistakes on {len(labels)} test images",
    )
    return card
