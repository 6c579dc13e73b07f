"""FlowConfig: the architecture of a multiscale coupling flow, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from flowmodel.typed import check_at_least, from_dict, to_dict


@dataclass(frozen=True)
class FlowConfig:
    """Architecture of a Glow-style multiscale flow.

    Each level squeezes (C, H, W) -> (4C, H/2, W/2), runs `steps_per_level` steps of ActNorm ->
    invertible 1x1 conv -> coupling, then factors out half of the channels under a learned
    conditional Gaussian prior (the last level keeps all under a learned prior), so H and W must
    be divisible by 2**levels.

    Attributes:
        image_shape: (C, H, W) of the uint8 images.
        levels: number of squeeze/steps/split levels.
        steps_per_level: flow steps per level (K in the Glow paper).
        hidden_channels: width of each coupling conditioner network.
        coupling_depth: hidden layers of the conditioner (a 3x3 conv, then depth-1 1x1 convs).
        coupling: "affine" (scale and shift) or "additive" (shift only, volume preserving).
        mask: "channel" (split channels in halves) or "checkerboard" (spatial parity).
        n_bits: bits per pixel the model sees; images are reduced to n_bits (8 = untouched).
        preprocess: "logit" maps y in [0, 1) to logit(alpha + (1 - 2 alpha) y) (RealNVP, Dinh et
            al. 2017); "shift" maps y to y - 0.5 (Glow, Kingma & Dhariwal 2018). The log-det of
            either is part of log_prob.
        logit_alpha: alpha of the logit preprocessing, in [0, 0.5).
        scale_clamp: affine log-scales are soft-clamped to (-scale_clamp, scale_clamp) with tanh.
        split_clamp: soft-clamps the split priors' log-sigmas to (-split_clamp, split_clamp) with
            tanh, as scale_clamp does for the couplings; None: unbounded. Not the default: it
            costs the demo model bits/dim (docs/model.md, "Where the model can overflow").
        conditioner: the coupling networks: "conv" (3x3 conv, 1x1 convs, zero 3x3 conv; ReLU) or
            "gated_resnet" (3x3 conv, `coupling_depth` gated residual blocks, zero 3x3 conv; Flow++,
            Ho et al. 2019, section 3.3).
        dequantization: "uniform" (y = (x + eps) / 2**n_bits, eps ~ U[0, 1)) or "variational":
            a learned monotone map of eps inside each integer cell, conditioned on x (Flow++,
            section 3.1; flowmodel.dequantization). The bits/dim stay an upper bound either way.
    """

    image_shape: tuple[int, int, int] = (1, 28, 28)
    levels: int = 2
    steps_per_level: int = 8
    hidden_channels: int = 64
    coupling_depth: int = 2
    coupling: Literal["affine", "additive"] = "affine"
    mask: Literal["channel", "checkerboard"] = "channel"
    n_bits: int = 8
    preprocess: Literal["logit", "shift"] = "logit"
    logit_alpha: float = 0.05
    scale_clamp: float = 2.0
    split_clamp: float | None = None
    conditioner: Literal["conv", "gated_resnet"] = "conv"
    dequantization: Literal["uniform", "variational"] = "uniform"

    def __post_init__(self) -> None:
        channels, height, width = self.image_shape
        if channels < 1 or height < 1 or width < 1:
            raise ValueError(f"image_shape: expected positive (C, H, W), found {self.image_shape}")
        check_at_least(self, 1, "levels")
        factor = 2**self.levels
        if height % factor or width % factor:
            raise ValueError(
                f"image_shape: H and W must be divisible by 2**levels = {factor} "
                f"(levels={self.levels}), found H={height}, W={width}"
            )
        check_at_least(self, 1, "steps_per_level", "hidden_channels", "coupling_depth")
        if not 1 <= self.n_bits <= 8:
            raise ValueError(f"n_bits: expected 1..8, found {self.n_bits}")
        if not 0.0 <= self.logit_alpha < 0.5:
            raise ValueError(f"logit_alpha: expected in [0, 0.5), found {self.logit_alpha}")
        # Checked here too, not only by from_dict: a typo must not silently build the default.
        for name, choices in (
            ("conditioner", ("conv", "gated_resnet")),
            ("dequantization", ("uniform", "variational")),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"{name}: expected one of {list(choices)}, found {getattr(self, name)!r}"
                )
        if self.scale_clamp <= 0:
            raise ValueError(f"scale_clamp: expected > 0, found {self.scale_clamp}")
        if self.split_clamp is not None and self.split_clamp <= 0:
            raise ValueError(f"split_clamp: expected > 0 or None, found {self.split_clamp}")

    @property
    def dims(self) -> int:
        """D = C * H * W, the number of dimensions that bits/dim divides by."""
        return math.prod(self.image_shape)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowConfig:
        return from_dict(cls, data)
