"""fastrsb.loss and fastrsb.schedule against timm's BinaryCrossEntropy and CosineLRScheduler."""
from __future__ import annotations

import math

import pytest
import torch

from fastrsb.loss import BCELoss, bce_loss
from fastrsb.schedule import lr_at

timm_loss = pytest.importorskip("timm.loss")
from timm.scheduler import CosineLRScheduler  # noqa: E402


def _logits_and_labels(n=16, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g), g


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("thresh", [None, 0.2])
def test_bce_int_labels_match_timm(smoothing, thresh):
    logits, labels, _ = _logits_and_labels()
    ref = timm_loss.BinaryCrossEntropy(smoothing=smoothing, target_threshold=thresh)(logits, labels)
    ours = bce_loss(logits, labels, smoothing=smoothing, target_threshold=thresh)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(BCELoss(smoothing, thresh)(logits, labels), ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("thresh", [None, 0.2])
def test_bce_dense_soft_targets_match_timm(thresh):
    """Mixup-like dense targets: two smoothed one-hots mixed with lambda 0.7."""
    logits, labels, g = _logits_and_labels(seed=1)
    c = logits.shape[1]
    onehot = torch.nn.functional.one_hot(labels, c).float() * 0.9 + 0.1 / c
    target = 0.7 * onehot + 0.3 * onehot.flip(0)
    ref = timm_loss.BinaryCrossEntropy(smoothing=0.0, target_threshold=thresh)(logits, target)
    ours = bce_loss(logits, target, target_threshold=thresh)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    if thresh is not None:  # the threshold changes the loss, so the two cases are not the same test
        assert not torch.allclose(ours, bce_loss(logits, target))


def test_bce_bf16_logits_computed_in_fp32():
    logits, labels, _ = _logits_and_labels(n=64, c=1000)
    ours = bce_loss(logits.bfloat16(), labels, target_threshold=0.2)
    ref = timm_loss.BinaryCrossEntropy(smoothing=0.0, target_threshold=0.2)(logits.bfloat16().float(), labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_bce_rejects_bad_shapes():
    with pytest.raises(ValueError):
        bce_loss(torch.zeros(4, 3), torch.zeros(4, 2))


def _timm_sched(t_initial, warmup_t, base_lr, min_lr, warmup_lr, t_in_epochs):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    return CosineLRScheduler(opt, t_initial=t_initial, lr_min=min_lr, warmup_t=warmup_t,
                             warmup_lr_init=warmup_lr, t_in_epochs=t_in_epochs)


@pytest.mark.parametrize("min_lr,warmup_lr", [(0.0, 0.0), (1e-5, 1e-6)])
def test_schedule_per_step_matches_timm_on_updates(min_lr, warmup_lr):
    """timm with t_in_epochs=False (--sched-on-updates) is per step: equal at every step."""
    total, warmup, base = 500, 50, 8e-3
    sched = _timm_sched(total, warmup, base, min_lr, warmup_lr, t_in_epochs=False)
    for step in range(total + 5):
        ref = sched._get_lr(step)[0]
        assert math.isclose(lr_at(step, total, warmup, base, min_lr, warmup_lr), ref, rel_tol=1e-12, abs_tol=1e-15), step


def test_schedule_per_epoch_matches_timm_default_at_epoch_starts():
    """timm's default steps per epoch; at each epoch's first step the two agree."""
    epochs, warmup_epochs, steps_per_epoch, base = 100, 5, 37, 8e-3
    sched = _timm_sched(epochs, warmup_epochs, base, 0.0, 1e-6, t_in_epochs=True)
    opt = sched.optimizer
    for epoch in range(epochs):
        sched.step(epoch)
        ours = lr_at(epoch * steps_per_epoch, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, base, 0.0, 1e-6)
        assert math.isclose(ours, opt.param_groups[0]["lr"], rel_tol=1e-12, abs_tol=1e-15), epoch
    # Within an epoch fastrsb moves on while timm holds: the documented difference.
    assert lr_at(10 * steps_per_epoch + 20, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, base) < \
        lr_at(10 * steps_per_epoch, epochs * steps_per_epoch, warmup_epochs * steps_per_epoch, base)


def test_schedule_shape():
    total, warmup, base = 1000, 100, 1.0
    assert lr_at(0, total, warmup, base) == 0.0
    assert lr_at(50, total, warmup, base) == pytest.approx(0.5)
    assert lr_at(total, total, warmup, base, min_lr=0.01) == 0.01
    lrs = [lr_at(s, total, warmup, base) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lr_at(0, total, 0, base) == base
    with pytest.raises(ValueError):
        lr_at(0, 0, 0, base)


def test_make_loss_bce_ce_and_unknown():
    import dataclasses

    import timm.loss

    from fastrsb.errors import FastRSBError
    from fastrsb.augment import smooth_one_hot
    from fastrsb.loss import make_loss, soft_cross_entropy
    from fastrsb.recipes import A1, A3

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 10, generator=g)
    labels = torch.randint(0, 10, (8,), generator=g)
    ref = timm.loss.BinaryCrossEntropy(smoothing=0.1, target_threshold=0.2)(logits, labels)
    assert torch.allclose(make_loss(A1)(logits, labels), ref)  # A1: BCE, smoothing 0.1, threshold 0.2
    ce = make_loss(dataclasses.replace(A3, loss="ce", label_smoothing=0.1))
    dense = smooth_one_hot(labels, 10, 0.1)
    assert torch.allclose(ce(logits, labels), timm.loss.LabelSmoothingCrossEntropy(0.1)(logits, labels), atol=1e-6)
    assert torch.allclose(soft_cross_entropy(logits, dense), timm.loss.SoftTargetCrossEntropy()(logits, dense))
    with pytest.raises(FastRSBError, match="choose bce or ce"):
        make_loss(dataclasses.replace(A3, loss="mse"))
