"""
C kernels for the training step of the SELFY block's conv extraction (paper 3.2.1) on CPU: its batch norms on batch
statistics with their ReLUs, its first two layers whole, and its third layer's conv, in as few passes over memory and
multiply-adds as they need.

The extraction's BNs see 10-20x the backbone's activations (the 16 -> 64 conv's 4.5 million outputs per
SELFYNet-TSM-R18 clip), and PyTorch's ops spend a pass on each step: the squares, their sums, the affine map, the
ReLU, in backward the ReLU's mask, then the BN backward's two. Here a BN + ReLU over rows of channels is one pass for
its statistics and one writing its output; its backward one pass for the sums it needs and one writing the input
gradient, the ReLU's decisions recomputed from the input (bit for bit: the library is compiled without FMA
contraction, which only the stride-2 conv's products turn on). The first layer (1 -> C channels, a 3x3 conv over U x U similarity maps, its BN and ReLU), alone or
with the second (a 3x3 stride-2 conv to 16 channels, its BN and ReLU), runs vectorised over 16 maps at a time,
recomputing the first layer's tiny conv in each pass instead of storing its output: the second conv's output is the
one large tensor it writes, and both convs' gradients come from two backward passes. The third layer's conv (3x3,
stride 2, 16 -> 64 channels over 5x5 maps) runs forward, input gradient and weight gradient over the taps inside the
map only (49 of its 81), register-blocked over windows and output channels (`stride_two_conv`).

Statistics are sums in double: mean, then squares about it, where the input is not already centred (but for the
second conv's output, summed in the one pass that computes it, where double leaves no cancellation). Built and
cached as `native_extraction` builds its kernel (C with GCC/Clang vector extensions and OpenMP, for any instruction
set: GCC 12+ or Clang); where it cannot be built the callers run their PyTorch ops. `SELFY_HF_NATIVE_KERNELS=0`
turns it off.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from .native_extraction import kernel_threads, load_library

_LANES = 16
_MAX_WIDTH = 256  # values per block of rows (the C code's MAXW)
_MAX_FIRST_CHANNELS = 16  # the first layer's output channels (MAXC)
_MAX_FIRST_SIDE = 9  # the first layer's map side (MAXU)

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define LANES 16
#define MAXW 256
#define MAXC 16
#define MAXU 9

typedef float vec __attribute__((vector_size(LANES * 4)));
typedef float uvec __attribute__((vector_size(LANES * 4), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(LANES * 4)));
typedef double dvec __attribute__((vector_size(8 * 8)));  /* half a vec's values, widened */

#define LOAD(p) (*(const uvec *)(p))
#define STORE(p, v) (*(uvec *)(p) = (v))
#define LOW(v) __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), dvec)
#define HIGH(v) __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15), dvec)

/* Threads take contiguous ranges of blocks and combine their sums in thread order: the same sums on every call. */
static void split(int64_t blocks, int threads, int t, int64_t *first, int64_t *last) {
    int64_t per = blocks / threads, extra = blocks % threads;
    *first = t * per + (t < extra ? t : extra);
    *last = *first + per + (t < extra);
}

static void combine(int threads, int count, double partial[][2][MAXW], double *first, double *second) {
    for (int j = 0; j < count; j++) first[j] = second[j] = 0.0;
    for (int t = 0; t < threads; t++)
        for (int j = 0; j < count; j++) { first[j] += partial[t][0][j]; second[j] += partial[t][1][j]; }
}

static double lane_sum(vec v) {
    double total = 0.0;
    for (int m = 0; m < LANES; m++) total += v[m];
    return total;
}

/* The BN's affine map a * (x - shift) + b, and where the ReLU after it passes gradients (as threshold_backward: where
   its output > 0). The forward keeps NaN as PyTorch's ReLU does. */
static inline vec affine(vec a, vec x, vec shift, vec b) { return a * (x - shift) + b; }
static inline float affine1(float a, float x, float shift, float b) { return a * (x - shift) + b; }
static inline ivec passes(vec y, int relu) { return relu ? (ivec)(y > 0) : (ivec){} - 1; }
static inline ivec keeps(vec y, int relu) { return relu ? ~(ivec)(y <= 0) : (ivec){} - 1; }
static inline vec masked(vec v, ivec mask) { return (vec)((ivec)v & mask); }

/* ---- Rows of C channels laid end to end, read as blocks of w values (w = C where 16 divides C, else 16 where C
   divides 16): value j of a block belongs to channel j % C. Per-channel vectors come tiled to w values. ---- */

/* Per block position: the sums of (x - shift) and of its square (shift NULL: zero); or, with a and b given, of
   g' and of g' * (x - shift), g' the gradient g through the ReLU after a * (x - shift) + b. */
static void row_sums(const float *x, const float *g, const float *a, const float *shift, const float *b, int relu,
                     int64_t n, int w, int threads, double *first, double *second) {
    int64_t blocks = n / w, tail = n % w;
    int vecs = w / LANES;
    double partial[threads][2][MAXW];
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num();
        dvec s[MAXW / 8], q[MAXW / 8];
        memset(s, 0, sizeof s);
        memset(q, 0, sizeof q);
        int64_t begin, end;
        split(blocks, threads, t, &begin, &end);
        for (int64_t k = begin; k < end; k++)
            for (int v = 0; v < vecs; v++) {
                int64_t at = k * w + v * LANES;
                vec raw = LOAD(x + at), offset = shift ? LOAD(shift + v * LANES) : (vec){};
                vec centred = raw - offset, value = centred;
                if (a) value = masked(LOAD(g + at), passes(affine(LOAD(a + v * LANES), raw, offset, LOAD(b + v * LANES)), relu));
                s[2 * v] += LOW(value);
                s[2 * v + 1] += HIGH(value);
                q[2 * v] += LOW(value) * LOW(centred);
                q[2 * v + 1] += HIGH(value) * HIGH(centred);
            }
        memcpy(partial[t][0], s, sizeof(double) * w);
        memcpy(partial[t][1], q, sizeof(double) * w);
    }
    combine(threads, w, partial, first, second);
    for (int j = 0; j < tail; j++) {
        int64_t i = blocks * w + j;
        float offset = shift ? shift[j] : 0.0f, centred = x[i] - offset, value = centred;
        if (a) value = relu && !(affine1(a[j], x[i], offset, b[j]) > 0) ? 0.0f : g[i];
        first[j] += value;
        second[j] += (double)value * centred;
    }
}

void selfy_row_moments(const float *x, const float *shift, int64_t n, int w, double *sums, double *squares,
                       int threads) {
    row_sums(x, NULL, NULL, shift, NULL, 0, n, w, threads, sums, squares);
}

void selfy_row_gradient_moments(const float *x, const float *g, const float *a, const float *shift, const float *b,
                                int relu, int64_t n, int w, double *sums, double *products, int threads) {
    row_sums(x, g, a, shift, b, relu, n, w, threads, sums, products);
}

/* out = a * (x - shift) + b, through a ReLU if `relu`. */
void selfy_row_affine(const float *x, float *out, const float *a, const float *shift, const float *b, int relu,
                      int64_t n, int w, int threads) {
    int64_t blocks = n / w, tail = n % w;
    int vecs = w / LANES;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < blocks; k++)
        for (int v = 0; v < vecs; v++) {
            int64_t at = k * w + v * LANES;
            vec y = affine(LOAD(a + v * LANES), LOAD(x + at), LOAD(shift + v * LANES), LOAD(b + v * LANES));
            STORE(out + at, masked(y, keeps(y, relu)));
        }
    for (int j = 0; j < tail; j++) {
        int64_t i = blocks * w + j;
        float y = affine1(a[j], x[i], shift[j], b[j]);
        out[i] = relu && y <= 0 ? 0.0f : y;
    }
}

/* dx = a * g' + (c + d * (x - shift)), g' the gradient g through the ReLU after a * (x - shift) + b. */
void selfy_row_affine_gradient(const float *x, const float *g, float *dx, const float *a, const float *shift,
                               const float *b, const float *c, const float *d, int relu, int64_t n, int w,
                               int threads) {
    int64_t blocks = n / w, tail = n % w;
    int vecs = w / LANES;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t k = 0; k < blocks; k++)
        for (int v = 0; v < vecs; v++) {
            int64_t at = k * w + v * LANES;
            vec av = LOAD(a + v * LANES), xv = LOAD(x + at), offset = LOAD(shift + v * LANES);
            vec through = masked(LOAD(g + at), passes(affine(av, xv, offset, LOAD(b + v * LANES)), relu));
            STORE(dx + at, av * through + (LOAD(c + v * LANES) + LOAD(d + v * LANES) * (xv - offset)));
        }
    for (int j = 0; j < tail; j++) {
        int64_t i = blocks * w + j;
        float through = relu && !(affine1(a[j], x[i], shift[j], b[j]) > 0) ? 0.0f : g[i];
        dx[i] = a[j] * through + (c[j] + d[j] * (x[i] - shift[j]));
    }
}

/* ---- A 3x3 stride-2 conv (padding 1) from s x s to t x t channels-last maps (the extraction's third layer, 16 ->
   64 channels over 5x5 maps): forward, input gradient and weight gradient, each over the taps inside the map only
   (49 of the 81 on 5x5 maps). Matrix products whose operands stay in cache may contract to FMAs; the BN kernels
   keep the library's no-contraction rule. ---- */
#if defined(__clang__)
#define CONTRACTED
#define CONTRACT _Pragma("clang fp contract(fast)")
#else
#define CONTRACTED __attribute__((optimize("fp-contract=fast")))
#define CONTRACT
#endif
#define SROWS 6   /* windows per register block of the forward */
#define GROWS 12  /* windows per register block of the input gradient */
#define WCHANNELS 4  /* input channels per register block of the weight gradient */
#define WCHUNK 64    /* windows per block of the weight gradient (its operands in L2) */

/* The input position tap k (ky * 3 + kx) reads at output position p, -1 on the padding. */
static inline int s2_input(int s, int t, int p, int k) {
    int y = 2 * (p / t) - 1 + k / 3, x = 2 * (p % t) - 1 + k % 3;
    return y < 0 || y >= s || x < 0 || x >= s ? -1 : y * s + x;
}

/* The taps inside the map at output position p: kernel index and input position. */
static int s2_taps(int s, int t, int p, int *tap, int *in) {
    int n = 0;
    for (int k = 0; k < 9; k++) {
        int at = s2_input(s, t, p, k);
        if (at < 0) continue;
        tap[n] = k;
        in[n++] = at;
    }
    return n;
}

/* y[n][p][o] = bias[o] + sum over taps inside, c of x[n][in][c] * w[tap][c][o]; w packed [tap][ci][co]. */
#define S2_FORWARD(VECS)                                                                                            \
    static CONTRACTED void s2_forward##VECS(const float *x, const float *w, const float *bias, float *y, int64_t n, \
                                            int s, int ci, int co, int threads) {                                   \
        CONTRACT                                                                                                    \
        const int t = (s - 1) / 2 + 1, xs = s * s * ci, ys = t * t * co;                                            \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                          \
        for (int64_t block = 0; block < (n + SROWS - 1) / SROWS; block++) {                                        \
            int64_t first = block * SROWS;                                                                          \
            int count = n - first < SROWS ? (int)(n - first) : SROWS;                                               \
            const float *xr[SROWS];                                                                                 \
            for (int r = 0; r < SROWS; r++) xr[r] = x + (first + (r < count ? r : count - 1)) * xs;                 \
            for (int p = 0; p < t * t; p++) {                                                                       \
                int tap[9], in[9], taps = s2_taps(s, t, p, tap, in);                                                \
                for (int o = 0; o < co; o += VECS * LANES) {                                                        \
                    vec acc[SROWS][VECS];                                                                           \
                    for (int r = 0; r < SROWS; r++)                                                                 \
                        for (int q = 0; q < VECS; q++) acc[r][q] = LOAD(bias + o + q * LANES);                      \
                    for (int k = 0; k < taps; k++) {                                                                \
                        const float *wk = w + (int64_t)tap[k] * ci * co + o;                                        \
                        const int at = in[k] * ci;                                                                  \
                        for (int c = 0; c < ci; c++) {                                                              \
                            vec wv[VECS];                                                                           \
                            for (int q = 0; q < VECS; q++) wv[q] = LOAD(wk + c * co + q * LANES);                   \
                            for (int r = 0; r < SROWS; r++)                                                         \
                                for (int q = 0; q < VECS; q++) acc[r][q] += wv[q] * xr[r][at + c];                  \
                        }                                                                                           \
                    }                                                                                               \
                    for (int r = 0; r < count; r++)                                                                 \
                        for (int q = 0; q < VECS; q++) STORE(y + (first + r) * ys + p * co + o + q * LANES, acc[r][q]); \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
    }
S2_FORWARD(4)
S2_FORWARD(2)
S2_FORWARD(1)

void selfy_s2_forward(const float *x, const float *w, const float *bias, float *y, int64_t n, int s, int ci, int co,
                      int threads) {
    if (co % (4 * LANES) == 0) s2_forward4(x, w, bias, y, n, s, ci, co, threads);
    else if (co % (2 * LANES) == 0) s2_forward2(x, w, bias, y, n, s, ci, co, threads);
    else s2_forward1(x, w, bias, y, n, s, ci, co, threads);
}

/* dx[n][in][c] = sum over the (p, tap) reaching in, o of g[n][p][o] * wt[tap][o][c]; wt packed [tap][co][ci]. */
void CONTRACTED selfy_s2_input_gradient(const float *g, const float *wt, float *dx, int64_t n, int s, int ci, int co,
                                        int threads) {
    CONTRACT
    const int t = (s - 1) / 2 + 1, xs = s * s * ci, gs = t * t * co;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t block = 0; block < (n + GROWS - 1) / GROWS; block++) {
        int64_t first = block * GROWS;
        int count = n - first < GROWS ? (int)(n - first) : GROWS;
        const float *gr[GROWS];
        for (int r = 0; r < GROWS; r++) gr[r] = g + (first + (r < count ? r : count - 1)) * gs;
        for (int in = 0; in < s * s; in++) {
            int pos[4], tap[4], pairs = 0, y = in / s, x = in % s;
            for (int i = 0; i < t; i++)
                for (int j = 0; j < t; j++) {
                    int ky = y + 1 - 2 * i, kx = x + 1 - 2 * j;
                    if (ky < 0 || ky > 2 || kx < 0 || kx > 2) continue;
                    pos[pairs] = i * t + j;
                    tap[pairs++] = ky * 3 + kx;
                }
            for (int c = 0; c < ci; c += LANES) {
                vec acc[GROWS];
                for (int r = 0; r < GROWS; r++) acc[r] = (vec){};
                for (int k = 0; k < pairs; k++) {
                    const float *wk = wt + (int64_t)tap[k] * co * ci + c;
                    const int at = pos[k] * co;
                    for (int o = 0; o < co; o++) {
                        vec wv = LOAD(wk + o * ci);
                        for (int r = 0; r < GROWS; r++) acc[r] += wv * gr[r][at + o];
                    }
                }
                for (int r = 0; r < count; r++) STORE(dx + (first + r) * xs + in * ci + c, acc[r]);
            }
        }
    }
}

/* partial[thread][tap][c][o] = sum over the thread's windows and the positions where tap is inside of
   x[n][in][c] * g[n][p][o]; the caller adds the threads' parts. */
#define S2_WEIGHT_GRADIENT(VECS)                                                                                    \
    static CONTRACTED void s2_weight_gradient##VECS(const float *x, const float *g, float *partial, int64_t n,     \
                                                    int s, int ci, int co, int threads) {                           \
        CONTRACT                                                                                                    \
        const int t = (s - 1) / 2 + 1, xs = s * s * ci, gs = t * t * co;                                            \
        const int64_t per = 9 * (int64_t)ci * co;                                                                   \
        _Pragma("omp parallel num_threads(threads)")                                                               \
        {                                                                                                           \
            int th = omp_get_thread_num();                                                                          \
            float *dw = partial + th * per;                                                                         \
            memset(dw, 0, per * sizeof(float));                                                                     \
            int64_t chunks = (n + WCHUNK - 1) / WCHUNK, begin, end;                                                 \
            split(chunks, threads, th, &begin, &end);                                                               \
            for (int64_t chunk = begin; chunk < end; chunk++) {                                                     \
                int64_t first = chunk * WCHUNK, last = first + WCHUNK < n ? first + WCHUNK : n;                     \
                for (int k = 0; k < 9; k++)                                                                         \
                    for (int c0 = 0; c0 < ci; c0 += WCHANNELS)                                                      \
                        for (int o = 0; o < co; o += VECS * LANES) {                                                \
                            float *out = dw + ((int64_t)k * ci + c0) * co + o;                                      \
                            vec acc[WCHANNELS][VECS];                                                               \
                            for (int c = 0; c < WCHANNELS; c++)                                                     \
                                for (int q = 0; q < VECS; q++) acc[c][q] = LOAD(out + c * co + q * LANES);          \
                            for (int p = 0; p < t * t; p++) {                                                       \
                                const int at = s2_input(s, t, p, k);                                                \
                                if (at < 0) continue;                                                               \
                                const float *gv = g + first * gs + p * co + o;                                      \
                                const float *xv = x + first * xs + at * ci + c0;                                    \
                                for (int64_t w = first; w < last; w++, gv += gs, xv += xs) {                        \
                                    vec gq[VECS];                                                                   \
                                    for (int q = 0; q < VECS; q++) gq[q] = LOAD(gv + q * LANES);                    \
                                    for (int c = 0; c < WCHANNELS; c++)                                             \
                                        for (int q = 0; q < VECS; q++) acc[c][q] += gq[q] * xv[c];                  \
                                }                                                                                   \
                            }                                                                                       \
                            for (int c = 0; c < WCHANNELS; c++)                                                     \
                                for (int q = 0; q < VECS; q++) STORE(out + c * co + q * LANES, acc[c][q]);          \
                        }                                                                                           \
            }                                                                                                       \
        }                                                                                                           \
    }
S2_WEIGHT_GRADIENT(4)
S2_WEIGHT_GRADIENT(2)
S2_WEIGHT_GRADIENT(1)

void selfy_s2_weight_gradient(const float *x, const float *g, float *partial, int64_t n, int s, int ci, int co,
                              int threads) {
    if (co % (4 * LANES) == 0) s2_weight_gradient4(x, g, partial, n, s, ci, co, threads);
    else if (co % (2 * LANES) == 0) s2_weight_gradient2(x, g, partial, n, s, ci, co, threads);
    else s2_weight_gradient1(x, g, partial, n, s, ci, co, threads);
}

/* ---- The first layer: a 3x3 conv (padding 1) from one channel to c channels over u x u maps, its output
   channels-last (n, u, u, c). 16 maps at a time, transposed into a zero-padded [u + 2][u + 2] grid of vectors (maps
   past n are zeros). Per-channel values (a, b, c, d, shift) come as c floats. ---- */

/* Transpose 16 vectors in place (r[i][j] <-> r[j][i]): 2x2, 4x4 and 8x8 blocks swapped in turn. */
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
static inline void transpose16(vec *r) {
    vec t[LANES];
    for (int i = 0; i < 16; i += 2) {
        t[i] = SHUFFLE(r[i], r[i + 1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30);
        t[i + 1] = SHUFFLE(r[i], r[i + 1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
    }
    for (int i = 0; i < 16; i += 4)
        for (int j = i; j < i + 2; j++) {
            r[j] = SHUFFLE(t[j], t[j + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29);
            r[j + 2] = SHUFFLE(t[j], t[j + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
        }
    for (int i = 0; i < 16; i += 8)
        for (int j = i; j < i + 4; j++) {
            t[j] = SHUFFLE(r[j], r[j + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
            t[j + 4] = SHUFFLE(r[j], r[j + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
        }
    for (int j = 0; j < 8; j++) {
        r[j] = SHUFFLE(t[j], t[j + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
        r[j + 8] = SHUFFLE(t[j], t[j + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
}

/* Rows first..first + 15 of a (n, width) array as width vectors over the rows (zeros past n), 16 x 16 blocks
   transposed in registers. */
static void load_rows(const float *rows, int64_t n, int64_t first, int width, vec *out) {
    int count = n - first < LANES ? (int)(n - first) : LANES, whole = width / LANES * LANES;
    for (int k = 0; k < whole; k += LANES) {
        vec block[LANES];
        for (int m = 0; m < LANES; m++) block[m] = m < count ? LOAD(rows + (first + m) * width + k) : (vec){};
        transpose16(block);
        memcpy(out + k, block, sizeof block);
    }
    for (int k = whole; k < width; k++)
        for (int m = 0; m < LANES; m++) out[k][m] = m < count ? rows[(first + m) * width + k] : 0.0f;
}

static void store_rows(const vec *values, int64_t n, int64_t first, int width, float *rows) {
    int count = n - first < LANES ? (int)(n - first) : LANES, whole = width / LANES * LANES;
    for (int k = 0; k < whole; k += LANES) {
        vec block[LANES];
        memcpy(block, values + k, sizeof block);
        transpose16(block);
        for (int m = 0; m < count; m++) STORE(rows + (first + m) * width + k, block[m]);
    }
    for (int k = whole; k < width; k++)
        for (int m = 0; m < count; m++) rows[(first + m) * width + k] = values[k][m];
}

/* The tile of maps first..first + 15 (zeros past n), transposed into a zero-padded grid. */
static void load_maps(const float *x, int64_t n, int64_t first, int u, vec *grid) {
    int side = u + 2;
    vec maps[MAXU * MAXU];
    load_rows(x, n, first, u * u, maps);
    memset(grid, 0, sizeof(vec) * side * side);
    for (int i = 0; i < u; i++) memcpy(grid + (i + 1) * side + 1, maps + i * u, sizeof(vec) * u);
}

static inline vec conv_at(const vec *grid, int side, const float *w, int i, int j) {
    vec y = {0};
    for (int ki = 0; ki < 3; ki++)
        for (int kj = 0; kj < 3; kj++) y += w[ki * 3 + kj] * grid[(i + ki) * side + j + kj];
    return y;
}

static vec valid_lanes(int64_t first, int64_t n) {
    vec valid;
    for (int m = 0; m < LANES; m++) valid[m] = first + m < n;
    return valid;
}

/* The first layer's outputs for a tile, [position][channel]: its conv output y (NULL: not kept) and its BN + ReLU
   output z. */
static void first_outputs(const vec *grid, const float *w, const float *a, const float *shift, const float *b,
                          int relu, int u, int c, vec *y, vec *z) {
    for (int i = 0; i < u; i++)
        for (int j = 0; j < u; j++)
            for (int ch = 0; ch < c; ch++) {
                int at = (i * u + j) * c + ch;
                vec conv = conv_at(grid, u + 2, w + ch * 9, i, j);
                vec pre = affine(a[ch] + (vec){}, conv, shift[ch] + (vec){}, b[ch] + (vec){});
                if (y) y[at] = conv;
                z[at] = masked(pre, keeps(pre, relu));
            }
}

/* The first conv's gradients from its output gradient gy at (i, j): its kernel k's tap sums and the padded input
   grid's gradient `back`. */
static inline void first_conv_backward_at(const vec *grid, const float *k, int side, int i, int j, vec gy, vec *taps,
                                          vec *back) {
    for (int tap = 0; tap < 9; tap++) {
        int cell = (i + tap / 3) * side + j + tap % 3;
        taps[tap] += gy * grid[cell];
        back[cell] += k[tap] * gy;
    }
}

/* The maps' gradient: the inner u x u of the padded grid's gradient, stored for the tile's maps. */
static void store_grid_gradient(const vec *back, int u, int64_t n, int64_t first, vec *inner, float *grad_x) {
    for (int i = 0; i < u; i++)
        for (int j = 0; j < u; j++) inner[i * u + j] = back[(i + 1) * (u + 2) + j + 1];
    store_rows(inner, n, first, u * u, grad_x);
}

/* out[k] = the sum over threads of partial[t][k], in thread order. */
static void sum_threads(int threads, int count, double partial[][MAXC * 9], double *out) {
    for (int k = 0; k < count; k++) {
        out[k] = 0.0;
        for (int t = 0; t < threads; t++) out[k] += partial[t][k];
    }
}

/* Per channel: the sums of (y - shift) and its square, y the conv's output (shift NULL: zero); or, with a and b given,
   of g' and of g' * (y - shift), g' the channels-last gradient g through the ReLU after a * (y - shift) + b. */
static void first_sums(const float *x, const float *w, const float *g, const float *a, const float *shift,
                       const float *b, int relu, int64_t n, int u, int c, int threads, double *first,
                       double *second) {
    int64_t tiles = (n + LANES - 1) / LANES;
    int side = u + 2;
    double partial[threads][2][MAXW];
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num();
        vec grid[(MAXU + 2) * (MAXU + 2)], grads[MAXU * MAXU * MAXC];
        double s[MAXC] = {0}, q[MAXC] = {0};
        int64_t begin, end;
        split(tiles, threads, t, &begin, &end);
        for (int64_t tile = begin; tile < end; tile++) {
            load_maps(x, n, tile * LANES, u, grid);
            if (a) load_rows(g, n, tile * LANES, u * u * c, grads);
            vec valid = valid_lanes(tile * LANES, n);
            for (int ch = 0; ch < c; ch++) {
                vec vs = {0}, vq = {0};
                float offset = shift ? shift[ch] : 0.0f;
                for (int i = 0; i < u; i++)
                    for (int j = 0; j < u; j++) {
                        vec y = conv_at(grid, side, w + ch * 9, i, j), centred = (y - offset) * valid, value = centred;
                        if (a) {
                            vec pre = affine(a[ch] + (vec){}, y, offset + (vec){}, b[ch] + (vec){});
                            value = masked(grads[(i * u + j) * c + ch], passes(pre, relu));
                        }
                        vs += value;
                        vq += value * centred;
                    }
                s[ch] += lane_sum(vs);
                q[ch] += lane_sum(vq);
            }
        }
        memcpy(partial[t][0], s, sizeof(double) * c);
        memcpy(partial[t][1], q, sizeof(double) * c);
    }
    combine(threads, c, partial, first, second);
}

void selfy_first_moments(const float *x, const float *w, const float *shift, int64_t n, int u, int c,
                         double *sums, double *squares, int threads) {
    first_sums(x, w, NULL, NULL, shift, NULL, 0, n, u, c, threads, sums, squares);
}

void selfy_first_gradient_moments(const float *x, const float *w, const float *g, const float *a, const float *shift,
                                  const float *b, int relu, int64_t n, int u, int c, double *sums,
                                  double *products, int threads) {
    first_sums(x, w, g, a, shift, b, relu, n, u, c, threads, sums, products);
}

/* out = a * (conv(x) - shift) + b, through a ReLU if `relu`; channels-last. */
void selfy_first_forward(const float *x, const float *w, const float *a, const float *shift, const float *b, int relu,
                         int64_t n, int u, int c, float *out, int threads) {
    int64_t tiles = (n + LANES - 1) / LANES;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t tile = 0; tile < tiles; tile++) {
        vec grid[(MAXU + 2) * (MAXU + 2)], values[MAXU * MAXU * MAXC];
        load_maps(x, n, tile * LANES, u, grid);
        first_outputs(grid, w, a, shift, b, relu, u, c, NULL, values);
        store_rows(values, n, tile * LANES, u * u * c, out);
    }
}

/* With gy = a * g' + (c_ + d_ * (y - shift)) (the BN's input gradient, g' as in first_sums): the conv's input
   gradient (grad_x, NULL: none) and its weight gradient summed in double (grad_w, c x 9, NULL: none). */
void selfy_first_backward(const float *x, const float *w, const float *g, const float *a, const float *shift,
                          const float *b, const float *c_, const float *d_, int relu, int64_t n, int u, int c,
                          float *grad_x, double *grad_w, int threads) {
    int64_t tiles = (n + LANES - 1) / LANES;
    int side = u + 2;
    double partial[threads][MAXC * 9];
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num();
        vec grid[(MAXU + 2) * (MAXU + 2)], grads[MAXU * MAXU * MAXC], back[(MAXU + 2) * (MAXU + 2)];
        vec inner[MAXU * MAXU];
        double weights[MAXC * 9] = {0};
        int64_t begin, end;
        split(tiles, threads, t, &begin, &end);
        for (int64_t tile = begin; tile < end; tile++) {
            load_maps(x, n, tile * LANES, u, grid);
            load_rows(g, n, tile * LANES, u * u * c, grads);
            memset(back, 0, sizeof(vec) * side * side);
            for (int ch = 0; ch < c; ch++) {
                const float *k = w + ch * 9;
                vec sums[9] = {0};
                for (int i = 0; i < u; i++)
                    for (int j = 0; j < u; j++) {
                        vec y = conv_at(grid, side, k, i, j);
                        vec pre = affine(a[ch] + (vec){}, y, shift[ch] + (vec){}, b[ch] + (vec){});
                        vec through = masked(grads[(i * u + j) * c + ch], passes(pre, relu));
                        /* no mask for the maps past n: their zeros take nothing from gy to either gradient */
                        vec gy = a[ch] * through + (c_[ch] + d_[ch] * (y - shift[ch]));
                        first_conv_backward_at(grid, k, side, i, j, gy, sums, back);
                    }
                for (int tap = 0; tap < 9; tap++) weights[ch * 9 + tap] += lane_sum(sums[tap]);
            }
            if (grad_x) store_grid_gradient(back, u, n, tile * LANES, inner, grad_x);
        }
        memcpy(partial[t], weights, sizeof(double) * c * 9);
    }
    if (grad_w) sum_threads(threads, c * 9, partial, grad_w);
}

/* ---- The first two layers whole: the first as above (c1 channels), then a 3x3 stride-2 conv (padding 1) to c2 = 16
   channels over its u x u output, (n, v, v, c2) channels-last, v = (u - 1) / 2 + 1. The first layer's output is
   recomputed in every pass from the maps, never stored. The second conv's weight comes as [ky][kx][c1][c2]. ---- */

#define PAIR_C2 LANES
typedef struct { int u, v, c1, c2; } pair_shape;

/* A thread's tiles: the grid, both layers' values and gradients, the second conv's weight-gradient sums; carved out of
   the caller's scratch (selfy_pair_scratch_bytes per thread, 64-byte aligned). */
typedef struct { vec *grid, *y1, *z1, *y2, *g2, *gz1, *back, *weights; dvec *weight_sums; } pair_scratch;

static int64_t pair_scratch_vectors(const pair_shape *p) {
    int side = p->u + 2, first = p->u * p->u * p->c1, second = p->v * p->v * p->c2, taps = 9 * p->c1 * p->c2;
    return 2 * side * side + 3 * first + 2 * second + 3 * taps;  /* the weight-gradient sums: 2 dvecs a tap */
}

int64_t selfy_pair_scratch_bytes(int u, int c1, int c2) {
    pair_shape p = {u, (u - 1) / 2 + 1, c1, c2};
    return pair_scratch_vectors(&p) * (int64_t)sizeof(vec);
}

static pair_scratch pair_scratch_of(const pair_shape *p, vec *scratch, int thread) {
    int side = p->u + 2, first = p->u * p->u * p->c1, second = p->v * p->v * p->c2, taps = 9 * p->c1 * p->c2;
    vec *at = scratch + thread * pair_scratch_vectors(p);
    pair_scratch s;
    s.grid = at, at += side * side;
    s.y1 = at, at += first;
    s.z1 = at, at += first;
    s.y2 = at, at += second;
    s.g2 = at, at += second;
    s.gz1 = at, at += first;
    s.back = at, at += side * side;
    s.weights = at, at += taps;
    s.weight_sums = (dvec *)at;
    return s;
}

/* The input position a second-layer output (i, j) reads at tap (ky, kx), or -1 on the padding. */
static inline int second_input(const pair_shape *p, int i, int j, int ky, int kx) {
    int y = 2 * i - 1 + ky, x = 2 * j - 1 + kx;
    return y < 0 || y >= p->u || x < 0 || x >= p->u ? -1 : y * p->u + x;
}

/* The second conv over a tile, its 16 output channels in 16 accumulators (c2 = 16: a constant, kept in registers). */
static void second_conv(const vec *z1, const float *w2, const pair_shape *p, vec *y2) {
    for (int i = 0; i < p->v; i++)
        for (int j = 0; j < p->v; j++) {
            vec out[PAIR_C2] = {0};
            for (int tap = 0; tap < 9; tap++) {
                int at = second_input(p, i, j, tap / 3, tap % 3);
                for (int ci = 0; at >= 0 && ci < p->c1; ci++) {
                    vec value = z1[at * p->c1 + ci];
                    const float *w = w2 + (tap * p->c1 + ci) * PAIR_C2;
                    for (int co = 0; co < PAIR_C2; co++) out[co] += w[co] * value;
                }
            }
            memcpy(y2 + (i * p->v + j) * PAIR_C2, out, sizeof out);
        }
}

/* The second conv's input gradient (gz1) and weight gradient (added to `weights`, NULL: none) from its output
   gradient g2. */
static void second_conv_backward(const vec *z1, const vec *g2, const float *w2, const pair_shape *p, vec *gz1,
                                 vec *weights) {
    memset(gz1, 0, sizeof(vec) * p->u * p->u * p->c1);
    for (int i = 0; i < p->v; i++)
        for (int j = 0; j < p->v; j++) {
            vec g[PAIR_C2];
            memcpy(g, g2 + (i * p->v + j) * PAIR_C2, sizeof g);
            for (int tap = 0; tap < 9; tap++) {
                int at = second_input(p, i, j, tap / 3, tap % 3);
                for (int ci = 0; at >= 0 && ci < p->c1; ci++) {
                    const float *w = w2 + (tap * p->c1 + ci) * PAIR_C2;
                    vec sums[4] = {0};  /* four chains, not one of 16 dependent FMAs */
                    for (int co = 0; co < PAIR_C2; co++) sums[co % 4] += w[co] * g[co];
                    gz1[at * p->c1 + ci] += (sums[0] + sums[1]) + (sums[2] + sums[3]);
                    if (!weights) continue;
                    vec value = z1[at * p->c1 + ci], *weight = weights + (tap * p->c1 + ci) * PAIR_C2;
                    for (int co = 0; co < PAIR_C2; co++) weight[co] += value * g[co];
                }
            }
        }
}

/* Forward: the second conv's output y2 (n, v, v, c2), and per channel the sums of y2 and of its square. */
void selfy_pair_forward(const float *x, const float *w1, const float *a1, const float *s1, const float *b1, int relu1,
                        const float *w2, int64_t n, int u, int c1, int c2, float *y2, double *sums, double *squares,
                        vec *scratch, int threads) {
    pair_shape p = {u, (u - 1) / 2 + 1, c1, c2};
    int64_t tiles = (n + LANES - 1) / LANES;
    double partial[threads][2][MAXW];
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num();
        pair_scratch s = pair_scratch_of(&p, scratch, t);
        double sum[MAXC] = {0}, square[MAXC] = {0};
        int64_t begin, end;
        split(tiles, threads, t, &begin, &end);
        for (int64_t tile = begin; tile < end; tile++) {
            load_maps(x, n, tile * LANES, u, s.grid);
            first_outputs(s.grid, w1, a1, s1, b1, relu1, u, c1, NULL, s.z1);
            second_conv(s.z1, w2, &p, s.y2);
            vec valid = valid_lanes(tile * LANES, n);  /* maps past n: zeros, but not after the first BN */
            for (int co = 0; co < c2; co++) {
                vec vs = {0}, vq = {0};
                for (int at = 0; at < p.v * p.v; at++) {
                    vec value = s.y2[at * c2 + co] * valid;
                    vs += value;
                    vq += value * value;
                }
                sum[co] += lane_sum(vs);
                square[co] += lane_sum(vq);
            }
            store_rows(s.y2, n, tile * LANES, p.v * p.v * c2, y2);
        }
        memcpy(partial[t][0], sum, sizeof(double) * c2);
        memcpy(partial[t][1], square, sizeof(double) * c2);
    }
    combine(threads, c2, partial, sums, squares);
}

/* Backward, given the second BN's terms (its input gradient a2 * g' + c2_ + d2_ * (y2 - s2), g' = gz2 through its
   ReLU). first_pass: the first BN's gradient sums (of g1' and g1' * (y1 - s1)) and the second conv's weight gradient
   (w2 layout, double); else, with the first BN's terms c1_, d1_: the maps' gradient (NULL: none) and the first conv's
   weight gradient (c1 x 9, double). */
void selfy_pair_backward(const float *x, const float *w1, const float *a1, const float *s1, const float *b1, int relu1,
                         const float *w2, const float *y2, const float *gz2, const float *a2, const float *s2,
                         const float *b2, const float *c2_, const float *d2_, int relu2, const float *c1_,
                         const float *d1_, int first_pass, int64_t n, int u, int c1, int c2, double *sums,
                         double *products, double *grad_w2, float *grad_x, double *grad_w1, vec *scratch,
                         int threads) {
    pair_shape p = {u, (u - 1) / 2 + 1, c1, c2};
    int64_t tiles = (n + LANES - 1) / LANES;
    int side = u + 2, second = p.v * p.v * c2, taps2 = 9 * c1 * c2;
    double partial[threads][2][MAXW], partial_w1[threads][MAXC * 9];
    #pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num();
        pair_scratch s = pair_scratch_of(&p, scratch, t);
        memset(s.weights, 0, sizeof(vec) * taps2);
        memset(s.weight_sums, 0, 2 * sizeof(vec) * taps2);
        double sum[MAXC] = {0}, product[MAXC] = {0}, weights1[MAXC * 9] = {0};
        int64_t begin, end;
        split(tiles, threads, t, &begin, &end);
        for (int64_t tile = begin; tile < end; tile++) {
            load_maps(x, n, tile * LANES, u, s.grid);
            first_outputs(s.grid, w1, a1, s1, b1, relu1, u, c1, s.y1, s.z1);
            load_rows(y2, n, tile * LANES, second, s.y2);
            load_rows(gz2, n, tile * LANES, second, s.g2);
            vec valid = valid_lanes(tile * LANES, n);  /* no gradient from the maps past n */
            for (int at = 0; at < second; at++) {
                int co = at % c2;
                vec pre = affine(a2[co] + (vec){}, s.y2[at], s2[co] + (vec){}, b2[co] + (vec){});
                vec through = masked(s.g2[at], passes(pre, relu2));
                s.g2[at] = (a2[co] * through + (c2_[co] + d2_[co] * (s.y2[at] - s2[co]))) * valid;
            }
            second_conv_backward(s.z1, s.g2, w2, &p, s.gz1, first_pass ? s.weights : NULL);
            if (first_pass)
                for (int k = 0; k < taps2; k++) {
                    s.weight_sums[2 * k] += LOW(s.weights[k]);
                    s.weight_sums[2 * k + 1] += HIGH(s.weights[k]);
                    s.weights[k] = (vec){};
                }
            memset(s.back, 0, sizeof(vec) * side * side);
            for (int ch = 0; ch < c1; ch++) {
                vec vs = {0}, vq = {0}, taps[9] = {0};
                for (int i = 0; i < u; i++)
                    for (int j = 0; j < u; j++) {
                        int at = (i * u + j) * c1 + ch;
                        vec pre = affine(a1[ch] + (vec){}, s.y1[at], s1[ch] + (vec){}, b1[ch] + (vec){});
                        vec through = masked(s.gz1[at], passes(pre, relu1)), centred = s.y1[at] - s1[ch];
                        if (first_pass) {
                            vs += through;
                            vq += through * centred;
                            continue;
                        }
                        vec gy = a1[ch] * through + (c1_[ch] + d1_[ch] * centred);
                        first_conv_backward_at(s.grid, w1 + ch * 9, side, i, j, gy, taps, s.back);
                    }
                sum[ch] += lane_sum(vs);
                product[ch] += lane_sum(vq);
                for (int tap = 0; tap < 9; tap++) weights1[ch * 9 + tap] += lane_sum(taps[tap]);
            }
            if (!first_pass && grad_x) store_grid_gradient(s.back, u, n, tile * LANES, s.gz1, grad_x);
        }
        memcpy(partial[t][0], sum, sizeof(double) * c1);
        memcpy(partial[t][1], product, sizeof(double) * c1);
        memcpy(partial_w1[t], weights1, sizeof(double) * c1 * 9);
    }
    if (first_pass) {
        combine(threads, c1, partial, sums, products);
        for (int k = 0; k < taps2; k++) grad_w2[k] = 0.0;
        for (int t = 0; t < threads; t++) {
            const dvec *weight_sums = pair_scratch_of(&p, scratch, t).weight_sums;
            for (int k = 0; k < taps2; k++)
                for (int m = 0; m < LANES / 2; m++) grad_w2[k] += weight_sums[2 * k][m] + weight_sums[2 * k + 1][m];
        }
    } else if (grad_w1) {
        sum_threads(threads, c1 * 9, partial_w1, grad_w1);
    }
}
"""


class TrainingKernels:
    """The compiled training kernels (see the module docstring), called on fp32 CPU tensors through `row_batch_norm`,
    `first_layer` and `first_two_layers`."""

    def __init__(self, library: ctypes.CDLL):
        pointer, size, number = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        signatures = {
            "row_moments": [pointer] * 2 + [size, number] + [pointer] * 2 + [number],
            "row_gradient_moments": [pointer] * 5 + [number, size, number] + [pointer] * 2 + [number],
            "row_affine": [pointer] * 5 + [number, size, number, number],
            "row_affine_gradient": [pointer] * 8 + [number, size, number, number],
            "first_moments": [pointer] * 3 + [size, number, number] + [pointer] * 2 + [number],
            "first_gradient_moments": [pointer] * 6
            + [number, size, number, number]
            + [pointer] * 2
            + [number],
            "first_forward": [pointer] * 5 + [number, size, number, number, pointer, number],
            "first_backward": [pointer] * 8 + [number, size, number, number] + [pointer] * 2 + [number],
            "s2_forward": [pointer] * 4 + [size] + [number] * 4,
            "s2_input_gradient": [pointer] * 3 + [size] + [number] * 4,
            "s2_weight_gradient": [pointer] * 3 + [size] + [number] * 4,
            "pair_forward": [pointer] * 5 + [number, pointer, size] + [number] * 3 + [pointer] * 4 + [number],
            "pair_backward": [pointer] * 5
            + [number]
            + [pointer] * 8
            + [number]
            + [pointer] * 2
            + [number, size]
            + [number] * 3
            + [pointer] * 6
            + [number],
        }
        self._functions = {}
        for name, argtypes in signatures.items():
            function = getattr(library, f"selfy_{name}")
            function.argtypes, function.restype = argtypes, None
            self._functions[name] = function
        self._pair_scratch_bytes = library.selfy_pair_scratch_bytes
        self._pair_scratch_bytes.argtypes, self._pair_scratch_bytes.restype = [number] * 3, size

    def call(self, name: str, *arguments, threads: int | None = None) -> None:
        """Run a C function on `threads` (default: `kernel_threads()`; the C functions take it last); tensors are
        passed by address (the caller keeps them alive and sizes them)."""
        values = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in arguments]
        self._functions[name](*values, threads or kernel_threads())

    def pair_scratch(
        self, side: int, first_channels: int, second_channels: int, threads: int
    ) -> torch.Tensor:
        """The working memory of the first two layers' functions on `threads` threads (torch's allocator: a
        failure raises here, not inside the C code)."""
        per_thread = self._pair_scratch_bytes(side, first_channels, second_channels)
        return torch.empty(threads * per_thread, dtype=torch.uint8)


def row_width(channels: int) -> int | None:
    """Values per block of rows for `channels` (a multiple of 16 up to 256, or a divisor of 16); None otherwise."""
    if channels % _LANES == 0 and channels <= _MAX_WIDTH:
        return channels
    return _LANES if _LANES % channels == 0 else None


def supports_rows(rows: torch.Tensor) -> bool:
    """Whether `row_batch_norm` takes these `(M, C)` rows: contiguous fp32 CPU, `C` fitting `row_width`."""
    return (
        _fp32_cpu(rows) and rows.dim() == 2 and rows.is_contiguous() and row_width(rows.shape[1]) is not None
    )


def supports_first_layer(maps: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> bool:
    """Whether `first_layer` takes this conv: one-channel square fp32 CPU maps of side up to 9, a 3x3 kernel with
    stride 1 and padding 1 to up to 16 channels."""
    return (
        _fp32_cpu(maps)
        and maps.dim() == 4
        and maps.shape[1] == 1
        and maps.shape[2] == maps.shape[3] <= _MAX_FIRST_SIDE
        and weight.dtype == torch.float32
        and tuple(weight.shape[1:]) == (1, 3, 3)
        and weight.shape[0] <= _MAX_FIRST_CHANNELS
        and (stride, padding) == (1, 1)
    )


def supports_first_two_layers(
    maps: torch.Tensor, first: torch.Tensor, second: torch.Tensor, strides, paddings
) -> bool:
    """Whether `first_two_layers` takes these convs (weights `first`, `second`): the first as `supports_first_layer`,
    the second a 3x3 fp32 conv with stride 2 and padding 1 to 16 channels (the official 4 -> 16)."""
    return (
        supports_first_layer(maps, first, strides[0], paddings[0])
        and second.dtype == torch.float32
        and tuple(second.shape[1:]) == (first.shape[0], 3, 3)
        and second.shape[0] == _LANES  # the C code's PAIR_C2
        and (strides[1], paddings[1]) == (2, 1)
    )


def _fp32_cpu(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and not x.is_mkldnn


def _tiled(vector: torch.Tensor, width: int) -> torch.Tensor:
    """A per-channel vector as fp32 repeated across a block of `width` values."""
    return vector.float().repeat(width // vector.shape[0]).contiguous()


def _per_channel(sums: torch.Tensor, channels: int) -> torch.Tensor:
    return sums.view(-1, channels).sum(0)


def _normalization(sums, squares, count, shift, gamma, beta, eps):
    """From the sums of `x - shift` and of its squares (float64, per channel): the batch mean and biased variance,
    and the BN as `scale * (x - shift) + offset` (float64) for the float `shift` nearest the mean."""
    centred_mean = sums / count
    mean = centred_mean if shift is None else shift.double() + centred_mean
    var = (squares / count - centred_mean.square()).clamp_min_(0.0)
    invstd = (var + eps).rsqrt()
    scale = gamma.double() * invstd
    shift = mean.float()
    return mean, var, invstd, scale, shift, beta.double() - scale * (mean - shift.double())


def _gradient_terms(sums, products, mean, invstd, scale, shift, count):
    """From the sums of the gradient through the ReLU (g') and of g' * (x - shift): the BN's weight and bias
    gradients, and its input gradient as `scale * g' + c + d * (x - shift)` (c, d per channel)."""
    products = products + (shift.double() - mean) * sums  # about the mean itself
    grad_gamma = products * invstd
    d = -scale * invstd * grad_gamma / count
    c = -scale * sums / count + d * (shift.double() - mean)
    return grad_gamma, sums, c, d


def _row_affine(kernels, rows, scale, shift, offset, activation):
    """The BN (+ ReLU) `scale * (rows - shift) + offset` over `(M, C)` rows; the output and the tiled `scale`, `shift`
    and `offset` the backward reads."""
    width = row_width(rows.shape[1])
    a, shift, b = (_tiled(v, width) for v in (scale, shift, offset))
    out = torch.empty_like(rows)
    kernels.call("row_affine", rows, out, a, shift, b, int(activation), rows.numel(), width)
    return out, a, shift, b


def _row_gradient_terms(kernels, rows, grad, a, shift, b, activation, mean, invstd, scale):
    """`_gradient_terms` of a rows BN (+ ReLU) from one pass over its input and output gradient."""
    count, channels = rows.shape
    width = a.shape[0]
    sums, products = (rows.new_empty(width, dtype=torch.float64) for _ in range(2))
    kernels.call(
        "row_gradient_moments", rows, grad, a, shift, b, int(activation), rows.numel(), width, sums, products
    )
    sums, products = _per_channel(sums, channels), _per_channel(products, channels)
    return _gradient_terms(sums, products, mean, invstd, scale, shift[:channels], count)


def _first_layer_normalization(kernels, maps, weight, gamma, beta, eps):
    """`_normalization` of the first layer's conv output, from two passes over the maps: its mean, then its squares
    about it."""
    count, side, channels = maps.shape[0], maps.shape[-1], weight.shape[0]
    positions = count * side * side
    sums, squares = (maps.new_empty(channels, dtype=torch.float64) for _ in range(2))
    kernels.call("first_moments", maps, weight, None, count, side, channels, sums, squares)
    shift = (sums / positions).float()
    kernels.call("first_moments", maps, weight, shift, count, side, channels, sums, squares)
    return _normalization(sums, squares, positions, shift, gamma, beta, eps)


class _RowBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, bias, eps, activation, centred, kernels):
        count, channels = rows.shape
        width, numel = row_width(channels), rows.numel()
        sums, squares = (rows.new_empty(width, dtype=torch.float64) for _ in range(2))
        first_shift = None
        if not centred:  # first the mean, then the squares about it: no cancellation
            kernels.call("row_moments", rows, None, numel, width, sums, squares)
            first_shift = (_per_channel(sums, channels) / count).float()
        tiled = None if first_shift is None else _tiled(first_shift, width)
        kernels.call("row_moments", rows, tiled, numel, width, sums, squares)
        sums, squares = _per_channel(sums, channels), _per_channel(squares, channels)
        mean, var, invstd, scale, shift, offset = _normalization(
            sums, squares, count, first_shift, weight, bias, eps
        )
        out, a, shift, b = _row_affine(kernels, rows, scale, shift, offset, activation)
        ctx.save_for_backward(rows, a, shift, b, mean, invstd, scale)
        ctx.activation, ctx.kernels = activation, kernels
        return out, mean.float(), var.float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_mean, _grad_var):
        rows, a, shift, b, mean, invstd, scale = ctx.saved_tensors
        width, relu = a.shape[0], int(ctx.activation)
        grad = grad.contiguous().float()
        grad_gamma, grad_beta, c, d = _row_gradient_terms(
            ctx.kernels, rows, grad, a, shift, b, relu, mean, invstd, scale
        )
        grad_rows = None
        if ctx.needs_input_grad[0]:
            grad_rows = torch.empty_like(rows)
            c, d = _tiled(c, width), _tiled(d, width)
            ctx.kernels.call(
                "row_affine_gradient", rows, grad, grad_rows, a, shift, b, c, d, relu, rows.numel(), width
            )
        return grad_rows, grad_gamma.float(), grad_beta.float(), None, None, None, None


class _StrideTwoConv(torch.autograd.Function):
    """`F.conv2d(x, weight, bias, 2, 1)` (3x3) over channels-last maps, forward and both gradients in the C kernels,
    each over the taps inside the map only; channels-last out. `bias` gets the output gradient's sum."""

    @staticmethod
    def forward(ctx, x, weight, bias, kernels):
        count, in_channels, side = x.shape[:3]
        out_side, out_channels = (side - 1) // 2 + 1, weight.shape[0]
        x = x.contiguous(memory_format=torch.channels_last)
        packed = weight.detach().permute(2, 3, 1, 0).contiguous()  # [tap][input channel][output channel]
        bias = x.new_zeros(out_channels) if bias is None else bias.detach().float().contiguous()
        out = x.new_empty(count, out_side, out_side, out_channels)
        kernels.call("s2_forward", x, packed, bias, out, count, side, in_channels, out_channels)
        ctx.save_for_backward(x, weight)
        ctx.kernels = kernels
        return out.permute(0, 3, 1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        kernels, (count, in_channels, side), out_channels = ctx.kernels, x.shape[:3], weight.shape[0]
        grad = grad.float().contiguous(memory_format=torch.channels_last)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            packed = weight.detach().permute(2, 3, 0, 1).contiguous()  # [tap][output channel][input channel]
            grad_x = x.new_empty(count, side, side, in_channels)
            kernels.call("s2_input_gradient", grad, packed, grad_x, count, side, in_channels, out_channels)
            grad_x = grad_x.permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            threads = kernel_threads()
            parts = x.new_empty(threads, 3, 3, in_channels, out_channels)
            kernels.call(
                "s2_weight_gradient", x, grad, parts, count, side, in_channels, out_channels, threads=threads
            )
            grad_weight = parts.sum(0).permute(3, 2, 0, 1).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad_x, grad_weight, grad_bias, None


class _FirstTwoLayers(torch.autograd.Function):
    @staticmethod
    def forward(ctx, maps, w1, gamma1, beta1, w2, gamma2, beta2, eps, activations, kernels):
        count, side, c1, c2 = maps.shape[0], maps.shape[-1], w1.shape[0], w2.shape[0]
        out_side, relu1, relu2 = (side - 1) // 2 + 1, int(activations[0]), int(activations[1])
        maps, w1 = maps.contiguous(), w1.reshape(c1, 9).contiguous()
        w2 = w2.permute(2, 3, 1, 0).contiguous()  # [ky][kx][c1][c2]
        first = _first_layer_normalization(kernels, maps, w1, gamma1, beta1, eps[0])
        a1, s1, b1 = first[3].float(), first[4], first[5].float()
        y2 = maps.new_empty(count, out_side, out_side, c2)
        sums, squares = (maps.new_empty(c2, dtype=torch.float64) for _ in range(2))
        threads = kernel_threads()
        scratch = kernels.pair_scratch(side, c1, c2, threads)
        pair = (maps, w1, a1, s1, b1, relu1, w2, count, side, c1, c2)
        kernels.call("pair_forward", *pair, y2, sums, squares, scratch, threads=threads)
        # One pass: in double, the squares' sum leaves no cancellation at these conv outputs' scales.
        second = _normalization(sums, squares, count * out_side * out_side, None, gamma2, beta2, eps[1])
        z2, a2, s2, b2 = _row_affine(kernels, y2.view(-1, c2), *second[3:], relu2)
        mean_invstd_scale = (first[0], first[2], first[3], second[0], second[2], second[3])
        ctx.save_for_backward(maps, w1, a1, s1, b1, w2, y2, a2, s2, b2, *mean_invstd_scale)
        ctx.activations, ctx.kernels = (relu1, relu2), kernels
        statistics = [t.float() for t in (first[0], first[1], second[0], second[1])]
        return z2.view_as(y2).permute(0, 3, 1, 2), *statistics

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, *_grad_statistics):
        maps, w1, a1, s1, b1, w2, y2, a2, s2, b2, mean1, invstd1, scale1, mean2, invstd2, scale2 = (
            ctx.saved_tensors
        )
        relu1, relu2 = ctx.activations
        count, side, c1, c2 = maps.shape[0], maps.shape[-1], w1.shape[0], w2.shape[-1]
        kernels = ctx.kernels
        grad = grad.permute(0, 2, 3, 1).contiguous().float()  # channels-last, as y2
        second = _row_gradient_terms(
            kernels, y2.view(-1, c2), grad, a2, s2, b2, relu2, mean2, invstd2, scale2
        )
        inputs = (maps, w1, a1, s1, b1, relu1, w2, y2, grad, a2[:c2], s2[:c2], b2[:c2])
        inputs += (second[2].float(), second[3].float(), relu2)
        geometry, threads = (count, side, c1, c2), kernel_threads()
        scratch = kernels.pair_scratch(side, c1, c2, threads)
        # Pass 1: the first BN's gradient sums and the second conv's weight gradient.
        sums, products = (maps.new_empty(c1, dtype=torch.float64) for _ in range(2))
        grad_w2 = maps.new_empty(9 * c1 * c2, dtype=torch.float64)
        outputs = (sums, products, grad_w2, None, None, scratch)
        kernels.call("pair_backward", *inputs, None, None, 1, *geometry, *outputs, threads=threads)
        first = _gradient_terms(sums, products, mean1, invstd1, scale1, s1, count * side * side)
        # Pass 2: the maps' and the first conv's gradients.
        grad_maps = torch.empty_like(maps) if ctx.needs_input_grad[0] else None
        grad_w1 = maps.new_empty(c1 * 9, dtype=torch.float64)
        terms, outputs = (first[2].float(), first[3].float()), (None, None, None, grad_maps, grad_w1, scratch)
        kernels.call("pair_backward", *inputs, *terms, 0, *geometry, *outputs, threads=threads)
        grad_w1 = grad_w1.float().view(c1, 1, 3, 3)
        grad_w2 = grad_w2.float().view(3, 3, c1, c2).permute(3, 2, 0, 1).contiguous()
        floats = [t.float() for t in (first[0], first[1], second[0], second[1])]
        return grad_maps, grad_w1, floats[0], floats[1], grad_w2, floats[2], floats[3], None, None, None


class _FirstLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, maps, weight, gamma, beta, eps, activation, kernels):
        count, side, channels = maps.shape[0], maps.shape[-1], weight.shape[0]
        maps, weight = maps.contiguous(), weight.reshape(channels, 9).contiguous()
        geometry = (count, side, channels)
        mean, var, invstd, scale, shift, offset = _first_layer_normalization(
            kernels, maps, weight, gamma, beta, eps
        )
        a, b = scale.float(), offset.float()
        out = maps.new_empty(count, side, side, channels)
        kernels.call("first_forward", maps, weight, a, shift, b, int(activation), *geometry, out)
        ctx.save_for_backward(maps, weight, a, shift, b, mean, invstd, scale)
        ctx.activation, ctx.kernels = activation, kernels
        return out.permute(0, 3, 1, 2), mean.float(), var.float()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _grad_mean, _grad_var):
        maps, weight, a, shift, b, mean, invstd, scale = ctx.saved_tensors
        count, side, channels = maps.shape[0], maps.shape[-1], weight.shape[0]
        geometry, relu = (count, side, channels), int(ctx.activation)
        grad = grad.permute(0, 2, 3, 1).contiguous().float()  # channels-last rows
        sums, products = (maps.new_empty(channels, dtype=torch.float64) for _ in range(2))
        ctx.kernels.call(
            "first_gradient_moments", maps, weight, grad, a, shift, b, relu, *geometry, sums, products
        )
        grad_gamma, grad_beta, c, d = _gradient_terms(
            sums, products, mean, invstd, scale, shift, count * side * side
        )
        grad_maps = torch.empty_like(maps) if ctx.needs_input_grad[0] else None
        grad_weight = maps.new_empty(channels * 9, dtype=torch.float64) if ctx.needs_input_grad[1] else None
        ctx.kernels.call(
            "first_backward",
            maps,
            weight,
            grad,
            a,
            shift,
            b,
            c.float(),
            d.float(),
            relu,
            *geometry,
            grad_maps,
            grad_weight,
        )
        if grad_weight is not None:
            grad_weight = grad_weight.float().view(channels, 1, 3, 3)
        return grad_maps, grad_weight, grad_gamma.float(), grad_beta.float(), None, None, None


def row_batch_norm(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    activation: bool,
    centred: bool,
    kernels: TrainingKernels,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch norm (affine, batch statistics) of `(M, C)` rows (`supports_rows`), then a ReLU if
    `activation`: the output and the batch mean and biased variance (no gradient). `centred`: the rows' mean is
    known to be near zero, so one pass gives their statistics without cancellation."""
    if not supports_rows(rows):
        raise ValueError(
            f"expected contiguous fp32 CPU (M, C) rows with C fitting row_width, got {rows.shape}"
        )
    _check_per_channel(rows.shape[1], weight, bias)
    out, mean, var = _RowBatchNorm.apply(rows, weight, bias, eps, activation, centred, kernels)
    return out, mean.detach(), var.detach()


def supports_stride_two_conv(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int) -> bool:
    """Whether `stride_two_conv` takes this conv: a 3x3 kernel at stride 2 with padding 1 over square channels-last
    fp32 CPU `(N, C_in, S, S)` maps, `C_in` and `C_out` multiples of 16."""
    return (
        _fp32_cpu(x)
        and _fp32_cpu(weight)
        and x.dim() == 4
        and x.shape[2] == x.shape[3] > 0
        and x.is_contiguous(memory_format=torch.channels_last)
        and weight.dim() == 4
        and weight.shape[1:] == (x.shape[1], 3, 3)
        and x.shape[1] % _LANES == 0
        and weight.shape[0] % _LANES == 0
        and (stride, padding) == (2, 1)
    )


def stride_two_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int,
    padding: int,
    kernels: TrainingKernels,
) -> torch.Tensor:
    """`F.conv2d(x, weight, bias, stride, padding)` for the convs `supports_stride_two_conv` takes (the extraction's
    16 -> 64 layer), forward and backward in the C kernels over the taps inside the map (49 of 81 on 5x5 maps):
    forward 5.7 -> 4.0 ms, input gradient 9.1 -> 3.9 ms (against `_SmallMapConv2d`'s products by rows), weight
    gradient 5.8 -> 4.5 ms per R18 clip. Channels-last out."""
    if not supports_stride_two_conv(x, weight, stride, padding):
        raise ValueError(
            "expected a 3x3, stride 2, padding 1 conv of square channels-last fp32 CPU maps with input and output "
            f"channels in multiples of {_LANES}, got maps {tuple(x.shape)}, weight {tuple(weight.shape)}, "
            f"stride {stride}, padding {padding}"
        )
    if bias is not None:
        _check_per_channel(weight.shape[0], bias)
    return _StrideTwoConv.apply(x, weight, bias, kernels)


def first_layer(
    maps: torch.Tensor,
    weight: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    eps: float,
    activation: bool,
    kernels: TrainingKernels,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 3x3 conv (stride 1, padding 1) of one-channel `(N, 1, U, U)` maps to `(N, C, U, U)` channels-last ones
    (`supports_first_layer`), its training-mode BN and a ReLU if `activation`: the output and the conv output's batch
    mean and biased variance (no gradient)."""
    if not supports_first_layer(maps, weight, 1, 1):
        raise ValueError(
            f"expected fp32 CPU (N, 1, U, U) maps (U <= 9) and a (C <= 16, 1, 3, 3) fp32 weight, got "
            f"{tuple(maps.shape)} {maps.dtype} and {tuple(weight.shape)} {weight.dtype}"
        )
    _check_per_channel(weight.shape[0], gamma, beta)
    out, mean, var = _FirstLayer.apply(maps, weight, gamma, beta, eps, activation, kernels)
    return out, mean.detach(), var.detach()


def first_two_layers(
    maps: torch.Tensor,
    first: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    second: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    eps: tuple[float, float],
    activations: tuple[bool, bool],
    kernels: TrainingKernels,
) -> tuple[torch.Tensor, ...]:
    """`first_layer`, then a 3x3 stride-2 conv (padding 1) of its output, its training-mode BN and a ReLU if
    `activations[1]`, as one differentiable function (`supports_first_two_layers`): `first` and `second` hold each
    layer's conv weight, BN weight and BN bias. The first layer's output is recomputed in each pass instead of stored.
    Returns the `(N, C2, V, V)` channels-last output and each conv output's batch mean and biased variance."""
    if not supports_first_two_layers(maps, first[0], second[0], (1, 2), (1, 1)):
        raise ValueError(
            f"expected fp32 CPU (N, 1, U, U) maps (U <= 9), a (C1 <= 16, 1, 3, 3) and a (16, C1, 3, 3) fp32 weight, "
            f"got {tuple(maps.shape)} {maps.dtype}, {tuple(first[0].shape)} and {tuple(second[0].shape)}"
        )
    _check_per_channel(first[0].shape[0], *first[1:])
    _check_per_channel(second[0].shape[0], *second[1:])
    out, *statistics = _FirstTwoLayers.apply(maps, *first, *second, eps, activations, kernels)
    return out, *(t.detach() for t in statistics)


def _check_per_channel(channels: int, *tensors: torch.Tensor) -> None:
    """The BN weights and biases hold one value per channel (the C code reads that many)."""
    for tensor in tensors:
        if tensor.shape != (channels,) or not tensor.is_floating_point():
            raise ValueError(
                f"expected {channels} floating-point values per channel, got {tuple(tensor.shape)}"
            )


def training_kernels() -> TrainingKernels | None:
    """The training kernels, built or loaded once per process; None where turned off or they cannot be built."""
    library = load_library("training", _SOURCE, ["-ffp-contract=off"])
    return None if library is None else _kernels(library)


@functools.cache
def _kernels(library: ctypes.CDLL) -> TrainingKernels:
    return TrainingKernels(library)


__all__ = [
    "TrainingKernels",
    "first_layer",
    "first_two_layers",
    "row_batch_norm",
    "row_width",
    "stride_two_conv",
    "supports_first_layer",
    "supports_first_two_layers",
    "supports_rows",
    "supports_stride_two_conv",
    "training_kernels",
]
