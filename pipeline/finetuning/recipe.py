"""How fine-tuning trains (params `finetune`): LP-FT phases (the head alone, then the unfrozen
backbone layers with it), AdamW or SGD with warm-up and cosine decay, layer-wise rates, and
early stopping whose first candidate is the state before training.

Keras is imported lazily.
"""

from __future__ import annotations

import numpy as np

from pipeline.finetuning.assembly import SEED, Assembly
from pipeline.finetuning.params import FinetuneConfig

METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


def image_batches(
    images: np.ndarray, labels: np.ndarray | None, batch_size: int, shuffle: bool = False
):
    """Batches of memory-mapped uint8 images (only one batch in memory), reshuffled every epoch
    when `shuffle`; rows within a batch are read in file order."""
    from pipeline.heads.batches import row_batches

    rng = np.random.default_rng(SEED)

    def blocks():
        order = rng.permutation(len(images)) if shuffle else np.arange(len(images))
        return [np.sort(order[i : i + batch_size]) for i in range(0, len(images), batch_size)]

    return row_batches(lambda rows: np.asarray(images[rows]), labels, batch_size, blocks)


def keep_best(initial: dict, patience: int, n_val: int):
    """Early stopping on val_accuracy (ties broken by val_loss) whose first candidate is the
    state before training; the best weights are restored at the end of every phase.

    Accuracies are compared as counts of correct images: Keras logs them in float32
    (44/49 = 0.8979591727) and the initial one is float64 (0.8979591837), so comparing the
    floats would make every tie with the start a loss, whatever the loss says."""
    import keras

    def correct(accuracy: float) -> int:
        return round(float(accuracy) * n_val)

    class KeepBest(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.best = (correct(initial["val_accuracy"]), -initial["val_loss"])
            self.best_epoch, self.wait, self.weights = 0, 0, None

        def on_train_begin(self, logs=None):
            self.wait = 0
            if self.weights is None:
                self.weights = self.model.get_weights()

        def on_epoch_end(self, epoch, logs=None):
            score = (correct(logs["val_accuracy"]), -logs["val_loss"])
            if score > self.best:
                self.best, self.best_epoch, self.wait = score, epoch + 1, 0
                self.weights = self.model.get_weights()
            else:
                self.wait += 1
                if self.wait >= patience:
                    self.model.stop_training = True

        def on_train_end(self, logs=None):
            self.model.set_weights(self.weights)

    return KeepBest()


def layer_rates(assembly: Assembly, decay: float) -> dict[str, float]:
    """Learning-rate multiplier per trainable backbone variable: 1 at the top layer (or
    transformer block), `decay` at the lowest unfrozen one, geometric in between (the head
    gets 1)."""
    layers, parts = assembly.trainable_layers, assembly.parts()
    rates = {}
    for i, name in enumerate(layers):
        share = decay ** ((len(layers) - 1 - i) / max(1, len(layers) - 1))
        for variable in (v for part in parts[name] for v in part.trainable_weights):
            rates[variable.path] = share
    return rates


def optimizer(cfg: FinetuneConfig, per_epoch: int, epochs: int, rates: dict[str, float]):
    """AdamW or SGD with momentum: linear warm-up over cfg.warmup_epochs, cosine decay to zero,
    each variable's rate scaled by `rates` (layer-wise rates)."""
    import keras

    steps = per_epoch * epochs
    warmup = min(steps - 1, round(cfg.warmup_epochs * per_epoch))
    schedule = keras.optimizers.schedules.CosineDecay(
        cfg.learning_rate / 100 if warmup else cfg.learning_rate,
        decay_steps=max(1, steps - warmup),
        warmup_target=cfg.learning_rate if warmup else None,
        warmup_steps=warmup,
    )
    base = {"adamw": keras.optimizers.AdamW, "sgd": keras.optimizers.SGD}[cfg.optimizer]
    extra = {"momentum": 0.9} if cfg.optimizer == "sgd" else {}

    class LayerwiseRates(base):
        def build(self, variables):
            super().build(variables)
            self.shares = [rates.get(v.path, 1.0) for v in variables]

        def update_step(self, gradient, variable, learning_rate):
            # the backend may pass its own variable type: look it up by index, not by path
            share = self.shares[self._get_variable_index(variable)]
            super().update_step(gradient, variable, learning_rate * share)

    return LayerwiseRates(learning_rate=schedule, weight_decay=cfg.weight_decay, **extra)


class Stacked:
    """Several image arrays read as one (train+val), without copying them into memory."""

    def __init__(self, *parts: np.ndarray):
        self.parts = parts
        self.starts = np.cumsum([0, *(len(p) for p in parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        part = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.parts[0].shape[1:]), self.parts[0].dtype)
        for i, p in enumerate(self.parts):
            out[part == i] = p[rows[part == i] - self.starts[i]]
        return out


def progress(images: int, batch_size: int):
    """A Keras callback: per batch, images/s and the time left (tqdm, as prepare and extract
    show them); per epoch, one line with the losses and accuracies."""
    import keras
    from tqdm import tqdm

    class Progress(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.bar = tqdm(total=images, desc=f"epoch {epoch + 1}", unit="img", leave=False)

        def on_train_batch_end(self, batch, logs=None):
            self.bar.update(min(batch_size, images - self.bar.n))

        def on_epoch_end(self, epoch, logs=None):
            self.bar.close()
            shown = ", ".join(f"{k} {v:.4f}" for k, v in (logs or {}).items() if k in METRICS)
            print(f"epoch {epoch + 1}: {shown} ({self.bar.format_dict['elapsed']:.0f} s)")

    return Progress()


def _phases(assembly: Assembly, cfg: FinetuneConfig) -> list[tuple[bool, int]]:
    """(backbone trains, epochs) of LP-FT: the head alone, then the unfrozen layers with it."""
    phases = [(False, cfg.head_epochs), (bool(assembly.trainable_layers), cfg.epochs)]
    return [(backbone, epochs) for backbone, epochs in phases if epochs]


def _compile(assembly: Assembly, backbone: bool, cfg: FinetuneConfig, per_epoch: int, epochs: int):
    assembly.train_backbone(backbone)
    rates = layer_rates(assembly, cfg.layer_decay) if backbone else {}
    assembly.model.compile(
        optimizer=optimizer(cfg, per_epoch, epochs, rates),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def fit(
    assembly: Assembly, data: dict, cfg: FinetuneConfig, initial: dict
) -> tuple[list[dict], int]:
    """LP-FT: the head alone for cfg.head_epochs, then the unfrozen backbone layers with it for
    cfg.epochs, each phase with its own warm-up and cosine schedule; early stopping whose first
    candidate is `initial`. Returns (history rows, best epoch; 0 is the state before training)."""
    import keras

    keras.utils.set_random_seed(SEED)
    keep = keep_best(initial, cfg.patience, len(data["val"][1]))
    train = image_batches(*data["train"], cfg.batch_size, shuffle=True)
    val = image_batches(*data["val"], cfg.batch_size)
    rows, epoch = [], 0
    for backbone, epochs in _phases(assembly, cfg):
        _compile(assembly, backbone, cfg, len(train), epochs)
        result = assembly.model.fit(
            train,
            validation_data=val,
            initial_epoch=epoch,
            epochs=epoch + epochs,
            callbacks=[keep, progress(len(data["train"][1]), cfg.batch_size)],
            verbose=0,
        )
        history = result.history
        ran = len(history.get("loss", []))
        rows += [
            {
                "epoch": epoch + e + 1,
                "phase": "backbone" if backbone else "head",
                **{k: history[k][e] for k in METRICS},
            }
            for e in range(ran)
        ]
        epoch += ran
    return rows, keep.best_epoch


def refit(assembly: Assembly, images, labels: np.ndarray, cfg: FinetuneConfig, epochs: int):
    """The recipe again on `images` (train+val), for the `epochs` early stopping chose and with
    no validation left: every phase keeps the schedule it had, training stops after `epochs`."""
    import keras

    keras.utils.set_random_seed(SEED)
    train = image_batches(images, labels, cfg.batch_size, shuffle=True)
    done = 0
    for backbone, length in _phases(assembly, cfg):
        run = min(length, epochs - done)
        if run <= 0:
            break
        _compile(assembly, backbone, cfg, len(train), length)
        assembly.model.fit(
            train,
            initial_epoch=done,
            epochs=done + run,
            callbacks=[progress(len(labels), cfg.batch_size)],
            verbose=0,
        )
        done += run
