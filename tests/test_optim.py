"""fastrsb.optim.Lamb against timm.optim.Lamb, step by step, on a small conv net (fp32)."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from fastrsb.optim import Lamb, make_param_groups

timm_optim = pytest.importorskip("timm.optim")


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    )


def _batches(n: int, loss_scale: float):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g), loss_scale) for _ in range(n)]


def _grad_step(model, x, y, loss_scale):
    model.zero_grad(set_to_none=True)
    (nn.functional.cross_entropy(model(x), y) * loss_scale).backward()


def _global_grad_norm(model) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])).item()


CASES = [
    # (weight_decay, max_grad_norm, trust_clip, always_adapt, loss_scale)
    (0.02, None, False, False, 1.0),
    (0.02, 1.0, False, False, 50.0),  # loss scaled so the global norm exceeds 1: clipping is active
    (0.0, None, False, False, 1.0),
    (0.0, 1.0, False, False, 50.0),
    (0.02, 1.0, True, False, 50.0),
    (0.0, None, False, True, 1.0),
    (0.05, 0.5, True, True, 20.0),
    (0.02, 10.0, False, False, 1.0),  # clipping on but the norm stays below it: gradients untouched
]


@pytest.mark.parametrize("weight_decay,max_grad_norm,trust_clip,always_adapt,loss_scale", CASES)
def test_lamb_matches_timm(weight_decay, max_grad_norm, trust_clip, always_adapt, loss_scale):
    ours_model = _small_net()
    ref_model = copy.deepcopy(ours_model)
    kwargs = dict(lr=3e-2, betas=(0.9, 0.999), eps=1e-6, max_grad_norm=max_grad_norm,
                  trust_clip=trust_clip, always_adapt=always_adapt)
    ours = Lamb(make_param_groups(ours_model, weight_decay), **kwargs)
    ref = timm_optim.Lamb(make_param_groups(ref_model, weight_decay), **kwargs)

    clipped_steps = 0
    for step, (x, y, scale) in enumerate(_batches(6, loss_scale)):
        _grad_step(ours_model, x, y, scale)
        _grad_step(ref_model, x, y, scale)
        if max_grad_norm is not None and _global_grad_norm(ours_model) > max_grad_norm:
            clipped_steps += 1
        grads_before = [p.grad.clone() for p in ours_model.parameters()]
        ours.step()
        ref.step()
        for g, p in zip(grads_before, ours_model.parameters()):
            assert torch.equal(g, p.grad), "Lamb must leave p.grad unmodified"
        for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {step} {name}: {m}")
    if max_grad_norm is not None and loss_scale > 1:
        assert clipped_steps >= 3, "the clipping cases must actually clip"
    if max_grad_norm is not None and loss_scale == 1:
        assert clipped_steps == 0
    # The parameters moved, so the comparison is not vacuous.
    assert not torch.allclose(next(iter(ours_model.parameters())), next(iter(_small_net().parameters())))


@pytest.mark.timeout(600)
def test_compiled_update_matches_timm_and_eager_with_one_graph_per_group():
    """compile_update=True (the trainer's setting when the model is compiled): the trust-ratio step runs
    through torch.compile. Results stay equal to timm and to the eager op, dynamo captures the apply as one
    graph per trust-ratio group without a break, and a new lr or bias correction each step (the schedule)
    recompiles nothing."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from fastrsb.optim import _apply_step_sizes

    torch._dynamo.reset()
    counters.clear()
    models = [_small_net() for _ in range(3)]
    kwargs = dict(betas=(0.9, 0.999), eps=1e-6, max_grad_norm=1.0)
    compiled = Lamb(make_param_groups(models[0], 0.02), lr=3e-2, compile_update=True, **kwargs)
    eager = Lamb(make_param_groups(models[1], 0.02), lr=3e-2, **kwargs)
    ref = timm_optim.Lamb(make_param_groups(models[2], 0.02), lr=3e-2, **kwargs)
    for step, (x, y, scale) in enumerate(_batches(5, 50.0)):
        for opt, model in zip((compiled, eager, ref), models):
            for group in opt.param_groups:
                group["lr"] = 3e-2 * (step + 1) / 5  # a warmup ramp: a new lr every step
            _grad_step(model, x, y, scale)
            opt.step()
        for a, b, c in zip(*(m.parameters() for m in models)):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
    # one graph, the decay group's, for all five steps (the no-decay group has no trust ratio: a plain foreach add)
    assert counters["stats"]["unique_graphs"] == 1, counters["stats"]
    params = [p.detach().clone() for p in models[0].parameters()]
    explained = torch._dynamo.explain(_apply_step_sizes)(params, [p.clone() for p in params], torch.ones(len(params)))
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    ops = [n.target for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch._foreach_addcmul_ in ops  # one foreach op for all parameters, which Inductor fuses


def test_clipping_changes_the_result():
    """With a large gradient, clipping at 1.0 and no clipping give different parameters (both tested above)."""
    results = []
    for max_grad_norm in (None, 1.0):
        model = _small_net()
        opt = Lamb(make_param_groups(model, 0.02), lr=3e-2, max_grad_norm=max_grad_norm)
        for x, y, scale in _batches(3, 50.0):
            _grad_step(model, x, y, scale)
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not torch.allclose(results[0], results[1])


def test_default_clip_is_timms():
    assert Lamb([nn.Parameter(torch.ones(2))]).max_grad_norm == 1.0
    assert Lamb([nn.Parameter(torch.ones(2))], max_grad_norm=0).max_grad_norm is None


def test_param_groups_by_ndim():
    model = _small_net()
    groups = make_param_groups(model, 0.02)
    assert groups[0]["weight_decay"] == 0.02 and all(p.ndim >= 2 for p in groups[0]["params"])
    assert groups[1]["weight_decay"] == 0.0 and all(p.ndim <= 1 for p in groups[1]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))
    assert len(groups[1]["params"]) == 4  # bn weight + bias, conv bias, linear bias


def test_state_dict_roundtrip_weights_only():
    """Saving after 3 steps, loading with weights_only=True and going on equals not stopping."""
    data = _batches(6, 50.0)
    model = _small_net()
    opt = Lamb(make_param_groups(model, 0.02), lr=3e-2)
    for x, y, s in data:
        _grad_step(model, x, y, s)
        opt.step()

    model2 = _small_net()
    opt2 = Lamb(make_param_groups(model2, 0.02), lr=3e-2)
    for x, y, s in data[:3]:
        _grad_step(model2, x, y, s)
        opt2.step()
    buf = io.BytesIO()
    torch.save({"model": model2.state_dict(), "opt": opt2.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model3 = _small_net()
    model3.load_state_dict(ckpt["model"])
    opt3 = Lamb(make_param_groups(model3, 0.02), lr=3e-2, max_grad_norm=None)
    opt3.load_state_dict(ckpt["opt"])
    assert opt3.max_grad_norm == 1.0 and opt3.param_groups[0]["step"] == 3
    for x, y, s in data[3:]:
        _grad_step(model3, x, y, s)
        opt3.step()
    for a, b in zip(model.parameters(), model3.parameters()):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_step_has_no_host_sync_cuda():
    model = _small_net().cuda()
    opt = Lamb(make_param_groups(model, 0.02), lr=1e-2, max_grad_norm=1.0, trust_clip=True)
    x, y, s = _batches(1, 50.0)[0]
    _grad_step(model, x.cuda(), y.cuda(), s)
    opt.step()  # state initialisation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_model_ema_averages_parameters_and_copies_every_buffer():
    """ModelEma: parameters move by (1 - decay) towards the model's; buffers of every dtype (BatchNorm's
    float running stats and int64 batch counts) are copied."""
    from fastrsb.optim import ModelEma

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema = ModelEma(model, decay=0.9)
    before = [p.detach().clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(2, 3, 8, 8))  # BatchNorm updates its running stats and count
    ema.update(model)
    for old, new, target in zip(before, ema.module.parameters(), model.parameters()):
        assert torch.allclose(new, old + 0.1 * (target - old), atol=1e-6)
    for mine, theirs in zip(ema.module.buffers(), model.buffers()):
        assert torch.equal(mine, theirs) and mine.dtype == theirs.dtype
    assert int(ema.module[1].num_batches_tracked) == 1


def test_step_on_a_fake_cuda_device_never_syncs():
    """Lamb's step traced on fake `cuda` tensors (no GPU needed), with clipping, weight decay and the trust
    ratio on: none reads a value back to the host (the trust ratios and the clip divisor stay on the device),
    every op touches CUDA tensors only, and the op count does not grow with the number of parameters (no
    per-parameter Python arithmetic). The last `_foreach_addcmul_` takes a list of 0-dim step sizes, which
    CUDA runs per tensor (a launch per parameter); this test does not hold that part to the fast path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from conftest import record_devices

    sync_ops = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.item", "aten.equal"}

    def trace(copies: int):
        """(first step's ops, second step's ops) for `copies` times the small net's parameters."""
        with FakeTensorMode():
            # the small net's parameter shapes: convolutions and the linear layer decay, biases and norms do not
            shapes = [p.shape for p in _small_net().parameters()] * copies
            params = [nn.Parameter(torch.randn(shape, device="cuda")) for shape in shapes]
            params[0] = nn.Parameter(params[0].contiguous(memory_format=torch.channels_last))  # as the trainer's
            for p in params:
                p.grad = torch.randn_like(p)
            groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.02},
                      {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
            opt = Lamb(groups, lr=1e-2, max_grad_norm=1.0, trust_clip=True, always_adapt=True)
            with record_devices() as first:
                opt.step()  # the state's first step: its moments are made
            with record_devices() as second:
                opt.step()
        assert all(p.device.type == "cuda" for p in params) and opt.param_groups[0]["step"] == 2
        return first.ops, second.ops

    first, second = trace(1)
    assert [op for op, _ in first + second if op in sync_ops] == []
    assert [op for op, devices in second if devices - {"cuda"}] == []
    ops = [op for op, _ in second]
    assert "aten._foreach_norm" in ops and "aten._foreach_addcmul_" in ops
    # the ops are multi-tensor ones: three times the parameters, the same ops (device queries aside)
    kernels = lambda trace: [op for op, _ in trace if not op.startswith(("prim.", "profiler."))]
    assert kernels(trace(3)[1]) == kernels(second)
