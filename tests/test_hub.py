"""Hub artifacts without network.

Pulling goes through huggingface_hub's own offline code path: a pre-populated local cache in the standard layout
(models--OWNER--NAME/refs/<revision> -> snapshots/<commit>/...) with HF_HUB_OFFLINE=1. Pushing cannot reach a server
from these machines, so it goes through a recording stand-in for HfApi that checks the exact repo, branches and
file lists (the stand-in is the only fake here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_unet
from diffusers import DDIMScheduler

from hf_r1ewc.hub import TaskUploader, fid_markdown_table, write_folder_atomically, write_model_card
from hf_r1ewc.pipeline import ClassConditionalPipeline


REPO = "someone/continual-digits"


def _task_folder(path: Path, task_index: int = 1) -> Path:
    pipe = ClassConditionalPipeline(make_tiny_unet(), DDIMScheduler())
    pipe.save_pretrained(path)
    (path / "training_state.json").write_text(
        json.dumps({"task_index": task_index, "tasks": [[0, 1], [2, 3]], "run_config": {}, "method": "rank1 EWC + GD"})
    )
    fid = {1: {"1": 10.0}, 2: {"1": 13.0, "2": 20.0}}[task_index]
    (path / "metrics.json").write_text(json.dumps({"task": task_index, "fid": fid, "fid_backend": "classifier"}))
    (path / "fisher.safetensors").write_bytes(b"")  # name only: the pull test checks which files arrive
    (path / "evil.pkl").write_bytes(b"not to be fetched")
    return path


def _populate_cache(cache: Path, folder: Path, revision: str, commit: str = "a" * 40) -> None:
    repo_dir = cache / f"models--{REPO.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)


def _offline_python(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(Path(__file__).parent)}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_pull_task_revision_from_local_cache_offline(tmp_path):
    _populate_cache(tmp_path / "cache", _task_folder(tmp_path / "task_01"), "task-01")
    _populate_cache(tmp_path / "cache", _task_folder(tmp_path / "task_02", 2), "task-02", commit="b" * 40)
    code = f"""
import torch
from hf_r1ewc.hub import resolve_task_source
from hf_r1ewc.pipeline import ClassConditionalPipeline
from diffusers import DiffusionPipeline
folder = resolve_task_source("{REPO}@task-01")
names = sorted(p.name for p in folder.iterdir())
print("FILES", names)
pipe = ClassConditionalPipeline.from_pretrained("{REPO}", revision="task-01")
pipe.set_progress_bar_config(disable=True)
print("SHAPE", tuple(pipe([0, 3], num_inference_steps=2, output_type="pt").images.shape))
# offline, diffusers still asks the Hub API for custom_pipeline=REPO_ID, so point it at the cached snapshot folder
generic = DiffusionPipeline.from_pretrained("{REPO}", revision="task-01", custom_pipeline=str(folder),
                                            trust_remote_code=True)
print("GENERIC", type(generic).__name__)
try:
    resolve_task_source("{REPO}@task-07")
except ValueError as err:
    print("MISSING", err)
from hf_r1ewc.evaluate import main
main(["--hub_repo", "{REPO}", "--revisions", "task-01,task-02", "--output_dir", "{tmp_path / "summary"}"])
"""
    proc = _offline_python(code, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SHAPE (2, 1, 8, 8)" in proc.stdout
    assert "GENERIC ClassConditionalPipeline" in proc.stdout
    assert "MISSING" in proc.stdout and "HF_HUB_OFFLINE=1" in proc.stdout
    files = proc.stdout.split("FILES", 1)[1].splitlines()[0]
    summary = json.loads((tmp_path / "summary" / "summary.json").read_text())
    assert summary["rank1 EWC + GD"]["afid"][0] == 16.5 and summary["rank1 EWC + GD"]["forgetting"][0] == 1.5
    assert "model_index.json" in files and "pipeline.py" in files


class RecordingHfApi:
    """Stand-in for huggingface_hub.HfApi: records calls, keeps branches -> commit; optionally fails the first
    uploads."""

    def __init__(self, fail_uploads: int = 0):
        self.calls: list[tuple] = []
        self.fail_uploads = fail_uploads
        self.branches: dict[str, str] = {"main": "0" * 40}

    def create_repo(self, repo_id, repo_type=None, exist_ok=False, private=None):
        self.calls.append(("create_repo", repo_id, repo_type, exist_ok))

    def list_repo_refs(self, repo_id):
        from types import SimpleNamespace

        return SimpleNamespace(branches=[SimpleNamespace(name=b, target_commit=c) for b, c in self.branches.items()])

    def delete_branch(self, repo_id, branch):
        self.calls.append(("delete_branch", repo_id, branch))
        del self.branches[branch]

    def create_branch(self, repo_id, branch, revision=None, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch, revision))
        assert branch not in self.branches
        self.branches[branch] = revision

    def upload_folder(
        self,
        repo_id,
        folder_path,
        revision,
        commit_message,
        allow_patterns=None,
        ignore_patterns=None,
        delete_patterns=None,
    ):
        if self.fail_uploads:
            self.fail_uploads -= 1
            raise ConnectionError("simulated network failure")
        import fnmatch
        from types import SimpleNamespace

        files = sorted(
            str(p.relative_to(folder_path))
            for p in Path(folder_path).rglob("*")
            if p.is_file()
            and any(fnmatch.fnmatch(p.name, pat) for pat in allow_patterns)
            and not any(fnmatch.fnmatch(p.name, pat) for pat in ignore_patterns or ())
        )
        self.calls.append(("upload_folder", repo_id, revision, files, delete_patterns))
        self.branches[revision] = f"{len(self.calls):040d}"
        return SimpleNamespace(oid=self.branches[revision])


def test_push_each_task_once_then_branch_at_that_commit(tmp_path):
    api = RecordingHfApi()
    uploader = TaskUploader(REPO, api=api, backoff_seconds=0)
    for k in (1, 2):
        uploader.submit(_task_folder(tmp_path / f"task_{k:02d}", k), k)
    uploader.submit(_task_folder(tmp_path / "task_02", 2), 2)  # a re-run of task 2 moves its branch
    assert uploader.close() == []
    assert api.calls[0] == ("create_repo", REPO, "model", True)
    uploads = [c for c in api.calls if c[0] == "upload_folder"]
    assert [c[2] for c in uploads] == ["main", "main", "main"]  # one upload per task
    branches = [c for c in api.calls if c[0] == "create_branch"]
    assert [c[2] for c in branches] == ["task-01", "task-02", "task-02"]
    assert api.branches["task-02"] == api.branches["main"] != api.branches["task-01"]
    assert ("delete_branch", REPO, "task-02") in api.calls
    files = uploads[0][3]
    assert "unet/diffusion_pytorch_model.safetensors" in files and "model_index.json" in files
    assert "pipeline.py" in files and "evil.pkl" not in files
    assert uploads[1][4] == ["*"]  # main mirrors the latest task exactly


def test_failed_upload_is_retried_then_reported_without_raising(tmp_path):
    api = RecordingHfApi(fail_uploads=10)
    uploader = TaskUploader(REPO, api=api, retries=3, backoff_seconds=0)
    uploader.submit(_task_folder(tmp_path / "task_01"), 1)
    failures = uploader.close()
    assert len(failures) == 1 and "simulated network failure" in failures[0]["error"]
    assert api.fail_uploads == 7  # three attempts, one upload each
    assert (tmp_path / "task_01" / "model_index.json").exists()  # local results untouched


def test_model_card_parses_and_metadata_round_trips(tmp_path):
    from huggingface_hub import ModelCard

    matrix = {1: {1: 12.5}, 2: {1: 14.0, 2: 20.25}}
    summary = {"afid": {1: 12.5, 2: 17.125}, "forgetting": 0.75, "plasticity": 16.375}
    write_model_card(
        tmp_path,
        task_index=2,
        num_tasks=5,
        seen_classes=[0, 1, 2, 3],
        dataset_name="zalando-datasets/fashion_mnist",
        method_description="rank1 EWC + GD",
        hyperparameters={"ewc_lambda": 15000},
        command="accelerate launch train_continual_ddpm.py",
        matrix=matrix,
        summary=summary,
        fid_backend="classifier",
        fid_comparable=False,
        fid_num_samples=2000,
        hub_model_id=REPO,
        class_names={0: "T-shirt/top", 1: "Trouser", 2: "2", 3: "Dress"},
    )
    card = ModelCard.load(tmp_path / "README.md")
    assert "classes seen so far: 0 (T-shirt/top), 1 (Trouser), 2, 3 (Dress)" in card.text
    assert "class_labels=['T-shirt/top', 'Trouser', 2, 'Dress']" in card.text  # the use example samples by name
    data = card.data
    assert data.library_name == "diffusers" and "continual-learning" in data.tags and "ewc" in data.tags
    assert data.datasets == ["zalando-datasets/fashion_mnist"]
    by_name = {r.metric_name: r.metric_value for r in data.eval_results}
    assert by_name["FID task 2 after task 2 (classifier, N=2000)"] == 20.25
    assert by_name["AFID@2 (classifier)"] == 17.125
    assert "NOT comparable to Inception FID" in card.text and 'revision="task-02"' in card.text
    assert "forgetting F = 0.75" in card.text
    again = ModelCard(str(card))
    assert again.data.to_dict() == data.to_dict()
    assert "| task 2 | 14.00 | 20.25 |" in fid_markdown_table(matrix, 2)


def test_atomic_folder_write_keeps_old_folder_on_failure(tmp_path):
    target = tmp_path / "task_01"
    write_folder_atomically(target, lambda d: (d / "a.txt").write_text("old"))

    def broken(d):
        (d / "a.txt").write_text("new")
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        write_folder_atomically(target, broken)
    assert (target / "a.txt").read_text() == "old"
    write_folder_atomically(target, lambda d: (d / "a.txt").write_text("new"))
    assert (target / "a.txt").read_text() == "new" and not (tmp_path / "task_01.partial").exists()


def test_write_json_writes_valid_json_for_nan(tmp_path):
    """summary.json used to hold a bare NaN (a single run's standard error), which strict JSON readers reject."""
    from hf_r1ewc.hub import write_json

    write_json(tmp_path / "s.json", {"afid": (12.5, float("nan")), "rows": {1: float("inf")}})
    loaded = json.loads((tmp_path / "s.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert loaded == {"afid": [12.5, None], "rows": {"1": None}}


@pytest.mark.parametrize("push_exemplars", [False, True])
def test_exemplar_images_are_uploaded_only_when_asked(tmp_path, push_exemplars):
    """A streamed ER run keeps real training images in er_buffer.safetensors: the upload leaves them out unless
    --push_exemplars (a dataset's licence may not allow republishing them); a folder pulled without them still
    verifies, and continuing from it names the missing file and why."""
    from safetensors.torch import save_file

    from hf_r1ewc.hub import read_training_state, write_training_state
    from hf_r1ewc.methods import Expected
    from hf_r1ewc.methods.exemplars import StreamedExemplarBuffer

    folder = _task_folder(tmp_path / "task_01")
    save_file({"images": torch.zeros(1, 1, 8, 8, dtype=torch.uint8)}, str(folder / "er_buffer.safetensors"))
    write_training_state(folder, json.loads((folder / "training_state.json").read_text()))
    api = RecordingHfApi()
    uploader = TaskUploader(REPO, api=api, backoff_seconds=0, push_exemplars=push_exemplars)
    uploader.submit(folder, 1)
    assert uploader.close() == []
    uploaded = next(c for c in api.calls if c[0] == "upload_folder")[3]
    assert ("er_buffer.safetensors" in uploaded) == push_exemplars and "model_index.json" in uploaded
    pulled = shutil.copytree(folder, tmp_path / "pulled", ignore=shutil.ignore_patterns("er_buffer.safetensors"))
    assert read_training_state(pulled)["task_index"] == 1  # verified where present
    buffer = StreamedExemplarBuffer(3, source="someone/data")
    with pytest.raises(ValueError, match="has no er_buffer.safetensors.*--push_exemplars"):
        buffer.load(pulled, "er_buffer.safetensors", Expected.of(make_tiny_unet(), [[0, 1]], 1))


def test_a_routed_task_folder_pulled_from_the_hub_samples_every_class_from_the_snapshot(tmp_path):
    """An ensemble's task folder (the own model serves classes 2, 3; routes/task_01/ classes 0, 1) pulled offline:
    resolve_task_source's snapshot holds routes/ and samples both routes; a pipeline loaded by repo id, whose
    download diffusers restricts to the components it knows, says how to get the routes instead of sampling wrong."""
    folder = _task_folder(tmp_path / "task_02", 2)
    make_tiny_unet(seed=3).save_pretrained(folder / "routes" / "task_01")
    index = json.loads((folder / "model_index.json").read_text())
    index["routes"] = {"0": "task_01", "1": "task_01", "2": "denoiser", "3": "denoiser"}
    (folder / "model_index.json").write_text(json.dumps(index))
    _populate_cache(tmp_path / "cache", folder, "task-02")
    code = f"""
import torch
from hf_r1ewc.hub import resolve_task_source
from hf_r1ewc.pipeline import ClassConditionalPipeline
folder = resolve_task_source("{REPO}@task-02")
pipe = ClassConditionalPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
print("ROUTES", sorted(pipe.denoiser.models))
print("SHAPE", tuple(pipe([0, 3], num_inference_steps=2, output_type="pt").images.shape))
by_id = ClassConditionalPipeline.from_pretrained("{REPO}", revision="task-02")
try:
    by_id([0, 3], num_inference_steps=2)
except ValueError as err:
    print("REFUSED", err)
"""
    proc = _offline_python(code, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROUTES ['denoiser', 'task_01']" in proc.stdout and "SHAPE (2, 1, 8, 8)" in proc.stdout
    assert "REFUSED" in proc.stdout and "snapshot_download" in proc.stdout


def test_a_pulled_task_revision_learns_a_new_task_and_continues_the_revision_sequence(tmp_path):
    """A finished 2-task run's task_02 in the Hub cache as REPO@task-02 (offline, through huggingface_hub's own
    cache) continues into a new folder with a third task given alone and --push_to_hub to the same repo: the
    stand-in records task_03 uploaded to main, branch task-03 made at that commit (the revision sequence goes on),
    the carried FID statistics among the files, and the card's FID table holding every row from task 1."""
    from conftest import FAST, run

    flags = [*FAST, "--num_epochs_per_task", "1", "--fid_num_samples", "16", "--method", "gd"]
    run([*flags, "--output_dir", str(tmp_path / "run")])
    _populate_cache(tmp_path / "cache", tmp_path / "run" / "task_02", "task-02")
    argv = [*flags, "--tasks", "4,5", "--resume_from_task", f"{REPO}@task-02", "--push_to_hub", "--hub_model_id"]
    argv += [
        REPO,
        "--fid_classifier",
        str(tmp_path / "run" / "fid_classifier"),
        "--output_dir",
        str(tmp_path / "next"),
    ]
    code = f"""
import json, sys
import huggingface_hub
from test_hub import RecordingHfApi
made = []
class Api(RecordingHfApi):
    def __init__(self, *args, **kwargs):
        super().__init__()
        made.append(self)
huggingface_hub.HfApi = Api
sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
import train_continual_ddpm
train_continual_ddpm.main({argv!r})
print("CALLS", json.dumps(made[0].calls))
"""
    proc = _offline_python(code, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = json.loads(proc.stdout.split("CALLS", 1)[1].strip().splitlines()[0])
    uploads = [c for c in calls if c[0] == "upload_folder"]
    branches = [c[2] for c in calls if c[0] == "create_branch"]
    assert len(uploads) == 1 and uploads[0][2] == "main" and branches == ["task-03"]
    assert {f"fid_reference/task_0{i}.safetensors" for i in (1, 2, 3)} <= set(uploads[0][3])
    card = (tmp_path / "next" / "task_03" / "README.md").read_text()
    assert all(f"| task {k} |" in card for k in (1, 2, 3)) and 'revision="task-03"' in card
