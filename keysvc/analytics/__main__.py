"""`python -m keysvc.analytics`: the node's analytics flusher, as `keysvc serve` starts it."""
import os
import signal
import sys

# First of all, before the heavier imports: a SIGTERM from now on asks for a drain instead of
# killing a flusher that has not started yet (keysvc serve waits for this handler to be installed
# before it sends one).
_stopped: list[bool] = [False]


def _early_stop(*_: object) -> None:
    _stopped[0] = True


signal.signal(signal.SIGTERM, _early_stop)
signal.signal(signal.SIGINT, _early_stop)

# chDB creates its files 0644 and its directories 0755: keysvc's files are for its user only.
os.umask(0o077)

# Background work: the request path wins the CPU. Under full load the flusher gets little of it
# and events wait in the spool (bounded by its cap); it catches up as soon as the CPU is free.
# Except for its writes to the spool, whose lock the workers share (see priority.py).
from keysvc.analytics import priority  # noqa: E402

priority.start()


def _setup_logging(argv: list[str]) -> None:
    """The node's log format (keysvc.logs) for this process too, from the config main() reads:
    main()'s own logging.basicConfig then leaves it alone. A config that cannot be read is for
    main() to report."""
    try:
        from keysvc import logs
        from keysvc.config import from_json, load

        raw = os.environ.get("KEYSVC_CONFIG_JSON")
        path = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
        if "--config" in argv[:-1]:
            path = argv[argv.index("--config") + 1]
        config = load(path) if path or not raw else from_json(raw)
        logs.setup(config, "flusher")
    except Exception:  # noqa: BLE001
        pass


_setup_logging(sys.argv[1:])

from keysvc.analytics.flusher import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(stopped=_stopped))
