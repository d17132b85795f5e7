"""Stage `export`: the winner (the fine-tuned model when it kept a better epoch, else the chosen
frozen cell) as one Keras classifier, raw RGB images in and class probabilities out, with its
card (class names, backbone, layer, head, test report) and its mistakes on the test split."""

from pipeline.finetuning.params import FinetuneParams
from pipeline.project.layout import Layout
from pipeline.project.params import load_params
from pipeline.project.stage import run_stage
from pipeline.winner.job import export


def main(_) -> None:
    layout = Layout()
    card = export(load_params(FinetuneParams), layout)
    t = card.test
    wrong = t.n - sum(row[i] for i, row in enumerate(t.confusion))
    print(
        f"exported {card.cell} ({card.source}) to {layout.classifier}: test accuracy "
        f"{t.accuracy:.4f} [{t.accuracy_ci95[0]:.3f}, {t.accuracy_ci95[1]:.3f}] on {t.n} images, "
        f"{wrong} mistakes in {layout.errors_csv}. Why this model: {card.why}"
    )


if __name__ == "__main__":
    run_stage("export", __doc__, main)
