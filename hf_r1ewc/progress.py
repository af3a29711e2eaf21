"""Progress bars and log lines that behave in terminals and in log files alike."""

from __future__ import annotations

import logging
import os
import sys
from typing import Iterable

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
