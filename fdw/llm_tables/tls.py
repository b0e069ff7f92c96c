"""TLS to a sidecar over TCP, from the server's tls_* options.

A sidecar on another host is reached over TCP, and what crosses it is the rows' text, the
model's output and, with `auth: required`, the tenant's token: without TLS anyone on the path
reads them.  The server option `tls_ca_file` (the CA that signed the sidecar's certificate)
turns TLS on; `tls_cert_file` and `tls_key_file` add this side's certificate for a sidecar that
requires one (`--tls-client-ca`); `tls_server_name` is the name to check the certificate
against when the address is not that name (an IP address, a list of them).  The file options
are a superuser's (the C validator): every backend reads them as the server's OS user.
A Unix socket needs none of it: its file mode is the boundary.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import grpc

from llm_tables.errors import INVALID_PARAMETER_VALUE, LlmError

FILE_OPTIONS = ("tls_ca_file", "tls_cert_file", "tls_key_file")
OPTIONS = (*FILE_OPTIONS, "tls_server_name")


@dataclass(frozen=True)
class TlsSettings:
    """The TLS a channel uses; hashable, so that channels are cached per address and settings."""

    ca_file: str
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        """Credentials read from the files now: a new channel (after forget_channel) reads
        renewed files."""
        if self.key_file:
            _check_private("tls_key_file", self.key_file)
        return grpc.ssl_channel_credentials(
            root_certificates=_read("tls_ca_file", self.ca_file),
            private_key=_read("tls_key_file", self.key_file) if self.key_file else None,
            certificate_chain=_read("tls_cert_file", self.cert_file) if self.cert_file else None)

    def stamp(self) -> tuple:
        """What the files are now (mtime, size, inode; None when unreadable): a channel made
        from other files is replaced, so a renewed client certificate or CA is used by the
        backend's next query, not only by new sessions."""
        def one(path: str | None):
            try:
                st = os.stat(path) if path else None
            except OSError:
                return None
            return st and (st.st_mtime_ns, st.st_size, st.st_ino)
        return one(self.ca_file), one(self.cert_file), one(self.key_file)

    def channel_options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def tls_settings(options: dict[str, Any]) -> TlsSettings | None:
    """TlsSettings from merged options, None without tls_ca_file; half a client certificate,
    or a tls_* option without tls_ca_file, is an error naming what is missing."""
    given = {name: options[name] for name in OPTIONS if options.get(name)}
    if not given:
        return None
    if str(options.get("address", "")).startswith("unix:"):
        raise LlmError(f"option {sorted(given)[0]} is for a sidecar reached over TCP, and this server's "
                       "address is a Unix socket, whose file mode is its boundary (the sidecar serves no "
                       "TLS there)", hint="Drop the tls_* options, or give the sidecar's TCP address.",
                       sqlstate=INVALID_PARAMETER_VALUE)
    if "tls_ca_file" not in given:
        raise LlmError(f"option {sorted(given)[0]} needs tls_ca_file: TLS to the sidecar is on only with "
                       "the CA that signed its certificate",
                       hint="Add it in the same statement: ALTER SERVER name OPTIONS (ADD tls_ca_file '/path/to/ca.pem', ...);",
                       sqlstate=INVALID_PARAMETER_VALUE)
    if ("tls_cert_file" in given) != ("tls_key_file" in given):
        missing = "tls_key_file" if "tls_cert_file" in given else "tls_cert_file"
        raise LlmError(f"option {missing} is missing: a client certificate needs both tls_cert_file and "
                       "tls_key_file",
                       hint="Add both in one statement: ALTER SERVER name OPTIONS (ADD tls_cert_file '...', "
                            "ADD tls_key_file '...');", sqlstate=INVALID_PARAMETER_VALUE)
    return TlsSettings(given["tls_ca_file"], given.get("tls_cert_file"), given.get("tls_key_file"),
                       given.get("tls_server_name"))


def _check_private(option: str, path: str) -> None:
    """A private key that every user of the host may read is refused, as libpq refuses such an
    sslkey: the owner's and the group's read are enough (a Kubernetes Secret mounts 0440)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return   # _read says why
    if mode & 0o007:
        raise LlmError(f"the file of option {option} ({path}) is a private key that every user of this "
                       f"host may access (mode {mode & 0o777:04o})",
                       hint="chmod 600 it (640 for a group), owned by the Postgres server's OS user.",
                       sqlstate=INVALID_PARAMETER_VALUE)


def _read(option: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise LlmError(f"cannot read the file of option {option} ({path}): {err.strerror}",
                       hint="The file must be readable by the Postgres server's OS user.",
                       sqlstate=INVALID_PARAMETER_VALUE) from None
