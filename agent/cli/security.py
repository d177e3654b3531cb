"""``livemig ca init`` and ``livemig cert issue``: the cluster CA and host certificates.

Both run the ``openssl`` command (OpenSSL 3.0; the stdlib cannot create
certificates) through ``agent.net.tls``. A new lab of two hosts needs::

    livemig ca init ./lab-ca                                  # once, on an admin machine
    livemig cert issue host-a --ca ./lab-ca --out ./host-a    # copy ./host-a to host-a:/etc/livemig/tls
    livemig cert issue host-b --ca ./lab-ca --out ./host-b    # copy ./host-b to host-b:/etc/livemig/tls

``--out /etc/livemig/tls`` writes the files where the default config looks
for them (security.ca_file, cert_file, key_file). Keep the CA's key off the
agents' hosts: whoever holds it can make a certificate for any agent name.
"""
from __future__ import annotations

from agent.cli.parser import number_in
from agent.cli.exits import EXIT_OK, CliError
from agent.cli.output import emit


def cmd_ca_init(ns) -> int:
    from agent.net.tls import TlsError, ca_init

    try:
        path = ca_init(ns.dir, name=ns.name, days=ns.days)
    except TlsError as exc:
        raise CliError(str(exc)) from exc
    r = {"ca_file": path, "ca_key": path[: -len("ca.crt")] + "ca.key", "name": ns.name, "days": ns.days}
    emit(ns, r, f"created CA {ns.name!r}: {r['ca_file']} (key {r['ca_key']}, mode 0600: keep it off the agents)")
    return EXIT_OK


def cmd_cert_issue(ns) -> int:
    from agent.net.tls import PeerIdentityError, TlsError, cert_info, issue_cert

    try:
        files = issue_cert(ns.name, ns.ca, ns.out, days=ns.days, force=ns.force)
        info = cert_info(files["cert_file"])
    except (TlsError, PeerIdentityError) as exc:
        raise CliError(str(exc)) from exc
    r = {**files, "name": info.name, "not_after": info.not_after, "serial": info.serial}
    lines = [f"issued a certificate for agent {info.name!r} (valid until {info.not_after})"]
    lines += [f"  security.{k:9} = {files[k]!r}" for k in ("ca_file", "cert_file", "key_file")]
    emit(ns, r, "\n".join(lines))
    return EXIT_OK


_days = number_in(int, 1, 36500, "a number of days")


def register(sub, command) -> None:
    ca = command(sub, "ca", None, "the cluster certificate authority (mutual TLS between agents)")
    ca_sub = ca.add_subparsers(dest="cacmd", required=True, metavar="COMMAND")
    init = command(ca_sub, "init", cmd_ca_init, "create a cluster CA in DIR (ca.crt, ca.key); runs openssl")
    init.add_argument("dir", metavar="DIR", help="directory for the CA (created; e.g. ./lab-ca)")
    init.add_argument("--name", default="livemig-ca", help="the CA's common name (default livemig-ca)")
    init.add_argument("--days", type=_days, default=3650, help="validity in days (default 3650)")
    init.add_argument("--json", action="store_true", help="print the result as JSON")
    cert = command(sub, "cert", None, "host certificates for agents")
    cert_sub = cert.add_subparsers(dest="certcmd", required=True, metavar="COMMAND")
    iss = command(cert_sub, "issue", cmd_cert_issue,
                  "issue a certificate for agent NAME (CN and DNS SAN = NAME), signed by the CA; runs openssl")
    iss.add_argument("name", metavar="NAME", help="the agent's name (its agent.name / --name; e.g. host-a)")
    iss.add_argument("--ca", required=True, metavar="DIR", help="the CA directory made by 'livemig ca init'")
    iss.add_argument("--out", required=True, metavar="DIR",
                     help="where host.crt, host.key and ca.crt go (e.g. /etc/livemig/tls, the default paths)")
    iss.add_argument("--days", type=_days, default=825, help="validity in days (default 825)")
    iss.add_argument("--force", action="store_true", help="replace an existing host.key/host.crt in --out")
    iss.add_argument("--json", action="store_true", help="print the result as JSON")
