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
    "search": "autodrop.pipeline",
    "load_results": "autodrop.report",
    "export_model": "autodrop.export",
    "make_report": "autodrop.report_html",
    "SearchResult": "autodrop.report",
    "SearchConfig": "autodrop.config",
    "AutodropError": "autodrop.errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from autodrop.config import SearchConfig
    from autodrop.errors import AutodropError
    from autodrop.export import export_model
    from autodrop.report import SearchResult, load_results
    from autodrop.pipeline import search
    from autodrop.report_html import make_report


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autodrop' has no attribute {name!r}")
