#!/usr/bin/env python3
"""A stand-in SMTP server, for the Molecule stand-in (pihub-notify-email's outside world).

Listens on 127.0.0.1 (plain SMTP, as a local relay: notify-email's ``security: none``), offers
``AUTH PLAIN LOGIN`` and ``8BITMIME``, and with ``--user``/``--password`` refuses a wrong login
(``535 5.7.8``) and a mail before one (``530 5.7.0``). Every mail taken (``250`` to its DATA)
is appended as one JSON line to ``--out``: ``received``, ``login``, the envelope (``mail_from``,
``rcpt_to``), its headers (``Subject``, ``From``, ``To``, ``Message-ID``, ...) and its text body.

Stdlib only (asyncio, email), as Debian 12's python3 has it:
``python3 smtp_receiver.py --port 2525 --out /var/lib/x/mails.jsonl``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import email
import email.policy
import json
import os
import re
import sys
import time

MAX_LINE = 4096
MAX_MESSAGE = 1024 * 1024
HEADERS = ("Subject", "From", "To", "Date", "Message-ID", "X-Priority", "Importance",
           "Auto-Submitted", "Content-Type")
ADDRESS = re.compile(r"^(?:FROM|TO):\s*<([^>]*)>", re.IGNORECASE)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def unb64(text: str) -> str | None:
    try:
        return base64.b64decode(text, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


class Session:
    """One SMTP conversation (RFC 5321, the commands a submission client uses)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 args: argparse.Namespace) -> None:
        self.reader, self.writer, self.args = reader, writer, args
        self.login: str | None = None
        self.reset()

    def reset(self) -> None:
        self.mail_from: str | None = None
        self.rcpt_to: list[str] = []

    async def reply(self, line: str) -> None:
        self.writer.write(line.encode() + b"\r\n")
        await self.writer.drain()

    async def line(self) -> str | None:
        raw = await self.reader.readline()
        if not raw:
            return None
        return raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r\n")

    def check_login(self, user: str, password: str) -> bool:
        return (self.args.user is None
                or (user == self.args.user and password == self.args.password))

    async def auth(self, argument: str) -> None:
        mechanism, _, initial = argument.partition(" ")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            if not initial:
                await self.reply("334 ")
                initial = await self.line() or ""
            decoded = unb64(initial)
            parts = decoded.split("\0") if decoded is not None else []
            user, password = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
        elif mechanism == "LOGIN":
            if not initial:
                await self.reply("334 " + b64("Username:"))
                initial = await self.line() or ""
            await self.reply("334 " + b64("Password:"))
            user, password = unb64(initial) or "", unb64(await self.line() or "") or ""
        else:
            await self.reply("504 5.5.4 Unrecognized authentication type")
            return
        if self.check_login(user, password):
            self.login = user
            await self.reply("235 2.7.0 Authentication successful")
        else:
            await self.reply("535 5.7.8 Authentication credentials invalid")

    async def data(self) -> bytes | None:
        lines: list[bytes] = []
        size = 0
        while True:
            raw = await self.reader.readline()
            if not raw:
                return None
            if raw in (b".\r\n", b".\n"):
                return b"".join(lines)
            if raw.startswith(b"."):
                raw = raw[1:]  # dot-unstuffing
            size += len(raw)
            if size <= MAX_MESSAGE:
                lines.append(raw)

    def record(self, message: bytes) -> None:
        mail = email.message_from_bytes(message.replace(b"\r\n", b"\n"),
                                        policy=email.policy.default)
        part = mail.get_body(preferencelist=("plain",)) if mail.is_multipart() else mail
        body = part.get_content() if part is not None else ""
        entry = {"received": time.time(), "login": self.login, "mail_from": self.mail_from,
                 "rcpt_to": self.rcpt_to,
                 "headers": {name: str(mail[name]) for name in HEADERS if name in mail},
                 "body": body}
        with open(self.args.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    async def run(self) -> None:
        await self.reply("220 pihub-fixture ESMTP smtp-receiver")
        while (line := await self.line()) is not None:
            verb, _, argument = line.partition(" ")
            verb = verb.upper()
            if verb == "EHLO":
                self.reset()
                await self.reply("250-pihub-fixture\r\n250-8BITMIME\r\n250-SIZE "
                                 f"{MAX_MESSAGE}\r\n250 AUTH PLAIN LOGIN")
            elif verb == "HELO":
                self.reset()
                await self.reply("250 pihub-fixture")
            elif verb == "AUTH":
                await self.auth(argument)
            elif verb == "MAIL":
                match = ADDRESS.match(argument)
                if self.args.user is not None and self.login is None:
                    await self.reply("530 5.7.0 Authentication required")
                elif not match:
                    await self.reply("501 5.5.4 Syntax: MAIL FROM:<address>")
                else:
                    self.reset()
                    self.mail_from = match.group(1)
                    await self.reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                match = ADDRESS.match(argument)
                if self.mail_from is None:
                    await self.reply("503 5.5.1 Error: need MAIL command")
                elif not match:
                    await self.reply("501 5.5.4 Syntax: RCPT TO:<address>")
                else:
                    self.rcpt_to.append(match.group(1))
                    await self.reply("250 2.1.5 Ok")
            elif verb == "DATA":
                if not self.rcpt_to:
                    await self.reply("503 5.5.1 Error: need RCPT command")
                    continue
                await self.reply("354 End data with <CR><LF>.<CR><LF>")
                message = await self.data()
                if message is None:
                    return
                self.record(message)
                self.reset()
                await self.reply("250 2.0.0 Ok: queued")
            elif verb == "RSET":
                self.reset()
                await self.reply("250 2.0.0 Ok")
            elif verb == "NOOP":
                await self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                await self.reply("221 2.0.0 Bye")
                return
            else:
                await self.reply("502 5.5.2 Error: command not recognized")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--out", default=os.path.join(os.environ.get("STATE_DIRECTORY", "."),
                                                      "mails.jsonl"),
                        help="JSON-lines file of the mails received")
    parser.add_argument("--user", help="accept only this login (with --password)")
    parser.add_argument("--password", help="the login's password")
    args = parser.parse_args(argv)

    async def serve() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await Session(reader, writer, args).run()
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                print(f"connection lost: {exc}", file=sys.stderr, flush=True)
            finally:
                writer.close()

        server = await asyncio.start_server(handle, args.bind, args.port)
        print(f"smtp receiver on {args.bind}:{args.port}, recording to {args.out}", flush=True)
        async with server:
            await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
