"""``autodrop dashboard``: optuna-dashboard on a study's storage, with the weights the search kept.

Building the app (:func:`create_dashboard_app`) is separate from serving it: :func:`start_dashboard`
serves in a background thread and returns once the server answers (tests use it), and
:func:`run_dashboard` blocks until Ctrl-C (the command uses it).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Callable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from autodrop.errors import ConfigError, StorageError
from autodrop.run.artifacts import artifact_dir as artifact_folder
from autodrop.run.artifacts import open_artifact_store
from autodrop.run.storage import open_existing_study, storage_errors

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
READY_TIMEOUT_S = 30.0  # how long to wait for the server to answer its first request


@dataclass(frozen=True)
class DashboardApp:
    """A built dashboard: the WSGI app and the study it was opened for."""

    app: Callable[..., Any]  # a WSGI application
    study_name: str
    study_id: int
    artifact_dir: Path | None  # None when the search kept no weights there

    @property
    def path(self) -> str:
        """The path of the study's page."""
        return f"/dashboard/studies/{self.study_id}"


@storage_errors
def create_dashboard_app(
    study: str | None = None,
    storage: str | None = None,
    *,
    artifact_dir: str | os.PathLike[str] | None = None,
) -> DashboardApp:
    """Return optuna-dashboard's WSGI app on the study's storage and artifact store, checked.

    ``storage`` defaults to ./autodrop.db and ``study`` to the storage's only study.
    """
    import optuna_dashboard

    opened = open_existing_study(study, storage)
    optuna_study, storage_obj, url = opened.study, opened.storage, opened.url
    if not optuna_study.get_trials(deepcopy=False):
        raise StorageError(f"study {optuna_study.study_name!r} has no trials yet; run autodrop search first.")
    folder = artifact_folder(url, artifact_dir)
    store = open_artifact_store(folder)
    if store is None and artifact_dir is not None:
        raise ConfigError(f"--artifact-dir {str(artifact_dir)!r} does not exist.")
    app = optuna_dashboard.wsgi(storage_obj, artifact_store=store)
    study_id = storage_obj.get_study_id_from_name(optuna_study.study_name)
    return DashboardApp(app, optuna_study.study_name, study_id, folder if store is not None else None)


class _Server(ThreadingMixIn, WSGIServer):
    # The page loads several API routes at once; one thread each keeps it responsive.
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass  # a line per request would bury the URL the user needs


class RunningDashboard:
    """A dashboard served from a background thread; ``stop()`` (or leaving ``with``) ends it."""

    def __init__(self, dashboard: DashboardApp, server: _Server, host: str) -> None:
        self.dashboard = dashboard
        self._server = server
        self.host = host
        self.port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, name="autodrop-dashboard", daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        """The root URL a local browser reaches the server at."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL of the study's page."""
        return self.base_url + self.dashboard.path

    def wait_until_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Return once the server answers ``/api/meta``; raise ConfigError if it does not in time."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(self.base_url + "/api/meta", timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as e:
                last = e
            time.sleep(0.1)
        self.stop()
        raise ConfigError(f"the dashboard did not answer at {self.base_url} within {timeout:.0f} s ({last}).")

    def stop(self) -> None:
        """Stop serving and close the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> "RunningDashboard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def is_loopback(host: str) -> bool:
    """Return whether ``host`` is reachable only from this machine (127.0.0.0/8, ::1, localhost)."""
    name = host.strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False  # a host name: it may well be reachable from elsewhere


def start_dashboard(dashboard: DashboardApp, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> RunningDashboard:
    """Serve ``dashboard`` on ``host``:``port`` (0 picks a free port) and return once it answers."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 1 and 65535, but got {port}.")
    server_class = _Server
    if ":" in host:  # an IPv6 address
        import socket

        server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
    try:
        server = make_server(host, port, dashboard.app, server_class=server_class, handler_class=_QuietHandler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"--port {port} is already in use on {host}; pick another with --port.") from e
        raise ConfigError(f"cannot listen on --host {host!r} --port {port}: {e.strerror or e}.") from e
    running = RunningDashboard(dashboard, server, host)
    running.wait_until_ready()
    return running


def run_dashboard(
    study: str | None = None,
    storage: str | None = None,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    artifact_dir: str | os.PathLike[str] | None = None,
    on_ready: Callable[[RunningDashboard], None] | None = None,
) -> None:
    """Serve the study's dashboard until Ctrl-C; ``on_ready`` hears when it answers (to print the URL)."""
    dashboard = create_dashboard_app(study, storage, artifact_dir=artifact_dir)
    running = start_dashboard(dashboard, host=host, port=port)
    try:
        if on_ready is not None:
            on_ready(running)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        running.stop()
