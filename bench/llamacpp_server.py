"""llama.cpp's own HTTP server on a GGUF, through the `xllamacpp` package: the serving baseline.

Run by the Python of a venv of its own (serve_compare.py starts it as a subprocess):

    python3.11 -m venv V && V/bin/pip install xllamacpp
    V/bin/python bench/llamacpp_server.py --model M.gguf --port 8080 --parallel 64 --ctx 32768 --threads 2

`xllamacpp.Server(params)` loads the model and serves llama.cpp's server (continuous batching,
`--parallel` slots, OpenAI `/v1/completions` and llama.cpp's `/health`, `/props`) from a
background thread; this process only keeps it alive until SIGTERM. Prints one JSON line with the
build's CPU features (llama.cpp's system info) and the address once it listens.
Only the standard library and xllamacpp: it runs outside budrt's venv.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="GGUF path")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--parallel", type=int, default=64, help="slots (sequences decoded together)")
    p.add_argument("--ctx", type=int, default=32768, help="KV cache tokens, shared by all slots")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import xllamacpp as xlc

    params = xlc.CommonParams()
    params.model.path = args.model
    params.n_parallel = args.parallel
    params.n_ctx = args.ctx
    # One KV pool for all slots (as budrt's paged cache): a slot may hold a long prompt while
    # the others are short, instead of each slot getting ctx / parallel tokens.
    params.kv_unified = True
    params.cont_batching = True
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    params.hostnames = ["127.0.0.1"]
    params.port = args.port
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = xlc.Server(params)
    info = {
        "xllamacpp": xlc.__version__,
        "system_info": xlc.get_system_info().strip(),
        "address": server.listening_address,
        "n_ctx": args.ctx,
        "n_parallel": args.parallel,
        "threads": args.threads,
    }
    print(json.dumps(info), flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
