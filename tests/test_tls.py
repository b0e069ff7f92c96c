"""TLS between Postgres and a sidecar over TCP (fdw/llm_tables/tls.py, the sidecar's --tls-*).

One sidecar (the generation model only: it starts in about a second) serves mutual TLS on
127.0.0.1 and plain gRPC on a Unix socket (used only to wait for SERVING).  Its certificate
names `sidecar.test` only, so a server must say `tls_server_name` to reach it by IP address.
The certificates come from two throw-away CAs (deploy/dev_certs.py): `ca` signs the sidecar's
and the client's, `rogue` signs an impostor's.  Every piece that is missing or wrong fails the query
with an error that names the problem; the complete set serves SQL.
"""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import psycopg
import pytest

from deploy import embedded
from deploy.dev_certs import DevCA
from sidecar_process import running_sidecar
from test_sidecar_lifecycle import GEN, write_config

SCHEMA = "tls_t"
SERVER_NAME = "sidecar.test"
RENEWED_NAME = "renewed.test"   # the name in the sidecar's certificate after its renewal


@pytest.fixture(scope="module")
def pki(work_dir) -> dict[str, str]:
    """PEM files from two throw-away CAs (deploy/dev_certs.py), readable by the Postgres server's
    and the sidecar's OS user."""
    folder = Path(tempfile.mkdtemp(prefix="tls-", dir=work_dir))
    folder.chmod(0o755)
    files: dict[str, str] = {}
    for ca_name in ("ca", "rogue"):
        ca = DevCA(f"llmfdw test {ca_name} CA")
        files[f"{ca_name}_cert"] = str(ca.write_ca(folder / f"{ca_name}.pem"))
        for leaf, names in (("server", (SERVER_NAME,)), ("client", ()), ("renewed", (RENEWED_NAME,))):
            cert, key = ca.issue(folder, f"{ca_name}_{leaf}", server_names=names, client=leaf == "client")
            embedded.give_to_server_user(key)   # 0600: the sidecar and the backends run as that user
            files[f"{ca_name}_{leaf}_cert"], files[f"{ca_name}_{leaf}_key"] = str(cert), str(key)
    return files


@contextlib.contextmanager
def tls_sidecar(folder: Path, cert: str, key: str, client_ca: str) -> Iterator[int]:
    """A sidecar serving mutual TLS on a free port (yielded), and plain gRPC on a Unix socket."""
    port = embedded.free_port()
    extra = ("--listen", f"127.0.0.1:{port}", "--tls-cert", cert, "--tls-key", key, "--tls-client-ca", client_ca)
    with running_sidecar(str(folder / "s.sock"), str(write_config(folder / "c.yaml")), log_path=str(folder / "log"),
                         extra=extra):
        yield port


def _folder(work_dir: Path, prefix: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=work_dir))
    folder.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def tls_port(pki, work_dir):
    """The port of a sidecar serving mutual TLS: its certificate from `ca`, clients' from `ca`."""
    with tls_sidecar(_folder(work_dir, "tls-sidecar-"), pki["ca_server_cert"], pki["ca_server_key"],
                     pki["ca_cert"]) as port:
        yield port


@pytest.fixture
def tls_server(conn, tls_port, pki):
    """A server for the TLS sidecar with the complete, right settings; a test changes one."""
    conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    conn.execute(f"DROP SERVER IF EXISTS {SCHEMA} CASCADE")
    conn.execute(f"CREATE SERVER {SCHEMA} FOREIGN DATA WRAPPER llmfdw OPTIONS (address '127.0.0.1:{tls_port}', "
                 f"tls_ca_file '{pki['ca_cert']}', tls_cert_file '{pki['ca_client_cert']}', "
                 f"tls_key_file '{pki['ca_client_key']}', tls_server_name '{SERVER_NAME}', timeout '30')")
    conn.execute(f"CREATE USER MAPPING FOR CURRENT_USER SERVER {SCHEMA}")
    conn.execute(f"CREATE SCHEMA {SCHEMA}")
    conn.execute(f"IMPORT FOREIGN SCHEMA llm FROM SERVER {SCHEMA} INTO {SCHEMA}")
    yield SCHEMA
    conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    conn.execute(f"DROP SERVER IF EXISTS {SCHEMA} CASCADE")


def test_mutual_tls_serves_sql(conn, tls_server):
    assert conn.execute(f"SELECT name FROM {tls_server}.models").fetchall() == [(GEN,)]
    text, = conn.execute(f"SELECT completion FROM {tls_server}.completions "
                         "WHERE prompt = 'Say hello.' AND max_tokens = 4").fetchone()
    assert text


# (what the server's options become, words the error must carry)
BROKEN = {
    "plain gRPC to a TLS port": ("DROP tls_ca_file, DROP tls_cert_file, DROP tls_key_file, DROP tls_server_name",
                                 "not reachable"),
    "no client certificate": ("DROP tls_cert_file, DROP tls_key_file", "not reachable"),
    "the sidecar's CA is not trusted": ("SET tls_ca_file '{rogue_cert}'", "CERTIFICATE_VERIFY_FAILED"),
    "the certificate names another host": ("DROP tls_server_name", "not reachable"),
    "a client certificate from another CA": ("SET tls_cert_file '{rogue_client_cert}', "
                                             "SET tls_key_file '{rogue_client_key}'", "not reachable"),
    "a CA file that holds no certificate": ("SET tls_ca_file '{not_pem}'", "not reachable"),
    "a CA file that is not there": ("SET tls_ca_file '/nonexistent/ca.pem'",
                                    "cannot read the file of option tls_ca_file"),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_missing_or_wrong_piece_fails_the_query_and_says_what(conn, pg_dsn, tls_server, pki, case):
    change, words = BROKEN[case]
    not_pem = Path(pki["ca_cert"]).with_name("not-a-certificate.pem")
    not_pem.write_text("this is not PEM\n")
    not_pem.chmod(0o644)
    conn.execute(f"ALTER SERVER {tls_server} OPTIONS ({change.format(**pki, not_pem=not_pem)})")
    with psycopg.connect(pg_dsn, autocommit=True) as fresh:   # a backend with no channel yet
        with pytest.raises(psycopg.Error) as exc:
            fresh.execute(f"SELECT name FROM {tls_server}.models").fetchall()
        assert words in str(exc.value), str(exc.value)
        if words == "not reachable":   # over TCP that may be TLS: the hint says which options
            assert "tls_ca_file" in exc.value.diag.message_hint
        assert fresh.execute("SELECT 1").fetchone() == (1,)


def test_a_half_client_certificate_or_tls_without_a_ca_is_refused_at_ddl(conn, tls_server):
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="tls_key_file is missing"):
        conn.execute(f"ALTER SERVER {tls_server} OPTIONS (DROP tls_key_file)")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="needs tls_ca_file"):
        conn.execute(f"ALTER SERVER {tls_server} OPTIONS (DROP tls_ca_file)")
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="address is a Unix socket"):
        conn.execute(f"ALTER SERVER {tls_server} OPTIONS (SET address 'unix:///tmp/s.sock')")
    with pytest.raises(psycopg.errors.FdwInvalidOptionName, match="belongs on a foreign server"):
        conn.execute(f"ALTER USER MAPPING FOR CURRENT_USER SERVER {tls_server} OPTIONS (ADD tls_ca_file '/x')")


@pytest.mark.parametrize("args, says", [
    (("--tls-cert", "/nonexistent/cert.pem"), "TLS needs both --tls-cert and --tls-key"),
    (("--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"), "cannot read"),
    (("--tls-cert", "{cert}", "--tls-key", "{open_key}"), "a private key that every user may access (mode 0644)"),
])
def test_the_sidecar_refuses_incomplete_unreadable_or_open_tls_settings(args, says, pki, tmp_path):
    open_key = tmp_path / "open.key"
    shutil.copy(pki["ca_server_key"], open_key)
    open_key.chmod(0o644)
    args = [a.format(cert=pki["ca_server_cert"], open_key=open_key) for a in args]
    out = subprocess.run([sys.executable, "-m", "llm_sidecar.server", "--allow-root", "--listen",
                          "127.0.0.1:1", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and says in out.stderr, out.stderr


def test_a_client_key_every_user_may_read_is_refused(conn, pg_dsn, tls_server, pki, work_dir):
    folder = _folder(work_dir, "tls-open-")
    open_key = folder / "client.key"
    shutil.copy(pki["ca_client_key"], open_key)
    open_key.chmod(0o644)
    conn.execute(f"ALTER SERVER {tls_server} OPTIONS (SET tls_key_file '{open_key}')")
    with psycopg.connect(pg_dsn, autocommit=True) as fresh:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"every user of this host may access \(mode 0644\)"):
            fresh.execute(f"SELECT name FROM {tls_server}.models").fetchall()


def test_the_schema_script_sets_tls_before_it_imports_and_again_on_a_rerun(pg_server, tls_port, pki):
    """sql/llm_schema.sql with -v tls_ca_file=... (as the helm chart's DDL Job runs it): the
    options are set before IMPORT FOREIGN SCHEMA asks the sidecar, and a re-run SETs them."""
    database = "llmfdw_tls_ddl"
    embedded.create_database(pg_server, database)
    tls = {"tls_ca_file": pki["ca_cert"], "tls_cert_file": pki["ca_client_cert"],
           "tls_key_file": pki["ca_client_key"], "tls_server_name": SERVER_NAME}
    embedded.apply_schema(pg_server, database, f"127.0.0.1:{tls_port}", tls=tls)
    embedded.apply_schema(pg_server, database, f"127.0.0.1:{tls_port}", tls=tls)
    with psycopg.connect(pg_server.dsn(database), autocommit=True) as c:
        assert c.execute("SELECT name FROM llm.models").fetchall() == [(GEN,)]
        options = dict(o.split("=", 1) for o in c.execute(
            "SELECT srvoptions FROM pg_foreign_server WHERE srvname = 'llm_sidecar'").fetchone()[0])
    assert options == {"address": f"127.0.0.1:{tls_port}", **tls}


def test_renewed_certificates_are_used_without_a_restart(conn, pg_dsn, pki, work_dir):
    """The sidecar re-reads its files before a new connection's handshake when they changed; a
    backend replaces its channel when the server's files changed, at its next query."""
    folder = _folder(work_dir, "tls-renew-")
    files = {name: folder / f"{name}.pem" for name in ("cert", "key", "client_cert", "client_key")}

    def install(**sources: str) -> None:
        for name, source in sources.items():
            shutil.copy(pki[source], files[name])
            embedded.give_to_server_user(files[name])   # shutil.copy keeps the mode: keys stay 0600

    install(cert="ca_server_cert", key="ca_server_key", client_cert="ca_client_cert", client_key="ca_client_key")
    with tls_sidecar(folder, str(files["cert"]), str(files["key"]), pki["ca_cert"]) as port:
        conn.execute("DROP SERVER IF EXISTS tls_renew CASCADE")
        conn.execute(f"CREATE SERVER tls_renew FOREIGN DATA WRAPPER llmfdw OPTIONS (address '127.0.0.1:{port}', "
                     f"tls_ca_file '{pki['ca_cert']}', tls_cert_file '{files['client_cert']}', "
                     f"tls_key_file '{files['client_key']}', tls_server_name '{RENEWED_NAME}', timeout '30')")
        conn.execute("CREATE USER MAPPING FOR CURRENT_USER SERVER tls_renew")
        conn.execute("CREATE FOREIGN TABLE tls_renew_models (name text) SERVER tls_renew OPTIONS (table 'models')")
        try:
            with psycopg.connect(pg_dsn, autocommit=True) as backend:
                # the sidecar still shows the certificate for sidecar.test
                with pytest.raises(psycopg.Error, match="Hostname Verification Check failed"):
                    backend.execute("SELECT name FROM tls_renew_models").fetchall()
                install(cert="ca_renewed_cert", key="ca_renewed_key")
                assert backend.execute("SELECT name FROM tls_renew_models").fetchall() == [(GEN,)]
                # this backend's client certificate is replaced by one the sidecar does not accept:
                # its next query uses it (a new channel), and is refused
                install(client_cert="rogue_client_cert", client_key="rogue_client_key")
                with pytest.raises(psycopg.Error, match="not reachable"):
                    backend.execute("SELECT name FROM tls_renew_models").fetchall()
                install(client_cert="ca_client_cert", client_key="ca_client_key")
                assert backend.execute("SELECT name FROM tls_renew_models").fetchall() == [(GEN,)]
        finally:
            conn.execute("DROP SERVER tls_renew CASCADE")


def test_dev_certs_writes_a_ca_a_sidecar_pair_and_a_client_pair(tmp_path):
    from cryptography import x509

    out = subprocess.run([sys.executable, "-m", "deploy.dev_certs", str(tmp_path), "--name", "sidecar.internal",
                          "--ip", "10.0.0.5"], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    written = {Path(line).name for line in out.stdout.split()}
    assert written == {"ca.pem", "sidecar.pem", "sidecar.key", "client.pem", "client.key"}
    assert (tmp_path / "sidecar.key").stat().st_mode & 0o777 == 0o600
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    sidecar = x509.load_pem_x509_certificate((tmp_path / "sidecar.pem").read_bytes())
    sidecar.verify_directly_issued_by(ca)
    names = sidecar.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in names] == ["sidecar.internal", "10.0.0.5"]
