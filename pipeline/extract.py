"""Stage `extract`: one pass of the frozen backbone, every requested layer into features/."""

import contextlib
import functools

from pipeline.data.decoding import decode_workers
from pipeline.project.layout import Layout
from pipeline.project.params import load_params
from pipeline.project.provenance import current_prepared, expected_features, scanned_backbone
from pipeline.project.records import Fingerprint, RecordError, short
from pipeline.project.stage import run_stage


def main(_) -> None:
    params, layout = load_params(), Layout()
    ex = params.extract
    prepared = current_prepared(params, layout)
    backbone = scanned_backbone(params, layout)
    expected = expected_features(params, prepared, layout)
    # Keras after the checks above, so that a stale or missing input is reported in a moment
    from pipeline.features.extractor import build_extractor
    from pipeline.features.forward import batch_within, distribute_over_devices
    from pipeline.features.job import extract_all, versions
    from pipeline.features.precision import use_precision

    with contextlib.ExitStack() as session:
        if ex.engine == "ray":  # joined first: an unreachable or too small cluster fails fast
            from pipeline.features.ray_engine import RayEngine, ray_session, worker_env

            ray = session.enter_context(ray_session(ex.ray, worker_env()))
            have = ray.cluster_resources()
            print(f"ray: {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs")
        precision = use_precision(ex.precision)
        devices = distribute_over_devices(ex.batch_size)
        model, weights_used = build_extractor(backbone)
        if backbone.identity.startswith(("file:", "folder:")) and weights_used != backbone.identity:
            raise RecordError(
                f"backbone.weights {backbone.weights} changed after `scan` read it: run `dvc repro`"
            )
        batch, clipped = batch_within(model, ex.batch_size, ex.memory_mb, devices)
        print(
            f"backbone {backbone.name}, weights: {short(weights_used)}, layers: {backbone.layers}"
            f", devices: {devices}, precision: {precision}"
        )
        if clipped:
            print(clipped)
        fingerprint = Fingerprint(
            **expected,
            weights_used=weights_used,
            precision=precision,
            image_size=prepared.image_size,
            versions=versions(),
        )
        run = functools.partial(
            extract_all,
            model,
            prepared,
            fingerprint,
            batch,
            ex.memory_mb,
            decode_workers=decode_workers(params.data),
            layout=layout,
        )
        if ex.engine == "ray":
            within = ex.model_copy(update={"batch_size": batch})
            run(engine=RayEngine(backbone, within, precision, weights_used))
        else:
            run()
    print(f"wrote {layout.features}/{{train,val,test}}.h5")


if __name__ == "__main__":
    run_stage("extract", __doc__, main)
