"""Signed artifact links: made and checked with one key; any change to them, or time, refuses them."""

from __future__ import annotations

import hashlib
import hmac
import time
import urllib.parse

import pytest
from pydantic import SecretStr

from kiln_runtime.settings import StorageSettings
from kiln_runtime.signing import EXPIRED_MESSAGE, MISMATCH_MESSAGE, LinkRefused, UrlSigner, signature

KEY = b"0123456789abcdef0123456789abcdef"
ARTIFACT = "01JA2B3C4D5E6F7G8H9JKMNPQR/image.png"
NOW = 1_800_000_000.0


def parts(link: str) -> tuple[str, int, str]:
    """The artifact id, expiry and signature a link carries."""
    parsed = urllib.parse.urlsplit(link)
    query = dict(urllib.parse.parse_qsl(parsed.query))
    artifact_id = urllib.parse.unquote(parsed.path.removeprefix("/v1/artifacts/"))
    return artifact_id, int(query["expires"]), query["signature"]


def test_the_signature_is_the_documented_hmac() -> None:
    expected = hmac.new(KEY, f"{ARTIFACT}\n123".encode(), hashlib.sha256).hexdigest()
    assert signature(KEY, ARTIFACT, 123) == expected
    assert expected == expected.lower() and len(expected) == 64


def test_a_link_names_the_artifact_and_checks_until_it_expires() -> None:
    signer = UrlSigner(KEY, expiry_s=60)
    link = signer.link("https://kiln.example/v1/artifacts/", ARTIFACT, now=NOW)
    assert link.startswith(f"https://kiln.example/v1/artifacts/{ARTIFACT}?expires={int(NOW) + 60}&signature=")
    artifact_id, expires, given = parts(link)
    assert (artifact_id, expires) == (ARTIFACT, int(NOW) + 60)
    signer.check(artifact_id, expires, given, now=NOW + 59)
    with pytest.raises(LinkRefused, match="expired"):
        signer.check(artifact_id, expires, given, now=NOW + 60)
    assert EXPIRED_MESSAGE.endswith("(GetJob) to get a fresh link")


@pytest.mark.parametrize("part", ["artifact", "expires", "signature", "key"])
def test_any_change_is_a_mismatch(part: str) -> None:
    signer = UrlSigner(KEY, expiry_s=60)
    artifact_id, expires, given = parts(signer.link("https://kiln.example/v1/artifacts", ARTIFACT, now=NOW))
    checker = signer
    if part == "artifact":
        artifact_id = artifact_id.replace("image.png", "other.png")
    elif part == "expires":
        expires += 3600  # a longer life is exactly what a tamperer wants
    elif part == "signature":
        given = given[:-1] + ("0" if given[-1] != "0" else "1")
    else:
        checker = UrlSigner(b"another key entirely", expiry_s=60)
    with pytest.raises(LinkRefused) as refused:
        checker.check(artifact_id, expires, given, now=NOW)
    assert str(refused.value) == MISMATCH_MESSAGE


@pytest.mark.parametrize("given", ["", "zz", "é" * 64, "A" * 64])
def test_garbage_signatures_are_refused_not_crashed_on(given: str) -> None:
    with pytest.raises(LinkRefused, match="does not match"):
        UrlSigner(KEY).check(ARTIFACT, int(NOW) + 10, given, now=NOW)


def test_upper_case_hex_is_the_same_signature() -> None:
    signer = UrlSigner(KEY)
    given = signature(KEY, ARTIFACT, int(NOW) + 10).upper()
    signer.check(ARTIFACT, int(NOW) + 10, given, now=NOW)


def test_settings_key_and_the_per_process_key() -> None:
    configured = StorageSettings(url_signing_key=SecretStr("shared secret"), url_expiry_s=5)
    one, two = UrlSigner.from_settings(configured), UrlSigner.from_settings(configured)
    link = one.link("http://g/v1/artifacts", ARTIFACT, now=NOW)
    assert link == two.link("http://g/v1/artifacts", ARTIFACT, now=NOW), "replicas with one key agree"
    assert "shared secret" not in repr(configured), "the key is a secret in dumps and logs"
    unset = StorageSettings(public_base_url="http://g/v1/artifacts")
    random_a, random_b = UrlSigner.from_settings(unset), UrlSigner.from_settings(unset)
    mine = random_a.link("http://g/v1/artifacts", ARTIFACT, now=NOW)
    random_b.check(*parts(mine), now=NOW)  # one process, one random key
    with pytest.raises(LinkRefused):
        one.check(*parts(mine), now=NOW)


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        UrlSigner(b"")


def test_links_expire_in_real_time() -> None:
    signer = UrlSigner(KEY, expiry_s=1)
    artifact_id, expires, given = parts(signer.link("https://kiln.example/v1/artifacts", ARTIFACT))
    signer.check(artifact_id, expires, given)
    deadline = time.monotonic() + 5
    # Polled, not slept: the link must stop working within about a second.
    while time.time() < expires and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(LinkRefused) as refused:
        signer.check(artifact_id, expires, given)
    assert str(refused.value) == EXPIRED_MESSAGE
