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

# Background work: the request path wins the CPU. Under full load the flusher gets little of it
# and events wait in the spool (bounded by its cap); it catches up as soon as the CPU is free.
try:
    os.nice(19)  # threads inherit it, chDB's included
except OSError:
    pass

from keysvc.analytics.flusher import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(stopped=_stopped))
