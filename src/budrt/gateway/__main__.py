import argparse
from pathlib import Path

from budrt.config import load_runtime
from budrt.gateway.main import run_gateway

parser = argparse.ArgumentParser(prog="python -m budrt.gateway")
parser.add_argument("--runtime", type=Path, required=True, help="resolved settings JSON from the supervisor")
run_gateway(load_runtime(parser.parse_args().runtime))
