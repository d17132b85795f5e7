"""Stage `prepare`: decode and resize the source images once into data/prepared/."""

from pipeline import paths
from pipeline.config import load_params
from pipeline.preparation import prepare
from pipeline.stage import run_stage


def main(_) -> None:
    record, skipped = prepare(load_params().data, paths.PREPARED)
    side = record.image_size
    print(f"prepared {record.counts} images of {side}x{side} in {len(record.class_names)} classes")
    if skipped:
        print(f"skipped {len(skipped)} unusable file(s); see {paths.PREPARED / 'report.json'}")


if __name__ == "__main__":
    run_stage("prepare", __doc__, main)
