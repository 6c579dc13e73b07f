"""flowmodel: a multiscale coupling flow (RealNVP / Glow family) in pure PyTorch.

Public API: FlowConfig, build_flow, Flow (initialize, forward, inverse, log_prob, bits_per_dim,
sample), the layers, dequantize, VariationalDequantization and the bits/dim helpers.

Pure PyTorch, so a model can be built, trained or loaded anywhere torch runs: no Ray, MLflow,
fsspec, file I/O or logging set-up.

May import: flowmodel.
Third-party imports: torch, numpy.
"""

from flowmodel.config import FlowConfig
from flowmodel.dequantization import VariationalDequantization
from flowmodel.flow import (
    PRECISIONS,
    Flow,
    FlowStep,
    Precision,
    bits_per_dim_from_log_prob,
    build_flow,
    dequantize,
    reduce_bits,
    standard_normal_log_prob,
)
from flowmodel.layers import (
    ActNorm,
    Bijection,
    Coupling,
    GatedResidualBlock,
    GaussianSplit,
    InvConv1x1,
    LearnedPrior,
    Logit,
    Shift,
    Squeeze,
)
from flowmodel.typed import ConfigError, from_dict, to_dict

__all__ = [
    "PRECISIONS",
    "ActNorm",
    "Bijection",
    "ConfigError",
    "Coupling",
    "Flow",
    "FlowConfig",
    "FlowStep",
    "GatedResidualBlock",
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
    "from_dict",
    "reduce_bits",
    "standard_normal_log_prob",
    "to_dict",
]
