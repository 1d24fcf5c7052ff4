"""Process configuration, read once from the environment.

Every variable in DESIGN.md has a default that works with the embedded stack that
`make run` starts, so a fresh clone needs no `.env`. Secrets are `SecretStr` so that
they never show up in logs or reprs by accident.

`SEQUENCER_ENV` is `production` unless set to `dev` (`make run` and the tests do): in
production, `check_settings()` refuses to start any process (worker, webhook app,
CLI) whose secrets are the public defaults, empty or short, naming each variable.
Secrets that are rotated are lists: comma-separated, the first one signs and every
one is accepted, so that links and webhooks signed before a rotation keep working.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from models.task_queues import parse_roles

#: A list setting read from one variable: a JSON array, or values separated by commas or
#: newlines (several values = a secret being rotated: every one is accepted).
SecretList = Annotated[list[SecretStr], NoDecode]
TextList = Annotated[list[str], NoDecode]

#: Shortest secret accepted in production (characters; 32 random ones are ~190 bits).
MIN_SECRET_LENGTH = 32
#: The defaults below, published in this repository: never accepted in production.
DEV_WEBHOOK_SECRET = "dev-webhook-secret-change-me"
DEV_LINK_SECRET = "dev-link-secret-change-me"
DEV_RELAY_TOKEN = "dev-relay-token"
DEV_RELAY_SIGNING_KEY = "dev-relay-signing-key"
PUBLIC_DEFAULTS = frozenset(
    {DEV_WEBHOOK_SECRET, DEV_LINK_SECRET, DEV_RELAY_TOKEN, DEV_RELAY_SIGNING_KEY, "dev-x-token"}
)
#: Channels that may have their own webhook secret (`WEBHOOK_SECRET_<CHANNEL>`).
WEBHOOK_CHANNELS = ("email", "x", "linkedin", "xmtp")


class InsecureSettingsError(RuntimeError):
    """Settings a production process must not start with; the message names each variable."""


def secret_list(value: SecretStr | None) -> list[str]:
    """The keys of a comma-separated secret, in order (first signs, all verify)."""
    if value is None:
        return []
    return [part.strip() for part in value.get_secret_value().split(",") if part.strip()]


class Settings(BaseSettings):
    """All runtime settings; environment variables use the upper-case field names."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    #: `production` (the default: every secret checked at start) or `dev`.
    sequencer_env: Literal["production", "dev"] = "production"

    database_url: str = "postgresql+asyncpg://sequencer@127.0.0.1:55432/sequencer"
    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "sequencer"
    #: TLS to the Temporal frontend (implied by an API key or a client certificate).
    temporal_tls: bool = False
    #: PEM files: the CA that signed the server's certificate (empty: system roots), and
    #: the client certificate and key for mTLS (Temporal Cloud's certificate auth).
    temporal_tls_ca_file: str = ""
    temporal_tls_cert_file: str = ""
    temporal_tls_key_file: str = ""
    #: Server name to check in the server certificate (empty: the host of the address).
    temporal_tls_server_name: str = ""
    #: Temporal Cloud API key (sent as a bearer token; needs TLS, which it turns on).
    temporal_api_key: SecretStr = SecretStr("")
    #: Optional payload encryption (AES-256-GCM): one or more 32-byte keys in urlsafe
    #: base64, comma separated; the first encrypts, all decrypt. Every process that
    #: talks to the namespace (worker, app, CLI) must have the same keys.
    temporal_payload_key: SecretStr = SecretStr("")
    #: Enrollments the worker keeps in memory between tasks. A reply to a lead that is
    #: not cached replays its history in a fresh sandbox first; with more waiting leads
    #: than this, a burst of replies turns into a burst of replays (bench/RESULTS.md).
    #: About 55 KiB each for a small sequence (measured): 5,000 is about 270 MiB.
    worker_max_cached_workflows: int = Field(default=5000, ge=0)
    #: On SIGTERM the worker stops polling and lets running activities (a send in flight)
    #: finish for up to this long before cancelling them.
    worker_graceful_shutdown_seconds: float = Field(default=20.0, ge=0)
    #: Which task queues this worker process serves (`python worker.py --queues` overrides):
    #: `workflows` (the enrollments and their bookkeeping, on TEMPORAL_TASK_QUEUE) and each
    #: channel's sends (`email`, `x`, `linkedin`, `xmtp`, on `<TEMPORAL_TASK_QUEUE>-<channel>`),
    #: comma separated; `all` runs every one in this process.
    worker_queues: TextList = Field(default_factory=lambda: ["all"])
    #: Activities in flight at once on the `workflows` queue (bookkeeping: events, slots, the end).
    worker_max_concurrent_activities: int = Field(default=100, ge=1)
    #: Local activities in flight at once per process: email sends due now (each inside its
    #: workflow task, patch send-step-local) and the bookkeeping writes (events, the end).
    worker_max_concurrent_local_activities: int = Field(default=100, ge=1)
    #: Sends in flight at once per process, for each channel's queue: a slow provider fills
    #: only its own channel's slots.
    worker_email_concurrency: int = Field(default=100, ge=1)
    worker_x_concurrency: int = Field(default=20, ge=1)
    worker_linkedin_concurrency: int = Field(default=20, ge=1)
    worker_xmtp_concurrency: int = Field(default=20, ge=1)

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
    #: The mailbox `starter.py demo` connects the demo email sender to (`make run` sets it
    #: to its local IMAP server); empty: the demo sender has no mailbox.
    demo_imap_url: str = ""

    #: Verifies inbound webhooks (comma-separated list while rotating), for every channel
    #: without its own `WEBHOOK_SECRET_<CHANNEL>`.
    webhook_secret: SecretStr = SecretStr(DEV_WEBHOOK_SECRET)
    webhook_secret_email: SecretStr = SecretStr("")
    webhook_secret_x: SecretStr = SecretStr("")
    webhook_secret_linkedin: SecretStr = SecretStr("")
    webhook_secret_xmtp: SecretStr = SecretStr("")
    #: Also accept the old `v1=` signature, which covers the body but not the channel
    #: (only while the senders of webhooks move to `v2=`; see README "Security").
    webhook_accept_v1: bool = False
    webhook_max_body_bytes: int = 64 * 1024
    webhook_replay_window_seconds: int = 300
    #: Signs unsubscribe, open and click links (comma-separated: the first signs new
    #: links, the others are previous keys still accepted for links already sent).
    link_secret: SecretStr = SecretStr(DEV_LINK_SECRET)
    public_base_url: str = "http://127.0.0.1:8000"
    #: An address offered in List-Unsubscribe beside the https link, as
    #: `mailto:ADDRESS?subject=unsubscribe-TOKEN` (the https link's signed token); set it only
    #: if mail to that address is acted on. Empty: the https link only.
    unsubscribe_mailto: str = ""
    #: A reply matched to a person only through In-Reply-To/References, whose From is
    #: not one of that person's identities, is recorded but changes nothing (no stop,
    #: unsubscribe, complaint or company hold) unless this is true.
    inbound_trust_thread_only: bool = False

    x_api_base_url: str = "http://127.0.0.1:8081"
    x_api_token: SecretStr = SecretStr("dev-x-token")
    relay_url: str = "http://127.0.0.1:8082"
    #: Bearer token the relay checks (who may call it).
    relay_token: SecretStr = SecretStr(DEV_RELAY_TOKEN)
    #: HMAC key of `X-Relay-Signature` (what was sent, and when); separate from the
    #: bearer token so that a logged Authorization header cannot sign requests.
    relay_signing_key: SecretStr = SecretStr(DEV_RELAY_SIGNING_KEY)

    #: Fernet key(s) that encrypt secrets stored in PostgreSQL (sender passwords, OAuth
    #: refresh tokens, DKIM keys). Comma separated: the first encrypts, all decrypt
    #: (rotation). `make run` writes a dev key under .dev/.
    secrets_key: SecretStr = SecretStr("")

    postal_address: str = "Sequencer Dev, 1 Example Street, Springfield"
    person_daily_touch_cap: int = Field(default=1, ge=0)
    #: The sender circuit breaker (services/sender_breaker.py): how long an auth or
    #: throttle pause lasts before one probe send, the bounce rate over the last 100 sends
    #: (once SENDER_BOUNCE_MIN_SENDS are in) that pauses a sender until `senders resume`,
    #: and how many 421/429 answers in a row pause it.
    sender_breaker_cooldown_seconds: float = Field(default=600.0, gt=0)
    sender_bounce_rate_threshold: float = Field(default=0.05, gt=0, le=1)
    sender_bounce_min_sends: int = Field(default=20, ge=1, le=100)
    sender_throttle_strikes: int = Field(default=5, ge=1)
    send_late_grace_seconds: float = Field(default=120.0, gt=0, le=3600)
    out_of_office_default_delay: str = "7d"

    @field_validator("unsubscribe_mailto")
    @classmethod
    def _mailto_address(cls, value: str) -> str:
        address = value.strip().removeprefix("mailto:")
        if address and (address.count("@") != 1 or not address.isascii() or any(c in address for c in " <>?,;")):
            raise ValueError(f"UNSUBSCRIBE_MAILTO: {value!r} is not a plain email address like unsubscribe@example.com")
        return address

    # Provider webhooks (POST /webhooks/providers/{provider}); empty = that provider is off.
    sendgrid_webhook_public_keys: TextList = Field(default_factory=list)
    sendgrid_inbound_credentials: SecretList = Field(default_factory=list)
    postmark_webhook_credentials: SecretList = Field(default_factory=list)
    mailgun_signing_keys: SecretList = Field(default_factory=list)
    ses_topic_arns: TextList = Field(default_factory=list)
    sns_cert_host_pattern: str = r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$"
    sns_ca_file: str = ""
    sns_max_age_seconds: int = Field(default=3600, ge=60)
    resend_webhook_secrets: SecretList = Field(default_factory=list)
    x_consumer_secrets: SecretList = Field(default_factory=list)
    provider_replay_window_seconds: int = Field(default=300, ge=30)
    provider_max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    #: ESP relays whose custom-data header every email carries (sendgrid, mailgun, postmark, ses),
    #: so their events match a delivery even when they rewrite the Message-ID.
    email_relay_tags: TextList = Field(default_factory=list)

    @field_validator(
        "sendgrid_webhook_public_keys",
        "sendgrid_inbound_credentials",
        "postmark_webhook_credentials",
        "mailgun_signing_keys",
        "ses_topic_arns",
        "resend_webhook_secrets",
        "x_consumer_secrets",
        "email_relay_tags",
        "worker_queues",
        mode="before",
    )
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        """`["a","b"]`, `a,b` or one value per line."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]
        return value

    @field_validator("worker_queues")
    @classmethod
    def _known_queues(cls, value: list[str]) -> list[str]:
        try:
            return list(parse_roles(value))
        except ValueError as bad:
            raise ValueError(f"WORKER_QUEUES: {bad}") from None

    @field_validator("email_relay_tags")
    @classmethod
    def _known_relays(cls, value: list[str]) -> list[str]:
        relays = [v.strip().lower() for v in value]
        unknown = [v for v in relays if v not in ("sendgrid", "mailgun", "postmark", "ses")]
        if unknown:
            raise ValueError(f"EMAIL_RELAY_TAGS: unknown relay {unknown[0]!r}; use sendgrid, mailgun, postmark or ses")
        return relays

    def channel_concurrency(self) -> dict[str, int]:
        """Sends in flight at once per process, by channel (WORKER_<CHANNEL>_CONCURRENCY)."""
        return {
            "email": self.worker_email_concurrency,
            "x": self.worker_x_concurrency,
            "linkedin": self.worker_linkedin_concurrency,
            "xmtp": self.worker_xmtp_concurrency,
        }

    @property
    def production(self) -> bool:
        """True unless `SEQUENCER_ENV=dev`."""
        return self.sequencer_env == "production"

    def link_keys(self) -> list[str]:
        """`LINK_SECRET`'s keys: the first signs new links, all verify."""
        return secret_list(self.link_secret)

    def webhook_keys(self, channel: str) -> list[str]:
        """Keys that verify webhooks of `channel`: its own secret, else `WEBHOOK_SECRET`."""
        own = getattr(self, f"webhook_secret_{channel}", None)
        keys = secret_list(own) if isinstance(own, SecretStr) else []
        return keys or secret_list(self.webhook_secret)

    def payload_keys(self) -> list[bytes]:
        """`TEMPORAL_PAYLOAD_KEY`'s AES-256 keys (ValueError naming the variable if malformed)."""
        keys = []
        for n, text in enumerate(secret_list(self.temporal_payload_key), 1):
            try:
                key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            except (ValueError, TypeError):
                key = b""
            if len(key) != 32:
                raise ValueError(
                    f"TEMPORAL_PAYLOAD_KEY key {n} is not 32 bytes in urlsafe base64 (make one with: "
                    'python -c "import os,base64;print(base64.urlsafe_b64encode(os.urandom(32)).decode())")'
                )
            keys.append(key)
        return keys


def settings_problems(settings: Settings) -> list[str]:
    """Every reason `settings` must not run in production (empty in dev)."""
    problems: list[str] = []
    try:
        settings.payload_keys()
    except ValueError as err:
        problems.append(str(err))
    if not settings.production:
        return problems

    def check(variable: str, value: SecretStr, *, required: bool = True) -> None:
        keys = secret_list(value)
        if not keys:
            if required:
                problems.append(f"{variable} is empty: set it to a random secret of {MIN_SECRET_LENGTH}+ characters")
            return
        for n, key in enumerate(keys, 1):
            which = variable if len(keys) == 1 else f"{variable} (key {n} of {len(keys)})"
            if key in PUBLIC_DEFAULTS:
                problems.append(f"{which} is the public development default: set a random secret")
            elif len(key) < MIN_SECRET_LENGTH:
                problems.append(f"{which} is {len(key)} characters: use at least {MIN_SECRET_LENGTH} random ones")

    base = urlsplit(settings.public_base_url)
    if base.scheme != "https" or not base.netloc:
        problems.append(
            f"PUBLIC_BASE_URL must be an https URL (RFC 8058: mail providers only use an https one-click "
            f"unsubscribe link), got {settings.public_base_url!r}"
        )
    check("WEBHOOK_SECRET", settings.webhook_secret)
    for channel in WEBHOOK_CHANNELS:
        check(f"WEBHOOK_SECRET_{channel.upper()}", getattr(settings, f"webhook_secret_{channel}"), required=False)
    check("LINK_SECRET", settings.link_secret)
    check("RELAY_TOKEN", settings.relay_token)
    check("RELAY_SIGNING_KEY", settings.relay_signing_key)
    if (
        secret_list(settings.relay_signing_key)[:1]
        and secret_list(settings.relay_signing_key)[:1] == secret_list(settings.relay_token)[:1]
    ):
        problems.append("RELAY_SIGNING_KEY equals RELAY_TOKEN: the signing key must be a separate secret")
    if (
        secret_list(settings.link_secret)[:1]
        and secret_list(settings.link_secret)[:1] == secret_list(settings.webhook_secret)[:1]
    ):
        problems.append("LINK_SECRET equals WEBHOOK_SECRET: links need their own secret")
    return problems


def check_settings(settings: Settings, process: str) -> None:
    """Refuse to start `process` in production with unsafe settings (InsecureSettingsError)."""
    problems = settings_problems(settings)
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise InsecureSettingsError(
            f"{process} refuses to start (SEQUENCER_ENV={settings.sequencer_env}):\n{listed}\n"
            "(SEQUENCER_ENV=dev is only for a local development stack)"
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings (cached; tests build `Settings(...)` directly)."""
    return Settings()
