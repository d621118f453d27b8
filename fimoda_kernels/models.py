"""Models of a study and the training of the "final" model θ* (paper Appendix D.2).

- Tabular sets: MLP d → 128 → 128 → out with ReLU (out = 1 for regression, C logits for
  classification), initialized from ``torch.manual_seed(seed)`` (seed 0 by default).
- Images (digits, 1 × 8 × 8): a small CNN, conv 3×3 (16) → ReLU → max-pool 2 → conv 3×3 (32) →
  ReLU → max-pool 2 → linear 128 → C.
- Training: plain SGD on the mean loss, batch 128, each epoch the order
  ``torch.randperm(n, generator=torch.Generator().manual_seed(seed))`` (one generator, drawn once per
  epoch — the protocol further training uses too), consecutive batches, last one smaller.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ._validate import check_float, check_int
from .datasets import Dataset
from .tasks import Task, get_task

__all__ = ["HIDDEN", "DEFAULT_TRAINING", "build_model", "task_for", "train_final_model", "evaluate_model"]

HIDDEN = 128

# (lr, epochs) of the final model's SGD per embedded set — chosen so the training loss has
# flattened out (see NOTES-runner.md); CSV sets use the paper's tabular regression setting
# (lr 0.3, 1000 epochs) or a classification analogue.
DEFAULT_TRAINING = {
    "diabetes": (0.1, 500),
    "breast_cancer": (0.1, 300),
    "digits": (0.1, 150),
    "csv_regression": (0.3, 1000),
    "csv_classification": (0.1, 300),
}



class TrainingDivergedError(RuntimeError):
    """The final model's training loss stopped being finite (the learning rate is too large)."""

def default_training(dataset: Dataset, embedded: bool) -> tuple[float, int]:
    if embedded and dataset.name in DEFAULT_TRAINING:
        return DEFAULT_TRAINING[dataset.name]
    return DEFAULT_TRAINING[f"csv_{dataset.task}"]


class SmallCNN(nn.Module):
    """The CNN for 8 × 8 single-channel images (digits)."""

    def __init__(self, n_classes: int, side: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(32 * (side // 4) ** 2, n_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def build_model(dataset: Dataset, seed: int = 0) -> nn.Module:
    """The study's model for ``dataset``, freshly initialized from ``torch.manual_seed(seed)``
    (the global RNG state is restored afterwards)."""
    seed = check_int("seed", seed, min_value=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if dataset.is_image:
            if tuple(dataset.x_train.shape[1:]) != (1, 8, 8):
                raise ValueError(f"dataset: the CNN expects 1×8×8 images, got {tuple(dataset.x_train.shape[1:])}")
            model = SmallCNN(dataset.n_outputs)
        else:
            model = nn.Sequential(nn.Linear(dataset.n_features, HIDDEN), nn.ReLU(),
                                  nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, dataset.n_outputs))
    return model.to(dataset.x_train.dtype)


def task_for(dataset: Dataset) -> Task:
    """MSE for regression, cross-entropy on the logits for classification (MATH.md §1)."""
    return get_task("mse" if dataset.task == "regression" else "cross_entropy")


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, device=None) -> dict:
    """Mean loss on train and test (and accuracy for classification, R² for regression)."""
    task = task_for(dataset)
    device = device or next(model.parameters()).device
    model.eval()
    out = {}
    for split, x, y in (("train", dataset.x_train, dataset.y_train), ("test", dataset.x_test, dataset.y_test)):
        x, y = x.to(device), y.to(device)
        pred = model(x)
        out[f"{split}_loss"] = float(task.loss(pred, y).mean())
        if dataset.task == "classification":
            out[f"{split}_accuracy"] = float((pred.argmax(1) == y).double().mean())
        else:
            f = pred.reshape(-1)
            out[f"{split}_r2"] = float(1 - ((f - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    return out


def train_final_model(model: nn.Module, dataset: Dataset, lr: float, epochs: int, batch_size: int = 128,
                      seed: int = 0, device=None, progress: bool = False) -> list[float]:
    """Train ``model`` in place with SGD (MATH.md notation: produce θ*); returns the mean training
    loss of every epoch. Raises RuntimeError if the loss stops being finite (lr too large)."""
    lr = check_float("lr", lr, positive=True)
    epochs = check_int("epochs", epochs, min_value=1)
    batch_size = check_int("batch_size", batch_size, min_value=1)
    task = task_for(dataset)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device).train()
    x, y = dataset.x_train.to(device), dataset.y_train.to(device)
    n = x.shape[0]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    history = []
    epochs_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm
        epochs_iter = tqdm(epochs_iter, desc="final model", unit="epoch", leave=False)
    for epoch in epochs_iter:
        order = torch.randperm(n, generator=g).to(device)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = task.loss(model(x[idx]), y[idx]).mean()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.numel()
        mean = total / n
        if not math.isfinite(mean):
            raise TrainingDivergedError(f"final-model training diverged at epoch {epoch + 1} (loss {mean}); "
                               f"use a smaller learning rate than {lr}")
        history.append(mean)
    model.eval()
    return history
