"""The BYOL math references against hand-computed values."""

import math

import pytest
import torch

from fastbyol.reference import (byol_loss_and_grad_reference, byol_loss_reference, byol_loss_symmetric_reference,
                                ema_update_reference_, lars_update_, lr_at, scaled_lr, tau_at)


def test_loss_hand_values():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    z = torch.tensor([[2.0, 0.0], [0.0, -1.0], [4.0, -3.0]])
    # cosines 1, -1, 0 -> per-row losses 0, 4, 2 -> mean 2
    assert byol_loss_reference(p, z).item() == pytest.approx(2.0, abs=1e-6)
    # equals ||p/|p| - z/|z|||^2 row by row
    pn, zn = p / p.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    assert byol_loss_reference(p, z).item() == pytest.approx(((pn - zn) ** 2).sum(1).mean().item(), abs=1e-6)


def test_loss_symmetric_sums_both_directions_and_detaches_target():
    p1, p2 = torch.tensor([[1.0, 0.0]], requires_grad=True), torch.tensor([[0.0, 1.0]], requires_grad=True)
    z1, z2 = torch.tensor([[1.0, 0.0]], requires_grad=True), torch.tensor([[1.0, 1.0]], requires_grad=True)
    loss = byol_loss_symmetric_reference(p1, p2, z1, z2)
    c = 1 / math.sqrt(2)  # cos(p1, z2) = 1/sqrt2; cos(p2, z1) = 0
    assert loss.item() == pytest.approx((2 - 2 * c) + 2.0, abs=1e-6)  # summed, not averaged
    loss.backward()
    assert z1.grad is None and z2.grad is None
    assert p1.grad is not None and p2.grad is not None


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        byol_loss_reference(torch.randn(3, 4), torch.randn(3, 5))


def test_ema_formula_and_integer_tensors_left_alone():
    t = [torch.tensor([1.0, 2.0]), torch.tensor([5], dtype=torch.int64)]
    o = [torch.tensor([3.0, -2.0]), torch.tensor([9], dtype=torch.int64)]
    ema_update_reference_(t, o, 0.75)
    torch.testing.assert_close(t[0], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * -2]))
    assert t[1].item() == 5
    ema_update_reference_(t[:1], o[:1], torch.tensor(1.0))  # tau = 1 leaves the target alone
    torch.testing.assert_close(t[0], torch.tensor([1.5, 1.0]))
    with pytest.raises(ValueError, match="2 target tensors but 1"):
        ema_update_reference_(t, o[:1], 0.5)


def test_tau_schedule():
    assert tau_at(0, 100, 0.99) == pytest.approx(0.99)
    assert tau_at(50, 100, 0.99) == pytest.approx(1 - 0.01 * 0.5)
    assert tau_at(100, 100, 0.99) == pytest.approx(1.0)
    assert tau_at(25, 100, 0.996) == pytest.approx(1 - 0.004 * (math.cos(math.pi / 4) + 1) / 2)


def test_lr_schedule():
    assert scaled_lr(0.2, 4096) == pytest.approx(3.2)
    peak = 1.0
    assert lr_at(0, 100, 10, peak) == 0.0
    assert lr_at(5, 100, 10, peak) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, peak) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, peak) == pytest.approx(0.5)  # halfway through the cosine
    assert lr_at(100, 100, 10, peak) == pytest.approx(0.0, abs=1e-12)


def test_lars_hand_computed():
    w = torch.tensor([[3.0, 4.0]])  # |w| = 5
    b = torch.tensor([1.0, 1.0])  # 1-D: excluded from decay and trust ratio
    gw, gb = torch.tensor([[0.0, 1.0]]), torch.tensor([0.5, -0.5])
    mw, mb = torch.zeros_like(w), torch.zeros_like(b)
    wd, eta, lr = 0.1, 1e-3, 2.0
    lars_update_([w, b], [gw, gb], [mw, mb], lr=lr, weight_decay=wd, momentum=0.9, trust_coefficient=eta)
    u = torch.tensor([[0.3, 1.4]])  # g + wd * w
    u = u * eta * 5.0 / u.norm()
    torch.testing.assert_close(mw, u)
    torch.testing.assert_close(w, torch.tensor([[3.0, 4.0]]) - lr * u)
    torch.testing.assert_close(mb, gb)  # no decay, no trust ratio
    torch.testing.assert_close(b, torch.tensor([1.0, 1.0]) - lr * gb)
    # second step: momentum 0.9 accumulates
    w_before, m_before = w.clone(), mw.clone()
    lars_update_([w, b], [gw, gb], [mw, mb], lr=lr, weight_decay=wd, momentum=0.9, trust_coefficient=eta)
    u2 = gw + wd * w_before
    u2 = u2 * eta * w_before.norm() / u2.norm()
    torch.testing.assert_close(mw, 0.9 * m_before + u2)
    torch.testing.assert_close(w, w_before - lr * mw)


def test_lars_zero_gradient_keeps_trust_one():
    w, g, m = torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2)
    lars_update_([w], [g], [m], lr=1.0, weight_decay=0.0)
    assert torch.isfinite(w).all() and torch.isfinite(m).all()


@pytest.mark.parametrize("B,D", [(1, 1), (7, 255), (64, 256)])
def test_closed_form_gradient_matches_autograd_float64(B, D):
    p = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    z = torch.randn(B, D, dtype=torch.float64)
    if B > 1:
        with torch.no_grad():
            p[1] = 0.0  # a zero row: the norm floor applies
    loss = byol_loss_reference(p, z)
    loss.backward()
    loss_cf, grad_cf = byol_loss_and_grad_reference(p, z)
    assert abs(loss.item() - loss_cf.item()) < 1e-12
    torch.testing.assert_close(grad_cf, p.grad, rtol=1e-10, atol=1e-12)
