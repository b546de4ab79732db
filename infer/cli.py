"""What every command line here shares: bad arguments exit 2 with one line (argparse's usage block is noise)."""

from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_BAD_INPUT = 2  # a bad flag, file or setting (argparse's own code)


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {message}\n")
