"""Stage `prepare`: decode and resize the source images once into data/prepared/."""

from pipeline.data.ingest import prepare
from pipeline.project.layout import Layout
from pipeline.project.params import load_params
from pipeline.project.stage import run_stage


def main(_) -> None:
    layout = Layout()
    record, skipped = prepare(load_params().data, layout)
    side = record.image_size
    print(f"prepared {record.counts} images of {side}x{side} in {len(record.class_names)} classes")
    if skipped:
        print(f"skipped {len(skipped)} unusable file(s); see {layout.prepared_files.report}")


if __name__ == "__main__":
    run_stage("prepare", __doc__, main)
