"""pihub-web: the hub's own page - live values, daemons, boards, history, alerts and outputs.

* parse config: ``Config`` (listen address and port, TLS, users, the TSDB to read history from,
  the bounds of what is kept and of each live page's queue);
* subscribe: ``<root>/#``, read-only; every message updates the in-memory state
  (:mod:`.state`), which streams the change to the open pages;
* serve: the pages and the JSON API (:mod:`.server`, :mod:`.pages`), login and sessions
  (:mod:`.auth`);
* publish: only ``<root>/cmd/<outputs_daemon>/<target>`` when an admin switches an output
  (a satellite's: ``<root>/host/<host>/cmd/<outputs_daemon>/<target>``, which its bridge
  delivers; contract §2, "Fleet").

``pihub-web --hash-password`` reads a password on stdin and prints the hash for ``users``.
"""

from __future__ import annotations

import getpass
import ssl
import sys
import threading
from dataclasses import dataclass
from typing import Any

from pihub.bus import read_secret
from pihub.config import ConfigError, HostsConfig, setting
from pihub.daemon import Daemon
from pihub.logs import clip
from pihub.topics import DAEMON_NAME, split_identity

from .auth import VIEWER, Auth, Session, hash_password, parse_hash
from .rrd import RrdGraphs
from .server import Server
from .state import Limits, State

#: the hash of "change-me" (the example config's only user; the role writes real ones)
EXAMPLE_HASH = ("pbkdf2_sha256$100000$cGlodWItZXhhbXBsZQ==$"
                "2GCOcpGW+S709vUaJdiliwtWYAT/OFs1SJSjk2xxoqI=")


@dataclass(kw_only=True)
class TsdbConfig:
    url: str | None = setting(
        None, "VictoriaMetrics (store-tsdb's DB) to draw history from, e.g. "
        "http://127.0.0.1:8428; null: no History graphs.", pattern=r"^https?://\S+$")
    username: str | None = setting(
        None, "User name for HTTP basic auth (VictoriaMetrics' -httpAuth.username), or null.")
    password_file: str | None = setting(
        None, "File holding the HTTP basic auth password (first line); goes with username.")
    timeout: float = setting(10.0, "Seconds the DB may take to answer one query.", min=0.1,
                             max=300)

    def check(self) -> None:
        if (self.username is None) != (self.password_file is None):
            raise ConfigError("password_file" if self.username else "username",
                              "username and password_file go together (HTTP basic auth)")


@dataclass(kw_only=True)
class RrdConfig:
    dir: str | None = setting(
        None, "store-rrd's rrd_dir: History draws its files with rrdtool when tsdb.url is "
        "null; null: no RRD graphs.", pattern=r"^/\S*$")
    rrdtool: str = setting("rrdtool", "The rrdtool program.")
    rrdcached_socket: str | None = setting(
        None, "rrdcached's socket (unix:/path), to flush a file before it is drawn; null: "
        "draw the files as they are.", pattern=r"^(unix:)?/\S+$")
    cache_s: float = setting(300.0, "Seconds a drawn graph is served again before it is "
                             "drawn anew.", min=0, max=86400)


@dataclass(kw_only=True)
class Config(HostsConfig):
    listen_address: str = setting(
        "0.0.0.0", "Address to serve the page on: 0.0.0.0 every IPv4 interface, :: every "
        "interface, 127.0.0.1 this host only.")
    port: int = setting(8080, "TCP port of the page.", min=1, max=65535)
    tls_cert_file: str | None = setting(
        None, "PEM certificate (chain) to serve HTTPS with; null serves plain HTTP.")
    tls_key_file: str | None = setting(None, "PEM private key of tls_cert_file.")
    login_required: bool = setting(
        True, "Ask for a login; false shows every page to anyone on the network, read-only.")
    users: dict[str, str] = setting(
        {}, "Who may log in: user name -> password hash (pihub-web --hash-password prints "
        "one; keep them in the ansible vault).", example={"admin": EXAMPLE_HASH})
    viewers: list[str] = setting(
        [], "Users (of users) who may only look: no output switches.", example=[])
    kiosk_token_file: str | None = setting(
        None, "File holding a token (first line) for read-only kiosk URLs: "
        "/boards?kiosk=1&token=<token>; null: no kiosk token.")
    session_idle_s: float = setting(
        7 * 86400.0, "A session ends after this many seconds without a request (an open page "
        "keeps it alive).", min=60, max=366 * 86400)
    login_attempts: int = setting(
        5, "Failed logins allowed per client address in login_window_s; then 429.", min=1,
        max=1000)
    login_window_s: float = setting(60.0, "Window of login_attempts, seconds.", min=1,
                                    max=86400)
    tsdb: TsdbConfig = setting(default_factory=TsdbConfig,
                               help="Where History reads from (store-tsdb's DB).")
    rrd: RrdConfig = setting(default_factory=RrdConfig,
                             help="History without a timeseries DB: store-rrd's files.")
    outputs_daemon: str = setting(
        "sensor-gpio", "Daemon whose outputs (measurements with kind: output) the Outputs page "
        "switches, on <topic_root>/cmd/<outputs_daemon>/<output>.", pattern=DAEMON_NAME.pattern)
    stale_factor: float = setting(
        3.0, "A value older than stale_factor x its usual interval is shown as stale.", min=1,
        max=100)
    max_series: int = setting(2000, "Measurement series kept; a new one beyond is refused.",
                              min=1, max=100000)
    max_board_items: int = setting(500, "Board items kept; a new one beyond is refused.",
                                   min=1, max=100000)
    max_daemons: int = setting(256, "Daemons kept; a new one beyond is refused.", min=1,
                               max=10000)
    max_rules: int = setting(256, "Monitor rules kept; a new one beyond is refused.", min=1,
                             max=10000)
    notification_history: int = setting(
        100, "Notification requests seen on <topic_root>/notify/# kept for the Alerts page.",
        min=1, max=10000)
    sse_max_clients: int = setting(50, "Live pages open at once; one more gets 503.", min=1,
                                   max=1000)
    sse_queue: int = setting(
        512, "Changes one live page may have queued (the latest per item only); more and the "
        "page is dropped (it reconnects and starts from a snapshot).", min=1, max=100000)
    sse_max_lag_s: float = setting(
        5.0, "A live page that falls this many seconds behind is dropped.", min=0.1, max=300)
    sse_ping_s: float = setting(15.0, "Seconds between keep-alive comments on an idle stream.",
                                min=0.1, max=300)

    def check(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("tls_key_file" if self.tls_cert_file else "tls_cert_file",
                              "tls_cert_file and tls_key_file go together")
        for name, text in self.users.items():
            if not name or len(name) > 64 or any(c in name for c in ":$ \t\n"):
                raise ConfigError(f"users.{name}", "a user name is 1-64 characters without "
                                  "spaces, ':' or '$'")
            try:
                parse_hash(text)
            except ValueError as exc:
                raise ConfigError(f"users.{name}", f"{exc}, got {clip(text, 40)}") from None
        for index, name in enumerate(self.viewers):
            if name not in self.users:
                raise ConfigError(f"viewers[{index}]", f"{name!r} is not one of users")
        if self.login_required and not self.users and not self.kiosk_token_file:
            raise ConfigError("users", "at least one user (or kiosk_token_file) is needed "
                              "while login_required is true")


class Web(Daemon[Config]):
    name = "web"
    config_class = Config
    description = "Serve the hub's page: live values, daemons, boards, history, outputs."

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        super().__init__(config, config_path)
        cfg = config
        for counter in ("http_requests", "http_errors", "logins", "login_failures",
                        "logins_limited", "csrf_refused", "commands", "commands_refused",
                        "sse_dropped", "series_refused", "tsdb_errors", "rrd_errors"):
            self.count(counter, 0)
        self.state = State(self.topics, Limits(
            series=cfg.max_series, daemons=cfg.max_daemons, board_items=cfg.max_board_items,
            rules=cfg.max_rules, notifications=cfg.notification_history),
            on_refused=self._refused, own_host=cfg.own_host(), outputs_daemon=cfg.outputs_daemon)
        kiosk = read_secret(cfg.kiosk_token_file, "kiosk_token_file") if (
            cfg.kiosk_token_file) else None
        if kiosk is not None and len(kiosk) < 16:
            raise ConfigError("kiosk_token_file", f"{cfg.kiosk_token_file}: the token must be "
                              f"at least 16 characters, got {len(kiosk)}")
        self.auth = Auth(cfg.users, cfg.viewers, kiosk, cfg.session_idle_s,
                         attempts=cfg.login_attempts, window_s=cfg.login_window_s)
        self.anonymous = Session("", "anonymous", VIEWER, "", float("inf"))
        self.tsdb_auth = (f"{cfg.tsdb.username}:"
                          f"{read_secret(cfg.tsdb.password_file, 'tsdb.password_file')}"
                          if cfg.tsdb.username and cfg.tsdb.password_file else None)
        self.rrd = RrdGraphs(cfg.rrd.dir, cfg.rrd.rrdtool, cfg.rrd.cache_s,
                             cfg.rrd.rrdcached_socket) if cfg.rrd.dir else None
        tls = None
        if cfg.tls_cert_file and cfg.tls_key_file:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                tls.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError("tls_cert_file", f"cannot load {cfg.tls_cert_file} / "
                                  f"{cfg.tls_key_file}: {exc}") from None
        try:
            # bound here, so that READY (after the MQTT side) means the page is served
            self.server = Server(self, (cfg.listen_address, cfg.port), tls)
        except OSError as exc:
            raise ConfigError("port", f"cannot listen on {cfg.listen_address}:{cfg.port}: "
                              f"{exc.strerror or exc}") from None
        self._serving: threading.Thread | None = None

    def setup(self) -> None:
        self.subscribe(self.topics.sub("#"), self.state.on_message)
        self._serving = threading.Thread(target=self.server.serve_forever, name="http",
                                         kwargs={"poll_interval": 0.5}, daemon=True)
        self._serving.start()
        host, port = self.server.server_address[:2]
        self.log.info("serving %s://%s:%d/ (login %s)",
                      "https" if self.server.tls else "http", host, port,
                      "required" if self.config.login_required else "not required")

    def shutdown(self) -> None:
        self.server.stopping.set()
        self.state.close_all()
        self.server.shutdown()
        self.server.server_close()

    def heartbeat_extra(self) -> dict[str, Any]:
        return {"clients": self.state.clients(), "sessions": self.auth.count(),
                "series": self.state.count("values"), "boards": self.state.count("boards"),
                "listen": f"{self.config.listen_address}:{self.config.port}"}

    @classmethod
    def published_topics(cls, config: Config) -> list[str]:  # type: ignore[override]
        """Outside its own subtree, pihub-web writes only the commands of the outputs: this
        hub's, and the satellites' (through their bridges)."""
        return [f"cmd/{config.outputs_daemon}/+", f"host/+/cmd/{config.outputs_daemon}/+"]

    def _refused(self, kind: str, topic: str, limit: int) -> None:
        self.refuse_new_series(topic, limit)

    def switch(self, target: str, wanted: Any, user: str) -> tuple[int, str] | None:
        """Publish the command for an output; (HTTP status, why) when it is refused."""
        words = {"on": "on", "off": "off", "toggle": "toggle", 1: "on", 0: "off"}
        word = words.get(wanted.lower() if isinstance(wanted, str) else
                         wanted if type(wanted) is int else None)  # type: ignore[arg-type]
        if word is None:
            return 400, f"state must be on, off, toggle, 0 or 1, got {str(wanted)[:40]!r}"
        known = sorted(v.get("target") or v["quantity"]
                       for v in self.state.snapshot()["values"].values()
                       if v.get("kind") == "output")
        if target not in known:
            return 404, (f"no output {target[:64]!r}; outputs: {', '.join(known) or 'none'}")
        output, site = split_identity(target)
        self.bus.publish(self.topics.cmd_for(site, self.config.outputs_daemon, output), word,
                         qos=1, retain=False)
        self.count("commands")
        self.log.info("%s switched %s: %s", user, target, word)
        return None

    @classmethod
    def main(cls, argv: list[str] | None = None) -> int:
        args = sys.argv[1:] if argv is None else argv
        if args == ["--hash-password"]:
            return hash_password_cli()
        if "--hash-password" in args:
            print("pihub-web: --hash-password takes no other argument", file=sys.stderr)
            return 2
        return super().main(argv)


def hash_password_cli() -> int:
    """Read a password (a terminal asks without echo; a pipe gives its first line) and print
    its hash, as ``mosquitto_passwd`` does for the broker."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("pihub-web: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


main = Web.main

if __name__ == "__main__":
    sys.exit(main())
