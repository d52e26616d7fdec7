"""The `msd` command line: one sub-command per pipeline stage, each in its own module of this package.

A sub-command module defines `register(subparsers)`, which adds its parser and sets `handler` to a function taking
the parsed arguments and returning an exit code. User errors (MSDError) print one line without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

from msd.errors import MSDError

SUBCOMMAND_MODULES = [
    "msd.cli.generate",
    "msd.cli.bench",
    "msd.cli.embedded",
    "msd.cli.prepare_data",
    "msd.cli.train",
    "msd.cli.convert",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="msd",
        description="Lossless speculative decoding for vision-language models with a multimodal draft.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="log warnings and errors only, without loading progress bars"
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from msd.targets.batch_invariant import request_strict_mkl

    request_strict_mkl()  # before any subcommand multiplies: bfloat16 tree verification needs it
    arguments = build_parser().parse_args(argv)
    level = logging.INFO
    if arguments.verbose:
        level = logging.DEBUG
    elif arguments.quiet:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if arguments.quiet:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    previous = None
    if threading.current_thread() is threading.main_thread():  # only the main thread may set signal handlers
        previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        return arguments.handler(arguments) or 0
    except MSDError as error:
        print(f"msd {arguments.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"msd {arguments.command}: interrupted{RESUME_HINTS.get(arguments.command, '')}", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


#: what to do after an interruption, for the commands that can continue where they stopped
RESUME_HINTS = {
    "prepare-data": ". Run the same command again to continue after the last committed shard.",
    "train": ". Run the same command with --resume to continue from the last checkpoint in --output.",
}


def interrupt(signum, frame) -> None:
    """Handle SIGTERM (sent by timeout, docker stop and job schedulers) as Ctrl-C, so that the clean-up of partly
    written files runs."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
