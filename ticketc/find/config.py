"""`FindConfig`: every setting of a lottery-ticket search, with the paper's defaults.

Fields left at None take the value the paper used for the chosen architecture (`PAPER`), so
the defaults are written once, here. `resolved()` returns the config with them filled in.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from ticketc.models import REGISTRY

CONTROLS = ("reinit", "random-mask")
STRATEGIES = ("layerwise", "global")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class PaperSetting:
    lr: float
    iterations: int
    fc_rate: float = 0.2
    conv_rate: float = 0.1
    output_rate: float = 0.1


# Frankle & Carbin (ICLR 2019), Figure 2: Adam, batch 60 throughout.
PAPER = {
    "lenet300": PaperSetting(lr=1.2e-3, iterations=50_000),
    "conv2": PaperSetting(lr=2e-4, iterations=20_000),
    "conv4": PaperSetting(lr=3e-4, iterations=25_000),
    "conv6": PaperSetting(lr=3e-4, iterations=30_000, conv_rate=0.15),
}
# User models: the Lenet settings are a reasonable start for small networks.
USER_DEFAULT = PaperSetting(lr=1.2e-3, iterations=50_000)
DEFAULT_ROUNDS = 15  # Lenet-300-100 at 3.6% of weights remaining

_REWIND = re.compile(r"^(init|iteration:\d+|epoch:\d+)$")


@dataclass(frozen=True)
class FindConfig:
    """Settings of one iterative-magnitude-pruning run (one seed).

    model: a built-in name (lenet300, conv2, conv4, conv6) or `module.path:factory`.
    dataset: "mnist" or "cifar10" (with `data_dir`), or None with `data` = `module.path:factory`.
    rounds / target_density: prune for `rounds` rounds, or until the overall density of the
    prunable weights is at most `target_density`; neither: DEFAULT_ROUNDS.
    strategy: "layerwise" (fc_rate / conv_rate / output_rate per round) or "global" (global_rate).
    rewind: "init" (Frankle & Carbin 2019), "iteration:K" or "epoch:E" (Frankle et al. 2020).
    controls: trained beside each pruned level: "reinit" (same mask, fresh random weights) and
    "random-mask" (same per-layer densities, random positions, same starting weights);
    at every pruned level, or only at `control_levels`.
    accuracy_target: the ticket is the sparsest level whose accuracy (validation, else test) is at
    least this; None: the dense level's accuracy minus `max_accuracy_drop`.
    csr_below: train each Linear layer of a ReLU MLP in CSR form (work proportional to its
    survivors) once every member's density there is below this; 0 keeps them dense.
    """

    model: str = "lenet300"
    dataset: str | None = "mnist"
    data_dir: str | None = None
    data: str | None = None
    rounds: int | None = None
    target_density: float | None = None
    one_shot: bool = False
    iterations: int | None = None
    batch_size: int = 60
    lr: float | None = None
    optimizer: str = "adam"
    strategy: str = "layerwise"
    fc_rate: float | None = None
    conv_rate: float | None = None
    output_rate: float | None = None
    global_rate: float = 0.2
    prune_biases: bool = False
    prune_norms: bool = False
    rewind: str = "init"
    controls: tuple[str, ...] = ()
    control_levels: tuple[int, ...] | None = None
    seed: int = 0
    val_size: int = 5000
    eval_every: int = 1000
    checkpoint_every: int = 5000
    accuracy_target: float | None = None
    max_accuracy_drop: float = 0.005
    csr_below: float = 0.45
    arch_kwargs: dict[str, object] = field(default_factory=dict, compare=True)

    def __post_init__(self) -> None:
        if ":" not in self.model and self.model not in REGISTRY:
            raise ValueError(
                f"model {self.model!r} is neither built in ({', '.join(REGISTRY)}) "
                "nor of the form module.path:factory"
            )
        if (self.dataset is None) == (self.data is None):
            raise ValueError(
                "give exactly one of dataset (mnist, cifar10) and data (module:factory)"
            )
        if self.dataset is not None and self.dataset not in ("mnist", "cifar10"):
            raise ValueError(f"dataset {self.dataset!r} is not one of mnist, cifar10")
        if self.rounds is not None and self.target_density is not None:
            raise ValueError("give rounds or target_density, not both")
        if self.rounds is not None and not 0 <= self.rounds <= 200:
            raise ValueError(f"rounds must be in [0, 200], got {self.rounds}")
        if self.target_density is not None and not 0.0 < self.target_density <= 1.0:
            raise ValueError(f"target_density must be in (0, 1], got {self.target_density}")
        for name in ("iterations", "batch_size", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        for name in ("fc_rate", "conv_rate", "output_rate", "global_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not _REWIND.match(self.rewind):
            raise ValueError(f"rewind {self.rewind!r} is not init, iteration:K or epoch:E")
        for c in self.controls:
            if c not in CONTROLS:
                raise ValueError(f"control {c!r} is not one of {', '.join(CONTROLS)}")
        if len(set(self.controls)) != len(self.controls):
            raise ValueError(f"controls {self.controls} repeat a name")
        if self.control_levels is not None and any(lv < 1 for lv in self.control_levels):
            raise ValueError(f"control_levels {self.control_levels} must all be >= 1")
        if self.val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {self.val_size}")
        if self.accuracy_target is not None and not 0.0 <= self.accuracy_target <= 1.0:
            raise ValueError(f"accuracy_target must be in [0, 1], got {self.accuracy_target}")
        if not 0.0 <= self.csr_below <= 1.0:
            raise ValueError(f"csr_below must be in [0, 1], got {self.csr_below}")
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ValueError(f"max_accuracy_drop must be in [0, 1], got {self.max_accuracy_drop}")

    @property
    def arch(self) -> str:
        """The `module.path:factory` written into the ticket."""
        return self.model if ":" in self.model else f"ticketc.models:{self.model}"

    @property
    def paper(self) -> PaperSetting:
        return PAPER.get(self.model, USER_DEFAULT)

    def resolved(self) -> FindConfig:
        """This config with every None default replaced by the paper's value."""
        p = self.paper
        return dataclasses.replace(
            self,
            iterations=self.iterations if self.iterations is not None else p.iterations,
            lr=self.lr if self.lr is not None else p.lr,
            fc_rate=self.fc_rate if self.fc_rate is not None else p.fc_rate,
            conv_rate=self.conv_rate if self.conv_rate is not None else p.conv_rate,
            output_rate=self.output_rate if self.output_rate is not None else p.output_rate,
            rounds=self.rounds
            if self.rounds is not None or self.target_density is not None
            else DEFAULT_ROUNDS,
        )

    def rewind_iteration(self, steps_per_epoch: int) -> int:
        kind, _, value = self.rewind.partition(":")
        if kind == "init":
            return 0
        return int(value) * (steps_per_epoch if kind == "epoch" else 1)

    def to_json(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["controls"] = list(self.controls)
        if self.control_levels is not None:
            out["control_levels"] = list(self.control_levels)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> FindConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in obj.items() if k in known}
        kwargs["controls"] = tuple(kwargs.get("controls", ()))  # type: ignore[arg-type]
        if kwargs.get("control_levels") is not None:
            kwargs["control_levels"] = tuple(kwargs["control_levels"])  # type: ignore[arg-type]
        return cls(**kwargs)  # type: ignore[arg-type]
