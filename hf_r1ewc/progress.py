"""Progress bars that behave in terminals and in log files alike."""

from __future__ import annotations

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
