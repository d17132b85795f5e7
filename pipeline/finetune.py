"""Stage `finetune` (optional): fine-tune the backbone's top together with the best head.

With finetune.enabled false (the default) it only writes small stubs and returns in well
under a second, without importing TensorFlow.
"""

from pipeline import paths
from pipeline.config import load_params
from pipeline.finetuning import Paths, write_disabled
from pipeline.stage import run_stage
from pipeline.store import open_features


def main(_) -> None:
    params = load_params()
    if not params.finetune.enabled:
        features = open_features(paths.FEATURES / "train.h5").fingerprint
        write_disabled(Paths(), features.backbone["name"], features.weights_used)
        print(
            "finetune: disabled (finetune.enabled: false); wrote stubs only. "
            "Enable it with `dvc exp run -S finetune.enabled=true`."
        )
        return
    from pipeline.finetuning import finetune

    r = finetune(params, Paths())
    print(
        f"started from {r['started_from']}, unfrozen from {r['unfreeze']}, kept {r['kept']}: "
        f"val accuracy {r['start_val_accuracy']:.4f} -> {r['val_accuracy']:.4f}, test accuracy "
        f"{r['start_test_accuracy']:.4f} -> {r['test_accuracy']:.4f}"
    )


if __name__ == "__main__":
    run_stage("finetune", __doc__, main)
