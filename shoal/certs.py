"""``shoal certs DIR``: a certificate authority and certificates for a cluster, for local use.

Writes, in DIR (keys readable by the owner only):

* ``ca.pem`` / ``ca.key``: the cluster's CA (EC P-256, self-signed);
* ``cluster.pem`` / ``cluster.key``: the certificate every Shoal process serves with and
  presents to the others (OU=cluster; names: localhost, 127.0.0.1, ::1 and every ``--host``);
* ``admin``, ``writer``, ``reader`` ``.pem`` / ``.key``: client certificates with the roles
  admin, write and query (the role is the certificate's OU; more with ``client_cert``);
* ``token.key``: the HMAC key bearer tokens of this cluster are signed with (``shoal token``);
* ``security.json``: a config file (``shoal up --config``) that turns all of it on.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import pathlib
import secrets

from shoal.security import ROLES

CLIENTS = (("admin", ["admin"]), ("writer", ["write"]), ("reader", ["query"]))


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: pathlib.Path, key) -> None:
    from cryptography.hazmat.primitives import serialization
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_cert(path: pathlib.Path, cert) -> None:
    from cryptography.hazmat.primitives import serialization
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _name(cn: str, roles=()):
    from cryptography import x509
    from cryptography.x509.oid import NameOID
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Shoal")] +
                     [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, r) for r in roles] +
                     [x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _sign(subject, public_key, ca_cert, ca_key, days: int, extensions):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(subject)
         .issuer_name(ca_cert.subject if ca_cert is not None else subject)
         .public_key(public_key).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=days)))
    for ext, critical in extensions:
        b = b.add_extension(ext, critical=critical)
    return b.sign(ca_key, hashes.SHA256())


def _load_ca(out: pathlib.Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    return cert, key


def client_cert(out: str | os.PathLike, name: str, roles, days: int = 365,
                file_stem: str | None = None) -> tuple[pathlib.Path, pathlib.Path]:
    """A client certificate signed by DIR's CA for ``name`` with ``roles``: (pem, key)."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    bad = set(roles) - set(ROLES)
    if bad or not roles:
        raise ValueError(f"roles: {sorted(bad) or 'none given'}; allowed: {', '.join(ROLES)}")
    out = pathlib.Path(out)
    ca_cert, ca_key = _load_ca(out)
    key = _key()
    cert = _sign(_name(name, roles), key.public_key(), ca_cert, ca_key, days, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    stem = file_stem or name
    _write_cert(out / f"{stem}.pem", cert)
    _write_key(out / f"{stem}.key", key)
    return out / f"{stem}.pem", out / f"{stem}.key"


def make_certs(out: str | os.PathLike, hosts=(), days: int = 365) -> dict[str, str]:
    """Everything listed in the module's doc, in ``out`` (created); the paths by name."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name("Shoal cluster CA")
    ca = _sign(ca_name, ca_key.public_key(), None, ca_key, days, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                       content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, encipher_only=False,
                       decipher_only=False), True)])
    _write_cert(out / "ca.pem", ca)
    _write_key(out / "ca.key", ca_key)
    names: list = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                   x509.IPAddress(ipaddress.ip_address("::1"))]
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    key = _key()
    cert = _sign(_name("shoal-cluster", ["cluster"]), key.public_key(), ca, ca_key, days, [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.SubjectAlternativeName(names), False),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                ExtendedKeyUsageOID.CLIENT_AUTH]), False)])
    _write_cert(out / "cluster.pem", cert)
    _write_key(out / "cluster.key", key)
    for stem, roles in CLIENTS:
        client_cert(out, stem, roles, days)
    fd = os.open(out / "token.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    paths = {"ca": out / "ca.pem", "cert": out / "cluster.pem", "key": out / "cluster.key",
             "token_key": out / "token.key"}
    (out / "security.json").write_text(json.dumps({"security": {
        "tls_ca_file": str(paths["ca"].resolve()), "tls_cert_file": str(paths["cert"].resolve()),
        "tls_key_file": str(paths["key"].resolve()),
        "token_key_file": str(paths["token_key"].resolve())}}, indent=2) + "\n")
    return {k: str(v) for k, v in paths.items()} | {"config": str(out / "security.json")}
