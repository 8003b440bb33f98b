"""The one configuration object, read from the environment (12-factor) and CLI flags."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["Settings", "NETWORKS", "ConfigError"]

# CAIP-2 chain ids (bip122:<first 32 hex chars of the genesis block hash>).
NETWORKS = {
    "mainnet": "bip122:000000000019d6689c085ae165831e93",
    "testnet": "bip122:000000000933ea01ad0ee984209779ba",
    "signet": "bip122:00000008819873e925422c1ff0f99f7c",
    "regtest": "bip122:0f9188f13cb7b2c71f2a335e3a4fc328",
}
# A testnet address derived from BIP32 test vector 1 (public material, never for mainnet).
DEFAULT_TESTNET_ADDRESS = "tb1qx3ppj0smkuy3d6g525sh9n2w9k7fm7q3vh5ssm"


class ConfigError(ValueError):
    """Raised at startup for a setting the service cannot run with."""


def _int(env: dict, name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None


def public_origin(raw: str | None) -> str | None:
    """PUBLIC_URL normalised to scheme://host[:port] (lower case, no default port, no path)."""
    if raw is None:
        return None
    try:
        parts = urlsplit(raw.strip())
        port = parts.port
    except ValueError:
        port, parts = -1, None
    if (parts is None or port == -1 or parts.scheme not in ("http", "https") or not parts.hostname
            or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password):
        raise ConfigError(f"PUBLIC_URL must be http(s)://host[:port] with no path, got {raw!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default) else "")


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment, validated once at startup."""

    host: str = "127.0.0.1"
    port: int = 8402
    public_url: str | None = None      # https://api.example.org: this deployment's origin (see deployment.py)
    redis_url: str | None = None
    redis_prefix: str = "mt"
    redis_timeout: float = 5.0
    var_dir: Path = Path("var")
    admin_token: str | None = None
    metrics_token: str | None = None   # set: /metrics wants `Authorization: Bearer <it>`
    network: str = "testnet"
    payee_username: str = "microtasks"
    payee_address: str = DEFAULT_TESTNET_ADDRESS
    invoice_secret: str | None = None
    invoice_ttl: int = 300
    transfer_window: int = 600
    auth_window: int = 300
    hold_timeout: int = 120
    idempotency_ttl: int = 86400      # how long a paid response is kept for retries with an Idempotency-Key
    journal_archive_after: int = 86400  # s a journal entry stays in Redis before it moves to the archive (0: never)
    journal_archive_dir: Path | None = None  # the archive's files (default: <var_dir>/journal)
    max_body: int = 1024 * 1024
    validate_base_price: int = 100
    validate_per_document: int = 20
    max_documents: int = 500
    qa_workers: int = 1
    qa_lease: int = 30
    qa_max_attempts: int = 3
    qa_max_active: int = 20
    crowd_lease: int = 600
    crowd_dispute: int = 86_400        # seconds an auto-accepted crowd result waits before it is paid
    crowd_stake_percent: int = 20      # of the reward, staked by each claim; a rejected result forfeits it
    payee_xpub: str | None = None
    payee_branch: int = 0              # derivation chain of PAYEE_XPUB: xpub/<branch>/<index>, one per deployment
    invoice_address_pool: int = 20     # invoice addresses leased at once (keep <= the wallet's gap limit)
    invoice_addresses_per_client: int = 3  # ... of which one client IP may hold at once (0: no cap)
    chain: str | None = None           # esplora | bitcoind
    chain_url: str | None = None
    chain_cookie: str | None = None
    onchain_max_zeroconf: int = 50_000
    deposit_confirmations: int = 3
    reorg_safe_depth: int = 100        # credited deposits are re-checked for reorgs until this deep
    usd_rate: str = "60000"            # USD per BTC, the fixed (offline) source
    usd_rate_url: str | None = None    # a live source instead (with its JSON path)
    usd_rate_path: str = "bitcoin.usd"
    usd_rate_max_age: int = 60
    rate_limit_ip: int = 3000          # requests per minute per client IP on /v1 (0: off)
    rate_limit_account: int = 1200     # paid calls per minute per account (0: off)
    trust_proxy: bool = False          # take the client IP from X-Forwarded-For
    trusted_proxy_hops: int = 1        # ... the entry this many hops from the right (our proxies append)
    trusted_proxies: tuple = ()        # ... or the first from the right outside these networks
    webhook_allow_http: bool = False   # webhooks may use http:// (else https only)
    webhook_allow: tuple = ()          # networks / host names webhooks may reach though not public
    withdrawal_hold_days: int = 14
    github_api_url: str = "https://api.github.com"  # where GitHub proofs (gists) are read; tests use a stand-in
    minimum_withdrawal: int = 10_000
    log_level: str = "info"
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: dict | None = None, **overrides) -> "Settings":
        env = dict(os.environ if env is None else env)
        network = env.get("NETWORK", "testnet")
        if network not in NETWORKS:
            raise ConfigError(f"NETWORK must be one of {sorted(NETWORKS)}, got {network!r}")
        address = env.get("PAYEE_ADDRESS") or None
        if address is None:
            if network == "mainnet":
                raise ConfigError("PAYEE_ADDRESS is required on mainnet")
            address = DEFAULT_TESTNET_ADDRESS
        public_url = env.get("PUBLIC_URL") or None
        if public_url is None and network == "mainnet":
            raise ConfigError("PUBLIC_URL is required on mainnet (the origin clients pay, e.g. https://api.example.org)")
        settings = cls(
            host=env.get("HOST", "127.0.0.1"),
            public_url=public_url,
            port=_int(env, "PORT", 8402),
            redis_url=env.get("REDIS_URL") or None,
            redis_prefix=env.get("REDIS_PREFIX", "mt"),
            redis_timeout=float(_int(env, "REDIS_TIMEOUT_MS", 5000)) / 1000,
            var_dir=Path(env.get("MICROTASKS_VAR", "var")),
            admin_token=env.get("ADMIN_TOKEN") or None,
            metrics_token=env.get("METRICS_TOKEN") or None,
            network=network,
            payee_username=env.get("PAYEE_USERNAME", "microtasks"),
            payee_address=address,
            invoice_secret=env.get("INVOICE_SECRET") or None,
            invoice_ttl=_int(env, "INVOICE_TTL", 300),
            transfer_window=_int(env, "TRANSFER_WINDOW", 600),
            auth_window=_int(env, "AUTH_WINDOW", 300),
            hold_timeout=_int(env, "HOLD_TIMEOUT", 120),
            idempotency_ttl=_int(env, "IDEMPOTENCY_TTL", 86400),
            journal_archive_after=_int(env, "JOURNAL_ARCHIVE_AFTER", 86400),
            journal_archive_dir=Path(env["JOURNAL_ARCHIVE_DIR"]) if env.get("JOURNAL_ARCHIVE_DIR") else None,
            max_body=_int(env, "MAX_BODY", 1024 * 1024),
            validate_base_price=_int(env, "PRICE_VALIDATE_BASE", 100),
            validate_per_document=_int(env, "PRICE_VALIDATE_PER_DOCUMENT", 20),
            max_documents=_int(env, "MAX_DOCUMENTS", 500),
            qa_workers=_int(env, "QA_WORKERS", 1),
            qa_lease=_int(env, "QA_LEASE", 30),
            qa_max_attempts=_int(env, "QA_MAX_ATTEMPTS", 3),
            qa_max_active=_int(env, "QA_MAX_ACTIVE", 20),
            crowd_lease=_int(env, "CROWD_LEASE", 600),
            crowd_dispute=_int(env, "CROWD_DISPUTE_SECONDS", 86_400),
            crowd_stake_percent=_int(env, "CROWD_STAKE_PERCENT", 20),
            payee_xpub=env.get("PAYEE_XPUB") or None,
            payee_branch=_int(env, "PAYEE_BRANCH", 0),
            invoice_address_pool=_int(env, "INVOICE_ADDRESS_POOL", 20),
            invoice_addresses_per_client=_int(env, "INVOICE_ADDRESSES_PER_CLIENT", 3),
            chain=env.get("CHAIN") or None,
            chain_url=env.get("CHAIN_URL") or None,
            chain_cookie=env.get("CHAIN_COOKIE") or None,
            onchain_max_zeroconf=_int(env, "ONCHAIN_MAX_ZEROCONF", 50_000),
            deposit_confirmations=_int(env, "DEPOSIT_CONFIRMATIONS", 3),
            reorg_safe_depth=_int(env, "REORG_SAFE_DEPTH", 100),
            usd_rate=env.get("USD_RATE", "60000"),
            usd_rate_url=env.get("USD_RATE_URL") or None,
            usd_rate_path=env.get("USD_RATE_PATH", "bitcoin.usd"),
            usd_rate_max_age=_int(env, "USD_RATE_MAX_AGE", 60),
            rate_limit_ip=_int(env, "RATE_LIMIT_IP_PER_MINUTE", 3000),
            rate_limit_account=_int(env, "RATE_LIMIT_ACCOUNT_PER_MINUTE", 1200),
            trust_proxy=env.get("TRUST_PROXY", "") in ("1", "true", "yes"),
            trusted_proxy_hops=_int(env, "TRUSTED_PROXY_HOPS", 1),
            trusted_proxies=tuple(e.strip() for e in env.get("TRUSTED_PROXIES", "").split(",") if e.strip()),
            webhook_allow_http=env.get("WEBHOOK_ALLOW_HTTP", "") in ("1", "true", "yes"),
            webhook_allow=tuple(e.strip() for e in env.get("WEBHOOK_ALLOW", "").split(",") if e.strip()),
            withdrawal_hold_days=_int(env, "WITHDRAWAL_HOLD_DAYS", 14),
            github_api_url=env.get("GITHUB_API_URL", "https://api.github.com"),
            minimum_withdrawal=_int(env, "MINIMUM_WITHDRAWAL", 10_000),
            log_level=env.get("LOG_LEVEL", "info"),
        )
        settings = settings.with_(**overrides) if overrides else settings
        from .webhooks import Policy  # noqa: PLC0415

        try:
            Policy.parse(settings.webhook_allow_http, settings.webhook_allow)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        for entry in settings.trusted_proxies:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ConfigError(f"TRUSTED_PROXIES: {entry!r} is not a network") from None
        if not 0 <= settings.payee_branch < 2 ** 31:
            raise ConfigError("PAYEE_BRANCH must be between 0 and 2^31-1 (a non-hardened BIP32 index)")
        if settings.invoice_addresses_per_client < 0:
            raise ConfigError("INVOICE_ADDRESSES_PER_CLIENT must be 0 (no cap) or more")
        if settings.trusted_proxy_hops < 1:
            raise ConfigError("TRUSTED_PROXY_HOPS must be at least 1")
        return settings

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_url", public_origin(self.public_url))

    def with_(self, **changes) -> "Settings":
        return replace(self, **changes)

    @property
    def archive_dir(self) -> Path:
        """Where journal entries archived out of Redis are kept (journal_archive.py)."""
        return self.journal_archive_dir or self.var_dir / "journal"

    @property
    def caip2(self) -> str:
        return NETWORKS[self.network]
