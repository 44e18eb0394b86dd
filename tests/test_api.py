"""The public library API: `import kd` stays cheap, and LSPPLoss / ProxyTeacherLoss compute the
paper's losses (checked against float64 computations written here) exactly as the toolkit's methods do."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import kd
import kd.losses
import kd.losses.modules
from kd import (
    CMatrix,
    CMatrixError,
    KDError,
    LSPPLoss,
    ProxyTeacherLoss,
    build_method,
    load_cmatrix,
)
from tests.helpers import CONTEXT, assert_one_line_kderror, reference_cmatrix

K, N = 6, 9
NAMES = ("ant", "bee", "cat", "dog", "eel", "fox")


def test_import_kd_imports_neither_torch_nor_numpy():
    code = "import kd, sys; assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_public_names_resolve_lazily_to_their_defining_modules():
    for name in kd.__all__:
        assert getattr(kd, name) is not None
        assert name in dir(kd)
    assert kd.LSPPLoss is kd.losses.modules.LSPPLoss and kd.ProxyTeacherLoss is kd.losses.modules.ProxyTeacherLoss
    assert kd.losses.LSPPLoss is kd.LSPPLoss and kd.losses.ProxyTeacherLoss is kd.ProxyTeacherLoss
    assert issubclass(kd.CMatrixError, kd.KDError)
    assert "lspp" in kd.REGISTRY and "proxy" in kd.REGISTRY
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kd.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kd.losses.nope  # noqa: B018


# ---------------------------------------------------------------------------------------------
# Independent float64 references (the paper's eq. 3 and section 3.2, by its words)


def reference_targets(targets: torch.Tensor, c: torch.Tensor, alpha: float) -> torch.Tensor:
    """(1-a) s + a s @ C, where s is onehot(y) for class indices (so s @ C = C[y])."""
    soft = torch.eye(c.shape[0], dtype=c.dtype)[targets] if targets.dim() == 1 else targets.double()
    return (1 - alpha) * soft + alpha * soft @ c


def reference_lspp(net_logits: torch.Tensor, targets: torch.Tensor, c_logits: torch.Tensor, alpha: float, c_loss: str) -> torch.Tensor:
    """The LS++ loss in float64 autograd: H(t, p) and H(p, t) with the gradient routing of `c_loss`."""
    t = reference_targets(targets, reference_cmatrix(c_logits), alpha)
    log_p = torch.log_softmax(net_logits, dim=1)
    if c_loss == "detached":  # the network learns from H(t, p) only, C from H(p, t) only
        return -(t.detach() * log_p).sum(1).mean() - (log_p.detach().exp() * t.log()).sum(1).mean()
    loss = -(t * log_p).sum(1).mean()
    if c_loss == "sce":
        loss = loss - (log_p.exp() * t.log()).sum(1).mean()
    return loss


def make_batch(seed: int, soft: bool) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, K, generator=generator) * 3
    if soft:  # label distributions with full support, as Mixup/CutMix would give
        return logits, torch.softmax(torch.randn(N, K, generator=generator) * 2, dim=1)
    return logits, torch.randint(0, K, (N,), generator=generator)


def random_cmatrix(seed: int, alpha: float = 0.2) -> CMatrix:
    c_logits = torch.randn(K, K - 1, generator=torch.Generator().manual_seed(seed)) * 2
    return CMatrix.from_logits(c_logits, class_names=NAMES, alpha=alpha, source="lspp", dataset="toy")


# ---------------------------------------------------------------------------------------------
# LSPPLoss


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("c_loss", ["detached", "ce", "sce"])
def test_lspp_loss_value_and_gradients_match_float64_reference(soft, c_loss):
    logits, targets = make_batch(1, soft)
    criterion = LSPPLoss(K, alpha=0.3, c_loss=c_loss)
    with torch.no_grad():
        criterion.c_logits.copy_(torch.randn(K, K - 1, generator=torch.Generator().manual_seed(2)) * 2)
    net_logits = logits.clone().requires_grad_()
    loss = criterion(net_logits, targets)
    loss.backward()

    ref_net = logits.double().requires_grad_()
    ref_c = criterion.c_logits.detach().double().requires_grad_()
    expected = reference_lspp(ref_net, targets, ref_c, 0.3, c_loss)
    expected.backward()
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    np.testing.assert_allclose(net_logits.grad.numpy(), ref_net.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(criterion.c_logits.grad.numpy(), ref_c.grad.numpy(), atol=1e-6)
    if c_loss == "detached":  # the network's gradient is soft-target CE's, (p - t) / N
        t = reference_targets(targets, reference_cmatrix(ref_c.detach()), 0.3)
        np.testing.assert_allclose(net_logits.grad.numpy(), ((torch.softmax(ref_net.detach(), 1) - t) / N).numpy(), atol=1e-6)
    np.testing.assert_allclose(
        criterion.targets(targets).detach().numpy(), reference_targets(targets, reference_cmatrix(ref_c.detach()), 0.3).numpy(), atol=1e-6
    )


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_lspp_loss_equals_the_toolkits_lspp_method(soft):
    logits, targets = make_batch(3, soft)
    criterion = LSPPLoss(K, alpha=0.2)
    method = build_method("lspp", K, alpha=0.2)
    c_logits = torch.randn(K, K - 1, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        criterion.c_logits.copy_(c_logits)
        method.logits.copy_(c_logits)
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    criterion(ours, targets).backward()
    expected = method(theirs, targets, CONTEXT)["loss"]
    expected.backward()
    assert torch.equal(criterion(logits, targets), expected.detach())
    assert torch.equal(ours.grad, theirs.grad) and torch.equal(criterion.c_logits.grad, method.logits.grad)


def test_lspp_loss_parameters_are_the_c_logits_initialised_to_uniform_rows():
    criterion = LSPPLoss(K)
    assert criterion.alpha == pytest.approx(0.1) and criterion.c_loss == "detached"
    assert [p is criterion.c_logits for p in criterion.parameters()] == [True]
    assert criterion.no_weight_decay() == {name for name, _ in criterion.named_parameters()}
    probs = criterion.to_cmatrix().probs
    off_diagonal = ~torch.eye(K, dtype=torch.bool)
    assert torch.all(probs.diagonal() == 0)
    torch.testing.assert_close(probs[off_diagonal], torch.full((K * (K - 1),), 1 / (K - 1)))


def test_export_round_trips_through_load_cmatrix(tmp_path):
    criterion = LSPPLoss(K, alpha=0.15, class_names=NAMES)
    with torch.no_grad():
        criterion.c_logits.copy_(torch.randn(K, K - 1, generator=torch.Generator().manual_seed(5)))
    path = criterion.export(tmp_path / "teacher.safetensors", dataset="toy", model="mlp", top1=0.875)
    assert path == tmp_path / "teacher.safetensors"
    loaded = load_cmatrix(path, expected_class_names=NAMES)
    current = criterion.to_cmatrix()
    assert loaded.source == "lspp" and loaded.class_names == NAMES and loaded.alpha == pytest.approx(0.15)
    assert (loaded.dataset, loaded.teacher_model, loaded.teacher_top1) == ("toy", "mlp", pytest.approx(0.875))
    assert torch.equal(loaded.probs, current.probs) and torch.equal(loaded.logits, criterion.c_logits.detach())
    np.testing.assert_allclose(loaded.probs.numpy(), reference_cmatrix(criterion.c_logits.detach().double()).numpy(), atol=1e-6)
    assert criterion.export(tmp_path) == tmp_path / "cmatrix.safetensors"  # a directory gets the standard file name
    assert "c_loss" not in loaded.extra
    assert load_cmatrix(LSPPLoss(K, c_loss="sce").export(tmp_path)).extra["c_loss"] == "sce"


# ---------------------------------------------------------------------------------------------
# ProxyTeacherLoss


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
@pytest.mark.parametrize("alpha", [None, 0.4])
def test_proxy_teacher_loss_value_and_gradient_match_float64_reference(soft, alpha):
    cmatrix = random_cmatrix(6, alpha=0.2)
    criterion = ProxyTeacherLoss(cmatrix, alpha=alpha)
    a = 0.2 if alpha is None else alpha
    assert criterion.alpha == pytest.approx(a)
    logits, targets = make_batch(7, soft)
    net_logits = logits.clone().requires_grad_()
    loss = criterion(net_logits, targets)
    loss.backward()

    ref_net = logits.double().requires_grad_()
    t = reference_targets(targets, reference_cmatrix(cmatrix.logits.double()), a)
    expected = -(t * torch.log_softmax(ref_net, dim=1)).sum(1).mean()
    expected.backward()
    assert loss.dim() == 0 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    np.testing.assert_allclose(net_logits.grad.numpy(), ref_net.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(criterion.targets(targets).numpy(), t.numpy(), atol=1e-6)
    assert list(criterion.parameters()) == []


@pytest.mark.parametrize("soft", [False, True], ids=["hard", "soft"])
def test_proxy_teacher_loss_equals_the_toolkits_proxy_method_from_a_file_or_a_cmatrix(tmp_path, soft):
    cmatrix = random_cmatrix(8)
    path = tmp_path / "cmatrix.safetensors"
    kd.save_cmatrix(path, cmatrix)
    method = build_method("proxy", K, NAMES, cmatrix=cmatrix)
    logits, targets = make_batch(9, soft)
    expected = method(logits, targets, CONTEXT)["loss"]
    from_file = ProxyTeacherLoss(str(path), class_names=NAMES)
    assert from_file.cmatrix.dataset == "toy" and from_file.class_names == NAMES
    for criterion in (from_file, ProxyTeacherLoss(path), ProxyTeacherLoss(cmatrix)):
        assert torch.equal(criterion(logits, targets), expected)


def test_proxy_teacher_loss_trains_from_an_exported_lspp_matrix(tmp_path):
    teacher = LSPPLoss(K, class_names=NAMES)
    with torch.no_grad():
        teacher.c_logits.copy_(torch.randn(K, K - 1, generator=torch.Generator().manual_seed(10)))
    student = ProxyTeacherLoss(teacher.export(tmp_path), class_names=NAMES)
    labels = torch.arange(K)
    torch.testing.assert_close(student.targets(labels), teacher.targets(labels).detach())


def test_proxy_teacher_loss_remaps_classes_by_name_when_asked():
    cmatrix = random_cmatrix(11)
    order = NAMES[::-1]
    with pytest.raises(CMatrixError, match="different order.*remap"):
        ProxyTeacherLoss(cmatrix, class_names=order)
    remapped = ProxyTeacherLoss(cmatrix, class_names=order, remap_by_name=True)
    assert remapped.class_names == order
    torch.testing.assert_close(remapped.cmatrix.probs, cmatrix.probs.flip(0).flip(1))


# ---------------------------------------------------------------------------------------------
# Bad input: one-line KDErrors


def raised(error_type: type[Exception], call) -> Exception:
    """The exception of type `error_type` that `call()` raises (the test fails if it raises none)."""
    with pytest.raises(error_type) as info:
        call()
    return info.value


def test_wrong_class_counts_are_one_line_errors(tmp_path):
    cmatrix = random_cmatrix(12)
    path = tmp_path / "cmatrix.safetensors"
    kd.save_cmatrix(path, cmatrix)
    assert_one_line_kderror(raised(CMatrixError, lambda: ProxyTeacherLoss(path, class_names=NAMES[:5])), str(path), "6 classes", "has 5")
    assert_one_line_kderror(raised(KDError, lambda: ProxyTeacherLoss(cmatrix)(torch.zeros(N, 10), torch.zeros(N, dtype=torch.long))), "10 classes", "has 6")
    assert_one_line_kderror(raised(KDError, lambda: LSPPLoss(K)(torch.zeros(N, 4), torch.zeros(N, dtype=torch.long))), "4 classes", "has 6")
    assert_one_line_kderror(raised(KDError, lambda: LSPPLoss(K, class_names=NAMES[:4])), "4 class names for 6 classes")


def test_other_bad_input_is_a_one_line_error(tmp_path):
    logits = torch.zeros(N, K)
    assert_one_line_kderror(raised(KDError, lambda: LSPPLoss(1)), "num_classes")
    assert_one_line_kderror(raised(KDError, lambda: LSPPLoss(K, alpha=0.0)), "LSPPLoss: alpha must be in (0, 1)")
    assert_one_line_kderror(raised(KDError, lambda: LSPPLoss(K, c_loss="mse")), "c_loss must be one of detached, ce, sce")
    assert_one_line_kderror(raised(KDError, lambda: LSPPLoss(K, class_names=("a",) * K)), "unique")
    assert_one_line_kderror(raised(KDError, lambda: LSPPLoss(K)(logits, torch.zeros(N - 1, dtype=torch.long))), "8 targets for 9 rows")
    assert_one_line_kderror(raised(KDError, lambda: LSPPLoss(K)(logits, torch.zeros(N))), "integer")
    assert_one_line_kderror(raised(KDError, lambda: LSPPLoss(K)(logits, torch.zeros(N, K + 1))), "label distributions (N, K)")
    assert_one_line_kderror(raised(KDError, lambda: ProxyTeacherLoss(random_cmatrix(13), alpha=1.0)), "ProxyTeacherLoss: alpha must be in [0, 1)")
    assert_one_line_kderror(raised(KDError, lambda: ProxyTeacherLoss(42)), "CMatrix or a file path")
    assert_one_line_kderror(raised(CMatrixError, lambda: ProxyTeacherLoss(tmp_path / "missing.safetensors")), "file not found")


def test_all_lists_exactly_the_lazy_exports():
    assert set(kd.__all__) == {"__version__", *kd._LAZY_EXPORTS}
