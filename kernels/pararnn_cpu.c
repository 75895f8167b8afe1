/* ParaRNN's fixed-iteration Newton solve on CPU as one fused kernel, and its adjoint backward (at the
 * end of the file). Built and loaded by kernels/pararnn_cpu.py.
 *
 * Why: the torch.compile solver materialises every step's Jacobian and residual and reads them again
 * in the scan; on a CPU that is memory-bound (about 127 MB moved per LSTM Newton update at T = 4096,
 * N = 256). Here a Newton update evaluates the cell, its Jacobian and the linear recurrence
 *     delta_t = J_t delta_{t-1} + r_t,   r_t = f(h_{t-1}, u_t) - h_t,   h_t += delta_t
 * in the same loop, so Jacobians never reach memory and h is updated in place.
 *
 * Work is split into items (sequence, channel slab, time chunk); Python picks the split
 * (`kernels.pararnn_cpu.work_split`). Channels are independent, so slabs need no communication. Time
 * chunks are the parallel scan, in three phases:
 *   1. reduce, chunks in parallel: chunk 0 runs from the true delta (zero) and is final, so it
 *      updates h; every other chunk runs from a zero delta and keeps its end delta and the
 *      composition of its maps J.
 *   2. carry, per (sequence, slab), over chunks: end delta of chunk c += M_c (end delta of chunk c-1).
 *   3. sweep, chunks 1.. in parallel: rerun from the carried delta, updating h.
 * A chunk's first step reads h^k at the step before it, which another chunk may already have
 * updated: those boundary states are copied before phase 1. With one chunk per sequence the update
 * is phase 1 alone.
 *
 * Cells (models/layers/pararnn.py, GRUCell and LSTMCell) evaluate tanh as 2 sigmoid(2x) - 1, as the
 * torch solver's passes do. Layouts, contiguous: u [B, T, 3, N]; state [B, T, S, N] with S = 1 (GRU
 * h) or 2 (LSTM c, h); recurrent weights a [3, N]; LSTM peepholes p [2, N].
 *
 * Compiled once per scalar type with -DREAL=float or -DREAL=double into separate libraries, so each
 * exports the same names.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef REAL
#define REAL float
#endif
typedef REAL real;

#define INLINE static inline __attribute__((always_inline))

enum { CELL_GRU = 0, CELL_LSTM = 1 };
/* Widest channel slab (stack buffers are sized by it); Python never asks for more. */
#define MAX_SLAB 512

#if defined(REAL_IS_DOUBLE)
INLINE real exp_real(real x) { return exp(x); }
#else
/* expf by range reduction and a degree-6 polynomial (Cephes' coefficients), about 1 ulp: unlike
 * libm's expf it vectorises without -ffast-math. */
INLINE float exp_real(float x) {
    /* Ternaries, not fminf/fmaxf: those keep libm's NaN rules, which stop vectorisation; NaN still
     * propagates (both comparisons are false). */
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float q = 1.9875691500e-4f;
    q = q * r + 1.3981999507e-3f;
    q = q * r + 8.3334519073e-3f;
    q = q * r + 4.1665795894e-2f;
    q = q * r + 1.6666665459e-1f;
    q = q * r + 5.0000001201e-1f;
    q = q * r * r + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return q * scale.f;
}
#endif

INLINE real sigmoid(real x) { return 1 / (1 + exp_real(-x)); }
INLINE real tanh_solver(real x) { return 2 * sigmoid(2 * x) - 1; }

/* GRU: f(h_prev, u) and df/dh_prev for one channel. */
INLINE real gru_step(real hp, real uz, real ur, real uc, real a0, real a1, real a2, real *jac) {
    real z = sigmoid(a0 * hp + uz);
    real r = sigmoid(a1 * hp + ur);
    real c = tanh_solver(a2 * (r * hp) + uc);
    real c_minus_h = c - hp;
    real dz = z * (1 - z) * a0;
    real dr = r * (1 - r) * a1;
    real dc = (1 - c * c) * a2 * (r + hp * dr);
    *jac = (1 - z) + z * dc + c_minus_h * dz;
    return hp + z * c_minus_h;
}

/* LSTM: f([c, h]_prev, u) into (*fc, *fh) and its 2x2 Jacobian (dc/dc, dc/dh, dh/dc, dh/dh). */
INLINE void lstm_step(real c, real h, real uf, real uc, real uo, real a0, real a1, real a2, real p0,
                      real p1, real *fc, real *fh, real *j00, real *j01, real *j10, real *j11) {
    real f = sigmoid(a0 * h + uf + p0 * c);
    real c_tilde = tanh_solver(a1 * h + uc);
    real c_minus_ct = c - c_tilde;
    real c_next = c_tilde + f * c_minus_ct;
    real o = sigmoid(a2 * h + uo + p1 * c_next);
    real tanh_c = tanh_solver(c_next);
    real df = f * (1 - f);
    real dc_dc = f + c_minus_ct * df * p0;
    real dc_dh = c_minus_ct * df * a0 + (1 - f) * (1 - c_tilde * c_tilde) * a1;
    real d_o = o * (1 - o);
    real o_dtanh = o * (1 - tanh_c * tanh_c);
    *fc = c_next;
    *fh = o * tanh_c;
    *j00 = dc_dc;
    *j01 = dc_dh;
    *j10 = d_o * p1 * dc_dc * tanh_c + o_dtanh * dc_dc;
    *j11 = d_o * (a2 + p1 * dc_dh) * tanh_c + o_dtanh * dc_dh;
}

/* The cell without its Jacobian (initial guess, final residual); the compiler drops the dead parts. */
INLINE real gru_value(real hp, real uz, real ur, real uc, real a0, real a1, real a2) {
    real jac;
    return gru_step(hp, uz, ur, uc, a0, a1, a2, &jac);
}

INLINE void lstm_value(real c, real h, real uf, real uc, real uo, real a0, real a1, real a2, real p0,
                       real p1, real *fc, real *fh) {
    real j00, j01, j10, j11;
    lstm_step(c, h, uf, uc, uo, a0, a1, a2, p0, p1, fc, fh, &j00, &j01, &j10, &j11);
}

/* Where one work item's data lives: sequence b's rows, offset to the slab's first channel. */
typedef struct {
    real *state;      /* [T, S, N] at channel d0 */
    const real *u;    /* [T, 3, N] at channel d0 */
    const real *a;    /* [3, N] at channel d0 */
    const real *p;    /* [2, N] at channel d0 (LSTM) */
    const real *g;    /* backward: dL/dh [T, S, N] at channel d0 */
    real *gu;         /* backward: dL/du [T, 3, N] at channel d0 */
    long n, width;    /* row stride, slab width */
} slab_view;

/* One call's tensors and work split (grad_h, grad_u null in the forward). */
typedef struct {
    real *state;
    const real *u, *a, *p, *grad_h;
    real *grad_u;
    long batch, seq_len, n, s;        /* s: state rows per step (1 GRU, 2 LSTM) */
    long slab, slabs, chunks, chunk_len, items;
} problem;

/* Checks the arguments and fills in the work split; returns 0, or -2 for an unsupported argument. */
static int plan(problem *pr, int cell, long slab, long chunks, int threads) {
    if ((cell != CELL_GRU && cell != CELL_LSTM) || slab < 1 || slab > MAX_SLAB || chunks < 1 ||
        chunks > pr->seq_len || threads < 1)
        return -2;
    pr->s = cell == CELL_GRU ? 1 : 2;
    pr->slab = slab;
    pr->slabs = (pr->n + slab - 1) / slab;
    pr->chunk_len = (pr->seq_len + chunks - 1) / chunks;
    pr->chunks = (pr->seq_len + pr->chunk_len - 1) / pr->chunk_len; /* no empty trailing chunk */
    pr->items = pr->batch * pr->slabs * pr->chunks;
    return 0;
}

/* Work item i = ((b * slabs) + slab index) * chunks + chunk: a sequence-slab's chunks are adjacent. */
typedef struct {
    slab_view v;
    long b, d0, chunk, t0, t1;
} work_item;

static work_item locate(const problem *pr, long i) {
    work_item it;
    it.chunk = i % pr->chunks;
    it.b = i / (pr->chunks * pr->slabs);
    it.d0 = (i / pr->chunks) % pr->slabs * pr->slab;
    it.t0 = it.chunk * pr->chunk_len;
    it.t1 = it.t0 + pr->chunk_len < pr->seq_len ? it.t0 + pr->chunk_len : pr->seq_len;
    it.v.state = pr->state + it.b * pr->seq_len * pr->s * pr->n + it.d0;
    it.v.u = pr->u + it.b * pr->seq_len * 3 * pr->n + it.d0;
    it.v.a = pr->a + it.d0;
    it.v.p = pr->p ? pr->p + it.d0 : 0;
    it.v.g = pr->grad_h ? pr->grad_h + it.b * pr->seq_len * pr->s * pr->n + it.d0 : 0;
    it.v.gu = pr->grad_u ? pr->grad_u + it.b * pr->seq_len * 3 * pr->n + it.d0 : 0;
    it.v.n = pr->n;
    it.v.width = pr->n - it.d0 < pr->slab ? pr->n - it.d0 : pr->slab;
    return it;
}

/* Steps [t0, t1) of Newton's linear recurrence delta_t = J_t delta_{t-1} + r_t. hp: h^k at t0 - 1
 * [S, width]; x: delta entering the chunk (out: at its end); both are clobbered. The sweep (m null)
 * updates h += delta in place; the reduce (m given, from a zero delta) leaves h alone and composes
 * the chunk's maps into m. Always inlined with constant m-nullness, so each caller's loop is
 * branch-free: a branch inside the simd loop stopped gcc vectorising it (measured 10x slower). */
INLINE void gru_pass(slab_view v, long t0, long t1, real *restrict hp, real *restrict x, real *restrict m) {
    const long n = v.n, w = v.width;
    const real *restrict a0 = v.a, *restrict a1 = v.a + n, *restrict a2 = v.a + 2 * n;
    if (m)
        for (long i = 0; i < w; i++) { x[i] = 0; m[i] = 1; }
    for (long t = t0; t < t1; t++) {
        real *restrict st = v.state + t * n;
        const real *restrict ut = v.u + t * 3 * n;
#pragma omp simd
        for (long i = 0; i < w; i++) {
            real jac, cur = st[i];
            real f = gru_step(hp[i], ut[i], ut[n + i], ut[2 * n + i], a0[i], a1[i], a2[i], &jac);
            real xi = jac * x[i] + (f - cur);
            x[i] = xi;
            if (m) m[i] = jac * m[i];
            else st[i] = cur + xi;
            hp[i] = cur;
        }
    }
}

INLINE void lstm_pass(slab_view v, long t0, long t1, real *restrict hp, real *restrict x, real *restrict m) {
    const long n = v.n, w = v.width;
    const real *restrict a0 = v.a, *restrict a1 = v.a + n, *restrict a2 = v.a + 2 * n;
    const real *restrict p0 = v.p, *restrict p1 = v.p + n;
    real *restrict hc = hp, *restrict hh = hp + w, *restrict xc = x, *restrict xh = x + w;
    real *restrict m00 = m, *restrict m01 = m + w, *restrict m10 = m + 2 * w, *restrict m11 = m + 3 * w;
    if (m)
        for (long i = 0; i < w; i++) { xc[i] = xh[i] = 0; m00[i] = m11[i] = 1; m01[i] = m10[i] = 0; }
    for (long t = t0; t < t1; t++) {
        real *restrict sc = v.state + t * 2 * n, *restrict sh = sc + n;
        const real *restrict ut = v.u + t * 3 * n;
#pragma omp simd
        for (long i = 0; i < w; i++) {
            real fc, fh, j00, j01, j10, j11, cur_c = sc[i], cur_h = sh[i];
            lstm_step(hc[i], hh[i], ut[i], ut[n + i], ut[2 * n + i], a0[i], a1[i], a2[i], p0[i], p1[i],
                      &fc, &fh, &j00, &j01, &j10, &j11);
            real dc = xc[i], dh = xh[i];
            real nc = j00 * dc + j01 * dh + (fc - cur_c);
            real nh = j10 * dc + j11 * dh + (fh - cur_h);
            xc[i] = nc;
            xh[i] = nh;
            if (m) {
                real q00 = m00[i], q01 = m01[i], q10 = m10[i], q11 = m11[i];
                m00[i] = j00 * q00 + j01 * q10;
                m01[i] = j00 * q01 + j01 * q11;
                m10[i] = j10 * q00 + j11 * q10;
                m11[i] = j10 * q01 + j11 * q11;
            } else {
                sc[i] = cur_c + nc;
                sh[i] = cur_h + nh;
            }
            hc[i] = cur_c;
            hh[i] = cur_h;
        }
    }
}

static void gru_sweep(slab_view v, long t0, long t1, real *hp, real *x) { gru_pass(v, t0, t1, hp, x, 0); }
static void gru_reduce(slab_view v, long t0, long t1, real *hp, real *x, real *m) { gru_pass(v, t0, t1, hp, x, m); }
static void lstm_sweep(slab_view v, long t0, long t1, real *hp, real *x) { lstm_pass(v, t0, t1, hp, x, 0); }
static void lstm_reduce(slab_view v, long t0, long t1, real *hp, real *x, real *m) {
    lstm_pass(v, t0, t1, hp, x, m);
}

/* One row of the initial guess h^0_t = f(0, u_t) over all n channels. */
static void gru_initial_row(const real *restrict ut, const real *restrict a, long n, real *restrict out) {
#pragma omp simd
    for (long i = 0; i < n; i++)
        out[i] = gru_value(0, ut[i], ut[n + i], ut[2 * n + i], a[i], a[n + i], a[2 * n + i]);
}

static void lstm_initial_row(const real *restrict ut, const real *restrict a, const real *restrict p, long n,
                             real *restrict out) {
#pragma omp simd
    for (long i = 0; i < n; i++)
        lstm_value(0, 0, ut[i], ut[n + i], ut[2 * n + i], a[i], a[n + i], a[2 * n + i], p[i], p[n + i], &out[i],
                   &out[n + i]);
}

/* max_i |f(hp, u_t) - h_t| over one row (NaN propagates); hp = h_{t-1}, or zeros at t = 0. */
static real gru_residual_row(const real *restrict hp, const real *restrict ut, const real *restrict a, long n,
                             const real *restrict h) {
    real worst = 0;
    int nans = 0;
#pragma omp simd reduction(max : worst) reduction(+ : nans)
    for (long i = 0; i < n; i++) {
        real diff = fabs(gru_value(hp[i], ut[i], ut[n + i], ut[2 * n + i], a[i], a[n + i], a[2 * n + i]) - h[i]);
        worst = diff > worst ? diff : worst;
        nans += diff != diff;
    }
    return nans ? NAN : worst;
}

static real lstm_residual_row(const real *restrict hp, const real *restrict ut, const real *restrict a,
                              const real *restrict p, long n, const real *restrict h) {
    real worst = 0;
    int nans = 0;
#pragma omp simd reduction(max : worst) reduction(+ : nans)
    for (long i = 0; i < n; i++) {
        real fc, fh;
        lstm_value(hp[i], hp[n + i], ut[i], ut[n + i], ut[2 * n + i], a[i], a[n + i], a[2 * n + i], p[i], p[n + i],
                   &fc, &fh);
        real dc = fabs(fc - h[i]), dh = fabs(fh - h[n + i]);
        real diff = dc > dh ? dc : dh;
        worst = diff > worst ? diff : worst;
        nans += (dc != dc) + (dh != dh);
    }
    return nans ? NAN : worst;
}

/* Phase 2's step: e += M x for a chunk's composed map M [S*S, w] and the carry x [S, w] reaching it. */
static void apply_chunk_map(real *restrict e, const real *restrict m, const real *restrict x, long s, long w) {
    if (s == 1) {
        for (long d = 0; d < w; d++) e[d] += m[d] * x[d];
        return;
    }
    for (long d = 0; d < w; d++) {
        real x0 = x[d], x1 = x[w + d];
        e[d] += m[d] * x0 + m[w + d] * x1;
        e[w + d] += m[2 * w + d] * x0 + m[3 * w + d] * x1;
    }
}

/* Flush denormals to zero in this thread, returning the old control word. Converged steps have zero
 * residual, so their delta decays geometrically through the denormal range, where each operation
 * costs ~100 cycles (measured: the GRU solve 22 -> 9 ms); denormal deltas cannot change h anyway. */
static unsigned flush_denormals(void) {
#if defined(__SSE__)
    unsigned old = _mm_getcsr();
    _mm_setcsr(old | 0x8040); /* FTZ | DAZ */
    return old;
#else
    return 0;
#endif
}

static void restore_denormals(unsigned old) {
#if defined(__SSE__)
    _mm_setcsr(old);
#else
    (void)old;
#endif
}

/* Solve h_t = f(h_{t-1}, u_t), h_{-1} = 0, for all t: h^0_t = f(0, u_t), then `updates` Newton
 * updates, into `state`; *residual = max_t |f(h_{t-1}, u_t) - h_t| at the result.
 * The work split: slabs of `slab` channels (<= MAX_SLAB), `chunks` time chunks per sequence.
 * Returns 0, -1 when out of memory, -2 for an unsupported argument. */
int pararnn_newton_solve(int cell, const real *u, const real *a, const real *p, real *state, long batch,
                         long seq_len, long n, int updates, int threads, long slab, long chunks,
                         real *residual) {
    problem pr = {.state = state, .u = u, .a = a, .p = p, .batch = batch, .seq_len = seq_len, .n = n};
    if (plan(&pr, cell, slab, chunks, threads)) return -2;
    const long s = pr.s, slabs = pr.slabs, items = pr.items;
    chunks = pr.chunks;
    const long vec = s * MAX_SLAB, mat = s * s * MAX_SLAB;
    /* Per item: h^k before the chunk, the chunk's end delta, its composed map. */
    real *boundary = malloc(sizeof(real) * items * vec);
    real *ends = malloc(sizeof(real) * items * vec);
    real *maps = malloc(sizeof(real) * items * mat);
    real *worst = calloc((size_t)threads, sizeof(real));
    real *zeros = calloc((size_t)(s * n), sizeof(real)); /* h_{-1} */
    int status = 0;
    if (!boundary || !ends || !maps || !worst || !zeros) {
        status = -1;
        goto done;
    }

#pragma omp parallel num_threads(threads)
    {
        real hp[2 * MAX_SLAB], x[2 * MAX_SLAB];
        const unsigned csr = flush_denormals();
#pragma omp for schedule(static)
        for (long row = 0; row < batch * seq_len; row++) {
            if (cell == CELL_GRU) gru_initial_row(u + row * 3 * n, a, n, state + row * n);
            else lstm_initial_row(u + row * 3 * n, a, p, n, state + row * 2 * n);
        }
        for (int k = 0; k < updates; k++) {
#pragma omp for schedule(static)
            for (long i = 0; i < items; i++) {
                work_item it = locate(&pr, i);
                const long w = it.v.width;
                real *bd = boundary + i * vec;
                for (long r = 0; r < s; r++) {
                    if (it.t0 == 0) memset(bd + r * w, 0, sizeof(real) * w);
                    else memcpy(bd + r * w, it.v.state + ((it.t0 - 1) * s + r) * n, sizeof(real) * w);
                }
            }
#pragma omp for schedule(static)
            for (long i = 0; i < items; i++) {
                work_item it = locate(&pr, i);
                const long w = it.v.width;
                memcpy(hp, boundary + i * vec, sizeof(real) * s * w);
                if (it.chunk == 0) {
                    memset(x, 0, sizeof(real) * s * w);
                    if (cell == CELL_GRU) gru_sweep(it.v, it.t0, it.t1, hp, x);
                    else lstm_sweep(it.v, it.t0, it.t1, hp, x);
                    memcpy(ends + i * vec, x, sizeof(real) * s * w);
                } else if (cell == CELL_GRU) {
                    gru_reduce(it.v, it.t0, it.t1, hp, ends + i * vec, maps + i * mat);
                } else {
                    lstm_reduce(it.v, it.t0, it.t1, hp, ends + i * vec, maps + i * mat);
                }
            }
            if (chunks > 1) {
#pragma omp for schedule(static)
                for (long q = 0; q < batch * slabs; q++) {
                    const long w = locate(&pr, q * chunks).v.width;
                    for (long i = q * chunks + 1; i < (q + 1) * chunks; i++)
                        apply_chunk_map(ends + i * vec, maps + i * mat, ends + (i - 1) * vec, s, w);
                }
#pragma omp for schedule(static)
                for (long i = 0; i < items; i++) {
                    work_item it = locate(&pr, i);
                    if (it.chunk == 0) continue;
                    memcpy(hp, boundary + i * vec, sizeof(real) * s * it.v.width);
                    memcpy(x, ends + (i - 1) * vec, sizeof(real) * s * it.v.width);
                    if (cell == CELL_GRU) gru_sweep(it.v, it.t0, it.t1, hp, x);
                    else lstm_sweep(it.v, it.t0, it.t1, hp, x);
                }
            }
        }
        real local = 0;
#pragma omp for schedule(static)
        for (long row = 0; row < batch * seq_len; row++) {
            const real *prev = row % seq_len ? state + (row - 1) * s * n : zeros;
            const real *ut = u + row * 3 * n, *h = state + row * s * n;
            real r = cell == CELL_GRU ? gru_residual_row(prev, ut, a, n, h)
                                      : lstm_residual_row(prev, ut, a, p, n, h);
            local = r > local || r != r ? r : local;
        }
        restore_denormals(csr);
#ifdef _OPENMP
        worst[omp_get_thread_num()] = local;
#else
        worst[0] = local;
#endif
    }
    real result = 0;
    for (int i = 0; i < threads; i++) result = worst[i] > result || worst[i] != worst[i] ? worst[i] : result;
    *residual = result;
done:
    free(boundary);
    free(ends);
    free(maps);
    free(worst);
    free(zeros);
    return status;
}

/* ---- Backward: the adjoint recurrence and the vector-Jacobian products, in one reverse sweep ----
 *
 * lambda_t = g_t + J_{t+1}^T lambda_{t+1} (g = dL/dh) runs backwards in time. Each step evaluates the
 * cell at (h_{t-1}, u_t) once and gets from lambda_t, by the chain rule: dL/du_t, the step's share of
 * dL/dparams, and J_t^T lambda_t, the `carry` into lambda_{t-1}. Time chunks use the forward's three
 * phases mirrored: the last chunk is final after phase 1, earlier chunks reduce from a zero carry
 * (composing the maps J^T), and phase 3 reruns them from the carried value. */

/* Steps t1-1 down to t0. carry: in, J_{t1}^T lambda_{t1} (zero at the sequence end); out, J_{t0}^T
 * lambda_{t0}. Reads dL/dh from v.g, writes dL/du to v.gu; acc [3, width] += dL/da. */
static void gru_adjoint_sweep(slab_view v, const real *restrict zero_row, long t0, long t1, real *restrict carry,
                              double *restrict acc) {
    const long n = v.n, w = v.width;
    const real *restrict g = v.g;
    real *restrict gu = v.gu;
    const real *restrict a0 = v.a, *restrict a1 = v.a + n, *restrict a2 = v.a + 2 * n;
    double *restrict acc0 = acc, *restrict acc1 = acc + w, *restrict acc2 = acc + 2 * w;
    for (long t = t1 - 1; t >= t0; t--) {
        const real *restrict hp = t > 0 ? v.state + (t - 1) * n : zero_row;
        const real *restrict ut = v.u + t * 3 * n, *restrict gt = g + t * n;
        real *restrict gut = gu + t * 3 * n;
#pragma omp simd
        for (long i = 0; i < w; i++) {
            real h = hp[i], lam = gt[i] + carry[i];
            real z = sigmoid(a0[i] * h + ut[i]);
            real r = sigmoid(a1[i] * h + ut[n + i]);
            real c = tanh_solver(a2[i] * (r * h) + ut[2 * n + i]);
            real guc = lam * z * (1 - c * c);
            real guz = lam * (c - h) * z * (1 - z);
            real gur = guc * a2[i] * h * r * (1 - r);
            gut[i] = guz;
            gut[n + i] = gur;
            gut[2 * n + i] = guc;
            acc0[i] += (double)(guz * h);
            acc1[i] += (double)(gur * h);
            acc2[i] += (double)(guc * r * h);
            carry[i] = lam * (1 - z) + guz * a0[i] + gur * a1[i] + guc * a2[i] * r;
        }
    }
}

/* From a zero carry: x gets the carry out, m the composed map (carry_out = m carry_in + x). */
static void gru_adjoint_reduce(slab_view v, const real *restrict zero_row, long t0, long t1, real *restrict x,
                               real *restrict m) {
    const long n = v.n, w = v.width;
    const real *restrict g = v.g;
    const real *restrict a0 = v.a, *restrict a1 = v.a + n, *restrict a2 = v.a + 2 * n;
    for (long i = 0; i < w; i++) { x[i] = 0; m[i] = 1; }
    for (long t = t1 - 1; t >= t0; t--) {
        const real *restrict hp = t > 0 ? v.state + (t - 1) * n : zero_row;
        const real *restrict ut = v.u + t * 3 * n, *restrict gt = g + t * n;
#pragma omp simd
        for (long i = 0; i < w; i++) {
            real jac;
            gru_step(hp[i], ut[i], ut[n + i], ut[2 * n + i], a0[i], a1[i], a2[i], &jac);
            x[i] = jac * (gt[i] + x[i]);
            m[i] = jac * m[i];
        }
    }
}

/* As gru_adjoint_sweep; carry, g are [c; h] rows, acc [5, width] += (dL/da, dL/dp). */
static void lstm_adjoint_sweep(slab_view v, const real *restrict zero_row, long t0, long t1,
                               real *restrict carry, double *restrict acc) {
    const long n = v.n, w = v.width;
    const real *restrict g = v.g;
    real *restrict gu = v.gu;
    const real *restrict a0 = v.a, *restrict a1 = v.a + n, *restrict a2 = v.a + 2 * n;
    const real *restrict p0 = v.p, *restrict p1 = v.p + n;
    real *restrict kc = carry, *restrict kh = carry + w;
    double *restrict acc_a0 = acc, *restrict acc_a1 = acc + w, *restrict acc_a2 = acc + 2 * w;
    double *restrict acc_p0 = acc + 3 * w, *restrict acc_p1 = acc + 4 * w;
    for (long t = t1 - 1; t >= t0; t--) {
        const real *restrict sp = t > 0 ? v.state + (t - 1) * 2 * n : zero_row;
        const real *restrict ut = v.u + t * 3 * n, *restrict gt = g + t * 2 * n;
        real *restrict gut = gu + t * 3 * n;
#pragma omp simd
        for (long i = 0; i < w; i++) {
            real c = sp[i], h = sp[n + i];
            real lc = gt[i] + kc[i], lh = gt[n + i] + kh[i];
            real f = sigmoid(a0[i] * h + ut[i] + p0[i] * c);
            real c_tilde = tanh_solver(a1[i] * h + ut[n + i]);
            real c_next = c_tilde + f * (c - c_tilde);
            real o = sigmoid(a2[i] * h + ut[2 * n + i] + p1[i] * c_next);
            real tanh_c = tanh_solver(c_next);
            real guo = lh * tanh_c * o * (1 - o);
            /* Everything reaching c' (its own cotangent, via h' = o tanh(c'), via o's peephole). */
            real gcn = lc + lh * o * (1 - tanh_c * tanh_c) + guo * p1[i];
            real guf = gcn * (c - c_tilde) * f * (1 - f);
            real guc = gcn * (1 - f) * (1 - c_tilde * c_tilde);
            gut[i] = guf;
            gut[n + i] = guc;
            gut[2 * n + i] = guo;
            acc_a0[i] += (double)(guf * h);
            acc_a1[i] += (double)(guc * h);
            acc_a2[i] += (double)(guo * h);
            acc_p0[i] += (double)(guf * c);
            acc_p1[i] += (double)(guo * c_next);
            kc[i] = gcn * f + guf * p0[i];
            kh[i] = guf * a0[i] + guc * a1[i] + guo * a2[i];
        }
    }
}

static void lstm_adjoint_reduce(slab_view v, const real *restrict zero_row, long t0, long t1, real *restrict x,
                                real *restrict m) {
    const long n = v.n, w = v.width;
    const real *restrict g = v.g;
    const real *restrict a0 = v.a, *restrict a1 = v.a + n, *restrict a2 = v.a + 2 * n;
    const real *restrict p0 = v.p, *restrict p1 = v.p + n;
    real *restrict xc = x, *restrict xh = x + w;
    real *restrict m00 = m, *restrict m01 = m + w, *restrict m10 = m + 2 * w, *restrict m11 = m + 3 * w;
    for (long i = 0; i < w; i++) { xc[i] = xh[i] = 0; m00[i] = m11[i] = 1; m01[i] = m10[i] = 0; }
    for (long t = t1 - 1; t >= t0; t--) {
        const real *restrict sp = t > 0 ? v.state + (t - 1) * 2 * n : zero_row;
        const real *restrict ut = v.u + t * 3 * n, *restrict gt = g + t * 2 * n;
#pragma omp simd
        for (long i = 0; i < w; i++) {
            real fc, fh, j00, j01, j10, j11;
            lstm_step(sp[i], sp[n + i], ut[i], ut[n + i], ut[2 * n + i], a0[i], a1[i], a2[i], p0[i], p1[i],
                      &fc, &fh, &j00, &j01, &j10, &j11);
            /* J^T (g + x) and J^T M. */
            real vc = gt[i] + xc[i], vh = gt[n + i] + xh[i];
            xc[i] = j00 * vc + j10 * vh;
            xh[i] = j01 * vc + j11 * vh;
            real q00 = m00[i], q01 = m01[i], q10 = m10[i], q11 = m11[i];
            m00[i] = j00 * q00 + j10 * q10;
            m01[i] = j00 * q01 + j10 * q11;
            m10[i] = j01 * q00 + j11 * q10;
            m11[i] = j01 * q01 + j11 * q11;
        }
    }
}

static void adjoint_sweep(int cell, work_item it, const real *zeros, real *carry, double *acc) {
    if (cell == CELL_GRU) gru_adjoint_sweep(it.v, zeros + it.d0, it.t0, it.t1, carry, acc);
    else lstm_adjoint_sweep(it.v, zeros + it.d0, it.t0, it.t1, carry, acc);
}

/* Gradients of sum_t <grad_h_t, h_t> through the solved recurrence h (forward's layouts): grad_u
 * [B, T, 3, N], grad_a [3, N], grad_p [2, N] (LSTM; null for GRU). Same work split and return codes
 * as pararnn_newton_solve. */
int pararnn_adjoint(int cell, const real *u, const real *a, const real *p, const real *state, const real *grad_h,
                    long batch, long seq_len, long n, int threads, long slab, long chunks, real *grad_u,
                    real *grad_a, real *grad_p) {
    /* The adjoint only reads state; the cast keeps one view type for both directions. */
    problem pr = {.state = (real *)state, .u = u, .a = a, .p = p, .grad_h = grad_h, .grad_u = grad_u,
                  .batch = batch, .seq_len = seq_len, .n = n};
    if (plan(&pr, cell, slab, chunks, threads)) return -2;
    const long s = pr.s, slabs = pr.slabs, items = pr.items, params = cell == CELL_GRU ? 3 : 5;
    chunks = pr.chunks;
    const long vec = s * MAX_SLAB, mat = s * s * MAX_SLAB, acc_len = params * MAX_SLAB;
    real *ends = malloc(sizeof(real) * items * vec);
    real *maps = malloc(sizeof(real) * items * mat);
    double *acc = calloc((size_t)(items * acc_len), sizeof(double));
    real *zeros = calloc((size_t)(s * n), sizeof(real));
    int status = 0;
    if (!ends || !maps || !acc || !zeros) {
        status = -1;
        goto done;
    }

#pragma omp parallel num_threads(threads)
    {
        real carry[2 * MAX_SLAB];
        const unsigned csr = flush_denormals();
        /* Phase 1: the last chunk of each sequence-slab is final; the others reduce. */
#pragma omp for schedule(static)
        for (long i = 0; i < items; i++) {
            work_item it = locate(&pr, i);
            if (it.chunk == chunks - 1) {
                memset(carry, 0, sizeof(real) * s * it.v.width);
                adjoint_sweep(cell, it, zeros, carry, acc + i * acc_len);
                memcpy(ends + i * vec, carry, sizeof(real) * s * it.v.width);
            } else if (cell == CELL_GRU) {
                gru_adjoint_reduce(it.v, zeros + it.d0, it.t0, it.t1, ends + i * vec, maps + i * mat);
            } else {
                lstm_adjoint_reduce(it.v, zeros + it.d0, it.t0, it.t1, ends + i * vec, maps + i * mat);
            }
        }
        if (chunks > 1) {
            /* Phase 2: ends[c] becomes the true carry out of chunk c, from the last chunk backwards. */
#pragma omp for schedule(static)
            for (long q = 0; q < batch * slabs; q++) {
                const long w = locate(&pr, q * chunks).v.width;
                for (long i = (q + 1) * chunks - 2; i >= q * chunks; i--)
                    apply_chunk_map(ends + i * vec, maps + i * mat, ends + (i + 1) * vec, s, w);
            }
            /* Phase 3: the earlier chunks from the carry of the chunk after them. */
#pragma omp for schedule(static)
            for (long i = 0; i < items; i++) {
                work_item it = locate(&pr, i);
                if (it.chunk == chunks - 1) continue;
                memcpy(carry, ends + (i + 1) * vec, sizeof(real) * s * it.v.width);
                adjoint_sweep(cell, it, zeros, carry, acc + i * acc_len);
            }
        }
        /* Parameter gradients: each channel's sum over sequences and chunks, in double. */
#pragma omp for schedule(static)
        for (long d = 0; d < n; d++) {
            const long sl = d / slab, di = d - sl * slab, w = n - sl * slab < slab ? n - sl * slab : slab;
            for (long r = 0; r < params; r++) {
                double total = 0;
                for (long b = 0; b < batch; b++)
                    for (long c = 0; c < chunks; c++)
                        total += acc[((b * slabs + sl) * chunks + c) * acc_len + r * w + di];
                if (r < 3) grad_a[r * n + d] = (real)total;
                else grad_p[(r - 3) * n + d] = (real)total;
            }
        }
        restore_denormals(csr);
    }
done:
    free(ends);
    free(maps);
    free(acc);
    free(zeros);
    return status;
}
