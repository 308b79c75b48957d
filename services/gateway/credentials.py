"""Development credentials for the public endpoint: a CA and server certificate for TLS, and a JWT
signing key, its JWKS and tokens for `--auth jwt` (the commands `meshserve dev-certs` and `meshserve
mint-token` are in services/cli/dev_credentials.py); production certificates and JWKS come from files
given to `meshserve up` (docs/public-endpoint.md)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Inside the git-ignored .run/, beside the run directories: never committed, removed by `make clean`.
DEFAULT_CREDENTIALS_DIR = Path(".run") / "dev-credentials"
DEV_ISSUER = "meshserve-dev"
DEV_AUDIENCE = "meshserve"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DevTls:
    """PEM files of a development CA and the server certificate it signed."""

    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class SigningKey:
    """The development JWT signing key (RS256) and the JWKS Envoy verifies tokens with."""

    private_key: Path
    jwks: Path
    kid: str


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san_entry(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _dev_tls_usable(tls: DevTls, hosts: Sequence[str]) -> bool:
    """Whether existing files are a server certificate for `hosts` valid for at least another day."""
    from cryptography import x509

    if not all(p.is_file() for p in (tls.ca, tls.cert, tls.key)):
        return False
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    if cert.not_valid_after_utc < datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1):
        return False
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return all(_san_entry(h) in sans for h in hosts)


def ensure_dev_tls(directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 30) -> DevTls:
    """A development CA (ca.pem) and a server certificate (server.pem, server-key.pem) for `hosts`
    in `directory`; existing files are reused while they still fit."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    tls = DevTls(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    if _dev_tls_usable(tls, hosts):
        return tls
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshserve development CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san_entry(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    # the CA's key is not kept: a new certificate means a new CA, so a leaked dev CA signs nothing else
    _write_private(
        tls.key,
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    tls.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    tls.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    return tls


def _jwk(public_key) -> dict:
    numbers = public_key.public_numbers()
    n = _b64url(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big"))
    e = _b64url(numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big"))
    # RFC 7638 thumbprint as the key id
    kid = _b64url(hashlib.sha256(json.dumps({"e": e, "kty": "RSA", "n": n}, separators=(",", ":")).encode()).digest())
    return {"kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid, "n": n, "e": e}


def ensure_signing_key(directory: Path) -> SigningKey:
    """The development RS256 signing key (jwt-signing-key.pem) and its JWKS (jwks.json) in `directory`,
    created when missing."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key_path, jwks_path = directory / "jwt-signing-key.pem", directory / "jwks.json"
    if key_path.is_file():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_private(
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
    jwk = _jwk(key.public_key())
    jwks = json.dumps({"keys": [jwk]}, indent=2) + "\n"
    if not jwks_path.is_file() or jwks_path.read_text() != jwks:
        jwks_path.write_text(jwks)
    return SigningKey(key_path, jwks_path, jwk["kid"])


MAX_PRIORITIES = ("low", "normal", "high")


def mint_token(
    directory: Path,
    tenant: str,
    ttl_s: int = 3600,
    issuer: str = DEV_ISSUER,
    audience: str = DEV_AUDIENCE,
    now: float | None = None,
    max_priority: str | None = None,
) -> str:
    """A development JWT (RS256) for `tenant`, signed with the key in `directory` (created if missing);
    `max_priority` (low, normal, high) becomes the `max_priority` claim that lets the tenant use it."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    if not tenant:
        raise ValueError("tenant must not be empty")
    if ttl_s < 1:
        raise ValueError(f"ttl_s must be >= 1, got {ttl_s}")
    if max_priority is not None and max_priority not in MAX_PRIORITIES:
        raise ValueError(f"max_priority must be one of {', '.join(MAX_PRIORITIES)}, got {max_priority!r}")
    signing = ensure_signing_key(directory)
    key = serialization.load_pem_private_key(signing.private_key.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"{signing.private_key} is not an RSA key: tokens are signed RS256")
    issued = int(time.time() if now is None else now)
    header = {"alg": "RS256", "typ": "JWT", "kid": signing.kid}
    claims = {"iss": issuer, "aud": audience, "sub": tenant, "tenant": tenant, "iat": issued, "exp": issued + ttl_s}
    if max_priority is not None:
        claims["max_priority"] = max_priority
    signing_input = ".".join(_b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims))
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64url(signature)}"
