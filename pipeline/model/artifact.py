"""The model artifact: a trained flow on disk and in memory, as safetensors weights + config JSON.
No pickled modules, ever.

On disk (checkpoints, the MLflow pyfunc model, local model directories):

    <dir>/model.safetensors   the flow's state_dict (parameters and buffers)
    <dir>/flow_config.json    FlowConfig.to_dict() and "noise_scheme" (pipeline.model.noise)

The noise scheme is part of the model (scores depend on it). A directory or payload without one
is a model saved before schemes were recorded: it loads as "mt19937-v1", the noise its scores
were made with. A flowray too old to know the key refuses the config instead of scoring with other noise.

In memory, `FlowPayload` holds the same two parts as bytes and a dict. Batch jobs resolve a model
once on the driver (registry lookup, artifact download), then hand the payload to every actor
through Ray's object store: actors never touch the registry, and no node needs the driver's local
files (a multi-node cluster shares no disk with the driver).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from flowmodel import Flow, FlowConfig, build_flow
from pipeline.model.noise import MT19937_V1, noise_scheme_of, with_noise_scheme

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "flow_config.json"
SCHEME_KEY = "noise_scheme"  # in flow_config.json, beside the FlowConfig keys


def save_flow(flow: Flow, directory: str | Path) -> Path:
    """Write `flow` to `directory` (created if needed); returns the directory."""
    payload = FlowPayload.from_flow(flow)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / WEIGHTS_FILE).write_bytes(payload.weights)
    config = {**payload.config, SCHEME_KEY: payload.noise_scheme}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory


def load_flow(directory: str | Path, device: str | torch.device = "cpu") -> Flow:
    """The flow saved in `directory`, in eval mode on `device`."""
    directory = Path(directory)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if not (directory / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"not a flowray model directory: {directory} (expected {WEIGHTS_FILE} and "
            f"{CONFIG_FILE}, missing {', '.join(missing)})"
        )
    config = json.loads((directory / CONFIG_FILE).read_text())
    scheme = config.pop(SCHEME_KEY, MT19937_V1)
    return FlowPayload(config, (directory / WEIGHTS_FILE).read_bytes(), scheme).load(device)


@dataclass(frozen=True)
class FlowPayload:
    """A flow as picklable bytes: the artifact's config dict, safetensors weights and the
    flow's noise scheme (pipeline.model.noise)."""

    config: dict[str, Any]  # FlowConfig.to_dict()
    weights: bytes  # safetensors bytes of the state_dict
    noise_scheme: str = MT19937_V1  # a payload made without one is an old model's

    @classmethod
    def from_flow(cls, flow: Flow) -> FlowPayload:
        # safetensors refuses shared or non-contiguous storage; a state_dict copy has neither.
        state = {k: v.detach().cpu().contiguous().clone() for k, v in flow.state_dict().items()}
        return cls(flow.config.to_dict(), save_tensors(state), noise_scheme_of(flow))

    def load(self, device: str | torch.device = "cpu") -> Flow:
        """The flow in eval mode on `device`, drawing its noise with `noise_scheme`."""
        flow = build_flow(FlowConfig.from_dict(self.config))
        flow.load_state_dict(load_tensors(self.weights))
        return with_noise_scheme(flow.to(device).eval(), self.noise_scheme)

    def digest(self) -> str:
        """A short hash of the weights: the version of a model that has no registry version."""
        return hashlib.sha256(self.weights).hexdigest()[:12]
