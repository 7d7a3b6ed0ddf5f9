"""What the notifier tests (pushover, ntfy, e-mail) share: a notification request as a
publisher sends it, and waiting for a notifier's counters in its heartbeat."""

from __future__ import annotations

import time
from typing import Any

from conftest import Observer


def request(message: str, title: str | None = "pihub", priority: int = 0,
            ts: float | None = None, **extra: Any) -> dict[str, Any]:
    """A notification request's payload (``ts`` now unless given; no title if None)."""
    payload: dict[str, Any] = {"message": message, "priority": priority,
                               "ts": time.time() if ts is None else ts, **extra}
    if title is not None:
        payload["title"] = title
    return payload


def counters_reach(obs: Observer, topic_root: str, daemon: str,
                   **expected: int) -> dict[str, int]:
    """Wait for a heartbeat of ``daemon`` whose counters include ``expected``; return them."""

    def ok(m: Any) -> bool:
        counters = m.json()["counters"]
        return all(counters.get(k) == v for k, v in expected.items())

    hit = obs.wait_for(f"{topic_root}/{daemon}/meta", ok, timeout=20)[-1]
    return hit.json()["counters"]  # type: ignore[no-any-return]
