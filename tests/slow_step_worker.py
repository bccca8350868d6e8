"""Run by tests/test_hostile.py under ``deepspeed``: ``launchers/train.py`` with every optimizer step
made ``IAIS_TEST_STEP_DELAY_S`` seconds slower, so that a signal reaching the ranks and their launcher
at once finds the ranks mid-step: the launcher's reaction (it terminates the ranks' process trees)
comes first, the ranks' stop check after it. The delay is injected here, never in the library."""

import os
import runpy
import sys
import time

from iais_scale.engine import Trainer

delay = float(os.environ.get("IAIS_TEST_STEP_DELAY_S", "0"))
step = Trainer.train_step


def slow_step(self, batches):
    time.sleep(delay)
    return step(self, batches)


Trainer.train_step = slow_step
sys.argv[0] = "launchers/train.py"
runpy.run_path("launchers/train.py", run_name="__main__")
