"""What both command-line tools share: one-line argument errors and stderr logging."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, not a usage dump."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def configure_logging(verbose: bool) -> None:
    """Progress to stderr: INFO with ``-v``, warnings otherwise."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
