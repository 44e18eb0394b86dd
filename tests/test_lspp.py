"""LS++ loss against an independent float64 computation written with explicit loops."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from kd.training.loop import TrainModule
from kd.training.optim import build_optimizer
from kd.errors import KDError
from kd.losses import (
    LSPPLoss,
    cmatrix_from_logits,
    insert_diagonal,
    log_cmatrix_from_logits,
    lspp_terms,
    remove_diagonal,
)
from kd.methods import StepContext, build_method


def reference_cmatrix(logits: np.ndarray) -> np.ndarray:
    """C from K x (K-1) logits, by the paper's words: row softmax, then a 0 at the target's position."""
    k = logits.shape[0]
    c = np.zeros((k, k))
    for y in range(k):
        row = np.exp(logits[y] - logits[y].max())
        row /= row.sum()
        others = [j for j in range(k) if j != y]
        for position, j in enumerate(others):
            c[y, j] = row[position]
    return c


def reference_targets(labels: np.ndarray, c: np.ndarray, alpha: float) -> np.ndarray:
    k = c.shape[0]
    soft = np.eye(k)[labels] if labels.ndim == 1 else labels
    return (1 - alpha) * soft + alpha * soft @ c


def reference_losses(net_logits: np.ndarray, targets: np.ndarray) -> tuple[float, float]:
    """(H(t, p), H(p, t)) averaged over the batch, in float64."""
    shifted = net_logits - net_logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    p = np.exp(log_p)
    return float(-(targets * log_p).sum(1).mean()), float(-(p * np.log(targets)).sum(1).mean())


def make_case(seed: int, k: int = 6, n: int = 9, c_scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    criterion = LSPPLoss(k, alpha=0.1)
    with torch.no_grad():
        criterion.c_logits.copy_(torch.randn(k, k - 1, generator=generator) * c_scale)
    net_logits = (torch.randn(n, k, generator=generator) * 3).requires_grad_()
    labels = torch.randint(0, k, (n,), generator=generator)
    return criterion, net_logits, labels


def test_zero_initialised_c_has_uniform_rows_zero_diagonal_and_rows_summing_to_one():
    c = cmatrix_from_logits(LSPPLoss(7, alpha=0.1).c_logits).detach()
    off_diagonal = ~torch.eye(7, dtype=torch.bool)
    assert torch.all(c.diagonal() == 0)
    torch.testing.assert_close(c[off_diagonal], torch.full((42,), 1 / 6))
    torch.testing.assert_close(c.sum(1), torch.ones(7))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cmatrix_matches_reference_for_learned_logits(seed):
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed)) * 4
    c = cmatrix_from_logits(logits)
    np.testing.assert_allclose(c.numpy(), reference_cmatrix(logits.double().numpy()), atol=1e-6)
    assert torch.all(c.diagonal() == 0)
    torch.testing.assert_close(c.sum(1), torch.ones(5))


def test_insert_and_remove_diagonal_are_inverse():
    off = torch.arange(20.0).reshape(5, 4)
    full = insert_diagonal(off, -1.0)
    assert full.diagonal().tolist() == [-1.0] * 5
    assert full[2].tolist() == [8.0, 9.0, -1.0, 10.0, 11.0]
    assert torch.equal(remove_diagonal(full), off)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_loss_value_equals_sum_of_both_cross_entropies(seed):
    criterion, net_logits, labels = make_case(seed)
    c = reference_cmatrix(criterion.c_logits.detach().double().numpy())
    forward_term, reverse_term = reference_losses(
        net_logits.detach().double().numpy(), reference_targets(labels.numpy(), c, 0.1)
    )
    loss = criterion(net_logits, labels)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(forward_term + reverse_term, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_network_gradient_equals_soft_target_cross_entropy_with_constant_target(seed):
    criterion, net_logits, labels = make_case(seed)
    criterion(net_logits, labels).backward()

    c = reference_cmatrix(criterion.c_logits.detach().double().numpy())
    constant_target = torch.from_numpy(reference_targets(labels.numpy(), c, 0.1))
    reference_logits = net_logits.detach().double().requires_grad_()
    nn.functional.cross_entropy(reference_logits, constant_target).backward()
    np.testing.assert_allclose(net_logits.grad.numpy(), reference_logits.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_c_gradient_comes_only_from_reverse_term(seed):
    criterion, net_logits, labels = make_case(seed)
    criterion(net_logits, labels).backward()

    # Independent reverse term H(p, t) with p a constant, differentiated only through C.
    c_logits = criterion.c_logits.detach().double().requires_grad_()
    k = c_logits.shape[0]
    rows = []
    for y in range(k):
        row_probs = torch.softmax(c_logits[y], dim=0)
        rows.append(torch.cat([row_probs[:y], row_probs.new_zeros(1), row_probs[y:]]))
    c = torch.stack(rows)
    targets = 0.9 * nn.functional.one_hot(labels, k).double() + 0.1 * c[labels]
    p = torch.softmax(net_logits.detach().double(), dim=1)
    (-(p * targets.log()).sum(1).mean()).backward()
    np.testing.assert_allclose(criterion.c_logits.grad.numpy(), c_logits.grad.numpy(), atol=1e-6)


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_each_named_term_of_the_lspp_method_reaches_only_its_own_parameters(soft):
    """Backpropagating one named part of the product's LS++ loss: `network` moves only the
    network's logits, `cmatrix` only the C logits (each detach in kd.losses is needed for this)."""
    criterion, net_logits, labels = make_case(0)
    k = criterion.num_classes
    targets = torch.softmax(torch.randn(len(labels), k, generator=torch.Generator().manual_seed(7)), dim=1) if soft else labels
    method = build_method("lspp", k, alpha=0.1)
    with torch.no_grad():
        method.logits.copy_(criterion.c_logits)
    parts = method(net_logits, targets, StepContext(epoch=0, step=0, total_steps=1, steps_per_epoch=1))
    assert set(parts) == {"loss", "network", "cmatrix"}

    def gradients(part: str) -> tuple[torch.Tensor, torch.Tensor]:
        grads = torch.autograd.grad(parts[part], (net_logits, method.logits), retain_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(x) if g is None else g for g, x in zip(grads, (net_logits, method.logits)))

    net_grad, c_grad = gradients("network")
    assert torch.count_nonzero(c_grad) == 0 and torch.count_nonzero(net_grad) > 0
    net_grad, c_grad = gradients("cmatrix")
    assert torch.count_nonzero(net_grad) == 0 and torch.count_nonzero(c_grad) > 0
    # The public loss module sums the same two terms: its C gradient is the `cmatrix` term's alone.
    criterion(net_logits, targets).backward()
    torch.testing.assert_close(criterion.c_logits.grad, c_grad, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_soft_labels_map_linearly(seed):
    criterion, _, labels = make_case(seed)
    k = criterion.num_classes
    generator = torch.Generator().manual_seed(seed + 10)
    lam = torch.rand(len(labels), 1, generator=generator)
    other = torch.randint(0, k, (len(labels),), generator=generator)
    mixed = lam * nn.functional.one_hot(labels, k) + (1 - lam) * nn.functional.one_hot(other, k)
    c = cmatrix_from_logits(criterion.c_logits).detach()
    expected = 0.9 * mixed + 0.1 * mixed @ c
    torch.testing.assert_close(criterion.targets(mixed).detach(), expected, atol=1e-6, rtol=1e-5)
    # A one-hot distribution gives exactly the hard-label target.
    torch.testing.assert_close(
        criterion.targets(nn.functional.one_hot(labels, k).float()).detach(), criterion.targets(labels).detach()
    )


def test_soft_label_loss_matches_reference_and_has_finite_gradients():
    criterion, net_logits, labels = make_case(3)
    k = criterion.num_classes
    soft = nn.functional.one_hot(labels, k).float()  # includes the all -inf column case of s @ C
    soft[0] = torch.tensor([0.5, 0.5] + [0.0] * (k - 2))
    loss = criterion(net_logits, soft)
    c = reference_cmatrix(criterion.c_logits.detach().double().numpy())
    forward_term, reverse_term = reference_losses(
        net_logits.detach().double().numpy(), reference_targets(soft.double().numpy(), c, 0.1)
    )
    assert loss.item() == pytest.approx(forward_term + reverse_term, rel=1e-5)
    loss.backward()
    assert torch.isfinite(criterion.c_logits.grad).all() and torch.isfinite(net_logits.grad).all()


def test_extreme_logits_stay_finite():
    criterion, net_logits, labels = make_case(1, c_scale=80.0)
    extreme = (net_logits.detach() * 1e4).requires_grad_()
    loss = criterion(extreme, labels)
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isfinite(extreme.grad).all() and torch.isfinite(criterion.c_logits.grad).all()


def test_alpha_zero_network_term_is_plain_cross_entropy_and_leaves_c_alone():
    c_logits = torch.zeros(4, 3, requires_grad=True)
    net_logits = torch.randn(5, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0])
    loss = lspp_terms(net_logits, labels, c_logits, 0.0)["network"]
    assert loss.item() == pytest.approx(nn.functional.cross_entropy(net_logits, labels).item(), rel=1e-6)
    loss.backward()
    assert c_logits.grad is None or torch.count_nonzero(c_logits.grad) == 0


def test_loss_stays_float32_under_bfloat16_autocast():
    criterion, net_logits, labels = make_case(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = criterion(net_logits.bfloat16(), labels)
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5])
def test_rejects_alpha_outside_unit_interval(alpha):
    with pytest.raises(KDError, match="alpha"):
        LSPPLoss(3, alpha)


def test_c_logits_are_parameters_of_the_prepared_module_without_weight_decay():
    module = TrainModule(nn.Linear(4, 3), build_method("lspp", 3))
    assert any(p is module.criterion.logits for p in module.parameters())
    optimizer = build_optimizer(module, lr=0.1, weight_decay=5e-4, momentum=0.9)
    group_of_c = [g for g in optimizer.param_groups if any(p is module.criterion.logits for p in g["params"])]
    assert len(group_of_c) == 1 and group_of_c[0]["weight_decay"] == 0.0
    decayed = [g for g in optimizer.param_groups if g["weight_decay"] > 0]
    assert any(p is module.net.weight for g in decayed for p in g["params"])


@pytest.mark.parametrize("k,c_loss", [(6, "detached"), (50, "detached"), (50, "ce"), (50, "sce")])
def test_batch_rows_path_equals_the_whole_matrix_path(k, c_loss):
    """The O(N K) targets for hard labels give the losses and gradients of the O(K^2) matrix."""
    from kd.losses import log_targets, lspp_terms

    generator = torch.Generator().manual_seed(k)
    c_logits = (torch.randn(k, k - 1, generator=generator) * 2).requires_grad_()
    net_logits = (torch.randn(16, k, generator=generator) * 3).requires_grad_()
    labels = torch.randint(0, k, (16,), generator=generator)
    labels[:4] = labels[4]  # repeated labels: their rows' gradients add up
    terms = lspp_terms(net_logits, labels, c_logits, 0.2, c_loss)
    sum(terms.values()).backward()
    fast = (net_logits.grad.clone(), c_logits.grad.clone())

    net_logits.grad, c_logits.grad = None, None
    log_t = log_targets(labels, log_cmatrix_from_logits(c_logits), 0.2)  # the whole-matrix path
    log_p = torch.log_softmax(net_logits, dim=1)
    t, p = log_t.exp(), log_p.exp()
    if c_loss == "detached":
        reference = {"network": -(t.detach() * log_p).sum(1).mean(), "cmatrix": -(p.detach() * log_t).sum(1).mean()}
    else:
        reference = {"ce": -(t * log_p).sum(1).mean()} | ({"rce": -(p * log_t).sum(1).mean()} if c_loss == "sce" else {})
    sum(reference.values()).backward()
    for name, value in reference.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast[0], net_logits.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fast[1], c_logits.grad, rtol=1e-5, atol=1e-7)


def test_soft_label_targets_use_only_the_batch_classes_and_equal_the_whole_matrix_path():
    """Mixup-style distributions over a few of K classes: the same targets and gradients as s @ C over all K."""
    from kd.losses import log_targets, mix_targets

    k = 40
    generator = torch.Generator().manual_seed(3)
    c_logits = (torch.randn(k, k - 1, generator=generator) * 2).requires_grad_()
    classes = torch.tensor([3, 7, 19, 31])
    soft = torch.zeros(6, k)
    weights = torch.rand(6, generator=generator)
    soft[torch.arange(6), classes[torch.arange(6) % 4]] = weights
    soft[torch.arange(6), classes[(torch.arange(6) + 1) % 4]] += 1 - weights
    soft[5] = 0.0
    soft[5, 7] = 1.0  # a one-hot row among the mixed ones
    log_t = log_targets(soft, log_cmatrix_from_logits(c_logits), 0.1)
    (log_t.exp() * torch.arange(k)).sum().backward()
    grad = c_logits.grad.clone()

    c = cmatrix_from_logits(c_logits.detach()).double()
    expected = 0.9 * soft.double() + 0.1 * soft.double() @ c
    torch.testing.assert_close(log_t.exp().double(), expected, rtol=1e-5, atol=1e-7)
    c_logits.grad = None
    whole = 0.9 * soft + 0.1 * soft @ cmatrix_from_logits(c_logits)  # the whole-matrix product, in probabilities
    (whole * torch.arange(k)).sum().backward()
    torch.testing.assert_close(grad, c_logits.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mix_targets(soft, c.float(), 0.1).double(), expected, rtol=1e-5, atol=1e-7)
