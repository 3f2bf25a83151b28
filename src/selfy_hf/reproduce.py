"""
The paper's ablations at laptop scale, on the synthetic motion-only benchmark: baselines (Table 1), temporal offsets
(Table 4a), feature extraction and integration (Table 4b), and robustness to a corrupted centre frame (Fig. 5).

Every run is an ordinary training run (`selfy_hf.training.train`) with a fixed seed, so any row can be rerun alone
with `selfy-train`; finished runs are reused, interrupted ones resume. The report (markdown, JSON, PNG plots) states
the command, the machine and the wall time next to our numbers and the paper's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .evaluation import plot_robustness, robustness_curves
from .flops import count_complexity
from .motion_dataset import MotionDatasetSpec, make_motion_dataset
from .training import TrainingConfig, train

SEVERITIES = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class Experiment:
    """One row: a preset of the chosen backbone family plus `SelfyConfig` overrides, and the paper's SS-V1 top-1
    (Table 4a/4b, R18 backbones) for the same setting, when there is one."""

    name: str
    family: str  # "tsn", "tsm" or "selfynet": the preset is f"{family}-{backbone}"
    overrides: dict = field(default_factory=dict)
    tables: tuple[str, ...] = ()
    paper_top1: float | None = None
    robustness: bool = False


def _selfy(offsets: list[int], extraction: str = "conv", integration: str = "conv") -> dict:
    return {
        "selfy_temporal_offsets": offsets,
        "selfy_extraction": extraction,
        "selfy_integration": integration,
    }


LONG = [-2, -1, 0, 1, 2]
EXPERIMENTS = (
    Experiment("TSN", "tsn", tables=("baselines",), paper_top1=16.2),
    Experiment("TSM", "tsm", tables=("baselines", "offsets", "extraction"), paper_top1=43.0, robustness=True),
    Experiment("SELFYNet {0}", "selfynet", _selfy([0]), ("offsets",), 45.0, robustness=True),
    Experiment("SELFYNet {1}", "selfynet", _selfy([1]), ("offsets",), 47.1, robustness=True),
    Experiment("SELFYNet {-1,0,1}", "selfynet", _selfy([-1, 0, 1]), ("offsets",), 47.8, robustness=True),
    Experiment(
        "SELFYNet {-2..2}", "selfynet", _selfy(LONG), ("baselines", "offsets", "extraction"), 48.4, True
    ),
    Experiment("Smax + FC", "selfynet", _selfy(LONG, "soft_argmax", "fc"), ("extraction",), 44.0),
    Experiment("MLP + FC", "selfynet", _selfy(LONG, "mlp", "fc"), ("extraction",), 45.9),
    Experiment("Conv + FC", "selfynet", _selfy(LONG, "conv", "fc"), ("extraction",), 46.7),
)
TABLES = {
    "baselines": "Baselines and SELFYNet (paper Table 1 / 4a: TSN-R18, TSM-R18, SELFYNet-TSM-R18)",
    "offsets": "Temporal offsets of the STSS (paper Table 4a, TSM-R18 backbone)",
    "extraction": "Feature extraction + integration (paper Table 4b, TSM-R18 backbone, offsets {-2..2})",
}


@dataclass
class ReproductionConfig:
    """What `reproduce` runs. `backbone="tiny"` is a narrow one-block-per-stage ResNet of the R18 design (minutes per
    run on 2 CPU cores); `"r18"` the paper's ResNet-18 (about 4x slower per step here)."""

    output_dir: str = "docs/results"
    runs_dir: str = "outputs/reproduce"
    backbone: str = "tiny"
    epochs: int = 12
    seed: int = 0
    quick: bool = False  # a CI-sized check of the whole pipeline: tiny data, one epoch, few steps
    only: list[str] | None = None  # experiment names to run (default: all)


def _dataset(config: ReproductionConfig) -> Path:
    if config.quick:
        spec = MotionDatasetSpec(
            frames=8, size=32, train_per_class=2, validation_per_class=1, seed=config.seed
        )
        return make_motion_dataset(Path(config.runs_dir) / "motion-quick", spec, progress=False)
    return make_motion_dataset(Path(config.runs_dir) / "motion", MotionDatasetSpec(seed=config.seed))


def _training_config(experiment: Experiment, config: ReproductionConfig, dataset: Path) -> TrainingConfig:
    overrides = dict(experiment.overrides)
    if config.backbone != "tiny" and experiment.family == "selfynet":
        # 64-pixel inputs give 8x8 maps after res3: no downsampling before the STSS, as in the tiny presets
        overrides.setdefault("selfy_downsample", False)
    sizes = {"epochs": config.epochs}
    if config.quick:
        sizes = {"epochs": 1, "batch_size": 4, "crop_size": 32, "resize_shortest_edge": 32}
    return TrainingConfig(
        output_dir=str(Path(config.runs_dir) / _slug(experiment.name)),
        dataset=str(dataset),
        model_preset=f"{experiment.family}-{config.backbone}",
        config_overrides=overrides,
        seed=config.seed,
        **sizes,
    )


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c == "-" else "_" for c in name.replace(" ", "-")).lower()


def _validation_history(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return [record["validation"] for record in records if "validation" in record]


def run_experiment(experiment: Experiment, config: ReproductionConfig, dataset: Path) -> dict:
    """Train (or reuse) one run, then measure its complexity and, if asked, its robustness curves."""
    from .evaluation import load_evaluation_split, load_model_and_processor

    training = _training_config(experiment, config, dataset)
    run_dir = Path(training.output_dir)
    summary_path = run_dir / "reproduce.json"
    wanted = json.loads(json.dumps(asdict(training)))  # as it reads back from JSON (tuples become lists)
    if summary_path.exists() and json.loads(summary_path.read_text())["training"] == wanted:
        return json.loads(summary_path.read_text())
    started = time.perf_counter()
    metrics = train(training)
    seconds = time.perf_counter() - started
    model, processor = load_model_and_processor(str(run_dir))
    complexity = count_complexity(model, image_size=processor.crop_size)
    summary = {
        "name": experiment.name,
        "training": asdict(training),
        "final": {k: metrics.get(k) for k in ("top1", "top5", "pair_accuracy")},
        "history": _validation_history(run_dir),
        "train_seconds": round(seconds, 1),
        "gmacs": round(complexity.gmacs, 4),
        "mparams": round(complexity.mparams, 4),
    }
    if experiment.robustness:
        label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        split = load_evaluation_split(str(dataset), "validation", label_names)
        summary["robustness"] = robustness_curves(
            model, split, processor, severities=SEVERITIES, batch_size=16, progress=False
        )
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def _code_version() -> str:
    """The commit of the checkout this package runs from, `+changes` if it has uncommitted ones; `unknown` outside
    a git checkout. Finished runs are reused, so a report can hold runs from earlier commits: start afresh
    (`--output-dir`) to have every run at this one."""
    source = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        command = ["git", "-C", str(source), *args]
        return subprocess.run(command, capture_output=True, text=True, check=True, timeout=10).stdout.strip()

    try:
        dirty = "+changes" if git("status", "--porcelain", "--", ".") else ""
        return f"commit {git('rev-parse', '--short', 'HEAD')}{dirty}"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):  # /proc/cpuinfo names the CPU on Linux
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu}, {cores} cores, {platform.system()} {platform.release()}, torch {torch.__version__}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def markdown_report(results: list[dict], config: ReproductionConfig, command: str, seconds: float) -> str:
    """The tables of `results.md`: ours beside the paper's SS-V1 top-1 for each row of each table."""
    by_name = {result["name"]: result for result in results}
    lines = [
        "# Reproducing SELFY's ablations on the motion-only benchmark",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}  ",
        f"Code: {_code_version()} (the report's; reused runs keep the results of the code that trained them)  ",
        f"Backbone family: `{config.backbone}`, "
        + ("quick mode (tiny data, one epoch: a pipeline check, not results)" if config.quick else "")
        + (f"{config.epochs} epochs per run" if not config.quick else "")
        + f", seed {config.seed}; training took {sum(r['train_seconds'] for r in results) / 60:.1f} min in all "
        f"(this report: {seconds / 60:.1f} min, finished runs are reused).",
        "",
        "Validation accuracy after the last epoch (8 classes: chance is 12.5% top-1). *Pair accuracy* asks only "
        "which of a class and its time reversal wins: 50% is chance, what an order-blind model gets. The paper's "
        "numbers are Something-Something V1 top-1 with ResNet-18 backbones, a far harder task: compare orderings, "
        "not values.",
    ]
    for table, title in TABLES.items():
        rows = [e for e in EXPERIMENTS if table in e.tables and e.name in by_name]
        if not rows:
            continue
        lines += [
            "",
            f"## {title}",
            "",
            "| model | GMACs | params (M) | top-1 % | pair acc. % | best top-1 % | train min | paper top-1 % |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for experiment in rows:
            result = by_name[experiment.name]
            best = max((h["top1"] for h in result["history"]), default=None)
            paper = "-" if experiment.paper_top1 is None else f"{experiment.paper_top1:.1f}"
            lines.append(
                f"| {experiment.name} | {result['gmacs']:.3f} | {result['mparams']:.3f} | "
                f"{_percent(result['final']['top1'])} | {_percent(result['final']['pair_accuracy'])} | "
                f"{_percent(best)} | {result['train_seconds'] / 60:.1f} | {paper} |"
            )
    robust = [r for r in results if "robustness" in r]
    if robust:
        lines += [
            "",
            "## Robustness to a corrupted centre frame (paper Fig. 5)",
            "",
            "| model | corruption | " + " | ".join(f"severity {s:g}" for s in SEVERITIES) + " |",
            "|---|---|" + "---:|" * len(SEVERITIES),
        ]
        for result in robust:
            for kind, points in result["robustness"].items():
                cells = " | ".join(_percent(p["top1"]) for p in points)
                lines.append(f"| {result['name']} | {kind.replace('_', ' ')} | {cells} |")
        lines += ["", "![robustness](robustness.png)"]
    lines += ["", "![learning curves](learning_curves.png)", ""]
    return "\n".join(lines)


def plot_learning_curves(results: list[dict], path: str | Path) -> Path:
    """Validation top-1 and pair accuracy against epochs, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for result in results:
        epochs = [h["epoch"] for h in result["history"]]
        for axis, key in zip(axes, ("top1", "pair_accuracy")):
            axis.plot(
                epochs, [100 * h.get(key, float("nan")) for h in result["history"]], label=result["name"]
            )
    for axis, (title, chance) in zip(axes, (("top-1 (%)", 12.5), ("pair accuracy (%)", 50.0))):
        axis.axhline(chance, color="grey", ls=":", lw=1)
        axis.set(title=f"validation {title}", xlabel="epoch", ylim=(0, 101))
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def render_motion_figure(run_dir: Path, dataset: Path, output: Path) -> Path:
    """The STSS and soft-argmax arrows of a trained SELFYNet on one validation video of the motion dataset."""
    from .evaluation import load_model_and_processor
    from .visualization import render_stss

    model, processor = load_model_and_processor(str(run_dir))
    video = sorted((dataset / "validation" / "moving_right").iterdir())[0]
    pixel_values = processor([str(video)], return_tensors="pt")["pixel_values"]
    render_stss(model, pixel_values, output=output)
    return output


def reproduce(config: ReproductionConfig, command: str = "") -> list[dict]:
    """Run every experiment (or `config.only`) and write `results.md`, `results.json` and the PNG plots to
    `config.output_dir`. Returns the per-run summaries."""
    unknown = set(config.only or []) - {e.name for e in EXPERIMENTS}
    if unknown:
        raise ValueError(
            f"unknown experiments {sorted(unknown)}; choose from {[e.name for e in EXPERIMENTS]}"
        )
    experiments = [e for e in EXPERIMENTS if not config.only or e.name in config.only]
    started = time.perf_counter()
    dataset = _dataset(config)
    results = [run_experiment(experiment, config, dataset) for experiment in experiments]
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_learning_curves(results, output_dir / "learning_curves.png")
    curves = {r["name"]: r["robustness"] for r in results if "robustness" in r}
    if curves:
        plot_robustness(curves, output_dir / "robustness.png")
    selfy = [e for e in experiments if e.name == "SELFYNet {-2..2}"]
    if selfy:
        run_dir = Path(_training_config(selfy[0], config, dataset).output_dir)
        render_motion_figure(run_dir, dataset, output_dir / "stss_moving_right.png")
    seconds = time.perf_counter() - started
    report = markdown_report(results, config, command, seconds)
    (output_dir / "results.md").write_text(report)
    (output_dir / "results.json").write_text(
        json.dumps({"config": asdict(config), "machine": _machine(), "runs": results}, indent=2)
    )
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    """`python scripts/reproduce.py [--quick] [--backbone tiny|r18] [--epochs N] [--only NAME ...]`."""
    defaults = ReproductionConfig()
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--output-dir", default=defaults.output_dir)
    parser.add_argument("--runs-dir", default=defaults.runs_dir)
    parser.add_argument("--backbone", choices=["tiny", "r18"], default=defaults.backbone)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--quick", action="store_true", help="tiny data, one short epoch per run: checks the pipeline"
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="experiment names, e.g. 'SELFYNet {1}'")
    args = parser.parse_args(argv)
    config = ReproductionConfig(**vars(args))
    command = "python scripts/reproduce.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return reproduce(config, command.strip())


__all__ = [
    "EXPERIMENTS",
    "Experiment",
    "ReproductionConfig",
    "markdown_report",
    "plot_learning_curves",
    "render_motion_figure",
    "reproduce",
    "run_experiment",
]
