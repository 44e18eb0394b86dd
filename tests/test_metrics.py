"""Tests for kd.reports.metrics against an independent NumPy implementation and worked examples."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.errors import KDError
from kd.reports.metrics import classification_metrics, expected_calibration_error


def numpy_reference(logits: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, float]:
    """Straightforward float64 NumPy version, with Guo et al.'s loop over (lower, upper] bins."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    probs = np.exp(log_probs)
    confidences = probs.max(axis=1)
    predictions = probs.argmax(axis=1)
    accuracies = (predictions == labels).astype(np.float64)
    n = len(labels)
    ece = 0.0
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = (confidences > lower) & (confidences <= upper)
        if in_bin.any():
            weight = in_bin.sum() / n
            ece += weight * abs(accuracies[in_bin].mean() - confidences[in_bin].mean())
    return {
        "top1": accuracies.mean(),
        "nll": -log_probs[np.arange(n), labels].mean(),
        "ece": ece,
        "mean_confidence": confidences.mean(),
    }


@pytest.mark.parametrize("n_bins", [1, 10, 15])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_matches_numpy_reference(seed, n_bins):
    rng = np.random.default_rng(seed)
    n, k = 500, int(rng.integers(2, 12))
    labels = rng.integers(0, k, size=n)
    # Mix of scales so confidences spread over many bins; bias towards the label so accuracy
    # is neither 0 nor 1.
    logits = rng.normal(size=(n, k)) * rng.uniform(0.1, 6.0, size=(n, 1))
    logits[np.arange(n), labels] += rng.uniform(0.0, 3.0, size=n)
    logits32 = torch.tensor(logits, dtype=torch.float32)
    got = classification_metrics(logits32, torch.tensor(labels), n_bins)
    # float32 input is converted exactly to float64, so the reference sees the same numbers.
    want = numpy_reference(logits.astype(np.float32), labels, n_bins)
    assert set(got) == {"top1", "nll", "ece", "mean_confidence"}
    for key, value in got.items():
        assert isinstance(value, float), key
        assert value == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert 0.0 < got["top1"] < 1.0
    assert got["ece"] > 0.0


def test_one_bin_ece_is_accuracy_confidence_gap():
    rng = np.random.default_rng(7)
    logits = torch.tensor(rng.normal(size=(200, 5)) * 3)
    labels = torch.tensor(rng.integers(0, 5, size=200))
    m = classification_metrics(logits, labels, n_bins=1)
    assert m["ece"] == pytest.approx(abs(m["top1"] - m["mean_confidence"]), abs=1e-12)


def test_ece_is_not_the_global_gap_with_many_bins():
    # Over- and under-confident halves cancel in one bin but not in two.
    conf = [0.9, 0.9, 0.3, 0.3]
    correct = [0, 1, 1, 1]  # bin (0.5, 1]: acc 0.5 vs conf 0.9; bin (0, 0.5]: acc 1 vs conf 0.3
    assert expected_calibration_error(conf, correct, n_bins=1) == pytest.approx(abs(0.75 - 0.6))
    two_bins = expected_calibration_error(conf, correct, n_bins=2)
    assert two_bins == pytest.approx(0.5 * 0.4 + 0.5 * 0.7)


def test_nll_equals_cross_entropy():
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.float32, torch.float64):
        logits = (torch.randn(300, 10) * 4).to(dtype)
        labels = torch.randint(0, 10, (300,))
        want = F.cross_entropy(logits.to(torch.float64), labels).item()
        assert classification_metrics(logits, labels)["nll"] == pytest.approx(want, rel=1e-12)


def test_top1_and_mean_confidence_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 0.0], [1.0, 1.0, 5.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 2, 2, 1])
    m = classification_metrics(logits, labels)
    # Argmax 0, 1, 2, 0 (ties go to the first class): correct, wrong, correct, wrong.
    assert m["top1"] == 0.5
    p = torch.softmax(logits.double(), dim=1).max(dim=1).values
    assert m["mean_confidence"] == pytest.approx(p.mean().item(), rel=1e-12)
    assert m["mean_confidence"] == pytest.approx(
        (
            math.exp(2) / (math.exp(2) + math.e + 1)
            + math.exp(3) / (math.exp(3) + 2)
            + math.exp(5) / (math.exp(5) + 2 * math.e)
            + 1 / 3
        )
        / 4,
        rel=1e-12,
    )


def test_perfectly_confident_correct_predictions():
    labels = torch.tensor([0, 3, 1, 2, 3, 0])
    logits = F.one_hot(labels, 4).double() * 100.0
    m = classification_metrics(logits, labels)
    assert m["top1"] == 1.0
    assert m["ece"] == pytest.approx(0.0, abs=1e-15)
    assert m["mean_confidence"] == pytest.approx(1.0, abs=1e-15)
    assert m["nll"] == pytest.approx(0.0, abs=1e-15)


def test_confident_and_wrong_predictions():
    labels = torch.tensor([0, 1, 2])
    logits = F.one_hot(torch.tensor([1, 2, 0]), 3).double() * 100.0
    m = classification_metrics(logits, labels)
    assert m["top1"] == 0.0
    assert m["ece"] == pytest.approx(1.0)
    assert m["nll"] == pytest.approx(100.0, rel=1e-9)


def test_worked_example_from_logits():
    # Two classes, probabilities [1/4, 3/4] for both samples: confidence 0.75, one correct.
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    labels = torch.tensor([1, 0])
    m = classification_metrics(logits, labels)
    assert m["top1"] == 0.5
    assert m["mean_confidence"] == pytest.approx(0.75)
    assert m["ece"] == pytest.approx(0.25)  # one non-empty bin: |0.5 - 0.75|
    assert m["nll"] == pytest.approx((-math.log(0.75) - math.log(0.25)) / 2)


def test_worked_example_ece():
    # 5 bins with edges 0.2, 0.4, 0.6, 0.8, 1.0:
    #   (0.8, 1.0]: 0.95 (right), 0.85 (wrong) -> weight 2/4, |0.5 - 0.9| = 0.4 -> 0.2
    #   (0.6, 0.8]: 0.70 (right)              -> weight 1/4, |1 - 0.7|   = 0.3 -> 0.075
    #   (0.2, 0.4]: 0.30 (right)              -> weight 1/4, |1 - 0.3|   = 0.7 -> 0.175
    conf = torch.tensor([0.95, 0.85, 0.7, 0.3])
    correct = torch.tensor([True, False, True, True])
    assert expected_calibration_error(conf, correct, n_bins=5) == pytest.approx(0.45)
    # Array-likes work too.
    conf_list, correct_list = [0.95, 0.85, 0.7, 0.3], [1, 0, 1, 1]
    assert expected_calibration_error(conf_list, correct_list, 5) == pytest.approx(0.45)
    conf_np, correct_np = np.array(conf_list), np.array(correct_list)
    assert expected_calibration_error(conf_np, correct_np, 5) == pytest.approx(0.45)


def test_bins_are_closed_on_the_right():
    # 0.6 belongs to (0.5, 0.6], 0.65 to (0.6, 0.7]; separate bins give (0.4 + 0.65) / 2.
    assert expected_calibration_error([0.6, 0.65], [1, 0], n_bins=10) == pytest.approx(0.525)
    # 1.0 belongs to the last bin (0.9, 1.0] together with 0.95: |0.5 - 0.975|.
    assert expected_calibration_error([1.0, 0.95], [0, 1], n_bins=10) == pytest.approx(0.475)
    # 0.1 is the top of the first bin, not the bottom of the second.
    first = expected_calibration_error([0.1, 0.15], [1, 0], n_bins=10)
    assert first == pytest.approx((0.9 + 0.15) / 2)


def test_default_is_15_bins():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 6, size=400)
    logits = rng.normal(size=(400, 6)) * rng.uniform(0.1, 4.0, size=(400, 1))
    logits[np.arange(400), labels] += 1.5  # under-confident at low, over-confident at high
    logits, labels = torch.tensor(logits), torch.tensor(labels)
    default = classification_metrics(logits, labels)["ece"]
    with_15 = numpy_reference(logits.numpy(), labels.numpy(), 15)["ece"]
    with_10 = numpy_reference(logits.numpy(), labels.numpy(), 10)["ece"]
    assert default == pytest.approx(with_15, rel=1e-12)
    assert default != pytest.approx(with_10, rel=1e-6)


def test_does_not_modify_or_require_grad_inputs():
    logits = torch.randn(8, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    before = logits.detach().clone()
    m = classification_metrics(logits, labels)
    assert all(isinstance(v, float) for v in m.values())
    assert torch.equal(logits.detach(), before)


def test_bad_inputs():
    with pytest.raises(KDError):
        expected_calibration_error([0.5], [1], n_bins=0)
    with pytest.raises(ValueError):
        expected_calibration_error([0.5, 0.6], [1], n_bins=10)
    with pytest.raises(ValueError):
        classification_metrics(torch.zeros(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError):
        classification_metrics(torch.zeros(2, 4), torch.tensor([0, 4]))
    with pytest.raises(ValueError):
        classification_metrics(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
