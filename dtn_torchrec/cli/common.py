"""What the worker commands (``dtn-train``, ``dtn-predict``, ``dtn-analyze``) share: the trailing
``dotted.key=value`` config overrides and the way they fail."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from dtn_torchrec.distributed.launch import shutdown_and_exit
from dtn_torchrec.distributed.library_warnings import show_library_warnings
from dtn_torchrec.train.run_dir import ALLOW_CONFIG_CHANGE_FLAG


def add_overrides_argument(parser: argparse.ArgumentParser, example: str = "") -> None:
    """Adds the positional ``dotted.key=value`` overrides of the run config (values read as YAML)."""
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="dotted.key=value",
        help="config overrides, the value read as YAML" + (f" (e.g. {example})" if example else ""),
    )


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """Adds ``--verbose``: library warnings known to be harmless are shown too."""
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="also show the library warnings known to be harmless (silenced by default; "
        "see dtn_torchrec/distributed/library_warnings.py)",
    )


def apply_verbose(args: argparse.Namespace) -> None:
    """Acts on ``--verbose`` (before the process group starts)."""
    if args.verbose:
        show_library_warnings()


def add_allow_config_change_argument(parser: argparse.ArgumentParser) -> None:
    """Adds the flag that accepts a model config differing from the run's ``config.yaml``."""
    parser.add_argument(
        ALLOW_CONFIG_CHANGE_FLAG,
        action="store_true",
        help="use the given model config although it differs from the run's config.yaml "
        "(default: refuse, naming the differing keys)",
    )


def fail(prog: str, code: int, message: str) -> NoReturn:
    """Prints ``<prog>: error: <message>`` as one line, the last on stderr, then leaves the process
    group and exits with ``code`` (1 = run failed, 2 = bad command line or config)."""
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr, flush=True)
    shutdown_and_exit(code)
