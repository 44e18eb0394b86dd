"""Methods as plug-ins: the registry contract, each method's loss against an independent float64
computation written here (not calling the method's code), gradient routing of the LS++
`--c-loss` variants, OLS's epoch mechanics and export, and every method end to end."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.cmatrix.artifact import CMatrix, load_cmatrix
from kd.errors import KDError
from kd.methods import (
    REGISTRY,
    EpochContext,
    StepContext,
    all_param_names,
    build_method,
    get_method,
    method_names,
    methods_markdown,
    resolve_params,
    stage_params,
)
from kd.training.run import DERIVED_RESUME_KEYS
from kd.training.settings import Settings, resume_keys
from tests.helpers import FAST, ROOT, assert_one_line_error, kd_in_process, read_run, reference_cmatrix

CONTEXT = StepContext(epoch=0, step=0, total_steps=10, steps_per_epoch=10)


def case(seed: int, n: int = 9, k: int = 6, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=generator) * scale, torch.randint(0, k, (n,), generator=generator)


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(x: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(x))


def loss_parts(name: str, logits: torch.Tensor, labels: torch.Tensor, **params) -> dict[str, float]:
    method = build_method(name, logits.shape[1], **params)
    return {part: value.item() for part, value in method(logits, labels, CONTEXT).items()}


# ----------------------------------------------------------------------------- the registry contract


def test_every_registered_method_declares_a_consistent_contract():
    run_fields = {f.name for f in dataclasses.fields(Settings)}
    for name in REGISTRY:
        cls = get_method(name)
        assert cls.name == name and cls.summary and set(cls.stages) <= {"teacher", "student"}
        assert cls.needs in (None, "teacher", "cmatrix")
        for param in cls.params:
            assert param.name not in run_fields, f"{name}.{param.name} would shadow a run flag"
            assert param.help and param.type in (float, int, str, bool)
            if param.default is not None:
                param.check(param.default)
    assert set(all_param_names()) <= set(resume_keys(Settings(), DERIVED_RESUME_KEYS))
    assert method_names("teacher") == ["onehot", "ls", "lspp", "ols", "tfkd", "zipf", "focal", "flsd", "mbls"]
    assert method_names("student", None) == ["onehot", "ls", "tfkd", "zipf", "focal", "flsd", "mbls"]
    assert [method for method, _ in stage_params("student")["temperature"]] == ["tfkd", "kd", "dkd", "dist"]
    assert stage_params("student")["temperature"][:2] == [("tfkd", get_method("tfkd").params[1]), ("kd", get_method("kd").params[0])]


def test_readme_method_table_is_the_registry():
    readme = (ROOT / "docs" / "methods.md").read_text()
    match = re.search(r"<!-- methods-table -->\n(.*?)<!-- /methods-table -->", readme, re.DOTALL)
    assert match, "docs/methods.md lacks the <!-- methods-table --> block"
    assert match.group(1) == methods_markdown(), "regenerate it with `kd methods --markdown`"


def test_parameters_resolve_to_defaults_and_are_checked():
    assert resolve_params(get_method("ls"), {"alpha": None}) == {"alpha": 0.1}
    assert resolve_params(get_method("kd"), {"temperature": 2.0, "alpha": None, "remap_by_name": False}) == {
        "temperature": 2.0, "kd_weight": 0.9, "ce_weight": 0.1, "logit_std": False}
    with pytest.raises(KDError, match="--temperature does not apply to --method lspp .*tfkd, kd, dkd, dist"):
        resolve_params(get_method("lspp"), {"temperature": 2.0})
    with pytest.raises(KDError, match=r"--alpha must be in \(0, 1\)"):
        resolve_params(get_method("lspp"), {"alpha": 0.0})
    with pytest.raises(KDError, match="--c-loss must be one of detached, ce, sce"):
        resolve_params(get_method("lspp"), {"c_loss": "mse"})
    with pytest.raises(KDError, match="must not both be 0"):
        resolve_params(get_method("kd"), {"kd_weight": 0.0, "ce_weight": 0.0})
    with pytest.raises(KDError, match="unknown --method 'nosuch'"):
        get_method("nosuch")


# ----------------------------------------------------------------------------- losses, independently


def test_onehot_and_label_smoothing():
    logits, labels = case(0)
    log_p, k = log_softmax(logits.double().numpy()), logits.shape[1]
    onehot = np.eye(k)[labels.numpy()]
    assert loss_parts("onehot", logits, labels)["loss"] == pytest.approx(-(onehot * log_p).sum(1).mean(), rel=1e-6)
    smoothed = 0.8 * onehot + 0.2 / k
    assert loss_parts("ls", logits, labels, alpha=0.2)["loss"] == pytest.approx(-(smoothed * log_p).sum(1).mean(), rel=1e-6)
    soft = torch.softmax(torch.randn(9, k, generator=torch.Generator().manual_seed(9)), dim=1)
    expected = -((0.8 * soft.double().numpy() + 0.2 / k) * log_p).sum(1).mean()
    assert loss_parts("ls", logits, soft, alpha=0.2)["loss"] == pytest.approx(expected, rel=1e-6)


def reference_lspp(net_logits: torch.Tensor, labels: torch.Tensor, c_logits: torch.Tensor, alpha: float):
    """t and log p in float64 autograd, C built by the paper's words (softmax rows, a 0 at the target)."""
    k = c_logits.shape[0]
    c = reference_cmatrix(c_logits)
    t = (1 - alpha) * torch.eye(k, dtype=c.dtype)[labels] + alpha * c[labels]
    return t, torch.log_softmax(net_logits, dim=1)


@pytest.mark.parametrize("c_loss", ["detached", "ce", "sce"])
def test_lspp_c_loss_variants_route_gradients_as_declared(c_loss):
    logits, labels = case(1)
    method = build_method("lspp", 6, alpha=0.3, c_loss=c_loss)
    with torch.no_grad():
        method.logits.copy_(torch.randn(6, 5, generator=torch.Generator().manual_seed(2)))
    net_logits = logits.clone().requires_grad_()
    parts = method(net_logits, labels, CONTEXT)
    parts["loss"].backward()

    ref_net = logits.double().requires_grad_()
    ref_c = method.logits.detach().double().requires_grad_()
    t, log_p = reference_lspp(ref_net, labels, ref_c, 0.3)
    if c_loss == "detached":  # each term reaches only its own side
        terms = {"network": -(t.detach() * log_p).sum(1).mean(), "cmatrix": -(log_p.detach().exp() * t.log()).sum(1).mean()}
    else:
        terms = {"ce": -(t * log_p).sum(1).mean()}
        if c_loss == "sce":
            terms["rce"] = -(log_p.exp() * t.log()).sum(1).mean()
    sum(terms.values()).backward()
    assert set(parts) == {"loss", *terms}
    for name, value in terms.items():
        assert parts[name].item() == pytest.approx(value.item(), rel=1e-5)
    np.testing.assert_allclose(net_logits.grad.numpy(), ref_net.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(method.logits.grad.numpy(), ref_c.grad.numpy(), atol=1e-6)
    if c_loss == "detached":  # the network's gradient is exactly soft-target CE with t held fixed
        np.testing.assert_allclose(net_logits.grad.numpy(), ((log_p.exp() - t) / len(labels)).detach().numpy(), atol=1e-6)


def test_tfkd_is_the_authors_code_formula():
    logits, labels = case(3, k=10)
    k, p, temperature, alpha, multiplier = 10, 0.99, 20.0, 0.1, 100.0
    z = logits.double().numpy()
    virtual = np.full((9, k), (1 - p) / (k - 1))
    virtual[np.arange(9), labels.numpy()] = p
    teacher = softmax(virtual / temperature)
    log_q = log_softmax(z)
    ce = -log_q[np.arange(9), labels.numpy()].mean()
    kl_elementwise_mean = (teacher * (np.log(teacher) - log_q)).mean()  # nn.KLDivLoss() default: mean over N*K
    parts = loss_parts("tfkd", logits, labels)
    assert teacher[0, labels[0]] == pytest.approx(0.10454, abs=1e-4)  # nearly uniform, as in their code
    assert parts["ce"] == pytest.approx(ce, rel=1e-6) and parts["kl"] == pytest.approx(kl_elementwise_mean, rel=1e-5)
    assert parts["loss"] == pytest.approx((1 - alpha) * ce + alpha * multiplier * kl_elementwise_mean, rel=1e-5)


def test_zipf_targets_follow_the_rank_of_the_own_prediction():
    logits, labels = case(4, k=7)
    z, y = logits.double().numpy(), labels.numpy()
    kl = []
    for row, label in zip(z, y):
        order = sorted(range(7), key=lambda j: -row[j])
        rank = {cls: position + 1 for position, cls in enumerate(order)}
        others = [j for j in range(7) if j != label]
        weights = np.array([rank[j] ** -1.0 for j in others])
        target = weights / weights.sum()
        log_q = row[others] - np.log(np.exp(row[others]).sum())
        kl.append((target * (np.log(target) - log_q)).sum())
    ce = -log_softmax(z)[np.arange(9), y].mean()
    parts = loss_parts("zipf", logits, labels)
    assert parts["kl"] == pytest.approx(np.mean(kl), rel=1e-5)
    assert parts["loss"] == pytest.approx(ce + 0.1 * np.mean(kl), rel=1e-5)
    logits.requires_grad_()
    build_method("zipf", 7)(logits, labels, CONTEXT)["loss"].backward()
    assert torch.isfinite(logits.grad).all()  # the label's -inf column gives no NaN


def test_focal_and_flsd53():
    logits, labels = case(5, n=40, scale=2.0)
    p_y = softmax(logits.double().numpy())[np.arange(40), labels.numpy()]
    focal = lambda gamma: (-(1 - p_y) ** gamma * np.log(p_y)).mean()
    assert loss_parts("focal", logits, labels)["loss"] == pytest.approx(focal(3.0), rel=1e-5)
    assert loss_parts("focal", logits, labels, gamma=0.0)["loss"] == pytest.approx(loss_parts("onehot", logits, labels)["loss"], rel=1e-6)
    assert (p_y < 0.2).any() and (p_y >= 0.2).any()
    gamma = np.where(p_y < 0.2, 5.0, 3.0)
    assert loss_parts("flsd", logits, labels)["loss"] == pytest.approx((-(1 - p_y) ** gamma * np.log(p_y)).mean(), rel=1e-5)


def test_mbls_penalises_logit_distances_beyond_the_margin():
    logits, labels = case(6, scale=8.0)
    z = logits.double().numpy()
    penalty = np.maximum(z.max(1, keepdims=True) - z - 10.0, 0).mean()  # mean over N*K, as in their code
    assert penalty > 0
    ce = -log_softmax(z)[np.arange(9), labels.numpy()].mean()
    parts = loss_parts("mbls", logits, labels)
    assert parts["margin"] == pytest.approx(penalty, rel=1e-5)
    assert parts["loss"] == pytest.approx(ce + 0.1 * penalty, rel=1e-5)


def test_proxy_and_kd_methods():
    logits, labels = case(7, k=4)
    c = torch.rand(4, 4, generator=torch.Generator().manual_seed(8)).fill_diagonal_(0)
    c = c / c.sum(1, keepdim=True)
    cmatrix = CMatrix.from_probs(c, class_names=list("abcd"), alpha=0.25)
    t = 0.75 * np.eye(4)[labels.numpy()] + 0.25 * c.double().numpy()[labels.numpy()]
    log_p = log_softmax(logits.double().numpy())
    assert loss_parts("proxy", logits, labels, cmatrix=cmatrix)["loss"] == pytest.approx(-(t * log_p).sum(1).mean(), rel=1e-6)

    teacher_net = torch.nn.Linear(3, 4)
    images = torch.randn(9, 3, generator=torch.Generator().manual_seed(9))
    method = build_method("kd", 4, teacher=teacher_net, temperature=2.0)
    parts = method(logits, labels, dataclasses.replace(CONTEXT, images=images))
    with torch.no_grad():
        teacher = softmax(teacher_net(images).double().numpy() / 2.0)
    kl = (teacher * (np.log(teacher) - log_softmax(logits.double().numpy() / 2.0))).sum(1).mean()
    ce = -log_p[np.arange(9), labels.numpy()].mean()
    assert parts["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert parts["loss"].item() == pytest.approx(0.1 * ce + 0.9 * 4.0 * kl, rel=1e-5)
    assert not any(p.requires_grad for p in method.teacher.parameters())


@pytest.mark.parametrize("name", ["ols", "tfkd", "zipf", "focal", "flsd", "mbls"])
def test_methods_without_a_soft_label_form_refuse_label_distributions(name):
    logits, _ = case(0)
    with pytest.raises(KDError, match=f"--method {name} takes class labels only"):
        build_method(name, 6)(logits, torch.full((9, 6), 1 / 6), CONTEXT)


# ----------------------------------------------------------------------------- OLS mechanics


def test_ols_accumulates_correct_samples_and_swaps_at_the_epoch_end():
    k = 4
    method = build_method("ols", k)
    batches = [case(seed, n=12, k=k, scale=2.0) for seed in (10, 11, 12)]
    sums, counts = np.zeros((k, k)), np.zeros(k)
    for logits, labels in batches:
        parts = method(logits, labels, CONTEXT)
        # First epoch: S is all zeros, so only the hard term counts (the authors' CIFAR code).
        ce = -log_softmax(logits.double().numpy())[np.arange(12), labels.numpy()].mean()
        assert parts["soft"].item() == 0 and parts["loss"].item() == pytest.approx(0.5 * ce, rel=1e-6)
        p = softmax(logits.double().numpy())
        for row, label in zip(p, labels.numpy()):
            if row.argmax() == label:
                sums[label] += row
                counts[label] += 1
    labels_all = torch.cat([labels for _, labels in batches])
    assert 0 < counts.sum() < len(labels_all)
    assert torch.equal(method.soft_labels, torch.zeros(k, k))  # nothing changes before the epoch ends
    missing = k - 1
    counts_without, sums_without = counts.copy(), sums.copy()
    method.counts[missing] = 0  # make one class have no correct sample in this epoch
    method.sums[missing] = 0
    counts_without[missing], sums_without[missing] = 0, 0
    method.on_epoch_end(EpochContext(epoch=0, step=3, total_steps=6))
    expected = np.where(counts_without[:, None] > 0, sums_without / np.maximum(counts_without, 1)[:, None], 1 / k)
    np.testing.assert_allclose(method.soft_labels.numpy(), expected, atol=1e-6)
    assert method.counts.sum() == 0 and method.sums.abs().sum() == 0

    logits, labels = batches[0]
    log_p = log_softmax(logits.double().numpy())
    soft = -(expected[labels.numpy()] * log_p).sum(1).mean()
    hard = -log_p[np.arange(12), labels.numpy()].mean()
    assert method(logits, labels, CONTEXT)["loss"].item() == pytest.approx(0.5 * hard + 0.5 * soft, rel=1e-5)


def test_ols_exports_its_matrix_without_the_diagonal(tmp_path):
    from kd.methods import ExportInfo

    method = build_method("ols", 3, class_names=("a", "b", "c"))
    method.soft_labels.copy_(torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.9, 0.0], [0.0, 0.0, 1.0]]))
    method.export(tmp_path, ExportInfo(class_names=("a", "b", "c"), dataset="toy", model="m", test_top1=0.5))
    cm = load_cmatrix(tmp_path / "cmatrix.safetensors")
    assert cm.source == "ols"
    torch.testing.assert_close(cm.probs, torch.tensor([[0.0, 0.75, 0.25], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]))
    # alpha: the mean non-target mass of OLS's own targets, 0.5 * (1 - S[y, y]) averaged over classes
    assert cm.alpha == pytest.approx(0.5 * (0.2 + 0.1 + 0.0) / 3)


# ----------------------------------------------------------------------------- end to end


TEACHER_PARTS = {
    "onehot": {"loss"}, "ls": {"loss"}, "lspp": {"loss", "network", "cmatrix"}, "ols": {"loss", "hard", "soft"},
    "tfkd": {"loss", "ce", "kl"}, "zipf": {"loss", "ce", "kl"}, "focal": {"loss"}, "flsd": {"loss"},
    "mbls": {"loss", "ce", "margin"},
}


def test_every_teacher_method_trains_on_digits_through_the_cli(tmp_path):
    assert set(TEACHER_PARTS) == set(method_names("teacher"))
    epochs = ["--epochs", "2", "--max-steps", "6", "--batch-size", "32"]  # two epoch ends: OLS swaps its matrix
    for name, parts in TEACHER_PARTS.items():
        out = tmp_path / name
        result = kd_in_process("train-teacher", "--method", name, "--out", str(out), *epochs)
        assert result.returncode == 0, (name, result.stderr)
        config, metrics = read_run(out)
        assert config["method"] == metrics["method"] == name
        assert set(metrics["epoch_loss_parts"]) == parts
        assert all(len(values) == metrics["epochs"] for values in metrics["epoch_loss_parts"].values())
        assert metrics["epoch_loss_parts"]["loss"] == metrics["epoch_train_loss"]
        for param in get_method(name).params:
            assert config[param.name] == param.default
        assert (out / "cmatrix.safetensors").exists() == get_method(name).exports_cmatrix


@pytest.mark.parametrize("c_loss", ["ce", "sce"])
def test_lspp_c_loss_flag_records_the_variant_in_config_and_cmatrix(tmp_path, c_loss):
    out = tmp_path / c_loss
    result = kd_in_process("train-teacher", "--c-loss", c_loss, "--out", str(out), *FAST)
    assert result.returncode == 0, result.stderr
    config, metrics = read_run(out)
    assert config["c_loss"] == c_loss and set(metrics["epoch_loss_parts"]) == ({"loss", "ce"} | ({"rce"} if c_loss == "sce" else set()))
    assert load_cmatrix(out / "cmatrix.safetensors").extra["c_loss"] == c_loss


def test_ols_teacher_cmatrix_serves_as_a_proxy(tmp_path):
    teacher = tmp_path / "ols"
    assert kd_in_process("train-teacher", "--method", "ols", "--epochs", "2", "--out", str(teacher)).returncode == 0
    cm = load_cmatrix(teacher / "cmatrix.safetensors")
    assert cm.source == "ols" and torch.all(cm.probs.diagonal() == 0) and 0 < cm.alpha < 0.5
    student = tmp_path / "student"
    result = kd_in_process("distill", "--proxy", str(teacher / "cmatrix.safetensors"), "--model", "tiny_cnn", "--out", str(student), *FAST)
    assert result.returncode == 0, result.stderr
    config, _ = read_run(student)
    assert config["method"] == "proxy" and config["alpha"] == pytest.approx(cm.alpha) and "ols" in config["target_source"]


def test_plain_students_take_every_label_method(tmp_path):
    for name in method_names("student", None):
        result = kd_in_process("distill", "--method", name, "--model", "tiny_cnn", "--out", str(tmp_path / name), *FAST)
        assert result.returncode == 0, (name, result.stderr)
        config, _ = read_run(tmp_path / name)
        assert config["method"] == name and config["mode"] == "plain"


def test_method_flag_errors_are_one_line(tmp_path):
    out = str(tmp_path / "run")
    assert_one_line_error(kd_in_process("train-teacher", "--method", "lspp", "--temperature", "2", "--out", out, *FAST), "--temperature", "lspp")
    assert_one_line_error(kd_in_process("train-teacher", "--alpha", "0", "--out", out, *FAST), "--alpha", "(0, 1)")
    assert_one_line_error(kd_in_process("train-teacher", "--method", "ols", "--ce-weight", "0", "--soft-weight", "0", "--out", out, *FAST), "both be 0")
    assert_one_line_error(kd_in_process("train-teacher", "--method", "kd", "--out", out, *FAST), "--method")
    assert_one_line_error(kd_in_process("distill", "--method", "kd", "--out", out, *FAST), "--method kd needs --teacher RUN_DIR")
    assert_one_line_error(kd_in_process("distill", "--method", "lspp", "--out", out, *FAST), "--method")
    assert not Path(out).exists()


@pytest.mark.slow
def test_every_method_runs_a_few_steps_on_the_cifar10_copy(tmp_path, cifar10_subset):
    data = ["--dataset", "imagefolder", "--data-dir", str(cifar10_subset), "--epochs", "1", "--max-steps", "2", "--batch-size", "32"]
    for name in method_names("teacher"):
        result = kd_in_process("train-teacher", "--method", name, "--model", "tiny_cnn", "--out", str(tmp_path / name), *data)
        assert result.returncode == 0, (name, result.stderr)
    cmatrix = tmp_path / "lspp" / "cmatrix.safetensors"
    for args in (["--proxy", str(cmatrix)], ["--teacher", str(tmp_path / "onehot")]):
        result = kd_in_process("distill", *args, "--model", "tiny_cnn", "--out", str(tmp_path / f"student-{args[0][2:]}"), *data)
        assert result.returncode == 0, (args, result.stderr)
    _, metrics = read_run(tmp_path / "student-teacher")
    assert set(metrics["epoch_loss_parts"]) == {"loss", "ce", "kl"} and metrics["teacher_forward_share"] is not None
