"""The one keras.utils.PyDataset of the project: batches cut from blocks of rows, each block
read once, so that training reads memory-mapped images or HDF5 features a block at a time."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def row_batches(
    read: Callable[[np.ndarray], np.ndarray],
    labels: np.ndarray | None,
    batch_size: int,
    blocks: Callable[[], list[np.ndarray]],
):
    """(x, y) batches, or x alone without labels. `blocks()` gives one epoch's row indices in
    blocks (called again after every epoch, so it may shuffle); `read(rows)` returns those rows
    in that order."""
    import keras

    class RowBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.on_epoch_end()

        def on_epoch_end(self):
            self.blocks = blocks()
            self.index = [
                (b, s)
                for b, rows in enumerate(self.blocks)
                for s in range(0, len(rows), batch_size)
            ]
            self.cached = (None, None)

        def __len__(self):
            return len(self.index)  # a block's last batch may be short: every row, once

        def __getitem__(self, i):
            b, start = self.index[i]
            if self.cached[0] != b:
                self.cached = (b, read(self.blocks[b]))
            x = self.cached[1][start : start + batch_size]
            if labels is None:
                return x
            return x, labels[self.blocks[b][start : start + batch_size]]

    return RowBatches()
