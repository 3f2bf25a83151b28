"""
The SELFY block's similarities and conv feature extraction (paper 3.1-3.2.1: cosine similarities over the (L, U, V)
neighbourhood, then four (1, 3, 3) convs, each with its BN and a ReLU, over every (U, V) map) as one C kernel, for
eval-mode fp32 inference on CPU.

The kernel takes 16 windows at a time (16 positions at one temporal offset): their similarities (each query in
registers against its neighbours' keys, two neighbouring windows sharing each key load, 16 dot products summed at
once, L2 normalisation as per-position scales), then all four convs with their BNs folded into weights and biases.
Nothing in between leaves the core's cache: separate ops write and re-read the all-pairs products, the gathered
windows and the 1 -> 4 -> 16 -> 64 channel intermediates (~50 MB per SELFYNet-TSM-R18 clip). The first conv is
vectorised over the windows, the others over output channels as small register-blocked matrix products that skip
the taps on the stride-2 convs' padding. `ExtractionKernel.__call__` runs the convs alone on given windows.

It is compiled on first use with the machine's C compiler (`$CC`, else `cc`) for this CPU (`-march=native`, AVX-512
and OpenMP required) and kept in `$SELFY_HF_KERNEL_CACHE` (default `~/.cache/selfy_hf/kernels`), one library per
geometry and CPU. Where it cannot be built (no compiler, no AVX-512, a geometry it does not cover, an unwritable
cache) [`extraction_kernel`] returns None and the block runs its PyTorch/oneDNN ops; `SELFY_HF_NATIVE_KERNELS=0`
turns it off. The source travels with the model code (`trust_remote_code`) as the string below.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_LANES = 16  # fp32 values in an AVX-512 vector: the kernel's tile of windows and its block of output channels
_MAX_TILE_BYTES = 1 << 20  # a thread's intermediates for one tile, on its stack

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#ifndef __AVX512F__
#error "the SELFY extraction kernel is written for AVX-512"
#endif

#define LANES 16
#define TILE LANES
#define P1 (WIN * WIN)
#define P2 (W2 * W2)
#define P3 (W3 * W3)
/* Register blocking of the products: 16 accumulators, as (16 / VECS) windows x VECS vectors of output channels. */
#define VECS(c) ((c) % (4 * LANES) == 0 ? 4 : (c) % (2 * LANES) == 0 ? 2 : 1)

typedef float vec __attribute__((vector_size(LANES * 4)));
typedef float uvec __attribute__((vector_size(LANES * 4), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(LANES * 4)));

static inline vec relu(vec x) { return (vec)((ivec)x & (x > (vec){0})); }
static inline vec load(const float *p) { return *(const uvec *)p; }
static inline void store(float *p, vec v) { *(uvec *)p = v; }

/* out[r * out_rows + o] = relu(bias[o] + sum_k x[r * x_rows + x_at[k]] * w[w_at[k] + o]) for windows r < rows. */
static inline __attribute__((always_inline)) void product(
    const float *x, int x_rows, const int *x_at, const int *w_at, int depth, const float *w, const float *bias,
    int outputs, float *out, int64_t out_rows, int rows, const int vecs) {
    const int block = 16 / vecs;
    for (int o = 0; o < outputs; o += vecs * LANES)
        for (int r0 = 0; r0 < TILE; r0 += block) {
            vec acc[16];
            for (int r = 0; r < block; r++)
                for (int v = 0; v < vecs; v++) acc[r * vecs + v] = load(bias + o + v * LANES);
            for (int k = 0; k < depth; k++) {
                const float *wk = w + w_at[k] + o, *xk = x + r0 * x_rows + x_at[k];
                vec wv[4];
                for (int v = 0; v < vecs; v++) wv[v] = load(wk + v * LANES);
#pragma GCC unroll 16
                for (int r = 0; r < block; r++) {
                    float xr = xk[r * x_rows];
                    for (int v = 0; v < vecs; v++) acc[r * vecs + v] += wv[v] * xr;
                }
            }
            for (int r = 0; r < block && r0 + r < rows; r++)
                for (int v = 0; v < vecs; v++)
                    store(out + (r0 + r) * out_rows + o + v * LANES, relu(acc[r * vecs + v]));
        }
}

/* Offsets of the in-map taps of a 3x3 stride-2 conv (padding 1) at output (i, j): into x by its channel and position
   steps, into w packed [tap][input channel][output channel]. */
static int stride2_taps(int i, int j, int size, int channels, int outputs, int x_channel, int x_position,
                        int *x_at, int *w_at) {
    int n = 0;
    for (int ki = 0; ki < 3; ki++)
        for (int kj = 0; kj < 3; kj++) {
            int ii = 2 * i + ki - 1, jj = 2 * j + kj - 1;
            if (ii < 0 || ii >= size || jj < 0 || jj >= size) continue;
            for (int c = 0; c < channels; c++, n++) {
                x_at[n] = c * x_channel + (ii * size + jj) * x_position;
                w_at[n] = ((ki * 3 + kj) * channels + c) * outputs;
            }
        }
    return n;
}

typedef struct {
    int depth2[P2], x2[P2][9 * C1], w2[P2][9 * C1];
    int depth3[P3], x3[P3][9 * C2], w3[P3][9 * C2];
    int x4[P3 * C3], w4[P3 * C3];
} tables;

static void build_tables(tables *t) {
    for (int p = 0; p < P2; p++)
        t->depth2[p] = stride2_taps(p / W2, p % W2, WIN, C1, C2, P1 * LANES, LANES, t->x2[p], t->w2[p]);
    for (int p = 0; p < P3; p++)
        t->depth3[p] = stride2_taps(p / W3, p % W3, W2, C2, C3, 1, C2, t->x3[p], t->w3[p]);
    for (int k = 0; k < P3 * C3; k++) {
        t->x4[k] = k;
        t->w4[k] = k * C4;
    }
}

/* The four convs over a tile: x0[p] holds value p of each window (one lane per window); window r's features go to
   out + r * out_rows. */
static void convolve(const vec *x0, int rows, float *out, int64_t out_rows, const tables *t, const float *const *w,
                     const float *const *b) {
    vec a1[C1][P1]; /* the first conv's output, vectorised over the windows as its input */
    float a2[TILE][P2][C2] __attribute__((aligned(64)));
    float a3[TILE][P3][C3] __attribute__((aligned(64)));
    for (int o = 0; o < C1; o++)
        for (int i = 0; i < WIN; i++)
            for (int j = 0; j < WIN; j++) {
                vec acc = (vec){0} + b[0][o];
                for (int ki = 0; ki < 3; ki++)
                    for (int kj = 0; kj < 3; kj++) {
                        int ii = i + ki - 1, jj = j + kj - 1;
                        if (ii >= 0 && ii < WIN && jj >= 0 && jj < WIN)
                            acc += w[0][o * 9 + ki * 3 + kj] * x0[ii * WIN + jj];
                    }
                a1[o][i * WIN + j] = relu(acc);
            }
    for (int p = 0; p < P2; p++)
        product((const float *)a1, 1, t->x2[p], t->w2[p], t->depth2[p], w[1], b[1], C2, a2[0][p], P2 * C2, TILE,
                VECS(C2));
    for (int p = 0; p < P3; p++)
        product(a2[0][0], P2 * C2, t->x3[p], t->w3[p], t->depth3[p], w[2], b[2], C3, a3[0][p], P3 * C3, TILE,
                VECS(C3));
    product(a3[0][0], P3 * C3, t->x4, t->w4, P3 * C3, w[3], b[3], C4, out, out_rows, rows, VECS(C4));
}

/* windows: (n, WIN * WIN) similarity windows; out: (n, C4) features. w[0]: [output][tap]; w[1..3]:
   [tap][input][output]. */
void selfy_extract(const float *windows, float *out, int64_t n, const float *const *w, const float *const *b,
                   int threads) {
    tables t;
    build_tables(&t);
    int64_t tiles = (n + TILE - 1) / TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < tiles; i++) {
        int64_t start = i * TILE;
        int rows = n - start < TILE ? (int)(n - start) : TILE;
        vec x0[P1];
        for (int p = 0; p < P1; p++) {
            vec v = {0};
            for (int r = 0; r < rows; r++) v[r] = windows[(start + r) * P1 + p];
            x0[p] = v;
        }
        convolve(x0, rows, out + start * C4, C4, &t, w, b);
    }
}

#ifdef CH
static const float zero_row[CH] __attribute__((aligned(64)));

/* Lane i of the result: the sum of a[i]'s lanes. A transpose-and-add tree; each level halves the vectors and keeps
   the lanes in order. */
static inline vec sum_lanes(const vec a[16]) {
    typedef int32_t mask __attribute__((vector_size(LANES * 4)));
    static const mask low[4] = {
        {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
        {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
        {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
        {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30}};
    static const mask high[4] = {
        {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
        {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31},
        {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31},
        {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31}};
    vec v[16];
    for (int i = 0; i < 16; i++) v[i] = a[i];
    for (int level = 0, n = 16; n > 1; level++, n /= 2)
        for (int j = 0; j < n / 2; j++)
            v[j] = __builtin_shuffle(v[2 * j], v[2 * j + 1], low[level]) +
                   __builtin_shuffle(v[2 * j], v[2 * j + 1], high[level]);
    return v[0];
}

#define PADDED ((P1 + 15) / 16 * 16)

/* Lane r of x0[p], p < P1: window r's similarities from its dot products' lanes (16 summed at a time), scaled. */
static void store_window(const vec *dots, const float *key_scales, float query_scale, int r, float *x0f) {
    for (int p0 = 0; p0 < P1; p0 += 16) {
        vec sums = sum_lanes(dots + p0) * load(key_scales + p0) * query_scale;
        for (int i = 0; i < 16 && p0 + i < P1; i++) x0f[(p0 + i) * LANES + r] = sums[i];
    }
}

static inline vec dot_lanes(const vec *q, const float *k) {
    vec even = q[0] * load(k), odd = {0}; /* two chains of FMAs */
    for (int c = 1; c < CH / LANES; c += 2) {
        odd += q[c] * load(k + c * LANES);
        if (c + 1 < CH / LANES) even += q[c + 1] * load(k + (c + 1) * LANES);
    }
    return even + odd;
}

/* One window's dot-product lanes at every displacement, and its keys' scales (0 off the map). */
static void window_dots(const vec *q, const float *keys, const float *key_frame_scales, int y, int x, int height,
                        int width, vec *dots, float *key_scales) {
    int32_t key_of[PADDED] __attribute__((aligned(64)));
    for (int p0 = 0; p0 < P1; p0 += 16) { /* each key's index in its frame, -1 off the map, 16 at a time */
        ivec p = (ivec){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} + p0;
        ivec ky = p / WIN + y, kx = p % WIN + x;
        ivec on_map = (p < P1) & (ky >= 0) & (ky < height) & (kx >= 0) & (kx < width);
        *(ivec *)(key_of + p0) = (on_map & (ky * width + kx)) | ~on_map;
    }
    for (int p = 0; p < PADDED; p++) {
        int key = key_of[p];
        dots[p] = dot_lanes(q, key >= 0 ? keys + (int64_t)key * CH : zero_row);
        key_scales[p] = key >= 0 ? key_frame_scales[key] : 0;
    }
}

/* Two windows side by side in a row, (y, x) and (y, x + 1): each key in reach is loaded once for both. */
static void pair_dots(const vec *q0, const vec *q1, const float *keys, const float *key_frame_scales, int y, int x,
                      int height, int width, vec *dots0, float *scales0, vec *dots1, float *scales1) {
    for (int p = P1; p < PADDED; p++) dots0[p] = dots1[p] = (vec){0}, scales0[p] = scales1[p] = 0;
    for (int u = 0; u < WIN; u++) {
        int ky = y + u;
        for (int j = 0; j <= WIN; j++) {
            int kx = x + j, on_map = ky >= 0 && ky < height && kx >= 0 && kx < width;
            const float *k = on_map ? keys + ((int64_t)ky * width + kx) * CH : zero_row;
            float scale = on_map ? key_frame_scales[ky * width + kx] : 0;
            vec a0 = {0}, a1 = {0};
            for (int c = 0; c < CH / LANES; c++) {
                vec kc = load(k + c * LANES);
                a0 += q0[c] * kc;
                a1 += q1[c] * kc;
            }
            if (j < WIN) dots0[u * WIN + j] = a0, scales0[u * WIN + j] = scale;
            if (j > 0) dots1[u * WIN + j - 1] = a1, scales1[u * WIN + j - 1] = scale;
        }
    }
}

/* x0[p] = the similarities at displacement p (one lane per window) of a tile's windows: positions m0.. (over clips,
   frames and the map) at temporal offset `offset`, zero beyond the clip or the map; each dot product scaled by its
   two positions' `scales`. Queries stay in registers against each neighbour; neighbouring positions share most of
   their keys, which stay in cache from one window to the next, and two windows side by side load each once. */
static void similarities(const float *features, const float *scales, int64_t m0, int rows, int frames, int height,
                         int width, int offset, vec *x0) {
    float *x0f = (float *)x0;
    vec dots[2][PADDED];
    float key_scales[2][PADDED] __attribute__((aligned(64)));
    for (int r = 0; r < TILE;) {
        int64_t m = m0 + r, frame = m / (height * width);
        int at = (int)(m % (height * width)), t = (int)(frame % frames);
        int y = at / width - WIN / 2, x = at % width - WIN / 2;
        int64_t first_key = (frame + offset) * (int64_t)height * width;
        if (r >= rows || t + offset < 0 || t + offset >= frames) {
            for (int p = 0; p < P1; p++) x0f[p * LANES + r] = 0;
            r++;
            continue;
        }
        const float *keys = features + first_key * CH;
        vec q[2][CH / LANES];
        for (int c = 0; c < CH / LANES; c++) q[0][c] = load(features + m * CH + c * LANES);
        if (r + 1 < rows && at % width + 1 < width) { /* the next window: same frame, next column */
            for (int c = 0; c < CH / LANES; c++) q[1][c] = load(features + (m + 1) * CH + c * LANES);
            pair_dots(q[0], q[1], keys, scales + first_key, y, x, height, width, dots[0], key_scales[0], dots[1],
                      key_scales[1]);
            store_window(dots[0], key_scales[0], scales[m], r, x0f);
            store_window(dots[1], key_scales[1], scales[m + 1], r + 1, x0f);
            r += 2;
        } else {
            window_dots(q[0], keys, scales + first_key, y, x, height, width, dots[0], key_scales[0]);
            store_window(dots[0], key_scales[0], scales[m], r, x0f);
            r++;
        }
    }
}

/* features: (clips * frames, height, width, CH), channels last; eps >= 0: cosine similarity, each position's
   features scaled by 1 / sqrt(|f|^2 + eps) (the official L2 normalisation), else dot products; scales: room for
   one float per position. out: (clips * frames * height * width, count, C4), the features of every position's
   windows at the `count` temporal offsets. */
void selfy_stss_extract(const float *features, float *scales, float eps, int64_t clips, int frames, int height,
                        int width, const int32_t *offsets, int count, float *out, const float *const *w,
                        const float *const *b, int threads) {
    tables t;
    build_tables(&t);
    int64_t positions = clips * frames * height * width, tiles = (positions + TILE - 1) / TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t m = 0; m < positions; m++) {
        vec squares = {0};
        for (int c = 0; c < CH / LANES; c++) {
            vec f = load(features + m * CH + c * LANES);
            squares += f * f;
        }
        float sum = 0;
        for (int i = 0; i < LANES; i++) sum += squares[i];
        scales[m] = eps >= 0 ? 1 / sqrtf(sum + eps) : 1;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < tiles * count; i++) {
        int l = (int)(i / tiles);
        int64_t m0 = i % tiles * TILE;
        int rows = positions - m0 < TILE ? (int)(positions - m0) : TILE;
        vec x0[P1];
        similarities(features, scales, m0, rows, frames, height, width, offsets[l], x0);
        convolve(x0, rows, out + (m0 * count + l) * C4, (int64_t)count * C4, &t, w, b);
    }
}
#endif
"""


def _map_sizes(window: int) -> tuple[int, int, int]:
    """The side of the maps each conv reads: the window, then after each 3x3 stride-2 conv (padding 1); the last
    conv's kernel covers the third."""
    middle = (window - 1) // 2 + 1
    return window, middle, (middle - 1) // 2 + 1


class ExtractionKernel:
    """The compiled kernel of one geometry. `__call__`: `(N, U*U)` fp32 similarity windows in, `(N, C4)` features
    out. `from_features` (where built with the correlation's channel count): the correlation's input features in,
    the same features out, the similarities computed tile by tile inside the kernel and never stored."""

    def __init__(self, library: ctypes.CDLL, window: int, channels: tuple[int, ...], hidden: int | None):
        self.window, self.channels, self.hidden = window, channels, hidden
        pointer, pointers, size = ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int64
        self._extract = library.selfy_extract
        self._extract.argtypes = [pointer, pointer, size, pointers, pointers, ctypes.c_int]
        self._extract.restype = None
        if hidden is not None:
            self._stss_extract = library.selfy_stss_extract
            number = ctypes.c_int
            self._stss_extract.argtypes = [pointer, pointer, ctypes.c_float, size, number, number, number]
            self._stss_extract.argtypes += [pointer, number, pointer, pointers, pointers, number]
            self._stss_extract.restype = None

    @staticmethod
    def pack(weight: torch.Tensor, bias: torch.Tensor, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A layer's folded `(C_out, C_in, k, k)` weight and bias in the kernel's order: the first conv's as
        [output][tap], the others' as [tap][input][output]."""
        weight = weight.flatten(1) if first else weight.permute(2, 3, 1, 0)
        return weight.float().contiguous(), bias.float().contiguous()

    def __call__(
        self, windows: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Features `(N, C4)` of `(N, U*U)` fp32 CPU windows; `weights`: the four layers' `pack`ed pairs."""
        size = self.window**2
        if windows.dtype != torch.float32 or windows.device.type != "cpu" or windows.shape[1:] != (size,):
            raise ValueError(
                f"expected (N, {size}) fp32 CPU windows, got {windows.dtype} {tuple(windows.shape)}"
            )
        windows = windows.contiguous()
        out = windows.new_empty(windows.shape[0], self.channels[-1])
        self._extract(
            windows.data_ptr(), out.data_ptr(), windows.shape[0], *self._pointers(weights), kernel_threads()
        )
        return out

    def from_features(
        self,
        features: torch.Tensor,
        frames: int,
        temporal_offsets: Sequence[int],
        weights: list[tuple[torch.Tensor, torch.Tensor]],
        eps: float | None,
    ) -> torch.Tensor:
        """Features `(B*T, H, W, L, C4)` of the similarities of `(B*T, H, W, C)` fp32 CPU features over the
        `temporal_offsets` x U x V neighbourhood, zero beyond the clip or the map (`stss`): cosine similarities, the
        features L2-normalised with `eps` as `l2_normalize` does, or with `eps=None` dot products."""
        if self.hidden is None:
            raise ValueError("this kernel was built without the similarities (no correlation channel count)")
        if features.dtype != torch.float32 or features.device.type != "cpu" or features.dim() != 4:
            raise ValueError(
                f"expected (B*T, H, W, C) fp32 CPU features, got {features.dtype} {features.shape}"
            )
        count, height, width, channels = features.shape
        if channels != self.hidden or count % frames:
            raise ValueError(
                f"expected {self.hidden} channels and whole clips of {frames} frames, got {tuple(features.shape)}"
            )
        features = features.contiguous()
        offsets = torch.tensor(list(temporal_offsets), dtype=torch.int32)
        scales = features.new_empty(count * height * width)
        out = features.new_empty(count, height, width, len(offsets), self.channels[-1])
        self._stss_extract(
            features.data_ptr(),
            scales.data_ptr(),
            -1.0 if eps is None else eps,
            count // frames,
            frames,
            height,
            width,
            offsets.data_ptr(),
            len(offsets),
            out.data_ptr(),
            *self._pointers(weights),
            kernel_threads(),
        )
        return out

    def _pointers(
        self, weights: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[ctypes.Array, ctypes.Array]:
        """The C arrays of the four layers' weight and bias addresses, after checking that each holds what the C
        code reads (it reads as many values as the geometry says, wherever the pointers lead)."""
        if len(weights) != 4:
            raise ValueError(f"expected the four layers' (weight, bias), got {len(weights)}")
        inputs = [1, *self.channels[:3]]
        last = _map_sizes(self.window)[2] ** 2
        for index, ((weight, bias), c_in, c_out) in enumerate(zip(weights, inputs, self.channels)):
            size = (last if index == 3 else 9) * c_in * c_out
            for tensor, count in ((weight, size), (bias, c_out)):
                if not (tensor.dtype == torch.float32 and tensor.is_contiguous() and tensor.numel() == count):
                    raise ValueError(
                        f"layer {index}: expected {count} contiguous fp32 values, got {tensor.shape}"
                    )
        addresses = [tensor.data_ptr() for pair in weights for tensor in pair]
        return (ctypes.c_void_p * 4)(*addresses[0::2]), (ctypes.c_void_p * 4)(*addresses[1::2])


def kernel_threads() -> int:
    """The kernels' OpenMP threads: as many as torch's intra-op pool."""
    return torch.get_num_threads()


def native_kernels_enabled() -> bool:
    return os.environ.get("SELFY_HF_NATIVE_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def supports_geometry(window: int, channels: tuple[int, ...]) -> bool:
    """Four layers, the last three widths in whole vectors, one tile's intermediates within `_MAX_TILE_BYTES`."""
    if len(channels) != 4 or any(c % _LANES for c in channels[1:]) or window < 1:
        return False
    _, middle, last = _map_sizes(window)
    floats = _LANES * (window**2 * (1 + channels[0]) + middle**2 * channels[1] + last**2 * channels[2])
    return 4 * floats <= _MAX_TILE_BYTES


def extraction_kernel(
    window: int, channels: tuple[int, ...], hidden: int | None = None
) -> ExtractionKernel | None:
    """The kernel for `window` x `window` maps and the four `channels`, with `from_features` for `hidden`-channel
    features where `hidden` is given in whole vectors; built or loaded once per process. None where it is turned
    off, not supported or cannot be built."""
    if not native_kernels_enabled() or not supports_geometry(window, tuple(channels)):
        return None
    if hidden is not None and (hidden <= 0 or hidden % _LANES):
        hidden = None
    library = load_library("extraction", _SOURCE, _geometry_flags(window, tuple(channels), hidden))
    return None if library is None else _kernel(library, window, tuple(channels), hidden)


@functools.cache
def _kernel(
    library: ctypes.CDLL, window: int, channels: tuple[int, ...], hidden: int | None
) -> ExtractionKernel:
    return ExtractionKernel(library, window, channels, hidden)


def load_library(name: str, source: str, flags: Sequence[str]) -> ctypes.CDLL | None:
    """The library `compile_library` builds from `source` with `flags` in `kernel_cache_dir()` with `$CC` (else
    `cc`), built or loaded once per process; None where the native kernels are turned off or it cannot be built or
    loaded (logged at INFO with the reason: the callers then run their PyTorch/oneDNN ops)."""
    if not native_kernels_enabled():
        return None
    return _library(name, source, tuple(flags), kernel_cache_dir(), os.environ.get("CC", "cc"))


@functools.cache
def _library(
    name: str, source: str, flags: tuple[str, ...], cache: Path, compiler: str
) -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(str(compile_library(name, source, list(flags), cache, compiler)))
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        logger.info(
            "selfy_hf: the native %s kernels are unavailable (%s); the PyTorch/oneDNN ops run instead",
            name,
            error,
        )
        return None


def kernel_cache_dir() -> Path:
    """Where compiled kernels are kept: `$SELFY_HF_KERNEL_CACHE`, else `selfy_hf/kernels` in the user's cache."""
    environ = os.environ
    return _cache_dir(
        environ.get("SELFY_HF_KERNEL_CACHE"), environ.get("XDG_CACHE_HOME"), environ.get("HOME")
    )


@functools.cache
def _cache_dir(override: str | None, xdg_cache: str | None, home: str | None) -> Path:
    # Cached on the variables it reads: the kernels are looked up on every block call (building the path each time
    # took ~0.15 ms per lookup, ~0.7 ms per SELFY block's inference), and one Path object keeps its hash.
    if override is not None:
        return Path(override)
    base = (
        Path(xdg_cache)
        if xdg_cache is not None
        else Path(home) / ".cache"
        if home
        else Path.home() / ".cache"
    )
    return base / "selfy_hf" / "kernels"


def _build(window: int, channels: tuple[int, ...], hidden: int | None, cache: Path, compiler: str) -> Path:
    """Compile the kernel for this geometry and CPU into `cache`; an existing build is reused."""
    return compile_library("extraction", _SOURCE, _geometry_flags(window, channels, hidden), cache, compiler)


def _geometry_flags(window: int, channels: tuple[int, ...], hidden: int | None) -> list[str]:
    """The C code's geometry: the maps' sides, the layers' widths, the correlation's channels."""
    sizes = dict(zip(("WIN", "W2", "W3"), _map_sizes(window)))
    sizes.update({f"C{i + 1}": width for i, width in enumerate(channels)})
    if hidden is not None:
        sizes["CH"] = hidden
    return [f"-D{k}={v}" for k, v in sizes.items()]


def compile_library(name: str, source: str, flags: list[str], cache: Path, compiler: str) -> Path:
    """Compile C `source` with `flags` for this CPU into a shared library in `cache`, named after a hash of the
    source, compiler, flags and CPU: written under a temporary name, then renamed, so concurrent processes never load
    a partial file; an existing build is reused. Raises RuntimeError where the compiler is missing or fails."""
    executable = shutil.which(compiler)
    if executable is None:
        raise RuntimeError(f"no C compiler {compiler!r}")
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", *flags]
    identity = "\n".join([source, executable, str(os.stat(executable).st_mtime), *flags, _cpu_identity()])
    path = cache / f"selfy_{name}_{hashlib.sha256(identity.encode()).hexdigest()[:20]}.so"
    if path.exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as scratch:
        source_file, library = Path(scratch) / f"{name}.c", Path(scratch) / f"{name}.so"
        source_file.write_text(source)
        result = subprocess.run(
            [executable, *flags, str(source_file), "-o", str(library)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip().splitlines()[:3]}")
        os.replace(library, path)
    logger.info("selfy_hf: built the native %s kernels %s", name, path)
    return path


def _cpu_identity() -> str:
    """What `-march=native` compiles for: the CPU's model and instruction-set flags (Linux), else its name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    wanted = [line for line in lines if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted))


__all__ = [
    "ExtractionKernel",
    "compile_library",
    "extraction_kernel",
    "kernel_cache_dir",
    "kernel_threads",
    "load_library",
    "native_kernels_enabled",
    "supports_geometry",
]
