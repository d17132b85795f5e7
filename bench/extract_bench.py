"""Extraction throughput against the bare model, the naive way and the hardware ceiling.

Rows (images/s over the same random uint8 images):
  a  bare `model.predict` of the deepest requested layer alone: a single-output keras.Model,
     float32 numpy input already preprocessed (preprocessing not timed)
  b  the project's extract end to end: prepared uint8 .npy on disk -> features HDF5 on disk,
     through pipeline.features.job.extract_split, every requested layer in one pass
  c  the same with only the deepest layer
  d  the naive way: one single-output model.predict per layer on float32 numpy, numpy pooling
  e1 ceiling: a large matmul's FLOP/s (bf16 on GPU, float32 on CPU) over the extractor's
     FLOPs per image (counted from its Conv/Dense layers; VGG16 at 224 with top: 30.9 GFLOP)
  e2 device-only forward of the extractor on uint8 data already on the device
     (jax: jitted stateless_call; tensorflow: tf.function; torch: no_grad call;
     --backend-agnostic: eager model(x) on a keras tensor, no backend import)
  m  peak RSS of the extract end to end in a subprocess at 1x and 5x the images (os.wait4's
     per-child ru_maxrss): flat when memory does not grow with the number of images

  r  (--ray) the same on the ray engine: Ray Data on a local cluster, one backbone actor

Rows a-d: best of --repeats runs. Ratios: b/a (goal >= 0.9), time(b)/time(c) (goal <= 1.15), b/e1, b/e2, b/d.

    python bench/extract_bench.py --size 32 --images 1000 --batch-size 32
    KERAS_BACKEND=jax python bench/extract_bench.py --size 224 --images 10000 --batch-size 256 \
        --precision mixed_bfloat16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TQDM_DISABLE", "1")
logging.getLogger("tensorflow").setLevel(logging.ERROR)  # retracing notes of the naive row
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # synthetic.py

import numpy as np  # noqa: E402 - after the environment set above

DEFAULT_LAYERS = {
    224: "block2_pool:avg,block5_pool:avg,fc2:none",
    "other": "block2_pool:avg,block4_pool:avg,block5_pool:avg",
}


def parse_layers(text: str) -> dict[str, str]:
    out = {}
    for item in text.split(","):
        layer, _, mode = item.strip().partition(":")
        out[layer] = mode or "avg"
    return out


# ---------------------------------------------------------------- data on disk


def write_prepared(directory: Path, n: int, size: int, seed: int = 0) -> Path:
    """data/prepared-like train split of `n` random uint8 images, written in blocks."""
    directory.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(
        directory / "train_images.npy", "w+", np.uint8, (n, size, size, 3)
    )
    rng = np.random.default_rng(seed)
    block = max(1, (64 << 20) // (size * size * 3))
    for start in range(0, n, block):
        stop = min(n, start + block)
        images[start:stop] = rng.integers(0, 256, (stop - start, size, size, 3), dtype=np.uint8)
    images.flush()
    del images
    np.save(directory / "train_labels.npy", (np.arange(n) % 10).astype(np.int32))
    return directory


def run_extract(
    model, layers: dict, prepared: Path, out_dir: Path, batch_size: int, engine=None
) -> float:
    """The project's extract of the prepared train split (on `engine`: local by default);
    returns the seconds it took."""
    from synthetic import synthetic_fingerprint

    from pipeline.data.arrays import NpyRows
    from pipeline.features.job import extract_split
    from pipeline.project.records import file_sha256

    images_file = prepared / "train_images.npy"
    digest = file_sha256(images_file)  # recorded by prepare; extract checks it while it runs
    extract = {"layers": layers, "batch_size": batch_size, "storage_dtype": "float16"}
    fingerprint = synthetic_fingerprint(
        layers, extract={**extract, "precision": "float32"}, data=f"bench-{time.time()}"
    )
    start = time.perf_counter()
    images, labels = NpyRows(images_file), np.load(prepared / "train_labels.npy")
    extract_split(
        model,
        images,
        labels,
        out_dir / "train.h5",
        fingerprint,
        {"class_names": [str(i) for i in range(10)]},
        batch_size,
        out_dir / "scratch",
        desc="bench",
        images_sha256=(images_file, digest),
        engine=engine,
    )
    seconds = time.perf_counter() - start
    (out_dir / "train.h5").unlink()
    return seconds


def best(fn, repeats: int, timed: bool = False) -> float:
    """Shortest of `repeats` runs in seconds (`timed`: fn returns its own seconds)."""
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        result = fn()
        times.append(result if timed else time.perf_counter() - t0)
    return min(times)


# ---------------------------------------------------------------- model helpers


def iter_layers(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from iter_layers(layer)
        else:
            yield layer


def count_flops(model) -> float:
    """FLOPs (2 x MACs) per image of the Conv/Dense layers of `model` (nested models included)."""
    total = 0
    for layer in iter_layers(model):
        kind = type(layer).__name__
        if kind in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D"):
            _, h, w, _ = layer.output.shape
            kh, kw = layer.kernel_size
            cin = layer.input.shape[-1]
            if kind == "Conv2D":
                total += 2 * h * w * kh * kw * cin * layer.filters // layer.groups
            elif kind == "DepthwiseConv2D":
                total += 2 * h * w * kh * kw * cin * layer.depth_multiplier
            else:
                total += (
                    2
                    * h
                    * w
                    * (
                        kh * kw * cin * layer.depth_multiplier
                        + cin * layer.depth_multiplier * layer.filters
                    )
                )
        elif kind == "Dense":
            total += 2 * int(np.prod(layer.input.shape[1:])) * layer.units
    return float(total)


def device_name(agnostic: bool) -> tuple[str, bool]:
    """(description, is_gpu) of the device Keras computes on."""
    import keras

    backend = keras.backend.backend()
    if not agnostic:
        try:
            if backend == "jax":
                import jax

                d = jax.devices()[0]
                return f"{d.platform}: {d.device_kind} x{len(jax.devices())}", d.platform == "gpu"
            if backend == "tensorflow":
                import tensorflow as tf

                gpus = tf.config.list_physical_devices("GPU")
                if gpus:
                    name = tf.config.experimental.get_device_details(gpus[0]).get(
                        "device_name", "GPU"
                    )
                    return f"GPU: {name} x{len(gpus)}", True
            if backend == "torch":
                import torch

                if torch.cuda.is_available():
                    return f"GPU: {torch.cuda.get_device_name(0)}", True
        except Exception as exc:  # noqa: BLE001 - informative only
            return f"unknown ({exc})", False
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores", False


def matmul_flops(n: int, dtype: str, agnostic: bool, seconds: float = 3.0) -> float:
    """Sustained FLOP/s of an n x n x n matmul in `dtype` on the compute device."""
    import keras
    from keras import ops

    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    a_np = rng.standard_normal((n, n), dtype=np.float32)
    b_np = rng.standard_normal((n, n), dtype=np.float32)
    if agnostic or backend not in ("jax", "tensorflow", "torch"):
        a, b = (
            ops.cast(ops.convert_to_tensor(a_np), dtype),
            ops.cast(ops.convert_to_tensor(b_np), dtype),
        )
        step = ops.matmul
        sync = lambda x: ops.convert_to_numpy(x[0, 0])
    elif backend == "jax":
        import jax
        import jax.numpy as jnp

        a, b = jnp.asarray(a_np, dtype), jnp.asarray(b_np, dtype)
        step = jax.jit(jnp.matmul)
        sync = lambda x: x.block_until_ready()
    elif backend == "tensorflow":
        import tensorflow as tf

        a, b = tf.cast(tf.constant(a_np), dtype), tf.cast(tf.constant(b_np), dtype)
        step = tf.function(tf.matmul)
        sync = lambda x: x[0, 0].numpy()
    else:
        import torch

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        a = torch.as_tensor(a_np, device=dev).to(getattr(torch, dtype))
        b = torch.as_tensor(b_np, device=dev).to(getattr(torch, dtype))
        step = torch.matmul
        sync = lambda x: torch.cuda.synchronize() if dev == "cuda" else x[0, 0].item()
    sync(step(a, b))  # compile / warm up
    reps, start = 0, time.perf_counter()
    while True:
        out = step(a, b)
        reps += 1
        if reps % 4 == 0 or reps == 1:
            sync(out)
            if time.perf_counter() - start > seconds:
                break
    sync(out)
    return 2.0 * n**3 * reps / (time.perf_counter() - start)


def device_forward_rate(
    model, batch: np.ndarray, agnostic: bool, seconds: float = 5.0
) -> tuple[float, str]:
    """Images/s of the extractor on one uint8 batch already on the device; (rate, how)."""
    import keras
    from keras import ops

    backend = keras.backend.backend()
    if agnostic:
        x = ops.convert_to_tensor(batch)
        step = lambda x: model(x, training=False)
        sync = lambda out: [ops.convert_to_numpy(o[0, 0]) for o in out]
        how = "eager model(x), keras tensor"
    elif backend == "jax":
        import jax

        state = (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )
        jitted = jax.jit(lambda t, nt, x: model.stateless_call(t, nt, x, training=False)[0])
        x = jax.device_put(batch)
        step = lambda x: jitted(*state, x)
        sync = lambda out: jax.block_until_ready(out)
        how = "jax.jit(stateless_call), device array"
    elif backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(batch)
        step = tf.function(lambda x: model(x, training=False))
        sync = lambda out: [o[0, 0].numpy() for o in out]
        how = "tf.function(model(x)), tf tensor"
    else:
        import torch

        x = ops.convert_to_tensor(batch)
        step = lambda x: model(x, training=False)
        sync = lambda out: torch.cuda.synchronize() if torch.cuda.is_available() else None
        how = "torch no_grad model(x), device tensor"

    def call():
        if backend == "torch" and not agnostic:
            import torch

            with torch.no_grad():
                return step(x)
        return step(x)

    out = call()
    out = out if isinstance(out, (list, tuple)) else [out]
    sync(out)  # compile / warm up
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or reps < 2:
        out = call()
        out = out if isinstance(out, (list, tuple)) else [out]
        reps += 1
        if reps % 4 == 0:
            sync(out)
    sync(out)
    return reps * len(batch) / (time.perf_counter() - start), how


# ---------------------------------------------------------------- the measured rows


def resolve(args, layers):
    """The backbone record scan would write for these arguments."""
    from pipeline.backbones.registry import get_backbone

    return get_backbone(args.backbone).record(args.weights, args.size, layers)


def build(args, layers):
    import keras

    from pipeline.features.extractor import build_extractor

    if args.precision != "float32":
        keras.mixed_precision.set_dtype_policy(args.precision)
    return build_extractor(resolve(args, layers))[0]


def ray_extract_seconds(args, model, layers: dict, prepared: Path, out_dir: Path) -> float:
    """Row r: run_extract on the ray engine, one actor (with a GPU when Ray sees one), Ray
    started on this host; the actor's start (model build, compile) is included."""
    from pipeline.features.ray_engine import RayEngine, ray_session, worker_env
    from pipeline.project.params import ExtractConfig, RayConfig

    cfg = ExtractConfig(
        layers=layers, batch_size=args.batch_size, precision=args.precision, engine="ray"
    )
    with ray_session(RayConfig(actors=1), worker_env()):
        engine = RayEngine(resolve(args, layers), cfg, args.precision, args.weights)
        return run_extract(model, layers, prepared, out_dir, args.batch_size, engine)


def child_extract(args) -> None:
    """Subprocess body for the memory rows: build, extract the prepared split, report."""
    layers = parse_layers(args.layers)
    model = build(args, layers)
    work = Path(args.child_extract)
    seconds = run_extract(model, layers, work / "prepared", work / "out", args.batch_size)
    print(json.dumps({"seconds": seconds}))


def memory_rows(args, work: Path) -> list[tuple]:
    rows = []
    base = args.memory_images or args.images
    for mult in (1, args.memory_multiple):
        n = base * mult
        sub = work / f"mem{mult}"
        write_prepared(sub / "prepared", n, args.size, seed=mult)
        cmd = [
            sys.executable,
            __file__,
            "--child-extract",
            str(sub),
            "--size",
            str(args.size),
            "--batch-size",
            str(args.batch_size),
            "--layers",
            args.layers,
            "--backbone",
            args.backbone,
            "--weights",
            args.weights,
            "--precision",
            args.precision,
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"memory child failed:\n{err[-3000:]}")
        seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
        rss_mb = usage.ru_maxrss / 1024  # KiB on Linux
        rows.append((n, seconds, rss_mb))
        for f in (sub / "prepared").glob("*.npy"):
            f.unlink()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="vgg16")
    ap.add_argument("--weights", default="random")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument(
        "--layers", default=None, help="layer:reduction,... (default: 3 VGG layers for the size)"
    )
    ap.add_argument(
        "--precision", default="float32", choices=("float32", "mixed_bfloat16", "mixed_float16")
    )
    ap.add_argument(
        "--matmul", type=int, default=None, help="matmul side (default 8192 on GPU, 2048 on CPU)"
    )
    ap.add_argument(
        "--naive-images",
        type=int,
        default=None,
        help="images for row d (default: all, at most 2000)",
    )
    ap.add_argument(
        "--memory-images",
        type=int,
        default=None,
        help="images of the 1x memory run (default --images)",
    )
    ap.add_argument("--memory-multiple", type=int, default=5)
    ap.add_argument("--no-memory", action="store_true", help="skip the memory rows")
    ap.add_argument(
        "--backend-agnostic",
        action="store_true",
        help="rows e1/e2 with keras.ops and eager model calls only (no tensorflow/jax/torch import)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="rows a-d: best of this many runs (2-core CI is noisy)",
    )
    ap.add_argument(
        "--seconds", type=float, default=3.0, help="minimum timing window of rows e1/e2"
    )
    ap.add_argument(
        "--ray", action="store_true", help="row r: the extract on the ray engine (needs Ray)"
    )
    ap.add_argument("--child-extract", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.layers = args.layers or DEFAULT_LAYERS.get(args.size, DEFAULT_LAYERS["other"])
    if args.child_extract:
        return child_extract(args)

    import keras

    from pipeline.backbones.adapters import load_backbone
    from pipeline.features.extractor import Preprocess

    layers = parse_layers(args.layers)
    n, bs = args.images, args.batch_size
    device, gpu = device_name(args.backend_agnostic)
    rows: list[tuple[str, str, float | None, float | None, str]] = []

    def add(row: tuple) -> None:
        """Keep a row for the table, and show it at once: a run cut short keeps what it measured."""
        rows.append(row)
        print(f"row {row[0]}: {row[2]:,.1f} images/s  ({row[1]})", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="extract_bench_") as tmp:
        work = Path(tmp)
        prepared = write_prepared(work / "prepared", n, args.size)
        images = np.load(prepared / "train_images.npy")

        t0 = time.perf_counter()
        model = build(args, layers)
        build_s = time.perf_counter() - t0
        record = resolve(args, layers)
        backbone, _ = load_backbone(record, list(layers))
        order = {layer.name: i for i, layer in enumerate(backbone.layers)}
        deepest = max(layers, key=order.__getitem__)
        flops = count_flops(model)

        # a: bare predict of the deepest layer, float32 preprocessed numpy
        x32 = np.asarray(Preprocess.of(record)(images))
        single = keras.Model(backbone.inputs, backbone.get_layer(deepest).output)
        single.predict(x32[:bs], batch_size=bs, verbose=0)
        a_s = best(lambda: single.predict(x32, batch_size=bs, verbose=0), args.repeats)
        add(
            (
                "a",
                f"bare model.predict, {deepest} only (float32 numpy, preprocessed)",
                n / a_s,
                a_s,
                "",
            )
        )

        # b: the project's extract, every layer; warm-up on a few images first
        warm = write_prepared(work / "warm", min(n, 2 * bs), args.size, seed=9)
        run_extract(model, layers, warm, work / "out_b", bs)
        b_s = best(
            lambda: run_extract(model, layers, prepared, work / "out_b", bs),
            args.repeats,
            timed=True,
        )
        add(
            (
                "b",
                f"project extract end to end, {len(layers)} layers (.npy -> .h5)",
                n / b_s,
                b_s,
                f"model build {build_s:.1f} s not included",
            )
        )

        if args.ray:
            r_s = ray_extract_seconds(args, model, layers, prepared, work / "out_r")
            add(
                (
                    "r",
                    f"project extract on the ray engine, one actor, {len(layers)} layers",
                    n / r_s,
                    r_s,
                    "Ray start excluded, actor start included",
                )
            )

        # c: the project's extract, the deepest layer only
        only = {deepest: layers[deepest]}
        model_c = build(args, only)
        run_extract(model_c, only, warm, work / "out_c", bs)
        c_s = best(
            lambda: run_extract(model_c, only, prepared, work / "out_c", bs),
            args.repeats,
            timed=True,
        )
        add(("c", f"project extract end to end, {deepest} only", n / c_s, c_s, ""))

        # d: naive, one single-output model.predict per layer on float32 numpy
        nd = min(n, args.naive_images or 2000)
        singles = {
            layer: keras.Model(backbone.inputs, backbone.get_layer(layer).output)
            for layer in layers
        }
        for m in singles.values():
            m.predict(x32[:bs], batch_size=bs, verbose=0)

        def naive():
            for layer, m in singles.items():
                maps = m.predict(x32[:nd], batch_size=bs, verbose=0)
                maps.mean(axis=(1, 2)) if maps.ndim == 4 and layers[
                    layer
                ] != "none" else maps.reshape(nd, -1)

        d_s = best(naive, args.repeats)
        add(
            (
                "d",
                f"naive: one model.predict per layer ({len(layers)}), float32 numpy",
                nd / d_s,
                d_s,
                f"{nd} images" if nd != n else "",
            )
        )
        x32 = None  # free it before the memory rows

        # e1: matmul ceiling (where the Conv/Dense layers are the model's own: not a transformer's,
        # whose layers sit inside its encoder)
        if flops:
            side = args.matmul or (8192 if gpu else 2048)
            dtype = "bfloat16" if gpu else "float32"
            flop_s = matmul_flops(side, dtype, args.backend_agnostic, args.seconds)
            ceiling = flop_s / flops
            what = f"ceiling: matmul {side}^3 {dtype} {flop_s / 1e12:.3f} TFLOP/s / {flops / 1e9:.3f} GFLOP per image"
            add(("e1", what, ceiling, None, ""))

        # e2: device-only forward
        batch = images[:bs] if len(images) >= bs else np.resize(images, (bs, *images.shape[1:]))
        e2, how = device_forward_rate(
            model, np.ascontiguousarray(batch), args.backend_agnostic, args.seconds
        )
        add(("e2", f"device-only forward of the extractor ({how})", e2, None, ""))

        mem = [] if args.no_memory else memory_rows(args, work)
        for (count, seconds, rss), label in zip(mem, ("1x", f"{args.memory_multiple}x")):
            add(
                (
                    f"m{label}",
                    f"extract end to end in a subprocess, {count} images",
                    count / seconds,
                    seconds,
                    f"peak RSS {rss:.1f} MB",
                )
            )

    b_rate = n / b_s
    ratios = [
        ("b/a", b_rate / (n / a_s), "goal >= 0.9"),
        ("time b / time c", b_s / c_s, "goal <= 1.15 (3 layers vs 1)"),
        ("b/e2", b_rate / e2, "share of the device-only rate"),
        ("b/d", b_rate / (nd / d_s), "speed-up over the naive way"),
    ]
    if flops:
        ratios.insert(2, ("b/e1", b_rate / ceiling, "share of the matmul ceiling"))
    if args.ray:
        ratios.append(("r/b", (n / r_s) / b_rate, "ray engine against the local one"))
    if len(mem) == 2:
        ratios.append(
            (f"RSS {args.memory_multiple}x / RSS 1x", mem[1][2] / mem[0][2], "goal ~1.0 (flat)")
        )

    print()
    print(
        f"extract bench: {args.backbone} {args.size}x{args.size}, {n} images, batch {bs}, layers {args.layers}, "
        f"weights {args.weights}, precision {args.precision}"
    )
    print(
        f"keras {keras.__version__} on {keras.backend.backend()}, {device}"
        + (", --backend-agnostic" if args.backend_agnostic else "")
    )
    print()
    print("| row | what | images/s | seconds | note |")
    print("|---|---|---:|---:|---|")
    for key, what, rate, seconds, note in rows:
        sec = f"{seconds:.2f}" if seconds is not None else ""
        print(f"| {key} | {what} | {rate:,.1f} | {sec} | {note} |")
    for key, value, note in ratios:
        print(f"| {key} | ratio | {value:.3f} |  | {note} |")


if __name__ == "__main__":
    main()
