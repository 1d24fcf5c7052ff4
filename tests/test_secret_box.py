"""Secrets at rest: Fernet with rotation, and errors that name the secret, never print it."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from devstack.run import dev_secrets_key
from services.secret_box import SecretBox, SecretKeyError, generate_key
from settings import Settings


def test_round_trip_and_ciphertext_hides_the_secret() -> None:
    box = SecretBox([generate_key()])
    token = box.encrypt("hunter2-app-password")
    assert "hunter2" not in token
    assert box.decrypt(token, what="sender 3 smtp password") == "hunter2-app-password"


def test_rotation_old_key_still_opens_and_rotate_moves_to_the_new_key() -> None:
    old, new = generate_key(), generate_key()
    stored = SecretBox([old]).encrypt("s3cret")
    rotated_box = SecretBox([new, old])
    assert rotated_box.decrypt(stored) == "s3cret"
    moved = rotated_box.rotate(stored)
    assert SecretBox([new]).decrypt(moved) == "s3cret"
    with pytest.raises(SecretKeyError):
        SecretBox([old]).decrypt(moved)


def test_wrong_key_names_the_secret_not_its_value() -> None:
    stored = SecretBox([generate_key()]).encrypt("topsecret")
    with pytest.raises(SecretKeyError) as err:
        SecretBox([generate_key()]).decrypt(stored, what="sender 7 imap password")
    assert "sender 7 imap password" in str(err.value)
    assert "topsecret" not in str(err.value)


def test_missing_key_is_a_clear_error() -> None:
    box = SecretBox.from_settings(Settings(secrets_key=SecretStr("")))
    assert not box.configured
    with pytest.raises(SecretKeyError, match="SECRETS_KEY is not set.*sender 2 smtp password"):
        box.encrypt("x", what="sender 2 smtp password")


def test_malformed_key_names_the_setting_and_position() -> None:
    with pytest.raises(SecretKeyError, match="SECRETS_KEY: key 2 is not a Fernet key"):
        SecretBox.from_settings(Settings(secrets_key=SecretStr(f"{generate_key()}, not-a-key")))


def test_dev_stack_key_is_made_once_private_and_reused(tmp_path) -> None:
    first = dev_secrets_key(tmp_path)
    assert dev_secrets_key(tmp_path) == first
    assert (tmp_path / "secrets.key").stat().st_mode & 0o077 == 0
    assert SecretBox([first]).decrypt(SecretBox([first]).encrypt("ok")) == "ok"
