"""Progress bars honour TQDM_DISABLE (an explicit disable=False used to override it) and log files."""

from __future__ import annotations

from hf_r1ewc.progress import LOG_FILE_INTERVAL_SECONDS, progress_bar


def test_tqdm_disable_wins_over_show(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert progress_bar(range(3), show=True).disable


def test_hidden_when_not_shown_and_rare_in_log_files(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress_bar(range(3), show=False).disable
    bar = progress_bar(range(3), show=True)  # pytest captures stderr: not a terminal
    assert not bar.disable and bar.mininterval == LOG_FILE_INTERVAL_SECONDS
