"""Metadata tables. Schema changes go through a new Alembic revision in `migrations/versions/`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class BudgetColumns:
    """Budgets per calendar period (UTC), added by revision 0004 (quotas); None = unlimited."""

    tokens_per_day: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    tokens_per_month: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    images_per_day: Mapped[int | None] = mapped_column(Integer, nullable=True)
    images_per_month: Mapped[int | None] = mapped_column(Integer, nullable=True)


class QuotaColumns(BudgetColumns):
    """Rates and budgets of a user or team, shared by all its keys (revision 0004)."""

    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ApiKey(BudgetColumns, Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(32), index=True)  # visible part, to tell keys apart
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # HMAC-SHA256 hex
    role: Mapped[str] = mapped_column(String(64), default="user")  # a role name (rbac.ROLE_NAME)
    models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # None = every model
    rpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    tpm: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Added by revision 0002 (identity): the owning user/team and an optional permission subset.
    # Plain columns, no foreign keys: SQLite can add them without rebuilding the table.
    user_id: Mapped[int | None] = mapped_column(Integer, nullable=True, index=True)
    team_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    permissions: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # None = the role's


class Team(QuotaColumns, Base):
    __tablename__ = "teams"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class User(QuotaColumns, Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)  # also what a JWT's user claim maps to
    team_id: Mapped[int | None] = mapped_column(ForeignKey("teams.id"), nullable=True)
    roles: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Role(Base):
    """A custom role; the built-in ones (admin, developer, viewer) live in code."""

    __tablename__ = "roles"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    permissions: Mapped[list[str]] = mapped_column(JSON, default=list)  # "action@resource"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(200))  # "key:3", "jwt:alice"
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class UsageRecord(Base):
    """One row per gateway request; written in batches by `budrt.gateway.metering`."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_key_at", "key_id", "at"),
        Index("ix_usage_user_at", "user", "at"),
        Index("ix_usage_at", "at"),
        Index("ux_usage_request_id", "request_id", unique=True),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    user: Mapped[str | None] = mapped_column(String(200), nullable=True)
    team: Mapped[str | None] = mapped_column(String(200), nullable=True)
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    endpoint: Mapped[str] = mapped_column(String(32))
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float)
    status: Mapped[int] = mapped_column(Integer)
    cache_hit: Mapped[bool] = mapped_column(Boolean, default=False)
    # Added by revision 0005: the meter's id for the request, unique, so a record replayed from
    # the spool after a crash is inserted once. None for rows written before it.
    request_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # Added by revision 0007: what an image request produced (0 for any other request).
    images: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    pixels: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # images x width x height
    steps: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # denoising steps, all images
    # Added by revision 0009: when the first byte of the answer left the gateway (a stream's first
    # chunk; the whole body otherwise). None for rows written before it.
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)


class ModelRecord(Base):
    """A model in the repository: what it is, where its bytes are, and who serves it."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True, index=True)
    aliases: Mapped[list[str]] = mapped_column(JSON, default=list)
    task: Mapped[str] = mapped_column(String(32))  # chat | embedding | image
    format: Mapped[str] = mapped_column(String(32))  # gguf | safetensors | sentence-transformers | diffusers
    source_uri: Mapped[str] = mapped_column(String(1000))  # where the bytes are (repository manifest)
    digest: Mapped[str] = mapped_column(String(64), index=True)  # sha256 of the manifest
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    params: Mapped[dict[str, object]] = mapped_column(JSON, default=dict)  # default ModelConfig fields
    deployments: Mapped[list[str]] = mapped_column(JSON, default=list)  # model servers serving it
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ConsoleSession(Base):
    """A signed-in web-console browser: the cookie's token is stored only as its SHA-256."""

    __tablename__ = "console_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex of the cookie token
    csrf: Mapped[str] = mapped_column(String(64))  # sent back in x-csrf-token by the console's scripts
    key_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)  # signed in with an API key
    id_token: Mapped[str | None] = mapped_column(Text, nullable=True)  # signed in with OIDC
    subject: Mapped[str] = mapped_column(String(200))  # who, for the audit log: "key:3", "jwt:alice"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
