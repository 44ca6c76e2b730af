"""Multi-tensor LAMB with timm's semantics, weight-decay parameter groups, and the EMA of the weights.

LAMB: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
arXiv 1904.00962, in the NVLAMB form of NVIDIA's apex FusedLAMB as implemented by
`timm.optim.Lamb` (the optimizer ResNet Strikes Back trained with). Per step, for every parameter p
with gradient g:

    g     <- g / max(1, ||all grads||_2 / max_grad_norm)      (global clip; skipped if None)
    m     <- beta1 m + (1 - beta1) g                          (grad_averaging; else beta1 m + g)
    v     <- beta2 v + (1 - beta2) g^2
    u     <- (m / bc1) / (sqrt(v / bc2) + eps)                (bc = bias corrections, 1 if off)
    u     <- u + weight_decay p                               (if weight_decay != 0)
    r     <- ||p|| / ||u||, or 1 if either norm is 0          (if weight_decay != 0 or always_adapt)
    r     <- min(r, 1)                                        (if trust_clip: LAMBC)
    p     <- p - lr r u

Why this module exists: timm's per-parameter Lamb (timm <= 1.0.29) loops over the parameters in Python,
which roughly halves ResNet-50 step throughput against SGD on an H100 in public reports; fastrsb has not
measured that on a GPU yet (`fastrsb bench step --timm-per-param` does, against this module).
Here every step is a fixed handful of `torch._foreach_*` calls per (device, dtype) bucket; the
per-parameter trust ratios come from `torch._foreach_norm`, stacked into one vector, so the step has
no per-parameter Python arithmetic and no host-device synchronisation. The bias corrections are folded
into scalars (m_hat / (sqrt(v_hat) + eps) == sqrt(bc2)/bc1 * m / (sqrt(v) + eps sqrt(bc2))), which
saves two full passes over the parameters.

The last op, p <- p + s_i u_i with one device scalar s_i per parameter, has no eager multi-tensor
kernel: `_foreach_addcmul_` with a list of 0-dim tensors takes ATen's per-tensor path (one launch per
parameter, 161 for ResNet-50), because its fast path needs equal shapes across the lists. With
`compile_update=True` (the trainer's setting whenever the model is compiled) that one op goes through
`torch.compile`, whose Inductor lowering fuses foreach ops horizontally instead of launching per
parameter. Only that op is compiled: compiled whole, the update would recompile for every new lr and
bias correction (they are Python floats), where this op compiles once per trust-ratio group. The
launch count and the gain on a GPU are unmeasured.

Gradient clipping decision: `max_grad_norm` defaults to 1.0, as in timm. The RSB paper's Table 1
lists "grad clip: none", but that refers to timm's `--clip-grad` flag; the published A1/A2/A3 results
were produced with timm's Lamb, which clips the global gradient norm at 1.0 inside the optimizer by
default. Reproducing the published numbers means reproducing that behaviour, so fastrsb keeps it;
pass `max_grad_norm=None` (CLI: `--lamb-max-grad-norm 0`) for LAMB exactly as in the paper's
algorithm. Both settings are tested against timm (tests/test_optim.py). The clip factor is computed
on the device and applied as a tensor, so clipping costs no host sync either.
"""
from __future__ import annotations

import functools
import math
from collections import defaultdict

import torch
from torch import Tensor


class ModelEma:
    """Exponential moving average of a model's parameters (buffers copied), updated after each optimizer step."""

    def __init__(self, model: torch.nn.Module, decay: float):
        import copy

        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._lists: tuple[int, list, list, list] | None = None  # (id(model), params, theirs, buffer groups)

    def _pairs(self, model: torch.nn.Module) -> tuple[list, list, list]:
        """The tensor lists of an update, made once per model (loading a state dict copies in place)."""
        if self._lists is None or self._lists[0] != id(model):
            # one foreach call per (device, dtype): BatchNorm's float running stats and int64 batch counts
            # mixed in one list would send every buffer down the per-tensor path
            groups: dict = {}
            for mine, theirs in zip(self.module.buffers(), model.buffers()):
                dst, src = groups.setdefault((mine.device, mine.dtype), ([], []))
                dst.append(mine)
                src.append(theirs)
            self._lists = (id(model), list(self.module.parameters()), list(model.parameters()), list(groups.values()))
        return self._lists[1:]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        mine, theirs, buffer_groups = self._pairs(model)
        torch._foreach_lerp_(mine, theirs, 1.0 - self.decay)
        for dst, src in buffer_groups:
            torch._foreach_copy_(dst, src)


def make_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (ndim >= 2) decay; biases and normalisation parameters (ndim <= 1) do not.

    Chosen by `p.ndim`, not by parameter names, so it holds for any timm model.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


class Lamb(torch.optim.Optimizer):
    """LAMB (NVLAMB) over `torch._foreach_*` ops; numerically equal to `timm.optim.Lamb`.

    Args:
        params: parameters or parameter groups (see `make_param_groups`).
        lr: learning rate (the trainer sets it every step from `fastrsb.schedule.lr_at`).
        betas: (beta1, beta2) of the moment averages.
        eps: added to sqrt(v_hat).
        weight_decay: L2 term added to the update before the trust ratio (not decoupled).
        max_grad_norm: clip the global gradient norm to this before the moments; None or 0 disables.
            Default 1.0 as in timm (see the module docstring). p.grad itself is left unmodified.
        trust_clip: clamp the trust ratio at 1 (LAMBC).
        always_adapt: apply the trust ratio also to groups without weight decay.
        bias_correction: Adam bias corrections of m and v.
        grad_averaging: m uses (1 - beta1) g; otherwise g.
        compile_update: apply the trust ratios through a compiled foreach kernel (see the module
            docstring); one compilation per trust-ratio group, results equal to the eager op.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        max_grad_norm: float | None = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        bias_correction: bool = True,
        grad_averaging: bool = True,
        compile_update: bool = False,
    ):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not eps >= 0.0:
            raise ValueError(f"invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            trust_clip=trust_clip,
            always_adapt=always_adapt,
            bias_correction=bias_correction,
            grad_averaging=grad_averaging,
            step=0,  # per group, a host int: bias corrections become Python scalars, no sync
        )
        super().__init__(params, defaults)
        # Global, like timm (its clip reads self.defaults): one norm over every group's gradients.
        self.max_grad_norm = max_grad_norm if max_grad_norm else None
        self.compile_update = bool(compile_update)

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["max_grad_norm"] = self.max_grad_norm
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.max_grad_norm = state_dict.pop("max_grad_norm", self.max_grad_norm)
        super().load_state_dict(state_dict)

    @torch.no_grad()
    def _clip_divisor(self) -> Tensor | None:
        """max(1, global grad norm / max_grad_norm) as a device tensor, or None when clipping is off."""
        if self.max_grad_norm is None:
            return None
        by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_device[p.grad.device].append(p.grad)
        if not by_device:
            return None
        devices = list(by_device)
        norms = [torch.linalg.vector_norm(torch.stack(torch._foreach_norm(g)).float()) for g in by_device.values()]
        # Several devices: gather the per-device norms on the first one (a device copy, not a host sync).
        total = torch.linalg.vector_norm(torch.stack([n.to(devices[0]) for n in norms]))
        return (total / self.max_grad_norm).clamp_(min=1.0)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        clip_divisor = self._clip_divisor()

        for group in self.param_groups:
            group["step"] += 1
            step = group["step"]
            beta1, beta2 = group["betas"]
            if group["bias_correction"]:
                bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
            else:
                bc1, bc2 = 1.0, 1.0

            buckets: dict[tuple, list[list[Tensor]]] = defaultdict(lambda: [[], [], [], []])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bucket = buckets[(p.device, p.dtype)]
                bucket[0].append(p)
                bucket[1].append(p.grad)
                bucket[2].append(state["exp_avg"])
                bucket[3].append(state["exp_avg_sq"])

            for (device, _dtype), (params, grads, exp_avgs, exp_avg_sqs) in buckets.items():
                divisor = None if clip_divisor is None else clip_divisor.to(device)
                _lamb_update(
                    params, grads, exp_avgs, exp_avg_sqs, divisor,
                    lr=group["lr"], beta1=beta1, beta2=beta2, bc1=bc1, bc2=bc2, eps=group["eps"],
                    weight_decay=group["weight_decay"], grad_averaging=group["grad_averaging"],
                    trust_clip=group["trust_clip"], always_adapt=group["always_adapt"],
                    apply=_compiled_apply() if self.compile_update else _apply_step_sizes,
                )
        return loss


def _lamb_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    clip_divisor: Tensor | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    bc1: float,
    bc2: float,
    eps: float,
    weight_decay: float,
    grad_averaging: bool,
    trust_clip: bool,
    always_adapt: bool,
    apply,
) -> None:
    """One LAMB step for tensors that share a device and dtype. All arithmetic stays on the device.
    apply(params, updates, step_sizes): the trust-ratio step, `_apply_step_sizes` or its compiled form."""
    if clip_divisor is not None:
        grads = torch._foreach_div(grads, clip_divisor)  # new tensors: p.grad stays as the user left it

    if grad_averaging:
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    else:
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

    # u = scale * m / (sqrt(v) + eps sqrt(bc2)), scale = sqrt(bc2) / bc1: the bias corrections as
    # scalars. `updates` holds u / scale until the final step size puts scale back.
    sqrt_bc2 = math.sqrt(bc2)
    scale = sqrt_bc2 / bc1
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps * sqrt_bc2)
    updates = torch._foreach_div(exp_avgs, denom)
    del denom
    if weight_decay != 0.0:
        torch._foreach_add_(updates, params, alpha=weight_decay / scale)

    if weight_decay != 0.0 or always_adapt:
        w_norms = torch.stack(torch._foreach_norm(params))
        u_norms = torch.stack(torch._foreach_norm(updates)) * scale
        ratios = torch.where((w_norms > 0) & (u_norms > 0), w_norms / u_norms, torch.ones_like(w_norms))
        if trust_clip:
            ratios = ratios.clamp(max=1.0)
        step_sizes = (ratios * (-lr * scale)).to(params[0].dtype)
        apply(params, updates, step_sizes)
    else:
        torch._foreach_add_(params, updates, alpha=-lr * scale)


def _apply_step_sizes(params: list[Tensor], updates: list[Tensor], step_sizes: Tensor) -> None:
    """params[i] += step_sizes[i] * updates[i]."""
    # One 0-dim device tensor per parameter: no .item(), the trust ratios never leave the device.
    torch._foreach_addcmul_(params, updates, list(step_sizes.unbind(0)))


@functools.cache
def _compiled_apply():
    """`_apply_step_sizes` compiled once per process (static shapes: one graph per trust-ratio group)."""
    return torch.compile(_apply_step_sizes, fullgraph=True, dynamic=False)
