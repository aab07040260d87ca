"""The model registry: model records in the metadata DB, their bytes in the model repository."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from budrt.config import Settings
from budrt.model_source import resolve_source
from budrt.store.database import Database
from budrt.store.object_stores import make_repository_store, repository_url
from budrt.store.repository import ModelRepository, Progress, manifest_key
from budrt.store.tables import ModelRecord

REGISTRY_PREFIX = "registry:"  # ModelConfig.source naming a registered model


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    aliases: tuple[str, ...]
    task: str
    format: str
    source_uri: str
    digest: str
    size_bytes: int
    params: dict[str, Any]
    deployments: tuple[str, ...]
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return {
            **{k: getattr(self, k) for k in ("name", "task", "format", "source_uri", "digest", "size_bytes")},
            "aliases": list(self.aliases),
            "params": self.params,
            "deployments": list(self.deployments),
            "created_at": self.created_at.isoformat(),
        }


def _info(row: ModelRecord) -> ModelInfo:
    return ModelInfo(
        row.name,
        tuple(row.aliases or ()),
        row.task,
        row.format,
        row.source_uri,
        row.digest,
        row.size_bytes,
        dict(row.params or {}),
        tuple(row.deployments or ()),
        row.created_at,
    )


class ModelStore:
    def __init__(self, db: Database, repository: ModelRepository, repository_url: str) -> None:
        self.db = db
        self.repository = repository
        self.repository_url = repository_url.rstrip("/")

    @classmethod
    def from_settings(cls, settings: Settings) -> ModelStore:
        repository = ModelRepository(make_repository_store(settings))
        return cls(Database.from_settings(settings), repository, repository_url(settings))

    def push(
        self,
        source: str,
        name: str,
        task: str,
        format: str,
        aliases: list[str] | None = None,
        params: dict[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> ModelInfo:
        """Upload a file or directory (a path or `package:<pkg>/<path>`) and register it as `name`."""
        path = resolve_source(source)
        manifest = self.repository.push(Path(path), progress)
        row = ModelRecord(
            name=name,
            aliases=list(aliases or []),
            task=task,
            format=format,
            source_uri=f"{self.repository_url}/{manifest_key(manifest.digest)}",
            digest=manifest.digest,
            size_bytes=manifest.size,
            params=dict(params or {}),
            deployments=[],
            created_at=datetime.now(UTC),
        )
        with self.db.writes.begin() as session:
            session.add(row)
            try:
                session.flush()
            except IntegrityError:
                raise ValueError(f"a model named {name!r} is already registered") from None
            return _info(row)

    def get(self, name: str) -> ModelInfo | None:
        with self.db.session() as session:
            for row in session.scalars(select(ModelRecord)):
                if row.name == name or name in (row.aliases or []):
                    return _info(row)
        return None

    def list(self) -> list[ModelInfo]:
        with self.db.session() as session:
            return [_info(r) for r in session.scalars(select(ModelRecord).order_by(ModelRecord.name))]

    def remove(self, name: str) -> ModelInfo | None:
        """Unregister; the artifact is deleted unless another record still uses the same bytes."""
        with self.db.writes.begin() as session:
            row = session.scalar(select(ModelRecord).where(ModelRecord.name == name))
            if row is None:
                return None
            info = _info(row)
            session.delete(row)
            shared = session.scalar(
                select(ModelRecord).where(ModelRecord.digest == info.digest, ModelRecord.name != name)
            )
        if shared is None:
            try:
                self.repository.remove(info.digest)
            except FileNotFoundError:
                pass  # already gone from the store: unregistering is what was asked
        return info

    def set_deployments(self, name: str, deployments: list[str]) -> None:
        """Record which model-server processes serve the model (the supervisor calls this at start)."""
        with self.db.writes.begin() as session:
            row = session.scalar(select(ModelRecord).where(ModelRecord.name == name))
            if row is not None:
                row.deployments = list(deployments)
