"""Stage `finetune` (optional): fine-tune the backbone's top together with the best head.

With finetune.enabled false (the default) it only writes small stubs and returns in well
under a second, without importing TensorFlow.
"""

from pipeline.features.store import open_features
from pipeline.finetuning.job import finetune, write_disabled
from pipeline.finetuning.params import FinetuneParams
from pipeline.project.layout import Layout
from pipeline.project.params import load_params
from pipeline.project.stage import run_stage


def main(_) -> None:
    params, layout = load_params(FinetuneParams), Layout()
    if not params.finetune.enabled:
        features = open_features(layout.features_file("train")).fingerprint
        write_disabled(layout, features.backbone["name"], features.weights_used)
        print(
            "finetune: disabled (finetune.enabled: false); wrote stubs only. "
            "Enable it with `dvc exp run -S finetune.enabled=true`."
        )
        return
    r = finetune(params, layout)
    print(
        f"started from {r['started_from']}, unfrozen from {r['unfreeze']}, kept {r['kept']}: "
        f"val accuracy {r['start_val_accuracy']:.4f} -> {r['val_accuracy']:.4f}, test accuracy "
        f"{r['start_test_accuracy']:.4f} -> {r['test_accuracy']:.4f}"
    )


if __name__ == "__main__":
    run_stage("finetune", __doc__, main)
