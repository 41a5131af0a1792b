"""`ticketc unpack DIR -o DENSE_DIR`: dense safetensors back from a packed directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ticketc.pack import unpack

NAME = "unpack"
HELP = "write dense safetensors from a packed (or compressed-tensors sparse) directory"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "packed",
        help="a directory written by ticketc pack, or a Hugging Face directory in "
        "compressed-tensors' sparse-bitmask / sparse-24-bitmask format",
    )
    parser.add_argument("-o", "--output", metavar="DENSE_DIR", required=True)
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accept a directory whose config.json names code from the directory (auto_map)",
    )
    parser.add_argument("--json", action="store_true", help="print the written files as JSON")


def run(args: argparse.Namespace) -> int:
    files = unpack(args.packed, Path(args.output), trust_remote_code=args.trust_remote_code)
    sizes = {f.name: f.stat().st_size for f in files}
    if args.json:
        print(json.dumps({"path": args.output, "files": sizes}, indent=2))
    else:
        total = sum(sizes.values())
        print(f"wrote {len(files)} dense file(s), {total:,} B, to {args.output}")
    return 0
