"""HTTP for the daemons that read outside web services (feeds, pages).

Imports requests, so only those daemons import this module. ``fetch`` bounds a request by one
deadline for the whole answer (requests' own timeout is per socket read, so a server that
trickles bytes could hold a daemon for ever) and by size, and turns every failure into a
:class:`FetchError` whose text starts with the URL.
"""

from __future__ import annotations

import re
import time

import requests


class FetchError(Exception):
    """A URL could not be read, or what came is not what was expected; the text says which."""


def session(user_agent: str, accept: str) -> requests.Session:
    s = requests.Session()
    s.headers["User-Agent"] = user_agent
    s.headers["Accept"] = accept
    return s


def fetch(session: requests.Session, url: str, timeout: float,
          max_bytes: int) -> tuple[bytes, str | None]:
    """GET ``url``: its body and the charset the server names (or None). FetchError otherwise."""
    deadline = time.monotonic() + timeout
    try:
        with session.get(url, timeout=timeout, stream=True) as resp:
            if resp.status_code != 200:
                raise FetchError(f"{url}: HTTP {resp.status_code} {resp.reason}")
            body = bytearray()
            for chunk in resp.iter_content(65536):
                body += chunk
                if len(body) > max_bytes:
                    raise FetchError(f"{url}: answer larger than {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise FetchError(f"{url}: no complete answer within {timeout:g} s")
            charset = resp.encoding if "charset=" in resp.headers.get("Content-Type", "") \
                else None
    except requests.Timeout:
        raise FetchError(f"{url}: no answer within {timeout:g} s") from None
    except requests.RequestException as exc:
        raise FetchError(f"{url}: {short_error(exc)}") from None
    return bytes(body), charset


def short_error(exc: Exception) -> str:
    """The useful end of a requests error ('[Errno 111] Connection refused')."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    return found.group(0).strip() if found else f"{type(exc).__name__}: {text[:200]}"
