"""The training step: forward, loss, backward over the accumulation micro-batches, clipping, GradScaler,
optimizer step, EMA. `fastrsb train`, `fastrsb bench step` and `fastrsb bench e2e` all call this one
class, so a benchmark times what a run does.

    step = TrainStep(model, optimizer, loss_fn, device=device, precision="bf16", accum_steps=1,
                     compile_mode="default")
    loss = step(micro_batches)   # an iterable of accum_steps (images, targets) pairs; returns a device tensor

Host-device synchronisations: none, except fp16's GradScaler check (`scaler.step`). The returned loss is
the mean over the micro-batches, detached, still on the device.

`compile_mode`: "none" (eager), or a `torch.compile` mode ("default", "reduce-overhead",
"max-autotune", "max-autotune-no-cudagraphs") for the model's forward and backward. Shapes are static
(`dynamic=False`): a new resolution (progressive resizing) costs one compilation, never a dynamic-shape
graph. Which mode is fastest on an H100 is not measured yet (no GPU so far): `default` is the default.
"""
from __future__ import annotations

import contextlib

import torch

from .errors import FastRSBError
from .runtime import autocast

COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # inductor replays the model in CUDA graphs


def default_compile_mode(device) -> str:
    """The trainer's default: compiled on CUDA, eager on the CPU (where compiling costs more than it saves)."""
    return "default" if torch.device(device).type == "cuda" else "none"


def check_compile_mode(mode: str) -> str:
    if mode not in COMPILE_MODES:
        raise FastRSBError(f"--compile-mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


def compile_model(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if check_compile_mode(mode) == "none":
        return model
    import torch._dynamo

    # one graph per resolution of a progressive-resizing ramp, never a dynamic one
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 32)
    return torch.compile(model, mode=mode, dynamic=False)


def compile_augment(augment, device: torch.device, compile_mode: str):
    """The trainer's policy for the GPU augmentation (also `bench e2e`'s): compiled on CUDA whenever the
    model is (a fixed kernel sequence per shape, so one graph for the whole augmentation), eager elsewhere
    (on the CPU, compiling it costs more than it saves on a short run)."""
    if torch.device(device).type == "cuda" and compile_mode != "none" and hasattr(augment, "compile"):
        augment.compile()
    return augment


class TrainStep:
    """One optimizer step of `model` over `accum_steps` micro-batches (see the module docstring).

    model: the module whose parameters `optimizer` updates. ddp: wrap the (compiled) model in
    DistributedDataParallel (gradients are all-reduced on the last micro-batch only). grad_clip > 0:
    timm's `--clip-grad` (clip_grad_norm_) before the optimizer step, on top of LAMB's own clip.
    ema: a `fastrsb.optim.ModelEma` updated after each step.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn, *, device: torch.device,
                 precision: str = "fp32", accum_steps: int = 1, grad_clip: float = 0.0, compile_mode: str = "none",
                 ddp: bool = False, ema=None):
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.device = torch.device(device)
        self.precision = precision
        self.accum_steps = int(accum_steps)
        self.grad_clip = float(grad_clip)
        self.ema = ema
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        if compile_mode in CUDA_GRAPH_MODES and self.accum_steps > 1 and self.device.type == "cuda":
            # a CUDA graph's backward writes the gradients into its own static buffers, and the next
            # micro-batch's replay overwrites them before they are accumulated (pytorch#169545)
            raise FastRSBError(f"--compile-mode {compile_mode} replays CUDA graphs, which cannot accumulate gradients "
                               f"over {self.accum_steps} micro-batches; use --compile-mode default or "
                               "max-autotune-no-cudagraphs, or a larger --batch-per-gpu (one micro-batch per step)")
        forward = compile_model(model, compile_mode)
        self.ddp = None
        if ddp:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                forward, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
            forward = self.ddp
        self.forward = forward

    def __call__(self, micro_batches) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        n = 0
        for n, (x, target) in enumerate(micro_batches, 1):
            last = n == self.accum_steps
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with autocast(self.device, self.precision):
                    logits = self.forward(x)
                loss = self.loss_fn(logits, target) / self.accum_steps
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if n != self.accum_steps:
            raise ValueError(f"a step takes {self.accum_steps} micro-batches, got {n}")
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip, foreach=True)
        self.scaler.step(self.optimizer)  # sync: fp16 only (GradScaler checks for inf); a plain step otherwise
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return total
