"""pihub-notify-ntfy: send the hub's notification requests to an ntfy topic.

Reads the notification requests of docs/contract.md on ``<root>/notify/<topic>`` (those its
``topics`` filters match) exactly as every notifier does (:mod:`pihub.notify`: checked, queued
on disk before the MQTT message is acknowledged, repeats dropped, sent oldest first from the
main thread) and POSTs each to ``<base_url>/<topic>`` of an ntfy server, self-hosted or
https://ntfy.sh (ntfy's publish API: the message as the body, the rest as headers)::

    POST /pihub-alerts HTTP/1.1
    Title: store-rrd DOWN on pi4
    Priority: 4
    Tags: pihub,monitor
    Click: http://pi4.local:8080/alerts            (only with `click`)
    Authorization: Bearer tk_...                   (only with `token_file`)

    pihub-store-rrd on pi4 is down since 10:42:07

Priority -2..2 becomes ntfy's 1..5 (min, low, default, high, max/urgent). A title with
characters beyond ASCII goes as an RFC 2047 encoded word (``=?utf-8?b?...?=``), which ntfy
decodes (server 2.4 and later); line breaks in it become spaces.

* HTTP 200 with ntfy's message JSON (an ``id``): sent, removed from the queue (``sent``);
* network error, timeout, 5xx or an unexpected 200 (a captive portal): kept, tried again after
  an exponential backoff (``retries``);
* 429 (ntfy's rate limits): kept, nothing sent until ``Retry-After`` or ``backoff_max``
  (``quota_waits``);
* any other 4xx (401/403: a wrong token or a topic it may not write; 400): logged with ntfy's
  ``error`` text and dropped (``failed``, ``errors``).
"""

from __future__ import annotations

import base64
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pihub import __version__
from pihub.bus import read_secret
from pihub.config import ConfigError, setting
from pihub.notify import (
    HoldOff,
    Notifier,
    NotifierConfig,
    Refused,
    Request,
    TryLater,
    one_line,
    retry_after,
)

if TYPE_CHECKING:
    import requests

#: pihub's priority (-2..2) -> ntfy's (1 min, 2 low, 3 default, 4 high, 5 max/urgent)
PRIORITY = {-2: 1, -1: 2, 0: 3, 1: 4, 2: 5}


@dataclass(kw_only=True)
class Config(NotifierConfig):
    base_url: str = setting(
        "https://ntfy.sh",
        "The ntfy server: https://ntfy.sh or your own; messages are POSTed to "
        "<base_url>/<topic>.",
        pattern=r"^https?://[^\s/]+(/[^\s]*)?$",
    )
    topic: str = setting(
        help="The ntfy topic the phones subscribe to. On ntfy.sh anyone who knows it can read "
             "it: pick one nobody guesses, or use a token.",
        pattern=r"^[A-Za-z0-9_-]{1,64}$", example="pihub-alerts-7f3k2q",
    )
    token_file: str | None = setting(
        None, "File holding an ntfy access token (tk_..., first line), sent as Authorization: "
              "Bearer; null sends none (a topic anyone may write).",
    )
    tags: list[str] = setting(
        ["pihub"], "Tags of every message (ntfy shows a tag named like an emoji as that emoji: "
                   "warning, rotating_light); the request's notify topic (monitor) is added.",
    )
    click: str | None = setting(
        None, "URL opened when the notification is tapped (the hub's page), or null.",
        pattern=r"^https?://[^\s]+$",
    )

    def check(self) -> None:
        super().check()
        for i, tag in enumerate(self.tags):
            if not tag or any(c in tag for c in ", \t\r\n") or not tag.isascii():
                raise ConfigError(f"tags[{i}]", "expected a word of ASCII letters, digits, _ "
                                                f"+ or -, got {tag!r}")


def rfc2047(text: str) -> str:
    """``text`` as an HTTP header value: itself if ASCII, else one RFC 2047 encoded word."""
    if text.isascii():
        return text
    return "=?utf-8?b?" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "?="


def ntfy_error(response: requests.Response) -> str:
    """ntfy's own words from an error answer (``{"code": 40101, "error": "unauthorized"}``),
    else the raw body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("error"):
        code = f" (code {body['code']})" if body.get("code") else ""
        return f"{body['error']}{code}"
    text = response.text.strip().replace("\n", " ")
    return text[:200] or "(empty body)"


class NtfyNotifier(Notifier[Config]):
    name = "notify-ntfy"
    config_class = Config
    description = "Send the notification requests on <root>/notify/# to an ntfy topic."
    channel = "ntfy"

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self._token = self._read_token(config)
        super().__init__(config, config_path)
        self._session: requests.Session | None = None

    @staticmethod
    def _read_token(config: Config) -> str | None:
        if config.token_file is None:
            return None
        token = read_secret(config.token_file, "token_file").strip()
        if not token:
            raise ConfigError("token_file", f"{config.token_file} is empty; expected the ntfy "
                                            "access token on its first line")
        return token

    @property
    def url(self) -> str:
        return f"{self.config.base_url.rstrip('/')}/{self.config.topic}"

    def open_channel(self) -> None:
        """Nothing yet: requests (about 5 MB of the Pi's RAM, its imports) and the session are
        made for the first notification (:meth:`_open_session`), not for a daemon that waits."""

    def _open_session(self) -> requests.Session:
        if self._session is None:
            from pihub.web import session

            self._session = session(f"pihub-notify-ntfy/{__version__}", "application/json")
        return self._session

    def close_channel(self) -> None:
        if self._session is not None:
            self._session.close()

    def reload(self, new: Config, changed: set[str]) -> set[str]:
        applied = super().reload(new, changed) | (changed & {"base_url", "topic", "tags",
                                                             "click"})
        if "token_file" in changed:
            try:
                token = self._read_token(new)
            except ConfigError as exc:
                self.count("errors")
                self.log.error("SIGHUP: %s; keeping the running token", exc)
            else:
                with self._lock:
                    self._token = token
                applied.add("token_file")
        return applied

    def headers(self, item: Request) -> dict[str, str]:
        """The publish headers of one request (ntfy's names: Title, Priority, Tags, Click)."""
        config = self.config
        headers = {"Priority": str(PRIORITY[item.priority]),
                   "Tags": ",".join([*config.tags, item.segment]),
                   "Content-Type": "text/plain; charset=utf-8"}
        title = one_line(item.title or "")
        if title:
            headers["Title"] = rfc2047(title)
        if config.click:
            headers["Click"] = config.click
        with self._lock:
            token = self._token
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def deliver(self, batch: list[Request]) -> str:
        import requests

        from pihub.web import short_error

        session = self._open_session()
        (item,) = batch
        url = self.url
        try:
            response = session.post(url, data=item.message.encode("utf-8"),
                                    headers=self.headers(item), timeout=self.config.timeout)
        except requests.RequestException as exc:
            raise TryLater(f"POST {url} failed: {short_error(exc)}") from None
        status = response.status_code
        if status == 200:
            try:
                body: Any = response.json()
            except ValueError:
                body = None
            if isinstance(body, dict) and body.get("id"):
                return f"ntfy message {body['id']}"
            raise TryLater(f"POST {url}: HTTP 200 without ntfy's message id, body "
                           f"{response.text[:120]!r}")
        if status == 429:
            wait = retry_after(response.headers, time.time())
            raise HoldOff(f"ntfy says too many requests (HTTP 429: {ntfy_error(response)})",
                          wait, f"Retry-After: {response.headers['Retry-After']}"
                          if wait is not None else "no Retry-After header")
        if 400 <= status < 500:
            hint = " (check token_file and topic)" if status in (401, 403) else ""
            raise Refused(f"HTTP {status}: {ntfy_error(response)}{hint}")
        raise TryLater(f"POST {url}: HTTP {status}: {ntfy_error(response)}")


main = NtfyNotifier.main

if __name__ == "__main__":
    sys.exit(main())
