#!/usr/bin/env python3
"""Attacks a running bank and platform node from a QUIC and TLS 1.3 stack
written elsewhere (aioquic, with its own TLS implementation, and
`cryptography` for certificates): nothing of the nodes' Rust stack (quinn,
rustls, webpki) is on the attacking side.

Run by tests/attack/run.sh, which makes a demo collaboration with
`cleanroom demo --dir` and passes its folder and the `cleanroom` binary.
The script starts both nodes from that folder as processes (fixed loopback
ports, the bank with a revocation list), then runs each check below and
prints one line per check. Exit status 1 if any check fails.

Positive controls first (so a refusal below is a refusal, not an
incompatibility): the analyst's real certificate completes the handshake and
gets answers to `Templates` and `Budget` requests from both nodes.
"""

import argparse
import asyncio
import datetime
import os
import random
import re
import socket
import ssl
import struct
import subprocess
import sys
import time

from aioquic.asyncio.client import connect
from aioquic.asyncio.server import serve
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, HandshakeCompleted, StreamDataReceived, StreamReset
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ALPN = "cleanroom/1"
VERSION = 1  # wire protocol version byte
ANALYST_REQUEST, ANALYST_RESPONSE, JOIN_OFFER, ABORT = 20, 21, 1, 9
TEMPLATES, BUDGET = 0, 1  # AnalystRequest variants (bincode: u32 little-endian)
RESPONSE_KINDS = {0: "Templates", 1: "Budget", 2: "Share", 3: "Refused", 4: "Cancelled"}


def frame(body: bytes) -> bytes:
    return struct.pack("<I", len(body)) + body


def request(variant: int) -> bytes:
    return frame(bytes([VERSION, ANALYST_REQUEST]) + struct.pack("<I", variant))


class Recorder(QuicConnectionProtocol):
    """Records what the node did on this connection."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.handshake_done = False
        self.early_data_accepted = None
        self.closed = None  # (error_code, frame_type, reason)
        self.node_closed = None  # `closed` before we closed it ourselves
        self.data = {}  # stream id -> bytes received
        self.ended = set()  # streams the node finished or reset
        self.tickets = 0

    def quic_event_received(self, event):
        if isinstance(event, HandshakeCompleted):
            self.handshake_done = True
            self.early_data_accepted = event.early_data_accepted
        elif isinstance(event, ConnectionTerminated):
            self.closed = (event.error_code, event.frame_type, event.reason_phrase)
        elif isinstance(event, StreamDataReceived):
            self.data[event.stream_id] = self.data.get(event.stream_id, b"") + event.data
            if event.end_stream:
                self.ended.add(event.stream_id)
        elif isinstance(event, StreamReset):
            self.ended.add(event.stream_id)
        if not isinstance(event, (StreamDataReceived, StreamReset)):
            # Streams are read here, not through asyncio stream objects.
            super().quic_event_received(event)

    def app_bytes(self):
        return sum(len(v) for v in self.data.values())


def config(cafile, server, cert=None, key=None, alpn=ALPN):
    c = QuicConfiguration(is_client=True, alpn_protocols=[alpn], server_name=server)
    c.load_verify_locations(cafile)
    if cert:
        c.load_cert_chain(cert, key)
    return c


async def session(port, cfg, sends, wait=3.0, tickets=None, early=False):
    """Connects, sends each byte string on its own new stream (finished),
    waits up to `wait` s for every stream to end or the connection to
    close. Returns the Recorder (or the exception if connecting failed).
    With `early`, sends before the handshake completes (as 0-RTT data when
    `cfg` carries a session ticket)."""
    proto = None
    try:
        async with connect(
            "127.0.0.1",
            port,
            configuration=cfg,
            create_protocol=Recorder,
            wait_connected=not early,
            session_ticket_handler=(lambda t: tickets.append(t)) if tickets is not None else None,
        ) as p:
            proto = p
            ids = []
            for payload in sends:
                sid = p._quic.get_next_available_stream_id()
                p._quic.send_stream_data(sid, payload, end_stream=True)
                ids.append(sid)
            p.transmit()
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and p.closed is None and not all(s in p.ended for s in ids):
                await asyncio.sleep(0.02)
            # A refusal after the handshake arrives a moment later.
            await asyncio.sleep(0.2)
            # Before our own close on leaving this block.
            p.node_closed = p.closed
            return p
    except Exception as e:  # handshake refused, or closed under us
        if proto is not None:
            proto.node_closed = proto.closed
            return proto
        return e


def response_kind(data: bytes):
    if len(data) < 10:
        return None
    (length,) = struct.unpack_from("<I", data)
    if length != len(data) - 4 or data[4] != VERSION or data[5] != ANALYST_RESPONSE:
        return None
    return RESPONSE_KINDS.get(struct.unpack_from("<I", data, 6)[0])


def cert_for(name, issuer_name, issuer_key, template, days_from, days_to, path):
    """A certificate for `name` with the extensions of `template` (an
    analyst certificate), its own new key, signed by `issuer_key`."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days_from))
        .not_valid_after(now + datetime.timedelta(days=days_to))
    )
    for ext in template.extensions:
        if ext.oid in (x509.oid.ExtensionOID.SUBJECT_KEY_IDENTIFIER, x509.oid.ExtensionOID.AUTHORITY_KEY_IDENTIFIER):
            continue
        b = b.add_extension(ext.value, ext.critical)
    cert = b.sign(issuer_key, hashes.SHA256())
    with open(path + ".pem", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(path + ".key", "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path + ".pem", path + ".key"


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def set_ports(dirname, bank_port, platform_port):
    def edit(name, fn):
        p = os.path.join(dirname, name)
        with open(p) as f:
            text = f.read()
        with open(p, "w") as f:
            f.write(fn(text))

    edit("bank.toml", lambda t: re.sub(r'listen = "[^"]*"', f'listen = "127.0.0.1:{bank_port}"', t, count=1))
    edit(
        "platform.toml",
        lambda t: re.sub(
            r'(\[peer\]\naddress = )"[^"]*"',
            rf'\1"127.0.0.1:{bank_port}"',
            re.sub(r'listen = "[^"]*"', f'listen = "127.0.0.1:{platform_port}"', t, count=1),
        ),
    )


class Checks:
    def __init__(self):
        self.failed = 0

    def report(self, name, ok, detail):
        self.failed += 0 if ok else 1
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)


def refused_before_data(r, expect):
    """The node refused as `expect` says, and no application byte reached
    us. `expect`: a set of outcomes among "alert:<n>" (a TLS alert, as QUIC
    CRYPTO_ERROR 0x100 + n), "app:<n>" (an application close with code n)
    and "handshake" (our side's handshake failed with a ConnectionError,
    e.g. a wrong ALPN). Anything else, a timeout included, fails. Returns
    (ok, description)."""
    if isinstance(r, Exception):
        ok = "handshake" in expect and type(r) is ConnectionError
        return ok, f"handshake failed: {type(r).__name__}: {r}"
    if r.app_bytes() > 0:
        return False, f"{r.app_bytes()} application bytes received"
    if r.node_closed is None:
        return False, "connection still open, no refusal"
    code, frame_type, reason = r.node_closed
    if frame_type is None:
        outcome, kind = f"app:{code}", f"application close, code {code}"
    elif 0x100 <= code <= 0x1FF:
        outcome, kind = f"alert:{code - 0x100}", f"TLS alert {code - 0x100}"
    else:
        outcome, kind = f"transport:{code}", f"transport error {code}"
    return outcome in expect, (
        f"closed by the node ({kind}, {reason!r}), handshake completed on our side: {r.handshake_done}"
    )


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="a `cleanroom demo --dir` folder")
    ap.add_argument("--cleanroom", required=True, help="the cleanroom binary")
    ap.add_argument("--slowloris-secs", type=float, default=35.0)
    args = ap.parse_args()
    d = os.path.abspath(args.dir)
    certs = os.path.join(d, "certs")
    ca_pem = os.path.join(certs, "ca.pem")
    with open(ca_pem, "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(certs, "ca.key"), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), None)
    with open(os.path.join(certs, "analyst-alice.pem"), "rb") as f:
        alice_cert = x509.load_pem_x509_certificate(f.read())
    alice = (os.path.join(certs, "analyst-alice.pem"), os.path.join(certs, "analyst-alice.key"))
    platform_id = (os.path.join(certs, "platform.pem"), os.path.join(certs, "platform.key"))
    bank_id = (os.path.join(certs, "bank.pem"), os.path.join(certs, "bank.key"))
    alice_name = "alice.analyst.cleanroom"

    # An attacker's certificates: another CA's; the real CA's but expired;
    # the real CA's but revoked (a stolen analyst key, reported and revoked).
    attack = os.path.join(d, "attack")
    os.makedirs(attack, exist_ok=True)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cleanroom collaboration CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    rogue_ca_cert = (
        x509.CertificateBuilder()
        .subject_name(rogue_name)
        .issuer_name(rogue_name)
        .public_key(rogue_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(rogue_key, hashes.SHA256())
    )
    with open(os.path.join(certs, "bank.pem"), "rb") as f:
        bank_cert = x509.load_pem_x509_certificate(f.read())
    other_ca = cert_for(alice_name, rogue_name, rogue_key, alice_cert, -1, 30, os.path.join(attack, "other-ca"))
    expired = cert_for(alice_name, ca.subject, ca_key, alice_cert, -30, -1, os.path.join(attack, "expired"))
    revoked = cert_for(alice_name, ca.subject, ca_key, alice_cert, -1, 30, os.path.join(attack, "revoked"))
    subprocess.run(
        [args.cleanroom, "certs", "revoke", "--dir", certs, "--cert", revoked[0]], check=True, capture_output=True
    )
    with open(os.path.join(d, "bank.toml")) as f:
        bank_toml = f.read()
    if "crl =" not in bank_toml:
        bank_toml = bank_toml.replace('ca = "certs/ca.pem"\n', 'ca = "certs/ca.pem"\ncrl = "certs/ca.crl.pem"\n', 1)
        with open(os.path.join(d, "bank.toml"), "w") as f:
            f.write(bank_toml)

    bank_port, platform_port = free_port(), free_port()
    set_ports(d, bank_port, platform_port)
    logs = {r: open(os.path.join(attack, f"{r}.log"), "w") for r in ("bank", "platform")}
    env = dict(os.environ, RUST_LOG="info")
    nodes = [
        subprocess.Popen([args.cleanroom, "node", "--config", os.path.join(d, f"{r}.toml")], stdout=logs[r], stderr=logs[r], env=env)
        for r in ("bank", "platform")
    ]
    checks = Checks()
    try:
        ports = {"bank": bank_port, "platform": platform_port}
        name = {r: f"{r}.node.cleanroom" for r in ports}

        # Wait for both (the bank answers Templates once the platform has
        # connected and the two have exchanged signed policies).
        up = time.monotonic()
        while True:
            r = await session(bank_port, config(ca_pem, name["bank"], *alice), [request(TEMPLATES)], wait=5)
            if not isinstance(r, Exception) and any(response_kind(v) == "Templates" for v in r.data.values()):
                break
            if time.monotonic() - up > 60 or any(n.poll() is not None for n in nodes):
                raise SystemExit("the nodes did not come up; see " + attack)
            await asyncio.sleep(0.5)

        # Positive controls.
        for role, port in ports.items():
            tickets = []
            r = await session(port, config(ca_pem, name[role], *alice), [request(TEMPLATES), request(BUDGET)], tickets=tickets)
            kinds = sorted(filter(None, (response_kind(v) for v in r.data.values()))) if not isinstance(r, Exception) else r
            checks.report(
                f"control: the analyst's real certificate, {role}",
                kinds == ["Budget", "Templates"],
                f"answers {kinds}",
            )
            # 0-RTT needs a resumption ticket from an earlier connection.
            checks.report(
                f"0-RTT: no session ticket issued, {role}",
                not tickets,
                f"{len(tickets)} tickets after a full handshake (0-RTT and resumption impossible without one)",
            )

        # 0-RTT with a ticket the node never issued: a decoy QUIC server
        # (aioquic, a certificate for the bank's name from the attacker's
        # CA) hands out a resumption ticket allowing early data; the client
        # then opens a connection to the real bank with that ticket, no
        # client certificate, and a request sent as 0-RTT data.
        decoy_cert = cert_for(name["bank"], rogue_name, rogue_key, bank_cert, -1, 30, os.path.join(attack, "decoy"))
        rogue_ca = os.path.join(attack, "rogue-ca.pem")
        with open(rogue_ca, "wb") as f:
            f.write(rogue_ca_cert.public_bytes(serialization.Encoding.PEM))
        decoy_cfg = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        decoy_cfg.load_cert_chain(*decoy_cert)
        issued = {}
        decoy_port = free_port()
        decoy = await serve(
            "127.0.0.1",
            decoy_port,
            configuration=decoy_cfg,
            session_ticket_handler=lambda t: issued.__setitem__(t.ticket, t),
            session_ticket_fetcher=issued.pop,
        )
        tickets = []
        await session(decoy_port, config(rogue_ca, name["bank"]), [], wait=0.5, tickets=tickets)
        decoy.close()
        early_ok = bool(tickets) and tickets[-1].max_early_data_size
        if early_ok:
            cfg = config(ca_pem, name["bank"])
            cfg.session_ticket = tickets[-1]
            r = await session(bank_port, cfg, [request(TEMPLATES)], early=True)
            ok, detail = refused_before_data(r, {"alert:116"})
            accepted = None if isinstance(r, Exception) else r.early_data_accepted
            checks.report(
                "0-RTT request with a foreign ticket and no client certificate, bank",
                ok and not accepted,
                f"{detail}; early data accepted: {accepted}",
            )
        else:
            checks.report("0-RTT request with a foreign ticket", False, "the decoy issued no ticket allowing early data")

        # Refused before any application data.
        # Expected TLS alerts: 116 certificate_required, 48 unknown_ca or 51
        # decrypt_error (a bad signature), 45 certificate_expired, 44
        # certificate_revoked; 120 no_application_protocol surfaces here as
        # a failed handshake.
        cases = [
            ("no client certificate", lambda role: config(ca_pem, name[role]), {"alert:116"}),
            ("certificate from another CA", lambda role: config(ca_pem, name[role], *other_ca), {"alert:48", "alert:51"}),
            ("expired certificate from the real CA", lambda role: config(ca_pem, name[role], *expired), {"alert:45"}),
            ("wrong ALPN", lambda role: config(ca_pem, name[role], *alice, alpn="h3"), {"handshake", "alert:120"}),
        ]
        for what, cfg, expect in cases:
            for role, port in ports.items():
                t = time.monotonic()
                r = await session(port, cfg(role), [request(TEMPLATES)])
                ok, detail = refused_before_data(r, expect)
                checks.report(f"{what}, {role}", ok, f"{detail} in {time.monotonic() - t:.2f} s")
        r = await session(bank_port, config(ca_pem, name["bank"], *revoked), [request(TEMPLATES)])
        ok, detail = refused_before_data(r, {"alert:44"})
        checks.report("revoked certificate (CRL configured), bank", ok, detail)
        r = await session(platform_port, config(ca_pem, name["platform"], *platform_id), [request(TEMPLATES)])
        ok, detail = refused_before_data(r, {"app:4"})
        checks.report("the platform's own certificate presented to the platform", ok, detail)
        r = await session(platform_port, config(ca_pem, name["platform"], *bank_id), [request(TEMPLATES)])
        ok, detail = refused_before_data(r, {"app:3"})
        checks.report("the bank's certificate connecting to the platform (only the platform connects to the bank)", ok, detail)

        # An analyst certificate speaking the peer protocol: a join offer.
        offer = frame(bytes([VERSION, JOIN_OFFER]) + os.urandom(200))
        r = await session(bank_port, config(ca_pem, name["bank"], *alice), [offer])
        kinds = [response_kind(v) for v in r.data.values()] if not isinstance(r, Exception) else [r]
        checks.report(
            "analyst certificate sending a join offer to the bank",
            kinds == ["Refused"],
            f"answered {kinds} (an analyst request refusal; no join started)",
        )

        # Hostile frames with the real analyst certificate, each on its own
        # stream of one connection; then a valid request on the same
        # connection must still be answered.
        hostile = [
            ("length prefix 0xffffffff", struct.pack("<I", 0xFFFFFFFF) + os.urandom(64)),
            ("length prefix over the request limit", struct.pack("<I", 1 << 20) + os.urandom(64)),
            ("truncated frame", struct.pack("<I", 100) + os.urandom(10)),
            ("random body", frame(os.urandom(300))),
            ("unknown request variant", frame(bytes([VERSION, ANALYST_REQUEST]) + struct.pack("<I", 77))),
            ("wrong protocol version", frame(bytes([99, ANALYST_REQUEST]) + struct.pack("<I", TEMPLATES))),
            ("trailing bytes after a request", frame(bytes([VERSION, ANALYST_REQUEST]) + struct.pack("<I", TEMPLATES) + b"x")),
            ("empty stream", b""),
        ]
        for role, port in ports.items():
            r = await session(port, config(ca_pem, name[role], *alice), [h for _, h in hostile] + [request(TEMPLATES)], wait=5)
            if isinstance(r, Exception):
                checks.report(f"hostile frames, {role}", False, f"connection failed: {r}")
                continue
            sids = sorted(r.data.keys() | r.ended)
            answers = {sid: response_kind(r.data.get(sid, b"")) for sid in sids}
            last = max(answers) if answers else None
            bad = [k for sid, k in answers.items() if sid != last and k not in (None, "Refused")]
            ok = r.node_closed is None and last is not None and answers[last] == "Templates" and not bad
            checks.report(
                f"hostile frames, {role}",
                ok,
                f"{len(hostile)} hostile streams answered {[answers.get(s) for s in sids[:-1]]} (None: stream ended without an answer); "
                f"then the valid request on the same connection: {answers.get(last)}; connection still open: {r.node_closed is None}",
            )

        # Slowloris: streams that send two bytes of a length prefix and
        # stall; the node must end each one, and keep answering others.
        for role, port in ports.items():
            cfg = config(ca_pem, name[role], *alice)
            cfg.idle_timeout = 120.0
            async with connect("127.0.0.1", port, configuration=cfg, create_protocol=Recorder, wait_connected=True) as p:
                sids = []
                for _ in range(20):
                    sid = p._quic.get_next_available_stream_id()
                    p._quic.send_stream_data(sid, b"\x10\x00", end_stream=False)
                    sids.append(sid)
                p.transmit()
                t = time.monotonic()
                await asyncio.sleep(1.0)
                other = await session(port, config(ca_pem, name[role], *alice), [request(TEMPLATES)])
                served = not isinstance(other, Exception) and any(
                    response_kind(v) == "Templates" for v in other.data.values()
                )
                served_after = time.monotonic() - t
                while time.monotonic() - t < args.slowloris_secs and not all(s in p.ended for s in sids):
                    await asyncio.sleep(0.1)
                secs = time.monotonic() - t
                ended = sum(1 for s in sids if s in p.ended)
                checks.report(
                    f"slowloris (20 stalled streams), {role}",
                    served and ended == len(sids) and p.app_bytes() == 0,
                    f"another connection served meanwhile: {served} (at {served_after:.1f} s); "
                    f"{ended}/{len(sids)} stalled streams ended by the node after {secs:.1f} s, no data sent to them",
                )
        # One analyst certificate opening many connections: the node keeps
        # max_connections_per_analyst (64) and closes the rest with code 5.
        for role, port in ports.items():
            protos, managers = [], []
            for _ in range(70):
                m = connect("127.0.0.1", port, configuration=config(ca_pem, name[role], *alice), create_protocol=Recorder)
                try:
                    protos.append(await m.__aenter__())
                    managers.append(m)
                except Exception:
                    pass
            await asyncio.sleep(1.0)
            capped = sum(
                1
                for p in protos
                if p.closed
                and p.closed[0] == 5
                and p.closed[1] is None  # an application close, not transport error 5
                and "max_connections_per_analyst" in p.closed[2]
            )
            still = sum(1 for p in protos if p.closed is None)
            for m in managers:
                try:
                    await m.__aexit__(None, None, None)
                except Exception:
                    pass
            await asyncio.sleep(0.5)
            r = await session(port, config(ca_pem, name[role], *alice), [request(TEMPLATES)])
            served = not isinstance(r, Exception) and any(response_kind(v) == "Templates" for v in r.data.values())
            checks.report(
                f"70 connections from one analyst certificate, {role}",
                still == 64 and capped == len(protos) - 64 and served,
                f"{still} kept open, {capped} closed with code 5 (max_connections_per_analyst); after closing them a new one is served: {served}",
            )

        # Garbage datagrams at the QUIC port, paced (100 per ms) so that the
        # kernel's buffers drop few: random bytes of any size, and padded
        # Initial packets (QUIC v1 long header, 8-byte connection ids, no
        # token, a length, then random "encrypted" bytes; 1,200 to 1,400
        # bytes, so the node gets as far as trying to decrypt them).
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rng = random.Random(int.from_bytes(os.urandom(8), "little"))
        t = time.monotonic()
        sent = 0
        for port in ports.values():
            for i in range(10_000):
                if i % 2:
                    body = rng.randbytes(rng.randrange(1200, 1400))
                    junk = (
                        bytes([0xC0 | rng.randrange(4), 0, 0, 0, 1, 8])
                        + rng.randbytes(8)
                        + bytes([8])
                        + rng.randbytes(8)
                        + bytes([0])
                        + struct.pack(">H", 0x4000 | len(body))
                        + body
                    )
                else:
                    junk = rng.randbytes(rng.randrange(1, 1500))
                sock.sendto(junk, ("127.0.0.1", port))
                sent += 1
                if sent % 100 == 0:
                    await asyncio.sleep(0.001)
        sock.close()
        flood_secs = time.monotonic() - t
        for role, port in ports.items():
            t = time.monotonic()
            r = await session(port, config(ca_pem, name[role], *alice), [request(TEMPLATES)])
            served = not isinstance(r, Exception) and any(response_kind(v) == "Templates" for v in r.data.values())
            checks.report(
                f"garbage datagrams, {role}",
                served,
                f"{sent} datagrams to both nodes in {flood_secs:.1f} s; a request afterwards answered: {served} ({time.monotonic() - t:.2f} s)",
            )

        for role, n in zip(("bank", "platform"), nodes):
            checks.report(f"{role} process still running", n.poll() is None, f"exit status {n.poll()}")
    finally:
        for n in nodes:
            n.terminate()
        for n in nodes:
            try:
                n.wait(timeout=10)
            except subprocess.TimeoutExpired:
                n.kill()
    for role, log in logs.items():
        log.close()
        with open(log.name) as f:
            text = f.read()
        lines = len(text.splitlines())
        # The garbage flood alone sent 10,000 datagrams to each node: its
        # refused handshakes are logged once per 10 s, not once each.
        checks.report(f"{role} log has no panic and stays small", "panicked" not in text and lines < 500, f"{lines} log lines")
    print(f"{checks.failed} checks failed; node logs in {attack}")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
