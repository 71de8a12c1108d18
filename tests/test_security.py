"""TLS and SASL settings reach every client, a security protocol in the URL is never dropped,
credentials never show in an error, and TLS works for real: a TLS-terminating proxy (with a
CA of the test's own, asking for a client certificate) in front of the embedded broker."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import faust
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from coalmine import simulator, topics
from coalmine.broker import EmbeddedBroker, ensure_topics, free_port, parse_broker_url
from coalmine.client import Publisher, tail
from coalmine.launch import Namespace, wait_until
from coalmine.security import ENV, Security, client_kwargs
from coalmine.signing import Verifier, generate_ed25519

# ------------------------------------------------------------------ settings (no broker)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV.values():
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_the_urls_security_protocol_is_kept(clean_env):
    clean_env.setenv("COALMINE_SASL_MECHANISM", "scram-sha-512")
    kwargs = client_kwargs("SASL_SSL://alice:s3cret@k1:9093")
    assert kwargs["security_protocol"] == "SASL_SSL"  # was: silently plaintext
    assert isinstance(kwargs["ssl_context"], ssl.SSLContext)
    assert kwargs["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kwargs["sasl_plain_username"], kwargs["sasl_plain_password"]) == ("alice", "s3cret")
    assert client_kwargs("kafka://k1:9092") == {"security_protocol": "PLAINTEXT"}


def test_environment_settings_and_never_clear_text_credentials(clean_env, tmp_path):
    clean_env.setenv("COALMINE_SASL_USERNAME", "alice")
    clean_env.setenv("COALMINE_SASL_PASSWORD", "s3cret")
    assert Security.resolve("k1:9093").protocol == "SASL_SSL"
    clean_env.setenv("COALMINE_SECURITY_PROTOCOL", "sasl_plaintext")  # only when asked by name
    assert client_kwargs("k1:9093")["security_protocol"] == "SASL_PLAINTEXT"
    assert "s3cret" not in repr(Security.resolve("k1:9093"))
    clean_env.setenv("COALMINE_SSL_CAFILE", str(tmp_path / "missing.pem"))
    with pytest.raises(ValueError, match=r"\$COALMINE_SSL_CAFILE: no such file"):
        Security.resolve("ssl://k1:9093")


def test_faust_gets_the_same_credentials(clean_env):
    sasl = Security.resolve("SASL_SSL://alice:s3cret@k1:9093").faust_credentials()
    assert isinstance(sasl, faust.SASLCredentials) and sasl.protocol.value == "SASL_SSL"
    clean_env.setenv("COALMINE_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    plain = Security.resolve("alice:s3cret@k1:9093").faust_credentials()
    assert plain.protocol.value == "SASL_PLAINTEXT" and plain.username == "alice"
    assert isinstance(Security.resolve("ssl://k1:9093").faust_credentials(), faust.SSLCredentials)


def test_credentials_in_the_url_never_show_in_an_error(clean_env):
    with pytest.raises(ValueError) as caught:
        parse_broker_url("SASL_SSL://alice:s3cret@k1")
    assert "s3cret" not in str(caught.value) and "alice" not in str(caught.value)
    port = free_port()  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "coalmine", "status"]
        + ["--broker", f"SASL_PLAINTEXT://alice:s3cret@127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ENV.values()},
    )
    assert done.returncode != 0
    assert "cannot reach the broker at SASL_PLAINTEXT://***@127.0.0.1" in done.stderr, done.stderr
    assert "s3cret" not in done.stderr + done.stdout


# ------------------------------------------------------------------ TLS for real


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(subject: str, key, issuer: str, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    else:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, *objects) -> str:
    data = b""
    for o in objects:
        if isinstance(o, x509.Certificate):
            data += o.public_bytes(serialization.Encoding.PEM)
        else:
            data += o.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
    path.write_bytes(data)
    return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A CA, a server and a client certificate it signed, and an unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _certificate("coalmine test CA", ca_key, "coalmine test CA", ca_key, ca=True)
    other = _certificate("another CA", other_key, "another CA", other_key, ca=True)
    server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    server = _certificate("localhost", server_key, "coalmine test CA", ca_key, ca=False)
    client = _certificate("coalmine client", client_key, "coalmine test CA", ca_key, ca=False)
    return {
        "ca": _write(d / "ca.pem", ca),
        "other_ca": _write(d / "other-ca.pem", other),
        "server": _write(d / "server.pem", server, server_key),
        "client_cert": _write(d / "client.pem", client),
        "client_key": _write(d / "client.key", client_key),
    }


class TLSProxy:
    """Terminates TLS (with a client certificate required) on ``port`` and forwards the bytes
    to a plain-text port, in a thread of its own."""

    def __init__(self, target_port: int, certfile: str, cafile: str):
        self.port, self.target = free_port(), target_port
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=cafile)
        context.load_cert_chain(certfile)
        context.verify_mode = ssl.CERT_REQUIRED
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=context)
        )
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _handle(self, reader, writer) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return

        async def pipe(r, w) -> None:
            try:
                while data := await r.read(1 << 16):
                    w.write(data)
                    await w.drain()
            except OSError:  # a side closed: so does the other
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def tls_broker(pki):
    """The embedded broker, reachable only through TLS (it advertises the proxy's port)."""
    plain = free_port()
    proxy = TLSProxy(plain, pki["server"], pki["ca"])
    client = Security(
        protocol="SSL", cafile=pki["ca"], certfile=pki["client_cert"], keyfile=pki["client_key"]
    )
    broker = EmbeddedBroker(port=plain, advertised=f"127.0.0.1:{proxy.port}", security=client)
    try:
        with broker:
            yield broker
    finally:
        proxy.stop()


def test_clients_talk_to_the_broker_through_tls_with_a_client_certificate(
    tls_broker, pki, clean_env
):
    clean_env.setenv("COALMINE_SSL_CAFILE", pki["ca"])
    clean_env.setenv("COALMINE_SSL_CERTFILE", pki["client_cert"])
    clean_env.setenv("COALMINE_SSL_KEYFILE", pki["client_key"])
    url = f"ssl://{tls_broker.bootstrap}"
    topic = "tls.coalmine.commands"

    async def roundtrip() -> list[dict]:
        await ensure_topics(url, {topic: 1})
        async with Publisher(url) as pub:
            await pub.publish(topic, {"model": "m", "n": 1})
        return [r async for r in tail(url, topic, until_idle=1.0)]

    assert asyncio.run(roundtrip()) == [{"model": "m", "n": 1}]


def test_a_wrong_ca_fails_with_a_clear_error(tls_broker, pki):
    env = {k: v for k, v in os.environ.items() if k not in ENV.values()}
    done = subprocess.run(
        [sys.executable, "-m", "coalmine", "tail", "commands", "--until-idle", "1"]
        + ["--broker", f"ssl://{tls_broker.bootstrap}", "--ssl-cafile", pki["other_ca"]],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert f"TLS: the certificate of {tls_broker.bootstrap} does not verify against" in done.stderr
    assert pki["other_ca"] in done.stderr and "certificate" in done.stderr.rsplit(": ", 1)[1]


def test_plain_text_to_a_tls_port_is_not_silent(tls_broker):
    """Without TLS settings the client must not appear to work against a TLS listener."""
    assert topics.COMMANDS  # the CLI's default topic exists only through TLS

    async def connect():
        async with Publisher(f"kafka://{tls_broker.bootstrap}"):
            pass

    with pytest.raises(Exception, match="(?i)unable to bootstrap|connect"):
        asyncio.run(asyncio.wait_for(connect(), 60))


class _OverTLS:
    """The TLS broker as :class:`~coalmine.launch.Namespace` sees a broker: every client it
    makes (topic creation, publisher, tail, the worker) is given the ``ssl://`` URL."""

    def __init__(self, broker: EmbeddedBroker):
        self.bootstrap = self.url = f"ssl://{broker.bootstrap}"


@pytest.mark.integration
def test_a_worker_runs_end_to_end_over_tls(tls_broker, pki, clean_env, tmp_path):
    """Events in, evaluations, signed alerts and a command out, every client of the test and
    of the worker (stage 1, the Faust app, its state topic) through the TLS listener."""
    for name, path in (("CAFILE", "ca"), ("CERTFILE", "client_cert"), ("KEYFILE", "client_key")):
        clean_env.setenv(f"COALMINE_SSL_{name}", pki[path])  # the worker inherits them
    simulator.write_reference(tmp_path / "reference.jsonl", n=5000)
    simulator.write_demo_config(
        tmp_path / "monitor.toml", tmp_path / "reference.jsonl", window="10s", rollout=True
    )
    private, public = generate_ed25519()
    ns = Namespace(_OverTLS(tls_broker))
    worker = ns.worker(
        tmp_path / "monitor.toml",
        log=tmp_path / "worker.log",
        env={"COALMINE_SIGNING_KEY": private},
        args=("--publish-evaluations",),
    )
    with worker:
        worker.wait_ready()
        serving = simulator.Serving(
            simulator.Version("v1"),
            canary=simulator.Version("v3", noise=1.5, error_rate=0.10),
            canary_weight=10,
        )
        rate = 300
        ns.publish(serving.events(0, 30 * rate, simulator.Scenario().start_ts_ms, rate, seed=8))

        # /metrics may be slow to answer on a busy machine: then ask again
        wait_until(
            lambda: worker.metric("coalmine_commands_total", busy=0) >= 1,
            120,
            "a command",
            interval=0.5,
        )
        assert worker.metric("coalmine_events_total") > 0
        evaluations, alerts = ns.read("evaluations"), ns.read("alerts")
        commands = ns.read("commands")
    assert evaluations and all(e["model"] == "shuttle" for e in evaluations)
    assert [(c["action"], c["version"]) for c in commands] == [("rollback", "v3")]
    firing = [a for a in alerts if a["state"] == "firing"]
    assert any(a["check"] == "canary_health" for a in firing), alerts
    verifier = Verifier.parse(public, clock=None, kind="alert")
    assert [verifier.check(a) for a in alerts] == [None] * len(alerts)


def test_a_plain_text_client_to_the_tls_port_fails_clearly_without_secrets(tls_broker):
    """SASL over plain text, as asked by name, to a TLS listener: an error, without the
    password of the URL or of the environment."""
    env = {k: v for k, v in os.environ.items() if k not in ENV.values()}
    env["COALMINE_SASL_PASSWORD"] = "s3cret-env"
    done = subprocess.run(
        [sys.executable, "-m", "coalmine", "tail", "alerts", "--until-idle", "1"]
        + ["--broker", f"SASL_PLAINTEXT://alice:s3cret@{tls_broker.bootstrap}"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert f"cannot reach the broker at SASL_PLAINTEXT://***@{tls_broker.bootstrap}" in (
        done.stderr
    ), done.stderr
    assert "s3cret" not in done.stderr + done.stdout
