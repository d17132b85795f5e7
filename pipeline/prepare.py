"""Stage `prepare`: decode and resize the source images once into data/prepared/."""

from pipeline import paths
from pipeline.config import load_params
from pipeline.data import DataError, prepare


def main() -> None:
    params = load_params()
    cfg = params.data
    try:
        record, skipped = prepare(cfg, paths.PREPARED)
    except DataError as exc:
        raise SystemExit(f"prepare: {exc}") from None
    side = record.image_size
    print(f"prepared {record.counts} images of {side}x{side} in {len(record.class_names)} classes")
    if skipped:
        print(f"skipped {len(skipped)} unusable file(s); see {paths.PREPARED / 'report.json'}")


if __name__ == "__main__":
    main()
