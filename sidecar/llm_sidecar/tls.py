"""TLS for the sidecar's TCP listeners (--tls-cert, --tls-key, --tls-client-ca).

Over TCP the prompts, the outputs and (with `auth: required`) the tenants' tokens cross the
network; a Unix socket needs none of this (its file mode is the boundary).  The files are PEM;
a renewed certificate is picked up without a restart, and a private key that every user of
the host may read is refused, as PostgreSQL refuses such an ssl_key_file.
"""
from __future__ import annotations

import logging
import os

import grpc

log = logging.getLogger("llm_sidecar")


def server_credentials(cert: str, key: str, client_ca: str | None) -> grpc.ServerCredentials:
    """TLS for the TCP listeners, from PEM files; with `client_ca` a client must show a
    certificate that CA signed (mutual TLS).  gRPC asks before every new connection's handshake
    whether the files changed (a renewed certificate, a Kubernetes Secret update): a change is
    read then, so renewal needs no restart.  A change that cannot be read yet keeps the old files."""
    paths = [p for p in (cert, key, client_ca) if p]
    check_private_key(key)

    def stamp() -> tuple:
        return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in map(os.stat, paths))

    def read(path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def load() -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(read(key), read(cert))], root_certificates=read(client_ca) if client_ca else None)

    seen = [stamp()]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            now = stamp()
            if now == seen[0]:
                return None
            check_private_key(key)
            config = load()
        except PermissionError as err:
            log.warning("TLS: %s: new connections keep the files read before", err)
            return None
        except OSError as err:
            log.warning("TLS: cannot read %s (%s): new connections keep the files read before",
                        err.filename, err.strerror)
            return None
        seen[0] = now
        log.info("TLS: certificate files changed; new connections use them")
        return config

    return grpc.dynamic_ssl_server_credentials(load(), fetch, require_client_authentication=client_ca is not None)


def check_private_key(path: str) -> None:
    """Refuse a private key file that every user of the host may access (as PostgreSQL refuses
    such an ssl_key_file); the owner's and the group's read are enough (Kubernetes mounts 0440)."""
    mode = os.stat(path).st_mode
    if mode & 0o007:
        raise PermissionError(f"{path} is a private key that every user may access (mode "
                              f"{mode & 0o777:04o}): chmod 600 it (640 for a group)")
