"""Development credentials: tokens that verify against the JWKS Envoy is given, and a CA-signed server
certificate for the names clients dial."""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import stat

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from services.cli.dev_credentials import add_parsers
from services.gateway.credentials import ensure_dev_tls, ensure_signing_key, mint_token


def b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def verify(token: str, jwks: dict) -> dict:
    """Checks the RS256 signature with the JWKS the way Envoy does, and returns the claims."""
    header_b64, claims_b64, signature_b64 = token.split(".")
    header = json.loads(b64decode(header_b64))
    assert header["alg"] == "RS256"
    jwk = next(k for k in jwks["keys"] if k["kid"] == header["kid"])
    public = rsa.RSAPublicNumbers(
        int.from_bytes(b64decode(jwk["e"]), "big"), int.from_bytes(b64decode(jwk["n"]), "big")
    ).public_key()
    public.verify(b64decode(signature_b64), f"{header_b64}.{claims_b64}".encode(), padding.PKCS1v15(), hashes.SHA256())
    return json.loads(b64decode(claims_b64))


def test_minted_tokens_verify_against_the_jwks(tmp_path):
    token = mint_token(tmp_path, "acme", ttl_s=120, now=1_700_000_000)
    jwks = json.loads((tmp_path / "jwks.json").read_text())
    claims = verify(token, jwks)
    assert claims == {
        "iss": "meshserve-dev",
        "aud": "meshserve",
        "sub": "acme",
        "tenant": "acme",
        "iat": 1_700_000_000,
        "exp": 1_700_000_120,
    }
    header_b64, _, signature_b64 = token.split(".")
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "tenant": "someone-else"}).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidSignature):
        verify(f"{header_b64}.{forged}.{signature_b64}", jwks)


def test_the_signing_key_is_kept_private_and_reused(tmp_path):
    first = ensure_signing_key(tmp_path)
    assert stat.S_IMODE(first.private_key.stat().st_mode) == 0o600
    jwks = first.jwks.read_text()
    second = ensure_signing_key(tmp_path)
    assert second.kid == first.kid and second.jwks.read_text() == jwks
    verify(mint_token(tmp_path, "later"), json.loads(jwks))  # tokens minted later still verify
    assert "d" not in json.loads(jwks)["keys"][0], "the JWKS must hold only the public key"


def test_bad_token_requests_are_refused(tmp_path):
    with pytest.raises(ValueError, match="tenant"):
        mint_token(tmp_path, "")
    with pytest.raises(ValueError, match="ttl_s"):
        mint_token(tmp_path, "acme", ttl_s=0)


def test_dev_tls_is_a_server_certificate_signed_by_the_ca(tmp_path):
    tls = ensure_dev_tls(tmp_path)
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert stat.S_IMODE(tls.key.stat().st_mode) == 0o600


def test_dev_tls_is_reused_until_the_names_change(tmp_path):
    first = ensure_dev_tls(tmp_path)
    pem = first.cert.read_bytes()
    assert ensure_dev_tls(tmp_path).cert.read_bytes() == pem
    renamed = ensure_dev_tls(tmp_path, ("meshserve.example", "localhost"))
    cert = x509.load_pem_x509_certificate(renamed.cert.read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["meshserve.example", "localhost"]
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(renamed.ca.read_bytes()))


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="meshserve")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_mint_token_and_dev_certs_commands(tmp_path, capsys):
    assert run(["mint-token", "--tenant", "acme", "--credentials-dir", str(tmp_path / "creds")]) == 0
    token = capsys.readouterr().out.strip()
    claims = verify(token, json.loads((tmp_path / "creds" / "jwks.json").read_text()))
    assert claims["tenant"] == "acme" and claims["exp"] - claims["iat"] == 3600

    assert run(["dev-certs", "--dir", str(tmp_path / "tls"), "--host", "api.local"]) == 0
    out = capsys.readouterr().out
    assert f"ca: {tmp_path / 'tls' / 'ca.pem'}" in out
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.pem").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == ["api.local"]
