"""The HTTP side: the standard library's ThreadingHTTPServer, one thread per connection.

Routes (docs/web.md has the JSON shapes):

* pages ``/``, ``/daemons``, ``/boards``, ``/history``, ``/alerts``, ``/outputs``; ``/login``,
  ``/logout``; ``/static/<file>`` (vendored, versioned URLs, gzip);
* ``/api/state``, ``/api/values``, ``/api/daemons``, ``/api/boards``, ``/api/rules``,
  ``/api/notifications``, ``/api/session``, ``/api/history``, ``/api/events`` (Server-Sent
  Events), ``POST /api/outputs/<target>``; ``/healthz`` answers without login.

Errors of the API are JSON ``{"error": "..."}``.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.server
import json
import logging
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any

from pihub.topics import SEGMENT

from . import pages
from .auth import ADMIN, Session
from .rrd import RrdError
from .state import Client

if TYPE_CHECKING:
    from . import Web

log = logging.getLogger("pihub.web.http")

COOKIE = "pihub_session"
STATIC = ("app.js", "app.css", "uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE")
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
         ".LICENSE": "text/plain; charset=utf-8"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
#: range -> (seconds, step seconds, with a min/max band)
SPANS = {"1h": (3600, 15, False), "24h": (86400, 120, False), "7d": (7 * 86400, 900, True),
         "30d": (30 * 86400, 3600, True), "1y": (365 * 86400, 43200, True)}
MAX_HISTORY_SERIES = 8
MAX_POINTS = 11000  # VictoriaMetrics refuses more than 30000 points per series
MAX_TSDB_ANSWER = 16 * 1024 * 1024
MAX_FORM = 4096


@dataclass(frozen=True)
class Asset:
    body: bytes
    gz: bytes
    ctype: str
    url: str


def load_assets() -> dict[str, Asset]:
    out = {}
    root = resources.files(__package__).joinpath("static")
    for name in STATIC:
        body = root.joinpath(name).read_bytes()
        digest = hashlib.sha256(body).hexdigest()[:10]
        ctype = next((t for s, t in TYPES.items() if name.endswith(s)), "text/plain")
        out[name] = Asset(body, gzip.compress(body, 9, mtime=0), ctype,
                          f"/static/{name}?v={digest}")
    return out


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, web: Web, address: tuple[str, int],
                 tls: ssl.SSLContext | None) -> None:
        self.web = web
        self.tls = tls
        self.assets = load_assets()
        self.stopping = threading.Event()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        if self.tls is not None:
            # the handshake happens in the connection's own thread, on first read
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr


class Handler(http.server.BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"
    server_version = "pihub-web"
    sys_version = ""
    timeout = 60  # an idle keep-alive connection or a slow request is closed after this

    # ------------------------------------------------------------------ plumbing

    @property
    def web(self) -> Web:
        return self.server.web

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)

    def client(self) -> str:
        return str(self.client_address[0])

    def send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None,
             gz: bytes | None = None) -> None:
        if status >= 500:
            self.web.count("http_errors")
        if gz is None and len(body) > 1024 and ctype.startswith(("text/", "application/json")):
            gz = gzip.compress(body, 6) if "gzip" in self.headers.get("Accept-Encoding",
                                                                      "") else None
        use_gz = gz is not None and "gzip" in self.headers.get("Accept-Encoding", "")
        payload = gz if use_gz and gz is not None else body
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        if use_gz:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Vary", "Accept-Encoding, Cookie")
        self.send_header("X-Content-Type-Options", "nosniff")
        # a kiosk URL's token never leaves the site in a Referer
        self.send_header("Referrer-Policy", "same-origin")
        self.send_header("X-Frame-Options", "DENY")
        if ctype.startswith("text/html"):
            self.send_header("Content-Security-Policy", CSP)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if "Cache-Control" not in (headers or {}):
            self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        self.send(status, body, "application/json; charset=utf-8", headers)

    def error_json(self, status: int, message: str,
                   headers: dict[str, str] | None = None) -> None:
        self.send_json(status, {"error": message}, headers)

    def send_html(self, status: int, text: str, headers: dict[str, str] | None = None) -> None:
        self.send(status, text.encode("utf-8"), "text/html; charset=utf-8", headers)

    def redirect(self, where: str, headers: dict[str, str] | None = None) -> None:
        self.send(HTTPStatus.SEE_OTHER, b"", "text/plain", {"Location": where, **(headers or {})})

    def cookie_token(self) -> str | None:
        for part in self.headers.get("Cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return value
        return None

    def set_cookie(self, session: Session) -> dict[str, str]:
        secure = "; Secure" if self.server.tls is not None else ""
        return {"Set-Cookie": f"{COOKIE}={session.token}; Path=/; HttpOnly; SameSite=Strict; "
                              f"Max-Age={int(self.web.config.session_idle_s)}{secure}"}

    def read_body(self) -> bytes | None:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length < 0 or length > MAX_FORM:
            self.error_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                            f"a request body is at most {MAX_FORM} bytes")
            return None
        return self.rfile.read(length)

    def same_origin(self) -> bool:
        """A POST whose Origin names another site is refused (a second guard beside CSRF)."""
        origin = self.headers.get("Origin")
        if not origin or origin == "null":  # privacy modes send null: the CSRF token decides
            return True
        return urllib.parse.urlsplit(origin).netloc == self.headers.get("Host", "")

    # ------------------------------------------------------------------ who is asking

    def authenticate(self, params: dict[str, list[str]]) -> tuple[Session | None,
                                                                   dict[str, str]]:
        """The session of the cookie, or a new viewer session from a kiosk token in the URL
        (then also the cookie to set)."""
        session = self.web.auth.session(self.cookie_token())
        if session is not None:
            return session, {}
        token = (params.get("token") or [""])[0]
        if token:
            session = self.web.auth.kiosk(token)
            if session is not None:
                self.web.count("logins")
                return session, self.set_cookie(session)
        if not self.web.config.login_required:
            return self.web.anonymous, {}
        return None, {}

    # ------------------------------------------------------------------ GET

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self.web.count("http_requests")
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        params = urllib.parse.parse_qs(url.query)
        if path.startswith("/static/"):
            self.static(path[len("/static/"):])
            return
        if path == "/favicon.ico":
            self.send(HTTPStatus.NO_CONTENT, b"", "image/x-icon",
                      {"Cache-Control": "public, max-age=86400"})
            return
        if path == "/healthz":
            self.send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
            return
        if path == "/login":
            self.send_html(HTTPStatus.OK, self.login_page(params.get("next", ["/"])[0], ""))
            return
        session, cookie = self.authenticate(params)
        if session is None:
            if path.startswith("/api/"):
                self.error_json(HTTPStatus.UNAUTHORIZED, "login required: POST /login first")
            else:
                self.redirect("/login?" + urllib.parse.urlencode({"next": self.path}))
            return
        if path.startswith("/api/"):
            self.api_get(path, params, session, cookie)
            return
        page = next((name for name, url_, _label in pages.PAGES if url_ == path), None)
        if page is None:
            self.send_html(HTTPStatus.NOT_FOUND, "<!doctype html><title>not found</title>"
                           "<p>Not found. <a href=\"/\">Overview</a></p>")
            return
        self.send_html(HTTPStatus.OK, self.render(page, params, session), cookie)

    def static(self, name: str) -> None:
        asset = self.server.assets.get(name)
        if asset is None:
            self.error_json(HTTPStatus.NOT_FOUND, f"no static file {name!r}")
            return
        self.send(HTTPStatus.OK, asset.body, asset.ctype,
                  {"Cache-Control": "public, max-age=31536000, immutable"}, gz=asset.gz)

    def render(self, page: str, params: dict[str, list[str]], session: Session) -> str:
        cfg = self.web.config
        kiosk = params.get("kiosk", ["0"])[0] == "1"
        token = (params.get("token") or [""])[0]
        view = pages.View(
            user=session.user, role=session.role, csrf=session.csrf, kiosk=kiosk,
            dark=params.get("theme", [""])[0] == "dark",
            assets={n: a.url for n, a in self.server.assets.items()},
            stale_factor=cfg.stale_factor, tsdb=bool(cfg.tsdb.url), rrd=self.web.rrd is not None,
            query=("&" + urllib.parse.urlencode({"token": token})) if token else "")
        snap = self.web.state.snapshot()
        now = time.time()
        scripts: tuple[str, ...] = ()
        if page == "overview":
            body = pages.overview(snap["values"], now, cfg.stale_factor)
        elif page == "daemons":
            body = pages.daemons(snap["daemons"], now, snap["hosts"])
        elif page == "boards":
            body = pages.boards(snap["boards"], now)
        elif page == "alerts":
            body = pages.alerts(snap["rules"], snap["notifications"])
        elif page == "outputs":
            body = pages.outputs(snap["values"], view)
        else:
            span = params.get("range", ["24h"])[0]
            step = params.get("step", [""])[0]
            body = pages.history(snap["values"], params.get("series", []),
                                 span if span in SPANS else "24h", step, view)
            scripts = ("uPlot.iife.min.js",)
        title = next(label for name, _u, label in pages.PAGES if name == page)
        return pages.layout(view, page, title, body, scripts)

    def api_get(self, path: str, params: dict[str, list[str]], session: Session,
                cookie: dict[str, str]) -> None:
        state = self.web.state
        if path == "/api/events":
            self.events()
            return
        if path == "/api/history":
            self.history(params)
            return
        if path == "/api/rrd":
            self.rrd_graph(params)
            return
        if path == "/api/session":
            self.send_json(HTTPStatus.OK, {"user": session.user, "role": session.role,
                                           "csrf": session.csrf}, cookie)
            return
        snap = state.snapshot()
        if path == "/api/state":
            self.send_json(HTTPStatus.OK, snap, cookie)
        elif path in ("/api/values", "/api/daemons", "/api/boards", "/api/rules",
                      "/api/notifications"):
            self.send_json(HTTPStatus.OK, {"ts": snap["ts"], path[5:]: snap[path[5:]]}, cookie)
        else:
            self.error_json(HTTPStatus.NOT_FOUND, f"no API {path}")

    # ------------------------------------------------------------------ live updates

    def events(self) -> None:
        """Server-Sent Events: ``event: snapshot`` (the whole state) first, then one ``data:``
        line per change (``{"kind", "key", "item"}``), a comment every ``sse_ping_s``."""
        cfg = self.web.config
        state = self.web.state
        if state.clients() >= cfg.sse_max_clients:
            self.error_json(HTTPStatus.SERVICE_UNAVAILABLE,
                            f"{cfg.sse_max_clients} live pages are open already "
                            "(sse_max_clients)", {"Retry-After": "10"})
            return
        client = Client(cfg.sse_queue, cfg.sse_max_lag_s, self.client())
        snapshot = state.attach(client)
        self.close_connection = True
        behind = False
        try:
            self.send_response(HTTPStatus.OK)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Accel-Buffering", "no")
            self.send_header("Connection", "close")
            self.end_headers()
            # a write that cannot go through for this long means the page fell behind
            self.connection.settimeout(cfg.sse_max_lag_s)
            self.wfile.write(b"retry: 2000\nevent: snapshot\ndata: " + snapshot + b"\n\n")
            self.wfile.flush()
            while not self.server.stopping.is_set():
                events = client.take(cfg.sse_ping_s)
                if client.dropped:
                    behind = True
                    log.info("live page at %s dropped: %s", self.client(), client.dropped)
                    break
                if client.closed:
                    break
                if events:
                    self.wfile.write(b"".join(b"data: " + e + b"\n\n" for e in events))
                else:
                    self.wfile.write(b": ping\n\n")
                self.wfile.flush()
        except TimeoutError:
            behind = True
            log.info("live page at %s dropped: no write went through for %g s",
                     self.client(), cfg.sse_max_lag_s)
        except OSError as exc:
            log.debug("live page at %s went away: %s", self.client(), exc)
        finally:
            state.detach(client)
            if behind:
                self.web.count("sse_dropped")

    # ------------------------------------------------------------------ history

    def history(self, params: dict[str, list[str]]) -> None:
        tsdb = self.web.config.tsdb
        if not tsdb.url:
            self.error_json(HTTPStatus.NOT_FOUND, "no timeseries database configured "
                            "(tsdb.url): there is no history")
            return
        series = params.get("series", [])
        if not series or len(series) > MAX_HISTORY_SERIES:
            self.error_json(HTTPStatus.BAD_REQUEST, f"give 1 to {MAX_HISTORY_SERIES} series= "
                            f"<location>/<quantity>, got {len(series)}")
            return
        span = params.get("range", ["24h"])[0]
        if span not in SPANS:
            self.error_json(HTTPStatus.BAD_REQUEST,
                            f"range must be one of {', '.join(SPANS)}, got {span[:20]!r}")
            return
        seconds, step, band = SPANS[span]
        given = params.get("step", [""])[0]
        if given:
            try:
                step = int(given)
            except ValueError:
                step = 0
            if step < 1 or seconds / step > MAX_POINTS:
                self.error_json(HTTPStatus.BAD_REQUEST, f"step must be whole seconds, at least "
                                f"{max(1, seconds // MAX_POINTS)} for {span}, "
                                f"got {given[:20]!r}")
                return
        end = time.time()
        start = end - seconds
        out = []
        values = self.web.state.snapshot()["values"]
        for key in series:
            location, _, quantity = key.partition("/")
            if not (SEGMENT.match(location) and SEGMENT.match(quantity)):
                self.error_json(HTTPStatus.BAD_REQUEST, f"series must be <location>/<quantity> "
                                f"of [a-z0-9_-], got {key[:80]!r}")
                return
            selector = f'{{__name__="{quantity}_value",location="{location}"}}'
            entry: dict[str, Any] = {"id": key, "location": location, "quantity": quantity,
                                     "unit": (values.get(key) or {}).get("unit")}
            try:
                entry["points"] = self.query(f"avg(avg_over_time({selector}[{step}s]))",
                                             start, end, step)
                entry["min"] = self.query(f"min(min_over_time({selector}[{step}s]))",
                                          start, end, step) if band else None
                entry["max"] = self.query(f"max(max_over_time({selector}[{step}s]))",
                                          start, end, step) if band else None
            except TsdbError as exc:
                self.web.count("tsdb_errors")
                self.web.count("errors")
                log.warning("history: %s", exc)
                self.error_json(HTTPStatus.BAD_GATEWAY, str(exc))
                return
            out.append(entry)
        self.send_json(HTTPStatus.OK, {"range": span, "start": round(start, 3),
                                       "end": round(end, 3), "step": step, "band": band,
                                       "series": out})

    def rrd_graph(self, params: dict[str, list[str]]) -> None:
        """``/api/rrd?series=<location>/<quantity>&range=24h``: store-rrd's file as a PNG."""
        graphs = self.web.rrd
        if graphs is None:
            self.error_json(HTTPStatus.NOT_FOUND, "no RRD directory configured (rrd.dir)")
            return
        key = (params.get("series") or [""])[0]
        span = (params.get("range") or ["24h"])[0]
        location, _, quantity = key.partition("/")
        if not (SEGMENT.match(location) and SEGMENT.match(quantity)) or span not in SPANS:
            self.error_json(HTTPStatus.BAD_REQUEST, "give series=<location>/<quantity> of "
                            f"[a-z0-9_-] and range= one of {', '.join(SPANS)}")
            return
        try:
            png = graphs.png(location, quantity, span)
        except LookupError as exc:
            self.error_json(HTTPStatus.NOT_FOUND, str(exc))
            return
        except RrdError as exc:
            self.web.count("rrd_errors")
            self.web.count("errors")
            log.warning("history: %s", exc)
            self.error_json(HTTPStatus.BAD_GATEWAY, str(exc))
            return
        self.send(HTTPStatus.OK, png, "image/png",
                  {"Cache-Control": f"private, max-age={int(graphs.cache_s)}"})

    def query(self, promql: str, start: float, end: float, step: int) -> list[list[float]]:
        """[[unix seconds, value], ...] of one query_range answer (one series expected)."""
        import urllib.error
        import urllib.request

        tsdb = self.web.config.tsdb
        base = (tsdb.url or "").rstrip("/")
        url = (base + "/api/v1/query_range?" + urllib.parse.urlencode(
            {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step}s"}))
        request = urllib.request.Request(url, headers={"Accept": "application/json"})
        if self.web.tsdb_auth:
            request.add_header("Authorization", "Basic " + base64.b64encode(
                self.web.tsdb_auth.encode()).decode())
        shown = base + "/api/v1/query_range"
        try:
            with urllib.request.urlopen(request, timeout=tsdb.timeout) as resp:
                raw = resp.read(MAX_TSDB_ANSWER + 1)
        except urllib.error.HTTPError as exc:
            raise TsdbError(f"{shown}: HTTP {exc.code} {exc.reason}") from None
        except (OSError, ValueError) as exc:
            raise TsdbError(f"{shown}: {exc}") from None
        if len(raw) > MAX_TSDB_ANSWER:
            raise TsdbError(f"{shown}: answer over {MAX_TSDB_ANSWER} bytes")
        try:
            result = json.loads(raw)["data"]["result"]
            if not result:
                return []
            return [[float(t), float(v)] for t, v in result[0]["values"]]
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise TsdbError(f"{shown}: unexpected answer ({type(exc).__name__}: "
                            f"{str(exc)[:80]})") from None

    # ------------------------------------------------------------------ POST

    def do_POST(self) -> None:
        self.web.count("http_requests")
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        is_api = path.startswith("/api/")
        body = self.read_body()
        if body is None:
            return
        if not self.same_origin():
            self.refuse(is_api, HTTPStatus.FORBIDDEN, "cross-site request refused (Origin)")
            return
        if path == "/login":
            self.login(body)
            return
        session, _cookie = self.authenticate({})
        if session is None:
            self.refuse(is_api, HTTPStatus.UNAUTHORIZED, "login required: POST /login first")
            return
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace")) if not is_api else {}
        given = self.headers.get("X-CSRF-Token") or (form.get("csrf") or [""])[0]
        if not self.web.auth.csrf_ok(session, given):
            self.web.count("csrf_refused")
            self.refuse(is_api, HTTPStatus.FORBIDDEN,
                        "missing or wrong CSRF token (X-CSRF-Token header or csrf field)")
            return
        if path == "/logout":
            self.web.auth.end(session.token)
            self.redirect("/login", {"Set-Cookie": f"{COOKIE}=; Path=/; HttpOnly; "
                                                   "SameSite=Strict; Max-Age=0"})
            return
        target = urllib.parse.unquote(path.rsplit("/", 1)[-1])  # <output>@<host>: %40
        if path.startswith(("/api/outputs/", "/outputs/")) and path.count("/") == (
                3 if is_api else 2):
            if session.role != ADMIN:
                self.web.count("commands_refused")
                self.refuse(is_api, HTTPStatus.FORBIDDEN,
                            f"user {session.user!r} may only look (read-only role)")
                return
            if is_api:
                try:
                    data = json.loads(body or b"null")
                except ValueError:
                    data = None
                wanted: Any = data.get("state") if isinstance(data, dict) else None
            else:
                wanted = form["state"][0] if form.get("state") else None
            problem = self.web.switch(target, wanted, session.user)
            if problem is not None:
                self.refuse(is_api, problem[0], problem[1])
            elif is_api:
                self.send_json(HTTPStatus.ACCEPTED, {"target": target, "sent": str(wanted)})
            else:
                self.redirect("/outputs")
            return
        self.refuse(is_api, HTTPStatus.NOT_FOUND, f"nothing to POST at {path[:80]}")

    def refuse(self, is_api: bool, status: int, message: str) -> None:
        if is_api:
            self.error_json(status, message)
        else:
            self.send_html(status, "<!doctype html><meta charset=utf-8><title>refused</title>"
                           f"<p>{pages.esc(message)}</p><p><a href=\"/\">Overview</a></p>")

    def login(self, body: bytes) -> None:
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        user = (form.get("user") or [""])[0][:128]
        password = (form.get("password") or [""])[0][:1024]
        nxt = form.get("next", ["/"])[0]
        if not nxt.startswith("/") or nxt.startswith("//"):
            nxt = "/"  # never a redirect off the site
        wait = self.web.auth.retry_after(self.client())
        if wait:
            self.web.count("logins_limited")
            self.send_html(HTTPStatus.TOO_MANY_REQUESTS, self.login_page(
                nxt, f"Too many failed logins from here; try again in {int(wait) + 1} s."),
                {"Retry-After": str(int(wait) + 1)})
            return
        session = self.web.auth.check(self.client(), user, password)
        if session is None:
            self.web.count("login_failures")
            log.warning("failed login from %s", self.client())
            self.send_html(HTTPStatus.UNAUTHORIZED,
                           self.login_page(nxt, "Wrong user name or password."))
            return
        self.web.count("logins")
        log.info("%s logged in from %s (%s)", user, self.client(), session.role)
        self.redirect(nxt, self.set_cookie(session))

    def login_page(self, nxt: str, error: str) -> str:
        css = self.server.assets["app.css"].url
        problem = f'<p class="error" role="alert">{pages.esc(error)}</p>' if error else ""
        return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
                '<meta name="viewport" content="width=device-width,initial-scale=1">'
                f'<title>Log in · pihub</title><link rel="stylesheet" href="{pages.esc(css)}">'
                '</head><body class="login"><main><form method="post" action="/login">'
                f'<h1>pihub</h1>{problem}'
                '<label>User <input name="user" autocomplete="username" required autofocus>'
                '</label><label>Password <input name="password" type="password" '
                'autocomplete="current-password" required></label>'
                f'<input type="hidden" name="next" value="{pages.esc(nxt)}">'
                '<button type="submit">Log in</button></form></main></body></html>')


class TsdbError(Exception):
    """The timeseries DB did not answer as expected; the text starts with its URL."""
