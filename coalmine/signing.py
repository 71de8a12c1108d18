"""Signed rollout commands: an HMAC-SHA256 over a command's canonical JSON, so that a router
acts only on commands from a holder of the key.

The key comes from ``$COALMINE_SIGNING_KEY`` (:meth:`Signer.from_env`); the statistics in
:mod:`coalmine.streams` take the signer as an argument and never read the environment.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import orjson


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
    expected = hmac.new(key, canonical(command), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, command.get("signature", ""))


class Signer:
    """Signs commands with one key: ``signer(command)`` returns the command with its
    ``signature``."""

    def __init__(self, key: bytes):
        self.key = key

    @classmethod
    def from_env(cls) -> Signer | None:
        """A signer with ``$COALMINE_SIGNING_KEY``, or None when it is not set."""
        key = os.environ.get("COALMINE_SIGNING_KEY")
        return cls(key.encode()) if key else None

    def __call__(self, command: dict) -> dict:
        return sign_command(command, self.key)

    def verify(self, command: dict) -> bool:
        return verify_command(command, self.key)
