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


def test_hub_warnings_print_once_and_lines_go_above_the_bars():
    """huggingface_hub (and datasets) have a stderr handler of their own that also propagated to the root handler:
    every Hub warning printed twice. After configure_logging a Hub record reaches only the library's handler, and
    our own lines go through tqdm.write."""
    import logging

    import huggingface_hub.utils.logging

    from hf_r1ewc.progress import _AboveProgressBars, configure_logging

    class Recorder(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers = []  # a fresh process (pytest installs its own capture handlers)
    try:
        configure_logging()
        assert any(isinstance(h, _AboveProgressBars) for h in root.handlers)
        recorder = Recorder()
        root.addHandler(recorder)
        logging.getLogger("huggingface_hub.repocard").warning("unique-hub-warning")
        logging.getLogger("hf_r1ewc.test").warning("our line")
        assert recorder.messages == ["our line"]  # the Hub's warning printed once, by its own handler
        assert logging.getLogger("huggingface_hub").handlers
        assert logging.getLogger("accelerate.checkpointing").getEffectiveLevel() == logging.WARNING
    finally:
        root.handlers = saved
        huggingface_hub.utils.logging.enable_propagation()
        import datasets.utils.logging

        datasets.utils.logging.enable_propagation()


def test_phase_timer_sums_each_phase_and_ranks_them(monkeypatch):
    import hf_r1ewc.progress as progress

    clock = iter([0.0, 3.0, 10.0, 11.0, 20.0, 26.0])  # training 3 s, FID 1 s, training again 6 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    timer = progress.PhaseTimer()
    for phase in ("training", "FID", "training"):
        with timer(phase):
            pass
    assert timer.seconds == {"training": 9.0, "FID": 1.0}
    total = progress.PhaseTimer()
    total.add(timer)
    total.add(timer)
    assert total.seconds == {"training": 18.0, "FID": 2.0}
    assert total.summary() == "training 18 s (90 %), FID 2 s (10 %)"
