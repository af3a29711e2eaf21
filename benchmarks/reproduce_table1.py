"""Reproduce the paper's table 1 at CPU scale on real Fashion-MNIST (5 tasks of 2 classes), with standard errors.

    python benchmarks/reproduce_table1.py [--scale cpu|smoke|gpu|gpu-reduced] [--jobs 2] [--data_dir /usr/share/datasets/fashion-mnist]

1. a lambda sweep (10, 100, 1000, 15000) for diag, rank-1 and rank-1-unscaled, each with GD, in the loss (paper) and
   for rank-1 and diag also decoupled, on a separate seed (100);
2. every table-1 method on seeds 0, 1, 2 at the paper's lambda (15000), and the EWC + GD methods again at their best
   sweep lambda (by AFID@5 on seed 100, never on the reported seeds);
3. aggregates AFID@5, forgetting F and plasticity P (mean +- standard error) into
   benchmarks/results/table1_fmnist_cpu.{md,json} and the AFID@k plot.

Every run is one ``train_continual_ddpm.py`` process writing its own output folder; a finished run (results.json
with task 5) is skipped, an interrupted one continues from its checkpoints: rerunning the same command resumes.
The CPU scale (see ``scale``) is chosen to approach convergence on every task rather than to see many images: 16x16
images (28x28 resized with --resize), 100 training images per class, a 3-level UNet (16, 32, 32) with attention at
4x4 (~0.28M parameters), batch 32 real + 32 replay, Adam 2e-3, 40 epochs per task (280 optimizer steps), 100 replay
images per class, DDIM 20 steps, Fisher on every training image of the task, FID with a classifier trained on the
full training split on 200 generated images per task against the task's 2,000 test images. The per-task loss
curves are plotted (``table1_fmnist_cpu_loss_curves.png``) and their flattening is reported in the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

LAMBDAS = (10.0, 100.0, 1000.0, 15000.0)
PAPER_LAMBDA = 15000.0
SWEEP_SEED = 100
SEEDS = (0, 1, 2)
PAIRED_SEEDS = (0, 1, 2, 3, 4)
# the paired study: GD against rank-1 + GD in the loss at the paper's lambda and at the sweep's best (100, CPU
# table), and decoupled rank-1 + GD at the paper's lambda
PAIRED = [("GD", None), ("rank-1 + GD", PAPER_LAMBDA), ("rank-1 + GD", 100.0), ("decoupled rank-1 + GD", PAPER_LAMBDA)]
# name -> flags (lambda added where the method has a penalty)
METHODS = {
    "non-continual": ["--joint", "--ewc_type", "none"],
    "diag w/o GD": ["--ewc_type", "diag", "--ewc_mode", "loss", "--replay", "off"],
    "rank-1 w/o GD": ["--ewc_type", "rank1", "--ewc_mode", "loss", "--replay", "off"],
    "GD": ["--ewc_type", "none"],
    "diag + GD": ["--ewc_type", "diag", "--ewc_mode", "loss"],
    "rank-1 + GD": ["--ewc_type", "rank1", "--ewc_mode", "loss"],
    "rank-1-unscaled + GD": ["--ewc_type", "rank1_unscaled", "--ewc_mode", "loss"],
    "decoupled diag + GD": ["--ewc_type", "diag", "--ewc_mode", "decoupled"],
    "decoupled rank-1 + GD": ["--ewc_type", "rank1", "--ewc_mode", "decoupled"],
}
SWEPT = ["diag + GD", "rank-1 + GD", "rank-1-unscaled + GD", "decoupled diag + GD", "decoupled rank-1 + GD"]
HAS_PENALTY = {m for m, flags in METHODS.items() if "none" not in flags}

UNET_CONFIG = {
    "_class_name": "UNet2DModel", "sample_size": 16, "in_channels": 1, "out_channels": 1,
    "block_out_channels": [16, 32, 32], "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D", "UpBlock2D"], "norm_num_groups": 4, "num_class_embeds": 10,
}
# a DiT of about the UNet's parameter count (0.30M vs 0.28M): 3 blocks of width 64 over 8x8 patches of 2x2 pixels
DIT_CONFIG = {
    "_class_name": "DiTTransformer2DModel", "sample_size": 16, "in_channels": 1, "out_channels": 1, "patch_size": 2,
    "num_layers": 3, "num_attention_heads": 4, "attention_head_dim": 16, "num_embeds_ada_norm": 10,
    "norm_type": "ada_norm_zero",
}
# the DiT study (benchmarks/results/dit.md): GD, rank-1 + GD in the loss and decoupled, at the paper's lambda
DIT_METHODS = [("GD", None), ("rank-1 + GD", PAPER_LAMBDA), ("decoupled rank-1 + GD", PAPER_LAMBDA)]

SCALES = {
    # Sized from measured costs on 2 CPU cores (one thread per run, 2 runs at a time): a step of 32 real + 32 replay
    # images at 16x16 on the (16, 32, 32) UNet takes ~80 ms and one image-step of DDIM ~0.3 ms, so a run is ~3-4 min
    # and the ~60 runs fit the 3-hour budget. On one task (200 images) the epoch loss of this UNet falls from 0.17 to
    # ~0.06 by epoch 30 and then drifts down slowly (memorisation); DDIM uses 20 steps (not 50) to fit.
    "cpu": dict(model="config", resolution=16, per_class=100, epochs=40, replay=100, fid=200, steps=20, batch=32,
                lr=2e-3, stem="table1_fmnist_cpu"),
    "smoke": dict(model="config", resolution=16, per_class=50, epochs=5, replay=20, fid=100, steps=10, batch=32,
                  lr=2e-3, stem="table1_fmnist_cpu_smoke"),
    # The paper's model and protocol (35M UNet at 32x32, zero-padded 28x28, 200 epochs per task, Adam 2e-4, batch
    # 128, 5000 replay images per class, DDIM 50, Fisher on the whole task, FID on each task's 2,000 test images).
    "gpu": dict(model="paper", resolution=32, per_class=None, epochs=200, replay=5000, fid=None, steps=50,
                batch=128, lr=2e-4, stem="table1_fmnist_gpu"),
    # The paper's UNet and optimiser on 400 images per class (120 optimizer steps per task), sized to the 15 minutes
    # of GPU time a task may get (the four runs side by side on one GPU, `--jobs 4`): GD, diag + GD, rank-1 + GD and
    # decoupled rank-1 + GD on seed 0, classifier FID on 200 samples per task (Inception weights cannot be fetched
    # offline). From the H200 check: a bf16 training step of this UNet at batch 128 takes ~0.1 s, launch-bound.
    "gpu-reduced": dict(model="paper", resolution=32, per_class=400, epochs=20, replay=100, fid=200, steps=50,
                        batch=128, lr=2e-4, stem="table1_fmnist_gpu_reduced"),
}


def run_flags(name: str, lam: float | None, seed: int, work: Path, data_dir: str, sc: dict,
              backbone: str = "unet") -> list[str]:
    flags = ["--train_data_dir", data_dir, "--classes_per_task", "2", "--resolution", str(sc["resolution"])]
    if sc["model"] == "config":
        flags += ["--resize", "--model_config_name_or_path", str(work / f"{backbone}_config.json"),
                  "--preset", "cpu-small"]
    else:
        flags += ["--preset", sc["model"]]
    if sc["per_class"]:
        flags += ["--max_train_per_class", str(sc["per_class"]), "--fisher_num_samples", str(2 * sc["per_class"])]
    if sc["fid"]:
        flags += ["--fid_num_samples", str(sc["fid"])]
    flags += [
        "--num_epochs_per_task", str(sc["epochs"]), "--train_batch_size", str(sc["batch"]),
        "--learning_rate", str(sc["lr"]), "--replay_per_class", str(sc["replay"]),
        "--num_inference_steps", str(sc["steps"]), "--fid_classifier", str(work / "fid_classifier"),
        "--fid_reference_dir", str(work / "fid_reference"), "--checkpointing_steps", "250",
        "--seed", str(seed), *METHODS[name],
    ]
    if lam is not None:
        flags += ["--ewc_lambda", str(lam)]
    return flags


def run_dir_name(name: str, lam: float | None, seed: int, backbone: str = "unet") -> str:
    slug = name.replace(" + ", "+").replace(" ", "_").replace("/", "")
    return f"{'dit_' if backbone == 'dit' else ''}{slug}{'' if lam is None else f'_lam{lam:g}'}_seed{seed}"


def finished(out: Path, num_tasks: int = 5) -> bool:
    path = out / "results.json"
    if not path.exists():
        return False
    results = json.loads(path.read_text())
    return results.get("joint") and "afid_final" in results or str(num_tasks) in results.get("afid", {})


def launch(name: str, lam: float | None, seed: int, work: Path, data_dir: str, sc: dict, log: Path,
           on_gpu: bool = False, backbone: str = "unet", folder: str | None = None, extra: Sequence[str] = (),
           num_tasks: int = 5) -> Path:
    """Run (or resume) one training run into work/runs/FOLDER (default: run_dir_name); skipped when finished."""
    out = work / "runs" / (folder or run_dir_name(name, lam, seed, backbone))
    if finished(out, num_tasks):
        return out
    cmd = [sys.executable, str(ROOT / "train_continual_ddpm.py"),
           *run_flags(name, lam, seed, work, data_dir, sc, backbone), *extra, "--output_dir", str(out)]
    if (out / "checkpoints").exists():
        cmd += ["--resume_from_checkpoint", "latest"]
    env = {**os.environ, "TQDM_DISABLE": "1", **({} if on_gpu else {"OMP_NUM_THREADS": "1"})}
    start = time.time()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    status = "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})"
    print(f"[{time.strftime('%H:%M:%S')}] {out.name}: {status} in {time.time() - start:.0f} s", flush=True)
    return out


def best_lambdas(work: Path) -> dict[str, float]:
    best = {}
    for name in SWEPT:
        scores = {}
        for lam in LAMBDAS:
            out = work / "runs" / run_dir_name(name, lam, SWEEP_SEED)
            if finished(out):
                scores[lam] = json.loads((out / "results.json").read_text())["afid"]["5"]
        if scores:
            best[name] = min(scores, key=scores.get)
    return best


def denoise_curves(out: Path) -> dict[int, list[float]]:
    """The per-epoch denoising loss of every task of one run (from its task folders' metrics.json)."""
    curves = {}
    for task in range(1, 6):
        path = out / f"task_{task:02d}" / "metrics.json"
        if path.exists():
            curves[task] = json.loads(path.read_text()).get("denoise_loss_per_epoch", [])
    return {t: c for t, c in curves.items() if c}


def late_drop(losses: list[float]) -> float:
    """Relative fall of the mean epoch loss from the third to the last quarter of the epochs: near 0 (within the
    noise of a few batches per epoch) once a task's loss has flattened."""
    q = max(1, len(losses) // 4)
    third, last = losses[-2 * q : -q] or losses[:1], losses[-q:]
    return 1 - (sum(last) / len(last)) / (sum(third) / len(third))


def provenance() -> str:
    """The command, the commit and the machine, for the results file."""
    import platform

    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return (f"Command: `python {' '.join(sys.argv)}`; commit {commit}; machine: {cpu}, {os.cpu_count()} CPU cores"
            f"{gpu}, torch {torch.__version__}.")


def aggregate(work: Path, sc: dict, best: dict[str, float], output: Path) -> None:
    from hf_r1ewc.metrics import mean_and_standard_error
    from hf_r1ewc.plots import plot_afid_curves, plot_loss_curves

    def collect(name, lam):
        runs = []
        for seed in SEEDS:
            out = work / "runs" / run_dir_name(name, lam, seed)
            if finished(out):
                runs.append(json.loads((out / "results.json").read_text()))
        return runs

    curves, loss_curves = {}, {}
    table = {"paper_lambda": {}, "best_lambda": {}, "sweep": {}, "scale": sc, "best_lambdas": best}
    for section, lam_of in (("paper_lambda", lambda m: PAPER_LAMBDA), ("best_lambda", lambda m: best.get(m))):
        for name in METHODS:
            if section == "best_lambda" and name not in best and name not in ("non-continual", "GD"):
                continue  # (non-continual and GD have no lambda: repeated as references)
            lam = lam_of(name) if name in HAS_PENALTY else None
            runs = collect(name, lam)
            if not runs:
                continue
            afid = [r.get("afid_final") if r.get("joint") else r["afid"]["5"] for r in runs]
            entry = {"lambda": lam, "seeds": len(runs), "afid": mean_and_standard_error(afid)}
            drops = sorted(late_drop(c) for seed in SEEDS
                           for c in denoise_curves(work / "runs" / run_dir_name(name, lam, seed)).values())
            if drops:
                entry["late_loss_drop"] = {"median": drops[len(drops) // 2], "max": drops[-1]}
            if section == "paper_lambda" and name in ("GD", "rank-1 + GD", "rank-1 w/o GD", "non-continual",
                                                      "decoupled rank-1 + GD", "diag + GD"):
                loss_curves[f"{name} (seed {SEEDS[0]})"] = denoise_curves(work / "runs" / run_dir_name(name, lam, SEEDS[0]))
            if not runs[0].get("joint"):
                entry["forgetting"] = mean_and_standard_error([r["forgetting"] for r in runs])
                entry["plasticity"] = mean_and_standard_error([r["plasticity"] for r in runs])
                if section == "paper_lambda":
                    curves[name] = {k: mean_and_standard_error([r["afid"][str(k)] for r in runs])
                                    for k in range(1, 6)}
            table[section][name] = entry
    for name in SWEPT:
        table["sweep"][name] = {}
        for lam in LAMBDAS:
            out = work / "runs" / run_dir_name(name, lam, SWEEP_SEED)
            if finished(out):
                r = json.loads((out / "results.json").read_text())
                table["sweep"][name][str(lam)] = {"afid": r["afid"]["5"], "forgetting": r["forgetting"],
                                                  "plasticity": r["plasticity"]}

    def fmt_drop(entry):
        drop = entry.get("late_loss_drop")
        return "—" if drop is None else f"{100 * drop['median']:.0f}% ({100 * drop['max']:.0f}%)"

    def fmt(pair):
        if pair is None:
            return "—"
        mean, se = pair
        return f"{mean:.1f} ± {se:.1f}" if se == se else f"{mean:.1f}"

    scale = "CPU scale" if sc["model"] == "config" else "GPU scale (the paper's UNet)"
    lines = [f"# Table 1 at {scale}: Fashion-MNIST, 5 tasks of 2 classes\n",
             f"Scale: {json.dumps(sc)} (per_class = training images per class, epochs per task, replay images "
             f"per class, fid = generated images per task, DDIM steps). FID features: a CNN classifier trained on "
             f"the Fashion-MNIST training split — NOT comparable to the paper's Inception FID. Mean ± standard "
             f"error over seeds {list(SEEDS)}.\n", provenance() + "\n"]
    for section, title in (("paper_lambda", f"At the paper's λ = {PAPER_LAMBDA:g}"),
                           ("best_lambda", "At each method's best λ (chosen on seed 100)")):
        lines += [f"\n## {title}\n", "| method | λ | seeds | AFID@5 ↓ | forgetting F ↓ | plasticity P ↓ | "
                  "loss fall, 3rd → 4th quarter of epochs: median (max) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for name, e in table[section].items():
            lam = "—" if e["lambda"] is None else f"{e['lambda']:g}"
            lines.append(f"| {name} | {lam} | {e['seeds']} | {fmt(e['afid'])} | {fmt(e.get('forgetting'))} | "
                         f"{fmt(e.get('plasticity'))} | {fmt_drop(e)} |")
    lines += ["\n## λ sweep (seed 100): AFID@5 / F / P\n", "| method | " + " | ".join(f"λ={l:g}" for l in LAMBDAS)
              + " |", "| --- |" + " --- |" * len(LAMBDAS)]
    for name, by_lam in table["sweep"].items():
        cells = [(lambda r: f"{r['afid']:.1f} / {r['forgetting']:.1f} / {r['plasticity']:.1f}")(by_lam[str(l)])
                 if str(l) in by_lam else "" for l in LAMBDAS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    output.mkdir(parents=True, exist_ok=True)
    stem = sc["stem"]
    md = output / f"{stem}.md"
    reading = md.read_text().partition("\n## Reading")[2] if md.exists() else ""
    md.write_text("\n".join(lines) + "\n" + (f"\n## Reading{reading}" if reading else ""))  # keep the hand-written reading
    (output / f"{stem}.json").write_text(json.dumps(table, indent=2))
    if curves:
        plot_afid_curves(curves, output / f"{stem}_afid_at_k.png")
    if any(loss_curves.values()):
        plot_loss_curves({k: v for k, v in loss_curves.items() if v}, output / f"{stem}_loss_curves.png")
    print("\n".join(lines))


def write_paired(work: Path, outs: list[Path], output: Path) -> None:
    """table1_paired.md/.json: every method minus GD, seed by seed (hf_r1ewc.evaluate's paired comparison)."""
    from hf_r1ewc.evaluate import aggregate, paired_differences, paired_markdown

    runs = {str(o): json.loads((o / "results.json").read_text()) for o in outs}
    gd = next(r["method"] for o, r in runs.items() if Path(o).name.startswith("GD_"))
    paired = paired_differences(runs, gd)
    table = aggregate(runs)
    lines = ["# Table 1 at CPU scale, paired seeds: Fashion-MNIST, 5 tasks of 2 classes\n",
             f"The CPU scale of table1_fmnist_cpu.md, seeds {list(PAIRED_SEEDS)}. FID features: a CNN classifier "
             f"(NOT comparable to Inception FID). For a given seed every method trains task 1 identically, so the "
             f"differences to GD are paired.\n", provenance() + "\n", "\n## Per method\n",
             "| method | seeds | AFID@5 ↓ | F ↓ | P ↓ |", "| --- | --- | --- | --- | --- |"]
    fmt = lambda pair: "—" if pair is None else f"{pair[0]:.1f} ± {pair[1]:.1f}"  # noqa: E731
    for method, row in table.items():
        lines.append(f"| {method} | {row['runs']} | {fmt(row['afid'])} | {fmt(row['forgetting'])} | "
                     f"{fmt(row['plasticity'])} |")
    output.parent.mkdir(parents=True, exist_ok=True)
    md_reading = output.read_text().partition("\n## Reading")[2] if output.exists() else ""
    output.write_text("\n".join(lines) + "\n" + paired_markdown(paired, gd)
                      + (f"\n## Reading{md_reading}" if md_reading else ""))
    output.with_suffix(".json").write_text(json.dumps({"summary": table, "paired": paired}, indent=2, default=str))


GEOMETRY = {  # benchmarks/results/<folder>/analysis.json (python -m hf_r1ewc.analysis on task 1 of a run)
    "UNet, CPU table scale (0.28M, 16x16; GD seed 0 task 1)": "analysis_unet_cpu_task1",
    "DiT, CPU table scale (0.30M, 16x16; GD seed 0 task 1)": "analysis_dit_task1",
    "UNet cpu-small (1.11M, 32x32; analysis_fmnist_task1)": "analysis_fmnist_task1",
}


def write_dit_table(work: Path, output: Path) -> None:
    """dit.md/.json: per backbone, AFID@5 / F / P (mean +- SE over seeds 0-2) and each method minus GD paired by seed,
    for the DiT runs and the UNet runs of the same seeds and methods (from the paired study); and the Fisher geometry
    of task 1 (the analysis folders of GEOMETRY that exist) side by side by timestep."""
    from hf_r1ewc.evaluate import aggregate, paired_differences, paired_markdown

    table, lines = {}, ["# DiT vs UNet at the CPU table-1 scale (issue 19)\n",
                        "Fashion-MNIST, 5 tasks of 2 classes, the CPU scale of table1_fmnist_cpu.md; the denoiser is "
                        "either the table's UNet (16, 32, 32; 0.28M parameters) or a pixel-space DiT of about the "
                        f"same size ({json.dumps({k: v for k, v in DIT_CONFIG.items() if k != '_class_name'})}, "
                        "0.30M), everything else equal. FID features: a CNN classifier (NOT comparable to Inception "
                        f"FID). Seeds {list(SEEDS)}.\n", provenance() + "\n", "\n## Methods\n",
                        "| backbone | method | seeds | AFID@5 ↓ | F ↓ | P ↓ | mean accuracy after task 5 |",
                        "| --- | --- | --- | --- | --- | --- | --- |"]
    fmt = lambda pair, d=1: "—" if pair is None else f"{pair[0]:.{d}f} ± {pair[1]:.{d}f}"  # noqa: E731
    for backbone in ("unet", "dit"):
        outs = [work / "runs" / run_dir_name(m, lam, s, backbone) for s in SEEDS for m, lam in DIT_METHODS]
        runs = {str(o): json.loads((o / "results.json").read_text()) for o in outs if finished(o)}
        if not runs:
            continue
        gd = runs.get(str(work / "runs" / run_dir_name("GD", None, SEEDS[0], backbone)), {}).get("method")
        summary = aggregate(runs)
        table[backbone] = {"summary": summary, "paired": paired_differences(runs, gd) if gd else {}}
        for method, row in summary.items():
            acc = row.get("accuracy")
            lines.append(f"| {backbone} | {method} | {row['runs']} | {fmt(row['afid'])} | {fmt(row['forgetting'])} | "
                         f"{fmt(row['plasticity'])} | {'—' if acc is None else fmt(tuple(100 * a for a in acc))} % |")
    for backbone, t in table.items():
        if t["paired"]:
            lines.append(paired_markdown(t["paired"], "GD").replace("## Paired against GD",
                                                                     f"## {backbone}: paired against GD"))
    geometry = {name: json.loads((RESULTS / folder / "analysis.json").read_text())
                for name, folder in GEOMETRY.items() if (RESULTS / folder / "analysis.json").exists()}
    if geometry:
        lines += ["\n## Fisher geometry of task 1, by timestep\n",
                  "Per model: λ2/λ1 of the empirical Fisher / rank-1 (c* μμᵀ) relative Frobenius error / diagonal "
                  "relative error / median |cos(g_i, μ)|, on n = 1024 training images of task 1 (one ε per image "
                  "and t; `python -m hf_r1ewc.analysis`).\n",
                  "| t | " + " | ".join(geometry) + " |", "| --- |" + " --- |" * len(geometry)]
        for t in next(iter(geometry.values()))["timesteps"]:
            cells = []
            for result in geometry.values():
                r = result["per_timestep"].get(str(t)) or result["per_timestep"].get(t)
                cos = sorted(r["abs_cos_to_mean"])
                cells.append(f"{r['eigengap_ratio']:.3f} / {r['rel_frobenius_error_rank1']:.3f} / "
                             f"{r['rel_frobenius_error_diag']:.3f} / {cos[len(cos) // 2]:.3f}")
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
        table["geometry"] = {name: {t: {k: v for k, v in r.items() if k != "abs_cos_to_mean"}
                                    for t, r in result["per_timestep"].items()} for name, result in geometry.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    from hf_r1ewc.plots import plot_afid_curves, plot_against

    curves = {f"{backbone}: {method.split(' + ')[0] if 'EWC' in method else 'GD'}": row["afid_at_k"]
              for backbone, t in table.items() if backbone != "geometry" for method, row in t["summary"].items()}
    if curves:
        plot_afid_curves(curves, output.with_name(output.stem + "_afid_at_k.png"))
        lines.append(f"\nAFID@k per backbone and method: `{output.stem}_afid_at_k.png`.")
    if geometry:
        nan = float("nan")
        median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        panels = {title: {name.split(" (")[0]: {int(t): (f(r), nan) for t, r in result["per_timestep"].items()}
                          for name, result in geometry.items()}
                  for title, f in (("λ2/λ1", lambda r: r["eigengap_ratio"]),
                                   ("rank-1 relative error", lambda r: r["rel_frobenius_error_rank1"]),
                                   ("median |cos(g_i, μ)|", lambda r: median(r["abs_cos_to_mean"])))}
        plot_against(panels, output.with_name(output.stem + "_fisher_geometry.png"), "timestep t")
        lines.append(f"Fisher geometry by timestep: `{output.stem}_fisher_geometry.png`; per model, the figures of "
                     f"its analysis folder ({', '.join(GEOMETRY.values())}).")
    reading = output.read_text().partition("\n## Reading")[2] if output.exists() else ""
    output.write_text("\n".join(lines) + "\n" + (f"\n## Reading{reading}" if reading else ""))
    output.with_suffix(".json").write_text(json.dumps(table, indent=1, default=str))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", choices=sorted(SCALES), default="cpu",
                   help="cpu: the CPU table (97 min on 2 cores); smoke: a 3-minute check; gpu: the paper's model and protocol; "
                        "gpu-reduced: GD, diag + GD, rank-1 + GD, decoupled rank-1 + GD on one seed, ~9 minutes on one "
                        "GPU with --jobs 4")
    p.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: 2 on CPU, one thread each; 1 "
                                                          "for the GPU scales)")
    p.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--work_dir", default=None, help="default: runs/table1 (cpu) or runs/table1_SCALE")
    p.add_argument("--phase", choices=["all", "sweep", "table", "paired", "dit"], default="all",
                   help="paired: GD, rank-1 + GD (lambda 15000 and 100, in the loss) and decoupled rank-1 + GD on "
                        "seeds 0-4, compared with GD seed by seed -> table1_paired.md; dit: GD, rank-1 + GD and "
                        "decoupled rank-1 + GD with a DiT of the UNet's size on seeds 0-2, beside the UNet's runs "
                        "of the same seeds, and the Fisher geometry of task 1 -> dit.md")
    args = p.parse_args()
    sc = SCALES[args.scale]
    on_gpu = sc["model"] == "paper"
    jobs = args.jobs or (1 if on_gpu else 2)
    work = Path(args.work_dir or ROOT / "runs" / ("table1" if args.scale == "cpu" else f"table1_{args.scale}"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "unet_config.json").write_text(json.dumps(UNET_CONFIG))
    (work / "dit_config.json").write_text(json.dumps(DIT_CONFIG))
    log = work / "runs.log"
    if not (work / "fid_classifier" / "model.safetensors").exists():
        size = ["--resolution", "16", "--resize"] if sc["model"] == "config" else ["--resolution", "32"]
        subprocess.run([sys.executable, "-m", "hf_r1ewc.evaluate", "train-classifier", "--dataset_name", args.data_dir,
                        "--output_dir", str(work / "fid_classifier"), *size, "--epochs", "2"],
                       check=True, cwd=ROOT, env={**os.environ, "TQDM_DISABLE": "1"})
    sweep = [(m, lam, SWEEP_SEED) for m in SWEPT for lam in LAMBDAS]
    methods, seeds = list(METHODS), SEEDS
    if args.scale == "smoke":  # one sweep point per family and one seed keep the smoke run short
        sweep, seeds = [("rank-1 + GD", lam, SWEEP_SEED) for lam in (100.0, 15000.0)], SEEDS[:1]
    if args.scale == "gpu-reduced":
        sweep, seeds, methods = [], SEEDS[:1], ["GD", "diag + GD", "rank-1 + GD", "decoupled rank-1 + GD"]
    if args.phase == "dit":
        jobs_dit = [(m, lam, s, "dit") for s in SEEDS for m, lam in DIT_METHODS]
        with ThreadPoolExecutor(jobs) as pool:
            list(pool.map(lambda job: launch(*job[:3], work, args.data_dir, sc, log, on_gpu, job[3]), jobs_dit))
        write_dit_table(work, RESULTS / "dit.md")
        return
    if args.phase == "paired":
        with ThreadPoolExecutor(jobs) as pool:
            outs = list(pool.map(lambda job: launch(*job, work, args.data_dir, sc, log, on_gpu),
                                 [(m, lam, s) for s in PAIRED_SEEDS for m, lam in PAIRED]))
        write_paired(work, [o for o in outs if finished(o)], RESULTS / "table1_paired.md")
        return
    with ThreadPoolExecutor(jobs) as pool:
        if args.phase in ("all", "sweep"):
            list(pool.map(lambda job: launch(*job, work, args.data_dir, sc, log, on_gpu), sweep))
        if args.phase in ("all", "table"):
            best = best_lambdas(work)
            table_jobs = [(m, PAPER_LAMBDA if m in HAS_PENALTY else None, s) for s in seeds for m in methods]
            table_jobs += [(m, best[m], s) for s in seeds for m in best if best[m] != PAPER_LAMBDA]
            list(pool.map(lambda job: launch(*job, work, args.data_dir, sc, log, on_gpu), table_jobs))
    aggregate(work, sc, best_lambdas(work), RESULTS)


if __name__ == "__main__":
    main()
