"""The base of every error a user can fix: `FlowrayError` (message + hint).

Defined in flowmodel.errors, so that flowmodel's ConfigError can derive from it without flowmodel
importing pipeline; this is the same class, re-exported where pipeline code looks for it.
"""

from __future__ import annotations

from flowmodel.errors import FlowrayError

__all__ = ["FlowrayError"]
