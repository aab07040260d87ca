"""Helpers for the identity tests: a gateway over real HTTP with keys of every role."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from budrt.config import DeploymentConfig, Settings
from budrt.gateway.app import create_app
from budrt.store.db import migrate
from budrt.store.keys import KeyStore
from tests.mock_upstream import ServerThread

CHAT = "/v1/chat/completions"


@dataclass
class Gateway:
    server: ServerThread
    store: KeyStore
    settings: Settings

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, key: str, timeout: float = 10) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)

    def stop(self) -> None:
        self.server.stop()
        self.store.db.dispose()


def settings(
    home: Path, upstream_url: str, models: list[str], gateway: dict[str, Any] | None = None, **extra: Any
) -> Settings:
    """`gateway`: settings of the gateway section on top of the tests' usual ones."""
    deployments = [DeploymentConfig(model=m, endpoints=[upstream_url]) for m in models]
    return Settings(
        home=home,
        secret_key="test-secret-test-secret",
        deployments=deployments,
        gateway={"health_interval_s": 0.2, "connect_timeout_s": 1.0, **(gateway or {})},
        **extra,
    )


def start(settings: Settings) -> Gateway:
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    return Gateway(ServerThread(create_app(settings, key_store=store)).start(), store, settings)


def chat(model: str, **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
