"""What SIGTERM and Ctrl-C (SIGINT) do to a training run.

The first of either asks the loop to finish its step, save a checkpoint and
exit (``train.stop.StopRequest``); a Ctrl-C says so at once on stderr, since a
save can take a while. A second Ctrl-C stops the process at once, without
saving: Orbax writes each checkpoint under a temporary name, so the last
complete checkpoint is never harmed. A second SIGTERM changes nothing.
"""

from __future__ import annotations

import os
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)
INTERRUPT_EXIT = 130   # 128 + SIGINT, as shells report it


def _say(text: str) -> None:
  # os.write, not print: a signal handler may run in the middle of a print.
  os.write(2, (text + "\n").encode())


def on_signal(signum: int, already_signalled: bool) -> None:
  """Called by the handler of SIGNALS before it records the stop request."""
  if signum != signal.SIGINT:
    return
  if already_signalled:
    _say("Stopped at once on a second Ctrl-C: nothing saved since the last "
         "checkpoint")
    os._exit(INTERRUPT_EXIT)
  _say("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C "
       "again stops at once, unsaved)")
