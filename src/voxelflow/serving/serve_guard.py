"""Who may knock how often: token buckets per key and per client, and denials audited in aggregate.

Both maps are bounded: a flood from many addresses (10⁵ distinct ones through a gateway, or IPv6)
costs at most ``max_callers`` buckets and ``max_addresses`` denial windows.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from voxelflow.core import audit
from voxelflow.core.db import Database


class Throttle:
    """A token bucket per caller: ``rate`` requests a second, bursts of ``burst``.

    At most ``max_callers`` buckets are kept, the least recently used forgotten first; a forgotten
    caller starts again with a full bucket, as one idle for ``burst / rate`` seconds would.
    """

    def __init__(self, rate: float, burst: int, max_callers: int = 10000) -> None:
        if max_callers < 1:
            raise ValueError("max_callers must be at least 1")
        self.rate, self.burst, self.max_callers = rate, burst, max_callers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._buckets)

    def peek(self, who: str) -> float:
        """The seconds ``who`` would have to wait now (0 when a request would pass), spending nothing."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def allow(self, who: str) -> float:
        """0 when allowed (a token is spent), else the seconds to wait."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (float(self.burst), now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            spent = tokens >= 1
            self._buckets[who] = (tokens - 1 if spent else tokens, now)
            self._buckets.move_to_end(who)
            while len(self._buckets) > self.max_callers:
                self._buckets.popitem(last=False)
        return 0.0 if spent else (1 - tokens) / self.rate


class Denials:
    """Denied requests per client address, audited at most once a minute per address with a count.

    A flood of bad keys from one address costs one audit record a minute, not one per request;
    at most ``max_addresses`` addresses are tracked (the oldest forgotten first).
    """

    def __init__(self, db: Database | None, window_s: float = 60.0, max_addresses: int = 10000) -> None:
        self.db, self.window_s, self.max_addresses = db, window_s, max_addresses
        self._seen: dict[str, list[float]] = {}  # address -> [window start, count not yet audited]
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def record(self, address: str, status: int, endpoint: str) -> None:
        t = time.monotonic()
        with self._lock:
            window = self._seen.get(address)
            if window is not None and t - window[0] < self.window_s:
                window[1] += 1
                return
            pending = int(window[1]) if window else 0
            self._seen.pop(address, None)
            while len(self._seen) >= self.max_addresses:
                self._seen.pop(next(iter(self._seen)))
            self._seen[address] = [t, 0]
        if self.db is not None:
            audit.append(self.db, "access.denied", address, endpoint=endpoint, status=status,
                         denied_since_last_record=pending)
