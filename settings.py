"""Process configuration, read once from the environment.

Every variable in DESIGN.md has a default that works with the embedded stack that
`make run` starts, so a fresh clone needs no `.env`. Secrets are `SecretStr` so that
they never show up in logs or reprs by accident.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """All runtime settings; environment variables use the upper-case field names."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str = "postgresql+asyncpg://sequencer@127.0.0.1:55432/sequencer"
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "sequencer"
    #: Enrollments the worker keeps in memory between tasks. A reply to a lead that is
    #: not cached replays its history in a fresh sandbox first; with more waiting leads
    #: than this, a burst of replies turns into a burst of replays (bench/RESULTS.md).
    #: About 55 KiB each for a small sequence (measured): 5,000 is about 270 MiB.
    worker_max_cached_workflows: int = Field(default=5000, ge=0)
    #: On SIGTERM the worker stops polling and lets running activities (a send in flight)
    #: finish for up to this long before cancelling them.
    worker_graceful_shutdown_seconds: float = Field(default=20.0, ge=0)

    smtp_host: str = "127.0.0.1"
    smtp_port: int = 2525
    smtp_username: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_starttls: bool = False
    smtp_pool_size: int = 4
    smtp_timeout_seconds: float = 30.0
    #: OAuth 2.0 defaults for senders that log in with XOAUTH2 (`senders add --oauth-*`
    #: overrides them per sender): the token endpoint and the app's client id/secret.
    oauth_token_url: str = ""
    oauth_client_id: str = ""
    oauth_client_secret: SecretStr = SecretStr("")

    webhook_secret: SecretStr = SecretStr("dev-webhook-secret-change-me")
    webhook_max_body_bytes: int = 64 * 1024
    webhook_replay_window_seconds: int = 300
    public_base_url: str = "http://127.0.0.1:8000"
    #: An address that unsubscribes whoever writes to it (with the token in the subject), offered
    #: in List-Unsubscribe beside the https link; empty: the https link only.
    unsubscribe_mailto: str = ""

    x_api_base_url: str = "http://127.0.0.1:8081"
    x_api_token: SecretStr = SecretStr("dev-x-token")
    relay_url: str = "http://127.0.0.1:8082"
    relay_token: SecretStr = SecretStr("dev-relay-token")

    #: Fernet key(s) that encrypt secrets stored in PostgreSQL (sender passwords, OAuth
    #: refresh tokens, DKIM keys). Comma separated: the first encrypts, all decrypt
    #: (rotation). `make run` writes a dev key under .dev/.
    secrets_key: SecretStr = SecretStr("")

    postal_address: str = "Sequencer Dev, 1 Example Street, Springfield"
    person_daily_touch_cap: int = Field(default=1, ge=0)
    out_of_office_default_delay: str = "7d"

    @field_validator("unsubscribe_mailto")
    @classmethod
    def _mailto_address(cls, value: str) -> str:
        address = value.strip().removeprefix("mailto:")
        if address and (address.count("@") != 1 or not address.isascii() or any(c in address for c in " <>?,;")):
            raise ValueError(f"UNSUBSCRIBE_MAILTO: {value!r} is not a plain email address like unsubscribe@example.com")
        return address


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings (cached; tests build `Settings(...)` directly)."""
    return Settings()
