"""Signed rollout commands and alerts, so that a router acts only on commands, and a
subscriber believes only alerts, from a holder of the key.

Two algorithms, over a record's canonical JSON (every field but ``signature``, keys sorted):
the signature is an envelope around the record, which stays as it is unsigned (its id too).

* Ed25519 (recommended): the worker holds the private key, subscribers (routers, ``coalmine
  status``, ``coalmine tail``) only the public key, so no subscriber can forge a command. The
  signature is 128 lowercase hex digits.
* HMAC-SHA256: one shared secret for signers and verifiers; 64 lowercase hex digits.

Keys come from the environment: ``$COALMINE_SIGNING_KEY`` signs (``ed25519:<64 hex digits of
the private key>``, or ``hmac:<secret>``; any other value is an HMAC secret, as before
Ed25519), ``$COALMINE_VERIFY_KEY`` verifies (``ed25519:<64 hex digits of the public key>`` or an
HMAC secret; without it the signing key's own verifier is used). ``python -m coalmine.signing``
prints a new Ed25519 key pair. The statistics in :mod:`coalmine.streams` take the signer as an
argument and never read the environment.

A signature alone does not stop an attacker who re-publishes a genuine old command (a
``rollback``, say) or alert (a ``resolved`` that hides a firing). The :class:`Verifier`
(one per topic: ``kind`` "command" or "alert") therefore also checks, from fields inside the
signed body, so that replays of a topic stay deterministic:

* the sequence: per model, a record's ``(ts, command_id)`` (``(ts, alert_id)`` for an alert)
  must come after the last one it accepted (a later ``ts``, or the same ``ts`` with an id not
  seen at that ``ts``). Stage 2 evaluates a model's buckets in order, so its commands and
  alerts come in that order; an alert that resolves and fires again does so at a later ``ts``,
  under a new id;
* the expiry, for live consumers: a record is void once the wall clock passes its ``ts`` plus
  ``$COALMINE_COMMAND_VALIDITY_S`` (default one hour). Reading history (``coalmine status``)
  checks signatures and sequence, not expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import Callable

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

#: how long a command may be obeyed after its ts, unless ``$COALMINE_COMMAND_VALIDITY_S`` says
DEFAULT_VALIDITY_S = 3600.0
_ED25519 = "ed25519:"
_HMAC = "hmac:"


def canonical(command: dict) -> bytes:
    """The bytes a signature covers: every field but ``signature``, keys sorted."""
    return orjson.dumps(
        {k: v for k, v in command.items() if k != "signature"}, option=orjson.OPT_SORT_KEYS
    )


def sign_command(command: dict, key: bytes) -> dict:
    """HMAC-SHA256 (hex) over the canonical JSON.

    >>> cmd = sign_command({"command_id": "c1", "action": "rollback"}, b"k")
    >>> verify_command(cmd, b"k"), verify_command({**cmd, "action": "promote"}, b"k")
    (True, False)
    """
    return {**command, "signature": hmac.new(key, canonical(command), hashlib.sha256).hexdigest()}


def verify_command(command: dict, key: bytes) -> bool:
    """Whether the command carries a valid HMAC-SHA256 signature with ``key``."""
    signature = command.get("signature")
    if not isinstance(signature, str):
        return False
    expected = hmac.new(key, canonical(command), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, signature)


def generate_ed25519() -> tuple[str, str]:
    """A new key pair as ``($COALMINE_SIGNING_KEY, $COALMINE_VERIFY_KEY)`` values."""
    private = Ed25519PrivateKey.generate()
    return _ED25519 + private.private_bytes_raw().hex(), _ED25519 + _public_hex(private)


def _public_hex(private: Ed25519PrivateKey) -> str:
    return private.public_key().public_bytes_raw().hex()


def _key_bytes(text: str, name: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        # never the value itself: it is a secret (or half of a pair)
        raise ValueError(f"${name}: an ed25519 key is 'ed25519:' and 64 hex digits")
    return raw


class Signer:
    """Signs commands and alerts with one key: ``signer(record)`` returns the record with its
    ``signature``. ``key`` is an HMAC secret (bytes) or an Ed25519 private key.

    >>> private, public = generate_ed25519()
    >>> signed = Signer.parse(private)({"command_id": "c", "ts": 1, "model": "m"})
    >>> Verifier.parse(public, clock=None).check(signed) is None  # no clock: no expiry
    True
    """

    def __init__(self, key: bytes | Ed25519PrivateKey):
        self.key = key

    @classmethod
    def parse(cls, text: str) -> Signer:
        """A signer from a ``$COALMINE_SIGNING_KEY`` value."""
        if text.startswith(_ED25519):
            seed = _key_bytes(text[len(_ED25519) :], "COALMINE_SIGNING_KEY")
            return cls(Ed25519PrivateKey.from_private_bytes(seed))
        return cls(text.removeprefix(_HMAC).encode())

    @classmethod
    def from_env(cls) -> Signer | None:
        """A signer with ``$COALMINE_SIGNING_KEY``, or None when it is not set."""
        key = os.environ.get("COALMINE_SIGNING_KEY")
        return cls.parse(key) if key else None

    @property
    def algorithm(self) -> str:
        return "ed25519" if isinstance(self.key, Ed25519PrivateKey) else "hmac-sha256"

    def __call__(self, command: dict) -> dict:
        if isinstance(self.key, Ed25519PrivateKey):
            return {**command, "signature": self.key.sign(canonical(command)).hex()}
        return sign_command(command, self.key)

    def verify(self, command: dict) -> bool:
        """Whether the signature is valid (no sequence or expiry check: see :class:`Verifier`)."""
        return self.verifier().valid_signature(command)

    def verifier(self, **kwargs) -> Verifier:
        """The verifier of this signer's signatures (for Ed25519, holding the public key)."""
        if isinstance(self.key, Ed25519PrivateKey):
            return Verifier(self.key.public_key(), **kwargs)
        return Verifier(self.key, **kwargs)


class Verifier:
    """Accepts a record (a command, or with ``kind="alert"`` an alert) only when it is signed
    with the key, was not altered, comes after the last record it accepted for its model and,
    with a clock, has not expired.

    ``key`` is an HMAC secret (bytes) or an Ed25519 public key; ``clock`` gives the wall clock
    in seconds (None: no expiry check, for reading history); ``validity_s`` defaults to
    ``$COALMINE_COMMAND_VALIDITY_S``, else one hour.

    >>> v = Verifier(b"k", clock=None)
    >>> cmd = sign_command({"command_id": "c1", "ts": 5, "model": "m", "action": "rollback"}, b"k")
    >>> v.check({**cmd, "signature": None}), v.check({**cmd, "action": "promote"})
    ('unsigned', 'bad signature (altered, or signed with another key)')
    >>> v.check(cmd), v.check(cmd)
    (None, 'replayed: command c1 of model m at ts 5 was already accepted')
    """

    def __init__(
        self,
        key: bytes | Ed25519PublicKey,
        *,
        clock: Callable[[], float] | None = time.time,
        validity_s: float | None = None,
        kind: str = "command",
    ):
        self.key, self.clock, self.kind = key, clock, kind
        if validity_s is None:
            validity_s = float(os.environ.get("COALMINE_COMMAND_VALIDITY_S") or DEFAULT_VALIDITY_S)
        self.validity_ms = int(validity_s * 1000)
        self.last: dict[str, tuple[int, set[str]]] = {}  # model -> (ts, record ids at that ts)

    @classmethod
    def parse(cls, text: str, **kwargs) -> Verifier:
        """A verifier from a ``$COALMINE_VERIFY_KEY`` value."""
        if text.startswith(_ED25519):
            raw = _key_bytes(text[len(_ED25519) :], "COALMINE_VERIFY_KEY")
            return cls(Ed25519PublicKey.from_public_bytes(raw), **kwargs)
        return cls(text.removeprefix(_HMAC).encode(), **kwargs)

    @classmethod
    def from_env(cls, **kwargs) -> Verifier | None:
        """``$COALMINE_VERIFY_KEY``'s verifier, else the one of ``$COALMINE_SIGNING_KEY``,
        else None (nothing configured: commands and alerts cannot be verified)."""
        if key := os.environ.get("COALMINE_VERIFY_KEY"):
            return cls.parse(key, **kwargs)
        signer = Signer.from_env()
        return signer.verifier(**kwargs) if signer else None

    def valid_signature(self, command: dict) -> bool:
        signature = command.get("signature")
        if not isinstance(signature, str):
            return False
        if isinstance(self.key, Ed25519PublicKey):
            try:
                self.key.verify(bytes.fromhex(signature), canonical(command))
            except (ValueError, InvalidSignature):
                return False
            return True
        return verify_command(command, self.key)

    def check(self, record: dict) -> str | None:
        """None when the record is to be believed (and then remembered as its model's
        latest), else why not."""
        if not isinstance(record.get("signature"), str):
            return "unsigned"
        if not self.valid_signature(record):
            return "bad signature (altered, or signed with another key)"
        kind = self.kind
        model, ts, rid = record.get("model"), record.get("ts"), record.get(f"{kind}_id")
        if not (isinstance(model, str) and type(ts) is int and isinstance(rid, str)):
            return f"signed, but without a model, an integer ts and {kind}_id"
        last_ts, seen = self.last.get(model, (-1, set()))
        if ts < last_ts:
            return (
                f"replayed: ts {ts} is before model {model}'s last accepted {kind} (ts {last_ts})"
            )
        if ts == last_ts and rid in seen:
            return f"replayed: {kind} {rid} of model {model} at ts {ts} was already accepted"
        if self.clock is not None and ts + self.validity_ms < self.clock() * 1000:
            return f"expired: ts {ts} is more than {self.validity_ms / 1000:g} s ago"
        self.last[model] = (ts, seen | {rid} if ts == last_ts else {rid})
        return None


if __name__ == "__main__":
    signing, verifying = generate_ed25519()
    print(f"COALMINE_SIGNING_KEY={signing}  # the worker's: keep it secret")
    print(f"COALMINE_VERIFY_KEY={verifying}  # for routers and subscribers")
