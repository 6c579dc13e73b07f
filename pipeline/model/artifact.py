"""A trained flow on disk: safetensors weights + config JSON. No pickled modules, ever.

Checkpoints, the MLflow pyfunc model and local model directories all use this layout:

    <dir>/model.safetensors   the flow's state_dict (parameters and buffers)
    <dir>/flow_config.json    FlowConfig.to_dict()
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flowmodel import Flow, FlowConfig, build_flow

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "load_flow", "save_flow"]

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "flow_config.json"


def save_flow(flow: Flow, directory: str | Path) -> Path:
    """Write `flow` to `directory` (created if needed); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; a state_dict copy has neither.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in flow.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(flow.config.to_dict(), indent=2))
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
    config = FlowConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    flow = build_flow(config)
    flow.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return flow.to(device).eval()
