"""Fixtures for the scaling-out tests: a fresh PostgreSQL database, tiny image folders, CLI runs."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

POSTGRES_ENV = "AUTODROP_TEST_POSTGRES_URL"
REQUIRE_ENV = "AUTODROP_REQUIRE_POSTGRES"


def _server_url() -> str | None:
    return os.environ.get(POSTGRES_ENV) or None


@pytest.fixture
def postgres_url() -> str:
    """A SQLAlchemy URL of a new, empty database on the test server; dropped afterwards."""
    url = _server_url()
    required = os.environ.get(REQUIRE_ENV) == "1"
    if url is None:
        if required:
            pytest.fail(f"{REQUIRE_ENV}=1 but {POSTGRES_ENV} is not set: CI must name the PostgreSQL server.")
        pytest.skip(f"no PostgreSQL server: set {POSTGRES_ENV} (e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres)")
    try:
        import psycopg
        from sqlalchemy.engine import make_url
    except ImportError as e:  # pragma: no cover - the test extra installs psycopg
        if required:
            pytest.fail(f"{REQUIRE_ENV}=1 but the PostgreSQL driver is missing: {e}")
        pytest.skip(f"PostgreSQL driver not installed ({e}); pip install autodrop[postgres]")
    server = make_url(url)
    conninfo = server.set(drivername="postgresql").render_as_string(hide_password=False)
    try:
        admin = psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    except Exception as e:
        if required:
            pytest.fail(f"{REQUIRE_ENV}=1 but the PostgreSQL server at {server!r} cannot be reached: {e}")
        pytest.skip(f"PostgreSQL server at {server!r} not reachable: {e}")
    name = f"autodrop_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield server.set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with train/ and val/ splits of three classes of 16x16 gray images."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny-images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("val", 12)):
        for label, name in enumerate(("a", "b", "c")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                # Each class brightens another third of the image: learnable, not trivial.
                pixels = rng.integers(0, 120, size=(16, 16)).astype(np.uint8)
                pixels[:, label * 5 : label * 5 + 6] += 100
                Image.fromarray(pixels, mode="L").save(folder / f"{i}.png")
    return root
