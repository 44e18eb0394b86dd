"""DKD, DIST and logit standardisation (`kd --logit-std`, `dkd --logit-std`).

Each loss and its gradient with respect to the student's logits is checked against a float64
computation written here from the papers' and the authors' code's definitions, with plain loops
over samples and classes (never the product's functions); then DKD's warm-up, its refusal of
label distributions, extreme logits, and the registry and command line.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kd.errors import KDError
from kd.losses import standardize_logits
from kd.methods import StepContext, build_method, get_method, methods_markdown, resolve_params
from tests.helpers import FAST, assert_one_line_error, kd_in_process, read_run


class FixedTeacher(nn.Module):
    """A teacher "network" that answers every batch with the given logits."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


def context(n: int, epoch: int = 0) -> StepContext:
    return StepContext(epoch=epoch, step=0, total_steps=100, steps_per_epoch=10, images=torch.zeros(n, 1))


def case(seed: int, n: int, k: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student logits, teacher logits, labels)."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(n, k, generator=generator) * scale
    teacher = torch.randn(n, k, generator=generator) * scale
    return student, teacher, torch.randint(0, k, (n,), generator=generator)


def run_method(name: str, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, epoch: int = 0,
               **params) -> tuple[dict[str, float], torch.Tensor]:
    """The method's loss parts and the (float32) gradient of its loss with respect to the student logits."""
    method = build_method(name, student.shape[1], teacher=FixedTeacher(teacher), **params)
    logits = student.clone().requires_grad_()
    parts = method(logits, targets, context(len(student), epoch))
    parts["loss"].backward()
    return {part: value.item() for part, value in parts.items()}, logits.grad


def reference(formula, student: torch.Tensor, *args, backward: bool = True) -> tuple[dict[str, float], torch.Tensor | None]:
    """A reference formula's parts and its float64 autograd gradient with respect to the student logits."""
    logits = student.double().requires_grad_()
    parts = formula(logits, *args)
    if backward:
        parts["loss"].backward()
    return {part: value.item() for part, value in parts.items()}, logits.grad


def assert_parts_close(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == set(want)
    for part, value in want.items():
        assert got[part] == pytest.approx(value, rel=1e-5, abs=1e-6), part  # abs: float32 rounding of O(1) terms


def assert_gradient_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """The float32 gradient within `rel` of the float64 one, relative to its largest entry."""
    assert torch.isfinite(got).all()
    error = (got.double() - want).abs().max().item()
    assert error <= rel * want.abs().max().item() + 1e-10, error


# ----------------------------------------------------------------------------- float64 references, by the definitions


def ref_softmax(row: torch.Tensor) -> torch.Tensor:
    exp = (row - row.max()).exp()
    return exp / exp.sum()


def ref_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_j p_j log(p_j / q_j) over the j with p_j > 0."""
    return sum(p[j] * (p[j].log() - q[j].log()) for j in range(len(p)) if p[j] > 0)


def ref_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p_y (or -sum_j t_j log p_j for a label distribution t), averaged over the samples."""
    total = 0
    for i in range(len(logits)):
        p = ref_softmax(logits[i])
        if targets.dim() == 1:
            total = total - p[targets[i]].log()
        else:
            total = total - sum(targets[i, j].double() * p[j].log() for j in range(len(p)))
    return total / len(logits)


def ref_standardize(logits: torch.Tensor) -> torch.Tensor:
    """Each row (z - mean) / (1e-7 + std), std with Bessel's correction (sum of squares / (K - 1))."""
    k = logits.shape[1]
    rows = []
    for row in logits:
        mean = row.sum() / k
        std = (((row - mean) ** 2).sum() / (k - 1)).sqrt()
        rows.append((row - mean) / (1e-7 + std))
    return torch.stack(rows)


def ref_dkd(student, teacher, labels, temperature, alpha, beta, ce_weight, warm, logit_std):
    ce = ref_cross_entropy(student, labels)
    teacher = teacher.double()
    if logit_std:
        student, teacher = ref_standardize(student), ref_standardize(teacher)
    n, k = student.shape
    tckd = nckd = 0
    for i in range(n):
        y = int(labels[i])
        p_s, p_t = ref_softmax(student[i] / temperature), ref_softmax(teacher[i] / temperature)
        tckd = tckd + ref_kl(torch.stack([p_t[y], 1 - p_t[y]]), torch.stack([p_s[y], 1 - p_s[y]]))
        others = [j for j in range(k) if j != y]  # softmax over the non-target classes only
        nckd = nckd + ref_kl(ref_softmax(teacher[i, others] / temperature), ref_softmax(student[i, others] / temperature))
    tckd, nckd = temperature**2 * tckd / n, temperature**2 * nckd / n
    return {"loss": ce_weight * ce + warm * (alpha * tckd + beta * nckd), "ce": ce, "tckd": tckd, "nckd": nckd}


def ref_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a - a.mean(), b - b.mean()
    return (a * b).sum() / ((a * a).sum().sqrt() * (b * b).sum().sqrt() + 1e-8)


def ref_dist(student, teacher, targets, temperature, beta, gamma, ce_weight):
    n, k = student.shape
    y_s = torch.stack([ref_softmax(student[i] / temperature) for i in range(n)])
    y_t = torch.stack([ref_softmax(teacher[i].double() / temperature) for i in range(n)])
    inter = 1 - sum(ref_pearson(y_s[i], y_t[i]) for i in range(n)) / n
    intra = 1 - sum(ref_pearson(y_s[:, c], y_t[:, c]) for c in range(k)) / k
    ce = ref_cross_entropy(student, targets)
    kd = beta * inter + (gamma * intra if gamma else 0)  # gamma 0: leave intra's graph out (a batch of one: sqrt'(0))
    return {"loss": ce_weight * ce + temperature**2 * kd, "ce": ce, "inter": inter, "intra": intra}


def ref_standardized_kd(student, teacher, labels, temperature, kd_weight, ce_weight):
    ce = ref_cross_entropy(student, labels)
    student, teacher = ref_standardize(student), ref_standardize(teacher.double())
    kl = sum(ref_kl(ref_softmax(teacher[i] / temperature), ref_softmax(student[i] / temperature)) for i in range(len(student)))
    kl = kl / len(student)
    return {"loss": ce_weight * ce + kd_weight * temperature**2 * kl, "ce": ce, "kl": kl}


# ----------------------------------------------------------------------------- logit standardisation


@pytest.mark.parametrize("k", [2, 5, 100])
def test_standardize_logits_is_the_z_score_with_the_unbiased_std(k):
    logits, _, _ = case(0, 6, k)
    want = ref_standardize(logits.double())
    torch.testing.assert_close(standardize_logits(logits).double(), want, rtol=1e-5, atol=1e-5)
    population = (logits.double() - logits.double().mean(1, keepdim=True)) / logits.double().std(1, unbiased=False, keepdim=True)
    assert not torch.allclose(population, want, atol=1e-3)  # the test tells the two stds apart


@pytest.mark.parametrize("k", [2, 5, 100])
@pytest.mark.parametrize("n", [1, 7])
def test_kd_with_logit_standardisation(k, n):
    student, teacher, labels = case(10 + k + n, n, k)
    got, grad = run_method("kd", student, teacher, labels, temperature=2.0, kd_weight=9.0, ce_weight=0.1, logit_std=True)
    want, want_grad = reference(ref_standardized_kd, student, teacher, labels, 2.0, 9.0, 0.1)
    assert_parts_close(got, want)
    assert_gradient_close(grad, want_grad)


# ----------------------------------------------------------------------------- DKD


@pytest.mark.parametrize("logit_std", [False, True])
@pytest.mark.parametrize("k", [2, 5, 100])
@pytest.mark.parametrize("n", [1, 7])
def test_dkd_loss_and_gradient(k, n, logit_std):
    student, teacher, labels = case(20 + k + n, n, k)
    params = dict(temperature=3.0, tckd_weight=1.5, nckd_weight=6.0, ce_weight=0.7, warmup_epochs=0)
    got, grad = run_method("dkd", student, teacher, labels, logit_std=logit_std, **params)
    want, want_grad = reference(ref_dkd, student, teacher, labels, 3.0, 1.5, 6.0, 0.7, 1.0, logit_std)
    assert_parts_close(got, want)
    assert_gradient_close(grad, want_grad)
    if k == 2:  # one non-target class: nothing to distribute among them
        assert got["nckd"] == 0.0


def test_dkd_defaults_are_the_authors_cifar100_values():
    student, teacher, labels = case(3, 8, 10)
    got, grad = run_method("dkd", student, teacher, labels, epoch=30)
    want, want_grad = reference(ref_dkd, student, teacher, labels, 4.0, 1.0, 8.0, 1.0, 1.0, False)
    assert_parts_close(got, want)
    assert_gradient_close(grad, want_grad)
    assert resolve_params(get_method("dkd"), {}) == {
        "temperature": 4.0, "ce_weight": 1.0, "tckd_weight": 1.0, "nckd_weight": 8.0, "warmup_epochs": 20, "logit_std": False}


@pytest.mark.parametrize(("epoch", "warm"), [(0, 0.05), (9, 0.5), (19, 1.0), (25, 1.0)])
def test_dkd_warms_up_over_20_epochs_counted_from_1(epoch, warm):
    student, teacher, labels = case(4, 6, 5)
    got, _ = run_method("dkd", student, teacher, labels, epoch=epoch)
    assert got["loss"] - got["ce"] == pytest.approx(warm * (got["tckd"] + 8.0 * got["nckd"]), rel=1e-5)
    want, _ = reference(ref_dkd, student, teacher, labels, 4.0, 1.0, 8.0, 1.0, warm, False, backward=False)
    assert_parts_close(got, want)


def test_dkd_without_warmup_takes_the_full_weight_at_once():
    student, teacher, labels = case(5, 6, 5)
    got, _ = run_method("dkd", student, teacher, labels, epoch=0, warmup_epochs=0)
    assert got["loss"] - got["ce"] == pytest.approx(got["tckd"] + 8.0 * got["nckd"], rel=1e-5)


def test_dkd_refuses_label_distributions_before_running_the_teacher():
    student, teacher, _ = case(6, 4, 5)
    method = build_method("dkd", 5, teacher=FixedTeacher(teacher))
    with pytest.raises(KDError, match="--method dkd takes class labels only") as error:
        method(student, torch.full((4, 5), 0.2), context(4))
    assert "\n" not in str(error.value) and method.calls == 0
    assert get_method("dkd").soft_targets is False and get_method("dist").soft_targets is True


@pytest.mark.parametrize("logit_std", [False, True])
@pytest.mark.parametrize("k", [5, 100])
def test_dkd_extreme_logits_give_a_finite_loss_and_gradient(k, logit_std):
    student, teacher, labels = case(7, 4, k)
    sure_teacher = teacher.clone()
    sure_teacher[torch.arange(4), labels] = 1e4  # p_target = 1 exactly in float32 (and float64)
    got, grad = run_method("dkd", student, sure_teacher, labels, warmup_epochs=0, logit_std=logit_std)
    assert all(math.isfinite(value) for value in got.values()) and torch.isfinite(grad).all()
    if not logit_std:  # the teacher's 1 - p_target = 0: TCKD is T^2 * -log p_target(student), NCKD as usual
        want, want_grad = reference(ref_dkd, student, sure_teacher, labels, 4.0, 1.0, 8.0, 1.0, 1.0, False)
        assert_parts_close(got, want)
        assert_gradient_close(grad, want_grad)
    for value in (1e4, -1e4):  # the student certain of the target, or of another class
        wild = student.clone()
        wild[torch.arange(4), (labels + 1) % k] = value
        got, grad = run_method("dkd", wild, sure_teacher, labels, warmup_epochs=0, logit_std=logit_std)
        assert all(math.isfinite(v) for v in got.values()) and torch.isfinite(grad).all()


# ----------------------------------------------------------------------------- DIST


@pytest.mark.parametrize("k", [2, 5, 100])
@pytest.mark.parametrize("n", [3, 8])
def test_dist_loss_and_gradient(k, n):
    student, teacher, labels = case(30 + k + n, n, k)
    params = dict(temperature=3.0, inter_weight=1.5, intra_weight=2.5, ce_weight=0.7)
    got, grad = run_method("dist", student, teacher, labels, **params)
    want, want_grad = reference(ref_dist, student, teacher, labels, 3.0, 1.5, 2.5, 0.7)
    assert_parts_close(got, want)
    assert_gradient_close(grad, want_grad)


def test_dist_defaults_and_label_distributions():
    student, teacher, _ = case(8, 8, 10)
    soft = torch.softmax(torch.randn(8, 10, generator=torch.Generator().manual_seed(9)), dim=1)
    got, grad = run_method("dist", student, teacher, soft)
    want, want_grad = reference(ref_dist, student, teacher, soft, 4.0, 2.0, 2.0, 1.0)
    assert_parts_close(got, want)
    assert_gradient_close(grad, want_grad)
    assert resolve_params(get_method("dist"), {}) == {"temperature": 4.0, "ce_weight": 1.0, "inter_weight": 2.0, "intra_weight": 2.0}


@pytest.mark.parametrize("k", [2, 5, 100])
def test_dist_with_a_batch_of_one(k):
    """Each class's column holds one sample: centred it is 0, its correlation 0, so intra = 1, constant."""
    student, teacher, labels = case(40 + k, 1, k)
    got, grad = run_method("dist", student, teacher, labels)
    assert got["intra"] == 1.0 and all(math.isfinite(value) for value in got.values())
    want, _ = reference(ref_dist, student, teacher, labels, 4.0, 2.0, 2.0, 1.0, backward=False)
    assert_parts_close(got, want)
    _, want_grad = reference(ref_dist, student, teacher, labels, 4.0, 2.0, 0.0, 1.0)  # intra adds no gradient
    # Two classes: a centred row is (d, -d), and this teacher's d is a near-tie (8e-4) whose float32
    # rounding the eps of pearson's denominator amplifies; the tolerance is the float32 floor there.
    assert_gradient_close(grad, want_grad, rel=1e-4 if k == 2 else 1e-5)


# ----------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("name", ["dkd", "dist"])
def test_losses_are_float32_under_autocast(name):
    student, teacher, labels = case(11, 4, 10)
    method = build_method(name, 10, teacher=FixedTeacher(teacher.bfloat16()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = method(student.bfloat16(), labels, context(4, epoch=30))
    assert all(value.dtype == torch.float32 for value in parts.values())
    want, _ = run_method(name, student.bfloat16().float(), teacher.bfloat16().float(), labels, epoch=30)
    assert parts["loss"].item() == pytest.approx(want["loss"], rel=1e-5)


# ----------------------------------------------------------------------------- registry and command line


def test_registry_lists_dkd_and_dist_and_checks_their_parameters():
    listing = kd_in_process("methods")
    assert listing.returncode == 0, listing.stderr
    names = [line.split()[0] for line in listing.stdout.splitlines() if line and not line.startswith(" ")]
    assert names[names.index("kd"):][:3] == ["kd", "dkd", "dist"]
    assert kd_in_process("methods", "--markdown").stdout == methods_markdown()
    # A parameter shared with kd (which defaults ce_weight to 0.1) keeps each method's own default.
    given = {"temperature": None, "ce_weight": None, "kd_weight": None, "logit_std": False}
    assert resolve_params(get_method("dkd"), given)["ce_weight"] == 1.0
    assert resolve_params(get_method("dist"), given)["ce_weight"] == 1.0
    assert resolve_params(get_method("kd"), given)["ce_weight"] == 0.1
    with pytest.raises(KDError, match="--ce-weight, --tckd-weight and --nckd-weight must not all be 0"):
        resolve_params(get_method("dkd"), {"ce_weight": 0.0, "tckd_weight": 0.0, "nckd_weight": 0.0})
    with pytest.raises(KDError, match="--ce-weight, --inter-weight and --intra-weight must not all be 0"):
        resolve_params(get_method("dist"), {"ce_weight": 0.0, "inter_weight": 0.0, "intra_weight": 0.0})
    with pytest.raises(KDError, match="--warmup-epochs must be >= 0"):
        resolve_params(get_method("dkd"), {"warmup_epochs": -1})
    with pytest.raises(KDError, match="--logit-std does not apply to --method dist .*kd, dkd"):
        resolve_params(get_method("dist"), {"logit_std": True})


def test_dkd_and_dist_distill_through_the_cli_with_their_own_defaults(tmp_path, digits_teacher):
    teacher = ["--teacher", str(digits_teacher), "--model", "tiny_cnn"]
    runs = {  # dist on mixup's label distributions, with a flag shared with kd and dkd given
        "dkd": ([], {"loss", "ce", "tckd", "nckd"}),
        "dist": (["--temperature", "2", "--augment", "mixup"], {"loss", "ce", "inter", "intra"}),
    }
    for name, (flags, parts) in runs.items():
        out = tmp_path / name
        result = kd_in_process("distill", "--method", name, *teacher, "--out", str(out), *flags, *FAST)
        assert result.returncode == 0, (name, result.stderr)
        config, metrics = read_run(out)
        assert config["method"] == name and set(metrics["epoch_loss_parts"]) == parts
        assert config["ce_weight"] == 1.0 and config["temperature"] == (2.0 if flags else 4.0)  # not kd's 0.1 and 4
    refused = tmp_path / "dkd-mixup"
    assert_one_line_error(kd_in_process("distill", "--method", "dkd", *teacher, "--augment", "mixup", "--out", str(refused), *FAST),
                          "dkd", "mixup")
    assert not refused.exists()
