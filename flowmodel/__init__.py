"""flowmodel: a multiscale coupling flow (RealNVP / Glow family) in pure PyTorch.

Public API: FlowConfig, build_flow, Flow (initialize, forward, inverse, log_prob, bits_per_dim,
sample), the layers, dequantize and the bits/dim helpers; typed configs in flowmodel.typed.

Pure PyTorch, so a model can be built, trained or loaded anywhere torch runs: no Ray, MLflow,
fsspec, file I/O or logging set-up.

May import: flowmodel.
Third-party imports: torch, numpy.
"""

from flowmodel.config import FlowConfig
from flowmodel.dequantization import VariationalDequantization
from flowmodel.flow import (
    Flow,
    FlowStep,
    Precision,
    bits_per_dim_from_log_prob,
    build_flow,
    dequantize,
    standard_normal_log_prob,
)
from flowmodel.layers import (
    ActNorm,
    Bijection,
    Coupling,
    GaussianSplit,
    InvConv1x1,
    LearnedPrior,
    Logit,
    Shift,
    Squeeze,
)

__all__ = [
    "ActNorm",
    "Bijection",
    "Coupling",
    "Flow",
    "FlowConfig",
    "FlowStep",
    "GaussianSplit",
    "InvConv1x1",
    "LearnedPrior",
    "Logit",
    "Precision",
    "Shift",
    "Squeeze",
    "VariationalDequantization",
    "bits_per_dim_from_log_prob",
    "build_flow",
    "dequantize",
    "standard_normal_log_prob",
]
