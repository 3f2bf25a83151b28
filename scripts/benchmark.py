"""Speed of TSN / TSM / SELFYNet: inference and training clips/s under several execution variants, FLOPs, achieved
GFLOP/s against this machine's matmul and conv peaks, SELFYNet/baseline wall-time ratios, the STSS op, and the data
path (decode + sampling + preprocessing clips/s, beside the models' clips/s).

    python scripts/benchmark.py                       # R18 and R50, batch 1 and 4, 8x224x224, all default variants
    python scripts/benchmark.py --quick               # R18 only, fewer iterations
    python scripts/benchmark.py --models tsm-r18,selfynet-tsm-r18 --variants eager,amp --profile
    python scripts/benchmark.py --device cuda --amp-dtype float16 --json results.json
    python scripts/benchmark.py --models selfynet-tsm-r18 --variants eager,train_eager --no-stss --no-peaks
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from selfy_hf.benchmarking import (
    DATA_SOURCES,
    DEFAULT_MODELS,
    DEFAULT_STSS_CASES,
    DEFAULT_VARIANTS,
    MODEL_VARIANTS,
    QUICK_MODELS,
    benchmark_data_path,
    benchmark_models,
    benchmark_stss,
    format_data_benchmark,
    format_model_benchmark,
    format_stss_table,
    measure_peaks,
    retain_freed_memory,
    selfy_baseline_ratios,
    selfy_block_breakdown,
)
from selfy_hf.configuration_selfy import SelfyConfig
from selfy_hf.native_extraction import extraction_kernel
from selfy_hf.native_training import training_kernels
from selfy_hf.native_winograd import winograd_kernel

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", type=_names, help=f"comma-separated presets (default: {','.join(DEFAULT_MODELS)})"
    )
    parser.add_argument(
        "--variants",
        type=_names,
        default=list(DEFAULT_VARIANTS),
        help=f"comma-separated, from {','.join(MODEL_VARIANTS)}",
    )
    parser.add_argument("--batch-sizes", type=lambda s: [int(b) for b in _names(s)], default=[1, 4])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="R18 models only, 1 warm-up and 3 timed iterations, one STSS case without memory measurement",
    )
    parser.add_argument("--warmup", type=int, help="untimed calls before timing (default 3, --quick 1)")
    parser.add_argument(
        "--iters", type=int, help="timed calls, the median is reported (default 10, --quick 3)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="torch and onnxruntime threads (default: all cores)",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--amp-dtype", choices=sorted(AMP_DTYPES), default="bfloat16", help="dtype of the amp variants"
    )
    parser.add_argument("--no-peaks", action="store_true", help="skip the matmul / conv peak measurement")
    parser.add_argument("--no-stss", action="store_true", help="skip the STSS op benchmark")
    parser.add_argument(
        "--data",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the data path: decode + TSN sampling + preprocessing clips/s (train and eval, num_workers 0) at "
        "--image-size (default: on; --no-data skips it)",
    )
    parser.add_argument(
        "--data-sources", type=_names, default=list(DATA_SOURCES), help=f"from {','.join(DATA_SOURCES)}"
    )
    parser.add_argument("--data-clips", type=int, help="clips timed per data row (default 16, --quick 4)")
    parser.add_argument(
        "--allocator",
        choices=["retain", "default"],
        default="retain",
        help="retain (default): keep freed memory in the process (glibc) so that activations are not page-faulted "
        "in again on every call; default: leave the allocator as it is",
    )
    parser.add_argument(
        "--native",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the native kernels: the extraction kernel and the Winograd convs for CPU inference, the training "
        "kernels (default: on where they build; --no-native runs the PyTorch/oneDNN ops, as "
        "SELFY_HF_NATIVE_KERNELS=0 does)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="per-module time of the SELFY blocks (CPU, eager)"
    )
    parser.add_argument("--json", help="also write every number to this JSON file")
    return parser.parse_args(argv)


def _profile_tables(models: list[str], image_size: int, batch_size: int) -> str:
    from selfy_hf import SelfyConfig, SelfyForVideoClassification

    lines = []
    for preset in models:
        config = SelfyConfig.from_preset(preset)
        if not config.selfy_stages:
            continue
        model = SelfyForVideoClassification(config)
        pixel_values = torch.randn(batch_size, config.num_frames, config.num_channels, image_size, image_size)
        lines += ["", f"SELFY block breakdown, {preset}, batch {batch_size}, eager fp32 inference", ""]
        lines += ["| module | ms | % of the model |", "|---|---|---|"]
        lines += [
            f"| {name} | {ms:.2f} | {pct:.1f} |"
            for name, ms, pct in selfy_block_breakdown(model, pixel_values)
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if not args.native:
        os.environ["SELFY_HF_NATIVE_KERNELS"] = "0"
    # Built here if need be (the extraction kernel for the paper's SELFY block, the default config), so no timed call
    # compiles them.
    block = SelfyConfig()
    native = (
        extraction_kernel(
            block.selfy_window_size, tuple(block.selfy_extraction_channels), block.selfy_hidden_size
        )
        is not None
    )
    native_training = training_kernels() is not None
    native_winograd = winograd_kernel() is not None
    retained = args.allocator == "retain" and retain_freed_memory()
    models = args.models or list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    iters = args.iters if args.iters is not None else (3 if args.quick else 10)
    amp_dtype = AMP_DTYPES[args.amp_dtype]
    print(
        f"# {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, {args.image_size}px, "
        f"batch sizes {args.batch_sizes}, median of {iters} after {warmup} warm-up, "
        f"allocator {'retaining freed memory' if retained else 'default'}, "
        f"native extraction kernel {'on' if native else 'off'}, Winograd convs {'on' if native_winograd else 'off'}, "
        f"training kernels {'on' if native_training else 'off'}\n"
    )
    peaks = None if args.no_peaks else measure_peaks(device, amp_dtype)
    rows = benchmark_models(
        models,
        variants=args.variants,
        batch_sizes=args.batch_sizes,
        image_size=args.image_size,
        device=device,
        amp_dtype=amp_dtype,
        warmup=warmup,
        iters=iters,
        num_threads=args.threads,
    )
    amp_name = "bf16" if amp_dtype == torch.bfloat16 else "fp16"
    print(format_model_benchmark(rows, peaks, amp_name=amp_name))
    stss_rows = []
    if not args.no_stss:
        stss_rows = benchmark_stss(
            cases=DEFAULT_STSS_CASES[:1] if args.quick else DEFAULT_STSS_CASES,
            device=str(device),
            repeats=iters,
            warmup=warmup,
            num_threads=args.threads,
            measure_memory=not args.quick,
        )
        print("\nSTSS op (one SELFY block's correlation)\n")
        print(format_stss_table(stss_rows))
    data_rows = []
    if args.data:
        data_rows = benchmark_data_path(
            args.data_sources,
            num_frames=rows[0].num_frames if rows else 8,
            crop_size=args.image_size,
            clips=args.data_clips or (4 if args.quick else 16),
            warmup=min(warmup, 2),
        )
        print(
            f"\nData path: decode + TSN sampling + preprocessing, clips/s in one process (num_workers 0, "
            f"{torch.get_num_threads()} threads), beside each model's clips/s (train: `train_eager` step, eval: "
            "`eager`, largest batch) and the data path's multiple of it\n"
        )
        print(format_data_benchmark(data_rows, rows))
    if args.profile and device.type == "cpu":
        print(_profile_tables(models, args.image_size, args.batch_sizes[0]))
    if args.json:
        report = {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "allocator": "retain" if retained else "default",
            "native_extraction_kernel": native,
            "native_training_kernels": native_training,
            "native_winograd_kernel": native_winograd,
            "peaks_gflops": peaks,
            "rows": [row.as_dict() for row in rows],
            "ratios": selfy_baseline_ratios(rows),
            "stss": stss_rows,
            "data": data_rows,
        }
        with open(args.json, "w") as file:
            json.dump(report, file, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
