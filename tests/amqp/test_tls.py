"""TLS to RabbitMQ: CA file, client certificate and key, server-name checking.

The listener is a TLS endpoint made by the test on 127.0.0.1 that requires a client
certificate signed by the test's CA and forwards the decrypted bytes to the real broker:
what it checks is the client side (the settings, the handshake, the errors), end to end
against RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conveyor.errors import BrokerUnreachable, ConfigError
from conveyor.transport import QueueSpec
from workers.amqp import AmqpSettings, AmqpTransport

crypto = pytest.importorskip("cryptography")
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    path.chmod(0o600)


def _issue(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, sans: tuple[x509.GeneralName, ...] = (),
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(issuer).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    ca = _issue("conveyor test CA", ca_key, _name("conveyor test CA"), ca_key, ca=True)
    other = _issue("another CA", other_key, _name("another CA"), other_key, ca=True)
    server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    # The broker's certificate names "localhost" only: 127.0.0.1 is not a name in it.
    server = _issue("localhost", server_key, ca.subject, ca_key, ca=False,
                    sans=(x509.DNSName("localhost"),))
    client = _issue("conveyor-worker", client_key, ca.subject, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (root / "ca.pem").write_bytes(ca.public_bytes(pem))
    (root / "other-ca.pem").write_bytes(other.public_bytes(pem))
    (root / "server.pem").write_bytes(server.public_bytes(pem))
    (root / "client.pem").write_bytes(client.public_bytes(pem))
    _write_key(server_key, root / "server.key")
    _write_key(client_key, root / "client.key")
    return Pki(root / "ca.pem", root / "other-ca.pem", root / "server.pem",
               root / "server.key", root / "client.pem", root / "client.key")


@contextlib.asynccontextmanager
async def tls_listener(pki: Pki, upstream: tuple[str, int]) -> AsyncIterator[int]:
    """A TLS endpoint on 127.0.0.1 (client certificates required) in front of RabbitMQ."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    context.verify_mode = ssl.CERT_REQUIRED
    pipes: set[asyncio.Task[None]] = set()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
        for task in (asyncio.create_task(pipe(reader, up_writer)),
                     asyncio.create_task(pipe(up_reader, writer))):
            pipes.add(task)
            task.add_done_callback(pipes.discard)

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(pipes):
            task.cancel()
        await asyncio.gather(*pipes, return_exceptions=True)


def _tls_url(rabbitmq_url: str, port: int, host: str = "localhost") -> str:
    parts = urlsplit(rabbitmq_url)
    credentials = parts.netloc.rsplit("@", 1)[0]
    return f"amqps://{credentials}@{host}:{port}{parts.path or '/'}"


def _upstream(rabbitmq_url: str) -> tuple[str, int]:
    parts = urlsplit(rabbitmq_url)
    return parts.hostname or "127.0.0.1", parts.port or 5672


@pytest.mark.rabbitmq
async def test_tls_with_a_client_certificate_works(pki: Pki, rabbitmq_url: str) -> None:
    async with tls_listener(pki, _upstream(rabbitmq_url)) as port:
        url = (_tls_url(rabbitmq_url, port)
               + f"?cafile={pki.ca}&certfile={pki.client_cert}&keyfile={pki.client_key}")
        transport = await AmqpTransport.connect(url)
        try:
            await transport.declare_queue(QueueSpec("t.tls.q", auto_delete=True))
            assert (await transport.queue_stats("t.tls.q")).depth == 0
        finally:
            await transport.delete_queue("t.tls.q")
            await transport.close()


@pytest.mark.rabbitmq
async def test_the_tls_files_can_come_from_the_environment(pki: Pki, rabbitmq_url: str) -> None:
    env = {"CONVEYOR_AMQP_CAFILE": str(pki.ca), "CONVEYOR_AMQP_CERTFILE": str(pki.client_cert),
           "CONVEYOR_AMQP_KEYFILE": str(pki.client_key)}
    async with tls_listener(pki, _upstream(rabbitmq_url)) as port:
        settings = AmqpSettings.from_url_and_env(_tls_url(rabbitmq_url, port), env)
        assert settings.cafile == str(pki.ca)
        transport = await AmqpTransport.connect(settings)
        await transport.close()


@pytest.mark.rabbitmq
async def test_a_wrong_ca_is_refused_with_a_clear_error(pki: Pki, rabbitmq_url: str) -> None:
    async with tls_listener(pki, _upstream(rabbitmq_url)) as port:
        url = (_tls_url(rabbitmq_url, port)
               + f"?cafile={pki.other_ca}&certfile={pki.client_cert}&keyfile={pki.client_key}")
        with pytest.raises(BrokerUnreachable, match=r"TLS handshake .* failed .*cafile"):
            await AmqpTransport.connect(url)


@pytest.mark.rabbitmq
async def test_a_host_the_certificate_does_not_name_is_refused(
    pki: Pki, rabbitmq_url: str
) -> None:
    async with tls_listener(pki, _upstream(rabbitmq_url)) as port:
        # The same listener by an address the certificate does not name.
        url = (_tls_url(rabbitmq_url, port, host="127.0.0.1")
               + f"?cafile={pki.ca}&certfile={pki.client_cert}&keyfile={pki.client_key}")
        with pytest.raises(BrokerUnreachable, match=r"TLS handshake .* failed"):
            await AmqpTransport.connect(url)
        # Checking off (verify=off) connects: the check above was the name, nothing else.
        transport = await AmqpTransport.connect(url + "&verify=off")
        await transport.close()


@pytest.mark.rabbitmq
async def test_without_a_client_certificate_the_broker_side_refuses(
    pki: Pki, rabbitmq_url: str
) -> None:
    async with tls_listener(pki, _upstream(rabbitmq_url)) as port:
        with pytest.raises(BrokerUnreachable):
            await AmqpTransport.connect(_tls_url(rabbitmq_url, port) + f"?cafile={pki.ca}")


def test_tls_settings_need_amqps_and_readable_files(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="need an amqps:// URL"):
        AmqpSettings.from_url(f"amqp://u:p@localhost/?cafile={pki.ca}")
    with pytest.raises(ConfigError, match="TLS file not found"):
        missing = f"amqps://u:p@localhost/?cafile={tmp_path}/missing.pem"
        AmqpSettings.from_url(missing).ssl_context()
    with pytest.raises(ConfigError, match="keyfile given without certfile"):
        AmqpSettings.from_url(f"amqps://u:p@localhost/?keyfile={pki.client_key}")
    assert AmqpSettings.from_url("amqp://u:p@localhost/").ssl_context() is None
    unverified = AmqpSettings.from_url("amqps://u:p@localhost/?verify=off").ssl_context()
    assert unverified is not None and unverified.verify_mode is ssl.CERT_NONE
