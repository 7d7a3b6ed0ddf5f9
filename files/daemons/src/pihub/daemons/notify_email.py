"""pihub-notify-email: send the hub's notification requests as e-mail, over SMTP.

Reads the notification requests of docs/contract.md on ``<root>/notify/<topic>`` (those its
``topics`` filters match) exactly as every notifier does (:mod:`pihub.notify`: checked, queued
on disk before the MQTT message is acknowledged, repeats dropped, sent oldest first from the
main thread) and mails them from ``sender`` to ``recipients`` through ``host``:

* ``security``: ``starttls`` (port 587: STARTTLS, required), ``tls`` (port 465: TLS from the
  first byte) or ``none`` (port 25, plain; only to a server on loopback, a local relay), the
  server's certificate checked against the system's CAs or ``ca_file``;
* a login (``username``, password from ``password_file``) with whatever of PLAIN and LOGIN
  (or CRAM-MD5) the server offers;
* one mail per request, or with ``digest_s`` > 0 one mail for the requests of a window: the
  first request opens it, ``digest_s`` seconds later everything queued goes out as one mail
  (at most ``max_digest`` requests); a priority 2 request closes the window at once;
* Subject: ``subject_prefix``, ``EMERGENCY:``/``Important:`` for priority 2/1, the title (else
  the message's start), one line: a line break in a title becomes a space, so a request cannot
  add a header (``Bcc:``) of its own. ``X-Priority``/``Importance`` follow the priority,
  ``Date`` is the sending time, ``Message-ID`` is made from the requests' ids, so a mail sent
  twice (the duplicate window of :mod:`pihub.notify`) carries the same one, ``Auto-Submitted:
  auto-generated`` (RFC 3834) keeps auto-responders quiet.

The SMTP answers:

* the server accepted the mail (250 after DATA) for at least one recipient: sent, removed from
  the queue (``sent``; recipients refused beside are logged, ``errors``);
* connection refused, timeout, TLS failure, a 4xx reply, a dropped connection: kept, tried again
  after an exponential backoff (``retries``);
* a 5xx reply (login refused, sender or every recipient refused, message refused): logged with
  the server's words and dropped (``failed``, ``errors``).

Standard library only (``smtplib``, ``ssl``, ``email``).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import smtplib
import ssl
import sys
import time
from dataclasses import dataclass
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Literal

from pihub.bus import read_secret
from pihub.config import ConfigError, setting
from pihub.notify import (
    EMERGENCY,
    Notifier,
    NotifierConfig,
    Refused,
    Request,
    TryLater,
    one_line,
)
from pihub.topics import clip_text

PORTS = {"starttls": 587, "tls": 465, "none": 25}
#: what the Subject says of a priority, and the X-Priority (1 highest .. 5 lowest) it gets
PRIORITY_WORD = {2: "EMERGENCY: ", 1: "Important: "}
X_PRIORITY = {2: "1 (Highest)", 1: "2 (High)", 0: "3 (Normal)", -1: "4 (Low)", -2: "5 (Lowest)"}
MAX_SUBJECT = 200


def _address(value: str, key: str) -> str:
    """An e-mail address from config: one addr-spec, nothing that could end a header."""
    name, addr = parseaddr(value)
    if (one_line(value) != value or not addr or "@" not in addr or name
            or any(c in addr for c in " ,;<>\"")):
        raise ConfigError(key, f"expected one e-mail address (user@example.org), got {value!r}")
    try:
        Address(addr_spec=addr)
    except (ValueError, IndexError) as exc:
        raise ConfigError(key, f"{value!r} is not an e-mail address: {exc}") from None
    return addr


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(kw_only=True)
class Config(NotifierConfig):
    timeout: float = setting(
        10.0, "Seconds to wait for each step of the SMTP conversation (about 8 round trips; "
              "keep it well below heartbeat_interval).", min=0.5, max=120)
    host: str = setting(help="SMTP server (your provider's submission server, or a local "
                             "relay).", pattern=r"^[A-Za-z0-9.:_-]+$", example="smtp.example.org")
    port: int | None = setting(None, "SMTP port; null: 587 for starttls, 465 for tls, 25 for "
                                     "none.", min=1, max=65535)
    security: Literal["starttls", "tls", "none"] = setting(
        "starttls", "starttls (STARTTLS required), tls (TLS from the start, 'SMTPS') or none "
                    "(plain; only to a server on loopback).",
    )
    ca_file: str | None = setting(
        None, "CA certificate(s) to check the server's certificate with; null: the system's.",
    )
    username: str | None = setting(None, "SMTP login, or null to send without one.")
    password_file: str | None = setting(
        None, "File holding the SMTP password (first line), readable by this daemon only.",
    )
    sender: str = setting(help="From: address of the mails.", example="pihub@example.org")
    recipients: list[str] = setting(help="To: addresses, each gets every mail.",
                                    example=["me@example.org"])
    subject_prefix: str = setting("[pihub] ", "Start of every Subject.")
    digest_s: float = setting(
        0.0, "0: one mail per request. Else the first request opens a window of this many "
             "seconds and every request queued when it ends goes out in one mail (priority 2 "
             "ends it at once).", min=0, max=86400,
    )
    max_digest: int = setting(100, "Most requests in one digest mail.", min=1, max=1000)

    def check(self) -> None:
        super().check()
        _address(self.sender, "sender")
        if not self.recipients:
            raise ConfigError("recipients", "must list at least one address")
        for i, addr in enumerate(self.recipients):
            _address(addr, f"recipients[{i}]")
        if one_line(self.subject_prefix) != self.subject_prefix.strip():
            raise ConfigError("subject_prefix", "must be one line")
        if self.security == "none" and not _loopback(self.host):
            raise ConfigError("security", f"none (plain SMTP) only to a server on loopback "
                                          f"(127.0.0.1, ::1, localhost), not {self.host}: use "
                                          "starttls or tls")
        if self.password_file and not self.username:
            raise ConfigError("username", "is required when password_file is set")
        if self.username and not self.password_file:
            raise ConfigError("password_file", "is required when username is set")


def subject(batch: list[Request], prefix: str) -> str:
    """One line: the prefix, the highest priority's word, the title (else the message)."""
    top = max(r.priority for r in batch)
    if len(batch) == 1:
        text = batch[0].title or batch[0].message
    else:
        text = f"{len(batch)} notifications: " + "; ".join(r.title or r.message for r in batch)
    return clip_text(one_line(prefix + PRIORITY_WORD.get(top, "") + one_line(text)),
                     MAX_SUBJECT)


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


class EmailNotifier(Notifier[Config]):
    name = "notify-email"
    config_class = Config
    description = "Send the notification requests on <root>/notify/# as e-mail (SMTP)."
    channel = "SMTP"

    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self._password = self._read_password(config)
        self._context = self._tls_context(config)
        super().__init__(config, config_path)
        self._window_opened: float | None = None

    @staticmethod
    def _read_password(config: Config) -> str | None:
        if config.password_file is None:
            return None
        password = read_secret(config.password_file, "password_file")
        if not password:
            raise ConfigError("password_file", f"{config.password_file} is empty; expected "
                                               "the SMTP password on its first line")
        return password

    @staticmethod
    def _tls_context(config: Config) -> ssl.SSLContext | None:
        if config.security == "none":
            return None
        try:
            return ssl.create_default_context(cafile=config.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError("ca_file", f"cannot load {config.ca_file}: {exc}") from exc

    def reload(self, new: Config, changed: set[str]) -> set[str]:
        applied = super().reload(new, changed) | (changed & {
            "sender", "recipients", "subject_prefix", "digest_s", "max_digest"})
        return applied  # the server, its TLS and the login: a restart

    # ------------------------------------------------------------------ batches

    def next_batch(self, now: float) -> list[Request]:
        config = self.config
        if config.digest_s <= 0:
            return super().next_batch(now)
        items = self.queue.items()
        if not items:
            self._window_opened = None
            return []
        if self._window_opened is None:
            self._window_opened = now
            self.log.debug("digest window opened: %d request(s), mailed in %g s", len(items),
                           config.digest_s)
        if (now - self._window_opened < config.digest_s
                and all(r.priority < EMERGENCY for r in items)):
            return []
        return items[: config.max_digest]

    def sent(self, batch: list[Request]) -> None:
        if not len(self.queue):
            self._window_opened = None  # the next request opens a new window

    # ------------------------------------------------------------------ the mail

    def compose(self, batch: list[Request]) -> EmailMessage:
        config = self.config
        msg = EmailMessage()  # policy.default: refuses a header value with CR or LF
        msg["Subject"] = subject(batch, config.subject_prefix)
        msg["From"] = config.sender
        msg["To"] = ", ".join(config.recipients)
        msg["Date"] = formatdate(localtime=True)
        digest = hashlib.sha256(" ".join(r.ident for r in batch).encode()).hexdigest()[:32]
        domain = config.sender.rsplit("@", 1)[1]
        msg["Message-ID"] = f"<{digest}.{self.name}@{domain}>"
        top = max(r.priority for r in batch)
        msg["X-Priority"] = X_PRIORITY[top]
        if top != 0:
            msg["Importance"] = "high" if top > 0 else "low"
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(self.body(batch), cte="quoted-printable")  # 7-bit: any relay
        return msg

    def body(self, batch: list[Request]) -> str:
        if len(batch) == 1:
            item = batch[0]
            return (f"{item.message}\n\n-- \n{when(item.ts)}, priority {item.priority}, from "
                    f"{item.topic}; pihub-{self.name} on {self.host}\n")
        parts = [f"{len(batch)} notifications, oldest first (pihub-{self.name} on "
                 f"{self.host}):\n"]
        for item in batch:
            head = PRIORITY_WORD.get(item.priority, "") + one_line(item.title or "")
            parts.append(f"[{when(item.ts)}] {head.strip() or '(no title)'} (priority "
                         f"{item.priority}, from {item.topic})\n{item.message}\n")
        return "\n".join(parts)

    # ------------------------------------------------------------------ SMTP

    def _connect(self) -> smtplib.SMTP:
        config = self.config
        port = config.port or PORTS[config.security]
        if config.security == "tls":
            return smtplib.SMTP_SSL(config.host, port, timeout=config.timeout,
                                    context=self._context)
        smtp = smtplib.SMTP(config.host, port, timeout=config.timeout)
        if config.security == "starttls":
            try:
                smtp.ehlo()
                smtp.starttls(context=self._context)
                smtp.ehlo()
            except BaseException:
                smtp.close()
                raise
        return smtp

    def deliver(self, batch: list[Request]) -> str:
        config = self.config
        server = f"{config.host}:{config.port or PORTS[config.security]}"
        msg = self.compose(batch)
        try:
            smtp = self._connect()
        except (smtplib.SMTPException, OSError) as exc:
            raise TryLater(f"SMTP {server} ({config.security}): {describe_error(exc)}") from None
        try:
            if config.username:
                smtp.login(config.username, self._password or "")
            refused = smtp.send_message(msg, from_addr=config.sender,
                                        to_addrs=config.recipients)
        except smtplib.SMTPAuthenticationError as exc:
            if exc.smtp_code < 500:
                raise TryLater(f"SMTP {server}: login: {describe_error(exc)}") from None
            raise Refused(f"SMTP {server}: login as {config.username} refused: "
                          f"{describe_error(exc)} (check username and password_file)") from None
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            text = "; ".join(f"{rcpt}: {code} {reply.decode(errors='replace')}"
                             for rcpt, (code, reply) in exc.recipients.items())
            if any(400 <= code < 500 for code in codes):
                raise TryLater(f"SMTP {server}: recipients refused for now: {text}") from None
            raise Refused(f"SMTP {server}: every recipient refused: {text}") from None
        except smtplib.SMTPResponseException as exc:
            if 500 <= exc.smtp_code < 600:
                raise Refused(f"SMTP {server}: {describe_error(exc)}") from None
            raise TryLater(f"SMTP {server}: {describe_error(exc)}") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise TryLater(f"SMTP {server}: {describe_error(exc)}") from None
        finally:
            with contextlib.suppress(smtplib.SMTPException, OSError):
                smtp.quit()  # the mail is accepted or not already; QUIT's reply changes nothing
            smtp.close()
        if refused:
            self.count("errors")
            self.log.error("SMTP %s refused recipient(s) of %s: %s", server, msg["Message-ID"],
                           "; ".join(f"{rcpt}: {code} {reply.decode(errors='replace')}"
                                     for rcpt, (code, reply) in refused.items()))
        took = len(config.recipients) - len(refused)
        return f"{server} accepted {msg['Message-ID']} for {took} recipient(s)"


def describe_error(exc: BaseException) -> str:
    """An SMTP reply as its code and text; any other error as its type and text."""
    if isinstance(exc, smtplib.SMTPResponseException):
        reply = exc.smtp_error
        text = reply.decode(errors="replace") if isinstance(reply, bytes) else str(reply)
        return f"{exc.smtp_code} {one_line(text)}"
    return f"{type(exc).__name__}: {one_line(str(exc)) or 'no detail'}"


main = EmailNotifier.main

if __name__ == "__main__":
    sys.exit(main())
