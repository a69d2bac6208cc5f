"""The ``vcid`` command of the Python package: the Rust command line
(``vcid::cli::run``, through the extension module) with this process's
arguments, so ``pip install`` gives every subcommand of the binary. Owns
only the hand-over: signals and the exit status behave as in the binary.
Must not parse arguments itself."""

from __future__ import annotations

import signal
import sys
from typing import NoReturn, Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> NoReturn:
    from . import _native

    # Python turns SIGINT into KeyboardInterrupt, which it could only raise
    # after the command returned: give it back its default action (the
    # binary's), which `vcid serve` and `vcid demo --serve` replace with
    # their own graceful handlers. An ignored SIGINT (a background job)
    # stays ignored, as for the binary. SIGTERM and SIGPIPE already match.
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    args = list(sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(_native.run_cli(["vcid", *args]))
