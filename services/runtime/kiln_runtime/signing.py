"""Signed artifact links: URLs that work without credentials, for a while, for one artifact.

A browser's `<img src>` and a plain download cannot send an API key, so an artifact URI on the
gateway's route carries its own proof instead: `<base>/<artifact id>?expires=<unix s>&signature=<hex>`,
the signature being HMAC-SHA256(key, artifact id, a newline, expires) in lowercase hex. The server that
serves the artifact checks it (`ArtifactServicer`); any replica sharing the key can. A valid link
is served whatever principal asks (it was handed to the owner, who may pass it on); an altered or
expired one is refused with PERMISSION_DENIED, which the gateway answers as 403.

The key comes from `storage.url_signing_key`. Without one, each process makes a random key at
first use: links then work only on the server that made them, which is fine for one replica and
wrong for several (a warning says so).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import threading
import time
from urllib.parse import quote

from kiln_runtime.settings import StorageSettings

log = logging.getLogger(__name__)

#: The query parameters of a signed link (the gateway passes requests carrying `signature`).
EXPIRES_PARAM = "expires"
SIGNATURE_PARAM = "signature"

EXPIRED_MESSAGE = "this link has expired; ask for the job again (GetJob) to get a fresh link"
MISMATCH_MESSAGE = "this link's signature does not match"

_process_key: bytes | None = None
_warned = False
_process_key_lock = threading.Lock()


class LinkRefused(Exception):
    """A signed link that must not be served; the message says why (for PERMISSION_DENIED)."""


def signature(key: bytes, artifact_id: str, expires: int) -> str:
    """The lowercase hex HMAC-SHA256 of the artifact id and `expires`, joined by a newline."""
    return hmac.new(key, f"{artifact_id}\n{expires}".encode(), hashlib.sha256).hexdigest()


class UrlSigner:
    """Makes and checks signed artifact links with one key."""

    def __init__(self, key: bytes, *, expiry_s: int = 3600) -> None:
        if not key:
            raise ValueError("a signing key must not be empty")
        self._key = key
        self.expiry_s = expiry_s

    @classmethod
    def from_settings(cls, storage: StorageSettings) -> UrlSigner:
        """The signer for `storage.url_signing_key`, or for this process's random key if it is empty."""
        configured = storage.url_signing_key.get_secret_value()
        # Without public_base_url this server hands out no links; it still checks any it is sent.
        key = configured.encode() if configured else _random_process_key(warn=bool(storage.public_base_url))
        return cls(key, expiry_s=storage.url_expiry_s)

    def link(self, base_url: str, artifact_id: str, *, now: float | None = None) -> str:
        """`<base_url>/<artifact id>?expires=..&signature=..`, valid for `expiry_s` from `now`."""
        # Rounded up: a link lives at least `expiry_s`, even one made late in a second.
        expires = math.ceil(time.time() if now is None else now) + self.expiry_s
        path = quote(artifact_id, safe="/")
        return (
            f"{base_url.rstrip('/')}/{path}?{EXPIRES_PARAM}={expires}"
            f"&{SIGNATURE_PARAM}={signature(self._key, artifact_id, expires)}"
        )

    def check(self, artifact_id: str, expires: int, given: str, *, now: float | None = None) -> None:
        """Raise LinkRefused unless `given` signs `artifact_id` and `expires` and that time is to come.

        The signature is checked first, so an altered expiry reads as a mismatch, not as expired.
        """
        expected = signature(self._key, artifact_id, expires)
        # Constant time: the comparison must not tell an attacker how much of a guess was right.
        if not hmac.compare_digest(expected.encode(), given.lower().encode("utf-8", "replace")):
            raise LinkRefused(MISMATCH_MESSAGE)
        if (time.time() if now is None else now) >= expires:
            raise LinkRefused(EXPIRED_MESSAGE)


def _random_process_key(*, warn: bool) -> bytes:
    global _process_key, _warned
    with _process_key_lock:
        if _process_key is None:
            _process_key = os.urandom(32)
        if warn and not _warned:
            _warned = True
            log.warning(
                "storage.url_signing_key is not set: signed artifact links use a random key of this process, so they "
                "work only on this server and stop working when it restarts; set KILN_STORAGE__URL_SIGNING_KEY "
                "(the same on every replica) for more than one server"
            )
        return _process_key
