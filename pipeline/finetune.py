"""Stage `finetune` (optional): fine-tune the backbone's top together with the best head.

With finetune.enabled false (the default) it only writes small stubs and returns in well
under a second, without importing TensorFlow.
"""

from pipeline.config import load_params
from pipeline.finetuning import Paths, write_disabled


def main() -> None:
    params = load_params()
    if not params.finetune.enabled:
        write_disabled(Paths())
        print(
            "finetune: disabled (finetune.enabled: false); wrote stubs only. "
            "Enable it with `dvc exp run -S finetune.enabled=true`."
        )
        return
    from pipeline.conversion import FinetuneError
    from pipeline.finetuning import finetune
    from pipeline.records import RecordError

    try:
        r = finetune(params, Paths())
    except (RecordError, FinetuneError) as exc:
        raise SystemExit(f"finetune: {exc}") from None
    print(
        f"started from {r['started_from']}, unfrozen from {r['unfreeze']}, kept {r['kept']}: "
        f"val accuracy {r['start_val_accuracy']:.4f} -> {r['val_accuracy']:.4f}, test accuracy "
        f"{r['start_test_accuracy']:.4f} -> {r['test_accuracy']:.4f}"
    )


if __name__ == "__main__":
    main()
