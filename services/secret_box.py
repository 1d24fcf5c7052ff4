"""Secrets at rest (sender passwords, OAuth refresh tokens, DKIM keys), encrypted with Fernet.

The key comes from the `SECRETS_KEY` setting: one or more Fernet keys separated by commas.
The first encrypts; every key decrypts, so a key can be rotated without re-encrypting
first (`SecretBox.rotate` re-encrypts a value under the first key). A missing or wrong key
is an error that names the secret it was opening, never one that prints it.
"""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from settings import Settings

__all__ = ["SecretBox", "SecretKeyError", "generate_key"]


class SecretKeyError(RuntimeError):
    """SECRETS_KEY is missing, malformed, or not the key a secret was encrypted with."""


def generate_key() -> str:
    """A new random Fernet key (url-safe base64 of 32 bytes)."""
    return Fernet.generate_key().decode("ascii")


def _keys(raw: str) -> list[str]:
    return [part.strip() for part in raw.split(",") if part.strip()]


class SecretBox:
    """Encrypts and decrypts short secrets with the configured keys."""

    def __init__(self, keys: list[str]) -> None:
        self._fernet: MultiFernet | None = None
        if keys:
            fernets: list[Fernet] = []
            for position, key in enumerate(keys, start=1):
                try:
                    fernets.append(Fernet(key.encode("ascii")))
                except (ValueError, UnicodeEncodeError) as err:
                    raise SecretKeyError(
                        f"SECRETS_KEY: key {position} is not a Fernet key (32 url-safe base64 bytes); "
                        "make one with `python -m services.secret_box`"
                    ) from err
            self._fernet = MultiFernet(fernets)

    @classmethod
    def from_settings(cls, settings: Settings) -> SecretBox:
        """The box for this process's SECRETS_KEY (which may be empty: then every use fails clearly)."""
        return cls(_keys(settings.secrets_key.get_secret_value()))

    @property
    def configured(self) -> bool:
        """True when SECRETS_KEY holds at least one key."""
        return self._fernet is not None

    def _require(self, what: str) -> MultiFernet:
        if self._fernet is None:
            raise SecretKeyError(f"SECRETS_KEY is not set: cannot open or store the {what}")
        return self._fernet

    def encrypt(self, plaintext: str, *, what: str = "secret") -> str:
        """The token to store for `plaintext`."""
        return self._require(what).encrypt(plaintext.encode("utf-8")).decode("ascii")

    def decrypt(self, token: str, *, what: str = "secret") -> str:
        """The plaintext of a stored token; `what` names the secret in errors (never its value)."""
        fernet = self._require(what)
        try:
            return fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError) as err:
            raise SecretKeyError(
                f"cannot decrypt the {what}: SECRETS_KEY is not the key it was stored with "
                "(add the old key after the new one, comma separated, to rotate)"
            ) from err

    def rotate(self, token: str, *, what: str = "secret") -> str:
        """`token` re-encrypted under the first key (for a rotation sweep)."""
        fernet = self._require(what)
        try:
            return fernet.rotate(token.encode("ascii")).decode("ascii")
        except InvalidToken as err:
            raise SecretKeyError(f"cannot re-encrypt the {what}: no configured key opens it") from err


if __name__ == "__main__":  # `python -m services.secret_box` prints a new key for SECRETS_KEY
    print(generate_key())
