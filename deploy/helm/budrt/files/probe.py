"""Kubelet exec probe of a budrt model server: GET one health route on this pod's own port.

Why exec and not httpGet: `/health/ready` answers only the internal key (a bearer token that
must come from a Secret, which httpGet headers cannot read), and with TLS the server takes only
clients holding a certificate from the platform CA. This script sends both, from the container's
own environment and files. Standard library only: it starts in tens of milliseconds.

Usage: python probe.py PATH PORT [TLS_DIR]   (exit 0 = healthy; the reason goes to stdout)
"""

from __future__ import annotations

import http.client
import os
import ssl
import sys
from pathlib import Path

TIMEOUT_S = 4.0


def connection(port: int, tls_dir: str | None) -> http.client.HTTPConnection:
    if not tls_dir:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT_S)
    folder = Path(tls_dir)  # the files budrt itself issued at start (security/certs.py)
    context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    context.load_cert_chain(folder / "client.pem", folder / "client.key")
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=TIMEOUT_S, context=context)


def probe(path: str, port: int, tls_dir: str | None) -> tuple[bool, str]:
    key = os.environ.get("BUDRT_INTERNAL_KEY", "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        conn = connection(port, tls_dir)
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        body = response.read(300).decode(errors="replace")
        conn.close()
    except (OSError, ssl.SSLError) as exc:  # not listening yet, certificates not issued yet
        return False, f"{type(exc).__name__}: {exc}"
    return response.status == 200, f"HTTP {response.status}: {body}"


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__)
        return 2
    ok, reason = probe(argv[1], int(argv[2]), argv[3] if len(argv) == 4 else None)
    print(reason)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
