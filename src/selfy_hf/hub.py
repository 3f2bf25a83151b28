"""
Sharing SELFY checkpoints: model cards (architecture, input, training recipe, FLOPs, results as Hub `model-index`
metadata, citation) and uploads of a saved model, its processor, its code and its card to the Hugging Face Hub.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from torch import nn

from .evaluation import motion_label_names, parse_views
from .flops import count_complexity

# The model card template is package data (`pyproject.toml`: [tool.setuptools.package-data]), so wheels carry it.
TEMPLATE_RESOURCE = "model_card_template.md"
TEMPLATE_PATH = resources.files(__package__).joinpath(TEMPLATE_RESOURCE)
MOTION_DATASET_NAME = "SELFY synthetic motion (selfy_hf.motion_dataset)"
CITATION = """@inproceedings{kwon2021learning,
  title     = {Learning Self-Similarity in Space and Time as Generalized Motion for Video Action Recognition},
  author    = {Kwon, Heeseung and Kim, Manjin and Kwak, Suha and Cho, Minsu},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  pages     = {13065--13075},
  year      = {2021}
}"""
# results key -> (model-index metric name, top-k); all are accuracies reported as fractions in [0, 1]
CARD_METRICS = {"top1": ("Top-1 accuracy", 1), "top5": ("Top-5 accuracy", 5)}
# Modules the code saved beside the weights may import at module level (besides each other and the stdlib).
REMOTE_CODE_IMPORTS = {"__future__", "torch", "torchvision", "transformers", "numpy"}
REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SYNTHETIC_LIMITATIONS = (
    "**This checkpoint is a demonstration.** It was trained on a small synthetic dataset (textured shapes moving "
    "left/right, up/down, approaching/receding, rotating either way, where each class pair differs only in the "
    "direction of time) to show that the model learns motion; it is not meant to classify real videos."
)


def describe_architecture(config) -> dict:
    """Human-readable facts about a `SelfyConfig` for the card: backbone, temporal module, SELFY block(s)."""
    temporal = "TSM" if config.temporal_module == "tsm" else "TSN"
    if config.backbone_depth is not None:
        backbone = f"{temporal} ResNet-{config.backbone_depth}"
    else:
        backbone = f"{temporal} ResNet ({config.layer_type} blocks, depths {config.depths}, widths {config.hidden_sizes})"
    if config.temporal_module == "tsm":
        temporal_module = (
            f"TSM: in every residual block, 1/{config.shift_div} of the channels shifted one frame back and "
            f"1/{config.shift_div} one frame forward (zero padded)"
        )
    else:
        temporal_module = "none (TSN: frames processed independently until the averaged logits)"
    extraction_channels = config.selfy_extraction_channels
    extraction = {
        "conv": f"four 1x3x3 convolutions over (L, U, V), channels {extraction_channels} (official design)",
        "mlp": f"four fully connected layers over the U*V similarities (eq. 3-4), channels {extraction_channels}",
        "soft_argmax": f"soft-argmax displacement (u, v) per offset (eq. 2), temperature {config.selfy_softargmax_temperature}",
    }[config.selfy_extraction]
    integration_channels = config.selfy_integration_channels
    integration = {
        "conv": "three 1x3x3 convolutions over (T, X, Y) per offset and a 1x3x3 convolution fusing the L offsets, "
        f"channels {integration_channels}",
        "mlp": f"the same layers as 1x1x1 (fully connected), channels {integration_channels}",
        "fc": f"one fully connected layer fusing the L offsets, {integration_channels[-1]} channels",
    }[config.selfy_integration]
    return {
        "backbone": backbone,
        "temporal_module": temporal_module,
        "selfy_blocks": [
            f"after stage {stage} (`layer{stage}`, the paper's res{stage + 1})"
            for stage in sorted(config.selfy_stages)
        ],
        "offsets": list(config.selfy_temporal_offsets),
        "num_offsets": len(config.selfy_temporal_offsets),
        "window": config.selfy_window_size,
        "similarity": config.selfy_similarity,
        "hidden_size": config.selfy_hidden_size,
        "downsample": config.selfy_downsample,
        "extraction": extraction,
        "integration": integration,
        "dropout": config.classifier_dropout,
    }


def _describe_processor(processor) -> dict | None:
    if processor is None:
        return None
    size = processor.size
    resize = (
        f"shorter side to {size['shortest_edge']}"
        if "shortest_edge" in size
        else f"to {size['height']}x{size['width']}"
    )
    return {
        "num_clips": processor.num_clips,
        "num_crops": processor.num_crops,
        "crop_size": processor.crop_size,
        "resize": resize,
        "image_mean": [round(v, 4) for v in processor.image_mean],
        "image_std": [round(v, 4) for v in processor.image_std],
    }


def normalise_results(
    results: Mapping | None, default_views: str = "1x1", default_split: str = "validation"
) -> dict:
    """
    Results as `{split: {views: {metric: value}}}` (metrics as fractions, e.g. `top1`, `top5`,
    `mean_class_accuracy`, `num_samples`). Also accepts a flat `{metric: value}` (one split and views setting, the
    defaults), or `{views: metrics}` / `{split: metrics}` (keys that parse as `CxK` views are views).
    """
    if not results:
        return {}

    def is_metrics(value) -> bool:
        return isinstance(value, Mapping) and "top1" in value

    if is_metrics(results):
        return {default_split: {default_views: dict(results)}}
    if all(is_metrics(value) for value in results.values()):
        if all(_is_views(key) for key in results):
            return {default_split: {key: dict(value) for key, value in results.items()}}
        return {split: {default_views: dict(value)} for split, value in results.items()}
    normalised = {}
    for split, by_views in results.items():
        if not isinstance(by_views, Mapping) or not all(
            _is_views(v) and is_metrics(m) for v, m in by_views.items()
        ):
            raise ValueError(
                f"results[{split!r}] must map views like '2x3' to metrics with 'top1', got {by_views!r}"
            )
        normalised[split] = {views: dict(metrics) for views, metrics in by_views.items()}
    return normalised


def _is_views(key) -> bool:
    try:
        parse_views(key)
    except (ValueError, TypeError):
        return False
    return True


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "dataset"


def build_eval_results(
    results: Mapping, dataset_name: str, dataset_id: str | None = None
) -> list[EvalResult]:
    """`EvalResult`s (task `video-classification`) for the top-1 and top-5 accuracy of every split and views."""
    eval_results = []
    for split, by_views in results.items():
        for views, metrics in by_views.items():
            for key, (name, k) in CARD_METRICS.items():
                if key not in metrics:
                    continue
                eval_results.append(
                    EvalResult(
                        task_type="video-classification",
                        task_name="Video Classification",
                        dataset_type=dataset_id or _slug(dataset_name),
                        dataset_name=dataset_name,
                        dataset_split=split,
                        metric_type="accuracy",
                        metric_name=f"{name} ({views} views)",
                        metric_value=round(float(metrics[key]), 4),
                        metric_config=views,
                        metric_args={"top_k": k},
                    )
                )
    return eval_results


def _result_rows(results: Mapping, gmacs_per_view: float) -> list[dict]:
    def percent(value) -> str:
        return "-" if value is None else f"{100 * float(value):.2f}"

    rows = []
    for split, by_views in results.items():
        for views, metrics in by_views.items():
            clips, crops = parse_views(views)
            rows.append(
                {
                    "split": split,
                    "views": views,
                    "top1": percent(metrics.get("top1")),
                    "top5": percent(metrics.get("top5")),
                    "mean_class_accuracy": percent(metrics.get("mean_class_accuracy")),
                    "num_samples": metrics.get("num_samples", "-"),
                    "gmacs": f"{gmacs_per_view * clips * crops:.3f}",
                }
            )
    return rows


def _robustness_table(robustness: Mapping | None) -> dict | None:
    if not robustness:
        return None
    severities = [point["severity"] for point in next(iter(robustness.values()))]
    rows = [
        (kind.replace("_", " "), [f"{100 * point['top1']:.1f}" for point in points])
        for kind, points in robustness.items()
    ]
    return {"severities": severities, "rows": rows}


def card_template() -> str:
    """The text of the model card template shipped in the package (`selfy_hf/model_card_template.md`)."""
    return TEMPLATE_PATH.read_text(encoding="utf-8")


def write_model_card(
    output_dir: str | Path,
    model: nn.Module,
    processor=None,
    *,
    dataset_name: str,
    results: Mapping | None = None,
    training_args: Mapping | None = None,
    base_model: str | None = None,
    dataset_id: str | None = None,
    robustness: Mapping | None = None,
    repo_id: str | None = None,
    model_name: str | None = None,
    license: str = "apache-2.0",
    limitations: str | None = None,
    template_path: str | Path | None = None,
) -> Path:
    """
    Write `README.md` (a Hub model card) into `output_dir`, a `save_pretrained` directory, and return its path.

    The card describes the architecture (backbone, temporal module, SELFY block position, (L, U, V), extraction
    and integration), the input (frames, default clips x crops, sampling, resize and crop), the training settings
    (`training_args`, e.g. `dataclasses.asdict(TrainingConfig)`), the dataset, the parameters and GMACs per view at
    224x224 and at the processor's crop size, the results (see [`normalise_results`] for the accepted shapes;
    fractions in [0, 1]), the robustness curves of [`~selfy_hf.evaluation.robustness_curves`], intended use and
    limitations, and the paper's BibTeX. The YAML metadata (library, pipeline tag, license, tags, datasets,
    base model and a `model-index` of top-1/top-5 accuracies) is checked with [`validate_model_card`].
    `dataset_id` (a Hub dataset id) links the dataset; `repo_id` is used in the usage example.
    """
    config = model.config
    output_dir = Path(output_dir)
    model_name = model_name or (repo_id.split("/")[-1] if repo_id else output_dir.resolve().name)
    description = _describe_processor(processor)
    default_views = f"{processor.num_clips}x{processor.num_crops}" if processor is not None else "1x1"
    results = normalise_results(results, default_views=default_views)
    trained_size = processor.crop_size if processor is not None else (training_args or {}).get("crop_size")
    at_224 = count_complexity(model, image_size=224)
    complexity = {
        "mparams": at_224.mparams,
        "gmacs_224": at_224.gmacs,
        "gmacs_trained": None,
        "trained_size": trained_size,
    }
    if trained_size and trained_size != 224:
        complexity["gmacs_trained"] = count_complexity(model, image_size=trained_size).gmacs
    per_view_gmacs = complexity["gmacs_trained"] if complexity["gmacs_trained"] is not None else at_224.gmacs
    tags = ["video-classification", "action-recognition", "tsm" if config.temporal_module == "tsm" else "tsn"]
    if config.selfy_stages:
        tags += ["selfy", "self-similarity", "motion"]
    eval_results = build_eval_results(results, dataset_name, dataset_id)
    card_data = ModelCardData(
        model_name=model_name if eval_results else None,  # the model-index name; alone it is no Hub field
        library_name="transformers",
        pipeline_tag="video-classification",
        license=license,
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        base_model=base_model,
        metrics=["accuracy"],
        eval_results=eval_results or None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path) if template_path is not None else None,
        template_str=None if template_path is not None else card_template(),
        model_name=model_name,
        repo_id=repo_id or str(output_dir),
        dataset_name=dataset_name,
        dataset_id=dataset_id,
        base_model=base_model,
        arch=describe_architecture(config),
        num_labels=config.num_labels,
        num_frames=config.num_frames,
        processor=description,
        complexity=complexity,
        training_args=[(k, v) for k, v in (training_args or {}).items() if v is not None and v != {}],
        results=_result_rows(results, per_view_gmacs),
        robustness=_robustness_table(robustness),
        limitations=limitations,
        citation=CITATION,
    )
    validate_model_card(card)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "README.md"
    card.save(path)
    return path


def validate_model_card(card: ModelCard | str | Path) -> ModelCard:
    """
    Check a card (a `ModelCard`, its text, or a `Path` to it) offline, as the Hub would read it: the YAML parses into `ModelCardData` and its
    `model-index` into `EvalResult`s (huggingface_hub's own parser), the library is `transformers`, the pipeline
    tag `video-classification`, a license is set, `base_model` looks like a repo id, and every result is a
    video-classification metric with a dataset name and type and a finite value. Returns the parsed card; raises
    `ValueError` listing every problem.
    """
    text = card.read_text(encoding="utf-8") if isinstance(card, Path) else str(card)
    try:
        parsed = ModelCard(text, ignore_metadata_errors=False)
    except Exception as error:  # huggingface_hub raises ValueError or yaml errors for malformed metadata
        raise ValueError(f"model card metadata does not parse: {error}") from error
    data = parsed.data
    problems = []
    if data.library_name != "transformers":
        problems.append(f"library_name must be 'transformers', got {data.library_name!r}")
    if data.pipeline_tag != "video-classification":
        problems.append(f"pipeline_tag must be 'video-classification', got {data.pipeline_tag!r}")
    if not data.license:
        problems.append("license is missing")
    if data.tags is not None and not all(isinstance(tag, str) for tag in data.tags):
        problems.append(f"tags must be strings, got {data.tags!r}")
    base_models = [data.base_model] if isinstance(data.base_model, str) else (data.base_model or [])
    problems += [
        f"base_model {b!r} is not a Hub repo id (owner/name)"
        for b in base_models
        if not REPO_ID_PATTERN.match(b)
    ]
    for result in data.eval_results or []:
        if result.task_type != "video-classification":
            problems.append(f"model-index task must be video-classification, got {result.task_type!r}")
        if not result.dataset_name or not result.dataset_type:
            problems.append("model-index dataset needs a name and a type")
        value = result.metric_value
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            problems.append(f"metric {result.metric_name!r} must be a fraction in [0, 1], got {value!r}")
    if data.eval_results and not data.model_name:
        problems.append("model-index needs a model name")
    if problems:
        raise ValueError("invalid model card metadata: " + "; ".join(problems))
    return parsed


def check_remote_code(folder: str | Path) -> list[str]:
    """
    Check that a saved directory carries the code `trust_remote_code=True` loads: every module named in the
    `auto_map` of `config.json` and of the processor config, and every module they import relatively, with
    module-level imports limited to each other, torch, torchvision, transformers, numpy and the stdlib. Returns the
    code file names; raises `ValueError` naming what is missing or not allowed.
    """
    from transformers.utils import CONFIG_NAME, VIDEO_PROCESSOR_NAME

    folder = Path(folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    if not config.get("auto_map"):
        raise ValueError(
            f"{folder / CONFIG_NAME} has no auto_map: save the model with selfy_hf imported, which registers the "
            "classes for remote code"
        )
    pending = []
    for name in (CONFIG_NAME, VIDEO_PROCESSOR_NAME):
        if (folder / name).exists():
            for reference in json.loads((folder / name).read_text()).get("auto_map", {}).values():
                references = reference if isinstance(reference, list) else [reference]
                pending += [r.split(".")[0] for r in references if r]
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = folder / f"{module}.py"
        if not path.exists():
            raise ValueError(f"{folder}: the remote code module {module}.py is missing")
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level:
                pending += [node.module] if node.module else [alias.name for alias in node.names]
                continue
            roots = []
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = [node.module.split(".")[0]]
            for root in roots:
                if root not in REMOTE_CODE_IMPORTS and root not in sys.stdlib_module_names:
                    raise ValueError(f"{path.name} imports {root!r} at module level; remote code may not")
    return sorted(f"{module}.py" for module in seen)


def _hub_id(source: str | None) -> str | None:
    """`source` if it names a Hub repo (`owner/name` that is no local path), else None."""
    if source and REPO_ID_PATTERN.match(source) and not Path(source).exists():
        return source
    return None


def _load_saved(model_dir: Path):
    """The classifier and (when saved) the video processor of a `save_pretrained` directory."""
    from transformers.utils import VIDEO_PROCESSOR_NAME

    from .modeling_selfy import SelfyForVideoClassification
    from .video_processing_selfy import SelfyVideoProcessor

    if not (model_dir / "config.json").exists():
        raise ValueError(f"{model_dir}: not a saved model directory (no config.json)")
    model = SelfyForVideoClassification.from_pretrained(model_dir)
    processor = (
        SelfyVideoProcessor.from_pretrained(model_dir)
        if (model_dir / VIDEO_PROCESSOR_NAME).exists()
        else None
    )
    return model, processor


def _run_records(run_dir: Path) -> dict:
    """What a training run directory tells the card: its settings, evaluation results and robustness curves
    (`evaluation/results.json` of `selfy-evaluate`, else the last validation in `log.jsonl`), and its dataset."""
    records: dict = {"training_args": None, "results": None, "robustness": None}
    if (run_dir / "training_config.json").exists():
        records["training_args"] = json.loads((run_dir / "training_config.json").read_text())
    evaluation = run_dir / "evaluation" / "results.json"
    if evaluation.exists():
        report = json.loads(evaluation.read_text())
        entries = list(report["models"].values())
        matching = [e for e in entries if Path(e["source"]).resolve() == run_dir.resolve()] or entries[:1]
        if matching:
            records["results"] = {report["split"]: matching[0]["views"]}
            records["robustness"] = matching[0].get("robustness")
    elif (run_dir / "log.jsonl").exists():
        lines = (run_dir / "log.jsonl").read_text().splitlines()
        validations = [json.loads(line)["validation"] for line in lines if '"validation"' in line]
        if validations:
            split = (records["training_args"] or {}).get("validation_split", "validation")
            records["results"] = {split: {"1x1": validations[-1]}}
    return records


def render_run_card(
    run_dir: str | Path,
    *,
    output_dir: str | Path | None = None,
    copy_to: str | Path | None = None,
    repo_id: str | None = None,
    dataset_name: str | None = None,
    dataset_id: str | None = None,
    base_model: str | None = None,
) -> Path:
    """
    Write the card of a training run's saved model from what the run left (see `selfy_hf.training`): the model,
    processor, `training_config.json`, and `evaluation/results.json` or `log.jsonl`. The card goes to
    `output_dir/README.md` (default: the run directory) and, with `copy_to`, also there (e.g.
    `model_cards/selfynet-tiny-motion.md`). Runs on the synthetic motion dataset say so in their limitations.
    Returns the README path.
    """
    run_dir = Path(run_dir)
    model, processor = _load_saved(run_dir)
    records = _run_records(run_dir)
    training_args = records["training_args"] or {}
    synthetic = training_args.get("dataset") is None and dataset_name is None
    if synthetic:
        label_names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        synthetic = label_names == motion_label_names()
    dataset = training_args.get("dataset")
    path = write_model_card(
        output_dir or run_dir,
        model,
        processor,
        dataset_name=dataset_name or (MOTION_DATASET_NAME if synthetic else dataset or "unknown"),
        dataset_id=dataset_id or _hub_id(dataset),
        results=records["results"],
        robustness=records["robustness"],
        training_args=training_args,
        base_model=base_model or _hub_id(training_args.get("imagenet_backbone")),
        repo_id=repo_id,
        limitations=SYNTHETIC_LIMITATIONS if synthetic else None,
    )
    if copy_to is not None:
        Path(copy_to).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy_to)
    return path


def prepare_upload(
    model_dir: str | Path,
    staging_dir: str | Path,
    repo_id: str,
    *,
    card: str | Path | None = None,
    include: Sequence[str] = (),
    dataset_name: str | None = None,
    dataset_id: str | None = None,
    base_model: str | None = None,
) -> list[str]:
    """
    Lay out in `staging_dir` exactly what a Hub repo of the model needs: `save_pretrained` of the model and the
    processor (weights, configs and the code files for `trust_remote_code`), `README.md` (the given `card` file, or
    one rendered by [`render_run_card`]), and the files of `model_dir` matching the `include` globs (e.g.
    `training_curves.png`). Checks the code with [`check_remote_code`]. Training checkpoints and logs are left out.
    Returns the staged file names.
    """
    model_dir, staging_dir = Path(model_dir), Path(staging_dir)
    model, processor = _load_saved(model_dir)
    model.save_pretrained(staging_dir)
    if processor is not None:
        processor.save_pretrained(staging_dir)
    if card is not None:
        validate_model_card(Path(card))
        shutil.copyfile(card, staging_dir / "README.md")
    else:
        render_run_card(
            model_dir,
            output_dir=staging_dir,
            repo_id=repo_id,
            dataset_name=dataset_name,
            dataset_id=dataset_id,
            base_model=base_model,
        )
    for pattern in include:
        matches = [p for p in model_dir.glob(pattern) if p.is_file()]
        if not matches:
            raise ValueError(f"{model_dir}: no file matches --include {pattern!r}")
        for source in matches:
            target = staging_dir / source.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    check_remote_code(staging_dir)
    return sorted(str(p.relative_to(staging_dir)) for p in staging_dir.rglob("*") if p.is_file())


def push_to_hub(
    model_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    card: str | Path | None = None,
    include: Sequence[str] = (),
    dataset_name: str | None = None,
    dataset_id: str | None = None,
    base_model: str | None = None,
):
    """
    Upload a saved SELFY model directory to the Hub repo `repo_id` (created if needed) in one commit: weights,
    config, processor, code and card, as staged by [`prepare_upload`]. Returns the `CommitInfo`.
    """
    if not REPO_ID_PATTERN.match(repo_id):
        raise ValueError(f"repo_id must look like 'owner/name', got {repo_id!r}")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as staging:
        files = prepare_upload(
            model_dir,
            staging,
            repo_id,
            card=card,
            include=include,
            dataset_name=dataset_name,
            dataset_id=dataset_id,
            base_model=base_model,
        )
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=staging,
            repo_type="model",
            commit_message=commit_message or f"Upload SELFY model ({len(files)} files)",
        )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Upload a saved SELFY model (weights, config, processor, code, model card) to the Hugging Face Hub."
    )
    parser.add_argument(
        "--model", required=True, help="a save_pretrained directory, e.g. a training output_dir"
    )
    parser.add_argument("--repo-id", required=True, help="owner/name of the Hub model repo")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--commit-message")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login)")
    parser.add_argument("--card", help="use this model card instead of rendering one from the run")
    parser.add_argument("--include", nargs="*", default=[], help="globs of extra files of --model to upload")
    parser.add_argument(
        "--dataset-name", help="dataset name for the card (default: from training_config.json)"
    )
    parser.add_argument("--dataset-id", help="Hub id of the dataset, linked from the card metadata")
    parser.add_argument("--base-model", help="Hub id of the model this one was initialised from")
    parser.add_argument("--card-output", help="also write the rendered card here (e.g. model_cards/NAME.md)")
    parser.add_argument("--dry-run", action="store_true", help="stage and check the files, upload nothing")
    return parser


def main(argv: list[str] | None = None) -> None:
    """`selfy-push` / `python scripts/push_to_hub.py`: parse the arguments and upload (or stage, with --dry-run)."""
    args = _parser().parse_args(argv)
    card_options = {
        "card": args.card,
        "include": args.include,
        "dataset_name": args.dataset_name,
        "dataset_id": args.dataset_id,
        "base_model": args.base_model,
    }
    if args.dry_run or args.card_output:
        with tempfile.TemporaryDirectory() as staging:
            files = prepare_upload(args.model, staging, args.repo_id, **card_options)
            if args.card_output:
                Path(args.card_output).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(staging) / "README.md", args.card_output)
                print(f"model card written to {args.card_output}")
            if args.dry_run:
                print("would upload:\n  " + "\n  ".join(files))
                return
    info = push_to_hub(
        args.model,
        args.repo_id,
        private=args.private,
        commit_message=args.commit_message,
        token=args.token,
        **card_options,
    )
    print(f"pushed to {info.repo_url}: {info.commit_url}")


__all__ = [
    "CITATION",
    "TEMPLATE_PATH",
    "TEMPLATE_RESOURCE",
    "build_eval_results",
    "card_template",
    "check_remote_code",
    "describe_architecture",
    "main",
    "normalise_results",
    "prepare_upload",
    "push_to_hub",
    "render_run_card",
    "validate_model_card",
    "write_model_card",
]
