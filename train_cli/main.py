"""``fair`` command: one sub-command module per job, each with ``register(subparsers)``.

Errors that a user can fix (bad file, bad target, missing model) are raised as :class:`CliError` or
as fair_core's ``ValueError`` subclasses and printed as one line, exit code 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from fair_core.terminal import escape
from train_cli import adaptor_cmd, classifier_cmd, demo_cmd, eval_cmd, train_cmd

SUBCOMMANDS = (train_cmd, eval_cmd, demo_cmd, classifier_cmd, adaptor_cmd)


class CliError(Exception):
    """A user-facing error: printed as ``error: <message>`` with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fair",
        description="Fair adaptors: train, inspect and audit adaptors that make generated people follow a target distribution.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ValueError, FileNotFoundError) as error:
        print(f"error: {escape(str(error))}", file=sys.stderr)  # messages quote names from files: one line each
        return 2
    except OSError as error:  # a full disk, an unwritable or missing folder, a file where a folder should be
        where = f"{error.filename}: " if error.filename else ""
        print(f"error: {escape(f'{where}{error.strerror or error}')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
