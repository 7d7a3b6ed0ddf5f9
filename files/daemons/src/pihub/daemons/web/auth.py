"""Logins, sessions, CSRF tokens and the login rate limit; the standard library only.

Password hashes are PBKDF2-HMAC-SHA256 (hashlib) in the form
``pbkdf2_sha256$<iterations>$<salt, base64>$<hash, base64>`` (the layout Django and passlib
use). A login for an unknown user is checked against a dummy hash of the same cost as the
configured ones and compared with :func:`hmac.compare_digest`, so a wrong password and an
unknown user get the same answer after the same time.

Sessions live in memory (a restart logs everyone out; a kiosk URL with its token logs in again
by itself): a random token in an HttpOnly, SameSite=Strict cookie, with its own CSRF token that
every POST must carry. Two roles: ``admin`` may switch outputs, ``viewer`` only looks.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

SCHEME = "pbkdf2_sha256"
#: PBKDF2 rounds of a new hash: about 0.2 s on a Raspberry Pi 4 core, 0.1 s on x86_64
ITERATIONS = 100_000
MIN_ITERATIONS = 1_000
ADMIN, VIEWER = "admin", "viewer"


def hash_password(password: str, iterations: int = ITERATIONS, salt: bytes | None = None) -> str:
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return "$".join((SCHEME, str(iterations), base64.b64encode(salt).decode("ascii"),
                     base64.b64encode(digest).decode("ascii")))


def parse_hash(text: str) -> tuple[int, bytes, bytes]:
    """(iterations, salt, digest) of a hash; ValueError saying what is wrong."""
    parts = text.split("$")
    if len(parts) != 4 or parts[0] != SCHEME:
        raise ValueError(f"expected {SCHEME}$<iterations>$<salt>$<hash> (pihub-web "
                         "--hash-password prints one)")
    try:
        iterations = int(parts[1])
        salt = base64.b64decode(parts[2], validate=True)
        digest = base64.b64decode(parts[3], validate=True)
    except ValueError:
        raise ValueError("iterations must be an integer, salt and hash base64") from None
    if iterations < MIN_ITERATIONS:
        raise ValueError(f"at least {MIN_ITERATIONS} iterations, got {iterations}")
    if len(digest) != 32 or not salt:
        raise ValueError("the hash must be 32 bytes (SHA-256) and the salt not empty")
    return iterations, salt, digest


@dataclass
class Session:
    token: str
    user: str
    role: str
    csrf: str
    expires: float


class Auth:
    def __init__(self, users: dict[str, str], viewers: list[str], kiosk_token: str | None,
                 session_idle_s: float, max_sessions: int = 1000, attempts: int = 5,
                 window_s: float = 60.0) -> None:
        self.users = {name: parse_hash(h) for name, h in users.items()}
        self.viewers = set(viewers)
        self.kiosk_token = kiosk_token
        self.session_idle_s = session_idle_s
        self.max_sessions = max_sessions
        self.attempts = attempts
        self.window_s = window_s
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._failures: dict[str, list[float]] = {}
        # an unknown user costs what the most expensive known one costs
        cost = max((i for i, _s, _d in self.users.values()), default=ITERATIONS)
        self._dummy = (cost, secrets.token_bytes(16), secrets.token_bytes(32))

    # ------------------------------------------------------------------ logins

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again (0: now)."""
        now = time.monotonic()
        with self._lock:
            recent = [t for t in self._failures.get(client, []) if now - t < self.window_s]
            if recent:
                self._failures[client] = recent
            else:
                self._failures.pop(client, None)
            if len(recent) < self.attempts:
                return 0.0
            return max(0.1, self.window_s - (now - recent[0]))

    def check(self, client: str, user: str, password: str) -> Session | None:
        """A new session for a right user and password, else None (the failure counted for
        ``client``). The same work is done whether the user exists or not."""
        known = self.users.get(user)
        iterations, salt, digest = known if known is not None else self._dummy
        got = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
        ok = hmac.compare_digest(got, digest) and known is not None
        if not ok:
            with self._lock:
                if len(self._failures) >= 10_000:  # a bound against address churn
                    self._failures.clear()
                self._failures.setdefault(client, []).append(time.monotonic())
            return None
        with self._lock:
            self._failures.pop(client, None)
        return self.new_session(user, VIEWER if user in self.viewers else ADMIN)

    def kiosk(self, token: str) -> Session | None:
        if not self.kiosk_token or not hmac.compare_digest(token.encode(),
                                                          self.kiosk_token.encode()):
            return None
        return self.new_session("kiosk", VIEWER)

    # ------------------------------------------------------------------ sessions

    def new_session(self, user: str, role: str) -> Session:
        session = Session(secrets.token_urlsafe(32), user, role, secrets.token_urlsafe(24),
                          time.monotonic() + self.session_idle_s)
        with self._lock:
            if len(self._sessions) >= self.max_sessions:
                self._expire()
            while len(self._sessions) >= self.max_sessions:  # the oldest first
                del self._sessions[next(iter(self._sessions))]
            self._sessions[session.token] = session
        return session

    def session(self, token: str | None) -> Session | None:
        """The live session of a cookie's token, its idle deadline pushed back; else None."""
        if not token:
            return None
        now = time.monotonic()
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return None
            if session.expires < now:
                del self._sessions[token]
                return None
            session.expires = now + self.session_idle_s
            return session

    def end(self, token: str) -> None:
        with self._lock:
            self._sessions.pop(token, None)

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _expire(self) -> None:
        now = time.monotonic()
        for token in [t for t, s in self._sessions.items() if s.expires < now]:
            del self._sessions[token]

    @staticmethod
    def csrf_ok(session: Session, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(session.csrf.encode(),
                                                   (given or "").encode())
