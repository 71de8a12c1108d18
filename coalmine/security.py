"""TLS and SASL for every Kafka client coalmine creates: one place that turns settings into
aiokafka keyword arguments (:func:`client_kwargs`) and Faust broker credentials.

Settings come from the broker URL and the environment (the command line's ``--ssl-*``,
``--sasl-*`` and ``--security-protocol`` options set the same variables, so that workers and
every client of one command agree):

=================================  ==============================================================
``SASL_SSL://host:9093``           the URL's scheme is the security protocol: ``SSL``,
                                   ``SASL_SSL``, ``SASL_PLAINTEXT`` or ``PLAINTEXT``
                                   (``kafka://``: none given)
``$COALMINE_SECURITY_PROTOCOL``    the protocol when the URL gives none
``$COALMINE_SSL_CAFILE``           CA certificates (PEM) to verify the brokers with (default:
                                   the system's)
``$COALMINE_SSL_CERTFILE``,        a client certificate and its key (PEM), for brokers that
``$COALMINE_SSL_KEYFILE``,         authenticate clients by certificate
``$COALMINE_SSL_KEY_PASSWORD``
``$COALMINE_SSL_CHECK_HOSTNAME``   ``0`` to accept a certificate issued to another name
``$COALMINE_SASL_MECHANISM``       ``PLAIN`` (default), ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``
``$COALMINE_SASL_USERNAME``,       credentials (also ``SASL_SSL://user:password@host:9093``)
``$COALMINE_SASL_PASSWORD``
=================================  ==============================================================

Without an explicit protocol, SASL credentials mean ``SASL_SSL`` and TLS files mean ``SSL``:
credentials are never sent in clear text unless ``SASL_PLAINTEXT`` is asked for by name.
Passwords never appear in a ``repr``, a log line or an error message (:func:`redact`).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
#: URL schemes that name no security protocol
PLAIN_SCHEMES = ("kafka",)

#: the environment variable of each setting (the command line's options set them too)
ENV = {
    "protocol": "COALMINE_SECURITY_PROTOCOL",
    "cafile": "COALMINE_SSL_CAFILE",
    "certfile": "COALMINE_SSL_CERTFILE",
    "keyfile": "COALMINE_SSL_KEYFILE",
    "key_password": "COALMINE_SSL_KEY_PASSWORD",
    "check_hostname": "COALMINE_SSL_CHECK_HOSTNAME",
    "mechanism": "COALMINE_SASL_MECHANISM",
    "username": "COALMINE_SASL_USERNAME",
    "password": "COALMINE_SASL_PASSWORD",
}


def split_url(url: str) -> tuple[str | None, str | None, str | None, str]:
    """``(scheme, user, password, hosts)`` of a broker URL; the scheme lower-cased.

    >>> split_url("SASL_SSL://alice:p%40ss@k1:9093,k2:9093")
    ('sasl_ssl', 'alice', 'p@ss', 'k1:9093,k2:9093')
    >>> split_url("localhost:9092")
    (None, None, None, 'localhost:9092')
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    user = password = None
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        name, has_password, secret = userinfo.partition(":")
        user, password = unquote(name), unquote(secret) if has_password else None
    return (scheme.lower() or None), user, password, rest


def redact(url: str) -> str:
    """The URL without its credentials, for messages.

    >>> redact("SASL_SSL://alice:s3cret@k1:9093"), redact("bob:pw@k1:9093"), redact("k1:9093")
    ('SASL_SSL://***@k1:9093', '***@k1:9093', 'k1:9093')
    """
    scheme, sep, rest = url.rpartition("://")
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"


@dataclass(frozen=True)
class Security:
    """How to talk to the brokers. Build it with :meth:`resolve`."""

    protocol: str = "PLAINTEXT"
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    key_password: str | None = field(default=None, repr=False)
    check_hostname: bool = True
    mechanism: str = "PLAIN"
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def resolve(cls, broker: str | None = None, env: Mapping[str, str] | None = None) -> Security:
        """The settings of ``broker`` (a URL, or ``host:port[,...]``) and the environment.

        >>> Security.resolve("kafka://k:9092", env={}).kafka_kwargs()
        {'security_protocol': 'PLAINTEXT'}
        >>> Security.resolve("kafka://k:9092", env={"COALMINE_SASL_USERNAME": "a",
        ...                  "COALMINE_SASL_PASSWORD": "b"}).protocol  # never in clear text
        'SASL_SSL'
        >>> Security.resolve("SASL_SSL://k:9093", env={})
        Traceback (most recent call last):
        ...
        ValueError: security protocol SASL_SSL needs a user name and a password: $COALMINE_SASL_USERNAME and $COALMINE_SASL_PASSWORD, or SASL_SSL://USER:PASSWORD@HOST:PORT
        """
        env = os.environ if env is None else env
        scheme, user, password, _ = split_url(broker or "")

        def get(name: str) -> str | None:
            return env.get(ENV[name]) or None

        protocol = None
        if scheme and scheme not in PLAIN_SCHEMES:
            protocol = scheme.upper()
        elif get("protocol"):
            protocol = str(get("protocol")).upper()
        username, password = user or get("username"), password or get("password")
        files = {k: get(k) for k in ("cafile", "certfile", "keyfile")}
        if protocol is None:
            protocol = "SASL_SSL" if username else "SSL" if any(files.values()) else "PLAINTEXT"
        if protocol not in PROTOCOLS:
            raise ValueError(
                f"security protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}"
            )
        mechanism = str(get("mechanism") or "PLAIN").upper()
        if protocol.startswith("SASL_"):
            if mechanism not in MECHANISMS:
                raise ValueError(
                    f"${ENV['mechanism']} {mechanism!r}: expected one of {', '.join(MECHANISMS)}"
                )
            if not (username and password):
                raise ValueError(
                    f"security protocol {protocol} needs a user name and a password: "
                    f"${ENV['username']} and ${ENV['password']}, or "
                    f"{protocol}://USER:PASSWORD@HOST:PORT"
                )
        for name, path in files.items():
            if path and not Path(path).is_file():
                raise ValueError(f"${ENV[name]}: no such file: {path}")
        if files["keyfile"] and not files["certfile"]:
            raise ValueError(f"${ENV['keyfile']} goes with ${ENV['certfile']}")
        return cls(
            protocol=protocol,
            cafile=files["cafile"],
            certfile=files["certfile"],
            keyfile=files["keyfile"],
            key_password=get("key_password"),
            check_hostname=(get("check_hostname") or "1").lower() not in ("0", "false", "no"),
            mechanism=mechanism,
            username=username if protocol.startswith("SASL_") else None,
            password=password if protocol.startswith("SASL_") else None,
        )

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """The client's TLS context (the system's CAs unless a CA file is given), or None."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=self.cafile)
        context.check_hostname = self.check_hostname
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile, password=self.key_password)
        return context

    def kafka_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for any aiokafka client (producer, consumer, admin)."""
        out: dict[str, Any] = {"security_protocol": self.protocol}
        if self.tls:
            out["ssl_context"] = self.ssl_context()
        if self.protocol.startswith("SASL_"):
            out.update(
                sasl_mechanism=self.mechanism,
                sasl_plain_username=self.username,
                sasl_plain_password=self.password,
            )
        return out

    def faust_credentials(self) -> Any:
        """Faust's ``broker_credentials`` for these settings (None for plain text)."""
        import faust

        if self.protocol.startswith("SASL_"):
            credentials = faust.SASLCredentials(
                username=self.username,
                password=self.password,
                ssl_context=self.ssl_context(),
                mechanism=self.mechanism,
            )
            if not self.tls:  # Faust infers SASL_SSL from the context: say plain text is meant
                credentials.protocol = faust.types.auth.AuthProtocol.SASL_PLAINTEXT
            return credentials
        if self.tls:
            return faust.SSLCredentials(self.ssl_context())
        return None


def client_kwargs(broker: str | None = None) -> dict[str, Any]:
    """aiokafka keyword arguments for ``broker`` (a URL or bootstrap string) and the
    environment: what every client coalmine creates is given."""
    return Security.resolve(broker).kafka_kwargs()


def export_options(broker: str | None, options: Mapping[str, str | None]) -> None:
    """Put the command line's security options (setting name -> value) and the protocol and
    credentials of a broker URL into the environment, where every client of this process, and
    the workers it starts, find them (a client given only ``host:port`` knows no scheme)."""
    scheme, user, password, _ = split_url(broker or "")
    values = dict(options)
    if scheme and scheme not in PLAIN_SCHEMES:
        values["protocol"] = scheme.upper()
    values.update(username=user or values.get("username"), password=password)
    for name, value in values.items():
        if value is not None:
            os.environ[ENV[name]] = value
    Security.resolve(broker)  # fail now, with the setting's name, not in a client later


def explain_failure(broker: str, security: Security | None = None, timeout: float = 5.0) -> str:
    """Why a TLS connection to the first broker of ``broker`` fails, in words ('' when the
    handshake works or TLS is not used): aiokafka reports only that it could not connect."""
    import socket

    security = security or Security.resolve(broker)
    context = security.ssl_context()
    if context is None:
        return ""
    first = split_url(broker)[3].split(",")[0].strip()
    host, _, port = first.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                return ""
    except ssl.SSLCertVerificationError as exc:
        ca = security.cafile or "the system's CA certificates"
        return f"TLS: the certificate of {first} does not verify against {ca}: {exc.verify_message}"
    except ssl.SSLError as exc:
        return f"TLS handshake with {first} failed: {exc.reason or exc}"
    except OSError as exc:
        return f"cannot connect to {first}: {exc.strerror or exc}"
