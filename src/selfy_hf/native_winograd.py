"""
3x3 convolutions (stride 1, padding 1) with bias and ReLU over channels-last fp32 maps by Winograd's minimal
filtering F(2x2, 3x3), for eval-mode CPU inference of the SELFY block's feature integration (paper 3.2.2): its
three per-offset convs and the conv fusing the offsets, 64-channel 14x14 maps in SELFYNet-TSM-R18/R50.

Each 2x2 block of outputs comes from a 4x4 patch of the input: the patch is transformed (B^T d B, additions only),
multiplied by the transformed weights (G g G^T, 16 per input/output channel pair, computed once per weight in
float64) position by position, and transformed back (A^T m A). That is 16 multiplications per input channel, output
channel and 2x2 block where the direct conv takes 36: the conv as 16 small matrix products, here register-blocked
over 6 blocks x 64 output channels, 18 blocks at a time so that every intermediate stays in the core's cache.
oneDNN's direct convs reach about half of the FMA peak on these small maps; these run them ~1.6x faster at the
same accuracy (rounding within a few 1e-7 of the outputs' scale, oneDNN's ~7e-7).

A layer applied alike to several stacks of channels (the per-offset convs over `(N, L*C, X, Y)`) runs as one call
with `stacks=L`, the weights shared. Compiled on first use as `native_extraction` compiles its kernel (AVX-512 and
OpenMP required; `SELFY_HF_NATIVE_KERNELS=0` turns it off); where it cannot be built the callers run oneDNN.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .native_extraction import kernel_threads, load_library

_LANES = 16
_TILES = 18  # 2x2 output blocks per unit of work (the C code's TB)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <omp.h>
#ifndef __AVX512F__
#error "the Winograd conv kernel is written for AVX-512"
#endif

#define LANES 16
#define ROWS 6  /* register blocking: ROWS blocks x up to 4 vectors of output channels */
#define TB 18   /* blocks per unit of work */

typedef float vec __attribute__((vector_size(LANES * 4)));
typedef float uvec __attribute__((vector_size(LANES * 4), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(LANES * 4)));

static inline vec load(const float *p) { return *(const uvec *)p; }
static inline void store(float *p, vec v) { *(uvec *)p = v; }
/* NaN passes on, as through PyTorch's and oneDNN's ReLU. */
static inline vec relu(vec x) { return (vec)((ivec)x & ((x > (vec){0}) | (x != x))); }

typedef struct { int64_t maps; int height, width, stacks, cin, cout, relu; } geometry;

/* Block t in (map, stack, block row, block column) order. */
static inline void block_at(const geometry *g, int64_t t, int64_t *map, int *stack, int *bi, int *bj) {
    const int rows = (g->height + 1) / 2, columns = (g->width + 1) / 2;
    *bj = t % columns; t /= columns;
    *bi = t % rows; t /= rows;
    *stack = t % g->stacks;
    *map = t / g->stacks;
}

/* v[p][r][c] = (B^T d B)[p] of block r's 4x4 input patch d, zero beyond the map; zeros for r >= count. */
static void input_transform(const geometry *g, const float *x, int64_t first, int count, float *v) {
    const int64_t pixel = (int64_t)g->stacks * g->cin, step = (int64_t)TB * g->cin;
    for (int r = 0; r < TB; r++) {
        if (r >= count) {
            for (int p = 0; p < 16; p++) memset(v + p * step + r * g->cin, 0, g->cin * sizeof(float));
            continue;
        }
        int64_t map;
        int stack, bi, bj;
        block_at(g, first + r, &map, &stack, &bi, &bj);
        const int y0 = 2 * bi - 1, x0 = 2 * bj - 1;
        const float *base = x + map * g->height * g->width * pixel + stack * g->cin;
        for (int c = 0; c < g->cin; c += LANES) {
            vec d[4][4], t[4][4];
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) {
                    const int yy = y0 + i, xx = x0 + j;
                    const int inside = yy >= 0 && yy < g->height && xx >= 0 && xx < g->width;
                    d[i][j] = inside ? load(base + ((int64_t)yy * g->width + xx) * pixel + c) : (vec){0};
                }
            for (int j = 0; j < 4; j++) {
                t[0][j] = d[0][j] - d[2][j];
                t[1][j] = d[1][j] + d[2][j];
                t[2][j] = d[2][j] - d[1][j];
                t[3][j] = d[1][j] - d[3][j];
            }
            for (int i = 0; i < 4; i++) {
                float *out = v + (4 * i) * step + r * g->cin + c;
                store(out, t[i][0] - t[i][2]);
                store(out + step, t[i][1] + t[i][2]);
                store(out + 2 * step, t[i][2] - t[i][1]);
                store(out + 3 * step, t[i][1] - t[i][3]);
            }
        }
    }
}

/* m[p][r][o] = sum_k v[p][r][k] u[p][k][o], vecs vectors of output channels at a time. */
static inline __attribute__((always_inline)) void products(const geometry *g, const float *v, const float *u,
                                                           float *m, const int vecs) {
    const int cin = g->cin, cout = g->cout;
    for (int p = 0; p < 16; p++) {
        const float *vp = v + (int64_t)p * TB * cin, *up = u + (int64_t)p * cin * cout;
        float *mp = m + (int64_t)p * TB * cout;
        for (int o = 0; o < cout; o += vecs * LANES)
            for (int r0 = 0; r0 < TB; r0 += ROWS) {
                vec acc[ROWS][4];
                for (int r = 0; r < ROWS; r++)
                    for (int q = 0; q < vecs; q++) acc[r][q] = (vec){0};
                for (int k = 0; k < cin; k++) {
                    vec w[4];
                    for (int q = 0; q < vecs; q++) w[q] = load(up + (int64_t)k * cout + o + q * LANES);
                    for (int r = 0; r < ROWS; r++) {
                        const float vr = vp[(r0 + r) * cin + k];
                        for (int q = 0; q < vecs; q++) acc[r][q] += w[q] * vr;
                    }
                }
                for (int r = 0; r < ROWS; r++)
                    for (int q = 0; q < vecs; q++) store(mp + (r0 + r) * cout + o + q * LANES, acc[r][q]);
            }
    }
}

/* Block r's 2x2 outputs A^T m A + bias (ReLU'd where asked), those inside the map. */
static void output_transform(const geometry *g, const float *m, const float *bias, int64_t first, int count,
                             float *y) {
    const int64_t pixel = (int64_t)g->stacks * g->cout, step = (int64_t)TB * g->cout;
    for (int r = 0; r < count; r++) {
        int64_t map;
        int stack, bi, bj;
        block_at(g, first + r, &map, &stack, &bi, &bj);
        float *base = y + map * g->height * g->width * pixel + stack * g->cout;
        for (int o = 0; o < g->cout; o += LANES) {
            vec t[2][4];
            for (int j = 0; j < 4; j++) {
                const float *mj = m + j * step + r * g->cout + o;
                const vec m0 = load(mj), m1 = load(mj + 4 * step), m2 = load(mj + 8 * step);
                const vec m3 = load(mj + 12 * step);
                t[0][j] = m0 + m1 + m2;
                t[1][j] = m1 - m2 - m3;
            }
            const vec b = load(bias + o);
            for (int a = 0; a < 2; a++) {
                const int yy = 2 * bi + a;
                if (yy >= g->height) continue;
                const vec out[2] = {t[a][0] + t[a][1] + t[a][2] + b, t[a][1] - t[a][2] - t[a][3] + b};
                for (int c = 0; c < 2 && 2 * bj + c < g->width; c++)
                    store(base + ((int64_t)yy * g->width + 2 * bj + c) * pixel + o, g->relu ? relu(out[c]) : out[c]);
            }
        }
    }
}

/* scratch: threads x 16 x TB x (cin + cout) floats. */
void selfy_winograd(const float *x, const float *u, const float *bias, float *y, int64_t maps, int height,
                    int width, int stacks, int cin, int cout, int apply_relu, float *scratch, int threads) {
    const geometry g = {maps, height, width, stacks, cin, cout, apply_relu};
    const int64_t blocks = maps * stacks * ((height + 1) / 2) * ((width + 1) / 2);
    const int64_t units = (blocks + TB - 1) / TB, per_thread = 16 * TB * (int64_t)(cin + cout);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t unit = 0; unit < units; unit++) {
        float *v = scratch + omp_get_thread_num() * per_thread, *m = v + 16 * TB * cin;
        const int64_t first = unit * TB;
        const int count = blocks - first < TB ? (int)(blocks - first) : TB;
        input_transform(&g, x, first, count, v);
        if (cout % (4 * LANES) == 0) products(&g, v, u, m, 4);
        else if (cout % (2 * LANES) == 0) products(&g, v, u, m, 2);
        else products(&g, v, u, m, 1);
        output_transform(&g, m, bias, first, count, y);
    }
}
"""

# Winograd's F(2x2, 3x3) weight transform: G g G^T of each 3x3 kernel g.
_WEIGHT_TRANSFORM = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


class WinogradKernel:
    """The compiled kernel. `weights` transforms a conv's weight once; `__call__` runs the conv with it."""

    def __init__(self, library: ctypes.CDLL):
        self._conv = library.selfy_winograd
        pointer, number = ctypes.c_void_p, ctypes.c_int
        self._conv.argtypes = [pointer] * 4 + [ctypes.c_int64] + [number] * 6 + [pointer, number]
        self._conv.restype = None

    @staticmethod
    def weights(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A `(C_out, C_in, 3, 3)` conv weight as the kernel's `(16, C_in, C_out)` fp32 transformed weights (in
        float64, then rounded), and its bias as fp32."""
        if weight.dim() != 4 or weight.shape[2:] != (3, 3) or bias.shape != weight.shape[:1]:
            raise ValueError(
                f"expected a (C_out, C_in, 3, 3) weight and C_out biases, got {tuple(weight.shape)} "
                f"and {tuple(bias.shape)}"
            )
        cout, cin = weight.shape[:2]
        # G g G^T of every kernel at once: its 9 taps times kron(G, G)^T, one (C_out*C_in, 9) x (9, 16) product.
        transform = torch.tensor(_WEIGHT_TRANSFORM, dtype=torch.float64, device=weight.device)
        taps = weight.detach().reshape(cout * cin, 9).double()
        transformed = (taps @ torch.kron(transform, transform).T).T.reshape(16, cout, cin).transpose(1, 2)
        return transformed.float().contiguous(), bias.detach().float().contiguous()

    def __call__(
        self,
        maps: torch.Tensor,
        weights: tuple[torch.Tensor, torch.Tensor],
        stacks: int = 1,
        relu: bool = True,
        threads: int | None = None,
    ) -> torch.Tensor:
        """The conv (3x3, stride 1, padding 1) + bias (+ ReLU) of `weights` (from `weights`) applied to each of the
        `stacks` stacks of `C_in` channels of the channels-last fp32 CPU `(N, stacks * C_in, H, W)` maps; the
        channels-last `(N, stacks * C_out, H, W)` outputs, stack by stack."""
        transformed, bias = weights
        _, cin, cout = _checked_weights(transformed, bias)
        count, channels, height, width = _checked_maps(maps, stacks * cin)
        threads = kernel_threads() if threads is None else threads
        out = maps.new_empty(count, height, width, stacks * cout).permute(0, 3, 1, 2)
        scratch = maps.new_empty(threads * 16 * _TILES * (cin + cout))
        self._conv(
            maps.data_ptr(),
            transformed.data_ptr(),
            bias.data_ptr(),
            out.data_ptr(),
            count,
            height,
            width,
            stacks,
            cin,
            cout,
            int(relu),
            scratch.data_ptr(),
            threads,
        )
        return out


def _checked_weights(transformed: torch.Tensor, bias: torch.Tensor) -> tuple[int, int, int]:
    """The C code reads `16 * C_in * C_out` weights and `C_out` biases: check that they are there."""
    shape = tuple(transformed.shape)
    if not (
        len(shape) == 3
        and shape[0] == 16
        and supports_channels(shape[1], shape[2])
        and bias.shape == (shape[2],)
        and all(t.dtype == torch.float32 and t.is_contiguous() for t in (transformed, bias))
    ):
        raise ValueError(
            "expected contiguous fp32 (16, C_in, C_out) transformed weights and C_out biases with C_in and C_out "
            f"multiples of {_LANES}, got {shape} and {tuple(bias.shape)}"
        )
    return shape


def _checked_maps(maps: torch.Tensor, channels: int) -> tuple[int, int, int, int]:
    if not (
        maps.dtype == torch.float32
        and maps.device.type == "cpu"
        and maps.dim() == 4
        and maps.shape[1] == channels
        and maps.is_contiguous(memory_format=torch.channels_last)
    ):
        raise ValueError(
            f"expected channels-last fp32 CPU (N, {channels}, H, W) maps, got {maps.dtype} {tuple(maps.shape)} "
            f"on {maps.device}"
        )
    return tuple(maps.shape)


def supports_channels(cin: int, cout: int) -> bool:
    """Whether the kernel takes a conv from `cin` to `cout` channels: both whole vectors."""
    return cin > 0 and cout > 0 and cin % _LANES == 0 and cout % _LANES == 0


def winograd_kernel() -> WinogradKernel | None:
    """The kernel, built or loaded once per process; None where turned off or it cannot be built."""
    library = load_library("winograd", _SOURCE, [])
    return None if library is None else _kernel(library)


@functools.cache
def _kernel(library: ctypes.CDLL) -> WinogradKernel:
    return WinogradKernel(library)


__all__ = ["WinogradKernel", "supports_channels", "winograd_kernel"]
