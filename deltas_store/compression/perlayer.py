"""Per-layer analytic q (DAREx-q Algorithm 3, ALGORITHMS.md): pure tensor functions over row statistics.

For a Linear layer with weight delta δ (out, in), bias delta δ_b (out,) and mean calibration input x̄ (in,),
c_ij = δ_ij·x̄_j (the bias delta is one more column with input 1). Per output row i only two sums matter:
S1_i = Σ_j c_ij and S2_i = Σ_j c_ij². Each row's q minimises

    | η(1 − k/q)·S1_i + η²·Φ(p)·S2_i/(4q²) + ln(2/0.05) |,   Φ(p) = (1 − 2p)/ln((1 − p)/p)

over q = k, k + 0.001, ..., 0.998; the layer's q is the mean of its rows' q.

`signed=False` is a measured variant, not the specification: S1_i is replaced by |S1_i|. As specified, a row
whose S1_i < 0 has an objective whose first term is negative and falls with q, so the scan runs to 0.998
unless ηS1_i is large enough to cross zero; with |S1_i| every row has the interior optimum
q = ηΦ(p)S2_i/(2k|S1_i|) (clipped to [k, 0.998]). bench/quality.py reports both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

Q_MAX = 0.998
Q_STEP = 0.001
STOP_FRACTION = 0.8  # the scan stops once this fraction of rows stopped improving
_CONFIDENCE = math.log(2 / 0.05)
_ROW_CHUNK = 4096


@dataclass
class RowSums:
    """S1 and S2 of every output row of one Linear layer, accumulated over its weight and bias deltas."""

    s1: torch.Tensor  # (out,) float64
    s2: torch.Tensor  # (out,) float64

    @classmethod
    def zeros(cls, rows: int) -> RowSums:
        return cls(torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64))

    def add_weight_(self, delta: torch.Tensor, mean_input: torch.Tensor) -> None:
        """Accumulate c = δ·x̄ of a weight delta (out, in) and the mean input per feature (in,)."""
        c = delta.double() * mean_input.double().unsqueeze(0)  # (out, in)
        self.s1 += c.sum(dim=1)
        self.s2 += c.pow(2).sum(dim=1)

    def add_bias_(self, delta: torch.Tensor) -> None:
        """The bias delta is a column whose input is always 1."""
        d = delta.double()
        self.s1 += d
        self.s2 += d.pow(2)


def phi(drop_rate: float) -> float:
    """Φ(p) = (1 − 2p)/ln((1 − p)/p), continuous at p = 0.5 (Φ = 0.5)."""
    if not 0.0 < drop_rate < 1.0:
        raise ValueError(f"drop rate must be in (0, 1), got {drop_rate}")
    if abs(drop_rate - 0.5) < 1e-9:
        return 0.5
    return (1 - 2 * drop_rate) / math.log((1 - drop_rate) / drop_rate)


def q_grid(density: float) -> torch.Tensor:
    """q = k, k + 0.001, ..., up to 0.998 (just k when k > 0.998)."""
    steps = max(math.floor((Q_MAX - density) / Q_STEP + 1e-9), 0)
    return density + Q_STEP * torch.arange(steps + 1, dtype=torch.float64)


def _objective(
    sums: RowSums, q: torch.Tensor, density: float, eta: float, phi_p: float, signed: bool
) -> torch.Tensor:
    # |a_i·(1 − k/q) + b_i/q² + C| with a = η·S1, b = η²·Φ(p)·S2/4, in float64: near η → 0 the q-dependent
    # part is far below float32's resolution of C.
    s1 = sums.s1 if signed else sums.s1.abs()
    a = (eta * s1).double().unsqueeze(1)  # (rows, 1)
    b = (eta**2 * phi_p / 4 * sums.s2).double().unsqueeze(1)
    inv = (1.0 / q).double().unsqueeze(0)  # (1, m)
    return torch.addcmul(torch.addcmul(a + _CONFIDENCE, a, inv, value=-density), b, inv * inv).abs()


def row_q(sums: RowSums, drop_rate: float, eta: float, signed: bool = True) -> torch.Tensor:
    """Each row's q (float64, in [k, 0.998]) by the scan of Algorithm 3.

    The scan walks q upwards; a row has stopped improving once its objective at some q is not below its best
    so far. The scan ends at the first q where 80% of the rows have stopped; each row's q is its best over
    the q's scanned until then.
    """
    density = 1.0 - drop_rate
    grid = q_grid(density)
    rows = sums.s1.numel()
    if rows == 0:
        return torch.empty(0, dtype=torch.float64)
    phi_p = phi(drop_rate)
    # Pass 1: the step at which each row first fails to improve (m when it never does).
    first_stop = torch.empty(rows, dtype=torch.int64)
    for start in range(0, rows, _ROW_CHUNK):
        chunk = RowSums(sums.s1[start : start + _ROW_CHUNK], sums.s2[start : start + _ROW_CHUNK])
        f = _objective(chunk, grid, density, eta, phi_p, signed)  # (rows, m)
        best_before = torch.cummin(f, dim=1).values[:, :-1]  # best over q_0..q_{t-1}, for t = 1..m-1
        stopped = f[:, 1:] >= best_before  # (rows, m - 1)
        any_stop = stopped.any(dim=1)
        first = stopped.to(torch.int8).argmax(dim=1) + 1
        first_stop[start : start + _ROW_CHUNK] = torch.where(any_stop, first, grid.numel())
    # The scan's last step: the first t at which STOP_FRACTION of the rows have stopped.
    needed = math.ceil(STOP_FRACTION * rows)
    last = min(int(torch.sort(first_stop).values[needed - 1]), grid.numel() - 1)
    out = torch.empty(rows, dtype=torch.float64)
    for start in range(0, rows, _ROW_CHUNK):
        chunk = RowSums(sums.s1[start : start + _ROW_CHUNK], sums.s2[start : start + _ROW_CHUNK])
        f = _objective(chunk, grid[: last + 1], density, eta, phi_p, signed)
        out[start : start + _ROW_CHUNK] = grid[f.argmin(dim=1)]
    return out


def layer_q(sums: RowSums, drop_rate: float, eta: float, signed: bool = True) -> float:
    """The layer's q: the mean of its rows' q."""
    return float(row_q(sums, drop_rate, eta, signed).mean())


def per_tensor_q(
    sums: dict[str, RowSums],
    tensors_of: dict[str, tuple[str, ...]],
    all_tensors: tuple[str, ...],
    drop_rate: float,
    eta: float,
    signed: bool = True,
) -> dict[str, float]:
    """q for every tensor in all_tensors: a Linear layer's q for its weight and bias, the mean layer q for
    every other tensor (embeddings, norms); k when there is no Linear layer at all.

    sums is keyed by layer; tensors_of maps a layer to its tensor names.
    """
    layers = {layer: layer_q(s, drop_rate, eta, signed) for layer, s in sums.items()}
    fallback = sum(layers.values()) / len(layers) if layers else 1.0 - drop_rate
    of_layer = {
        name: layers[layer] for layer, names in tensors_of.items() if layer in layers for name in names
    }
    return {name: of_layer.get(name, fallback) for name in all_tensors}
