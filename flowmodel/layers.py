"""Invertible layers of a Glow-style flow. Every layer keeps one contract:

    forward(x) -> (z, logdet)      inverse(z) -> (x, logdet)

where logdet = log|det dz/dx| (or log|det dx/dz| for inverse) per sample, shape [B].

References:
    Dinh et al. 2017, "Density estimation using Real NVP" (coupling, masks, squeeze, logit).
    Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Bijection(nn.Module):
    """Base class of the contract above."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


def _per_sample(value: Tensor, x: Tensor) -> Tensor:
    """A scalar log-det (the same for every sample) as shape [B]."""
    return value.expand(x.shape[0])


def zero_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3x3 convolution that starts at zero, so the layer it ends starts as the identity (or as
    N(0, I) for a prior; Glow, section 3.3)."""
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class Shift(Bijection):
    """z = y - 0.5: centres dequantized images (Glow). Volume preserving."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x - 0.5, x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z + 0.5, z.new_zeros(z.shape[0])


class Logit(Bijection):
    """z = logit(alpha + (1 - 2 alpha) y) (RealNVP's preprocessing).

    log|dz/dy| = log(1 - 2 alpha) - log p - log(1 - p) with p = alpha + (1 - 2 alpha) y, summed over
    every dimension: this term belongs to the density of y and is never dropped.

    1 - p is computed as alpha + (1 - 2 alpha)(1 - y), not by subtracting p from 1: with a small
    alpha (MAF's 1e-6) p lies within 1e-6 of 1 in the top cell, where p's float32 rounding error is
    a few percent of 1 - p, while 1 - y is exact in float32 for y >= 0.5 (Sterbenz).
    """

    def __init__(self, alpha: float) -> None:
        super().__init__()
        self.alpha = alpha

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p = self.alpha + (1 - 2 * self.alpha) * x
        q = self.alpha + (1 - 2 * self.alpha) * (1 - x)  # 1 - p
        log_p, log_q = torch.log(p), torch.log(q)
        z = log_p - log_q
        ldj = math.log(1 - 2 * self.alpha) - log_p - log_q
        return z, ldj.flatten(1).sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        p = torch.sigmoid(z)
        x = (p - self.alpha) / (1 - 2 * self.alpha)
        # log|dx/dz| = log p + log(1 - p) - log(1 - 2 alpha), with log(1 - p) = logsigmoid(-z).
        ldj = F.logsigmoid(z) + F.logsigmoid(-z) - math.log(1 - 2 * self.alpha)
        return x, ldj.flatten(1).sum(1)


class Squeeze(Bijection):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 patch becomes 4 channels. A permutation."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2)  # (B, C, H/2, 2, W/2, 2)
        x = x.permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, H/2, W/2)
        return x.reshape(b, 4 * c, h // 2, w // 2), x.new_zeros(b)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        b, c4, h, w = z.shape
        c = c4 // 4
        z = z.view(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)  # (B, C, H/2, 2, W/2, 2)
        return z.reshape(b, c, 2 * h, 2 * w), z.new_zeros(b)


class ActNorm(Bijection):
    """z = (x + loc) * exp(log_scale), per channel; log-det = H * W * sum(log_scale).

    Starts as the identity. `start_init()` arms a data-dependent initialisation: the next forward
    sets loc and log_scale so that its batch leaves with zero mean and unit variance per channel.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # A buffer, so a checkpoint records that the init happened.
        self.register_buffer("initialized", torch.tensor(False))
        self._init_armed = False

    def start_init(self) -> None:
        self._init_armed = True

    @torch.no_grad()
    def _data_init(self, x: Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True)
        self.loc.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + 1e-6))
        self.initialized.fill_(True)
        self._init_armed = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._init_armed:
            self._data_init(x)
        h, w = x.shape[2:]
        ldj = self.log_scale.sum() * (h * w)
        return (x + self.loc) * torch.exp(self.log_scale), _per_sample(ldj, x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        h, w = z.shape[2:]
        ldj = -self.log_scale.sum() * (h * w)
        return z * torch.exp(-self.log_scale) - self.loc, _per_sample(ldj, z)


class InvConv1x1(Bijection):
    """Invertible 1x1 convolution with an LU-decomposed weight (Glow, section 3.2).

    W = P L (U + diag(sign_s * exp(log_s))) with P a fixed permutation, L unit lower triangular
    and U strictly upper triangular, so log|det W| = sum(log_s) with no per-step determinant.
    Initialised at a random rotation (orthogonal, log-det 0).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower.float())
        self.upper = nn.Parameter(torch.triu(upper, 1).float())
        self.log_s = nn.Parameter(torch.log(torch.abs(s)).float())

    def weight(self) -> Tensor:
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper  # (C_out, C_in)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[2:]
        z = F.conv2d(x, self.weight()[:, :, None, None])
        return z, _per_sample(self.log_s.sum() * (h * w), x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        h, w = z.shape[2:]
        x = F.conv2d(z, torch.linalg.inv(self.weight())[:, :, None, None])
        return x, _per_sample(-self.log_s.sum() * (h * w), z)


def conditioner(in_channels: int, out_channels: int, hidden: int, depth: int) -> nn.Sequential:
    """3x3 conv -> (depth - 1) x [1x1 conv] -> `zero_conv`, ReLU between."""
    # In-place ReLUs: a conv needs its input, not its output, for backward, so one
    # activation-sized buffer per layer is saved (out of place, ReLU costs ~15% of a step).
    layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(inplace=True)]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(hidden, hidden, 1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, zero_conv(hidden, out_channels))


class GatedResidualBlock(nn.Module):
    """h + gate(h): ELU -> 3x3 conv (width -> bottleneck) -> ELU -> 1x1 conv (-> 2 width) -> a * sigmoid(b).

    Flow++'s gated residual convolution (Ho et al. 2019, section 3.3; PixelCNN++, Salimans et
    al. 2017) with a bottleneck on the 3x3 conv, which at full width would cost several times a
    whole `conditioner`. No normalisation layer: batch statistics would make an image's score
    depend on its batch.
    """

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(width, bottleneck, 3, padding=1)
        self.conv_out = nn.Conv2d(bottleneck, 2 * width, 1)

    def forward(self, h: Tensor) -> Tensor:
        # Not in place: the residual stream h is read again by the addition below.
        a, b = self.conv_out(F.elu(self.conv_in(F.elu(h)))).chunk(2, dim=1)
        return h + a * torch.sigmoid(b)


def gated_resnet_conditioner(
    in_channels: int, out_channels: int, hidden: int, depth: int
) -> nn.Sequential:
    """3x3 conv -> depth x GatedResidualBlock (bottleneck max(hidden // 4, 8)) -> ELU ->
    `zero_conv`."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, hidden, 3, padding=1)]
    layers += [GatedResidualBlock(hidden, max(hidden // 4, 8)) for _ in range(depth)]
    return nn.Sequential(*layers, nn.ELU(), zero_conv(hidden, out_channels))


CONDITIONERS = {"conv": conditioner, "gated_resnet": gated_resnet_conditioner}


class Coupling(Bijection):
    """Affine or additive coupling with a channel or checkerboard mask.

    The conditioned part x_a passes unchanged; the rest becomes x_b * exp(log_s) + t with
    (t, s_raw) = NN(x_a) and log_s = clamp * tanh(s_raw / clamp), a soft clamp that bounds the
    scale (stability) and is 0 at init. Log-det = sum of log_s over the transformed elements.

    Args:
        channels: C of the input.
        hidden, depth: the conditioner's width and hidden layers (or gated residual blocks).
        mask: "channel" (first/second half of channels) or "checkerboard" (spatial parity).
        parity: which half (or which squares) is conditioned on; alternate it between steps.
        affine: False gives additive coupling (log_s = 0).
        clamp: bound of the log-scale.
        conditioner: a key of CONDITIONERS.
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        depth: int,
        mask: str = "channel",
        parity: int = 0,
        affine: bool = True,
        clamp: float = 2.0,
        conditioner: str = "conv",
    ) -> None:
        super().__init__()
        if conditioner not in CONDITIONERS:
            raise ValueError(
                f"conditioner: expected one of {list(CONDITIONERS)}, found {conditioner!r}"
            )
        if mask not in ("channel", "checkerboard"):
            raise ValueError(f"mask: expected 'channel' or 'checkerboard', found {mask!r}")
        if mask == "channel" and channels < 2:
            raise ValueError(f"channel mask needs >= 2 channels, found {channels}")
        self.mask_kind = mask
        self.parity = parity
        self.affine = affine
        self.clamp = clamp
        if mask == "channel":
            self.n_cond = channels // 2 if parity == 0 else channels - channels // 2
            n_in, n_out = self.n_cond, channels - self.n_cond
        else:
            n_in, n_out = channels, channels
        self.net = CONDITIONERS[conditioner](n_in, n_out * (2 if affine else 1), hidden, depth)
        # The conditioner's autocast dtype (None: its input's), set by `Flow.set_precision`; not
        # state, so checkpoints never hold it.
        self.autocast_dtype: torch.dtype | None = None

    def _params(self, x_a: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.autocast_dtype is None:
            h = self.net(x_a)
        else:
            # Only the conditioner (most of the FLOPs) runs in low precision: the scale, shift
            # and log-det are formed in the input's dtype.
            with torch.autocast(device_type=x_a.device.type, dtype=self.autocast_dtype):
                h = self.net(x_a)
            h = h.to(x_a.dtype)
        if not self.affine:
            return h, None
        shift, raw = h.chunk(2, dim=1)
        return shift, self.clamp * torch.tanh(raw / self.clamp)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.parity == 0:
            return x[:, : self.n_cond], x[:, self.n_cond :]
        return x[:, x.shape[1] - self.n_cond :], x[:, : x.shape[1] - self.n_cond]

    def _merge(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        return torch.cat([x_a, x_b] if self.parity == 0 else [x_b, x_a], dim=1)

    def _board(self, x: Tensor) -> Tensor:
        h, w = x.shape[2:]
        rows = torch.arange(h, device=x.device)[:, None]
        cols = torch.arange(w, device=x.device)[None, :]
        return ((rows + cols + self.parity) % 2).to(x.dtype)[None, None]  # (1, 1, H, W)

    @staticmethod
    def _couple(x: Tensor, shift: Tensor, log_s: Tensor | None, sign: int) -> tuple[Tensor, Tensor]:
        """x * exp(log_s) + shift (sign +1) or its inverse (sign -1), and the log-det."""
        if log_s is None:
            return x + sign * shift, x.new_zeros(x.shape[0])
        z = x * torch.exp(log_s) + shift if sign > 0 else (x - shift) * torch.exp(-log_s)
        return z, sign * log_s.flatten(1).sum(1)

    def _transform(self, x: Tensor, sign: int) -> tuple[Tensor, Tensor]:
        if self.mask_kind == "channel":
            x_a, x_b = self._split(x)
            z_b, ldj = self._couple(x_b, *self._params(x_a), sign)
            return self._merge(x_a, z_b), ldj
        keep = self._board(x)  # 1 where conditioned, 0 where transformed
        shift, log_s = self._params(x * keep)
        free = 1 - keep
        return self._couple(x, shift * free, None if log_s is None else log_s * free, sign)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(x, +1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return self._transform(z, -1)


class GaussianSplit(Bijection):
    """Multiscale split with a learned conditional Gaussian prior (Glow's split2d), as a bijection.

    x = (x1, x2) by channel halves; (mu, log_sigma) = ZeroConv3x3(x1); the output is
    (x1, eps) with eps = (x2 - mu) * exp(-log_sigma), so N(eps; 0, I) times exp(logdet) is exactly
    the prior N(x2; mu, sigma). The flow then factors eps out. Starts as N(0, I).

    `clamp` soft-clamps log_sigma to (-clamp, clamp) with tanh, as the couplings' log-scales: on
    inputs unlike its training data the conv extrapolates freely, and a log_sigma of -90 already
    overflows exp(-log_sigma) in float32. None: unbounded.
    """

    def __init__(self, channels: int, clamp: float | None = None) -> None:
        super().__init__()
        self.n_keep = channels // 2
        self.clamp = clamp
        self.prior = zero_conv(self.n_keep, 2 * (channels - self.n_keep))

    def _prior(self, x1: Tensor) -> tuple[Tensor, Tensor]:
        mu, log_sigma = self.prior(x1).chunk(2, dim=1)
        if self.clamp is not None:
            log_sigma = self.clamp * torch.tanh(log_sigma / self.clamp)
        return mu, log_sigma

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1, x2 = x[:, : self.n_keep], x[:, self.n_keep :]
        mu, log_sigma = self._prior(x1)
        eps = (x2 - mu) * torch.exp(-log_sigma)
        return torch.cat([x1, eps], dim=1), -log_sigma.flatten(1).sum(1)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        x1, eps = z[:, : self.n_keep], z[:, self.n_keep :]
        mu, log_sigma = self._prior(x1)
        x2 = eps * torch.exp(log_sigma) + mu
        return torch.cat([x1, x2], dim=1), log_sigma.flatten(1).sum(1)


class LearnedPrior(Bijection):
    """The top level's learned Gaussian N(mu, sigma) per element, as eps = (x - mu) / sigma."""

    def __init__(self, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.mu = nn.Parameter(torch.zeros(1, *shape))
        self.log_sigma = nn.Parameter(torch.zeros(1, *shape))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ldj = -self.log_sigma.sum()
        return (x - self.mu) * torch.exp(-self.log_sigma), _per_sample(ldj, x)

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        return z * torch.exp(self.log_sigma) + self.mu, _per_sample(self.log_sigma.sum(), z)
