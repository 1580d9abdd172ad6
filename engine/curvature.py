"""Curvature strategies: how a layer's Fisher block H is approximated and inverted.

Each strategy names the statistics it needs (fitting passes) and applies ``(H + d I)^-1`` to a
gradient-shaped matrix V (..., out, in[+1]). Adding a strategy is adding one class to
``STRATEGIES``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class LayerFactors:
    """Fitted statistics of one tracked layer (any field may be None if its strategy skips it).

    A = E[a a^T] (per token), S = sum_t E[g g^T] per sequence, A = Q_A diag(lambda_A) Q_A^T,
    S = Q_S diag(lambda_S) Q_S^T, Lambda = E[(Q_S^T G Q_A)^2] (per sequence), diagonal = E[G^2].
    """

    activation_covariance: torch.Tensor | None = None
    gradient_covariance: torch.Tensor | None = None
    activation_eigenvectors: torch.Tensor | None = None
    activation_eigenvalues: torch.Tensor | None = None
    gradient_eigenvectors: torch.Tensor | None = None
    gradient_eigenvalues: torch.Tensor | None = None
    corrected_eigenvalues: torch.Tensor | None = None
    diagonal: torch.Tensor | None = None
    # a truncated eigenbasis (``Curvature.truncate``) keeps the whole spectrum's mean (0-d), so that
    # relative damping stays that of the full factors
    mean_eigenvalue: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}


def _rotate(v: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    """Q_S^T V Q_A: V in the Kronecker eigenbasis."""
    return q_s.transpose(0, 1) @ v @ q_a


def _unrotate(v: torch.Tensor, q_s: torch.Tensor, q_a: torch.Tensor) -> torch.Tensor:
    return q_s @ v @ q_a.transpose(0, 1)


class Curvature(ABC):
    name: str
    passes: tuple[str, ...]  # statistics to fit: "covariance", "correction", "diagonal"

    @abstractmethod
    def eigenvalues(self, f: LayerFactors) -> torch.Tensor | None:
        """The approximate Fisher's eigenvalues (for relative damping); None if H = I."""

    @abstractmethod
    def precondition(self, f: LayerFactors, v: torch.Tensor, damping: float) -> torch.Tensor:
        """(H + damping * I)^-1 V."""

    def to_eigenbasis(self, f: LayerFactors, v: torch.Tensor) -> torch.Tensor:
        """V in the basis where H is diagonal with ``eigenvalues`` (an orthogonal change)."""
        return v

    def basis(self, f: LayerFactors) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(Q_S, Q_A) with ``to_eigenbasis(V) = Q_S^T V Q_A``; None stands for the identity."""
        return None, None

    def truncate(self, f: LayerFactors, keep: float) -> LayerFactors:
        """Factors holding less: only Kronecker-factored strategies have an eigenbasis to truncate."""
        raise ValueError(f"{self.name} has no eigenbasis to truncate")


class EKFAC(Curvature):
    """H = (Q_A x Q_S) diag(Lambda) (Q_A x Q_S)^T with Lambda fitted per sequence (George et al.)."""

    name, passes = "ekfac", ("covariance", "correction")

    def eigenvalues(self, f):
        return f.corrected_eigenvalues

    def to_eigenbasis(self, f, v):
        return _rotate(v, f.gradient_eigenvectors.to(v), f.activation_eigenvectors.to(v))

    def basis(self, f):
        return f.gradient_eigenvectors, f.activation_eigenvectors

    def precondition(self, f, v, damping):
        q_s = f.gradient_eigenvectors.to(v)
        q_a = f.activation_eigenvectors.to(v)
        lam = self.eigenvalues(f).to(v)
        rotated = _rotate(v, q_s, q_a)
        if q_s.shape[0] == q_s.shape[1] and q_a.shape[0] == q_a.shape[1]:
            return _unrotate(rotated / (lam + damping), q_s, q_a)
        # truncated: 1/d outside the kept pairs, 1/(Lambda + d) on them (1/(Lambda+d) - 1/d added back)
        return v / damping - _unrotate(rotated * lam / (damping * (lam + damping)), q_s, q_a)

    def truncate(self, f, keep):
        """The eigenvectors of each Kronecker factor with its largest ``keep`` share of eigenvalues,
        exactly, with the eigenvalues of the kept pairs; the directions outside them get damping
        alone ((H + d I)^-1 = 1/d there, as if their eigenvalues were 0). Holds about ``keep``^2 of
        the eigenvalues and ``keep`` of the eigenvectors."""
        if not 0 < keep <= 1:
            raise ValueError(f"keep a share of the eigenvectors in (0, 1], got {keep}")
        s = _top(f.gradient_eigenvalues, keep)
        a = _top(f.activation_eigenvalues, keep)
        corrected = f.corrected_eigenvalues
        mean = f.mean_eigenvalue if f.mean_eigenvalue is not None else self.eigenvalues(f).double().mean()
        return LayerFactors(activation_eigenvectors=f.activation_eigenvectors[:, a],
                            activation_eigenvalues=f.activation_eigenvalues[a],
                            gradient_eigenvectors=f.gradient_eigenvectors[:, s],
                            gradient_eigenvalues=f.gradient_eigenvalues[s],
                            corrected_eigenvalues=None if corrected is None else corrected[s][:, a],
                            mean_eigenvalue=mean.reshape(()))


class KFAC(EKFAC):
    """H = A x S: EK-FAC's basis with eigenvalues lambda_S lambda_A^T instead of the correction."""

    name, passes = "kfac", ("covariance",)

    def eigenvalues(self, f):
        lam = torch.outer(f.gradient_eigenvalues, f.activation_eigenvalues)
        return lam.clamp_min(0.0)


class Diagonal(Curvature):
    """H = diag(E[G^2]): the diagonal of the per-sequence Fisher."""

    name, passes = "diagonal", ("diagonal",)

    def eigenvalues(self, f):
        return f.diagonal

    def precondition(self, f, v, damping):
        return v / (f.diagonal.to(v) + damping)


class Identity(Curvature):
    """H ignored: the gradient itself (gradient dot product)."""

    name, passes = "identity", ()

    def eigenvalues(self, f):
        return None

    def precondition(self, f, v, damping):
        return v


STRATEGIES: dict[str, Curvature] = {c.name: c for c in (EKFAC(), KFAC(), Diagonal(), Identity())}


def get_strategy(name: str) -> Curvature:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown curvature strategy {name!r}; choose from {sorted(STRATEGIES)}") from None


def relative_damping(strategy: Curvature, f: LayerFactors, factor: float) -> float:
    """lambda = factor * mean eigenvalue of the layer's approximate Fisher (of the full spectrum, for a
    truncated eigenbasis)."""
    if f.mean_eigenvalue is not None:
        return float(factor * f.mean_eigenvalue.double())
    lam = strategy.eigenvalues(f)
    return float(factor * (lam.double().mean() if lam is not None else 1.0))


def _top(eigenvalues: torch.Tensor, keep: float) -> torch.Tensor:
    """Indices of the largest ``keep`` share of ``eigenvalues`` (at least one), in their stored order."""
    count = max(1, math.ceil(keep * len(eigenvalues)))
    return torch.sort(torch.topk(eigenvalues.double(), count).indices).values
