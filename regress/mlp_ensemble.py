"""The MLP ensemble (`mlp-ensemble`, formerly `deepsets`): small MLPs on a nucleus' features and its neighbours'
pooled ones, combined by the median.

Each nucleus is its own feature blocks plus the mean and max of its neighbours' within one or two radii, pooled by
a fixed rule when the features are built (`FeatureSpec(context_radius=(r1, r2), context_pool=('mean', 'max'))`):
nothing about the neighbours is learned here. Per-gene standardised targets, MSE, dropout, and several MLPs
combined by the median, as DeepSpot's ensemble does.

Each member trains with torch in mini-batches on a CPU or a GPU and stops early on its own whole-sample tuning fold
(the groups, whole samples or spatial blocks, are split into as many folds as there are members, at most one per
group, and member i holds out fold i modulo their number: every group is held out by some member), by the held-out
cell-wise Spearman. The fitted weights are kept as numpy arrays: prediction is numpy alone, and a saved model loads
without torch.

The member loop is also a set of helpers another torch head calls (`fit_members`, `train_early_stopped`,
`mlp_module`, `linear_layers`, `torch_device`), so every head trains by the same protocol.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import numpy as np

from regress.components import ComponentInputs
from regress.estimator import ExpressionRegressor, Integral, Interval, Real
from regress.metrics import cellwise_spearman
from regress.splits import member_holdouts, scored_rows

TUNING_ROWS = 3000  # held-out rows scored after each epoch


@contextmanager
def _torch_threads(threads: int):
    """torch's intra-op threads set for the duration, then restored (it is process-wide)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def torch_device(name: str | None):
    """The torch device named (None: the GPU where there is one, else the CPU)."""
    import torch

    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def fit_members(estimator, n_rows: int, groups: np.ndarray | None, train_member: Callable) -> None:
    """`estimator.members_`, with their `epochs_`, `tuning_scores_` and `epoch_seconds_`: one member per held-out
    fold of `member_holdouts` (`estimator.n_members`, `.random_state`), each from `train_member(held-out rows,
    seed)` -> (weights, its epochs, its score, the epochs run), on `estimator.torch_threads` threads."""
    estimator.members_, estimator.epochs_, estimator.tuning_scores_, estimator.epoch_seconds_ = [], [], [], []
    with _torch_threads(estimator.torch_threads):
        for member, valid in enumerate(member_holdouts(n_rows, groups, estimator.n_members, estimator.random_state)):
            start = time.perf_counter()
            weights, epochs, score, ran = train_member(valid, estimator.random_state + member)
            estimator.epoch_seconds_.append((time.perf_counter() - start) / ran)  # training and scoring one epoch
            estimator.members_.append(weights)
            estimator.epochs_.append(epochs)
            estimator.tuning_scores_.append(score)


def train_early_stopped(estimator, networks: list, forward: Callable, inputs: list[np.ndarray], T: np.ndarray,
                        valid: np.ndarray, seed: int, snapshot: Callable, held_score: Callable
                        ) -> tuple[object, int, float, int]:
    """One member: `forward(*input rows)` fitted to the standardised targets T by MSE, AdamW on the `networks`'
    parameters in mini-batches (the estimator's `learning_rate`, `weight_decay`, `batch_size`, `max_epochs`,
    `device`), on the rows not in `valid`. After each epoch `snapshot()` (the weights as numpy) is scored by
    `held_score(weights, held rows)` (cell-wise Spearman per row) on at most TUNING_ROWS of `valid`; training stops
    `estimator.patience` epochs after the best. Returns (the best weights, their epoch, their score, epochs run)."""
    import torch

    device = torch_device(estimator.device)
    parameters = [p for network in networks for p in network.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=estimator.learning_rate, weight_decay=estimator.weight_decay)
    train = np.flatnonzero(~valid)
    held = scored_rows(np.flatnonzero(valid), TUNING_ROWS, seed)
    tensors = [torch.from_numpy(a[train]).to(device) for a in inputs]
    targets = torch.from_numpy(T[train]).to(device)
    generator = torch.Generator().manual_seed(seed)
    best, best_weights, best_epoch, stale = -np.inf, None, 0, 0
    for epoch in range(1, estimator.max_epochs + 1):
        for network in networks:
            network.train()
        for batch in torch.randperm(len(train), generator=generator).split(estimator.batch_size):
            batch = batch.to(device)
            loss = torch.nn.functional.mse_loss(forward(*(t[batch] for t in tensors)), targets[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        weights = snapshot()
        score = float(np.mean(held_score(weights, held))) if len(held) else -float(loss)
        if best_weights is None or score > best:  # a member always keeps some weights
            best, best_weights, best_epoch, stale = score, weights, epoch, 0
        else:
            stale += 1
            if stale >= estimator.patience:
                break
    return best_weights, best_epoch, best, epoch


def mlp_module(widths: list[int], dropout: float, last_relu: bool = False):
    """torch layers widths[0] -> ... -> widths[-1]: Linear, ReLU and Dropout between, a ReLU after the last if
    `last_relu`; `mlp_forward` is its numpy twin (given its `linear_layers`)."""
    from torch import nn

    blocks: list[nn.Module] = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        blocks += [nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*blocks, nn.Linear(widths[-2], widths[-1]), *([nn.ReLU()] if last_relu else []))


def linear_layers(network) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (weight as in x @ weight, bias) of each Linear layer of a torch Sequential, as numpy copies."""
    from torch import nn

    return [(m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy())
            for m in network if isinstance(m, nn.Linear)]


def mlp_forward(layers: list[tuple[np.ndarray, np.ndarray]], Z: np.ndarray) -> np.ndarray:
    """The trained network in numpy (evaluation mode: dropout off), ReLU between layers."""
    out = Z
    for i, (weight, bias) in enumerate(layers):
        out = out @ weight + bias
        if i < len(layers) - 1:
            np.maximum(out, 0, out=out)
    return out


# The parameters of every head trained by `fit_members` / `train_early_stopped`, as `_parameter_constraints`
MEMBER_LOOP_CONSTRAINTS = {
    "n_members": [Interval(Integral, 1, None, closed="left")],
    "dropout": [Interval(Real, 0, 1, closed="left")],
    "n_feature_components": [Interval(Integral, 1, None, closed="left"), None],
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "learning_rate": [Interval(Real, 0, None, closed="neither")],
    "weight_decay": [Interval(Real, 0, None, closed="left")],
    "max_epochs": [Interval(Integral, 1, None, closed="left")],
    "patience": [Interval(Integral, 1, None, closed="left")], "device": [str, None],
    "torch_threads": [Interval(Integral, 1, None, closed="left")], "scale_sets": ["array-like", None],
    "random_state": [Interval(Integral, 0, None, closed="left")],
}


class MLPEnsembleRegressor(ExpressionRegressor):
    """Median of `n_members` MLPs (`hidden` units per hidden layer, `dropout`) trained on standardised targets."""

    _parameter_constraints = {**MEMBER_LOOP_CONSTRAINTS, "hidden": ["array-like"]}
    _element_constraints = {"hidden": [Interval(Integral, 1, None, closed="left")]}

    def __init__(self, n_members: int = 5, hidden: tuple[int, ...] = (256, 256), dropout: float = 0.2,
                 n_feature_components: int | None = 256, batch_size: int = 256, learning_rate: float = 1e-3,
                 weight_decay: float = 1e-4, max_epochs: int = 40, patience: int = 4, device: str | None = None,
                 torch_threads: int = 1, scale_sets: np.ndarray | None = None, random_state: int = 0):
        self.n_members, self.hidden, self.dropout = n_members, hidden, dropout
        self.n_feature_components, self.batch_size = n_feature_components, batch_size
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.max_epochs, self.patience, self.device = max_epochs, patience, device
        # Small layers gain nothing from a second CPU thread and lose much when the cores are busy: one epoch of
        # 4,500 rows took 0.25 s on one thread and 3.1 s on two on a loaded 2-core machine.
        self.torch_threads = torch_threads
        self.scale_sets, self.random_state = scale_sets, random_state

    def fit(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None = None):
        X, Y = self._fit_data(X, Y)
        X, Y = np.asarray(X, dtype=np.float32), np.asarray(Y, dtype=np.float32)
        self.inputs_ = ComponentInputs.fit(X, self.n_feature_components, self.scale_sets)
        Z = self.inputs_.transform(X)
        self.y_mean_, self.y_scale_ = Y.mean(0), np.maximum(Y.std(0), 1e-3).astype(np.float32)
        T = ((Y - self.y_mean_) / self.y_scale_).astype(np.float32)
        fit_members(self, len(Z), groups, lambda valid, seed: self._train_member(Z, T, Y, valid, seed))
        self._set_clip(Y)
        return self

    def _train_member(self, Z: np.ndarray, T: np.ndarray, Y: np.ndarray, valid: np.ndarray, seed: int
                      ) -> tuple[list, int, float, int]:
        """One MLP, stopped where its held-out cell-wise Spearman peaked: (layers as numpy, its epochs, its score,
        the epochs run)."""
        import torch

        torch.manual_seed(seed)
        network = mlp_module([Z.shape[1], *self.hidden, T.shape[1]], self.dropout).to(torch_device(self.device))
        return train_early_stopped(
            self, [network], network, [Z], T, valid, seed, lambda: linear_layers(network),
            lambda layers, held: cellwise_spearman(Y[held], self._destandardise(mlp_forward(layers, Z[held]))))

    def _destandardise(self, T: np.ndarray) -> np.ndarray:
        return T * self.y_scale_ + self.y_mean_

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = self._predict_data(X)
        Z = self.inputs_.transform(X)
        members = np.stack([self._destandardise(mlp_forward(layers, Z)) for layers in self.members_])
        return self._clip(np.median(members, axis=0))
