"""Request guards: optional bearer-token auth and a per-client sliding-window rate limit."""

from __future__ import annotations

import hmac
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable


class RateLimiter:
    """At most ``limit`` requests per client in any ``window_s`` seconds (in this process).

    Memory is bounded: at most ``max_clients`` clients are tracked, the least recently seen
    are forgotten first. With several worker processes each counts on its own, so the limit a
    client sees is up to ``workers x limit``; put a proxy limit in front for a hard cap.

    Parameters
    ----------
    limit
        Requests allowed per window; 0 disables limiting.
    window_s
        Window length in seconds.
    max_clients
        Most clients remembered.
    clock
        Time source (monotonic seconds); injectable for tests.
    """

    def __init__(
        self,
        limit: int,
        window_s: float,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def hit(self, client: str) -> int | None:
        """Record a request; return ``None`` if allowed, else seconds until the next is allowed."""
        if self.limit <= 0:
            return None
        now = self._clock()
        with self._lock:
            hits = self._hits.pop(client, None) or deque()
            while hits and hits[0] <= now - self.window_s:
                hits.popleft()
            self._hits[client] = hits  # re-inserted last: most recently seen
            while len(self._hits) > self.max_clients:
                self._hits.popitem(last=False)
            if len(hits) >= self.limit:
                return max(1, math.ceil(hits[0] + self.window_s - now))
            hits.append(now)
            return None


def token_ok(header: str | None, token: str) -> bool:
    """Check an ``Authorization`` header against the expected bearer token (constant time)."""
    if not header:
        return False
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())
