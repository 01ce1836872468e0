"""The ``rnntool`` console script (and ``python -m rnntool``).

Before anything slow is imported, SIGINT, SIGTERM and SIGHUP are made to exit
quietly with 128 + the signal number (130, 143, 129): during start-up there is
nothing to clean up, and a traceback from inside an import would be noise.
Then the command line is imported and run; ``rnntool.cli`` installs the
handlers a running command needs (``cleanup.install_cli_handlers``).
"""

import os
import signal


def _startup_exit(signum, frame):  # pragma: no cover - exercised through subprocesses
    os._exit(128 + signum)


def main() -> None:
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _startup_exit)
    from . import cleanup

    cleanup.install_startup_handlers()  # the same, and also removes registered files
    from . import cli

    cli.main()


if __name__ == "__main__":
    main()
