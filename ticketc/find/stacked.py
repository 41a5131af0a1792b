"""The two stacked forms of a network that `Ensemble` trains: the ReLU MLP it runs by hand
(`mlp_layers` finds one; `mlp_grads` / `mlp_grads_t` are its forward and backward, with dense
`baddbmm` or with CSR layers on feature-major activations), and every member as one module for
DistributedDataParallel (`StackedMembers`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ticketc.find.sparse_layer import StackedCsrLinear


def mlp_layers(model: nn.Module) -> list[str] | None:
    """Prefixes of the Linear layers when `model` is a plain ReLU MLP, else None."""
    if not isinstance(model, nn.Sequential):
        return None
    children = list(model.named_children())
    if children and isinstance(children[0][1], nn.Flatten):
        children = children[1:]
    if not children or len(children) % 2 == 0:
        return None
    prefixes = []
    for i, (name, module) in enumerate(children):
        expected = nn.Linear if i % 2 == 0 else nn.ReLU
        if type(module) is not expected:
            return None
        if i % 2 == 0:
            if module.bias is None:
                return None
            prefixes.append(name)
    return prefixes


def relu_backward(g: torch.Tensor, relu_out: torch.Tensor) -> torch.Tensor:
    """g where the ReLU was active, else 0: one fused kernel (`g * (a > 0)` would also build
    and convert a bool tensor)."""
    return torch.ops.aten.threshold_backward(g, relu_out, 0)


def cross_entropy_grad(
    logits: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss [M], correct predictions [M] and d loss / d logits [M, B, C]."""
    logp = logits.log_softmax(-1)
    loss = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1).mean(1)
    correct = (logits.argmax(-1) == y).sum(1)
    # d(mean CE)/d logits = (softmax - onehot) / B
    g = logp.exp_()
    g.scatter_add_(-1, y.unsqueeze(-1), torch.full_like(g[..., :1], -1.0))
    return loss, correct, g.div_(y.shape[1])


@torch.no_grad()
def mlp_grads(
    params: dict[str, nn.Parameter], mlp: list[str], x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Mean loss [M], correct predictions [M] and the gradient of every weight and bias of the
    stacked ReLU MLP with Linear prefixes `mlp`, every layer dense; x: [M, B, ...], y [M, B]."""
    a = x.reshape(x.shape[0], y.shape[1], -1)
    acts = [a]  # inputs of each Linear: [M, B, in]
    for i, prefix in enumerate(mlp):
        w, bias = params[f"{prefix}.weight"], params[f"{prefix}.bias"]
        a = torch.baddbmm(bias.unsqueeze(1), a, w.transpose(1, 2))
        if i + 1 < len(mlp):
            a = a.relu_()
            acts.append(a)
    loss, correct, g = cross_entropy_grad(a, y)  # g: [M, B, out]
    grads: dict[str, torch.Tensor] = {}
    for i in range(len(mlp) - 1, -1, -1):
        prefix, a_in = mlp[i], acts[i]
        grads[f"{prefix}.weight"] = torch.bmm(g.transpose(1, 2), a_in)  # [M, out, in]
        grads[f"{prefix}.bias"] = g.sum(1)
        if i > 0:
            g = relu_backward(torch.bmm(g, params[f"{prefix}.weight"]), a_in)
    return loss, correct, grads


def linear_t(
    params: dict[str, nn.Parameter],
    sparse: dict[str, StackedCsrLinear],
    prefix: str,
    a: torch.Tensor,
) -> torch.Tensor:
    """One Linear on feature-major activations: a [M or 1, in, B'] -> [M, out, B'] (through
    its CSR form when `sparse` holds its weight)."""
    name = f"{prefix}.weight"
    bias = params[f"{prefix}.bias"]
    if name in sparse:
        return sparse[name].forward(a, bias)
    return torch.matmul(params[name], a).add_(bias.unsqueeze(2))


@torch.no_grad()
def mlp_grads_t(
    params: dict[str, nn.Parameter],
    sparse: dict[str, StackedCsrLinear],
    mlp: list[str],
    xt: torch.Tensor,
    y: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """`mlp_grads` with the layers of `sparse` in CSR form (their weight gradients: survivors
    only); everything feature-major: xt [M, in, B'] (B' >= B, zero padded). The padded columns
    carry bias-only activations but a zero gradient, so they add nothing to any weight or bias
    gradient."""
    b = y.shape[1]
    a = xt
    acts = [a]  # inputs of each Linear: [M, in, B']
    for i, prefix in enumerate(mlp):
        a = linear_t(params, sparse, prefix, a)
        if i + 1 < len(mlp):
            a = a.relu_()
            acts.append(a)
    loss, correct, g = cross_entropy_grad(a[:, :, :b].transpose(1, 2).contiguous(), y)
    g_t = a.new_zeros(a.shape)  # [M, out, B']
    g_t[:, :, :b] = g.transpose(1, 2)
    grads: dict[str, torch.Tensor] = {}
    for i in range(len(mlp) - 1, -1, -1):
        prefix, a_in = mlp[i], acts[i]
        name = f"{prefix}.weight"
        layer = sparse.get(name)
        if layer is not None:
            grads[name] = layer.value_grads(g_t, a_in)  # survivors only
        else:
            grads[name] = torch.bmm(g_t, a_in.transpose(1, 2))  # [M, out, in]
        grads[f"{prefix}.bias"] = g_t.sum(2)
        if i > 0:
            g_t = relu_backward(
                layer.input_grads(g_t)
                if layer is not None
                else torch.bmm(params[name].transpose(1, 2), g_t),
                a_in,
            )
    return loss, correct, grads


class StackedMembers(nn.Module):
    """Every member's parameters [M, *shape] and buffers as one module whose forward runs all
    members (`torch.func.vmap` over `functional_call` of the architecture, training mode), so
    that DistributedDataParallel can reduce their gradients and broadcast their buffers.

    The architecture itself is kept outside the module tree: its own parameters are not
    trained.
    """

    def __init__(
        self, base: nn.Module, params: dict[str, nn.Parameter], buffers: dict[str, torch.Tensor]
    ) -> None:
        super().__init__()
        self._base = [base]
        self.param_names, self.buffer_names = list(params), list(buffers)
        self.stacked = nn.ParameterList(params.values())
        for i, b in enumerate(buffers.values()):
            self.register_buffer(f"buffer_{i}", b)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [M, B, ...], y [M, B] -> each member's mean loss [M] and correct count [M]."""
        from torch.func import functional_call, vmap

        base = self._base[0].train()
        params = dict(zip(self.param_names, self.stacked, strict=True))
        buffers = {n: getattr(self, f"buffer_{i}") for i, n in enumerate(self.buffer_names)}

        def member(p, b, xb, yb):  # type: ignore[no-untyped-def]
            logits = functional_call(base, (p, b), (xb,))
            return F.cross_entropy(logits, yb), (logits.argmax(-1) == yb).sum()

        loss, correct = vmap(member, randomness="different")(params, buffers, x, y)
        return loss, correct
