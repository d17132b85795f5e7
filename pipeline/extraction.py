"""One forward pass over prepared images, every requested layer streamed into the store."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import store
from pipeline.forward import forward_for
from pipeline.store import ChunkWriter, fingerprint_key


def versions() -> dict:
    import h5py
    import keras

    return {
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "h5py": h5py.__version__,
    }


def rows_per_chunk(widths: dict[str, int], itemsize: int, batch_size: int) -> int:
    row_bytes = sum(widths.values()) * itemsize
    batches = max(1, store.TARGET_CHUNK_BYTES // max(1, row_bytes * batch_size))
    return batches * batch_size


def extract_split(
    model,
    images: np.ndarray,
    labels: np.ndarray,
    out: Path,
    fingerprint: dict,
    attrs: dict,
    batch_size: int,
    storage_dtype: str,
    scratch_root: Path,
    desc: str = "extract",
) -> None:
    """Stream `images` through `model` into `out`; resume from `scratch_root` after a crash."""
    layers = list(fingerprint["layers"])
    widths = {layer: int(o.shape[-1]) for layer, o in zip(layers, model.outputs)}
    scratch = Path(scratch_root) / fingerprint_key(fingerprint) / desc
    chunk = rows_per_chunk(widths, np.dtype(storage_dtype).itemsize, batch_size)
    writer = ChunkWriter(scratch, widths, storage_dtype, chunk)
    n = len(images)
    done = writer.rows_done()
    forward = forward_for(model, batch_size, storage_dtype)
    with (
        tqdm(total=n, initial=done, desc=desc, unit="img", smoothing=0.1) as bar,
        ThreadPoolExecutor(1) as io,
    ):
        pending = None
        for start in range(done, n, chunk):
            outputs = forward.run(images[start : start + chunk])
            if pending is not None:
                pending.result()
            pending = io.submit(writer.write, start, dict(zip(layers, outputs)))
            bar.update(len(outputs[0]))
        if pending is not None:
            pending.result()
    writer.finalize(out, n, labels, {**attrs, "fingerprint": fingerprint})
