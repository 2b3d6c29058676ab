"""Progress lines for the stages of a run."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class Stage:
    """Logs start and finish lines with timings for one stage."""

    def __init__(self, number: int, total: int, name: str):
        self.label = f"[{number}/{total}] {name}"

    def __enter__(self):
        self.start = time.perf_counter()
        logger.info("%s ...", self.label)
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            logger.info("%s done in %.1f s", self.label, time.perf_counter() - self.start)


def progress_logger(stage: str):
    def report(done: int, total: int, name: str, elapsed: float):
        logger.info("    %s %d/%d (%s) %.1f s", stage, done, total, name, elapsed)

    return report
