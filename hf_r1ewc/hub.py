"""Task folders: their layout, atomic writing, model cards, and their trip to and from the Hub.

A task folder ``OUTPUT_DIR/task_XX/`` is a loadable pipeline (``model_index.json``, ``unet/`` or ``transformer/``,
``scheduler/``, ``pipeline.py``) plus ``fisher.safetensors``, ``ewc_penalty.safetensors`` (the penalty over tasks
1..XX), ``training_state.json``, ``metrics.json``, ``samples.png`` and ``README.md`` (the model card).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shlex
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from . import __version__
from .config import method_description, run_config
from .integrity import DIGESTS_KEY, IntegrityError, folder_digests, verify_folder
from .metrics import accuracy_summary, summarize
from .pipeline import sample
from .plots import evenly_chosen


logger = logging.getLogger(__name__)
if TYPE_CHECKING:
    from .data import TaskData
    from .run import RunState


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


def task_folder_name(task_index: int) -> str:
    """``task_XX`` (two digits, 1-based)."""
    return f"task_{task_index:02d}"


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
    if DIGESTS_KEY in state:
        verify_folder(folder, state[DIGESTS_KEY])
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
    ``training_state.json``, and with EWC the Fisher statistics (with ``save_fisher``'s metadata keywords) and the
    penalty's ``state_dict``."""

    pipeline: object
    metrics: dict
    samples: object
    card: dict
    state: dict
    fisher: object | None = None
    fisher_metadata: dict = field(default_factory=dict)
    penalty_state: dict | None = None


def write_task_artifacts(folder: str | os.PathLike, artifacts: TaskArtifacts) -> Path:
    """Write a task folder atomically (``write_folder_atomically``): the pipeline, ``fisher.safetensors``,
    ``ewc_penalty.safetensors``, ``metrics.json``, ``samples.png``, ``README.md``, and ``training_state.json`` last,
    with the SHA-256 of every file before it. Returns the folder."""
    from safetensors.torch import save_file

    from .fisher import save_fisher
    from .plots import save_image_grid

    def fill(tmp: Path) -> None:
        artifacts.pipeline.save_pretrained(tmp)
        if artifacts.fisher is not None:
            save_fisher(str(tmp / "fisher.safetensors"), artifacts.fisher, **artifacts.fisher_metadata)
        if artifacts.penalty_state is not None:
            penalty = {k: v.cpu() for k, v in artifacts.penalty_state.items()}
            save_file(penalty, str(tmp / "ewc_penalty.safetensors"))
        write_json(tmp / "metrics.json", artifacts.metrics)
        save_image_grid(artifacts.samples, tmp / "samples.png", nrow=8)
        write_model_card(tmp, **artifacts.card)
        write_training_state(tmp, artifacts.state)  # last: the SHA-256 of every file above

    write_folder_atomically(folder, fill)
    return Path(folder)


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
) -> None:
    """``README.md`` from ``model_cards/task_card.md`` through ``ModelCard.from_template`` with ``eval_results``.

    ``fid_num_samples``: generated images per task i (or one number for all); ``sampling``: the sampler, steps and
    precision the FID samples used; ``accuracy``: ACC_i of this model per task i (classifier backend); ``transfer``:
    ``metrics.accuracy_summary`` (ACC, BWT) over the tasks so far; ``class_kl``: this model's class-distribution KL."""
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
        seen_classes=", ".join(map(str, seen_classes)),
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
        example_labels=seen_classes[:4],
    )
    card.save(str(Path(folder) / "README.md"))


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


class TaskUploader:
    """Pushes task folders to branches of one Hub model repo from a background thread, with retries.

    ``submit(folder, task_index)`` returns at once; ``close()`` waits for the queue. A failed upload is retried
    ``retries`` times, then logged and recorded in ``failures`` — local results are never touched.
    """

    def __init__(
        self, repo_id: str, api=None, retries: int = 3, backoff_seconds: float = 5.0, private: bool | None = None
    ) -> None:
        from huggingface_hub import HfApi

        self.repo_id = repo_id
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


# -------------------------------------------------------------- from the training script's settings (hf_r1ewc.config)


@dataclass
class TaskOutcome:
    """What one task produced, for its folder: the pipeline to save and the model FID was sampled with (it draws
    ``samples.png``), the Fisher statistics (None without EWC), the FID scores by task i, the per-epoch curves (loss,
    denoising loss, penalty-gradient ratio) and the task's wall seconds by phase."""

    pipeline: object
    eval_model: torch.nn.Module
    stats: object | None
    scores: dict
    curves: list
    seconds: dict[str, float]


def write_task_folder(
    args,
    accelerator,
    data: TaskData,
    run: RunState,
    outcome: TaskOutcome,
    task_index: int,
    training_tasks: list,
    evaluator,
    ema,
    penalty,
) -> tuple[Path, torch.Tensor]:
    """OUTPUT_DIR/task_XX (atomically) and results.json from the training script's settings (``hf_r1ewc.config``) and
    the task's results; main process only. ``eval_model`` (the pipeline's model as sampled for FID) draws the
    ``samples.png`` grid, returned with the folder: ``(folder, [8 * classes, C, H, W] samples in [-1, 1])``."""
    output_dir = Path(args.output_dir)
    pipeline, stats, scores, curves = outcome.pipeline, outcome.stats, outcome.scores, outcome.curves
    classes, seen = training_tasks[task_index - 1], sorted({c for t in training_tasks[:task_index] for c in t})
    summary = summarize(run.matrix) if not args.joint else {}
    sampling = {
        "sampler": args.replay_scheduler,
        "num_inference_steps": args.num_inference_steps,
        "precision": evaluator.precision if evaluator else "fp32",
    }
    metrics = {
        "task": task_index,
        "classes": classes,
        "fid": {i: s.fid for i, s in scores.items()},
        "fid_num_samples": {i: s.num_samples for i, s in scores.items()},
        "accuracy": {i: s.accuracy for i, s in scores.items() if s.accuracy is not None},
        "accuracy_per_class": {c: a for s in scores.values() for c, a in (s.accuracy_per_class or {}).items()},
        "class_kl": run.class_kl.get(task_index),
        "fid_backend": args.fid_backend,
        "sampling": sampling,
        "loss_per_epoch": curves[0],
        "denoise_loss_per_epoch": curves[1],
        "ewc_grad_ratio_per_epoch": curves[2],
        "seconds_by_phase": dict(outcome.seconds),  # this task's wall time in this process (writing not included)
        "c_star": stats.c_star if stats else None,
        "mu_norm": stats.mu_norm() if stats and stats.mu else None,
        **summary,
    }
    grid = sample(
        outcome.eval_model,
        pipeline.scheduler,
        torch.tensor(evenly_chosen(seen)).repeat_interleave(8),
        args.num_inference_steps,
        torch.Generator().manual_seed(args.seed),
        evaluator.autocast_dtype if evaluator else None,
    )

    state = {
        "task_index": task_index,
        "tasks": training_tasks,
        "seen_classes": seen,
        "run_config": run_config(args),
        "global_step": run.global_step,
        "method": method_description(args),
        "num_processes": accelerator.num_processes,
        "ema_optimization_step": ema.optimization_step if ema else None,
        "hf_r1ewc_version": __version__,
    }
    card = dict(
        task_index=task_index,
        num_tasks=len(training_tasks),
        seen_classes=seen,
        dataset_name=data.source,
        method_description=method_description(args),
        hyperparameters={
            k: getattr(args, k)
            for k in (
                "preset",
                "ewc_type",
                "ewc_lambda",
                "ewc_mode",
                "distill_weight",
                "replay",
                "replay_mode",
                "replay_per_class",
                "replay_scheduler",
                "num_epochs_per_task",
                "train_batch_size",
                "learning_rate",
                "num_inference_steps",
                "seed",
            )
        }
        | {"mixed_precision": accelerator.mixed_precision},
        command=f"accelerate launch --num_processes {accelerator.num_processes} --mixed_precision "
        f"{accelerator.mixed_precision} " + " ".join(shlex.quote(a) for a in sys.argv),
        matrix=run.matrix,
        summary=summary,
        fid_backend=args.fid_backend,
        fid_comparable=evaluator is not None and evaluator.extractor.comparable_to_inception,
        fid_num_samples=metrics["fid_num_samples"],
        accuracy=metrics["accuracy"],
        sampling=f"{args.replay_scheduler}, {args.num_inference_steps} steps, {sampling['precision']}",
        hub_model_id=args.hub_model_id,
        transfer=accuracy_summary(run.accuracy),
        class_kl=run.class_kl.get(task_index),
    )

    folder = write_task_artifacts(
        output_dir / task_folder_name(task_index),
        TaskArtifacts(
            pipeline,
            metrics,
            grid,
            card,
            state,
            stats,
            {"task_index": task_index, "classes": classes},
            penalty.state_dict() if penalty is not None else None,
        ),
    )
    results = {
        "method": method_description(args),
        "fid_backend": args.fid_backend,
        "fid_comparable_to_inception": bool(evaluator and evaluator.extractor.comparable_to_inception),
        "tasks": data.tasks,
        "joint": args.joint,
        "seed": args.seed,
        "sampling": sampling,
        "fid": run.matrix,
        "accuracy": run.accuracy,
        "class_kl": run.class_kl,
    }
    if args.joint and scores:
        results["afid_final"] = sum(s.fid for s in scores.values()) / len(scores)
    else:
        results.update(summarize(run.matrix))
        results.update(accuracy_summary(run.accuracy))
    if metrics["accuracy_per_class"] and task_index == len(training_tasks):
        results["final_accuracy_per_class"] = metrics["accuracy_per_class"]
    write_json(output_dir / "results.json", results)
    logger.info("wrote %s", folder)
    return folder, grid
