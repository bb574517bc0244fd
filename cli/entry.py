"""The ``bagel-rt`` console script: signals first, then the (slow) imports, then the click group.

Importing torch takes seconds; a Ctrl-C then, or a SIGTERM at any time, ends the process with one line on stderr
instead of a traceback. SIGTERM is turned into ``SystemExit`` so that ``finally`` blocks run: an image being
written leaves no temporary file behind (:func:`bagel_rt.cli.options._save_image`).
"""

import signal
import sys


def _terminated(signum, frame):
    sys.stderr.write("error: terminated (SIGTERM); no output was left half-written\n")
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated)
    try:
        from .main import cli
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted (Ctrl-C) while starting\n")
        sys.exit(130)
    cli()


if __name__ == "__main__":
    main()
