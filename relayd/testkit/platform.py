"""``relayd testkit platform``: the platform's side of the link, for integration testers.

Three parts, usable together or alone:

- :class:`ReturnServer`, an asyncssh SFTP server that plays the platform's return server:
  relayd delivers its acks and ``Retour`` packages there, into a ``received/`` folder;
- a pusher that generates sample (and broken) packages and pushes them to a relay with
  :func:`relayd.testkit.push.push_files`;
- :func:`check_received`, which reads every reply in ``received/`` with relayd's own reader
  and the XSDs, matches it to what was sent, and gives a :class:`Report`: packages sent,
  AVL, ANL and returns received, and anything missing, invalid or unexpected.

``relayd demo`` runs the return server beside the relay, so the whole loop runs on one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import random
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import structlog

from relayd import dossiers
from relayd.inbound.server import load_host_keys
from relayd.pec.envelope import Message, Party
from relayd.pec.package import inspect_package
from relayd.pec.replies import Reply, read_reply
from relayd.pec.zipcheck import PackageLimits
from relayd.rejections import Rejection
from relayd.testkit.broken import BROKEN_KINDS, build_broken
from relayd.testkit.samples import CENSUS, SampleSpec, build_package, package_filename, random_numero

log = structlog.get_logger("relayd.testkit.platform")

DEFAULT_USERNAME = "relayd"
#: beside ``received/``: one published name a line, in the order the server saw them
ARRIVALS_JOURNAL = "arrivals.log"


# --------------------------------------------------------------------------- the return server


class ReturnServer:
    """An SFTP server that receives what a relay sends back; every file lands in ``folder/received``."""

    def __init__(self, folder: Path, *, host: str = "127.0.0.1", port: int = 0, username: str = DEFAULT_USERNAME,
                 authorized_keys: Sequence[str] = (), password: str | None = None,
                 on_arrival: Callable[[Path], None] | None = None):
        self.folder = folder
        self.received = folder / "received"
        self.host = host
        self.requested_port = port
        self.username = username
        self.authorized_keys = list(authorized_keys)
        self._password = password
        self.on_arrival = on_arrival
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self.host_key = load_host_keys([folder / "host_key"])[0]

    @property
    def fingerprint(self) -> str:
        """The host key's SHA256 fingerprint, which a relay pins."""
        return self.host_key.get_fingerprint("sha256")

    @property
    def port(self) -> int:
        """The port actually bound."""
        assert self._acceptor is not None
        return self._acceptor.sockets[0].getsockname()[1]

    async def start(self) -> None:
        """Listen."""
        self.received.mkdir(parents=True, exist_ok=True)
        keys = asyncssh.import_authorized_keys("\n".join(self.authorized_keys)) if self.authorized_keys else None
        server = self

        class _Auth(asyncssh.SSHServer):
            def begin_auth(self, username: str) -> bool:
                return True

            def public_key_auth_supported(self) -> bool:
                return True

            def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
                return username == server.username and keys is not None and keys.validate(key, "", "127.0.0.1") is not None

            def password_auth_supported(self) -> bool:
                return server._password is not None

            def validate_password(self, username: str, password: str) -> bool:
                return username == server.username and hmac.compare_digest(password, server._password or "")

        def sftp_factory(chan: asyncssh.SSHServerChannel) -> asyncssh.SFTPServer:
            return _ReceivingSFTP(chan, server)

        self._acceptor = await asyncssh.listen(
            self.host, self.requested_port, server_host_keys=[self.host_key], server_factory=_Auth,
            sftp_factory=sftp_factory, allow_scp=False, reuse_address=True,
        )
        log.info("platform.listening", host=self.host, port=self.port, fingerprint=self.fingerprint)

    async def close(self) -> None:
        """Stop listening."""
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None

    def relay_settings(self, private_key: Path) -> dict[str, Any]:
        """The ``platform:`` section of a relay configuration that delivers here."""
        return {"host": self.host, "port": self.port, "username": self.username, "private_key": str(private_key),
                "host_key_fingerprints": [self.fingerprint], "remote_dir": "."}

    def arrived(self, path: Path) -> None:
        """A file was published under its final name: journal it and check it at once, as the platform would."""
        with open(self.folder / ARRIVALS_JOURNAL, "a", encoding="utf-8") as journal:
            journal.write(path.name + "\n")
        try:
            reply = read_reply(path.read_bytes())
        except Rejection as exc:
            log.error("platform.received_invalid", file=path.name, code=exc.reason.value, reason=exc.detail)
        else:
            body = reply.ack or reply.retour
            log.info("platform.received", file=path.name, kind=reply.kind, numero=getattr(body, "numero", None),
                     state=reply.retour.state if reply.retour else None, code=reply.ack.code if reply.ack else None)
        if self.on_arrival is not None:
            self.on_arrival(path)


class _ReceivingSFTP(asyncssh.SFTPServer):
    """The platform's folder, chrooted on ``received/``; reports each file published under its final name."""

    def __init__(self, chan: asyncssh.SSHServerChannel, server: ReturnServer):
        super().__init__(chan, chroot=os.fsencode(server.received))
        self._server = server

    def _published(self, newpath: bytes) -> None:
        if not newpath.endswith(b".part"):
            self._server.arrived(Path(os.fsdecode(self.map_path(newpath))))

    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        super().rename(oldpath, newpath)
        self._published(newpath)

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        super().posix_rename(oldpath, newpath)
        self._published(newpath)


# --------------------------------------------------------------------------- what was sent


@dataclass
class Sent:
    """One package pushed to the relay, and what the platform should get back for it."""

    file: str
    numero: str
    demarche: str
    insee: str
    message_id: str
    broken: str | None = None
    #: "AVL", "ANL" or None (a package too broken to address gets no ack)
    expected_ack: str | None = "AVL"
    expected_code: str | None = None
    #: the relay's answer to the push: accepted, refused or error
    pushed: str = ""
    push_message: str = ""
    #: the routing the platform used, which an ack must mirror
    sender: dict[str, Any] = field(default_factory=dict)
    recipient: dict[str, Any] = field(default_factory=dict)
    ack_to: dict[str, Any] | None = None
    #: what identifies the conversation, which every reply must keep
    flow_type: str | None = None
    conversation_id: str | None = None
    write_mode: str | None = None


def generate(folder: Path, *, count: int, demarches: Sequence[str], insees: Sequence[str], seed: int,
             broken: Sequence[str] = ()) -> list[tuple[Path, Sent]]:
    """Write ``count`` sample packages (cycling démarches and INSEE codes), then one package per broken kind."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    out = []
    plan = [(demarches[i % len(demarches)], insees[i % len(insees)], None) for i in range(count)]
    plan += [(demarches[0], insees[0], kind) for kind in broken]
    for i, (demarche, insee, kind) in enumerate(plan):
        # Every other valid package comes in the DIA flow's envelope, with plain-file attachments,
        # so that replies are checked against both real shapes.
        other = kind is None and i % 2 == 1
        spec = SampleSpec(numero=random_numero(rng), demarche=demarche, insee=insee,
                          envelope="dia" if other else "daua", layout="plain" if other else "nested")
        data = build_broken(kind, spec) if kind else build_package(spec, seed=seed + i)
        path = folder / (f"{kind}.{package_filename(spec)}" if kind else package_filename(spec))
        path.write_bytes(data)
        out.append((path, _expectation(path, spec, kind)))
    return out


def _expectation(path: Path, spec: SampleSpec, kind: str | None) -> Sent:
    """What a relay should answer, judged with relayd's own reader (the same one the relay runs)."""
    sent = Sent(file=path.name, numero=spec.numero, demarche=spec.demarche, insee=spec.insee,
                message_id=spec.effective_message_id, broken=kind)
    message: Message | None = None
    try:
        message = inspect_package(path, PackageLimits()).message
    except Rejection as rejection:
        message = rejection.envelope if isinstance(rejection.envelope, Message) else None
    if kind is not None:
        sent.expected_code = BROKEN_KINDS[kind].reason.value
        sent.expected_ack = "ANL" if message is not None else None
    if message is not None:
        routing = message.header.routing
        sent.sender = _party(routing.sender)
        sent.recipient = _party(routing.recipients.recipients[0]) if routing.recipients else {}
        sent.ack_to = _party(routing.ack_to) if routing.ack_to else None
        sent.flow_type, sent.conversation_id, sent.write_mode = routing.flow_type, routing.conversation_id, routing.write_mode
        wanted = {t.upper() for t in routing.ack_types}
        if not routing.ack_required or (wanted and sent.expected_ack not in wanted):
            sent.expected_ack = None
    return sent


def _party(party: Party | None) -> dict[str, Any]:
    return party.model_dump() if party is not None else {}


# --------------------------------------------------------------------------- the report


@dataclass
class Report:
    """What came back, against what should have."""

    sent: int = 0
    accepted: int = 0
    refused: int = 0
    avl: int = 0
    anl: int = 0
    retours: dict[str, int] = field(default_factory=dict)
    expected_avl: int = 0
    expected_anl: int = 0
    expected_retours: int = 0
    missing: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Everything expected arrived, and nothing invalid or unexpected did."""
        return not (self.missing or self.invalid or self.unexpected)

    def as_dict(self) -> dict[str, Any]:
        """The report for ``--json``."""
        return {**asdict(self), "ok": self.ok}

    def render(self) -> str:
        """The report for people."""
        lines = [
            f"packages sent   {self.sent} (accepted by the relay: {self.accepted}, refused: {self.refused})",
            f"AVL received    {self.avl} (expected {self.expected_avl})",
            f"ANL received    {self.anl} (expected {self.expected_anl})",
            f"Retour received {sum(self.retours.values())} "
            f"({', '.join(f'{k}: {v}' for k, v in sorted(self.retours.items())) or 'none'}; expected {self.expected_retours})",
            f"invalid         {len(self.invalid)}",
            f"unexpected      {len(self.unexpected)}",
            f"missing         {len(self.missing)}",
        ]
        for title, items in (("invalid", self.invalid), ("unexpected", self.unexpected), ("missing", self.missing)):
            lines += [f"  {title}: {item}" for item in items]
        lines.append("OK" if self.ok else "NOT OK")
        return "\n".join(lines)


def check_received(received: Path, sent: Sequence[Sent], *, since: float | None = None,
                   expect_retours: dict[str, list[str]] | None = None) -> Report:
    """Read every reply in ``received`` (those modified at or after ``since``) and judge them against ``sent``.

    ``expect_retours`` maps a dossier number to the states whose ``Retour`` should have arrived,
    in order. A reply about a dossier or message this run did not send is unexpected, unless
    nothing was sent (a report on whatever is there).
    """
    expect_retours = expect_retours or {}
    report = Report(sent=len(sent), accepted=sum(s.pushed == "accepted" for s in sent),
                    refused=sum(s.pushed == "refused" for s in sent))
    by_message = {s.message_id: s for s in sent}
    by_numero = {s.numero: s for s in sent if s.pushed == "accepted"}
    for s in sent:
        if s.broken is None and s.pushed != "accepted":
            report.unexpected.append(f"{s.file}: a valid package was {s.pushed or 'not pushed'} ({s.push_message})")
        if s.broken is not None and s.pushed == "accepted":
            report.unexpected.append(f"{s.file}: broken kind {s.broken} was accepted")
        if s.broken is not None and s.pushed == "refused" and s.expected_code and s.expected_code not in s.push_message:
            report.unexpected.append(f"{s.file}: refused with {s.push_message!r}, expected code {s.expected_code}")
    acks: dict[str, list[str]] = defaultdict(list)
    states: dict[str, list[str]] = defaultdict(list)
    for path in _replies(received, since):
        try:
            reply = read_reply(path.read_bytes())
        except Rejection as exc:
            report.invalid.append(f"{path.name}: {exc.reason.value}: {exc.detail}")
            continue
        except OSError as exc:
            report.invalid.append(f"{path.name}: unreadable ({exc.strerror})")
            continue
        if reply.ack is not None:
            _judge_ack(path.name, reply, by_message, acks, report, anything_sent=bool(sent))
        elif reply.retour is not None:
            numero = reply.retour.numero
            if sent and numero not in by_numero:
                report.unexpected.append(f"{path.name}: a Retour for {numero}, which this run did not send")
                continue
            if numero in by_numero:
                _judge_conversation(path.name, reply, by_numero[numero], report)
            states[numero].append(reply.retour.state)
            report.retours[reply.retour.state] = report.retours.get(reply.retour.state, 0) + 1
    for s in sent:
        if s.expected_ack and s.pushed in ("accepted", "refused"):
            setattr(report, f"expected_{s.expected_ack.lower()}", getattr(report, f"expected_{s.expected_ack.lower()}") + 1)
            if s.expected_ack not in acks.get(s.message_id, []):
                report.missing.append(f"{s.expected_ack} for {s.numero} ({s.file})")
    for numero, wanted in expect_retours.items():
        report.expected_retours += len(wanted)
        got = states.get(numero, [])
        if got[: len(wanted)] != wanted:
            report.missing.append(f"Retour {' then '.join(wanted)} for {numero} (got {', '.join(got) or 'nothing'})")
    for numero, got in states.items():
        if got != sorted(got, key=dossiers.RETURN_STATES.index) or len(set(got)) != len(got):
            report.unexpected.append(f"Retours for {numero} arrived as {', '.join(got)}: out of order or repeated")
    return report


def _judge_ack(name: str, reply: Reply, by_message: dict[str, Sent], acks: dict[str, list[str]], report: Report,
               *, anything_sent: bool) -> None:
    ack = reply.ack
    assert ack is not None
    if ack.kind == "AVL":
        report.avl += 1
    else:
        report.anl += 1
    sent = by_message.get(ack.message_id_origine)
    if sent is None:
        if anything_sent:
            report.unexpected.append(f"{name}: an {ack.kind} for message {ack.message_id_origine!r}, which this run did not send")
        return
    acks[sent.message_id].append(ack.kind)
    if sent.expected_ack != ack.kind:
        report.unexpected.append(f"{name}: an {ack.kind} for {sent.file}, expected {sent.expected_ack or 'no ack'}")
    if ack.kind == "ANL" and sent.expected_code and ack.code != sent.expected_code:
        report.unexpected.append(f"{name}: ANL code {ack.code}, expected {sent.expected_code}")
    if acks[sent.message_id].count(ack.kind) > 1:
        report.unexpected.append(f"{name}: a second {ack.kind} for {sent.file}")
    # The ack answers the platform: it speaks as the original recipient, to the AckTo address.
    to = [_party(p) for p in reply.routing.recipients.recipients] if reply.routing.recipients else []
    if sent.recipient and _party(reply.routing.sender) != sent.recipient:
        report.invalid.append(f"{name}: its Sender is not the original Recipient")
    if to != [sent.ack_to or sent.sender]:
        report.invalid.append(f"{name}: its Recipient is not the original AckTo")
    _judge_conversation(name, reply, sent, report)


def _judge_conversation(name: str, reply: Reply, sent: Sent, report: Report) -> None:
    """A reply keeps what the platform matches it by: FlowType, ConversationId, WriteMode (as the real replier)."""
    routing = reply.routing
    for label, theirs, ours in (("FlowType", sent.flow_type, routing.flow_type),
                                ("ConversationId", sent.conversation_id, routing.conversation_id),
                                ("WriteMode", sent.write_mode, routing.write_mode)):
        if (theirs or "").strip() != (ours or "").strip():
            what = "dropped" if theirs and not ours else f"changed to {(ours or '')[:60]!r}"
            report.invalid.append(f"{name}: it {what} the {label} {(theirs or '')[:60]!r} of {sent.file}")


def _replies(received: Path, since: float | None) -> list[Path]:
    """The replies in ``received``, in the order they were published.

    That order comes from the return server's arrivals journal where there is one: file times
    are too coarse for it (two files a few milliseconds apart can share one).
    """
    if not received.is_dir():
        return []
    out = []
    for path in received.iterdir():
        if path.name.endswith(".part") or not path.is_file():
            continue
        if since is not None and path.stat().st_mtime < since:
            continue
        out.append(path)
    journal = received.parent / ARRIVALS_JOURNAL
    order = {name: i for i, name in enumerate(journal.read_text().split())} if journal.exists() else {}
    return sorted(out, key=lambda p: (order.get(p.name, len(order)), p.stat().st_mtime_ns, p.name))


def wait_for_report(received: Path, sent: Sequence[Sent], *, since: float | None, timeout: float,
                    expect_retours: dict[str, list[str]] | None = None) -> Report:
    """Check again every half second until nothing is missing or ``timeout`` passes; return the last report."""
    deadline = time.monotonic() + timeout
    while True:
        report = check_received(received, sent, since=since, expect_retours=expect_retours)
        if not report.missing or time.monotonic() >= deadline:
            return report
        time.sleep(0.5)


# --------------------------------------------------------------------------- the command


def register(testkit: argparse._SubParsersAction) -> None:
    """Add ``relayd testkit platform``."""
    p = testkit.add_parser(
        "platform", help="play the platform: push packages to a relay, receive its acks and returns, report",
        description="Play the platform against a relay. With --demo DIR, everything comes from DIR/demo.json. "
                    "Exit status: 0 when every expected ack and return arrived and none was invalid or unexpected, "
                    "1 otherwise, 2 on a usage or connection error.",
    )
    p.add_argument("--demo", type=Path, help="a `relayd demo` folder: relay, account and received folder from its demo.json")
    p.add_argument("--relay", help="HOST:PORT of the relay's SFTP server")
    p.add_argument("--user", help="the relay account to push with")
    p.add_argument("--key", type=Path, help="that account's private key")
    p.add_argument("--password-file", type=Path, help="or a file holding its password")
    p.add_argument("--received", type=Path, help="where the relay's replies land (default: DIR/received with --listen)")
    p.add_argument("--listen", help="HOST:PORT: run a return server here too (see --dir, --authorized-key)")
    p.add_argument("--dir", type=Path, default=Path("platform"), help="the return server's folder (host key, received/)")
    p.add_argument("--authorized-key", type=Path, action="append", default=[], help="a relay's public key for the return server")
    p.add_argument("--accept-password-file", type=Path,
                   help="the return server also accepts the password in this file (for a relay configured with password_file)")
    p.add_argument("--serve", action="store_true", help="only run the return server, until interrupted")
    p.add_argument("--count", type=int, default=10, help="valid packages to push (0: only report on what is there)")
    p.add_argument("--demarche", default=f"{CENSUS},DAUA",
                   help="démarche codes, exactly as the platform spells them, comma-separated, taken in turn")
    p.add_argument("--insee", help="INSEE codes, comma-separated, taken in turn (default: the demo's communes)")
    p.add_argument("--broken", action="append", default=[], help="also push this broken kind (repeatable; 'all' for every kind)")
    p.add_argument("--seed", type=int, default=None, help="make the packages reproducible")
    p.add_argument("--expect-retour", action="append", default=[], choices=dossiers.RETURN_STATES,
                   help="expect this Retour for every accepted dossier (repeat for recu then clos)")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for everything expected")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Run ``relayd testkit platform``."""
    if args.serve:
        return asyncio.run(_serve(args))
    try:
        target = _target(args)
    except ValueError as exc:
        print(f"relayd testkit platform: {exc}", file=sys.stderr)
        return 2
    server: ReturnServer | None = None
    loop_thread = None
    if args.listen:
        server, loop_thread = _serve_in_background(args)
        target["received"] = server.received
    started = time.time() - 1  # file times have a coarse grain on some file systems
    broken = sorted(BROKEN_KINDS) if "all" in args.broken else args.broken
    broken = _feasible(broken, target.get("max_package_bytes"), explicit="all" not in args.broken)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    work = Path(target["work"])
    plan = generate(work / f"sent-{int(started)}-{seed}", count=args.count, demarches=args.demarche.split(","),
                    insees=target["insees"], seed=seed, broken=broken)
    try:
        if plan:
            from relayd.testkit.push import PushError, push_files

            try:
                results = push_files([p for p, _ in plan], host=target["host"], port=target["port"], username=target["user"],
                                     key_path=target["key"], password=target["password"], style="rename",
                                     concurrency=2, insecure_host_key=True)
            except PushError as exc:
                print(f"relayd testkit platform: {exc}", file=sys.stderr)
                return 2
            for (_, expectation), result in zip(plan, results, strict=True):
                expectation.pushed, expectation.push_message = result.status, result.message or ""
        sent = [s for _, s in plan]
        if sent and all(s.pushed == "error" for s in sent):
            print(f"relayd testkit platform: could not push to {target['host']}:{target['port']}: {sent[0].push_message}",
                  file=sys.stderr)
            return 2
        expect = {s.numero: list(args.expect_retour) for s in sent if s.pushed == "accepted" and args.expect_retour}
        for s in sent:
            if s.pushed == "accepted" and s.insee in target["auto_receipt"] and s.numero not in expect:
                expect[s.numero] = [dossiers.RECU]
        report = wait_for_report(Path(target["received"]), sent, since=started if plan else None,
                                 timeout=args.wait if plan else 0, expect_retours=expect)
    finally:
        if server is not None and loop_thread is not None:
            loop_thread.stop()
    print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False) if args.json else report.render())
    return 0 if report.ok else 1


def _feasible(broken: list[str], max_package_bytes: int | None, *, explicit: bool) -> list[str]:
    """Say (and, for ``all``, leave out) ``oversized`` when the relay's size limit accepts it anyway."""
    from relayd.testkit.broken import OVERSIZED_BYTES

    if "oversized" not in broken or max_package_bytes is None or max_package_bytes < OVERSIZED_BYTES:
        return broken
    print(f"relayd testkit platform: the relay accepts packages up to {max_package_bytes} bytes, so 'oversized' "
          f"({OVERSIZED_BYTES} bytes) is not refused; set limits.max_package_bytes below that to test it"
          f"{'' if explicit else ' (left out of --broken all)'}", file=sys.stderr)
    return broken if explicit else [b for b in broken if b != "oversized"]


def _target(args: argparse.Namespace) -> dict[str, Any]:
    """Where to push and where replies land, from --demo and the flags (flags win)."""
    target: dict[str, Any] = {"host": None, "port": None, "user": None, "key": None, "password": None,
                              "received": None, "insees": [], "auto_receipt": set(), "work": args.dir}
    if args.demo is not None:
        info = json.loads((args.demo / "demo.json").read_text())
        sftp = info["sftp"]
        target.update(host=sftp["host"], port=sftp["port"], user=sftp["username"], key=Path(sftp["private_key"]),
                      received=info.get("platform", {}).get("received"), insees=list(info["communes"]),
                      work=args.demo / "platform")
        target["auto_receipt"] = {code for code, c in info["communes"].items() if c.get("auto_receipt")}
        target["max_package_bytes"] = info.get("limits", {}).get("max_package_bytes")
    if args.relay:
        host, _, port = args.relay.rpartition(":")
        target.update(host=host or "127.0.0.1", port=int(port))
    if args.user:
        target["user"] = args.user
    if args.key:
        target.update(key=args.key, password=None)
    if args.password_file:
        target.update(password=args.password_file.read_text().strip(), key=None)
    if args.received:
        target["received"] = args.received
    if args.insee:
        target["insees"] = args.insee.split(",")
    missing = [k for k in ("host", "port", "user") if not target[k]]
    if args.count or args.broken:
        if missing:
            raise ValueError(f"say where to push: --demo DIR, or --relay HOST:PORT --user NAME (missing {', '.join(missing)})")
        if not target["insees"]:
            raise ValueError("give --insee CODES")
    if target["received"] is None and not args.listen:
        raise ValueError("say where replies land: --demo DIR, --received DIR, or --listen HOST:PORT to run a return server")
    return target


class _LoopThread:
    """An event loop in a thread, so the pusher (blocking) and the return server run side by side."""

    def __init__(self) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def _return_server(args: argparse.Namespace) -> ReturnServer:
    host, _, port = (args.listen or "127.0.0.1:0").rpartition(":")
    keys = [k.read_text().strip() for k in args.authorized_key]
    password = args.accept_password_file.read_text().strip() if args.accept_password_file else None
    return ReturnServer(args.dir, host=host or "127.0.0.1", port=int(port), authorized_keys=keys, password=password)


def _serve_in_background(args: argparse.Namespace) -> tuple[ReturnServer, _LoopThread]:
    thread = _LoopThread()
    server = _return_server(args)
    thread.call(server.start())
    print(f"return server on {server.host}:{server.port}, host key {server.fingerprint}", file=sys.stderr)
    return server, thread


async def _serve(args: argparse.Namespace) -> int:
    """Run the return server until SIGINT or SIGTERM.

    The handlers are our own: a background job starts with SIGINT ignored, and Python then
    raises no KeyboardInterrupt, so relying on it would leave the server deaf to Ctrl-C and kill.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = _return_server(args)
    await server.start()
    print(f"return server on {server.host}:{server.port}, user {server.username}, host key {server.fingerprint}\n"
          f"replies land in {server.received}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print("return server stopped", file=sys.stderr, flush=True)
    return 0


__all__ = ["ReturnServer", "Sent", "Report", "generate", "check_received", "wait_for_report", "register", "run"]
