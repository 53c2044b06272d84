"""The `yoda` console command: argument parsing only; every subcommand calls the Python API."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import NoReturn

from yoda import __version__
from yoda.errors import YodaError

#: Subcommands, each a module of ``yoda.commands`` exposing ``register(subparsers)``.
COMMANDS = ("phantom", "check_data", "train", "translate", "evaluate", "demo", "bench", "convert")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (exit code 2), like YodaError's."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every available subcommand."""
    parser = _Parser(
        prog="yoda",
        description="Medical image translation by 2.5D diffusion, sampled as one-step regression.",
    )
    parser.add_argument("--version", action="version", version=f"yoda {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of errors (any position)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"yoda.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"yoda.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (library messages may span several)."""
    return " ".join(part.strip() for part in str(exc).splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    if extra and not getattr(args, "accepts_extra", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    args.debug = debug
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except YodaError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"yoda {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"yoda {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: still one line unless --debug
        if args.debug:
            raise
        print(
            f"yoda {args.command}: internal error: {type(exc).__name__}: {_one_line(exc)} "
            "(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 3
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
