"""`python -m instructlm`, but stopped by Ctrl-C as training step N begins:
    interrupted.py N ARGS...   (for torchrun, which starts a script in every process)"""

import sys

from instructlm.cli import main
from instructlm.training.optimize import TrainStep

stop_at, calls, real = int(sys.argv[1]), [], TrainStep.__call__


def call(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == stop_at:
        raise KeyboardInterrupt
    return real(self, *args, **kwargs)


TrainStep.__call__ = call
sys.exit(main(sys.argv[2:]))
