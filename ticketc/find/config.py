"""`FindConfig`: every setting of a lottery-ticket search, with the paper's defaults.

Each field's help text and shown default live beside it (`metadata`), so `ticketc find --help`
is generated from this class and cannot drift from it. Fields left at None take the value the
paper used for the chosen architecture (`PAPER`) or one derived from the data; `resolved()`
fills the first kind in; `find_tickets` writes the validation count it held out. The run
directory's config.json holds the result, so a run states every value it used.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ticketc.data.splits import DATASETS, VAL_FRACTION, VAL_SIZE_MAX
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
    optimizer: str = "adam"
    batch_size: int = 60
    strategy: str = "layerwise"
    rewind: str = "init"
    weight_decay: float = 0.0
    lr_milestones: tuple[int, ...] = ()
    augment: bool = False
    prune_output: bool = True


# Frankle et al. (ICML 2020, "Linear mode connectivity and the lottery ticket hypothesis"),
# Table 1 and open_lth's defaults: SGD momentum 0.9, lr 0.1 divided by 10 at 80 and 120 of 160
# epochs (batch 128: 62,400 iterations), weight decay 1e-4, random crops and flips; global
# pruning of 20% per round, the output layer left whole; rewinding to iteration 2,000, where
# both networks have become stable.
_CIFAR_2020 = dict(
    lr=0.1,
    iterations=62_400,
    optimizer="sgd",
    batch_size=128,
    strategy="global",
    rewind="iteration:2000",
    weight_decay=1e-4,
    lr_milestones=(31_200, 46_800),
    augment=True,
    prune_output=False,
)
# Frankle & Carbin (ICLR 2019), Figure 2: Adam, batch 60 throughout.
PAPER = {
    "lenet300": PaperSetting(lr=1.2e-3, iterations=50_000),
    "conv2": PaperSetting(lr=2e-4, iterations=20_000),
    "conv4": PaperSetting(lr=3e-4, iterations=25_000),
    "conv6": PaperSetting(lr=3e-4, iterations=30_000, conv_rate=0.15),
    "resnet20": PaperSetting(**_CIFAR_2020),  # type: ignore[arg-type]
    "vgg16": PaperSetting(**_CIFAR_2020),  # type: ignore[arg-type]
}
# User models: the Lenet settings are a reasonable start for small networks.
USER_DEFAULT = PaperSetting(lr=1.2e-3, iterations=50_000)
DEFAULT_ROUNDS = 15  # Lenet-300-100 at 3.6% of weights remaining
# Evaluations per level: every 1,000 iterations, or 10 per level when levels are shorter.
EVAL_EVERY_MAX, EVALS_PER_LEVEL = 1000, 10

# Settings that do not change what any level trains to: where the data are (their content is
# compared by md5 instead), how many levels the run has, how often it checkpoints, and how the
# ticket is picked among the finished levels. A resumed run may change these.
NOT_RESULT_SETTINGS = frozenset(
    {
        "data_dir",
        "data",
        "rounds",
        "target_density",
        "checkpoint_every",
        "accuracy_target",
        "max_accuracy_drop",
        "workers",
    }
)


def _yes_no(text: str) -> bool:
    """ "yes"/"no" (also true/false, 1/0) as a bool."""
    value = text.strip().lower()
    if value in ("yes", "true", "1", "on"):
        return True
    if value in ("no", "false", "0", "off"):
        return False
    raise ValueError(f"expected yes or no, got {text!r}")


_yes_no.__name__ = "yes/no"  # argparse names the type in its error: "invalid yes/no value"


_REWIND = re.compile(r"^(init|iteration:\d+|epoch:\d+)$")

T = TypeVar("T")


def _setting(
    default: T,
    help: str,
    *,
    shown: str | None = None,
    choices: tuple[str, ...] | None = None,
    parse: Any = None,
    metavar: str | None = None,
) -> T:
    """A field whose `--flag` help (and the default it shows, if not `default`) sit with it;
    `parse` reads the flag's text when the type hint does not say how."""
    meta: dict[str, Any] = {
        "help": help,
        "shown": shown,
        "choices": choices,
        "type": parse,
        "metavar": metavar,
    }
    return field(default=default, metadata=meta)  # type: ignore[no-any-return]


def count_or_fraction(text: str) -> float:
    """`--val-size` text: "5000" is a count (int), "0.1" a fraction."""
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _paper(name: str) -> str:
    """The papers' value of a PaperSetting field, e.g. "0.1 (the paper's; conv6 0.15)"."""
    values = {m: getattr(p, name) for m, p in PAPER.items()}
    common = values["lenet300"]  # the default model's value, which user models take too
    assert getattr(USER_DEFAULT, name) == common
    others = ", ".join(f"{m} {_text(v)}" for m, v in values.items() if v != common)
    return f"{_text(common)} (the paper's" + (f"; {others}" if others else "") + ")"


@dataclass(frozen=True)
class FindConfig:
    """Settings of one iterative-magnitude-pruning run (one seed).

    model: a built-in name (lenet300, conv2, conv4, conv6) or `module.path:factory`.
    dataset: "mnist", "cifar10" or "imagefolder" (with `data_dir`), or None with `data` =
    `module.path:factory`.
    rounds / target_density: prune for `rounds` rounds, or until the overall density of the
    prunable weights is at most `target_density`; neither: DEFAULT_ROUNDS.
    strategy: "layerwise" (fc_rate / conv_rate / output_rate per round) or "global" (global_rate).
    rewind: "init" (Frankle & Carbin 2019), "iteration:K" or "epoch:E" (Frankle et al. 2020).
    controls: trained beside each pruned level: "reinit" (same mask, fresh random weights) and
    "random-mask" (same per-layer densities, random positions, same starting weights);
    at every pruned level, or only at `control_levels`.
    val_size: training samples held out for validation: a count (>= 1), a fraction (< 1) or 0;
    None: 10% of the training samples, at most 5,000 (a run's config.json states the count).
    accuracy_target: the ticket is the sparsest level whose final accuracy (validation, else
    test) is at least this; None: the dense level's accuracy minus `max_accuracy_drop`.
    csr_below: train each Linear layer of a ReLU MLP in CSR form (work proportional to its
    survivors) once every member's density there is below this; 0 keeps them dense.
    Fractions (rates, densities, accuracies) are in [0, 1]; counts of iterations are optimizer
    steps.
    """

    model: str = _setting(
        "lenet300",
        "built-in architecture (lenet300, conv2, conv4, conv6, "
        "resnet20, vgg16) or module.path:factory of your own (runs code: "
        "imports and calls the factory)",
        metavar="NAME",
    )
    dataset: str | None = _setting("mnist", "built-in dataset (or --data)", choices=DATASETS)
    data_dir: str | None = _setting(
        None,
        "folder of the built-in dataset's files",
        shown="MNIST: $TICKETC_MNIST_DIR, else ~/.cache/ticketc/mnist",
        metavar="DIR",
    )
    data: str | None = _setting(
        None,
        "(runs code) your dataset instead of --dataset: "
        "module.path:factory, imported and called, "
        "returning (train, test), each an (x, y) pair of tensors or a "
        "Dataset of (x, y) items",
        metavar="MODULE:FACTORY",
    )
    rounds: int | None = _setting(
        None,
        "pruning rounds (levels after the dense one)",
        shown=f"{DEFAULT_ROUNDS}, unless --target-density",
    )
    target_density: float | None = _setting(
        None, "prune until at most this fraction (0-1) of the prunable weights remains"
    )
    one_shot: bool = _setting(False, "prune once, straight to the final density")
    iterations: int | None = _setting(
        None, "training iterations (optimizer steps) per level", shown=_paper("iterations")
    )
    batch_size: int | None = _setting(
        None,
        "training batch size (samples; under torchrun the global batch, split over the ranks)",
        shown=_paper("batch_size"),
    )
    lr: float | None = _setting(None, "learning rate", shown=_paper("lr"), metavar="LR")
    lr_milestones: tuple[int, ...] | None = _setting(
        None,
        "comma-separated iterations at which the learning rate is multiplied by --lr-gamma",
        shown=_paper("lr_milestones"),
        metavar="IT,IT",
    )
    lr_gamma: float = _setting(0.1, "factor applied to the learning rate at each milestone")
    optimizer: str | None = _setting(
        None, "optimizer (sgd: momentum 0.9)", choices=OPTIMIZERS, shown=_paper("optimizer")
    )
    weight_decay: float | None = _setting(None, "L2 weight decay", shown=_paper("weight_decay"))
    augment: bool | None = _setting(
        None,
        "random crops (4-pixel padding) and horizontal flips of the training images: yes or no",
        shown=_paper("augment"),
        parse=_yes_no,
        metavar="yes|no",
    )
    strategy: str | None = _setting(
        None,
        "layerwise: per-layer-type rates below; global: one "
        "magnitude threshold over all prunable weights",
        choices=STRATEGIES,
        shown=_paper("strategy"),
    )
    fc_rate: float | None = _setting(
        None,
        "fraction (0-1) of each fully connected layer's surviving weights pruned per round",
        shown=_paper("fc_rate"),
    )
    conv_rate: float | None = _setting(
        None,
        "fraction (0-1) of each conv layer's surviving weights pruned per round",
        shown=_paper("conv_rate"),
    )
    output_rate: float | None = _setting(
        None,
        "fraction (0-1) of the output layer's surviving weights pruned per round",
        shown=_paper("output_rate"),
    )
    global_rate: float = _setting(
        0.2, "with --strategy global: fraction (0-1) of all surviving weights pruned per round"
    )
    prune_output: bool | None = _setting(
        None,
        "prune the output layer: yes or no",
        shown=_paper("prune_output"),
        parse=_yes_no,
        metavar="yes|no",
    )
    prune_biases: bool = _setting(False, "prune biases too (at their layer's rate)")
    prune_norms: bool = _setting(False, "prune normalisation layers' affine weights too")
    rewind: str | None = _setting(
        None,
        "where survivors restart each level: init (Frankle & "
        "Carbin 2019), iteration:K or epoch:E (late rewinding, Frankle "
        "et al. 2020); normalisation statistics are rewound with the "
        "weights",
        shown=_paper("rewind"),
        metavar="init|iteration:K|epoch:E",
    )
    controls: tuple[str, ...] = _setting(
        (),
        "comma-separated controls trained beside every "
        "pruned level (needed to tell a winning ticket from "
        f"any sparse network): {', '.join(CONTROLS)}",
        shown="none",
        metavar="reinit,random-mask",
    )
    control_levels: tuple[int, ...] | None = _setting(
        None,
        "comma-separated levels that train the controls",
        shown="every pruned level",
        metavar="LEVELS",
    )
    seed: int = _setting(0, "seed of the initial weights and the batch order")
    val_size: float | None = _setting(
        None,
        "training samples held out for validation (the "
        "ticket is chosen on them): a count, a fraction below 1, "
        "or 0 for none",
        shown=f"{100 * VAL_FRACTION:g}% of the training samples, at most {VAL_SIZE_MAX}",
        parse=count_or_fraction,
        metavar="N|FRACTION",
    )
    eval_every: int | None = _setting(
        None,
        "iterations between evaluations",
        shown=f"{EVAL_EVERY_MAX}, or a tenth of --iterations if smaller",
    )
    checkpoint_every: int = _setting(
        5000, "iterations between checkpoints inside a level (what --resume continues from)"
    )
    accuracy_target: float | None = _setting(
        None,
        "the ticket is the sparsest level whose "
        "final validation accuracy (test accuracy without a "
        "validation split) is at least this fraction (0-1)",
        shown="the dense level's minus --max-accuracy-drop",
    )
    max_accuracy_drop: float = _setting(
        0.005,
        "accuracy the ticket may lose against the dense "
        "level, as a fraction (0.005 = 0.5 percentage points)",
    )
    workers: int = _setting(
        2,
        "processes reading the images of --dataset imagefolder while "
        "the network trains (0: read in the training process)",
    )
    csr_below: float = _setting(
        0.45,
        "train an MLP's Linear layers in CSR form once their "
        "density is below this fraction (0: never)",
    )
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
        if self.dataset is not None and self.dataset not in DATASETS:
            raise ValueError(f"dataset {self.dataset!r} is not one of {', '.join(DATASETS)}")
        if self.rounds is not None and self.target_density is not None:
            raise ValueError("give rounds or target_density, not both")
        if self.rounds is not None and not 0 <= self.rounds <= 200:
            raise ValueError(f"rounds must be in [0, 200], got {self.rounds}")
        if self.target_density is not None and not 0.0 < self.target_density <= 1.0:
            raise ValueError(f"target_density must be in (0, 1], got {self.target_density}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        for name in ("iterations", "batch_size", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.strategy is not None and self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {', '.join(STRATEGIES)}")
        for name in ("fc_rate", "conv_rate", "output_rate", "global_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.rewind is not None and not _REWIND.match(self.rewind):
            raise ValueError(f"rewind {self.rewind!r} is not init, iteration:K or epoch:E")
        for c in self.controls:
            if c not in CONTROLS:
                raise ValueError(f"control {c!r} is not one of {', '.join(CONTROLS)}")
        if len(set(self.controls)) != len(self.controls):
            raise ValueError(f"controls {self.controls} repeat a name")
        if self.control_levels is not None and any(lv < 1 for lv in self.control_levels):
            raise ValueError(f"control_levels {self.control_levels} must all be >= 1")
        if self.val_size is not None and not (
            0 <= self.val_size < 1 or float(self.val_size).is_integer()
        ):
            raise ValueError(
                f"val_size must be a count, a fraction in [0, 1) or 0, got {self.val_size}"
            )
        if self.accuracy_target is not None and not 0.0 <= self.accuracy_target <= 1.0:
            raise ValueError(f"accuracy_target must be in [0, 1], got {self.accuracy_target}")
        if self.weight_decay is not None and not 0.0 <= self.weight_decay < 1.0:
            raise ValueError(f"weight_decay must be in [0, 1), got {self.weight_decay}")
        if not 0.0 < self.lr_gamma <= 1.0:
            raise ValueError(f"lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if self.lr_milestones is not None and (
            any(m < 1 for m in self.lr_milestones)
            or list(self.lr_milestones) != sorted(set(self.lr_milestones))
        ):
            raise ValueError(
                f"lr_milestones {self.lr_milestones} must be increasing iterations >= 1"
            )
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

    @property
    def data_flag(self) -> str:
        """How the user named the data, for messages: `--dataset mnist` or `--data mod:f`."""
        return f"--data {self.data}" if self.data is not None else f"--dataset {self.dataset}"

    def resolved(self) -> FindConfig:
        """This config with every None default that does not depend on the data filled in:
        the paper's values for the architecture, and the evaluation interval."""
        p = self.paper
        iterations = self.iterations if self.iterations is not None else p.iterations
        filled = {
            name: getattr(p, name)
            for name in (
                "batch_size",
                "optimizer",
                "strategy",
                "rewind",
                "weight_decay",
                "lr_milestones",
                "augment",
                "prune_output",
            )
            if getattr(self, name) is None
        }
        return dataclasses.replace(
            self,
            **filled,
            iterations=iterations,
            lr=self.lr if self.lr is not None else p.lr,
            fc_rate=self.fc_rate if self.fc_rate is not None else p.fc_rate,
            conv_rate=self.conv_rate if self.conv_rate is not None else p.conv_rate,
            output_rate=self.output_rate if self.output_rate is not None else p.output_rate,
            rounds=self.rounds
            if self.rounds is not None or self.target_density is not None
            else DEFAULT_ROUNDS,
            eval_every=self.eval_every
            if self.eval_every is not None
            else min(EVAL_EVERY_MAX, max(1, iterations // EVALS_PER_LEVEL)),
        )

    def lr_at(self, iteration: int) -> float:
        """The learning rate of step `iteration` (0-based): lr times lr_gamma per milestone
        passed. Call on a resolved config."""
        assert self.lr is not None
        passed = sum(iteration >= m for m in self.lr_milestones or ())
        return self.lr * self.lr_gamma**passed

    def rewind_iteration(self, steps_per_epoch: int) -> int:
        assert self.rewind is not None
        unit, _, value = self.rewind.partition(":")
        if unit == "init":
            return 0
        return int(value) * (steps_per_epoch if unit == "epoch" else 1)

    def result_differences(self, other: FindConfig, *, ignore: tuple[str, ...] = ()) -> list[str]:
        """Names of the settings that change results (not in NOT_RESULT_SETTINGS or `ignore`)
        on which the two configs differ."""
        skip = NOT_RESULT_SETTINGS | set(ignore)
        return [
            f.name
            for f in dataclasses.fields(self)
            if f.name not in skip and getattr(self, f.name) != getattr(other, f.name)
        ]

    def shown(self, name: str) -> str:
        """A setting's value as a user would type it: "none", "reinit,random-mask", "0.001"."""
        value = getattr(self, name)
        if isinstance(value, tuple):
            return ",".join(map(str, value)) or "none"
        return "none" if value is None else str(value)

    def to_json(self) -> dict[str, object]:
        out = dataclasses.asdict(self)
        out["controls"] = list(self.controls)
        if self.lr_milestones is not None:
            out["lr_milestones"] = list(self.lr_milestones)
        if self.control_levels is not None:
            out["control_levels"] = list(self.control_levels)
        return out

    @classmethod
    def from_json(cls, obj: dict[str, object]) -> FindConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in obj.items() if k in known}
        kwargs["controls"] = tuple(kwargs.get("controls", ()))  # type: ignore[arg-type]
        if kwargs.get("lr_milestones") is not None:
            kwargs["lr_milestones"] = tuple(kwargs["lr_milestones"])  # type: ignore[arg-type]
        if kwargs.get("control_levels") is not None:
            kwargs["control_levels"] = tuple(kwargs["control_levels"])  # type: ignore[arg-type]
        return cls(**kwargs)  # type: ignore[arg-type]
