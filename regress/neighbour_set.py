"""The neighbour-set head (`neighbour-set`): a function learned on each neighbour (phi), pooled, and combined with
the cell (rho).

As the winner of Crunch 1 did (DeepSpot, its single-cell variant DeepCell): each nucleus is its own features and
the set of its K nearest neighbours within a radius (`FeatureSpec(neighbour_set=K, neighbour_radius='30um')`), each
neighbour its features plus its offset and distance. phi, a small MLP, maps every present neighbour to a vector;
the vectors are pooled by their mean and their maximum over the present neighbours (which makes the head
independent of the neighbours' order and of empty slots); rho, an MLP, maps [the cell's own features, the pooled
vectors, the number of neighbours] to the standardised expression of every gene. Unlike `regress.mlp_ensemble`,
whose neighbours arrive already pooled by a fixed rule, what is pooled here is learned.

Inputs (the columns of `regress.features.sample_features` with a neighbour set):

    [own features (own_dim) | slot 1 | ... | slot K],  slot = [d base features, dy, dx, distance, present]

where the own features begin with the d base columns (base, or base | pooled context), so own_dim = width - K(d+4).
The base columns, of the cell and of every neighbour alike, go through one `ComponentInputs` (standardised,
principal components); pooled context columns, if any, through a second; offsets and distances are divided by one
common length. K = 0 is a head without a set (rho on the own features): what arrays built from no FeatureSpec are.

Training is `regress.mlp_ensemble`'s member loop: per-gene standardised targets, MSE, dropout, AdamW, mini-batches;
an ensemble of `n_members` combined by the median, each member stopped early by the held-out cell-wise Spearman on
its own whole-group tuning fold. Torch on a CPU by default (a GPU when present, or `device`); the fitted weights are
kept as numpy arrays, so prediction, a block of rows at a time, needs no torch.

As a family (`regress.families`), K and the radius are what its features hook chooses (`neighbour_features`), and
`make_neighbour_set` reads the layout from the features: they are not parameters.
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import numpy as np

from regress.components import ComponentInputs
from regress.estimator import ExpressionRegressor, Integral, Interval
from regress.features import NEIGHBOUR_GEOMETRY, FeatureSpec
from regress.metrics import cellwise_spearman
from regress.mlp_ensemble import (MEMBER_LOOP_CONSTRAINTS, fit_members, linear_layers, mlp_forward, mlp_module,
                                  torch_device, train_early_stopped)

PREDICT_ROWS = 8192  # rows transformed and predicted at a time: memory is rows x K x phi's width
# The radius measured on Xenium pancreas (leave one crop out, docs/fit.md). A radius in microns needs each sample's
# pixel size: it is known wherever a patch size is in microns (embedding needed it); where every size is in pixels,
# the set is the K nearest at any distance (a radius in pixels would mean another width of tissue on each scanner).
NEIGHBOUR_RADIUS = "30um"

Layers = list[tuple[np.ndarray, np.ndarray]]


def set_forward(phi: Layers, rho: Layers, own: np.ndarray, neighbours: np.ndarray, present: np.ndarray
                ) -> np.ndarray:
    """The trained head in numpy (evaluation mode): own (n, p), neighbours (n, K, q), present (n, K) -> (n, genes).

    phi ends in a ReLU, so its outputs are >= 0 and the maximum over the present neighbours is the maximum over all
    slots with the empty ones zeroed, and 0 (0 where none is present): no empty slot can change a pool. The number
    of neighbours enters rho as log(1 + count), which empty slots do not change either (a share of K would)."""
    n, k, q = neighbours.shape
    mask = present[:, :, None]
    h = np.maximum(mlp_forward(phi, neighbours.reshape(n * k, q)), 0).reshape(n, k, phi[-1][1].shape[0]) * mask
    count = mask.sum(1)
    pooled = [h.sum(1) / np.maximum(count, 1), h.max(1, initial=0), np.log1p(count)]
    return mlp_forward(rho, np.concatenate([own, *pooled], 1))


class NeighbourSetRegressor(ExpressionRegressor):
    """Median of `n_members` phi/rho networks on a nucleus and its neighbour set, trained on standardised targets.

    `n_neighbours` (K) and `neighbour_dim` (d, None: the own features are the base features alone, so d follows
    from the width) say the layout of X; `scale_sets` is `regress.features.scale_sets` of X's columns.
    """

    _parameter_constraints = {
        **MEMBER_LOOP_CONSTRAINTS,
        "n_neighbours": [Interval(Integral, 0, None, closed="left")],
        "neighbour_dim": [Interval(Integral, 1, None, closed="left"), None],
        "phi_hidden": ["array-like"], "phi_dim": [Interval(Integral, 1, None, closed="left")],
        "rho_hidden": ["array-like"],
    }
    _element_constraints = {"phi_hidden": [Interval(Integral, 1, None, closed="left")],
                            "rho_hidden": [Interval(Integral, 1, None, closed="left")]}

    def __init__(self, n_neighbours: int = 8, neighbour_dim: int | None = None, n_members: int = 5,
                 phi_hidden: tuple[int, ...] = (64,), phi_dim: int = 64, rho_hidden: tuple[int, ...] = (256,),
                 dropout: float = 0.2, n_feature_components: int | None = 64, batch_size: int = 256,
                 learning_rate: float = 1e-3, weight_decay: float = 1e-4, max_epochs: int = 30, patience: int = 4,
                 device: str | None = None, torch_threads: int = 1, scale_sets: np.ndarray | None = None,
                 random_state: int = 0):
        self.n_neighbours, self.neighbour_dim, self.n_members = n_neighbours, neighbour_dim, n_members
        self.phi_hidden, self.phi_dim, self.rho_hidden, self.dropout = phi_hidden, phi_dim, rho_hidden, dropout
        self.n_feature_components, self.batch_size = n_feature_components, batch_size
        self.learning_rate, self.weight_decay = learning_rate, weight_decay
        self.max_epochs, self.patience, self.device, self.torch_threads = max_epochs, patience, device, torch_threads
        self.scale_sets, self.random_state = scale_sets, random_state

    # --- the layout of X -----------------------------------------------------------------------------------------

    def _layout(self, width: int) -> tuple[int, int]:
        """(own_dim, d) for X of `width` columns, or a ValueError saying why X cannot be this head's input."""
        k, geometry = self.n_neighbours, len(NEIGHBOUR_GEOMETRY)
        d = (width - k * geometry) / (k + 1) if self.neighbour_dim is None else self.neighbour_dim
        own = width - k * (d + geometry)
        if d != int(d) or d < 1 or own < d:
            raise ValueError(f"{width} columns are not [own features | {k} x (d + {geometry})] with own features "
                             f"starting with the d base columns (neighbour_dim={self.neighbour_dim})")
        return int(own), int(d)

    def _inputs(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(own components (n, p), neighbours (n, K, q): components, dy, dx, distance scaled; present (n, K))."""
        X = np.asarray(X, dtype=np.float32)
        own_dim, d, k = self.own_dim_, self.neighbour_dim_, self.n_neighbours
        slots = X[:, own_dim:].reshape(len(X), k, d + len(NEIGHBOUR_GEOMETRY))
        present = (slots[:, :, -1] > 0).astype(np.float32)  # the flag is 1 or 0; anything else is no neighbour
        features = self.base_inputs_.transform(slots[:, :, :d].reshape(-1, d))
        features = features.reshape(len(X), k, features.shape[1])
        geometry = slots[:, :, d: d + 3] / np.float32(self.length_scale_)
        own = [self.base_inputs_.transform(X[:, :d])]
        if self.context_inputs_ is not None:
            own.append(self.context_inputs_.transform(X[:, d: own_dim]))
        neighbours = np.concatenate([features, geometry], 2) * present[:, :, None]
        return np.concatenate(own, 1), neighbours.astype(np.float32), present

    # --- fit and predict ---------------------------------------------------------------------------------------

    def fit(self, X: np.ndarray, Y: np.ndarray, groups: np.ndarray | None = None):
        X, Y = self._fit_data(X, Y)
        X, Y = np.asarray(X, dtype=np.float32), np.asarray(Y, dtype=np.float32)
        self.own_dim_, self.neighbour_dim_ = self._layout(X.shape[1])
        own_dim, d = self.own_dim_, self.neighbour_dim_

        def sets(columns: slice) -> np.ndarray | None:  # the scale sets of some columns, numbered from 0
            return None if self.scale_sets is None else np.unique(np.asarray(self.scale_sets)[columns],
                                                                  return_inverse=True)[1]

        self.base_inputs_ = ComponentInputs.fit(X[:, :d], self.n_feature_components, sets(slice(0, d)))
        self.context_inputs_ = None if own_dim == d else ComponentInputs.fit(
            X[:, d: own_dim], self.n_feature_components, sets(slice(d, own_dim)))
        slots = X[:, own_dim:].reshape(len(X), self.n_neighbours, d + len(NEIGHBOUR_GEOMETRY))
        distances = slots[:, :, d + 2][slots[:, :, -1] > 0]
        spread = float(np.sqrt(np.mean(distances ** 2))) if len(distances) else 0.0
        self.length_scale_ = spread if spread > 0 else 1.0  # no neighbour (or all at one point): offsets as given
        inputs = list(self._inputs(X))
        self.y_mean_, self.y_scale_ = Y.mean(0), np.maximum(Y.std(0), 1e-3).astype(np.float32)
        T = ((Y - self.y_mean_) / self.y_scale_).astype(np.float32)
        fit_members(self, len(X), groups, lambda valid, seed: self._train_member(inputs, T, Y, valid, seed))
        self._set_clip(Y)
        return self

    def _network(self, own_width: int, neighbour_width: int, n_genes: int):
        """(phi, rho) as torch modules."""
        phi = mlp_module([neighbour_width, *self.phi_hidden, self.phi_dim], self.dropout, last_relu=True)
        rho = mlp_module([own_width + 2 * self.phi_dim + 1, *self.rho_hidden, n_genes], self.dropout)
        return phi, rho

    @staticmethod
    def _torch_forward(phi, rho, own, neighbours, present):
        """`set_forward` in torch (the same pools), for training."""
        import torch

        mask = present.unsqueeze(-1)
        h = phi(neighbours) * mask
        count = mask.sum(1)
        highest = torch.nn.functional.pad(h, (0, 0, 0, 1)).amax(1)  # one empty slot more: 0 where none (or K = 0)
        return rho(torch.cat([own, h.sum(1) / count.clamp(min=1), highest, torch.log1p(count)], 1))

    def _train_member(self, inputs: list[np.ndarray], T: np.ndarray, Y: np.ndarray, valid: np.ndarray, seed: int
                      ) -> tuple[tuple[Layers, Layers], int, float, int]:
        """One phi/rho pair, stopped where its held-out cell-wise Spearman peaked (`train_early_stopped`): ((phi, rho)
        as numpy, its epochs, its score, the epochs run)."""
        import torch

        torch.manual_seed(seed)
        device = torch_device(self.device)
        phi, rho = (m.to(device) for m in self._network(inputs[0].shape[1], inputs[1].shape[2], T.shape[1]))
        return train_early_stopped(
            self, [phi, rho], lambda *rows: self._torch_forward(phi, rho, *rows), inputs, T, valid, seed,
            lambda: (linear_layers(phi), linear_layers(rho)),
            lambda layers, held: cellwise_spearman(Y[held], self._member_predict(layers, *(a[held] for a in inputs))))

    def _member_predict(self, layers: tuple[Layers, Layers], own, neighbours, present) -> np.ndarray:
        return set_forward(*layers, own, neighbours, present) * self.y_scale_ + self.y_mean_

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = self._predict_data(X)
        out = np.empty((len(X), len(self.y_mean_)), dtype=np.float32)
        for start in range(0, len(X), PREDICT_ROWS):  # a block of rows at a time: K x phi's width per row
            inputs = self._inputs(X[start: start + PREDICT_ROWS])
            members = [self._member_predict(layers, *inputs) for layers in self.members_]
            out[start: start + PREDICT_ROWS] = np.median(members, axis=0)
        return self._clip(out)


# --- the family's hooks (regress.families) -------------------------------------------------------------------------

def neighbour_features(spec: FeatureSpec, context: bool) -> FeatureSpec:
    """What the family reads: the settings' spec with its pooled context (the cell's own features, as measured), and
    the set of the estimator's default K nearest neighbours within NEIGHBOUR_RADIUS where the patch sizes are in
    microns, at any distance where they are in pixels."""
    k = inspect.signature(NeighbourSetRegressor).parameters["n_neighbours"].default
    microns = any(size.unit == "um" for _, size in spec.keys)
    own = spec.without_neighbour_set() if context else spec.without_context()
    return replace(own, neighbour_set=k, neighbour_radius=NEIGHBOUR_RADIUS if microns else None)


def make_neighbour_set(params: dict, layout) -> NeighbourSetRegressor:
    """The estimator for a `regress.families.InputLayout`: K and d from the features it reads (K = 0 for inputs
    built from no FeatureSpec); `n_neighbours` and `neighbour_dim` are refused as parameters, since they must
    describe the matrix the features hook chose."""
    fixed = sorted({"n_neighbours", "neighbour_dim"} & set(params))
    if fixed:
        raise ValueError(f"neighbour-set: {', '.join(fixed)} follow from its features (the {NEIGHBOUR_RADIUS} "
                         "neighbour set of regress.neighbour_set.neighbour_features), not a parameter")
    k = layout.features.neighbour_set if layout.features is not None else 0
    return NeighbourSetRegressor(n_neighbours=k, neighbour_dim=layout.base_dim if k else None,
                                 scale_sets=layout.scale_sets, **params)
