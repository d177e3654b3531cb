"""Mutual TLS between agents: the cluster CA, host certificates, and the SSL contexts.

Trust model (docs/SECURITY.md): one cluster CA signs one certificate per
agent; the certificate's name (its CN, repeated as a DNS SAN) is the agent's
name. Both ends require a certificate from that CA (TLS 1.3 only), and both
check that the name in the peer's certificate is the name the peer gives in
its Hello / Welcome. Any holder of a certificate from the CA is a member of
the cluster; there is no revocation list (to remove a host, rotate the CA).

Certificates are made by the ``openssl`` command (OpenSSL 3.0, on every host
and in CI): the stdlib ``ssl`` module verifies certificates but cannot create
them, and livemig takes no Python dependency for it. ``ca_init`` and
``issue_cert`` back ``livemig ca init`` and ``livemig cert issue``.

This module has no event loop: the config loader imports it to check the
credentials at load.
"""
from __future__ import annotations

import functools
import os
import re
import secrets
import shutil
import ssl
import subprocess
import tempfile
from dataclasses import dataclass

from agent.errors import AgentError, ConfigError

OPENSSL = "openssl"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
HOST_CERT = "host.crt"
HOST_KEY = "host.key"
CA_DAYS = 3650
HOST_DAYS = 825
OPENSSL_TIMEOUT_S = 30.0
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")   # agent names (agent.daemon.config.NAME_RE)

# A self-contained openssl config, so the result does not depend on the
# distribution's openssl.cnf. NAME is substituted (it matches NAME_RE).
_OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = {name}
[v3_ca]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[v3_host]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth,clientAuth
subjectAltName = DNS:{name}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid,issuer
"""


class TlsError(AgentError):
    """Creating or loading certificates failed."""


class PeerIdentityError(AgentError):
    """The peer's certificate does not name an agent (or not the one it says it is)."""


@dataclass(frozen=True)
class CertInfo:
    name: str
    not_after: str
    serial: str
    issuer: str


# ---- making the CA and host certificates (openssl) ---------------------------------
def _openssl(args: list[str], cwd: str) -> None:
    exe = shutil.which(OPENSSL)
    if exe is None:
        raise TlsError("the `openssl` command is not installed (needed to create certificates)")
    try:
        r = subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise TlsError(f"openssl {args[0]} did not finish in {OPENSSL_TIMEOUT_S:.0f} s") from exc
    if r.returncode != 0:
        raise TlsError(f"openssl {args[0]} failed: {r.stderr.strip()[-500:]}")


def _check_name(name: str, what: str) -> None:
    if NAME_RE.fullmatch(name) is None:
        raise TlsError(f"{what} {name!r} is not 1-64 of A-Z a-z 0-9 _ -")


def _write_cnf(workdir: str, name: str) -> str:
    path = os.path.join(workdir, "openssl.cnf")
    with open(path, "w") as f:
        f.write(_OPENSSL_CNF.format(name=name))
    return path


def ca_init(directory: str, name: str = "livemig-ca", days: int = CA_DAYS) -> str:
    """Create a cluster CA in ``directory`` (ca.crt, ca.key mode 0600); returns the certificate path.
    Refuses to overwrite an existing CA key."""
    _check_name(name, "CA name")
    directory = os.path.abspath(directory)
    key = os.path.join(directory, CA_KEY)
    if os.path.exists(key):
        raise TlsError(f"{key} exists: a CA is already there (remove it first to make a new one)")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    old = os.umask(0o077)
    try:
        with tempfile.TemporaryDirectory(prefix="livemig-ca-") as tmp:
            cnf = _write_cnf(tmp, name)
            _openssl(["req", "-x509", "-new", "-config", cnf, "-extensions", "v3_ca",
                      "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                      "-keyout", os.path.join(tmp, CA_KEY), "-out", os.path.join(tmp, CA_CERT),
                      "-days", str(days), "-set_serial", f"0x{secrets.token_hex(16)}"], tmp)
            os.replace(os.path.join(tmp, CA_KEY), key)
            os.replace(os.path.join(tmp, CA_CERT), os.path.join(directory, CA_CERT))
    finally:
        os.umask(old)
    os.chmod(os.path.join(directory, CA_CERT), 0o644)
    return os.path.join(directory, CA_CERT)


def issue_cert(name: str, ca_dir: str, out_dir: str, days: int = HOST_DAYS, force: bool = False) -> dict[str, str]:
    """Issue a host certificate for agent ``name``, signed by the CA in ``ca_dir``.
    Writes host.crt, host.key (0600) and a copy of ca.crt to ``out_dir``: the
    default security.* paths when ``out_dir`` is /etc/livemig/tls."""
    _check_name(name, "agent name")
    ca_dir, out_dir = os.path.abspath(ca_dir), os.path.abspath(out_dir)
    ca_cert, ca_key = os.path.join(ca_dir, CA_CERT), os.path.join(ca_dir, CA_KEY)
    for p in (ca_cert, ca_key):
        if not os.path.isfile(p):
            raise TlsError(f"{p}: no such file (is {ca_dir} a CA made by `livemig ca init`?)")
    out = {"cert_file": os.path.join(out_dir, HOST_CERT), "key_file": os.path.join(out_dir, HOST_KEY),
           "ca_file": os.path.join(out_dir, CA_CERT)}
    if not force and os.path.exists(out["key_file"]):
        raise TlsError(f"{out['key_file']} exists (--force replaces it)")
    os.makedirs(out_dir, mode=0o700, exist_ok=True)
    old = os.umask(0o077)
    try:
        with tempfile.TemporaryDirectory(prefix="livemig-cert-") as tmp:
            cnf = _write_cnf(tmp, name)
            csr, key, crt = (os.path.join(tmp, n) for n in ("host.csr", HOST_KEY, HOST_CERT))
            _openssl(["req", "-new", "-config", cnf, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-keyout", key, "-out", csr], tmp)
            _openssl(["x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key,
                      "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(days),
                      "-extfile", cnf, "-extensions", "v3_host", "-out", crt], tmp)
            os.replace(key, out["key_file"])
            os.replace(crt, out["cert_file"])
            if os.path.abspath(out["ca_file"]) != ca_cert:
                shutil.copyfile(ca_cert, out["ca_file"] + ".tmp")
                os.replace(out["ca_file"] + ".tmp", out["ca_file"])
    finally:
        os.umask(old)
    os.chmod(out["cert_file"], 0o644)
    os.chmod(out["ca_file"], 0o644)
    return out


# ---- reading certificates --------------------------------------------------------
def _name_of(cert: dict) -> str:
    """The agent name a decoded certificate (``getpeercert()`` form) stands for:
    its CN, which must also be one of its DNS SANs."""
    cns = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    if len(cns) != 1:
        raise PeerIdentityError(f"certificate has {len(cns)} common names, expected 1")
    name = cns[0]
    sans = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    if name not in sans:
        raise PeerIdentityError(f"certificate CN {name!r} is not among its DNS names {sans}")
    if NAME_RE.fullmatch(name) is None:
        raise PeerIdentityError(f"certificate names {name!r}, which is not an agent name")
    return name


def decode_cert_file(path: str) -> dict:
    """A PEM certificate file as ``getpeercert()`` would show it."""
    try:
        return ssl._ssl._test_decode_cert(path)     # the stdlib's own decoder; no public equivalent
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"{path}: not a readable PEM certificate ({exc})") from exc


def cert_info(path: str) -> CertInfo:
    c = decode_cert_file(path)
    issuer = ",".join(f"{k}={v}" for rdn in c.get("issuer", ()) for k, v in rdn)
    return CertInfo(name=_name_of(c), not_after=c.get("notAfter", ""), serial=c.get("serialNumber", ""),
                    issuer=issuer)


def peer_identity(ssl_object) -> str:
    """The verified peer's agent name (the handshake already checked the chain)."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        raise PeerIdentityError("the peer presented no certificate")
    return _name_of(cert)


# ---- SSL contexts ----------------------------------------------------------------
def _common(ctx: ssl.SSLContext, sec) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cafile=sec.ca_file)      # this cluster's CA only, never the system store
    ctx.load_cert_chain(sec.cert_file, sec.key_file)
    return ctx


@functools.lru_cache(maxsize=8)
def server_context(sec) -> ssl.SSLContext:
    """Accepting side: requires a client certificate from the cluster CA."""
    ctx = _common(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), sec)
    ctx.num_tickets = 0            # a few connections per migration (control + data streams): full handshakes, no tickets
    return ctx


@functools.lru_cache(maxsize=8)
def client_context(sec) -> ssl.SSLContext:
    """Connecting side. Destinations are named by address, so no host name is
    checked here; the caller compares the certificate's name with Welcome.agent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    return _common(ctx, sec)


def check_credentials(sec, agent_name: str) -> None:
    """At config load: the three files exist, load, match, and the certificate
    names this agent. Raises ConfigError naming the key at fault."""
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(sec, key)
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            why = "no such file" if not os.path.exists(path) else "not a readable file"
            raise ConfigError(f"security.{key}: {path}: {why} (make it with `livemig cert issue {agent_name} "
                              f"--ca CA_DIR --out DIR`, or set security.mode = \"insecure\")")
    try:
        ssl.create_default_context(cafile=sec.ca_file)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"security.ca_file: {sec.ca_file}: not a PEM CA certificate ({exc})") from exc
    try:
        info = cert_info(sec.cert_file)
    except (TlsError, PeerIdentityError) as exc:
        raise ConfigError(f"security.cert_file: {exc}") from exc
    if info.name != agent_name:
        raise ConfigError(f"security.cert_file: {sec.cert_file} is for agent {info.name!r}, "
                          f"not for agent.name {agent_name!r}")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(sec.cert_file, sec.key_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"security.key_file: {sec.key_file} does not load with security.cert_file "
                          f"({exc.reason or exc})") from exc
    try:
        _verify_chain(sec)
    except ssl.SSLError as exc:
        raise ConfigError(f"security.cert_file: {sec.cert_file} is not signed by security.ca_file "
                          f"{sec.ca_file} ({exc.reason or exc})") from exc


def _verify_chain(sec) -> None:
    """Prove the certificate chains to the CA: a TLS handshake with ourselves in memory."""
    server, client = server_context.__wrapped__(sec), client_context.__wrapped__(sec)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_side=False)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done = [False, False]
    for _ in range(10):
        for i, (obj, inb, outb, peer_in) in enumerate(((c, c_in, c_out, s_in), (s, s_in, s_out, c_in))):
            if not done[i]:
                try:
                    obj.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
            data = outb.read()
            if data:
                peer_in.write(data)
        if all(done):
            return
    raise ssl.SSLError("handshake with own certificate did not complete")
