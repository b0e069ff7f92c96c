"""A throw-away certificate authority for trying TLS between Postgres and a sidecar.

    .venv/bin/python -m deploy.dev_certs OUT_DIR [--name sidecar.internal] [--ip 10.0.0.5]

writes ca.pem, sidecar.pem + sidecar.key (for --tls-cert/--tls-key; named by --name and --ip)
and client.pem + client.key (the server options tls_cert_file/tls_key_file, for a sidecar
started with --tls-client-ca ca.pem).  For development and tests: in production the
certificates come from your own PKI (cert-manager in Kubernetes).  The tests and
bench/bench_tls.py make theirs here.
"""
from __future__ import annotations

import argparse
import ipaddress
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_FOR = timedelta(days=30)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(path: Path, data: bytes, mode: int) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


class DevCA:
    """A CA key and self-signed certificate, kept in memory; `issue` writes leaf certificates."""

    def __init__(self, common_name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self._sign(_name(common_name), self.key.public_key(), ca=True)

    def _sign(self, subject: x509.Name, public_key, *, ca: bool = False, usage=None,
              names: tuple[str, ...] = ()) -> x509.Certificate:
        now = datetime.now(timezone.utc)
        issuer = subject if ca else self.cert.subject
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + VALID_FOR)
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName([_alt_name(n) for n in names]),
                                            critical=False)
        return builder.sign(self.key, hashes.SHA256())

    def write_ca(self, path: Path, mode: int = 0o644) -> Path:
        return _write(path, self.cert.public_bytes(serialization.Encoding.PEM), mode)

    def issue(self, folder: Path, stem: str, *, server_names: tuple[str, ...] = (), client: bool = False,
              mode: int = 0o600) -> tuple[Path, Path]:
        """Write `stem`.pem and `stem`.key: a server certificate for server_names (DNS names or IP
        addresses), or a client certificate; the key file gets `mode`."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        cert = self._sign(_name(stem), key.public_key(), usage=usage, names=server_names)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (_write(folder / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644),
                _write(folder / f"{stem}.key", key_pem, mode))


def _alt_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.dev_certs", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--name", action="append", default=[], help="a DNS name of the sidecar (repeatable)")
    parser.add_argument("--ip", action="append", default=[], help="an IP address of the sidecar (repeatable)")
    args = parser.parse_args(argv)
    names = tuple(args.name + args.ip) or ("localhost", "127.0.0.1")
    args.out.mkdir(parents=True, exist_ok=True)
    ca = DevCA("llmfdw development CA")
    print(ca.write_ca(args.out / "ca.pem"))
    for path in (*ca.issue(args.out, "sidecar", server_names=names), *ca.issue(args.out, "client", client=True)):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
