"""`budrt gateway`: migrate, make sure an admin key exists, then serve (HTTPS with `tls.enabled`)."""

from __future__ import annotations

import gc
import logging
import math
import ssl
from pathlib import Path

import uvicorn

from budrt.config import Settings
from budrt.gateway.app import create_app
from budrt.observe.logging import setup_logging
from budrt.observe.startup import cannot_start, port_problem
from budrt.observe.tracing import setup_tracing
from budrt.protocol.http_server import BoundedHeadProtocol
from budrt.security import certs
from budrt.store.db import migrate
from budrt.store.keys import ADMIN_KEY_FILE, KeyStore

log = logging.getLogger("budrt.gateway")


def prepare(settings: Settings) -> KeyStore:
    """Migrate the database and create the first admin key (printed once to stdout)."""
    migrate(settings.database_url_resolved)
    store = KeyStore.from_settings(settings)
    try:
        admin = store.ensure_admin(settings)
    except ValueError as exc:  # a BUDRT_ADMIN_KEY no gateway would accept: say so, no traceback
        raise SystemExit(f"error: {exc}") from None
    if admin is not None:
        print(f"admin key: {admin} (saved to {Path(settings.home) / ADMIN_KEY_FILE})", flush=True)
    return store


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """With `tls.enabled`: the server context of the platform's certificates, made first if
    missing or due (`budrt certs init`); else None (plain HTTP)."""
    if not settings.tls.enabled:
        return None
    paths = certs.init(settings.tls, Path(settings.home))
    return certs.server_context(paths, require_client_cert=False)


def run_gateway(settings: Settings) -> None:
    setup_logging("gateway", settings.log_level, settings.log_format)
    problem = port_problem(settings.gateway.host, settings.gateway.port)
    if problem is not None:
        cannot_start(settings.home, "gateway", problem + "; choose another with --port")
    store = prepare(settings)
    if settings.gateway.workers != 1:
        # Rate limits and health state live in process memory; one process for now.
        log.warning("gateway.workers > 1 is not supported yet; running one worker")
    tracing = setup_tracing(settings.tracing, "budrt-gateway")
    app = create_app(settings, key_store=store, tracing=tracing)
    # The cyclic GC took ~20% of the CPU under load (bench/gateway_bench.py): each full
    # collection walked every object built at startup, and the first generation filled every
    # few requests with objects still in use. Startup objects live as long as the process, so
    # they are frozen out of its sight. The request path leaves almost no reference cycles
    # (checked with gc.DEBUG_SAVEALL under load), so a larger first generation only means
    # fewer collections, not more memory held.
    gc.freeze()
    gc.set_threshold(7000, 10, 10)
    context = tls_context(settings)
    config = uvicorn.Config(
        app,
        host=settings.gateway.host,
        port=settings.gateway.port,
        loop="uvloop",
        http=BoundedHeadProtocol,  # httptools, with the request head bounded
        access_log=False,
        log_config=None,  # keep the JSON logging set up above
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.supervisor.shutdown_grace_s),
        lifespan="on",
        # TLS 1.2+ with AEAD ciphers only (security/certs.py), which uvicorn's own options cannot say.
        ssl_context_factory=None if context is None else lambda _config, _default: context,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        store.db.dispose()
