"""autodrop: where should dropout go in my CNN, and how strong should it be?

The public API is loaded lazily, so that importing autodrop (and ``autodrop --help``) does not
pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AutodropError",
    "SearchConfig",
    "SearchResult",
    "export_model",
    "load_results",
    "make_report",
    "search",
    "__version__",
]

_LAZY = {
    "search": "autodrop.api",
    "load_results": "autodrop.outputs.results",
    "export_model": "autodrop.outputs.export",
    "make_report": "autodrop.outputs.page",
    "SearchResult": "autodrop.outputs.results",
    "SearchConfig": "autodrop.config",
    "AutodropError": "autodrop.errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from autodrop.api import search
    from autodrop.config import SearchConfig
    from autodrop.errors import AutodropError
    from autodrop.outputs.export import export_model
    from autodrop.outputs.page import make_report
    from autodrop.outputs.results import SearchResult, load_results


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autodrop' has no attribute {name!r}")
