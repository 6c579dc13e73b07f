"""Variational dequantization (Ho et al. 2019, Flow++, section 3.1) as the flow's first bijection.

The flow's input stays the uniformly dequantized y = (x + eps) / L with L = 2**n_bits, x the
integer image and eps ~ U[0, 1)^D (keyed noise where the caller needs it), so nothing outside
flowmodel changes. VariationalDequantization then maps, per element,

    x = floor(y L),  eps = y L - x,  u = g(eps; x),  y' = (x + u) / L,

with g(.; x) a monotone bijection of [0, 1] onto itself conditioned on the whole integer image x
(a small conv net over x): a piecewise-linear CDF with K bins uniform in eps and learned widths w
in u (Mueller et al. 2019, "Neural importance sampling", section 3.1). Its derivative on bin k is
K w_k, so log|det dy'/dy| = sum log(K w_k): the 1/L and L of the two scalings cancel.

Why the bits/dim stay an honest bound. Let p be the density of the rest of the flow, so the whole
flow's is p_T(y) = p(T(y)) |det T'(y)|. T maps each integer cell onto itself, so the mass of cell
x under p_T is the cell mass P(x) of p itself, and the uniform-dequantization bound the flow
reports, E_eps[-log p_T(y)] - D ln L >= -log P(x) (Jensen; Theis et al. 2016), bounds -log P(x).
In u it is Flow++'s variational bound with q(u | x) = 1 / prod g'(eps); the importance-weighted
bound over K draws holds for the same reason. Unlike Flow++'s q, this one is factorised over
elements given x: cheaper, and it still removes the uniform noise's worst waste.

Float32 cell edges: y L is exact (L is a power of two), so floor and frac are exact; x + u can
round up to x + 1 when u is within an ulp of 1, so y' is clamped to the largest float below the
cell's upper edge, and the inverse clamps x to [0, L - 1] and frac to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmodel.layers import Bijection, zero_conv


class VariationalDequantization(Bijection):
    """The cell-preserving bijection y -> y' = (x + g(eps; x)) / 2**n_bits described above.

    Starts as the identity (zero-initialised last conv: equal widths, g(eps) = eps), so a flow with
    it scores exactly as with uniform dequantization until training moves it.

    Args:
        channels: C of the images.
        n_bits: bits per pixel the flow sees.
        bins: K, the number of linear pieces of g.
        hidden: width of the conditioning net (3x3 conv -> 1x1 conv -> zero-initialised 3x3 conv,
            ReLU between): it runs at full resolution, so it is kept narrow.
        min_width: each bin's width in u is at least min_width / K, so log g' >= log(min_width);
            it also bounds how much float32 rounding of u the inverse amplifies (by 1 / min_width).
    """

    def __init__(
        self,
        channels: int,
        n_bits: int,
        bins: int = 8,
        hidden: int = 16,
        min_width: float = 1e-2,
    ) -> None:
        super().__init__()
        if bins < 1 or not 0 < min_width < 1:
            raise ValueError(f"bins >= 1 and 0 < min_width < 1, found {bins}, {min_width}")
        self.levels = 2**n_bits
        self.bins = bins
        self.min_width = min_width
        last = zero_conv(hidden, channels * bins)  # before the other convs: fixes their random init
        self.net = nn.Sequential(
            nn.Conv2d(channels, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(inplace=True),
            last,
        )

    def _cell(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(x, frac) with x = floor(y L) in [0, L - 1] and frac = y L - x in [0, 1]; x carries no
        gradient (it is piecewise constant in y)."""
        v = y * self.levels
        x = torch.floor(v.detach()).clamp(0, self.levels - 1)
        return x, (v - x).clamp(0, 1)

    def _widths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(widths, left edges) of the bins in u, each [B, C, H, W, K], from the integer image x."""
        b, c, h, w = x.shape
        logits = self.net(x * (2 / (self.levels - 1 or 1)) - 1)  # x scaled to [-1, 1]
        logits = logits.view(b, c, self.bins, h, w).permute(0, 1, 3, 4, 2)
        widths = self.min_width / self.bins + (1 - self.min_width) * F.softmax(logits, dim=-1)
        # Left edges as the running sum shifted by one, so bin k's left edge is bitwise the edge
        # the inverse compares u against: eps on a bin edge round-trips into the same bin.
        right = torch.cumsum(widths, dim=-1)
        return widths, F.pad(right[..., :-1], (1, 0))

    def _upper(self, x: Tensor) -> Tensor:
        """The largest float below each cell's upper edge (x + 1) / L."""
        edge = (x + 1) / self.levels
        return torch.nextafter(edge, torch.zeros_like(edge))

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x, eps = self._cell(y)
        widths, left = self._widths(x)
        k = (eps * self.bins).detach().floor().clamp(0, self.bins - 1).long().unsqueeze(-1)
        w_k = widths.gather(-1, k).squeeze(-1)
        u = left.gather(-1, k).squeeze(-1) + w_k * (eps * self.bins - k.squeeze(-1))
        y_out = torch.minimum((x + u) / self.levels, self._upper(x))
        return y_out, torch.log(w_k * self.bins).flatten(1).sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x, u = self._cell(z)
        widths, left = self._widths(x)
        # The bin of u: how many inner bin edges (left edges of bins 1..K-1) lie at or below u.
        k = (u.unsqueeze(-1) >= left[..., 1:]).sum(-1, keepdim=True)
        w_k = widths.gather(-1, k).squeeze(-1)
        eps = (k.squeeze(-1) + (u - left.gather(-1, k).squeeze(-1)) / w_k) / self.bins
        y = torch.minimum((x + eps.clamp(0, 1)) / self.levels, self._upper(x))
        return y, -torch.log(w_k * self.bins).flatten(1).sum(1)
