"""Classification metrics from logits: top-1 accuracy, NLL, ECE and mean confidence.

Everything is computed in float64 on the CPU, whatever the logits' dtype and device.

ECE is the standard definition of Guo et al. (2017), "On Calibration of Modern Neural
Networks": split the confidences (max softmax probability) into `n_bins` equal-width bins
B_m = ((m-1)/M, m/M] for m = 1..M, and take

    ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|

over the non-empty bins, where acc and conf are the bin's accuracy and mean confidence.
"""

from __future__ import annotations

import torch

from kd.errors import KDError


def _as_float64(values) -> torch.Tensor:
    """A float64 CPU tensor; array-likes are read as float64 directly (not via float32)."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().to(torch.float64)
    return torch.as_tensor(values, dtype=torch.float64)


def expected_calibration_error(confidences, correct, n_bins: int = 15) -> float:
    """ECE of predictions with the given confidences (in [0, 1]) and correctness (bool or 0/1).

    Bin m (0-based) holds the confidences in (m/n_bins, (m+1)/n_bins]; a confidence of exactly
    0 goes to the first bin. Both inputs are 1-D and of equal length (tensors or array-likes).
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise KDError(f"the number of ECE bins must be a positive integer, got {n_bins!r}")
    conf = _as_float64(confidences)
    corr = _as_float64(correct)
    if conf.dim() != 1 or conf.shape != corr.shape:
        raise ValueError(
            f"confidences and correct must be 1-D of equal length, got shapes "
            f"{tuple(conf.shape)} and {tuple(corr.shape)}"
        )
    n = conf.numel()
    if n == 0:
        raise ValueError("cannot compute ECE of zero predictions")
    # Exact bin edges m / M (correctly rounded), not an accumulated linspace.
    inner_edges = torch.arange(1, n_bins, dtype=torch.float64) / n_bins
    # right=False: index i satisfies edges[i-1] < conf <= edges[i], i.e. bins are (lo, hi].
    bins = torch.bucketize(conf, inner_edges, right=False).clamp_(0, n_bins - 1)
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, conf)
    corr_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, corr)
    # sum_m |B_m|/n * |acc_m - conf_m| = sum_m |corr_sum_m - conf_sum_m| / n (empty bins add 0).
    return float((corr_sum - conf_sum).abs().sum() / n)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, n_bins: int = 15
) -> dict[str, float]:
    """Metrics of (N, K) logits against (N,) integer labels, as Python floats.

    Returns `top1` (accuracy in [0, 1]), `nll` (mean negative log-likelihood from
    log_softmax), `ece` (see `expected_calibration_error`) and `mean_confidence` (mean max
    softmax probability).
    """
    logits = torch.as_tensor(logits).detach().cpu().to(torch.float64)
    labels = torch.as_tensor(labels).detach().cpu()
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"expected (N, K) logits and (N,) labels, got shapes "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if logits.shape[0] == 0:
        raise ValueError("cannot compute metrics of zero predictions")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
    labels = labels.to(torch.long)
    num_classes = logits.shape[1]
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes - 1}], "
            f"got range [{int(labels.min())}, {int(labels.max())}]"
        )

    log_probs = torch.log_softmax(logits, dim=1)
    max_log_prob, predictions = log_probs.max(dim=1)
    confidences = max_log_prob.exp()
    correct = predictions == labels
    nll = -log_probs.gather(1, labels[:, None]).squeeze(1)
    return {
        "top1": float(correct.to(torch.float64).mean()),
        "nll": float(nll.mean()),
        "ece": expected_calibration_error(confidences, correct, n_bins),
        "mean_confidence": float(confidences.mean()),
    }
