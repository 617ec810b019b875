"""Library side of ``cwa model inspect``: a JSON-ready summary of a model's architecture map.

The implementation lives next to the map (:func:`cwa.models.architecture.inspect_model`);
this module is the stable import path the CLI uses.
"""

from __future__ import annotations

from cwa.models.architecture import inspect_model

__all__ = ["inspect_model"]
