"""pihub-notify-email against a real Mosquitto and a real SMTP server (aiosmtpd) on 127.0.0.1:
STARTTLS and implicit TLS with a certificate made here, AUTH PLAIN and LOGIN, plain SMTP."""

from __future__ import annotations

import datetime
import email
import email.policy
import functools
import ipaddress
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from conftest import DaemonProcess, free_port, run_cli, wait_until
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from notify_helpers import counters_reach as _counters_reach
from notify_helpers import request

MODULE = "notify_email"
# waits for notify-email's heartbeat counters
counters_reach = functools.partial(_counters_reach, daemon="notify-email")
SENDER = "pihub@hub.example.org"
RECIPIENTS = ["me@example.org", "partner@example.org"]
USER, PASSWORD = "pihub", "correct horse battery staple"


# --------------------------------------------------------------------------- certificates


@dataclass
class Certs:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_certs(directory: Path) -> Certs:
    """A CA and a server certificate for 127.0.0.1 and localhost, signed by it."""
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("pihub test CA")).issuer_name(
        name("pihub test CA")).public_key(ca_key.public_key()).serial_number(
        x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(
        ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256()))
    certs = Certs(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    certs.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                 serialization.PrivateFormat.PKCS8,
                                                 serialization.NoEncryption()))
    return certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


# --------------------------------------------------------------------------- SMTP server


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    tls: bool
    login: str | None
    mechanism: str | None
    at: float

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.raw, policy=email.policy.default)  # type: ignore[return-value]

    @property
    def text(self) -> str:
        body = self.message.get_body(("plain",))
        assert body is not None
        return str(body.get_content()).replace("\r\n", "\n")


@dataclass
class SmtpServer:
    """aiosmtpd on a fixed loopback port; stopped and started again on that port."""

    certs: Certs
    port: int = field(default_factory=free_port)
    mode: str = "starttls"  # starttls | tls | none
    auth: bool = True
    exclude_mechanisms: list[str] = field(default_factory=list)
    mails: list[Mail] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)  # scripted answers to DATA
    logins: list[tuple[str, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    controller: Controller | None = None

    def _context(self) -> Any:
        import ssl
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.certs.cert_file, self.certs.key_file)
        return ctx

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        ok = auth_data.login.decode() == USER and auth_data.password.decode() == PASSWORD
        with self.lock:
            self.logins.append((mechanism, ok))
        if not ok:
            return AuthResult(success=False, handled=False)  # 535 5.7.8
        return AuthResult(success=True, auth_data=(auth_data.login.decode(), mechanism))

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            if self.replies:
                return self.replies.pop(0)
            login, mechanism = session.auth_data or (None, None)
            self.mails.append(Mail(str(envelope.mail_from), list(envelope.rcpt_tos),
                                   bytes(envelope.original_content or b""),
                                   server.transport.get_extra_info("ssl_object") is not None,
                                   login, mechanism, time.time()))
        return "250 2.0.0 OK: queued"

    def start(self) -> None:
        kwargs: dict[str, Any] = {}
        if self.mode == "starttls":
            kwargs.update(tls_context=self._context(), require_starttls=True)
        elif self.mode == "tls":
            kwargs.update(ssl_context=self._context())
        if self.auth:
            kwargs.update(authenticator=self._authenticate, auth_required=True,
                          auth_require_tls=self.mode == "starttls",  # tls: TLS already
                          auth_exclude_mechanism=self.exclude_mechanisms)
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port,
                                     server_hostname="smtp.test", **kwargs)
        self.controller.start()

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    def received(self) -> list[Mail]:
        with self.lock:
            return list(self.mails)


@pytest.fixture
def smtp(certs: Certs) -> Iterator[SmtpServer]:
    server = SmtpServer(certs)
    yield server
    server.stop()


@pytest.fixture
def email_config(tmp_path: Path, smtp: SmtpServer, certs: Certs) -> dict[str, Any]:
    password = tmp_path / "smtp-password"
    password.write_text(PASSWORD + "\n")
    return {"host": "127.0.0.1", "port": smtp.port, "security": "starttls",
            "ca_file": str(certs.ca_file), "username": USER, "password_file": str(password),
            "sender": SENDER, "recipients": RECIPIENTS, "queue_dir": str(tmp_path / "queue"),
            "backoff_min": 0.2, "backoff_max": 1.0, "send_interval": 0.1, "timeout": 5.0}


@pytest.fixture
def start_notifier(start_daemon: Callable[..., DaemonProcess], email_config: dict[str, Any]
                   ) -> Callable[..., DaemonProcess]:
    def start(**overrides: Any) -> DaemonProcess:
        d = start_daemon(MODULE, {**email_config, **overrides})
        d.wait_log("ready: connected and subscribed", timeout=20)
        return d

    return start




def queued(tmp_path: Path) -> int:
    return len(list((tmp_path / "queue").glob("*.json")))


# --------------------------------------------------------------------------- the mail


def test_request_is_mailed_over_starttls_after_auth_plain(start_notifier, observe, topic_root,
                                                          smtp):
    smtp.start()
    obs = observe(f"{topic_root}/notify-email/#")
    d = start_notifier()
    obs.publish(f"{topic_root}/notify/monitor",
                request("pihub-store-rrd on pi4 is down since 10:42:07 — Küche", priority=1,
                        title="store-rrd DOWN on pi4", daemon="store-rrd"))
    wait_until(smtp.received, 20, "a mail accepted by the SMTP server")
    (mail,) = smtp.received()
    assert (mail.mail_from, mail.rcpt_tos, mail.tls, mail.login, mail.mechanism) == (
        SENDER, RECIPIENTS, True, USER, "PLAIN")
    msg = mail.message
    assert msg["Subject"] == "[pihub] Important: store-rrd DOWN on pi4"
    assert msg["From"] == SENDER and msg["To"] == ", ".join(RECIPIENTS)
    assert abs(parsedate_to_datetime(msg["Date"]).timestamp() - time.time()) < 300
    assert msg["Message-ID"].startswith("<") and msg["Message-ID"].endswith(
        ".notify-email@hub.example.org>")
    assert (msg["X-Priority"], msg["Importance"], msg["Auto-Submitted"]) == (
        "2 (High)", "high", "auto-generated")
    assert msg["Content-Transfer-Encoding"] == "quoted-printable"  # 7-bit, for any relay
    assert mail.raw.isascii()
    assert mail.text.startswith("pihub-store-rrd on pi4 is down since 10:42:07 — Küche\n")
    assert f"from {topic_root}/notify/monitor" in mail.text
    counters = counters_reach(obs, topic_root, sent=1)
    assert counters["errors"] == 0 and counters.get("retries", 0) == 0
    assert "sent #1 'store-rrd DOWN on pi4'" in d.output()
    assert d.stop() == 0


def test_auth_login_when_the_server_offers_only_login(start_notifier, observe, topic_root,
                                                      smtp):
    smtp.exclude_mechanisms = ["PLAIN"]
    smtp.start()
    obs = observe()
    start_notifier()
    obs.publish(f"{topic_root}/notify/monitor", request("via AUTH LOGIN"))
    wait_until(smtp.received, 20, "a mail accepted")
    assert smtp.received()[0].mechanism == "LOGIN"


def test_implicit_tls_on_its_own_port(start_notifier, observe, topic_root, smtp):
    smtp.mode = "tls"
    smtp.start()
    obs = observe()
    start_notifier(security="tls")
    obs.publish(f"{topic_root}/notify/monitor", request("over SMTPS", priority=2))
    wait_until(smtp.received, 20, "a mail accepted")
    (mail,) = smtp.received()
    assert mail.tls and mail.login == USER
    assert mail.message["Subject"] == "[pihub] EMERGENCY: pihub"
    assert mail.message["X-Priority"] == "1 (Highest)"


def test_plain_smtp_to_a_relay_on_loopback_without_login(start_notifier, observe, topic_root,
                                                         smtp):
    smtp.mode, smtp.auth = "none", False
    smtp.start()
    obs = observe()
    start_notifier(security="none", username=None, password_file=None,
                   subject_prefix="hub: ")
    obs.publish(f"{topic_root}/notify/rules", {"message": "door open\nsince 5 min",
                                               "priority": -1})
    wait_until(smtp.received, 20, "a mail accepted")
    (mail,) = smtp.received()
    assert not mail.tls and mail.login is None
    assert mail.message["Subject"] == "hub: door open since 5 min"
    assert (mail.message["X-Priority"], mail.message["Importance"]) == ("4 (Low)", "low")


def test_line_breaks_in_a_title_cannot_add_headers_or_recipients(start_notifier, observe,
                                                                 topic_root, smtp):
    smtp.start()
    obs = observe()
    start_notifier()
    obs.publish(f"{topic_root}/notify/monitor",
                request("m", title="down\r\nBcc: thief@evil.example\r\n\r\nbody"))
    wait_until(smtp.received, 20, "a mail accepted")
    (mail,) = smtp.received()
    assert mail.rcpt_tos == RECIPIENTS
    msg = mail.message
    assert msg["Bcc"] is None and "thief" not in str(msg["To"])
    assert msg["Subject"] == "[pihub] down Bcc: thief@evil.example body"
    assert mail.text.startswith("m\n")


# --------------------------------------------------------------------------- failures


def test_wrong_password_is_refused_and_the_request_dropped(start_notifier, observe,
                                                           topic_root, smtp, tmp_path):
    smtp.start()
    obs = observe(f"{topic_root}/notify-email/#")
    wrong = tmp_path / "wrong"
    wrong.write_text("hunter2\n")
    d = start_notifier(password_file=str(wrong))
    obs.publish(f"{topic_root}/notify/monitor", request("never mailed"))
    d.wait_log("login as pihub refused: 535", timeout=20)
    counters_reach(obs, topic_root, failed=1, errors=1)
    # one try (smtplib offers each mechanism the server has), not retried
    assert smtp.received() == [] and smtp.logins == [("PLAIN", False), ("LOGIN", False)]
    wait_until(lambda: queued(tmp_path) == 0, 10, "the refused request dropped")


def test_temporary_reply_is_retried_and_permanent_reply_drops(start_notifier, observe,
                                                              topic_root, smtp):
    smtp.replies = ["451 4.3.0 Temporary lookup failure", "554 5.7.1 Message rejected as spam"]
    smtp.start()
    obs = observe(f"{topic_root}/notify-email/#")
    d = start_notifier()
    obs.publish(f"{topic_root}/notify/monitor", request("first: 451 then 554"))
    obs.publish(f"{topic_root}/notify/monitor", request("second: accepted"))
    wait_until(smtp.received, 20, "the second request mailed")
    assert [m.text.split("\n")[0] for m in smtp.received()] == ["second: accepted"]
    counters_reach(obs, topic_root, retries=1, failed=1, sent=1)
    out = d.output()
    assert "451 4.3.0 Temporary lookup failure" in out and "stays queued" in out
    assert "554 5.7.1 Message rejected as spam; dropped" in out


def test_untrusted_certificate_is_retried_not_sent_in_clear(start_notifier, observe,
                                                            topic_root, smtp, tmp_path):
    smtp.start()
    (tmp_path / "other").mkdir()
    other = make_certs(tmp_path / "other")  # a CA that did not sign the server's certificate
    obs = observe(f"{topic_root}/notify-email/#")
    d = start_notifier(ca_file=str(other.ca_file))
    obs.publish(f"{topic_root}/notify/monitor", request("kept"))
    d.wait_log("CERTIFICATE_VERIFY_FAILED", timeout=20)
    obs.wait_for(f"{topic_root}/notify-email/meta",
                 lambda m: m.json()["counters"].get("retries", 0) >= 2, timeout=20)
    assert smtp.received() == [] and queued(tmp_path) == 1


# --------------------------------------------------------------------------- digest


def test_requests_within_the_digest_window_go_out_as_one_mail(start_notifier, observe,
                                                              topic_root, smtp):
    smtp.start()
    obs = observe(f"{topic_root}/notify-email/#")
    start_notifier(digest_s=4)
    for i, prio in enumerate((0, 1, -1)):
        obs.publish(f"{topic_root}/notify/monitor", request(f"event {i}", title=f"t{i}",
                                                            priority=prio))
    wait_until(smtp.received, 30, "the digest mailed")
    counters_reach(obs, topic_root, sent=3)
    (mail,) = smtp.received()
    msg = mail.message
    assert msg["Subject"] == "[pihub] Important: 3 notifications: t0; t1; t2"
    assert msg["X-Priority"] == "2 (High)"
    text = mail.text
    assert text.startswith("3 notifications, oldest first")
    assert text.index("event 0") < text.index("event 1") < text.index("event 2")


def test_emergency_ends_the_digest_window_at_once(start_notifier, observe, topic_root, smtp):
    smtp.start()
    obs = observe()
    start_notifier(digest_s=3600)
    obs.publish(f"{topic_root}/notify/monitor", request("waits for the window", title="a"))
    obs.publish(f"{topic_root}/notify/monitor", request("water on the floor", title="b",
                                                        priority=2))
    wait_until(smtp.received, 20, "the digest mailed before its window ends")
    (mail,) = smtp.received()
    assert mail.message["Subject"] == "[pihub] EMERGENCY: 2 notifications: a; b"


# --------------------------------------------------------------------------- exactly once


def test_killed_with_requests_queued_and_the_server_down_each_is_mailed_once(
        start_notifier, observe, topic_root, smtp, tmp_path):
    obs = observe()
    d = start_notifier()  # the SMTP server is not started: connection refused
    for i in range(3):
        obs.publish(f"{topic_root}/notify/monitor", request(f"queued {i}", title=f"q{i}"))
    wait_until(lambda: queued(tmp_path) == 3, 20, "three requests in the on-disk queue")
    d.wait_log("Connection refused", timeout=20)
    d.kill()  # SIGKILL: no shutdown
    smtp.start()
    d2 = start_notifier()
    wait_until(lambda: len(smtp.received()) == 3, 20, "the three queued requests mailed")
    wait_until(lambda: queued(tmp_path) == 0, 10, "an empty queue")
    obs.publish(f"{topic_root}/notify/monitor", request("after the restart", title="new"))
    wait_until(lambda: len(smtp.received()) == 4, 20, "the next request mailed")
    mails = smtp.received()
    assert [m.message["Subject"] for m in mails] == [
        "[pihub] q0", "[pihub] q1", "[pihub] q2", "[pihub] new"]
    assert len({m.message["Message-ID"] for m in mails}) == 4
    assert "3 request(s) left from the last run" in d2.output()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("config", "key"), [
    ({"security": "none", "host": "smtp.example.org"}, "security"),
    ({"sender": "not an address"}, "sender"),
    ({"recipients": ["a@example.org\nBcc: b@example.org"]}, "recipients[0]"),
    ({"recipients": []}, "recipients"),
    ({"username": "u"}, "password_file"),
    ({"security": "ssl"}, "security"),
    ({"topics": ["#", "+"]}, "topics"),
])
def test_check_config_names_the_wrong_key(tmp_path, config, key):
    path = tmp_path / "bad.yml"
    path.write_text(json.dumps({"host": "smtp.example.org", "sender": SENDER,
                                "recipients": RECIPIENTS, **config}))
    checked = run_cli(MODULE, "--check-config", str(path))
    assert checked.returncode == 78, checked.stderr
    assert f": {key}: " in checked.stderr


def test_missing_password_file_stops_the_daemon_with_ex_config(start_daemon, email_config,
                                                               tmp_path):
    d = start_daemon(MODULE, {**email_config, "password_file": str(tmp_path / "nope")})
    wait_until(lambda: d.proc.poll() is not None, 20, "the daemon to exit")
    assert d.proc.returncode == 78
    assert "password_file: cannot read" in d.output()


def test_publishes_nothing_outside_its_subtree(tmp_path):
    path = tmp_path / "c.yml"
    path.write_text(json.dumps({"host": "smtp.example.org", "sender": SENDER,
                                "recipients": RECIPIENTS}))
    acl = run_cli(MODULE, "--print-acl", str(path))
    assert json.loads(acl.stdout) == {"topic_root": "pihub", "write": []}
