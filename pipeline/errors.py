"""`FlowrayError` (message + hint), the base of every error a user can fix; defined in
flowmodel.errors so that flowmodel's ConfigError derives from it without importing pipeline."""

from __future__ import annotations

from flowmodel.errors import FlowrayError

__all__ = ["FlowrayError"]
