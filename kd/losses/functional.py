"""The formulas, as functions on tensors: LS++, the proxy teacher, (label-smoothed) cross-entropy, Hinton KD.

Each formula has its one home here; the public loss modules
(`kd.losses.modules`) and the training methods (`kd.methods`) call these functions. All of
them compute in float32, also under mixed precision.

Label Smoothing++ (Chhabra et al., section 3.2): learned class-level soft targets.

For K classes a learnable logit matrix of shape K x (K-1), initialised to zeros, gives
C = row-softmax with a zero inserted at the diagonal (a K x K row-stochastic matrix). The
target for label y is t = (1 - a) * onehot(y) + a * C[y]; for a label distribution s
(Mixup/CutMix) it is t = (1 - a) * s + a * (s @ C).

The loss is the paper's symmetric cross-entropy with split gradients:

    H(t.detach(), p)  trains the network  (plain soft-target cross-entropy)
    H(p.detach(), t)  trains C            (pulls each row of C towards the network's
                                           non-target predictions for that class)

We use the sum of the two terms, not the reference code's average: each term reaches only
its own parameters, so a factor 1/2 would just halve the learning rate of both, and with the
sum the network sees exactly the gradient of soft-target cross-entropy (comparable to 1-hot
and LS at the same learning rate). The C logits get no weight decay (see
`kd.losses.modules.LSPPLoss.no_weight_decay`): decay pulls the logits to zero, i.e. rows towards
uniform (plain LS), which would bias the matrix we export and share.

LS++ is computed in log-space (log-softmax and logaddexp, never the log of a probability
plus an epsilon).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def insert_diagonal(off_diagonal: torch.Tensor, value: float) -> torch.Tensor:
    """Turn a K x (K-1) matrix into K x K by inserting `value` at each row's diagonal position.

    Row i of the input lists the entries for columns 0..K-1 without column i.
    """
    k = off_diagonal.shape[0]
    if off_diagonal.shape != (k, k - 1):
        raise ValueError(f"expected a K x (K-1) matrix, got shape {tuple(off_diagonal.shape)}")
    # In row-major order the full matrix is: diagonal, K off-diagonal entries, diagonal, ...,
    # diagonal. So the off-diagonal entries, read as (K-1) rows of K, get a `value` column in
    # front, and one more `value` closes the last diagonal.
    rows = torch.cat([off_diagonal.new_full((k - 1, 1), value), off_diagonal.reshape(k - 1, k)], dim=1)
    flat = torch.cat([rows.reshape(-1), off_diagonal.new_full((1,), value)])
    return flat.reshape(k, k)


def remove_diagonal(full: torch.Tensor) -> torch.Tensor:
    """Inverse of `insert_diagonal`: drop the diagonal of a K x K matrix, giving K x (K-1)."""
    k = full.shape[0]
    if full.shape != (k, k):
        raise ValueError(f"expected a K x K matrix, got shape {tuple(full.shape)}")
    return full.reshape(-1)[1:].reshape(k - 1, k + 1)[:, :-1].reshape(k, k - 1)


def log_cmatrix_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """log C as a K x K matrix: row log-softmax of the K x (K-1) logits, -inf on the diagonal."""
    return insert_diagonal(F.log_softmax(logits.float(), dim=1), -math.inf)


def cmatrix_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """C as a K x K row-stochastic matrix with a zero diagonal."""
    return insert_diagonal(F.softmax(logits.float(), dim=1), 0.0)


# The paper's default mixing mass a (LS and LS++ alike).
DEFAULT_ALPHA = 0.1

# A finite "log 0": exp(-1e4) is exactly 0 in float32, and sums of two stay finite.
_LOG_ZERO = -1.0e4


def log_targets(labels: torch.Tensor, log_c: torch.Tensor, alpha: float) -> torch.Tensor:
    """log t for hard labels (N,) or soft label distributions (N, K), with t = (1-a) s + a (s @ C).

    Differentiable with respect to `log_c`; exact in log-space.
    """
    num_classes = log_c.shape[0]
    if labels.dim() == 1:
        log_mixed = log_c[labels.long()]  # log C[y]: log(s @ C) for one-hot s
        log_s = F.one_hot(labels.long(), num_classes).float().log()
    else:
        log_s = labels.float().log()
        log_mixed = _log_mixed(labels.float(), log_s, log_c)
    if alpha == 0.0:
        return log_s
    return torch.logaddexp(log_s + math.log1p(-alpha), log_mixed + math.log(alpha))


def _log_mixed(soft: torch.Tensor, log_s: torch.Tensor, log_c: torch.Tensor) -> torch.Tensor:
    """log (s @ C) for label distributions s (N, K), differentiable with respect to `log_c`.

    On the CPU: logsumexp_j (log s_j + log C_jk) over the classes j present in the batch only (a
    class with s_j = 0 everywhere adds exp(-inf) = 0), N x P x K instead of N x K x K, which at
    K = 1000 would be half a gigabyte. A column where every term is -inf (s = onehot(k) meets C's
    zero diagonal) would give a NaN gradient, so the sum runs over finite stand-ins whose exp is
    exactly 0. On a GPU, finding the present classes (torch.nonzero) would be a device sync
    every step: there it is `_log_mixed_by_product`, one N x K matrix product.
    """
    if soft.device.type != "cpu":
        return _log_mixed_by_product(soft, log_c)
    present = torch.nonzero((soft > 0).any(dim=0)).flatten()
    return torch.logsumexp(
        log_s[:, present].clamp(min=_LOG_ZERO).unsqueeze(2) + log_c[present].clamp(min=_LOG_ZERO).unsqueeze(0), dim=1
    )


def _log_mixed_by_product(soft: torch.Tensor, log_c: torch.Tensor) -> torch.Tensor:
    """log (s @ C) as log of one float32 matrix product (s and C in [0, 1]: no overflow).

    Where s @ C is exactly 0 (s = onehot(k) meets C's zero diagonal) the result is the finite
    stand-in `_LOG_ZERO` and the gradient 0, not log 0 and a NaN gradient.
    """
    with torch.autocast(device_type=soft.device.type, enabled=False):
        mixed = soft @ log_c.float().exp()
    positive = mixed > 0
    return torch.where(positive, torch.where(positive, mixed, torch.ones_like(mixed)).log(), torch.full_like(mixed, _LOG_ZERO))


def log_targets_from_logits(labels: torch.Tensor, c_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """`log_targets` straight from the K x (K-1) C logits, differentiable with respect to them.

    For hard labels only the batch's rows of C are built: a log-softmax over each sample's row
    of logits, O(N K) instead of the O(K^2) of the whole matrix (at K = 1000 that is most of the
    cost of the loss), and log t is written with one scatter: log(1-a) at the label (C's
    diagonal is 0) and log a + log C[y] elsewhere, the values of the logaddexp in `log_targets`.
    """
    if labels.dim() != 1:
        return log_targets(labels, log_cmatrix_from_logits(c_logits), alpha)
    labels = labels.long()
    k = c_logits.shape[0]
    if alpha == 0.0:
        return F.one_hot(labels, k).float().log()
    rows = F.log_softmax(c_logits[labels].float(), dim=1) + math.log(alpha)  # N x (K-1): log(a C[y]) off the label
    others = torch.arange(k - 1, device=labels.device)
    columns = others + (others >= labels[:, None]).long()  # where row y's K-1 entries go: every column but y
    return rows.new_full((labels.shape[0], k), math.log1p(-alpha)).scatter(1, columns, rows)


# ----------------------------------------------------------------------------- cross-entropy


def soft_target_cross_entropy(net_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """H(t, p) = -sum_k t_k log p_k, batch mean, in float32 with log-softmax (t taken as given)."""
    with torch.autocast(device_type=net_logits.device.type, enabled=False):
        return -_xlogy_sum(targets.float(), F.log_softmax(net_logits.float(), dim=1)).mean()


def _xlogy_sum(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_k p_k * log q_k per row, with 0 * log 0 = 0 (and no NaN gradient from it)."""
    safe_log_q = torch.where(p > 0, log_q, torch.zeros_like(log_q))
    return (p * safe_log_q).sum(dim=-1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with class indices (N,) or label distributions (N, K), batch mean, in float32.

    With `label_smoothing` a > 0 the target is (1 - a) s + a / K on every class, s the one-hot
    label or the given distribution (label smoothing, Szegedy et al. 2016; the paper's eq. 2).
    """
    if targets.dim() == 1:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            return F.cross_entropy(logits.float(), targets.long(), label_smoothing=label_smoothing)
    soft = targets.float()
    if label_smoothing:
        soft = (1.0 - label_smoothing) * soft + label_smoothing / logits.shape[1]
    return soft_target_cross_entropy(logits, soft)


# ----------------------------------------------------------------------------- the proxy teacher (PT-LS++)


def mix_targets(labels: torch.Tensor, cmatrix: torch.Tensor, alpha: float) -> torch.Tensor:
    """t = (1-a) * onehot(y) + a * C[y] for hard labels (N,), (1-a) * s + a * (s @ C) for soft (N, K).

    Computed directly in probability space (exact, no log round trip): this is the proxy
    teacher's target, where C is a fixed matrix from a file.
    """
    num_classes = cmatrix.shape[0]
    cmatrix = cmatrix.float()
    if labels.dim() == 1:
        return (1.0 - alpha) * F.one_hot(labels.long(), num_classes).float() + alpha * cmatrix[labels.long()]
    soft = labels.float()
    present = _batch_classes(soft)  # N x P @ P x K
    with torch.autocast(device_type=soft.device.type, enabled=False):  # targets in float32, not bf16/fp16
        return (1.0 - alpha) * soft + alpha * (soft[:, present] @ cmatrix[present])


def _batch_classes(soft: torch.Tensor) -> torch.Tensor | slice:
    """The classes (columns) a batch of label distributions (N, K) puts mass on.

    On the CPU their indices, so that products run over those P classes instead of all K. On a
    GPU every class: finding them (torch.nonzero) would stop the pipeline for a device sync
    each step, and the whole product is cheap there.
    """
    if soft.device.type == "cpu":
        return torch.nonzero((soft > 0).any(dim=0)).flatten()
    return slice(None)


def proxy_loss(logits: torch.Tensor, targets: torch.Tensor, cmatrix: torch.Tensor, alpha: float) -> torch.Tensor:
    """PT-LS++ (paper section 5.3): soft-target cross-entropy against `mix_targets(targets, C, a)`, C fixed."""
    return soft_target_cross_entropy(logits, mix_targets(targets, cmatrix, alpha))


# ----------------------------------------------------------------------------- the LS++ loss


C_LOSSES = ("detached", "ce", "sce")


def lspp_terms(net_logits: torch.Tensor, labels: torch.Tensor, c_logits: torch.Tensor, alpha: float, c_loss: str = "detached") -> dict[str, torch.Tensor]:
    """The LS++ loss terms for hard labels (N,) or label distributions (N, K); their sum is the loss.

    `c_loss` selects how C is trained (the paper's Table 5 / Fig. 6 ablation):

    * "detached" (the paper's): `network` = H(t.detach(), p) trains the network only and
      `cmatrix` = H(p.detach(), t) trains C only;
    * "ce": plain cross-entropy H(t, p), with gradients reaching C through the target
      (which drives each row of C towards one class);
    * "sce": the original symmetric cross-entropy H(t, p) + H(p, t), both terms updating both sides.
    """
    if c_loss not in C_LOSSES:
        raise ValueError(f"c_loss must be one of {', '.join(C_LOSSES)}, got {c_loss!r}")
    if c_loss == "detached" and labels.dim() == 1 and 0.0 < alpha < 1.0:
        return _detached_terms_for_labels(net_logits, labels, c_logits, alpha)
    with torch.autocast(device_type=net_logits.device.type, enabled=False):
        log_p = F.log_softmax(net_logits.float(), dim=1)
        log_t = log_targets_from_logits(labels, c_logits, alpha)
        if c_loss == "detached":
            return {
                "network": -_xlogy_sum(log_t.detach().exp(), log_p).mean(),
                "cmatrix": -_xlogy_sum(log_p.detach().exp(), log_t).mean(),
            }
        terms = {"ce": -_xlogy_sum(log_t.exp(), log_p).mean()}
        if c_loss == "sce":
            terms["rce"] = -_xlogy_sum(log_p.exp(), log_t).mean()
        return terms


def _detached_terms_for_labels(net_logits: torch.Tensor, labels: torch.Tensor, c_logits: torch.Tensor, alpha: float) -> dict[str, torch.Tensor]:
    """The paper's loss for hard labels, the default and by far the commonest case.

    With 0 < a < 1 both log t and log p are finite everywhere, so the cross-entropies need no
    guard against 0 * log 0.
    """
    with torch.autocast(device_type=net_logits.device.type, enabled=False):
        log_p = F.log_softmax(net_logits.float(), dim=1)
        log_t = log_targets_from_logits(labels, c_logits, alpha)
        return {
            "network": -(log_t.detach().exp() * log_p).sum(dim=1).mean(),
            "cmatrix": -(log_p.detach().exp() * log_t).sum(dim=1).mean(),
        }


def lspp_loss(net_logits: torch.Tensor, labels: torch.Tensor, c_logits: torch.Tensor, alpha: float, c_loss: str = "detached") -> dict[str, torch.Tensor]:
    """The LS++ loss and its named parts: `{"loss": the sum of the terms, **lspp_terms(...)}`."""
    terms = lspp_terms(net_logits, labels, c_logits, alpha, c_loss)
    return {"loss": sum(terms.values()), **terms}


# ----------------------------------------------------------------------------- classic KD (Hinton et al. 2015)

# Hinton KD defaults: temperature, weight of T^2 * KL, weight of the cross-entropy with the labels.
KD_TEMPERATURE, KD_WEIGHT, KD_CE_WEIGHT = 4.0, 0.9, 0.1


def hinton_terms(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE(s, y), KL(softmax(t / T) || softmax(s / T))), batch means in float32 even under mixed precision.

    `targets` are class indices (N,) or label distributions (N, K) (soft cross-entropy then).
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student = student_logits.float()
        kl = F.kl_div(
            F.log_softmax(student / temperature, dim=1),
            F.log_softmax(teacher_logits.float() / temperature, dim=1),
            reduction="batchmean",
            log_target=True,
        )
    return cross_entropy(student, targets), kl


def hinton_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = KD_TEMPERATURE,
    kd_weight: float = KD_WEIGHT,
    ce_weight: float = KD_CE_WEIGHT,
) -> dict[str, torch.Tensor]:
    """`{"loss": ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T)), "ce": ..., "kl": ...}`.

    The weights are named explicitly because torchdistill's and RepDistiller's "alpha" mean
    opposite things.
    """
    ce, kl = hinton_terms(student_logits, targets, teacher_logits, temperature)
    return {"loss": ce_weight * ce + kd_weight * temperature * temperature * kl, "ce": ce, "kl": kl}
