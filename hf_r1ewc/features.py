"""FID feature backends and Frechet distances.

Backends map float images ``[N, C, H, W]`` in [-1, 1] to features ``[N, D]``: ``classifier`` (a small CNN trained
on the dataset's own training split: the offline default, NOT comparable to Inception FID), ``inception``
(torchmetrics' FID Inception-v3, the paper's metric; needs its weights file offline) and ``dinov2`` (transformers'
Dinov2Model, Stein et al. 2023). Real-image statistics are cached as safetensors under a content hash.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .integrity import sha256_tensors
from .progress import progress_bar


BACKENDS = ("classifier", "inception", "dinov2")


# ------------------------------------------------------------------------------------------ Frechet distance


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64 with symmetric eigh only."""
    mu1, mu2, sigma1, sigma2 = (x.double() for x in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrtm_psd((sigma1 + sigma1.T) / 2)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(sigma1) + torch.trace(sigma2) - 2 * trace_sqrt
    return float(value.clamp_min(0))


@dataclass
class FeatureStatistics:
    """Mean ``[D]`` and covariance ``[D, D]`` (float64) of ``num_samples`` feature vectors from ``backend``."""

    mu: torch.Tensor
    sigma: torch.Tensor
    num_samples: int
    backend: str

    @classmethod
    def from_features(cls, features: torch.Tensor, backend: str) -> "FeatureStatistics":
        """Mean and unbiased covariance of ``features`` ``[N, D]`` (float64)."""
        features = features.double()
        n, dim = features.shape
        if n < 2:
            raise ValueError(f"FID needs at least 2 samples, got {n}")
        if n <= dim:
            warnings.warn(
                f"FID on {n} samples of {dim}-dimensional features: the covariance is singular and the "
                f"distance strongly biased; use more samples or a lower-dimensional backend."
            )
        mu = features.mean(0)
        centered = features - mu
        return cls(mu, centered.T @ centered / (n - 1), n, backend)

    def save(self, path: str | os.PathLike) -> None:
        """Atomic safetensors write (mu, sigma; N and backend as metadata)."""
        from safetensors.torch import save_file

        tmp = f"{path}.{os.getpid()}.tmp"  # unique per process: runs may share a folder
        save_file(
            {"mu": self.mu.contiguous(), "sigma": self.sigma.contiguous()},
            tmp,
            metadata={"num_samples": str(self.num_samples), "backend": self.backend},
        )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureStatistics":
        """Read what ``save`` wrote."""
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            return cls(f.get_tensor("mu"), f.get_tensor("sigma"), int(meta["num_samples"]), meta["backend"])


def fid_from_statistics(real: FeatureStatistics, fake: FeatureStatistics) -> float:
    """The Frechet distance of two feature statistics of the same backend."""
    if real.backend != fake.backend:
        raise ValueError(f"feature backends differ: {real.backend} vs {fake.backend}")
    return frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)


# -------------------------------------------------------------------------------------------- feature backends


class FeatureExtractor(nn.Module):
    """Maps float images ``[N, C, H, W]`` in [-1, 1] to features ``[N, D]``."""

    name: str = "base"
    dim: int = 0
    comparable_to_inception: bool = False

    @torch.inference_mode()
    def features(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """``[N, D]`` float32 features on the CPU."""
        device = next(self.parameters()).device
        return torch.cat(
            [self(images[i : i + batch_size].to(device)).float().cpu() for i in range(0, images.shape[0], batch_size)]
        )

    def predict_from_features(self, features: torch.Tensor) -> torch.Tensor | None:
        """``[N]`` predicted classes from ``features`` where the backend is a classifier of the dataset, else None."""
        return None

    def can_name(self, labels: torch.Tensor) -> bool:
        """Whether ``predict_from_features`` can name each of ``labels`` (a classifier: ids below its class count)."""
        return False


class ClassifierFeatures(FeatureExtractor):
    """A small CNN classifier trained on the dataset's own training split; its penultimate layer is the feature.
    Distances in this space are NOT comparable to Inception FID: they are labelled ``classifier``."""

    name = "classifier"

    def __init__(self, in_channels: int = 1, num_classes: int = 10, resolution: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = {
            "in_channels": in_channels,
            "num_classes": num_classes,
            "resolution": resolution,
            "feature_dim": feature_dim,
        }
        self.dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1, stride=2),
            nn.GroupNorm(8, 64),
            nn.SiLU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2),
            nn.GroupNorm(8, 64),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(256, feature_dim),
            nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, feature_dim]`` penultimate-layer features."""
        return self.body(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, num_classes]`` class logits."""
        return self.head(self.body(images))

    @torch.inference_mode()
    def predict_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """``[N]`` argmax of the classifier head on ``features``."""
        return self.head(features.to(self.head.weight.device)).argmax(1).cpu()

    def can_name(self, labels: torch.Tensor) -> bool:
        """Whether every label is one of the classes it was trained on (a run continued onto new classes keeps its
        classifier: it cannot tell their samples' classes)."""
        return bool((labels < self.config["num_classes"]).all())

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """``model.safetensors`` + ``config.json`` in ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(self.config, indent=2))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "ClassifierFeatures":
        """Load what ``save_pretrained`` wrote (safetensors only), in eval mode."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / "model.safetensors").exists():
            raise FileNotFoundError(
                f"no feature classifier in {directory}; train one with `python -m hf_r1ewc.evaluate "
                f"train-classifier --dataset_name DATA --output_dir {directory}`"
            )
        model = cls(**json.loads((directory / "config.json").read_text()))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval()


def train_classifier(
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    feature_dim: int = 64,
    epochs: int = 2,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    show_progress: bool = True,
) -> ClassifierFeatures:
    """Train ``ClassifierFeatures`` on float images ``[N, C, R, R]`` in [-1, 1] with Adam and cross-entropy."""
    torch.manual_seed(seed)
    model = ClassifierFeatures(train_images.shape[1], num_classes, train_images.shape[-1], feature_dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * math.ceil(train_images.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    progress = progress_bar(total=steps, desc="feature classifier", show=show_progress)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(train_images.shape[0], generator=generator)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            loss = nn.functional.cross_entropy(model.logits(train_images[idx]), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    return model.eval()


@torch.inference_mode()
def classifier_accuracy(model: ClassifierFeatures, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of ``images`` ``[N, C, H, W]`` whose predicted class is ``labels`` ``[N]``."""
    preds = torch.cat([model.logits(images[i : i + 512]).argmax(1) for i in range(0, len(images), 512)])
    return float((preds == labels).float().mean())


class InceptionFeatures(FeatureExtractor):
    """torchmetrics' FID Inception-v3 (2048-d pool features): the paper's metric. Offline it needs the weights
    file ``pt_inception-2015-12-05-6726825d.pth`` passed as ``weights_path``."""

    name = "inception"
    dim = 2048
    comparable_to_inception = True

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        if weights_path is not None and not Path(weights_path).exists():
            raise FileNotFoundError(f"--fid_weights {weights_path} does not exist")
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3
        except (ImportError, ModuleNotFoundError) as err:
            raise ImportError("the inception backend needs torch-fidelity: pip install 'hf-r1ewc[inception]'") from err
        try:
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=weights_path
            )
        except Exception as err:  # a failed download surfaces as many exception types
            raise RuntimeError(
                "cannot load the FID Inception-v3 weights (this machine may be offline): download "
                "pt_inception-2015-12-05-6726825d.pth elsewhere and pass --fid_weights PATH, or use "
                f"--fid_backend classifier. Cause: {type(err).__name__}: {err}"
            ) from err

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, 2048]`` pool features of uint8-quantised images, grey expanded to RGB."""
        x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net(x).reshape(x.shape[0], -1)


class Dinov2Features(FeatureExtractor):
    """FD-DINOv2 (Stein et al. 2023): the CLS token of transformers' ``Dinov2Model`` at 224x224."""

    name = "dinov2"
    comparable_to_inception = False

    def __init__(self, name_or_path: str = "facebook/dinov2-base"):
        super().__init__()
        try:
            from transformers import Dinov2Model
        except ImportError as err:
            raise ImportError("the dinov2 backend needs transformers: pip install 'hf-r1ewc[dinov2]'") from err
        try:
            self.net = Dinov2Model.from_pretrained(name_or_path).eval()
        except OSError as err:
            raise RuntimeError(
                f"cannot load DINOv2 from {name_or_path!r} (offline?): pass a local folder with "
                f"--dinov2_model PATH, or use --fid_backend classifier. Cause: {err}"
            ) from err
        self.dim = self.net.config.hidden_size
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[N, hidden]`` CLS features at 224x224 with ImageNet normalisation."""
        x = (images.clamp(-1, 1) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
        return self.net(pixel_values=(x - self.mean) / self.std).pooler_output


def load_feature_extractor(
    backend: str,
    *,
    classifier_path: str | None = None,
    fid_weights: str | None = None,
    dinov2_model: str = "facebook/dinov2-base",
) -> FeatureExtractor:
    """The feature network named by ``backend`` (one of ``BACKENDS``)."""
    if backend == "classifier":
        if classifier_path is None:
            raise ValueError(
                "the classifier backend needs --fid_classifier DIR (train one with "
                "`python -m hf_r1ewc.evaluate train-classifier`)"
            )
        return ClassifierFeatures.from_pretrained(classifier_path)
    if backend == "inception":
        return InceptionFeatures(fid_weights)
    if backend == "dinov2":
        return Dinov2Features(dinov2_model)
    raise ValueError(f"unknown FID backend {backend!r}; choose from {BACKENDS}")


def extractor_identity(extractor: FeatureExtractor) -> str:
    """``backend:sha256`` of the extractor's weights (``integrity.sha256_tensors`` in name order): the same identity
    gives the same features, so real statistics carried from another run compare only under it."""
    return f"{extractor.name}:{sha256_tensors(*(t for _, t in sorted(extractor.state_dict().items())))}"


def reference_cache_path(
    cache_dir: str | os.PathLike, extractor: FeatureExtractor, classes: Sequence[int], images: torch.Tensor
) -> Path:
    """Cache file for the real statistics of one task, keyed by backend, feature weights, classes and the exact
    images (a content hash), so that runs of other methods and seeds can share one ``cache_dir`` safely."""
    import hashlib

    digest = hashlib.sha1()
    digest.update(
        json.dumps(
            {"backend": extractor.name, "classes": [int(c) for c in classes], "shape": list(images.shape)}
        ).encode()
    )
    digest.update(images.contiguous().cpu().numpy().tobytes())
    for tensor in extractor.state_dict().values():
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes()[:65536])
    return Path(cache_dir) / f"{extractor.name}_{digest.hexdigest()[:16]}.safetensors"


def real_statistics(
    extractor: FeatureExtractor, images: torch.Tensor, cache_path: str | os.PathLike | None = None
) -> FeatureStatistics:
    """Statistics of real images ``[N, C, H, W]`` in [-1, 1], cached as safetensors when ``cache_path`` is given
    (see ``reference_cache_path`` for a key that is safe to share across runs)."""
    if cache_path is not None and Path(cache_path).exists():
        stats = FeatureStatistics.load(cache_path)
        if stats.backend == extractor.name and stats.num_samples == images.shape[0]:
            return stats
    stats = FeatureStatistics.from_features(extractor.features(images), extractor.name)
    if cache_path is not None:
        Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
        stats.save(cache_path)
    return stats
