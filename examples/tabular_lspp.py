"""LS++ on a table, in a plain PyTorch loop: a teacher MLP learns a C-matrix, a smaller student
MLP learns from that file alone (the proxy teacher, PT-LS++).

The data is scikit-learn's digits read as a table: 1797 rows of 64 numeric features, 10
classes, shipped with scikit-learn (no download). Nothing here is image-specific: LSPPLoss and
ProxyTeacherLoss only see (N, K) logits and class indices, so any classifier works.

    .venv/bin/python examples/tabular_lspp.py --out runs/tabular-lspp

writes OUT/cmatrix.safetensors (the teacher's C-matrix, readable by `kd cmatrix show` and
`kd distill --proxy`) and prints both networks' test accuracy. Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from kd import LSPPLoss, ProxyTeacherLoss


def load_table(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Digits as a standardised feature table: (x_train, y_train, x_test, y_test, class names)."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, stratify=digits.target, random_state=seed
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # statistics of the training rows only
    features = [torch.tensor((x - mean) / std, dtype=torch.float32) for x in (x_train, x_test)]
    labels = [torch.tensor(y, dtype=torch.long) for y in (y_train, y_test)]
    return features[0], labels[0], features[1], labels[1], [str(name) for name in digits.target_names]


def mlp(features: int, hidden: int, classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def train(net: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    """The whole training loop; `criterion` is any `loss(logits, targets)` module.

    The criterion's parameters (LS++'s C logits; none for the proxy teacher) go to the optimizer
    too, without weight decay: decay would pull C's rows towards uniform, i.e. plain LS.

    Under DistributedDataParallel, wrap the network and the loss in ONE nn.Module and hand that
    to DDP (or to `accelerator.prepare`), e.g. a module whose forward returns
    `self.criterion(self.net(x), y)`: the C logits must sit inside the wrapped module, otherwise
    their gradients are not all-reduced and every process learns a different C.
    """
    optimizer = torch.optim.AdamW(
        [{"params": net.parameters(), "weight_decay": 1e-4}, {"params": criterion.parameters(), "weight_decay": 0.0}], lr=3e-3
    )
    order = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).split(64):
            loss = criterion(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    net.eval()
    return (net(x).argmax(dim=1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for cmatrix.safetensors")
    parser.add_argument("--epochs", type=int, default=10, help="epochs for the teacher and for the student (default 10)")
    parser.add_argument("--alpha", type=float, default=0.1, help="LS++ mixing mass a (default 0.1, the paper's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # matrices this small gain nothing from threads, and a busy CPU makes them slower
    x_train, y_train, x_test, y_test, class_names = load_table(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    # (a) Teacher: LS++ learns the C-matrix alongside the network, then exports it.
    teacher = mlp(64, 128, len(class_names))
    lspp = LSPPLoss(len(class_names), alpha=args.alpha, class_names=class_names)
    train(teacher, lspp, x_train, y_train, args.epochs, args.seed)
    teacher_top1 = accuracy(teacher, x_test, y_test)
    cmatrix_file = lspp.export(args.out / "cmatrix.safetensors", dataset="sklearn-digits", model="mlp-128", top1=teacher_top1)

    # (b) Student: a smaller network trained from the C-matrix file alone, no teacher network.
    student = mlp(64, 32, len(class_names))
    proxy = ProxyTeacherLoss(cmatrix_file, class_names=class_names)  # alpha from the file
    train(student, proxy, x_train, y_train, args.epochs, args.seed)
    student_top1 = accuracy(student, x_test, y_test)

    print(f"wrote {cmatrix_file}")
    print(f"teacher test accuracy: {teacher_top1:.4f}")
    print(f"student test accuracy: {student_top1:.4f}")


if __name__ == "__main__":
    main()
