"""Memory traffic of a device function: bytes read and written, and kernels launched, eager and compiled.

A GPU kernel that does little arithmetic per byte (every augmentation op) runs at memory speed, so its
time has a floor of bytes / bandwidth, plus a launch cost per kernel. Both can be counted on any device:

  * eager (`trace`): a TorchDispatchMode sees every aten op of one call. An op's traffic is the bytes of
    its tensor inputs and outputs, each counted once per distinct element (a broadcast, stride-0 input
    is its un-broadcast extent). Views (reshape, permute, expand, slicing) move nothing and are not
    counted. A gather (index_select, take, gather, index) reads as many source elements as it writes,
    not its whole source; a scatter into an existing tensor (index_copy_, index_put_, scatter_add_)
    reads and writes the rows it touches. Every other op is one kernel.
  * compiled (`compiled_traffic`): Inductor's own count (`GraphLowering.count_bytes`: the buffers each
    fused kernel reads and writes, which its metrics log collects) and its kernel count, for a fresh
    compile (its graph cache is bypassed, so a cache hit cannot hide the kernels); fastrsb's own kernels
    (custom ops, which Inductor calls as they are) are counted as the eager trace counts them.

`floor_ms` turns them into the time a GPU cannot beat: bytes at HBM bandwidth plus a launch per kernel
(H100 SXM: 3.35 TB/s; about 5 us per eager launch).
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

H100_BYTES_PER_S = 3.35e12  # H100 SXM HBM3
LAUNCH_S = 5e-6  # one kernel launch, eager

_GATHERS = {"aten.index_select", "aten.take", "aten.gather", "aten.index", "aten.embedding"}
_SCATTERS = {"aten.index_copy_", "aten.index_copy", "aten.index_put_", "aten.index_put", "aten.scatter_",
             "aten.scatter", "aten.scatter_add_", "aten.scatter_add", "fastrsb.put_rows_"}
_NO_KERNEL = {"aten.detach", "aten.lift_fresh", "aten.alias", "aten._local_scalar_dense"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (a broadcast dimension, stride 0, counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


@dataclass
class Traffic:
    bytes: int = 0
    kernels: int = 0
    by_op: Counter = field(default_factory=Counter)  # op name -> bytes

    def per_image_mib(self, images: int) -> float:
        return self.bytes / images / 2**20

    def top(self, n: int = 6) -> dict[str, float]:
        """The n ops that move the most bytes, as their share of the total."""
        return {name: round(b / max(self.bytes, 1), 3) for name, b in self.by_op.most_common(n)}


class _Trace(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.traffic = Traffic()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        if func.is_view or name in _NO_KERNEL:
            return out
        ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [a for a in tree_leaves(out) if isinstance(a, torch.Tensor)]
        if name in _GATHERS:  # reads what it writes from the source, plus the indices
            moved = 2 * sum(map(tensor_bytes, outs)) + sum(map(tensor_bytes, ins[1:]))
        elif name in _SCATTERS:  # read-modify-write of the touched rows: the sources and indices
            moved = 2 * sum(map(tensor_bytes, ins[1:]))
        else:
            moved = sum(map(tensor_bytes, ins)) + sum(map(tensor_bytes, outs))
        self.traffic.bytes += moved
        self.traffic.kernels += 1
        self.traffic.by_op[name] += moved
        return out


def trace(fn, *args, **kwargs) -> tuple[Traffic, object]:
    """(traffic of one eager call of fn(*args, **kwargs), its result)."""
    mode = _Trace()
    with mode:
        result = fn(*args, **kwargs)
    return mode.traffic, result


CUSTOM_PREFIX = "fastrsb."  # fastrsb's own kernels (torch custom ops, fastrsb/augment/kernels.py)


def compiled_traffic(compile_and_call, custom_ops: Traffic | None = None) -> Traffic:
    """Inductor's bytes and kernels for the graphs that `compile_and_call()` compiles (a fresh compile:
    the FX graph cache is off meanwhile). Inductor counts only while its metrics log is enabled; it is
    enabled here with a handler that prints nothing.

    Inductor calls fastrsb's own kernels (custom ops) as they are, and counts such an extern kernel by its
    buffers whole: an in-place write of a few images into the batch counts as the whole batch read and
    written. The compiled graph makes the same custom-op calls as eager, so with `custom_ops` (the eager
    trace of a call of the same shape) their bytes are counted as the eager figure counts them, and
    Inductor's count gives the rest. Kernels: Inductor's generated ones plus every extern call."""
    from torch._inductor import config, metrics
    from torch._inductor.scheduler import ExternKernelSchedulerNode

    log = torch._logging.getArtifactLogger("torch._inductor.compile_fx", "inductor_metrics")
    saved = log.level, log.propagate
    sink = logging.NullHandler()
    log.setLevel(logging.INFO)
    log.propagate = False
    log.addHandler(sink)
    metrics.reset()
    try:
        with config.patch(fx_graph_cache=False):
            compile_and_call()
        nodes = list(metrics.nodes_num_elem)  # (scheduler node, bytes // 4)

        def custom(node) -> bool:
            return str(getattr(getattr(node, "node", None), "op_overload", "")).startswith(CUSTOM_PREFIX)

        externs = sum(isinstance(node, ExternKernelSchedulerNode) for node, _ in nodes)
        kernels = int(metrics.generated_kernel_count) + externs
        if custom_ops is None:
            return Traffic(bytes=int(metrics.num_bytes_accessed), kernels=kernels)
        rest = sum(4 * n for node, n in nodes if not custom(node))
        mine = sum(b for name, b in custom_ops.by_op.items() if name.startswith(CUSTOM_PREFIX))
        return Traffic(bytes=rest + mine, kernels=kernels)
    finally:
        log.removeHandler(sink)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        metrics.reset()


def floor_ms(traffic: Traffic, images: int, per: int = 256, bandwidth: float = H100_BYTES_PER_S,
             launch_s: float = LAUNCH_S) -> dict[str, float]:
    """The time floor per `per` images of a call on `images`: its bytes at `bandwidth`, and its launches."""
    scale = per / images
    return {"bytes_ms": round(1e3 * traffic.bytes * scale / bandwidth, 4),
            "launch_ms": round(1e3 * traffic.kernels * launch_s * scale, 4)}
