"""The `kd` console script's entry point: Ctrl-C is one line from the very first moment.

Importing the command line (torch, timm, accelerate) takes a second or two; a Ctrl-C in that
time would print a traceback from the middle of some import. So this module, which imports
nothing heavy, installs a handler first, then imports and runs `cli.main`.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    sys.stderr.write("kd: interrupted\n")
    sys.stderr.flush()
    os._exit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGINT, _interrupted_while_starting)
    from lspp_kd.cli.main import main as run

    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, KeyboardInterrupt as usual
    run()
