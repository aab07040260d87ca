"""Where a model server finds a model's files: the model registry and its local artifact cache, or a path.

`source: registry:<name>` looks the model up in the metadata DB and serves its repository
artifact through the local cache (digest-verified before every load); `source: sha256:<digest>`
names an artifact directly; anything else is a path or `package:` source as before.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from budrt.config import ModelConfig, Settings
from budrt.model_source import resolve_source
from budrt.observe.progress import NO_PROGRESS, ProgressReporter
from budrt.server.model_pool import Resolver

if TYPE_CHECKING:
    from budrt.store.artifact_cache import ArtifactCache
    from budrt.store.models import ModelStore

REGISTRY_PREFIX = "registry:"  # = budrt.store.models.REGISTRY_PREFIX (not imported: it pulls in alembic)
DIGEST_PREFIX = "sha256:"


def artifact_cache(settings: Settings) -> ArtifactCache:
    from budrt.store.artifact_cache import ArtifactCache

    return ArtifactCache(
        settings.artifact_cache_dir or settings.home / "artifacts", settings.artifact_cache_max_bytes
    )


def artifact_resolver(settings: Settings) -> Resolver:
    @functools.cache
    def parts() -> tuple[ModelStore, ArtifactCache]:  # opened on first use: most configs never need them
        from budrt.store.models import ModelStore

        return ModelStore.from_settings(settings), artifact_cache(settings)

    def resolve(cfg: ModelConfig, progress: ProgressReporter = NO_PROGRESS) -> ModelConfig:
        def fetched(done: int, total: int) -> None:  # bytes copied from the repository
            progress.report("fetch", done, total)

        if cfg.source.startswith(REGISTRY_PREFIX):
            store, cache = parts()
            name = cfg.source[len(REGISTRY_PREFIX) :]
            info = store.get(name)
            if info is None:
                raise FileNotFoundError(f"model {name!r} is not in the model registry (budrt models push)")
            path = cache.get(info.digest, store.repository, fetched)
            # The record's default parameters fill what the config leaves at budrt's defaults (the
            # runtime file sets every field, so "left at the default" is what can be told apart).
            fields = ModelConfig.model_fields
            defaults = {
                k: v
                for k, v in info.params.items()
                if k in fields and k not in ("name", "source") and getattr(cfg, k) == fields[k].default
            }
            return ModelConfig.model_validate({**cfg.model_dump(), **defaults, "source": str(path)})
        if cfg.source.startswith(DIGEST_PREFIX):
            store, cache = parts()
            path = cache.get(cfg.source[len(DIGEST_PREFIX) :], store.repository, fetched)
        else:
            path = resolve_source(cfg.source)
        return cfg.model_copy(update={"source": str(path)})

    return resolve
