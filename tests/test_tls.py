"""A round over wss:// between the coordinator and peers whose listeners use TLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from peers import Peer
from server import Coordinator


def _self_signed(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secagg test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_round_over_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    client_side = ssl.create_default_context(cafile=str(cert))
    n, dim = 5, 8
    inputs = np.random.default_rng(3).uniform(-1, 1, size=(n, dim))
    async with Coordinator(max_peers=n, threshold=3, dim=dim, ssl_context=server_side,
                           phase_timeout=10) as coordinator:
        assert coordinator.url.startswith("wss://")
        round_task = asyncio.create_task(coordinator.run_round())
        peers = [Peer(coordinator.url, f"tls-{i}", listener_ssl=server_side,
                      client_ssl=client_side) for i in range(n)]
        for peer in peers:
            await peer.start()
            assert peer.address.startswith("wss://")
        outcomes = await asyncio.gather(*(p.contribute(inputs[i]) for i, p in enumerate(peers)))
        result = await round_task
        for peer in peers:
            await peer.close()
    assert [o.status for o in outcomes] == ["ok"] * n
    assert result.aggregate is not None
    np.testing.assert_allclose(result.aggregate, inputs.sum(axis=0), atol=1e-6)


async def test_untrusted_certificate_is_refused(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_side = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_side.load_cert_chain(cert, key)
    async with Coordinator(max_peers=2, threshold=2, dim=2,
                           ssl_context=server_side) as coordinator:
        # The default context does not trust the self-signed certificate.
        peer = Peer(coordinator.url, "stranger", client_ssl=ssl.create_default_context(),
                    connect_attempts=1)
        with pytest.raises(Exception, match=r"cannot reach|certificate"):
            await peer.start()
        await peer.close()
