"""pihub-notify-pushover: send the hub's notification requests to Pushover.

Reads ``<root>/notify/<topic>`` (QoS 1, persistent session, not retained), the notification
request of docs/contract.md::

    {"title": "pihub: store-rrd is down", "message": "no heartbeat from pi4 since 10:42:07",
     "priority": 1, "ts": 1718000000.0}

``message`` is required (a non-empty string); ``title`` (a string), ``priority`` (an integer
-2..2, Pushover's scale; default ``default_priority``) and ``ts`` (UNIX seconds, shown by Pushover
as the message's time) may be left out; other keys are ignored. A request that breaks this is
rejected (logged, counted ``rejected``). A retained message is rejected too: it would be sent
again at every restart.

Every accepted request is written to an on-disk queue (:class:`pihub.notify.RequestQueue`, one
file per request under ``queue_dir``, written with :func:`pihub.durable.atomic_write`) before
its MQTT message is acknowledged, and a timer in the main thread POSTs the queue, oldest first, to
``<base_url>/1/messages.json`` (form fields token, user, message, title, priority, timestamp;
retry and expire for emergency priority 2):

* HTTP 200 with ``{"status": 1, ...}``: sent, removed from the queue (``sent``);
* network error, timeout, 5xx or an unexpected answer: kept, tried again after an exponential
  backoff between ``backoff_min`` and ``backoff_max`` seconds (``retries``);
* 429 (over quota): kept, and nothing is sent until the time Pushover gives (``Retry-After``,
  else the ``X-Limit-App-Reset`` epoch, else ``backoff_max``) (``quota_waits``);
* any other 4xx: logged with Pushover's ``errors`` text and dropped (``failed``, ``errors``).

Requests identical in title, message and priority to one accepted less than
``dedupe_window_s`` seconds earlier are acknowledged and not sent (``deduped``). When the queue
holds ``max_queue`` requests the oldest is dropped (``overflow``). Only the requests whose topic
the ``topics`` filters match are sent (default all). Publishes nothing besides the status and
meta topics every daemon has; the heartbeat adds ``queued`` and ``quota_remaining``.

The request, the queue, the dedupe window and the send loop are :mod:`pihub.notify`'s, shared
with every notifier; this module is Pushover's form and answers.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pihub import __version__
from pihub.bus import read_secret
from pihub.config import ConfigError, setting
from pihub.notify import (  # noqa: F401 (MAX_MESSAGE, Request, parse_request: this module's API)
    EMERGENCY,
    MAX_MESSAGE,
    MAX_TITLE,
    HoldOff,
    Notifier,
    NotifierConfig,
    Refused,
    Request,
    RequestQueue,
    TryLater,
    parse_request,
    retry_after,
)

if TYPE_CHECKING:
    import requests

#: Emergency priority: Pushover requires retry >= 30 s and expire <= 10800 s.
MIN_RETRY = 30
MAX_EXPIRE = 10800


@dataclass(kw_only=True)
class Config(NotifierConfig):
    timeout: float = setting(10.0, "Seconds to wait for Pushover's answer to one request.",
                             min=0.5, max=120)
    max_queue: int = setting(
        1000, "Requests kept while Pushover is unreachable; the oldest go first when full.",
        min=1, max=1000000,
    )
    backoff_min: float = setting(
        5.0, "First wait, seconds, after a network error or 5xx (Pushover asks for >= 5).",
        min=0.1, max=3600,
    )
    base_url: str = setting(
        "https://api.pushover.net",
        "Pushover API base URL; messages are POSTed to <base_url>/1/messages.json.",
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
    )
    token_file: str = setting(
        help="File holding the Pushover application API token (first line), readable by this "
             "daemon only.",
        example="/etc/pihub/secrets/pushover-token",
    )
    user_key_file: str = setting(
        help="File holding the Pushover user (or group) key (first line), readable by this "
             "daemon only.",
        example="/etc/pihub/secrets/pushover-user",
    )
    emergency_retry: int = setting(
        60, "Emergency priority (2): seconds between Pushover's repeats until acknowledged.",
        min=MIN_RETRY, max=MAX_EXPIRE,
    )
    emergency_expire: int = setting(
        3600, "Emergency priority (2): seconds after which Pushover stops repeating.",
        min=MIN_RETRY, max=MAX_EXPIRE,
    )

    def check(self) -> None:
        super().check()
        if self.emergency_expire < self.emergency_retry:
            raise ConfigError("emergency_expire",
                              f"must be >= emergency_retry ({self.emergency_retry})")


# --------------------------------------------------------------------------- Pushover answers


def pushover_errors(response: requests.Response) -> str:
    """Pushover's own words from an error answer: its ``errors`` list, else the raw body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("errors"), list) and body["errors"]:
        return "; ".join(str(e) for e in body["errors"])
    text = response.text.strip().replace("\n", " ")
    return text[:200] or "(empty body)"


def wait_from_headers(headers: Any, now: float) -> tuple[float | None, str]:
    """Seconds to wait that a 429 answer asks for, and which header said so."""
    wait = retry_after(headers, now)
    if wait is not None:
        return wait, f"Retry-After: {headers.get('Retry-After')}"
    reset = headers.get("X-Limit-App-Reset")
    if reset:
        with contextlib.suppress(ValueError):
            return max(0.0, float(reset) - now), f"X-Limit-App-Reset: {reset}"
    return None, "no Retry-After or X-Limit-App-Reset header"


# --------------------------------------------------------------------------- the daemon


class PushoverNotifier(Notifier[Config]):
    name = "notify-pushover"
    config_class = Config
    description = "Send the notification requests on <root>/notify/# to Pushover."
    channel = "Pushover"

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self._token, self._user = self._read_secrets(config)
        super().__init__(config, config_path)
        self._quota_remaining: int | None = None
        self._session: requests.Session | None = None

    @staticmethod
    def _read_secrets(config: Config) -> tuple[str, str]:
        token = read_secret(config.token_file, "token_file").strip()
        user = read_secret(config.user_key_file, "user_key_file").strip()
        if not token:
            raise ConfigError("token_file", f"{config.token_file} is empty; expected the "
                                            "Pushover application token on its first line")
        if not user:
            raise ConfigError("user_key_file", f"{config.user_key_file} is empty; expected "
                                               "the Pushover user key on its first line")
        return token, user

    @property
    def url(self) -> str:
        return self.config.base_url.rstrip("/") + "/1/messages.json"

    # ------------------------------------------------------------------ lifecycle

    def open_channel(self) -> None:
        """Nothing yet: requests (about 5 MB of the Pi's RAM, its imports) and the session are
        made for the first notification (:meth:`_open_session`), not for a daemon that waits."""

    def _open_session(self) -> requests.Session:
        if self._session is None:
            import requests

            self._session = requests.Session()
            self._session.headers["User-Agent"] = f"pihub-notify-pushover/{__version__}"
        return self._session

    def close_channel(self) -> None:
        if self._session is not None:
            self._session.close()

    def heartbeat_extra(self) -> dict[str, Any]:
        return {**super().heartbeat_extra(), "quota_remaining": self._quota_remaining}

    def reload(self, new: Config, changed: set[str]) -> set[str]:
        applied = super().reload(new, changed) | (
            changed & {"base_url", "emergency_retry", "emergency_expire"})
        if changed & {"token_file", "user_key_file"}:
            try:
                secrets = self._read_secrets(new)
            except ConfigError as exc:
                self.count("errors")
                self.log.error("SIGHUP: %s; keeping the running token and user key", exc)
            else:
                with self._lock:
                    self._token, self._user = secrets
                applied |= changed & {"token_file", "user_key_file"}
        return applied

    # ------------------------------------------------------------------ sending

    def form(self, item: Request) -> dict[str, str]:
        with self._lock:
            token, user = self._token, self._user
        fields = {"token": token, "user": user, "message": item.message,
                  "priority": str(item.priority), "timestamp": str(int(item.ts))}
        if item.title:
            fields["title"] = item.title
        if item.priority == EMERGENCY:
            fields["retry"] = str(self.config.emergency_retry)
            fields["expire"] = str(self.config.emergency_expire)
        return fields

    def deliver(self, batch: list[Request]) -> str:
        import requests

        session = self._open_session()
        (item,) = batch
        url = self.url
        try:
            response = session.post(url, data=self.form(item), timeout=self.config.timeout)
        except requests.RequestException as exc:
            raise TryLater(f"POST {url} failed: {type(exc).__name__}: {exc}") from None
        remaining = response.headers.get("X-Limit-App-Remaining")
        if remaining is not None:
            with contextlib.suppress(ValueError):
                self._quota_remaining = int(remaining)
        status = response.status_code
        if status == 200:
            try:
                body = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and body.get("status") == 1:
                return f"Pushover request {body.get('request', '?')}"
            raise TryLater(f"POST {url}: HTTP 200 without status 1, body "
                           f"{response.text[:120]!r}")
        if status == 429:
            wait, source = wait_from_headers(response.headers, time.time())
            raise HoldOff(f"Pushover says over quota (HTTP 429: {pushover_errors(response)})",
                          wait, source)
        if 400 <= status < 500:
            raise Refused(f"HTTP {status}: {pushover_errors(response)} (check token_file, "
                          "user_key_file and the request)")
        raise TryLater(f"POST {url}: HTTP {status}: {pushover_errors(response)}")


main = PushoverNotifier.main

if __name__ == "__main__":
    sys.exit(main())
