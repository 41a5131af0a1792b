"""CLI subcommands, one module each.

Each module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`. The CLI
registers the modules listed in `COMMANDS`, in this order.
"""

COMMANDS = [
    "export",
    "compile",
    "verify",
    "inspect",
    "find",
    "report",
    "pack",
    "unpack",
    "bench",
]
