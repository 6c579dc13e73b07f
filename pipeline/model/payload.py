"""A flow as bytes (safetensors weights + config dict), to ship to Ray actors and tasks.

Batch jobs resolve a model once on the driver (registry lookup, artifact download), then hand the
weights to every actor through Ray's object store: actors never touch the registry, and no node
needs the driver's local files (a multi-node cluster shares no disk with the driver).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from flowmodel import Flow, FlowConfig, build_flow

__all__ = ["FlowPayload"]


@dataclass(frozen=True)
class FlowPayload:
    """Picklable weights + architecture of a flow; no pickled modules (see model_store)."""

    config: dict[str, Any]
    weights: bytes  # safetensors bytes of the state_dict

    @classmethod
    def from_flow(cls, flow: Flow) -> FlowPayload:
        state = {k: v.detach().cpu().contiguous().clone() for k, v in flow.state_dict().items()}
        return cls(config=flow.config.to_dict(), weights=save_tensors(state))

    def load(self, device: str | torch.device = "cpu") -> Flow:
        """The flow in eval mode on `device`."""
        flow = build_flow(FlowConfig.from_dict(self.config))
        flow.load_state_dict(load_tensors(self.weights))
        return flow.to(device).eval()

    def digest(self) -> str:
        """A short hash of the weights: the version of a model that has no registry version."""
        return hashlib.sha256(self.weights).hexdigest()[:12]
