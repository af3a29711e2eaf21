"""Continual-learning metrics: the FID matrix FID_i(m_k), AFID@k, forgetting F, plasticity P, sample accuracy.

FID_i(m_k) compares samples of model m_k for task i's classes (labels in the proportions of task i's test set) with
task i's held-out test images. From the matrix (docs/method.md, Metrics)::

    AFID@k = (1/k) sum_{i<=k} FID_i(m_k)
    F      = (1/T) sum_k (FID_k(m_T) - FID_k(m_k))      forgetting
    P      = (1/T) sum_k FID_k(m_k)                      plasticity: how well each task was learned when new

and, from the sample-accuracy matrix ACC_i(m_k) (classifier features; Lopez-Paz & Ranzato's definitions)::

    ACC    = (1/T) sum_i ACC_i(m_T)                      average accuracy after the last task
    BWT    = (1/(T-1)) sum_{i<T} (ACC_i(m_T) - ACC_i(m_i))   backward transfer (negative: forgetting)
    KL_k   = KL(p || q) of m_k's samples for every task so far: p the classes they were drawn for, q the classes
             the classifier assigns them (class balance, Masip et al.; 0 = every class generated as often as asked)

``TaskFID`` is the one place where FID_i(m_k) is computed: the training script and
``python -m hf_r1ewc.evaluate --complete`` both call it, with the same noise seeds.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import torch
from accelerate.logging import get_logger
from accelerate.utils import gather_object

from .features import (
    FeatureExtractor,
    FeatureStatistics,
    extractor_identity,
    fid_from_statistics,
    load_feature_extractor,
    real_statistics,
    reference_cache_path,
    train_classifier,
)
from .integrity import sha256_tensors
from .methods.base import SafetensorsFile
from .pipeline import default_autocast_dtype, precision_name, sample
from .progress import progress_bar


if TYPE_CHECKING:
    from .data import TaskData
logger = get_logger(__name__, log_level="INFO")


FID_CHUNK = 500  # generated images per sampling call: the unit of seeding and of sharing among processes


def labels_in_test_proportions(test_labels: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``[num_samples]`` labels whose class counts follow the test set's (largest-remainder rounding)."""
    classes, counts = torch.unique(test_labels, return_counts=True)
    share = counts.double() / counts.sum() * num_samples
    base = share.floor().long()
    remainder = num_samples - int(base.sum())
    base[torch.argsort(share - base, descending=True)[:remainder]] += 1
    return classes.repeat_interleave(base)


REFERENCE_FOLDER = "fid_reference"  # a task folder's carried real statistics: fid_reference/task_XX.safetensors


@dataclass
class CarriedReference:
    """What FID_i needs of task i's test split, carried in every later task folder so that the task is scored
    without its data: the real feature statistics, the test labels ``[N]`` (generated labels follow their
    proportions), the task's classes, the extractor's identity (``features.extractor_identity``) and the SHA-256 of
    the test images and labels they came from. Size: D floats of mean + D x D of covariance (float64) + N labels."""

    stats: FeatureStatistics
    test_labels: torch.Tensor
    classes: list[int]
    extractor: str
    test_sha256: str

    def payload(self) -> SafetensorsFile:
        meta = {"extractor": self.extractor, "test_sha256": self.test_sha256, "classes": json.dumps(self.classes)}
        tensors = {"mu": self.stats.mu, "sigma": self.stats.sigma, "test_labels": self.test_labels}
        return SafetensorsFile(tensors, {**meta, "backend": self.stats.backend})

    @classmethod
    def load(cls, path: str | os.PathLike) -> CarriedReference:
        """Read what ``payload`` wrote, checked: a [D] mean and [D, D] symmetric covariance, finite; labels of the
        task's classes (``ValueError`` naming the file and the problem)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
            classes = [int(c) for c in json.loads(meta["classes"])]
            mu, sigma, labels = tensors["mu"], tensors["sigma"], tensors["test_labels"]
            extractor, sha, backend = meta["extractor"], meta["test_sha256"], meta["backend"]
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as err:
            raise ValueError(f"{path} is not a task's carried FID statistics ({type(err).__name__}: {err})") from None
        problem = carried_problem(mu, sigma, labels, classes)
        if problem:
            raise ValueError(f"{path} holds {problem}: it was altered; copy the task folder again")
        stats = FeatureStatistics(mu.double(), sigma.double(), int(labels.numel()), backend)
        return cls(stats, labels.long(), classes, extractor, sha)


def carried_problem(mu: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> str | None:
    """What is wrong with carried statistics (a [D] mean, a [D, D] symmetric covariance, both finite, at least two
    labels, all of ``classes``), or None."""
    dim = mu.shape[0] if mu.dim() == 1 else 0
    if not dim or tuple(sigma.shape) != (dim, dim):
        return "a mean that is not [D] or a covariance that is not [D, D]"
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
        return "non-finite statistics"
    if not torch.allclose(sigma, sigma.T):
        return "an asymmetric covariance"
    if labels.dim() != 1 or labels.numel() < 2 or not torch.isin(labels, torch.tensor(classes)).all():
        return "test labels outside its classes"
    return None


def read_carried_references(folder: str | os.PathLike, tasks: Sequence[Sequence[int]]) -> dict[int, CarriedReference]:
    """The carried statistics of task folder ``folder`` (``REFERENCE_FOLDER``), by task, for the tasks it learned
    (``tasks``: their classes, in order); tasks without a file (folders written before they were carried) are
    left out. A file whose classes are not its task's is refused (``ValueError``)."""
    carried = {}
    for i, classes in enumerate(tasks, start=1):
        path = Path(folder) / REFERENCE_FOLDER / f"task_{i:02d}.safetensors"
        if path.exists():
            reference = CarriedReference.load(path)
            if sorted(reference.classes) != sorted(classes):
                raise ValueError(
                    f"{path} holds the statistics of classes {reference.classes}, not task {i}'s {classes}"
                )
            carried[i] = reference
    return carried


@dataclass
class TaskScore:
    """FID_i(m) with its sample count and, for classifier features, the sample accuracy ACC_i(m): the share of
    generated images that the classifier assigns to the class they were generated for (overall and per class)."""

    fid: float
    num_samples: int
    accuracy: float | None
    accuracy_per_class: dict[int, float] | None
    intended_counts: dict[int, int] | None = None  # samples drawn per class
    predicted_counts: dict[int, int] | None = None  # samples the classifier assigns to each class


class TaskFID:
    """FID_i(m) of any model m on task i: the ONE FID path of the script and of ``hf_r1ewc.evaluate --complete``.

    Real statistics come from task i's test images (``test_images`` float ``[N, C, H, W]`` in [-1, 1],
    ``test_labels`` ``[N]``), cached in ``cache_dir``. Generated labels follow the test set's class proportions
    (``num_samples`` of them; None = as many as test images); they are sampled through ``hf_r1ewc.pipeline.sample``
    in chunks of ``FID_CHUNK`` whose noise depends on (seed, i, chunk) only, so every model m_k sees the same noise
    for task i, and processes can share the chunks (``rank``/``world_size``, features merged by ``gather``). A task
    whose classes have no test images here (a run continued on other data) is scored from its ``carried``
    statistics, which must come from this extractor (``reference`` gives them, to carry on)."""

    def __init__(
        self,
        extractor: FeatureExtractor,
        test_images: torch.Tensor,
        test_labels: torch.Tensor,
        tasks: Sequence[Sequence[int]],
        *,
        num_samples: int | None = None,
        num_inference_steps: int = 50,
        seed: int = 0,
        autocast_dtype: torch.dtype | None = None,
        cache_dir: str | os.PathLike | None = None,
        carried: Mapping[int, CarriedReference] | None = None,
    ) -> None:
        self.extractor, self.test_images, self.test_labels = extractor, test_images, test_labels
        self.tasks = [list(t) for t in tasks]
        self.num_samples, self.num_inference_steps, self.seed = num_samples, num_inference_steps, seed
        self.autocast_dtype, self.cache_dir = autocast_dtype, cache_dir
        self._identity: str | None = None
        lacking = [i for i in range(1, len(self.tasks) + 1) if not bool(self._mask(i).any())]
        self.carried = {i: r for i, r in (carried or {}).items() if i in lacking}  # the others: from their images
        for i in lacking:
            if i not in self.carried:
                raise ValueError(
                    f"task {i} (classes {self.tasks[i - 1]}) has no test images in this data and no carried FID "
                    f"statistics: continue from a task folder that carries them ({REFERENCE_FOLDER}/), or with the "
                    f"data that task was learned on, or pass --fid_backend none"
                )
        if self.carried and (others := {r.extractor for r in self.carried.values()} - {self.identity}):
            raise ValueError(
                f"the carried FID statistics were computed with the feature extractor {sorted(others)[0]}, and this "
                f"run's is {self.identity}: FIDs under two extractors do not compare. Use the run's own extractor "
                f"(--fid_classifier RUN/fid_classifier, or the same --fid_backend and weights), or --fid_backend none"
            )

    @property
    def identity(self) -> str:
        """``features.extractor_identity`` of the extractor (computed once)."""
        if self._identity is None:
            self._identity = extractor_identity(self.extractor)
        return self._identity

    @property
    def precision(self) -> str:
        """How the model runs while sampling: 'fp32', 'bf16' or 'fp16'."""
        return precision_name(self.autocast_dtype)

    def _mask(self, task: int) -> torch.Tensor:
        return torch.isin(self.test_labels, torch.tensor(self.tasks[task - 1]))

    def real(self, task: int) -> FeatureStatistics:
        """Feature statistics of task ``task``'s test images (cached), or the carried ones without its images."""
        if not bool(self._mask(task).any()):
            return self.carried[task].stats
        images = self.test_images[self._mask(task)]
        cache = (
            None
            if self.cache_dir is None
            else reference_cache_path(self.cache_dir, self.extractor, self.tasks[task - 1], images)
        )
        return real_statistics(self.extractor, images, cache)

    def labels(self, task: int) -> torch.Tensor:
        """``[N]`` the labels generated for task ``task``, in its test set's class proportions."""
        mask = self._mask(task)
        test = self.test_labels[mask] if bool(mask.any()) else self.carried[task].test_labels
        return labels_in_test_proportions(test, self.num_samples or int(test.shape[0]))

    def reference(self, task: int) -> CarriedReference:
        """What task ``task``'s FID needs of its test split, to carry in the task folders after it."""
        mask = self._mask(task)
        if not bool(mask.any()):
            return self.carried[task]
        sha = sha256_tensors(self.test_images[mask], self.test_labels[mask])
        return CarriedReference(self.real(task), self.test_labels[mask], self.tasks[task - 1], self.identity, sha)

    def __call__(
        self,
        model: torch.nn.Module,
        scheduler,
        task: int,
        rank: int = 0,
        world_size: int = 1,
        gather: Callable[[list], list] | None = None,
        show_progress: bool = False,
    ) -> TaskScore:
        """Score ``model`` (sampled with ``scheduler``) on task ``task`` (1-based). Every process gets the score."""
        labels = self.labels(task)
        chunks = list(range(rank, -(-labels.shape[0] // FID_CHUNK), world_size))
        bar = progress_bar(
            total=len(chunks) * self.num_inference_steps,
            desc=f"FID samples, task {task}",
            unit="step",
            leave=False,
            show=show_progress,
        )

        def ticking(steps):
            for step in steps:
                yield step
                bar.update()

        mine = []
        for chunk in chunks:
            chunk_labels = labels[chunk * FID_CHUNK : (chunk + 1) * FID_CHUNK]
            generator = torch.Generator().manual_seed((self.seed * 1_000_003 + task) * 100_003 + chunk)
            images = sample(
                model,
                scheduler,
                chunk_labels,
                self.num_inference_steps,
                generator,
                self.autocast_dtype,
                progress=ticking,
            )
            mine.append((chunk, self.extractor.features(images)))
        bar.close()
        parts = sorted(gather(mine) if gather is not None else mine, key=lambda part: part[0])
        features = torch.cat([f for _, f in parts])
        fid = fid_from_statistics(self.real(task), FeatureStatistics.from_features(features, self.extractor.name))
        predicted = self.extractor.predict_from_features(features) if self.extractor.can_name(labels) else None
        if predicted is None:
            return TaskScore(fid, int(labels.shape[0]), None, None)
        correct = (predicted == labels).float()
        per_class = {int(c): float(correct[labels == c].mean()) for c in torch.unique(labels)}
        intended = {int(c): int(n) for c, n in zip(*torch.unique(labels, return_counts=True))}
        assigned = {int(c): int(n) for c, n in zip(*torch.unique(predicted, return_counts=True))}
        return TaskScore(fid, int(labels.shape[0]), float(correct.mean()), per_class, intended, assigned)


def class_distribution_kl(scores: Iterable[TaskScore]) -> float | None:
    """KL(p || q) in nats between the class frequencies the samples were drawn for (p, over the classes of every
    scored task) and the frequencies the classifier assigns to them (q, over all its classes), pooled over
    ``scores`` (Masip et al.'s measure of class balance). q is floored at half a sample, 1/(2N), so that a class
    never recognised gives a large, finite value. None without classifier predictions."""
    scores = list(scores)
    if not scores or any(s.predicted_counts is None for s in scores):
        return None
    intended: dict[int, int] = {}
    assigned: dict[int, int] = {}
    for score in scores:
        for counts, total in ((score.intended_counts, intended), (score.predicted_counts, assigned)):
            for c, n in counts.items():
                total[c] = total.get(c, 0) + n
    n = sum(intended.values())
    return sum(
        (m / n) * math.log((m / n) / max(assigned.get(c, 0) / n, 1 / (2 * n))) for c, m in intended.items() if m
    )


def afid_at(matrix: Mapping[int, Mapping[int, float]], k: int) -> float:
    r"""Average FID over the first k tasks after task k.

    .. math:: \mathrm{AFID}@k = \frac{1}{k}\sum_{i=1}^{k} \mathrm{FID}_i(m_k)

    Args:
        matrix: ``matrix[k][i] = FID_i(m_k)`` (1-based task indices); k: the model after task k.

    Returns:
        AFID@k.
    """
    return sum(matrix[k][i] for i in range(1, k + 1)) / k


def forgetting(matrix: Mapping[int, Mapping[int, float]], num_tasks: int) -> float:
    r"""Forgetting after T tasks (the last task contributes 0).

    .. math:: F = \frac{1}{T}\sum_{k=1}^{T} \big(\mathrm{FID}_k(m_T) - \mathrm{FID}_k(m_k)\big)

    Args:
        matrix: ``matrix[k][i] = FID_i(m_k)``; num_tasks: T.

    Returns:
        F (positive: the tasks' FID rose after they were learned).
    """
    return sum(matrix[num_tasks][k] - matrix[k][k] for k in range(1, num_tasks + 1)) / num_tasks


def plasticity(matrix: Mapping[int, Mapping[int, float]], num_tasks: int) -> float:
    r"""Plasticity: how well each task was learned when it was new.

    .. math:: P = \frac{1}{T}\sum_{k=1}^{T} \mathrm{FID}_k(m_k)

    Args:
        matrix: ``matrix[k][i] = FID_i(m_k)``; num_tasks: T.

    Returns:
        P (lower is better).
    """
    return sum(matrix[k][k] for k in range(1, num_tasks + 1)) / num_tasks


def summarize(matrix: Mapping[int, Mapping[int, float]]) -> dict:
    """AFID@k for every finished k, and F and P over the tasks finished so far."""
    done = sorted(k for k in matrix if all(i in matrix[k] for i in range(1, k + 1)))
    out = {"afid": {k: afid_at(matrix, k) for k in done}}
    if done and done == list(range(1, done[-1] + 1)):
        out["forgetting"] = forgetting(matrix, done[-1])
        out["plasticity"] = plasticity(matrix, done[-1])
    return out


def accuracy_summary(accuracy: Mapping[int, Mapping[int, float]]) -> dict:
    """``{"acc": ACC, "bwt": BWT}`` over the tasks finished so far (T = the last complete row of ``accuracy[k][i] =
    ACC_i(m_k)``); BWT needs T >= 2. Empty without a complete row (no classifier features)."""
    done = sorted(k for k in accuracy if all(i in accuracy[k] for i in range(1, k + 1)))
    if not done or done != list(range(1, done[-1] + 1)):
        return {}
    last = done[-1]
    out = {"acc": sum(accuracy[last][i] for i in range(1, last + 1)) / last}
    if last >= 2:
        out["bwt"] = sum(accuracy[last][i] - accuracy[i][i] for i in range(1, last)) / (last - 1)
    return out


def run_summary_table(
    matrix: Mapping[int, Mapping[int, float]],
    accuracy: Mapping[int, Mapping[int, float]],
    tasks: Sequence[Sequence[int]],
    class_kl: Mapping[int, float] | None = None,
    class_names: Mapping[int, str] | None = None,
) -> str:
    """The end-of-run table: per task k, its classes (by name where ``class_names`` has them), FID_k(m_k) (when
    learned), FID_k(m_T) and ACC_k(m_T) (after the last task T), then AFID@T, F, P, ACC, BWT and the
    class-distribution KL of m_T. ``accuracy`` is keyed like ``matrix``, ``class_kl`` by k."""
    last = max(matrix)
    acc = accuracy.get(last, {})
    named = [",".join((class_names or {}).get(c, str(c)) for c in classes) for classes in tasks]
    width = min(max(13, *map(len, named)), 40)
    lines = [
        f"task  {'classes':{width}s}  FID when learned  FID after last  accuracy after last",
        f"----  {'-' * width}  ----------------  --------------  -------------------",
    ]
    for k, label in enumerate(named, start=1):
        own, final = matrix.get(k, {}).get(k), matrix[last].get(k)
        cells = [
            f"{own:16.2f}" if own is not None else f"{'-':>16}",
            f"{final:14.2f}" if final is not None else f"{'-':>14}",
            f"{100 * acc[k]:18.1f}%" if k in acc else f"{'-':>19}",
        ]
        lines.append(f"{k:4d}  {label[:width]:{width}s}  " + "  ".join(cells))
    summary = summarize(matrix)
    parts = [f"AFID@{last} = {summary['afid'][last]:.2f}"] if last in summary.get("afid", {}) else []
    if "forgetting" in summary:
        parts += [f"F = {summary['forgetting']:.2f}", f"P = {summary['plasticity']:.2f}"]
    notes = []
    if acc:
        parts.append(f"mean accuracy after task {last} (ACC) = {100 * sum(acc.values()) / len(acc):.1f} %")
        notes = ["ACC: mean over tasks of the sample accuracy after the last task"]
    if "bwt" in (transfer := accuracy_summary(accuracy)):
        parts.append(f"BWT = {100 * transfer['bwt']:+.1f} points")
        notes.append(
            "BWT: mean over earlier tasks of (accuracy after the last task - accuracy when learned), "
            "negative = forgotten"
        )
    if class_kl and class_kl.get(last) is not None:
        parts.append(f"class KL = {class_kl[last]:.3f} nats")
        notes.append("class KL: classes the final model generated against those asked for, 0 = as asked")
    return "\n".join(lines + ["", ", ".join(parts)] + (["; ".join(notes)] if notes else []))


def matrix_from_json(raw: Mapping[str, Mapping[str, float]]) -> dict[int, dict[int, float]]:
    """``{"k": {"i": v}}`` as read from JSON -> ``{k: {i: v}}`` with int task indices."""
    return {int(k): {int(i): float(v) for i, v in row.items()} for k, row in raw.items()}


def mean_and_standard_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample SD / sqrt(n)); the error is NaN for one value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


# ----------------------------------------------------------------------------------------- the training script's FID


def make_evaluator(
    backend: str,
    accelerator,
    data: TaskData,
    *,
    classifier_dir: str | Path,
    reference_dir: str | Path,
    num_samples: int | None,
    num_inference_steps: int,
    seed: int,
    fid_weights: str | None = None,
    dinov2_model: str = "facebook/dinov2-base",
    carried: Mapping[int, CarriedReference] | None = None,
) -> TaskFID | None:
    """The FID scorer of every task (None for ``backend="none"``): with the classifier backend the main process first
    trains the feature classifier into ``classifier_dir`` unless it holds one; real statistics are cached in
    ``reference_dir``; ``carried``: the statistics of tasks whose test images the data lacks (``TaskFID``)."""
    if backend == "none":
        return None
    if backend == "classifier" and not (Path(classifier_dir) / "model.safetensors").exists():
        if accelerator.is_main_process:
            logger.info("training the FID feature classifier on the training split -> %s", classifier_dir)
            feature_dim = 64 if min(len(data.test.subset(t)) for t in data.tasks) > 64 else 32
            classifier = train_classifier(
                data.train_inputs,
                data.train.labels,
                data.num_classes,
                feature_dim=feature_dim,
                epochs=2 if len(data.train) > 20_000 else 20,
                seed=seed,
                show_progress=accelerator.is_local_main_process,
            )
            classifier.save_pretrained(classifier_dir)
        accelerator.wait_for_everyone()
    extractor = load_feature_extractor(
        backend, classifier_path=str(classifier_dir), fid_weights=fid_weights, dinov2_model=dinov2_model
    ).to(accelerator.device)
    return TaskFID(
        extractor,
        data.test_inputs,
        data.test.labels,
        data.tasks,
        num_samples=num_samples,
        num_inference_steps=num_inference_steps,
        seed=seed,
        autocast_dtype=default_autocast_dtype(accelerator.device),
        cache_dir=reference_dir,
        carried=carried,
    )


def evaluate_task(accelerator, evaluator: TaskFID | None, model, sampler, eval_tasks: list, task_index: int):
    """FID_i(m_k) (and sample accuracy) for every task i in ``eval_tasks``, the sampling shared by all processes."""
    scores = {}
    if evaluator is None:
        return scores
    for i in range(1, len(eval_tasks) + 1):
        scores[i] = evaluator(
            model,
            sampler,
            i,
            accelerator.process_index,
            accelerator.num_processes,
            gather_object if accelerator.num_processes > 1 else None,
            show_progress=accelerator.is_local_main_process,
        )
        accuracy = f", accuracy {100 * scores[i].accuracy:.1f} %" if scores[i].accuracy is not None else ""
        logger.info(
            "FID_%d(m_%d) = %.3f (%s, N=%d)%s",
            i,
            task_index,
            scores[i].fid,
            evaluator.extractor.name,
            scores[i].num_samples,
            accuracy,
        )
    return scores
