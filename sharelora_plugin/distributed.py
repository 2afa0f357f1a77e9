"""Processes of a distributed launch, and the plugin's logger.

Logging convention: every plugin module logs to ``LOG`` (stdlib, logger ``axolotl.integrations.sharelora``), inside
the ``axolotl`` logger tree whose handlers and format Axolotl's logging config sets up; a message logged there
appears on every process that logs it. The plugin's hooks log through Axolotl's adapter of the same logger
(:func:`main_process_logger`), which prints on the main process only.
"""

from __future__ import annotations

import logging
import os
from typing import Any

LOGGER_NAME = "axolotl.integrations.sharelora"
LOG = logging.getLogger(LOGGER_NAME)


def main_process_logger():
    """Axolotl's logger adapter for :data:`LOGGER_NAME`: logs on the main process only."""
    from axolotl.utils.logging import get_logger

    return get_logger(LOGGER_NAME)


def distributed_state():
    """accelerate's process state in a multi-process launch (``WORLD_SIZE`` > 1), else ``None``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState()


def cpu_only_multiprocess() -> bool:
    """A multi-process launch on a machine without CUDA (DDP over gloo)."""
    import torch

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def init_cpu_process_group() -> None:
    """On a CPU-only multi-process launch, make accelerate's process state multi-CPU (gloo): otherwise it is
    created single-process, the Trainer does not wrap the model in DDP and every rank trains alone."""
    if cpu_only_multiprocess():
        from accelerate import PartialState

        # `accelerate launch --multi_gpu` exports ACCELERATE_USE_CPU=False; the Trainer re-creates the state
        # from it, so it must say CPU too
        os.environ["ACCELERATE_USE_CPU"] = "true"
        state = PartialState(cpu=True)
        if state.num_processes < 2:
            LOG.warning(
                "WORLD_SIZE>1 but accelerate's process state is single-process; gradients will not sync"
            )


def process_index() -> int:
    """This process's rank (0 in single-process runs)."""
    return int(os.environ.get("RANK", "0"))


def log_all_ranks(message: str, *args: Any) -> None:
    """Log on every process (Axolotl's adapter logs on the main process only)."""
    LOG.info(message, *args)


def is_main_process() -> bool:
    """True on the process that writes files (rank 0) and in single-process runs."""
    state = distributed_state()
    return state is None or state.is_main_process
