"""Progress bars and log lines that behave in terminals and in log files alike."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Iterable, Iterator

from tqdm.auto import tqdm


LOG_FILE_INTERVAL_SECONDS = 60.0  # one line a minute instead of redraws when stderr is a file or a pipe


def progress_bar(iterable: Iterable | None = None, *, show: bool = True, **kwargs) -> tqdm:
    """``tqdm(iterable, **kwargs)``, off when ``show`` is False or ``TQDM_DISABLE`` is set (tqdm's own switch, which an
    explicit ``disable=`` argument would override), and redrawn at most once a minute when stderr is not a terminal."""
    if not show or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        kwargs["disable"] = True
    elif not sys.stderr.isatty():
        kwargs.setdefault("mininterval", LOG_FILE_INTERVAL_SECONDS)
    return tqdm(iterable, **kwargs)


class PhaseTimer:
    """Wall seconds spent in each named phase of a run (``with timer("training"): ...``), summed over its uses."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def add(self, other: "PhaseTimer") -> None:
        for phase, seconds in other.seconds.items():
            self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds

    def summary(self) -> str:
        """``"training 120 s (61 %), FID 40 s (20 %), ..."``, largest first."""
        total = sum(self.seconds.values()) or 1.0
        ranked = sorted(self.seconds.items(), key=lambda item: -item[1])
        return ", ".join(f"{phase} {seconds:.0f} s ({100 * seconds / total:.0f} %)" for phase, seconds in ranked)


class _AboveProgressBars(logging.StreamHandler):
    """Writes each record with ``tqdm.write``: the line lands above the open bars instead of inside them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging's own convention
            self.handleError(record)


def configure_logging(level: int = logging.INFO) -> None:
    """Timestamped log lines on stderr, written above the progress bars. huggingface_hub and datasets keep their own
    handler and stop propagating to this one (each of their warnings printed twice otherwise); Accelerate's
    file-by-file checkpoint messages are quieted (the training script logs one line per checkpoint)."""
    import datasets.utils.logging
    import huggingface_hub.utils.logging

    handler = _AboveProgressBars(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])  # a no-op where the root logger is set up already
    huggingface_hub.utils.logging.disable_propagation()
    datasets.utils.logging.disable_propagation()
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(name).setLevel(logging.WARNING)
