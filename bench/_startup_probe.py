"""A callback for bench_startup.py: at the first optimizer step, write the wall clock to the file
named by $LUCATRAIN_STARTUP_PROBE and end the process (the rest of the run is not what is measured)."""

from __future__ import annotations

import os
import time

from lucatrain.callbacks import StepCallback


class FirstStep(StepCallback):
    name = "startup_probe"

    def after_step(self, engine) -> None:
        with open(os.environ["LUCATRAIN_STARTUP_PROBE"], "w") as out:
            out.write(repr(time.time()))
        os._exit(0)  # the demo's other 399 steps are not start-up
