"""TLS for one registry: the system CAs plus the ``certs.d`` directories podman and docker use.

For ``HOST:PORT``, every ``*.crt`` in ``/etc/containers/certs.d/HOST:PORT/`` and
``/etc/docker/certs.d/HOST:PORT/`` (and in ``--cert-dir``) is trusted as a CA, and a ``NAME.cert``
with its ``NAME.key`` is the client certificate for mutual TLS, as containers-certs.d(5) says.
Verification is on unless ``--tls-verify=false``, which also allows plain HTTP.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from .reference import RegistryError

log = logging.getLogger(__name__)

CERTS_D = (Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))


def cert_dirs(host: str, cert_dir: str | None) -> list[Path]:
    """The directories whose certificates apply to HOST (``host:port``), --cert-dir first."""
    dirs = [Path(cert_dir)] if cert_dir else []
    dirs.extend(base / host for base in CERTS_D)
    return [d for d in dirs if d.is_dir()]


def ssl_context(host: str, cert_dir: str | None, verify: bool) -> ssl.SSLContext:
    """The context for HOST: system CAs + certs.d CAs + client cert; or no verification at all."""
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context()
    for directory in cert_dirs(host, cert_dir):
        try:
            for ca in sorted(directory.glob("*.crt")):
                log.debug("trusting %s for %s", ca, host)
                context.load_verify_locations(cafile=str(ca))
            for cert in sorted(directory.glob("*.cert")):
                key = cert.with_suffix(".key")
                if not key.exists():
                    raise RegistryError(f"{host}: client certificate {cert} has no key {key}")
                context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise RegistryError(f"{host}: cannot use the certificates in {directory}: {exc}") from None
    return context
