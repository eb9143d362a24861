"""What one client may hold of the server's connections: a deadline for a request's headers and
a cap on open connections.

uvicorn has neither: a client that opens connections and sends half a request line holds each
one, and its file descriptor, for as long as it likes (20,000 of them starved the server before
any authentication). Here a connection that has not sent a whole request head within
``HEADER_TIMEOUT_S`` of opening (or of its previous response) is closed, and a connection beyond
the cap is closed as soon as it is accepted, so the server keeps descriptors for its own work.
The request body has its own deadline where it is read (``http.read_json``).
"""

from __future__ import annotations

import logging
from typing import Any, Optional

log = logging.getLogger("ovchat.server")

HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 1024
_SPARE_DESCRIPTORS = 256  # for the engines' pipes, the model files and the logs


def connection_cap(wanted: int = MAX_CONNECTIONS) -> int:
    """``wanted``, or fewer where the process may open fewer files (after raising its soft limit
    to the hard one)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = wanted + _SPARE_DESCRIPTORS if hard == resource.RLIM_INFINITY else hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
            soft = max(soft, target)
    except (ImportError, ValueError, OSError):  # not POSIX, or not allowed: keep what there is
        return wanted
    return max(1, min(wanted, soft - _SPARE_DESCRIPTORS))


def protocol(cap: int, header_timeout_s: float = HEADER_TIMEOUT_S) -> type:
    """uvicorn's h11 protocol with the header deadline and the connection cap."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _deadline: Optional[Any] = None
        _refused_logged = False

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > cap:
                if not Protocol._refused_logged:
                    log.warning("more than %d connections are open: new ones are closed until some end", cap)
                    Protocol._refused_logged = True
                transport.close()
                return
            self._arm()

        def on_response_complete(self) -> None:
            self._arm()  # before the next pipelined request may start a new cycle
            super().on_response_complete()

        def connection_lost(self, exc: Optional[Exception]) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            """Close the connection unless a new request head arrives within the deadline."""
            if self._deadline is not None:
                self._deadline.cancel()
            waiting_since = self.cycle

            def expire() -> None:
                if self.cycle is waiting_since and not self.transport.is_closing():
                    self.transport.close()

            self._deadline = self.loop.call_later(header_timeout_s, expire)

    return Protocol
