"""M copies of one architecture trained side by side, as stacked tensors.

Training several seeds and their controls together turns M small matmuls into one batched
matmul and M optimizer steps into one fused step over stacked tensors. Adam is elementwise, so
the stacked optimizer is exactly M independent ones. Two forward/backward paths:

- `Flatten? (Linear ReLU)* Linear` Sequentials (Lenet-300-100): hand-written forward and
  backward with `baddbmm` (`stacked.mlp_grads` / `mlp_grads_t`), no autograd graph, no
  per-member Python; layers whose masks are sparse enough train in CSR form
  (`StackedCsrLinear`), and then the whole MLP runs on feature-major activations
  [M, features, B'];
- anything else: `torch.func.vmap` over `grad` of a `functional_call`, with the network in
  training mode (BatchNorm normalises with each member's batch statistics and updates that
  member's running statistics; Dropout draws a different mask for every member, from a seed
  the caller gives per step so that a resumed run draws the same masks).

Under torchrun (`ranks.distributed`) every step goes through autograd instead: the stacked
parameters are wrapped as one module (`StackedMembers`) in DistributedDataParallel, which
averages each member's gradients over the ranks (each rank holds a shard of every member's
batch) and keeps BatchNorm statistics those of rank 0, as DDP does for any network.

Evaluation runs every member in eval mode (BatchNorm on its running statistics, which it does
not update; Dropout off), as the saved network runs when deployed. Masks are enforced after
every optimizer step, so a pruned weight stays exactly zero whatever the optimizer state holds.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ticketc.find.distributed import SINGLE, Ranks, broadcast_tensors_
from ticketc.find.pruning import Masks
from ticketc.find.sparse_layer import StackedCsrLinear
from ticketc.find.stacked import (
    StackedMembers,
    linear_t,
    mlp_grads,
    mlp_grads_t,
    mlp_layers,
)
from ticketc.kernels import csr_cpu


class Ensemble:
    """Stacked parameters `params[name]` of shape [M, *shape], masks, and one optimizer.

    optimizer: "adam" or "sgd" (momentum 0.9), with `weight_decay` (L2, added to the gradient
    as torch's optimizers do; pruned weights stay zero either way). `ranks`: the torchrun
    ranks that train the members together (DistributedDataParallel), each on its shard of
    every batch.
    """

    def __init__(
        self,
        base: nn.Module,
        states: Sequence[dict[str, torch.Tensor]],
        masks: Sequence[Masks],
        *,
        lr: float,
        optimizer: str = "adam",
        sparse_below: float = 0.0,
        weight_decay: float = 0.0,
        ranks: Ranks = SINGLE,
    ) -> None:
        if not states or len(states) != len(masks):
            raise ValueError(f"need one mask set per state, got {len(states)} and {len(masks)}")
        self.base = copy.deepcopy(base)
        self.size = len(states)
        names = [n for n, _ in self.base.named_parameters()]
        self.params = {
            n: nn.Parameter(torch.stack([s[n].detach().float() for s in states]).contiguous())
            for n in names
        }
        self.buffers = {
            n: torch.stack([s[n] for s in states]) for n, _ in self.base.named_buffers()
        }
        self.masks = {n: torch.stack([m[n] for m in masks]).contiguous() for n in masks[0]}
        # Float copies (multiplying by a bool tensor converts it on every step) of the masks
        # that prune something: a full mask needs no enforcing.
        self._mask_values = {n: m.float() for n, m in self.masks.items() if not bool(m.all())}
        self.mlp = mlp_layers(self.base)
        self.ranks = ranks
        self.ddp: nn.Module | None = None
        if ranks.distributed:
            from torch.nn.parallel import DistributedDataParallel

            sparse_below = 0.0  # every step through autograd, for DDP's gradient hooks
            self.ddp = DistributedDataParallel(StackedMembers(self.base, self.params, self.buffers))
        # CSR-trained layers, by weight name: those whose every member is below sparse_below
        self.sparse: dict[str, StackedCsrLinear] = {}
        self._dense_stale = False  # the dense copies of the sparse layers lag their values
        for prefix in self.mlp or []:
            name = f"{prefix}.weight"
            if name not in self.masks or sparse_below <= 0:
                continue
            if float(self.masks[name].float().mean((1, 2)).max()) < sparse_below:
                with torch.no_grad():
                    self.params[name].mul_(self.masks[name])
                self.sparse[name] = StackedCsrLinear(self.params[name].detach(), self.masks[name])
                self._mask_values.pop(name, None)  # written only at survivors: no mask to apply
        # The optimizer's parameters, in the order of self.params (sparse layers: their values).
        self._opt_params = [
            self.sparse[n].values if n in self.sparse else p for n, p in self.params.items()
        ]
        params = self._opt_params
        if optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=lr, weight_decay=weight_decay, fused=True
            )
        else:
            self.optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
        self.enforce_masks_()

    # -- training ---------------------------------------------------------------------------

    def _sync_dense(self) -> None:
        # The dense copy of a CSR-trained layer is only read by state export (evaluation runs
        # the CSR layer itself).
        if self._dense_stale:
            for name, layer in self.sparse.items():
                layer.write_dense_(self.params[name])
            self._dense_stale = False

    @torch.no_grad()
    def enforce_masks_(self) -> None:
        for name, mask in self._mask_values.items():
            self.params[name].mul_(mask)

    @property
    def draws_random_numbers(self) -> bool:
        """Whether a training step may draw random numbers (Dropout and the like), so that
        `step` needs a seed to be reproducible. The hand-written MLP path draws none."""
        return self.mlp is None or self.ddp is not None

    def set_lr_(self, lr: float) -> None:
        """The learning rate of the next steps (a schedule sets it before every step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def sync_buffers_(self) -> None:
        """Every rank takes rank 0's buffers (BatchNorm statistics), as DDP does before each
        forward: call before evaluating or saving."""
        broadcast_tensors_(list(self.buffers.values()), self.ranks)

    def step(
        self, x: torch.Tensor, y: torch.Tensor, seed: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step of every member on its own batch: x [M, B, ...], y [M, B].

        seed: seeds the random numbers the step draws (e.g. Dropout masks, different for each
        member); None draws from torch's global generator. The global generator is left as it
        was either way.
        Returns each member's mean loss [M] and number of correct predictions [M].
        """
        return self._step(x, y, seed=seed)

    def step_on(
        self,
        x_all: torch.Tensor,
        y_all: torch.Tensor,
        idx: torch.Tensor,
        seed: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` on the batches x_all[idx], y_all[idx] (idx [M, B]), picked without copying
        them twice: CSR layers read their input feature-major, gathered straight into that
        layout."""
        if not self.sparse:
            return self.step(x_all[idx], y_all[idx], seed=seed)
        xt = csr_cpu.gather_t(x_all.reshape(len(x_all), -1), idx)  # [M, in, B']
        return self._step(xt, y_all[idx], feature_major=True)

    def _step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        feature_major: bool = False,
        seed: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.ddp is not None:
            with torch.random.fork_rng(devices=[], enabled=seed is not None):
                if seed is not None:
                    torch.manual_seed(seed)
                loss, correct = self.ddp(x, y)
                self.optimizer.zero_grad(set_to_none=True)
                loss.sum().backward()  # members are independent: the sum's gradients are theirs
            loss = loss.detach()
        elif self.mlp is not None:
            if self.sparse:
                if not feature_major:
                    x = csr_cpu.transpose_padded(x.reshape(x.shape[0], x.shape[1], -1))
                loss, correct, grads = mlp_grads_t(self.params, self.sparse, self.mlp, x, y)
            else:
                loss, correct, grads = mlp_grads(self.params, self.mlp, x, y)
            for name, g in grads.items():
                if name in self.sparse:
                    self.sparse[name].values.grad = g
                else:
                    self.params[name].grad = g
        elif seed is None:
            loss, correct = self._func_grads(x, y)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                loss, correct = self._func_grads(x, y)
        self.optimizer.step()
        self.enforce_masks_()
        self._dense_stale = bool(self.sparse)
        return loss, correct

    def _func_grads(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torch.func import functional_call, grad_and_value, vmap

        base = self.base
        # Training mode: batch statistics, running statistics updated in self.buffers (the
        # functional call writes into the tensors it is given), Dropout on.
        base.train()

        def member_loss(params, buffers, xb, yb):  # type: ignore[no-untyped-def]
            logits = functional_call(base, (params, buffers), (xb,))
            return F.cross_entropy(logits, yb), (logits.argmax(-1) == yb).sum()

        detached = {n: p.detach() for n, p in self.params.items()}
        grads, (loss, correct) = vmap(
            grad_and_value(member_loss, has_aux=True), randomness="different"
        )(detached, self.buffers, x, y)
        for name, g in grads.items():
            self.params[name].grad = g
        return loss, correct

    # -- evaluation -------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(
        self, x: torch.Tensor, y: torch.Tensor, chunk: int = 2500
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss [M] and accuracy [M] of every member on the same data (x [N, ...]), in
        eval mode: what each member's saved state gives when deployed, whatever `chunk`."""
        if len(x) == 0:
            nan = torch.full((self.size,), float("nan"))
            return nan, nan
        loss_sum = torch.zeros(self.size, dtype=torch.float64)
        correct = torch.zeros(self.size, dtype=torch.int64)
        for start in range(0, len(x), chunk):
            xb, yb = x[start : start + chunk], y[start : start + chunk]
            logits = self._logits_shared(xb)  # [M, n, C]
            loss_sum += (
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), yb.repeat(self.size), reduction="none"
                )
                .view(self.size, -1)
                .sum(1)
                .double()
            )
            correct += (logits.argmax(-1) == yb).sum(1)
        return (loss_sum / len(x)).float(), correct.double() / len(x)

    def _logits_shared(self, x: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None and self.sparse:  # one feature-major input for every member
            a = csr_cpu.transpose_padded(x.reshape(len(x), -1)).unsqueeze(0)
            for i, prefix in enumerate(self.mlp):
                a = linear_t(self.params, self.sparse, prefix, a)
                if i + 1 < len(self.mlp):
                    a = a.relu_()
            return a[:, :, : len(x)].transpose(1, 2)
        if self.mlp is not None:
            a = x.reshape(len(x), -1)
            for i, prefix in enumerate(self.mlp):
                w, bias = self.params[f"{prefix}.weight"], self.params[f"{prefix}.bias"]
                a = torch.matmul(a, w.transpose(1, 2)).add_(bias.unsqueeze(1))
                if i + 1 < len(self.mlp):
                    a = a.relu_()
            return a
        from torch.func import functional_call, vmap

        # Eval mode: BatchNorm reads (and never updates) the running statistics, Dropout is off,
        # so no random numbers are drawn and the default randomness="error" holds.
        self.base.eval()

        def member_logits(params, buffers, xb):  # type: ignore[no-untyped-def]
            return functional_call(self.base, (params, buffers), (xb,))

        detached = {n: p.detach() for n, p in self.params.items()}
        return vmap(member_logits, in_dims=(0, 0, None))(detached, self.buffers, x)

    # -- state ------------------------------------------------------------------------------

    def _sparse_of(self, p: torch.Tensor) -> StackedCsrLinear | None:
        """The CSR layer whose values `p` is, if any."""
        return next((layer for layer in self.sparse.values() if layer.values is p), None)

    def member_state(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's state dict (weights already masked)."""
        self._sync_dense()
        out = {n: p.detach()[i].clone() for n, p in self.params.items()}
        out.update({n: b[i].clone() for n, b in self.buffers.items()})
        return out

    def state(self, members: Sequence[int]) -> dict[str, object]:
        """Weights and optimizer state of some members (everything elementwise is sliceable)."""
        self._sync_dense()
        idx = torch.tensor(list(members))
        opt = []
        for p in self._opt_params:
            st = dict(self.optimizer.state.get(p, {}))
            layer = self._sparse_of(p)
            if layer is not None:
                st = {k: layer.to_dense(v) if v.dim() else v for k, v in st.items()}
            opt.append(
                {k: (v.index_select(0, idx) if v.dim() else v.clone()) for k, v in st.items()}
            )
        return {
            "params": {n: p.detach().index_select(0, idx) for n, p in self.params.items()},
            "buffers": {n: b.index_select(0, idx) for n, b in self.buffers.items()},
            "optimizer": opt,
        }

    @torch.no_grad()
    def load_states(self, parts: Sequence[dict[str, object]]) -> None:
        """Inverse of `state` for parts that together cover all members, in order."""
        for name, p in self.params.items():
            p.copy_(torch.cat([part["params"][name] for part in parts]))  # type: ignore[index]
        for name, b in self.buffers.items():
            b.copy_(torch.cat([part["buffers"][name] for part in parts]))  # type: ignore[index]
        for name, layer in self.sparse.items():
            layer.values.copy_(layer.to_compact(self.params[name]))
        for i, p in enumerate(self._opt_params):
            states = [part["optimizer"][i] for part in parts]  # type: ignore[index]
            if not states[0]:
                continue
            merged = {
                k: torch.cat([s[k] for s in states]) if states[0][k].dim() else states[0][k].clone()
                for k in states[0]
            }
            compact = self._sparse_of(p)
            if compact is not None:
                merged = {k: compact.to_compact(v) if v.dim() else v for k, v in merged.items()}
            self.optimizer.state[p] = merged
