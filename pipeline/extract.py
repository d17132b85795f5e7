"""Stage `extract`: one pass of the frozen backbone, every requested layer into features/."""

import functools

from pipeline import paths
from pipeline.config import load_params
from pipeline.data import decode_workers
from pipeline.extraction import extract_all, versions
from pipeline.forward import distribute_over_devices
from pipeline.layers import build_extractor
from pipeline.precision import use_precision
from pipeline.provenance import current_prepared, expected_features
from pipeline.records import Fingerprint, RecordError
from pipeline.stage import run_stage


def main(_) -> None:
    params = load_params()
    bb, ex = params.backbone, params.extract
    prepared = current_prepared(params)
    expected = expected_features(params, prepared)
    precision = use_precision(ex.precision)
    devices = distribute_over_devices(ex.batch_size)
    model, weights_used = build_extractor(bb.name, bb.weights, prepared.image_size, ex.layers)
    if expected["weights"].startswith("file:") and weights_used != expected["weights"]:
        raise RecordError(
            f"backbone.weights file {bb.weights} changed after `scan` read it: run `dvc repro`"
        )
    print(
        f"backbone {bb.name}, weights: {weights_used}, layers: {ex.layers}, "
        f"devices: {devices}, precision: {precision}"
    )
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
        paths.PREPARED,
        prepared,
        fingerprint,
        paths.FEATURES,
        paths.EXTRACT_SCRATCH,
        ex.batch_size,
        ex.memory_mb,
        decode_workers=decode_workers(params.data),
    )
    if ex.engine == "ray":
        from pipeline.ray_engine import RayEngine, ray_session, worker_env

        with ray_session(ex.ray, worker_env()) as ray:
            have = ray.cluster_resources()
            print(f"ray: {have.get('CPU', 0):g} CPUs, {have.get('GPU', 0):g} GPUs")
            run(engine=RayEngine(bb, ex, prepared.image_size, precision, weights_used))
    else:
        run()
    print(f"wrote {paths.FEATURES}/{{train,val,test}}.h5")


if __name__ == "__main__":
    run_stage("extract", __doc__, main)
