"""report.html: self-contained (every image a PNG data URI), every section present, a comparison of several runs,
and a real render in headless Chromium (Debian's ``chromium``; setup.sh installs it): the page loads, no image is
broken, and the screenshot is not blank."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
from conftest import ROOT

from hf_r1ewc.report import write_report


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _image_sources(page: str) -> list[str]:
    parser = _Images()
    parser.feed(page)
    return parser.sources


def test_the_run_writes_a_self_contained_report_with_every_section(two_task_run):
    from PIL import Image

    page = (two_task_run / "report.html").read_text()
    for section in ("FID matrix", "accuracy matrix", "AFID@k", "loss per epoch", "penalty-gradient ratio"):
        assert section in page
    assert "Fisher at the end of each task" in page and "Settings (run_manifest.json)" in page
    sources = _image_sources(page)
    # the class x task grid, samples after tasks 1 and 2, FID and accuracy matrices, AFID@k, loss, penalty ratio
    assert len(sources) == 8
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing outside the page


def test_several_runs_get_a_comparison_and_a_paired_table(two_task_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    results = json.loads((two_task_run / "results.json").read_text())
    method = results["method"]
    results["method"] = "a variant"
    results["fid"] = {k: {i: v + 1.0 for i, v in row.items()} for k, row in results["fid"].items()}
    results["afid"] = {k: v + 1.0 for k, v in results["afid"].items()}
    (other / "results.json").write_text(json.dumps(results))
    page = write_report([two_task_run, other], tmp_path / "report.html", paired_against=method).read_text()
    assert "Comparison (mean ± standard error over runs)" in page and "Paired against" in page
    assert '<td>a variant</td><td class="n">1</td><td>1.00</td>' in page  # ΔAFID@T = +1 on the shared seed


def test_the_report_command_refuses_a_folder_without_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "hf_r1ewc.evaluate", "report", str(tmp_path)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode != 0 and "has no results.json" in proc.stderr


@pytest.mark.browser
def test_the_report_renders_in_headless_chromium(two_task_run, tmp_path):
    import numpy as np
    from PIL import Image

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("headless Chromium is needed: `apt-get install chromium` (setup.sh does this)")
    probe = tmp_path / "probe.html"  # the report, plus a script that counts the images that failed to load
    script = (
        "<script>window.addEventListener('load', () => { const images = [...document.images]; "
        "document.body.dataset.images = images.length; "
        "document.body.dataset.broken = images.filter(i => !i.complete || i.naturalWidth === 0).length; });</script>"
    )
    probe.write_text((two_task_run / "report.html").read_text().replace("</body>", script + "</body>"))
    flags = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    images = re.search(r'data-images="(\d+)"', dom.stdout)
    broken = re.search(r'data-broken="(\d+)"', dom.stdout)
    assert images and broken, f"the page did not load:\n{dom.stderr[-2000:]}"
    assert int(images.group(1)) == 8 and int(broken.group(1)) == 0
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, "--window-size=1200,2400", f"--screenshot={shot}", (two_task_run / "report.html").as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2400, 1200)
    assert (pixels < 200).mean() > 0.02 and pixels.std() > 20  # text, figures and samples, not a blank page


def test_a_folder_name_with_mathtext_in_it_is_drawn_as_written(two_task_run, tmp_path):
    """--output_dir 'run$\\bad$': the loss-curve panel's title (the folder's name) used to be parsed as mathtext,
    ParseFatalException, and no report.html; `evaluate report` failed the same way. A method name with '$' too."""
    import shutil

    from hf_r1ewc.plots import plot_afid_curves
    from hf_r1ewc.report import write_report

    folder = shutil.copytree(two_task_run, tmp_path / "run$\\bad$", ignore=shutil.ignore_patterns(".lock"))
    page = write_report([folder], tmp_path / "report.html").read_text()
    assert "run$\\bad$" in page and len(_image_sources(page)) == 8
    plot_afid_curves({"$\\sqrt{x$": {1: (1.0, 0.1), 2: (2.0, 0.2)}}, tmp_path / "afid.png")
    assert (tmp_path / "afid.png").stat().st_size > 0
