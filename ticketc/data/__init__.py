"""Datasets for `ticketc find`, held in memory as tensors so training does no per-sample work.

`load_dataset("mnist" | "cifar10", data_dir)` or `load_user_dataset("module.path:factory")`
return a `Splits`: train / validation / test tensors and the number of classes.
"""

from ticketc.data.sources import load_dataset, load_user_dataset
from ticketc.data.splits import Splits, TensorSplit

__all__ = ["Splits", "TensorSplit", "load_dataset", "load_user_dataset"]
