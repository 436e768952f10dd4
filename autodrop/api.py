"""The Python API's search: the call a notebook makes, and the one the ``search`` command makes."""

from __future__ import annotations

from typing import Any

from autodrop.config import SearchConfig, config_from_options, validate
from autodrop.errors import ConfigError
from autodrop.outputs.results import SearchResult, summarize_study
from autodrop.run.progress import Progress
from autodrop.run.search import run_search


def search(data: str | None = None, *, config: SearchConfig | None = None, progress: Progress | None = None,
           **options: Any) -> SearchResult:
    """Run (or resume) a search and return its answer.

    Either pass a ready ``config``, or ``data`` and any CLI option by its Python name
    (``trials=20``, ``image_size=16``, ``rate_range=(0.1, 0.5)``). The study ends with
    ``trials`` finished trials in total: a rerun adds only what is missing.
    """
    if config is None:
        if data is not None:
            options["data"] = str(data)
        config = config_from_options(options)
    elif data is not None or options:
        raise ConfigError("pass either config= or data and options, not both.")
    config = validate(config)
    study = run_search(config, progress=progress or Progress())
    return summarize_study(study, config.storage_url)
