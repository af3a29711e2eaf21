"""Which sampler and how many steps the replay pool needs: FID of a replay teacher's samples per diffusers scheduler
and step count, against DDIM-50 and its seed-to-seed spread, at the CPU table-1 scale.

    python benchmarks/bench_sampler_steps.py [--data_dir /usr/share/datasets/fashion-mnist] [--num_samples 1000]

The teacher is the model after task 1 (classes 0, 1) of a GD run at reproduce_table1's ``cpu`` scale (16x16
Fashion-MNIST, (16, 32, 32) UNet, 100 images per class), trained ``--epochs`` epochs (default 360, 9x the scale's 40,
where GD's forgetting had nearly vanished in training_length.md): the model that generates task 2's replay pool.
Whether its FID has stopped falling is measured, not assumed: a second teacher trained half as long is scored with
DDIM-50 on the same seeds, and the final one's loss curve is read over its last quarter. For each deterministic
scheduler (DDIM, DPM-Solver++, UniPC) and 10 / 15 / 20 / 25 / 50 steps, ``num_samples`` images (labels in the test
proportions) are scored by ``TaskFID`` (classifier features) on seeds 0, 1, 2; DDIM-50's spread over the seeds is
the noise floor. Also images/s per setting. Writes benchmarks/results/sampler_steps[_EPOCHSep].{json,md,png}
(``sampler_steps`` for the first study's 40 epochs). About 25 minutes on one core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT))
from _common import RESULTS, machine  # noqa: E402
from _runs import SCALES, TINY_UNET_CONFIG, UNET_CONFIG, run_flags, tiny_banner, train_fid_classifier  # noqa: E402

from hf_r1ewc.data import images_to_model_input, load_labeled_images  # noqa: E402
from hf_r1ewc.distill import frozen_teacher  # noqa: E402
from hf_r1ewc.features import load_feature_extractor  # noqa: E402
from hf_r1ewc.metrics import TaskFID  # noqa: E402
from hf_r1ewc.pipeline import SAMPLERS, ClassConditionalPipeline, sampling_scheduler  # noqa: E402


STEPS = (10, 15, 20, 25, 50)
SEEDS = (0, 1, 2)
SCALE, MODEL_CONFIG = SCALES["cpu"], UNET_CONFIG
MEASURED = ("ddim", "dpmsolver++", "unipc")  # the deterministic ODE samplers; ancestral DDPM/Euler are not candidates


def teacher_folder(work: Path, data_dir: str, epochs: int) -> Path:
    """Train (once) the task-1 model of a GD run at the cpu scale for ``epochs`` epochs; returns its task folder."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "unet_config.json").write_text(json.dumps(MODEL_CONFIG))
    train_fid_classifier(work, data_dir, ["--resolution", str(SCALE["resolution"]), "--resize"])
    run = "gd_seed0" if epochs == SCALE["epochs"] else f"gd_seed0_{epochs}ep"
    folder = work / run / "task_01"
    if not (folder / "model_index.json").exists():
        flags = [*run_flags("GD", None, 0, work, data_dir, SCALE), "--num_epochs_per_task", str(epochs)]
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "train_continual_ddpm.py"),
                *flags,
                "--tasks",
                "0,1",
                "--fid_backend",
                "none",
                "--output_dir",
                str(work / run),
            ],
            check=True,
            cwd=ROOT,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
    return folder


def use_tiny_study(work: Path) -> None:
    """``--tiny``: the tiny scale's teacher (8x8 digits, a tiny UNet), 2 and 4 steps (DDIM-4 the reference) on 2 seeds, the results under
    WORK/results: one pass through training, scoring and writing that leaves the study's own files untouched."""
    global SCALE, MODEL_CONFIG, STEPS, SEEDS, RESULTS
    SCALE, MODEL_CONFIG, STEPS, SEEDS, RESULTS = SCALES["tiny"], TINY_UNET_CONFIG, (2, 4), (0, 1), work / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=None, help="default: Debian's Fashion-MNIST (digits with --tiny)")
    p.add_argument(
        "--work_dir", default=None, help="default: runs/sampler_steps (runs/sampler_steps_tiny with --tiny)"
    )
    p.add_argument("--num_samples", type=int, default=None, help="images per seed and setting (default 1000; 8 tiny)")
    p.add_argument("--samplers", default=",".join(MEASURED), help=f"comma-separated, from {sorted(SAMPLERS)}")
    p.add_argument(
        "--epochs", type=int, default=None, help="the teacher's training epochs (default 360; the first study: 40)"
    )
    p.add_argument(
        "--tiny",
        action="store_true",
        help="a 2-epoch teacher on 8x8 digits, 2 and 4 steps, 8 images on 2 seeds, results under WORK_DIR/results: "
        "a check that the study runs (for the tests), not a result",
    )
    args = p.parse_args(argv)
    work = Path(args.work_dir or ROOT / "runs" / ("sampler_steps_tiny" if args.tiny else "sampler_steps"))
    args.data_dir = args.data_dir or ("digits" if args.tiny else "/usr/share/datasets/fashion-mnist")
    args.num_samples = args.num_samples or (8 if args.tiny else 1000)
    args.epochs = args.epochs or (2 if args.tiny else 360)
    if args.tiny:
        use_tiny_study(work)
    test = load_labeled_images(args.data_dir, "test")
    inputs = images_to_model_input(test.images, SCALE["resolution"], resize=True)
    extractor = None

    def score(folder: Path, name: str, steps: int) -> tuple[list[float], float]:
        """FIDs on SEEDS of the teacher in ``folder`` sampled by ``name`` with ``steps`` steps, and the seconds."""
        nonlocal extractor
        extractor = extractor or load_feature_extractor("classifier", classifier_path=str(work / "fid_classifier"))
        pipe = ClassConditionalPipeline.from_pretrained(folder)
        teacher = frozen_teacher(pipe.unet)
        fids, seconds = [], 0.0
        for seed in SEEDS:
            evaluator = TaskFID(
                extractor,
                inputs,
                test.labels,
                [[0, 1]],
                num_samples=args.num_samples,
                num_inference_steps=steps,
                seed=seed,
                cache_dir=work / "fid_reference",
            )
            start = time.perf_counter()
            fids.append(evaluator(teacher, sampling_scheduler(name, pipe.scheduler.config), 1).fid)
            seconds += time.perf_counter() - start
        return fids, seconds

    folder = teacher_folder(work, args.data_dir, args.epochs)
    stem = "sampler_steps" if args.epochs == SCALE["epochs"] else f"sampler_steps_{args.epochs}ep"
    cache = work / f"{stem}_rows.json"  # finished settings: rerunning the command resumes
    rows = json.loads(cache.read_text()) if cache.exists() else []
    plateau = None
    if args.epochs != SCALE["epochs"]:  # has the teacher's FID stopped falling?
        half = teacher_folder(work, args.data_dir, args.epochs // 2)
        plateau_file = work / f"{stem}_plateau.json"
        if not plateau_file.exists():
            plateau_file.write_text(json.dumps({"half": score(half, "ddim", max(STEPS))[0]}))
        plateau = json.loads(plateau_file.read_text())
        losses = json.loads((folder / "metrics.json").read_text())["loss_per_epoch"]
        quarter = max(1, len(losses) // 4)
        plateau["loss_change_last_quarter"] = (
            statistics.mean(losses[-quarter:]) / statistics.mean(losses[-2 * quarter : -quarter]) - 1
        )
    for name in args.samplers.split(","):
        for steps in STEPS:
            if any(r["sampler"] == name and r["steps"] == steps for r in rows):
                continue
            fids, seconds = score(folder, name, steps)
            rows.append(
                {
                    "sampler": name,
                    "steps": steps,
                    "fid": fids,
                    "fid_mean": statistics.mean(fids),
                    "fid_sd": statistics.stdev(fids),
                    "images_per_second": len(SEEDS) * args.num_samples / seconds,
                }
            )
            print(
                f"{name:12s} {steps:3d} steps: FID {statistics.mean(fids):7.2f} +- {statistics.stdev(fids):5.2f} "
                f"(seeds {', '.join(f'{f:.2f}' for f in fids)}), {rows[-1]['images_per_second']:.0f} img/s",
                flush=True,
            )
            cache.write_text(json.dumps(rows))
    reference = next(r for r in rows if r["sampler"] == "ddim" and r["steps"] == max(STEPS))  # DDIM-50
    spread = reference["fid_sd"]
    for r in rows:
        r["within_ddim50_spread"] = abs(r["fid_mean"] - reference["fid_mean"]) <= spread
    write(rows, reference, args, stem, plateau)


def write(rows: list[dict], reference: dict, args, stem: str, plateau: dict | None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": machine(),
        "teacher_epochs": args.epochs,
        "num_samples": args.num_samples,
        "seeds": list(SEEDS),
        "rows": rows,
        "ddim50_mean": reference["fid_mean"],
        "ddim50_seed_sd": reference["fid_sd"],
        "plateau": plateau,
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# Replay sampler and step count (teacher trained {args.epochs} epochs)",
        "",
        *tiny_banner(SCALE),
        f"FID (classifier features, N = {args.num_samples} per seed, seeds {list(SEEDS)}) of the task-1 teacher's "
        "samples of classes 0 and 1 at the CPU table-1 scale, per diffusers scheduler and step count. DDIM-50 "
        f"(the paper's pool sampler): {reference['fid_mean']:.2f}, seed-to-seed SD {reference['fid_sd']:.2f}. "
        f"`python benchmarks/bench_sampler_steps.py --epochs {args.epochs}`; {machine()['cpu']}.",
        "",
    ]
    if plateau is not None:
        half = statistics.mean(plateau["half"])
        lines += [
            f"Has the teacher's FID stopped falling? DDIM-50 FID after {args.epochs // 2} epochs {half:.2f} ± "
            f"{statistics.stdev(plateau['half']):.2f}, after {args.epochs}: {reference['fid_mean']:.2f} ± "
            f"{reference['fid_sd']:.2f} (same seeds); the epoch-mean loss changed "
            f"{100 * plateau['loss_change_last_quarter']:+.1f} % over the last quarter of training against the "
            "quarter before.",
            "",
        ]
    lines += [
        "| sampler | steps | FID mean ± SD over seeds | within DDIM-50's spread | images/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['sampler']} | {r['steps']} | {r['fid_mean']:.2f} ± {r['fid_sd']:.2f} | "
        f"{'yes' if r['within_ddim50_spread'] else 'no'} | {r['images_per_second']:.0f} |"
        for r in rows
    ]
    output = RESULTS / f"{stem}.md"
    reading = output.read_text().partition("\n## Reading")[2] if output.exists() else ""  # kept across reruns
    output.write_text("\n".join(lines) + "\n" + (f"\n## Reading{reading}" if reading else ""))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name in sorted({r["sampler"] for r in rows}):
        pts = [r for r in rows if r["sampler"] == name]
        ax.errorbar(
            [r["steps"] for r in pts],
            [r["fid_mean"] for r in pts],
            yerr=[r["fid_sd"] for r in pts],
            marker="o",
            capsize=3,
            label=name,
        )
    ax.axhspan(
        reference["fid_mean"] - reference["fid_sd"],
        reference["fid_mean"] + reference["fid_sd"],
        color="grey",
        alpha=0.2,
        label="DDIM-50 ± SD",
    )
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(list(STEPS), [str(s) for s in STEPS])
    ax.set_xlabel("sampler steps")
    ax.set_ylabel("FID (classifier features)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{stem}.png", dpi=120)
    print((RESULTS / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
