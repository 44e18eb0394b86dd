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


def standardize_logits(logits: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): each row z-scored, (z - mean) / (eps + std).

    The std is the unbiased one (Bessel's correction), with eps added to it, as in the authors'
    code; the paper writes the population std. The difference is a factor sqrt(K / (K-1)) on
    the logits, i.e. on the temperature.
    """
    logits = logits.float()
    return (logits - logits.mean(dim=1, keepdim=True)) / (eps + logits.std(dim=1, keepdim=True))


def hinton_terms(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                 logit_std: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE(s, y), KL(softmax(t / T) || softmax(s / T))), batch means in float32 even under mixed precision.

    `targets` are class indices (N,) or label distributions (N, K) (soft cross-entropy then).
    With `logit_std` the KL term sees `standardize_logits` of both (the cross-entropy the raw logits).
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student, teacher = student_logits.float(), teacher_logits.float()
        if logit_std:
            student_kl, teacher = standardize_logits(student), standardize_logits(teacher)
        else:
            student_kl = student
        kl = F.kl_div(
            F.log_softmax(student_kl / temperature, dim=1),
            F.log_softmax(teacher / temperature, dim=1),
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
    logit_std: bool = False,
) -> dict[str, torch.Tensor]:
    """`{"loss": ce_weight * CE(s, y) + kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T)), "ce": ..., "kl": ...}`.

    The weights are named explicitly because torchdistill's and RepDistiller's "alpha" mean
    opposite things. `logit_std`: see `hinton_terms`.
    """
    ce, kl = hinton_terms(student_logits, targets, teacher_logits, temperature, logit_std)
    return {"loss": ce_weight * ce + kd_weight * temperature * temperature * kl, "ce": ce, "kl": kl}


# ----------------------------------------------------------------------------- decoupled KD (Zhao et al., CVPR 2022)

# DKD defaults, mdistiller's (`CFG.DKD`, its CIFAR-100 values): temperature, weight of the
# cross-entropy with the labels, alpha (TCKD), beta (NCKD), warm-up epochs.
DKD_TEMPERATURE, DKD_CE_WEIGHT, DKD_TCKD_WEIGHT, DKD_NCKD_WEIGHT, DKD_WARMUP_EPOCHS = 4.0, 1.0, 1.0, 8.0, 20


def _decoupled_log_probs(scaled: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log [p_y, 1 - p_y] (N, 2), log-softmax over the K-1 non-target classes (N, K-1)) of logits / T.

    The target is left out exactly (its column is not gathered), and 1 - p_y is the logsumexp of
    the non-target logits against the target's, so p_y = 1 in float32 gives a finite log(1 - p_y).
    """
    others = torch.arange(scaled.shape[1] - 1, device=labels.device)
    columns = others + (others >= labels[:, None]).long()  # every column but y
    rest = scaled.gather(1, columns)
    binary = torch.cat([scaled.gather(1, labels[:, None]), torch.logsumexp(rest, dim=1, keepdim=True)], dim=1)
    return F.log_softmax(binary, dim=1), F.log_softmax(rest, dim=1)


def dkd_terms(student_logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
              logit_std: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CE(s, y), TCKD, NCKD), batch means in float32 even under mixed precision; `labels` are class indices.

    TCKD = T^2 KL(b_t || b_s) with b = [p_y, 1 - p_y], p = softmax(z / T); NCKD = T^2 KL(p_hat_t || p_hat_s)
    with p_hat the softmax over the non-target classes only. Both include the T^2 factor, as in the
    authors' code (the paper's equation has none). With `logit_std` both terms see
    `standardize_logits` of both networks (the cross-entropy the raw logits).
    """
    labels = labels.long()
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        student, teacher = student_logits.float(), teacher_logits.float()
        student_kd = standardize_logits(student) if logit_std else student
        teacher_kd = standardize_logits(teacher) if logit_std else teacher
        binary_s, rest_s = _decoupled_log_probs(student_kd / temperature, labels)
        binary_t, rest_t = _decoupled_log_probs(teacher_kd / temperature, labels)
        scale = temperature * temperature
        tckd = scale * F.kl_div(binary_s, binary_t, reduction="batchmean", log_target=True)
        nckd = scale * F.kl_div(rest_s, rest_t, reduction="batchmean", log_target=True)
    return cross_entropy(student, labels), tckd, nckd


def dkd_warmup(epoch: int, warmup_epochs: int) -> float:
    """DKD's warm-up factor min(e / W, 1) with mdistiller's 1-based epoch e = `epoch` + 1 (`epoch` is 0-based); 1 if W = 0."""
    return 1.0 if warmup_epochs <= 0 else min((epoch + 1) / warmup_epochs, 1.0)


def dkd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = DKD_TEMPERATURE,
    tckd_weight: float = DKD_TCKD_WEIGHT,
    nckd_weight: float = DKD_NCKD_WEIGHT,
    ce_weight: float = DKD_CE_WEIGHT,
    logit_std: bool = False,
    warmup: float = 1.0,
) -> dict[str, torch.Tensor]:
    """`{"loss": ce_weight * CE + warmup * (tckd_weight * TCKD + nckd_weight * NCKD), "ce", "tckd", "nckd"}`.

    The parts are unweighted (TCKD and NCKD with their T^2, see `dkd_terms`); `warmup` is
    `dkd_warmup(epoch, warmup_epochs)`.
    """
    ce, tckd, nckd = dkd_terms(student_logits, labels, teacher_logits, temperature, logit_std)
    return {"loss": ce_weight * ce + warmup * (tckd_weight * tckd + nckd_weight * nckd), "ce": ce, "tckd": tckd, "nckd": nckd}


# ----------------------------------------------------------------------------- DIST (Huang et al., NeurIPS 2022)

# DIST defaults, the authors' CIFAR-100 values: temperature tau, weight of the cross-entropy with
# the labels, beta (inter-class relation), gamma (intra-class relation).
DIST_TEMPERATURE, DIST_CE_WEIGHT, DIST_INTER_WEIGHT, DIST_INTRA_WEIGHT = 4.0, 1.0, 2.0, 2.0


def _row_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of `a` with the same row of `b`: the cosine of the centred rows, eps as in the authors' code."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(inter, intra) in float32: 1 - the mean Pearson correlation of y_s and y_t = softmax(z / tau), per sample and per class.

    `inter` correlates each sample's row (over the classes), `intra` each class's column (over
    the batch). A batch of one gives intra = 1 (a one-entry column centred is zero, its
    correlation 0) and no gradient through it.
    """
    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        y_s = F.softmax(student_logits.float() / temperature, dim=1)
        y_t = F.softmax(teacher_logits.float() / temperature, dim=1)
        return 1.0 - _row_pearson(y_s, y_t).mean(), 1.0 - _row_pearson(y_s.T, y_t.T).mean()


def dist_loss(
    student_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = DIST_TEMPERATURE,
    inter_weight: float = DIST_INTER_WEIGHT,
    intra_weight: float = DIST_INTRA_WEIGHT,
    ce_weight: float = DIST_CE_WEIGHT,
) -> dict[str, torch.Tensor]:
    """`{"loss": ce_weight * CE(s, y) + tau^2 * (inter_weight * inter + intra_weight * intra), "ce", "inter", "intra"}`.

    `targets` are class indices (N,) or label distributions (N, K); the parts are unweighted
    (`inter` and `intra` without tau^2, see `dist_terms`).
    """
    inter, intra = dist_terms(student_logits, teacher_logits, temperature)
    ce = cross_entropy(student_logits, targets)
    kd = temperature * temperature * (inter_weight * inter + intra_weight * intra)
    return {"loss": ce_weight * ce + kd, "ce": ce, "inter": inter, "intra": intra}
