"""`ticketc` command line: thin wrappers, one module per subcommand in ticketc.commands."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import signal
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import NoReturn

from ticketc import __version__
from ticketc.commands import COMMANDS
from ticketc.errors import UserError, first_line

RUNS_CODE = (
    "Reading a file never runs code from it. Only these flags run code: --arch MODULE:FACTORY "
    "(export, compile, verify, inspect, pack, bench, report), find --model MODULE:FACTORY and "
    "find --data MODULE:FACTORY import and call the factory you name (the current folder is on "
    "the import path); --trust-pickle (export, compile, verify, inspect, pack, bench) unpickles "
    "what the file holds; --trust-remote-code (export, compile, verify, pack, bench) runs the "
    "code a Hugging Face directory's config.json names. Each is marked '(runs code)' in the "
    "command's --help."
)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the usage block stays in --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ticketc",
        description="Turn lottery tickets into deployable sparse models.",
        epilog=RUNS_CODE,
    )
    parser.add_argument("--version", action="version", version=f"ticketc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"ticketc.commands.{name}")
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


@contextlib.contextmanager
def _library_logs_hidden() -> Iterator[None]:
    """Keep library log records (torch.export's fake-tensor tracebacks on a wrong input shape,
    dynamo's and transformers' chatter) and library warnings (torch's "LSTM with projections
    is not supported with oneDNN" before a refusal, its pytree deprecations) off stderr while
    a command runs: a failure is reported by ticketc's one line, and ticketc itself prints
    notes rather than logging or warning. torch re-creates its log handlers while tracing, so
    nothing short of logging.disable holds. TICKETC_DEBUG=1 shows them."""
    if os.environ.get("TICKETC_DEBUG"):
        yield
        return
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(before)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 1 internal error, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line usage error
        return int(e.code or 0)
    try:
        with _library_logs_hidden():
            return int(args._run(args))
    except UserError as e:
        print(f"ticketc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ticketc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader left (`ticketc inspect --json | head`): quietly,
        # as the shell tools do; stdout goes to devnull so that Python's own flush at exit
        # raises nothing more
        with contextlib.suppress(OSError, ValueError):  # a stdout with no file descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as e:  # a full disk, a vanished or unreadable file, a quota
        print(f"ticketc: error: {_os_error(e)}", file=sys.stderr)
        return 2
    except MemoryError:
        print("ticketc: error: out of memory", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - the last line of defence for users
        if (line := _out_of_memory_line(e)) is not None:
            print(f"ticketc: error: out of memory ({line})", file=sys.stderr)
            return 2
        if os.environ.get("TICKETC_DEBUG"):
            traceback.print_exc()
        print(
            f"ticketc: internal error: {type(e).__name__}: {e} "
            "(set TICKETC_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


def _out_of_memory_line(e: Exception) -> str | None:
    """The line of `e` that says an allocator failed, where a library raised that as its own
    error (torch's DefaultCPUAllocator a RuntimeError, onnxruntime's allocators a Fail or
    RuntimeException); None for any other error."""
    signs = ("can't allocate memory", "Cannot allocate memory", "Failed to allocate memory")
    for line in str(e).splitlines():
        if any(sign in line for sign in signs):
            return line.strip()[:200]
    return None


def _os_error(e: OSError) -> str:
    """One line for an OSError that escaped the readers and writers: the path and the reason."""
    reason = e.strerror or first_line(e, 300)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        reason += " (the disk is full)"
    return f"{e.filename}: {reason}" if e.filename else reason


def entry() -> None:
    code = main()
    distributed = sys.modules.get("ticketc.find.distributed")  # imported by find alone
    if distributed is not None and distributed.ends_without_shutdown():
        # a torchrun rank of `find`: everything is written and closed, and Python's shutdown
        # could abort the process (see ticketc.find.distributed.ends_without_shutdown)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
