"""Task folders: their layout, atomic writing, model cards, and their trip to and from the Hub.

A task folder ``OUTPUT_DIR/task_XX/`` is a loadable pipeline (``model_index.json``, ``unet/`` or ``transformer/``,
``scheduler/``, ``pipeline.py``) plus what its continual methods keep (EWC: ``fisher.safetensors`` and
``ewc_penalty.safetensors``, the penalty over tasks 1..XX), ``training_state.json``, ``metrics.json``,
``samples.png`` and ``README.md`` (the model card).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

from .integrity import DIGESTS_KEY, IntegrityError, folder_digests, verify_folder
from .methods.base import SafetensorsFile, task_folder_name
from .methods.exemplars import IMAGE_FILES


logger = logging.getLogger(__name__)


def _template_path() -> Path:
    """model_cards/task_card.md of the source tree, or its copy inside an installed wheel."""
    source = Path(__file__).resolve().parent.parent / "model_cards" / "task_card.md"
    if source.exists():
        return source
    from importlib.resources import files

    return Path(str(files("hf_r1ewc.model_cards") / "task_card.md"))


TEMPLATE = _template_path()
REQUIRED_FILES = ("model_index.json", "scheduler/scheduler_config.json", "training_state.json")
DENOISER_CONFIGS = ("unet/config.json", "transformer/config.json")  # a task folder holds one of them
SAFE_PATTERNS = ["*.json", "*.safetensors", "*.md", "*.png", "pipeline.py"]


def missing_task_files(path: str | os.PathLike) -> list[str]:
    """The files of ``REQUIRED_FILES`` (and a denoiser config) that the folder lacks."""
    path = Path(path)
    missing = [f for f in REQUIRED_FILES if not (path / f).exists()]
    return missing + ([] if any((path / f).exists() for f in DENOISER_CONFIGS) else [" or ".join(DENOISER_CONFIGS)])


def is_complete_task_folder(path: str | os.PathLike) -> bool:
    """True when the folder holds every file of ``REQUIRED_FILES`` and a denoiser (a finished, loadable task folder)."""
    return not missing_task_files(path)


def write_training_state(folder: str | os.PathLike, state: dict) -> None:
    """Write ``training_state.json`` last, with the SHA-256 of every other file of the folder under ``"sha256"``."""
    folder = Path(folder)
    write_json(
        folder / "training_state.json",
        {**state, DIGESTS_KEY: folder_digests(folder, exclude=("training_state.json",))},
    )


def read_training_state(folder: str | os.PathLike) -> dict:
    """``training_state.json`` of a task folder, after checking every file against its recorded SHA-256 (raises
    ``IntegrityError`` naming the files). Folders written before digests were recorded load with a warning."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "training_state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise IntegrityError(f"{folder}/training_state.json cannot be read ({err}); copy the folder again") from err
    if DIGESTS_KEY in state:  # exemplar images left out of a Hub upload are verified only where present
        verify_folder(
            folder, {k: v for k, v in state[DIGESTS_KEY].items() if k not in IMAGE_FILES or (folder / k).exists()}
        )
    else:
        logger.warning(
            "%s records no SHA-256 digests (written by an older hf-r1ewc): its files are not verified", folder
        )
    return state


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Atomic JSON write: a temporary file unique to this process, then one rename. NaN/inf become null, so the
    file is valid JSON."""
    tmp = f"{path}.{os.getpid()}.tmp"  # unique per process: runs may share a folder
    Path(tmp).write_text(json.dumps(_finite(payload), indent=2, sort_keys=False, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _finite(value):
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_folder_atomically(target: str | os.PathLike, fill: Callable[[Path], None]) -> None:
    """Call ``fill(tmp_dir)`` then move ``tmp_dir`` to ``target`` in one rename: a crash leaves either the old
    folder or the new one, never a half-written one."""
    target = Path(target)
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    fill(tmp)
    old = target.with_name(target.name + ".old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def fid_markdown_table(matrix: dict[int, dict[int, float]], upto: int) -> str:
    """Rows: model after task k; columns: FID on task i."""
    tasks = list(range(1, upto + 1))
    lines = ["| model after | " + " | ".join(f"FID task {i}" for i in tasks) + " |", "| --- |" + " --- |" * len(tasks)]
    for k in sorted(matrix):
        cells = [f"{matrix[k][i]:.2f}" if i in matrix[k] else "" for i in tasks]
        lines.append(f"| task {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class TaskArtifacts:
    """What a task folder holds: the pipeline (saved with ``save_pretrained``), ``metrics.json``, the sample grid
    ``samples`` (``[N, C, H, W]`` in [-1, 1], 8 per row), the model card (``write_model_card``'s keyword arguments),
    ``training_state.json``, and the continual methods' files (``ContinualLearner.task_files``: name -> safetensors
    payload, JSON dict, or the path of a file to link: one that an earlier task folder holds already)."""

    pipeline: object
    metrics: dict
    samples: object
    card: dict
    state: dict
    method_files: dict = field(default_factory=dict)


def write_task_artifacts(folder: str | os.PathLike, artifacts: TaskArtifacts) -> Path:
    """Write a task folder atomically (``write_folder_atomically``): the pipeline, the methods' files (safetensors
    or JSON, nothing else), ``metrics.json``, ``samples.png``, ``README.md``, and ``training_state.json`` last, with
    the SHA-256 of every file before it. Returns the folder."""
    from safetensors.torch import save_file

    from .plots import save_image_grid

    def fill(tmp: Path) -> None:
        artifacts.pipeline.save_pretrained(tmp)
        for name, payload in artifacts.method_files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)  # e.g. an ensemble's routes/task_01/
            if isinstance(payload, SafetensorsFile):
                save_file(
                    {k: v.cpu().contiguous() for k, v in payload.tensors.items()}, str(tmp / name), payload.metadata
                )
            elif isinstance(payload, Path):  # a file an earlier task folder holds already: the same bytes
                link_or_copy(payload, tmp / name)
            else:
                write_json(tmp / name, payload)
        write_json(tmp / "metrics.json", artifacts.metrics)
        save_image_grid(artifacts.samples, tmp / "samples.png", nrow=8)
        write_model_card(tmp, **artifacts.card)
        write_training_state(tmp, artifacts.state)  # last: the SHA-256 of every file above

    write_folder_atomically(folder, fill)
    return Path(folder)


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (task folders are replaced whole, never edited: they may share a
    file's bytes), or a copy where the file system cannot link."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def write_model_card(
    folder: str | os.PathLike,
    *,
    task_index: int,
    num_tasks: int,
    seen_classes: list[int],
    dataset_name: str,
    method_description: str,
    hyperparameters: dict,
    command: str,
    matrix: dict[int, dict[int, float]],
    summary: dict,
    fid_backend: str,
    fid_comparable: bool,
    fid_num_samples: int | dict[int, int],
    sampling: str = "DDIM, 50 steps, fp32",
    accuracy: dict[int, float] | None = None,
    hub_model_id: str | None = None,
    transfer: dict | None = None,
    class_kl: float | None = None,
    exemplar_files: dict[str, bool] | None = None,
    routes: dict[int, str] | None = None,
    class_names: dict[int, str] | None = None,
) -> None:
    """``README.md`` from ``model_cards/task_card.md`` through ``ModelCard.from_template`` with ``eval_results``.

    ``fid_num_samples``: generated images per task i (or one number for all); ``sampling``: the sampler, steps and
    precision the FID samples used; ``accuracy``: ACC_i of this model per task i (classifier backend); ``transfer``:
    ``metrics.accuracy_summary`` (ACC, BWT) over the tasks so far; ``class_kl``: this model's class-distribution KL;
    ``exemplar_files``: the files of real training images the folder keeps -> whether they go to the Hub;
    ``routes``: class -> route of a parameter-isolation method (the card lists which model or adapter serves what);
    ``class_names``: class id -> name (the card names the classes and samples by name)."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    row = matrix.get(task_index, {})
    per_task_n = fid_num_samples if isinstance(fid_num_samples, dict) else {i: fid_num_samples for i in row}
    eval_results = [
        EvalResult(
            task_type="image-generation",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            metric_type="fid",
            metric_value=round(value, 4),
            metric_name=f"FID task {i} after task {task_index} ({fid_backend}, N={per_task_n.get(i)})",
        )
        for i, value in sorted(row.items())
    ]
    eval_results += [
        EvalResult(
            task_type="image-generation",
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            metric_type="accuracy",
            metric_value=round(value, 4),
            metric_name=f"sample accuracy task {i} after task {task_index} ({fid_backend})",
        )
        for i, value in sorted((accuracy or {}).items())
    ]
    afid = summary.get("afid", {}).get(task_index)
    if afid is not None:
        eval_results.append(
            EvalResult(
                task_type="image-generation",
                dataset_type=dataset_name,
                dataset_name=dataset_name,
                metric_type="afid",
                metric_value=round(afid, 4),
                metric_name=f"AFID@{task_index} ({fid_backend})",
            )
        )
    card_data = ModelCardData(
        library_name="diffusers",
        license="apache-2.0",
        tags=[
            "continual-learning",
            "ewc",
            "rank-1-fisher",
            "generative-distillation",
            "class-conditional-image-generation",
            "diffusers",
            "hf-r1ewc",
        ],
        datasets=[dataset_name] if "/" in dataset_name and not Path(dataset_name).exists() else None,
        model_name=hub_model_id or f"hf-r1ewc {task_folder_name(task_index)}",
        eval_results=eval_results or None,
    )
    load_target = (
        f'"{hub_model_id}", revision="{task_folder_name(task_index).replace("_", "-")}"'
        if hub_model_id
        else '"path/to/' + task_folder_name(task_index) + '"'
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        title=f"Continual diffusion on {dataset_name}: after task {task_index}/{num_tasks}",
        method_description=method_description,
        task_index=task_index,
        num_tasks=num_tasks,
        seen_classes=named_classes(seen_classes, class_names or {}),
        fid_backend=fid_backend,
        fid_comparable=fid_comparable,
        fid_num_samples=", ".join(f"task {i}: {n}" for i, n in sorted(per_task_n.items())) or "n/a",
        sampling=sampling,
        accuracy=", ".join(f"task {i}: {100 * a:.1f} %" for i, a in sorted((accuracy or {}).items())),
        fid_table=fid_markdown_table(matrix, task_index) if matrix else "(not evaluated)",
        afid=afid,
        forgetting=summary.get("forgetting"),
        plasticity=summary.get("plasticity"),
        acc=(transfer or {}).get("acc"),
        bwt=(transfer or {}).get("bwt"),
        class_kl=class_kl,
        hyperparameters=hyperparameters,
        command=command,
        load_target=load_target,
        custom_target=f'"{hub_model_id}"' if hub_model_id else '"path/to/' + task_folder_name(task_index) + '"',
        example_labels=[n if (n := (class_names or {}).get(c, str(c))) != str(c) else c for c in seen_classes[:4]],
        exemplar_files=exemplar_files or {},
        dataset_name=dataset_name,
        routes={r: sorted(c for c, q in routes.items() if q == r) for r in sorted(set(routes.values()))}
        if routes
        else {},
    )
    card.save(str(Path(folder) / "README.md"))


def named_classes(classes: list[int], names: dict[int, str]) -> str:
    """``"0 (T-shirt/top), 1 (Trouser)"``: each id with its name where it has one other than its number."""
    return ", ".join(f"{c} ({names[c]})" if names.get(c, str(c)) != str(c) else str(c) for c in classes)


def resolve_task_source(spec: str) -> Path:
    """A local task folder, or ``REPO_ID@REVISION`` fetched from the Hub (safetensors, JSON, card, pipeline.py only)."""
    path = Path(spec)
    if path.exists():
        missing = missing_task_files(path)
        if missing:
            raise ValueError(f"{spec} is not a complete task folder: missing {missing}")
        return path
    if "@" not in spec:
        raise ValueError(
            f"--resume_from_task {spec!r}: no such folder; for the Hub write REPO_ID@REVISION, e.g. user/model@task-03"
        )
    repo_id, revision = spec.rsplit("@", 1)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RevisionNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=SAFE_PATTERNS))
    except RevisionNotFoundError as err:
        raise ValueError(
            f"{repo_id} has no revision {revision!r}; task revisions are named task-01, task-02, ..."
        ) from err
    except LocalEntryNotFoundError as err:
        raise ValueError(
            f"{repo_id}@{revision} is not in the local Hub cache and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}): connect, or pass a local "
            f"task folder"
        ) from err
    except HfHubHTTPError as err:
        raise ValueError(f"cannot fetch {repo_id}@{revision}: {err}") from err
    if not is_complete_task_folder(folder):
        raise ValueError(f"{repo_id}@{revision} is not an hf-r1ewc task folder (missing files)")
    return folder


class Learned(NamedTuple):
    """What a task folder's model has learned: its ``tasks`` in order, its class ``names`` by id (None where the
    folder records none), the ``sample_size`` of its images and the data each task came from (``sources``)."""

    tasks: list[list[int]]
    names: list[str] | None
    sample_size: int | None
    sources: list[str]


def read_learned(folder: str | os.PathLike) -> Learned:
    """What the model of task folder ``folder`` learned: the first ``task_index`` of its ``training_state.json``'s
    tasks, ``model_index.json``'s ``id2label`` and its denoiser's ``sample_size``. Read before any work to plan a
    continued run; the folder's digests are checked when the run restores it. Names that do not cover ids 0..N-1
    are refused (``ValueError``)."""
    folder = Path(folder)
    try:
        state = json.loads((folder / "training_state.json").read_text())
    except (OSError, ValueError) as err:
        raise IntegrityError(f"{folder}/training_state.json cannot be read ({err}); copy the folder again") from err
    try:
        tasks = [[int(c) for c in task] for task in state["tasks"][: int(state["task_index"])]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder}/training_state.json does not say which tasks it learned ({err!r})") from None
    try:
        id2label = json.loads((folder / "model_index.json").read_text()).get("id2label")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{folder}/model_index.json cannot be read ({err}); copy the folder again") from None
    recorded = state.get("task_sources") or []  # (folders that predate it: their run's one dataset)
    config_of_run = state.get("run_config") or {}
    one_source = str(config_of_run.get("dataset_name") or config_of_run.get("train_data_dir") or "")
    sources = [str(s) for s in recorded[: len(tasks)]] if len(recorded) >= len(tasks) else [one_source] * len(tasks)
    config = next((folder / c for c in DENOISER_CONFIGS if (folder / c).exists()), None)
    size = json.loads(config.read_text()).get("sample_size") if config is not None else None
    size = size if isinstance(size, int) else None
    if id2label is None:
        return Learned(tasks, None, size, sources)
    if not isinstance(id2label, dict) or sorted(id2label) != sorted(map(str, range(len(id2label)))):
        raise ValueError(f"{folder}/model_index.json's id2label does not name ids 0..N-1 once each: it was altered")
    names = [str(id2label[str(i)]) for i in range(len(id2label))]
    if outside := sorted({c for t in tasks for c in t if not 0 <= c < len(names)}):
        raise ValueError(f"{folder} learned classes {outside}, which its id2label ({len(names)} names) does not name")
    return Learned(tasks, names, size, sources)


class TaskUploader:
    """Pushes task folders to branches of one Hub model repo from a background thread, with retries.

    ``submit(folder, task_index)`` returns at once; ``close()`` waits for the queue. A failed upload is retried
    ``retries`` times, then logged and recorded in ``failures`` — local results are never touched. The exemplar
    images a streamed run keeps (``IMAGE_FILES``) stay local unless ``push_exemplars``.
    """

    def __init__(
        self,
        repo_id: str,
        api=None,
        retries: int = 3,
        backoff_seconds: float = 5.0,
        private: bool | None = None,
        push_exemplars: bool = False,
    ) -> None:
        from huggingface_hub import HfApi

        self.repo_id = repo_id
        self.ignored = [] if push_exemplars else list(IMAGE_FILES)  # a dataset's images: not republished unless asked
        self.api = api or HfApi()
        self.retries = retries
        self.backoff_seconds = backoff_seconds
        self.failures: list[dict] = []
        self._queue: queue.Queue = queue.Queue()
        self._repo_ready = False
        self._private = private
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._thread.start()

    def submit(self, folder: str | os.PathLike, task_index: int) -> None:
        """Queue a task folder for upload; returns at once."""
        self._queue.put((Path(folder), task_index))

    def close(self) -> list[dict]:
        """Wait for the queue to drain; returns the uploads that failed after all retries."""
        self._queue.put(None)
        self._thread.join()
        return self.failures

    def _upload(self, folder: Path, task_index: int) -> None:
        """One upload per task: the folder becomes ``main`` (mirrored exactly), then branch ``task-XX`` is created at
        that commit (moved there if an earlier attempt left it elsewhere)."""
        if not self._repo_ready:
            self.api.create_repo(self.repo_id, repo_type="model", exist_ok=True, private=self._private)
            self._repo_ready = True
        branch = f"task-{task_index:02d}"
        commit = self.api.upload_folder(
            repo_id=self.repo_id,
            folder_path=str(folder),
            revision="main",
            commit_message=f"hf-r1ewc: model after task {task_index}",
            allow_patterns=SAFE_PATTERNS,
            ignore_patterns=self.ignored or None,
            delete_patterns=["*"],
        )
        refs = self.api.list_repo_refs(self.repo_id)
        if any(ref.name == branch for ref in refs.branches):
            self.api.delete_branch(self.repo_id, branch=branch)
        self.api.create_branch(self.repo_id, branch=branch, revision=commit.oid)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            folder, task_index = item
            for attempt in range(1, self.retries + 1):
                try:
                    self._upload(folder, task_index)
                    logger.info(
                        "pushed %s to %s (main, and branch task-%02d at that commit)", folder, self.repo_id, task_index
                    )
                    break
                except Exception as err:  # network, auth, server: report and retry, never crash training
                    logger.warning("upload of %s failed (attempt %d/%d): %s", folder, attempt, self.retries, err)
                    if attempt == self.retries:
                        self.failures.append({"folder": str(folder), "task": task_index, "error": repr(err)})
                    else:
                        time.sleep(self.backoff_seconds * attempt)
