/*
 * The compiled form of the fused comparison pass (metrics.py holds the numpy form and the definitions).
 *
 * One call reads a run of aligned golden/my elements straight from their raw storage (float32, float64, float16
 * or bfloat16 bit patterns, usually memory-mapped dump payloads), a block of BLOCK elements at a time, and adds
 * them to running float64 sums kept in a caller-owned float64 array ("state"). Nothing is allocated per call and
 * the GIL is released while reading, so pairs can also be compared on threads.
 *
 * The state's slots are listed once, in STATE_SLOTS below; the module exports their names (SLOTS), their start
 * values (STATE_START) and the names of the sums metrics._metric_values takes (METRIC_SUMS), so Python never
 * numbers them itself.
 *
 * Vectorisation: the loops (_kernel_loops.h) use GCC/Clang generic vector types and an exp() of our own, so they
 * vectorise for whatever target the compiler builds for without -ffast-math (which would drop the NaN checks).
 * Every value and sum is float64. On x86-64 the loops are compiled for AVX-512, AVX2+FMA and the baseline (SSE2);
 * the import picks the widest the CPU has. On AArch64 the one copy is NEON (mandatory there); elsewhere it is
 * whatever the compiler makes of 2-lane vectors. `_kernel.isa()` says which copy runs.
 *
 * Built with -DKERNEL_NO_PYTHON, this file is plain C without the Python entry points: bench/kernel_harness.c
 * uses it so to run the loops on another architecture under emulation.
 */
#ifdef KERNEL_NO_PYTHON
#include <stddef.h>
typedef ptrdiff_t Py_ssize_t;
#else
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#endif
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <float.h>

#define BLOCK 1024
#define PREFETCH_AHEAD 2048 /* elements; 1024-4096 measured alike */
enum { K_F32 = 0, K_F64 = 1, K_BF16 = 2, K_F16 = 3 };

/* Every slot of the state: enum name, Python name, start value. The first ones, up to S_FINITE, are the sums
 * metrics._metric_values takes, under its parameter names. Each side's six stats slots (NaN count, inf count,
 * finite count, finite sum, min, max) are consecutive: add_stats writes them from their first. */
#define STATE_SLOTS(X)                                                                                         \
    X(S_N, "n", 0.0) X(S_GM, "gm", 0.0) X(S_GG, "gg", 0.0) X(S_MM, "mm", 0.0) X(S_DD, "dd", 0.0)                \
    X(S_ABS_SUM, "abs_sum", 0.0) X(S_ABS_MAX, "abs_max", 0.0) X(S_REL_SUM, "rel_sum", 0.0)                     \
    X(S_REL_MAX, "rel_max", 0.0) X(S_SHIFT_G, "shift_g", -INFINITY) X(S_SUM_G, "sum_g", 0.0) X(S_T, "t", 0.0) \
    X(S_SHIFT_M, "shift_m", -INFINITY) X(S_SUM_M, "sum_m", 0.0)                                               \
    X(S_FINITE, "finite", 1.0)                                                                                 \
    X(S_G_NAN, "golden_nan", 0.0) X(S_G_INF, "golden_inf", 0.0) X(S_G_FIN, "golden_finite", 0.0)               \
    X(S_G_SUM, "golden_sum", 0.0) X(S_G_MIN, "golden_min", INFINITY) X(S_G_MAX, "golden_max", -INFINITY)       \
    X(S_M_NAN, "my_nan", 0.0) X(S_M_INF, "my_inf", 0.0) X(S_M_FIN, "my_finite", 0.0)                           \
    X(S_M_SUM, "my_sum", 0.0) X(S_M_MIN, "my_min", INFINITY) X(S_M_MAX, "my_max", -INFINITY)

#define SLOT_ID(id, name, start) id,
enum { STATE_SLOTS(SLOT_ID) S_SIZE };
#undef SLOT_ID
#define SLOT_NAME(id, name, start) name,
static const char *const SLOT_NAMES[S_SIZE] = {STATE_SLOTS(SLOT_NAME)};
#undef SLOT_NAME
#define SLOT_START(id, name, start) start,
static const double SLOT_STARTS[S_SIZE] = {STATE_SLOTS(SLOT_START)};
#undef SLOT_START

/* |m - g| up to which exp(m) is formed as exp(g) * exp(m - g) (see kl_step in _kernel_loops.h), and 1/k!. */
static const double NEAR = 0.34;
static const double INV_FACTORIAL[14] = {
    1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
    1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0,
};

/* The original tool's epsilon (float32 machine epsilon): |golden| <= EPS contributes no relative error. */
static const double EPS = 1.1920928955078125e-07;

static Py_ssize_t item_size(int kind) { return kind == K_F64 ? 8 : kind == K_F32 ? 4 : 2; }

typedef struct { double sum, min, max; int bad; } BlockStats; /* bad: may hold NaN/inf, count exactly */
typedef struct { double gm, gg, mm, dd, abs_sum, abs_max, rel_sum, rel_max, sg, t, sm; } BlockMetrics;

/* The same over the finite values only, with NaN and inf counted apart (blocks that hold any). */
static void block_stats_slow(const double *x, Py_ssize_t n, double *st) {
    for (Py_ssize_t i = 0; i < n; i++) {
        double v = x[i];
        if (isnan(v)) { st[0] += 1; continue; }
        if (isinf(v)) { st[1] += 1; continue; }
        st[2] += 1;
        st[3] += v;
        if (v < st[4]) st[4] = v;
        if (v > st[5]) st[5] = v;
    }
}

static int all_finite(const double *x, Py_ssize_t n, const BlockStats *b) {
    if (!b->bad) return 1;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!(fabs(x[i]) <= DBL_MAX)) return 0;
    return 1;
}

static void add_stats(const double *x, Py_ssize_t n, const BlockStats *b, double *st) {
    if (b->bad) { block_stats_slow(x, n, st); return; }
    st[2] += (double)n;
    st[3] += b->sum;
    if (b->min < st[4]) st[4] = b->min;
    if (b->max > st[5]) st[5] = b->max;
}

/* Online log-sum-exp (the numpy pass's rule, metrics._lse_shift): the shift stays 0 while values lie within
 * +-LSE_SAFE, so exp() runs on the values themselves; it moves up only when a value could overflow, and the sums
 * are rescaled then. Values far below the shift underflow to 0, far below the resolution of the sums. */
static const double LSE_SAFE = 600.0;

static void move_shift(double *shift, double block_max, double *sum, double *t) {
    double to;
    if (*shift == -INFINITY) /* the first block */
        to = block_max >= -LSE_SAFE && block_max <= LSE_SAFE ? 0.0 : block_max;
    else if (block_max - *shift > LSE_SAFE)
        to = block_max;
    else
        return;
    double scale = *shift == -INFINITY ? 0.0 : exp(*shift - to);
    *sum *= scale;
    if (t) *t *= scale;
    *shift = to;
}

/* ---- one copy of the loops per instruction set --------------------------------------------------------- */

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86_COPIES 1
#include <immintrin.h>
#endif

/* VMIN/VMAX: the CPU's one-instruction lane-wise min/max where known (NaN lanes keep the second operand, the
 * running value; blocks holding NaN are recounted exactly anyway), else compare-and-select. */
#define ISA(f) f##_base
#define VLANES 2
#ifdef HAVE_X86_COPIES
#define VMIN(a, b) ((vd)_mm_min_pd((__m128d)(a), (__m128d)(b)))
#define VMAX(a, b) ((vd)_mm_max_pd((__m128d)(a), (__m128d)(b)))
#endif
#include "_kernel_loops.h"

#ifdef HAVE_X86_COPIES
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define ISA(f) f##_avx2
#define VLANES 4
#define VMIN(a, b) ((vd)_mm256_min_pd((__m256d)(a), (__m256d)(b)))
#define VMAX(a, b) ((vd)_mm256_max_pd((__m256d)(a), (__m256d)(b)))
#define VWIDEN(f) ((vd)_mm256_cvtps_pd((__m128)(f)))
#include "_kernel_loops.h"
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")
#define ISA(f) f##_avx512
#define VLANES 8
#define VMIN(a, b) ((vd)_mm512_min_pd((__m512d)(a), (__m512d)(b)))
#define VMAX(a, b) ((vd)_mm512_max_pd((__m512d)(a), (__m512d)(b)))
#define VRCP14(a) ((vd)_mm512_rcp14_pd((__m512d)(a)))
#define VWIDEN(f) ((vd)_mm512_cvtps_pd((__m256)(f)))
#include "_kernel_loops.h"
#pragma GCC pop_options
#endif

typedef void (*FullPass)(const char *, int, const char *, int, Py_ssize_t, int, int, double *);
typedef void (*LightPass)(const char *, int, const char *, int, Py_ssize_t, double *);
static FullPass full_pass = full_pass_base;
static LightPass light_pass = light_pass_base;
/* The copy every CPU of the target runs: on AArch64, NEON's 2 float64 lanes. */
#ifdef __aarch64__
#define BASE_ISA "neon"
#else
#define BASE_ISA "baseline"
#endif
static const char *isa_name = BASE_ISA;

/* The widest copy this CPU runs, or the one asked for by name ("avx512", "avx2", BASE_ISA); 0 if unknown or not
 * supported here. */
static int pick_isa(const char *want) {
#ifdef HAVE_X86_COPIES
    __builtin_cpu_init();
    int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                 __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (want ? !strcmp(want, "avx512") && avx512 : avx512) {
        full_pass = full_pass_avx512; light_pass = light_pass_avx512; isa_name = "avx512";
        return 1;
    }
    if (want ? !strcmp(want, "avx2") && avx2 : avx2) {
        full_pass = full_pass_avx2; light_pass = light_pass_avx2; isa_name = "avx2";
        return 1;
    }
#endif
    if (want && strcmp(want, BASE_ISA)) return 0;
    full_pass = full_pass_base; light_pass = light_pass_base; isa_name = BASE_ISA;
    return 1;
}

/* ---- Python entry points ----------------------------------------------------------------------------------- */
#ifndef KERNEL_NO_PYTHON

static int check_args(Py_buffer *g, int gk, Py_buffer *m, int mk, Py_buffer *st, Py_ssize_t *n) {
    if (gk < 0 || gk > 3 || mk < 0 || mk > 3) {
        PyErr_SetString(PyExc_ValueError, "unknown element kind");
        return -1;
    }
    if (g->len % item_size(gk) || m->len % item_size(mk) || g->len / item_size(gk) != m->len / item_size(mk)) {
        PyErr_SetString(PyExc_ValueError, "golden and my runs hold different element counts");
        return -1;
    }
    if (st->len != (Py_ssize_t)(S_SIZE * sizeof(double))) {
        PyErr_Format(PyExc_ValueError, "state must be %d float64", (int)S_SIZE);
        return -1;
    }
    *n = g->len / item_size(gk);
    return 0;
}

static PyObject *run(PyObject *args, int light) {
    Py_buffer g, m, st;
    int gk, mk, count_g = 1, count_m = 1;
    if (!PyArg_ParseTuple(args, "y*iy*iw*|pp", &g, &gk, &m, &mk, &st, &count_g, &count_m)) return NULL;
    Py_ssize_t n = 0;
    int bad = check_args(&g, gk, &m, mk, &st, &n);
    if (!bad) {
        Py_BEGIN_ALLOW_THREADS
        if (light)
            light_pass(g.buf, gk, m.buf, mk, n, (double *)st.buf);
        else
            full_pass(g.buf, gk, m.buf, mk, n, count_g, count_m, (double *)st.buf);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&g);
    PyBuffer_Release(&m);
    PyBuffer_Release(&st);
    if (bad) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_full(PyObject *self, PyObject *args) { (void)self; return run(args, 0); }
static PyObject *py_light(PyObject *self, PyObject *args) { (void)self; return run(args, 1); }

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    (void)self;
    const char *want;
    if (!PyArg_ParseTuple(args, "s", &want)) return NULL;
    if (!pick_isa(want)) {
        PyErr_Format(PyExc_ValueError, "instruction set %s is not available here", want);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyUnicode_FromString(isa_name);
}

static PyMethodDef methods[] = {
    {"full", py_full, METH_VARARGS,
     "full(golden, gkind, my, mkind, state, count_golden=True, count_my=True): add a run to every sum"},
    {"light", py_light, METH_VARARGS, "light(golden, gkind, my, mkind, state): add a run to the 4 dot products"},
    {"isa", py_isa, METH_NOARGS, "isa(): the instruction set of the loops in use"},
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa(name): use the copy of the loops for avx512, avx2, neon or baseline (for tests)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, .m_name = "_kernel", .m_doc = "Compiled fused comparison pass", .m_size = -1,
    .m_methods = methods,
};

/* A tuple of the first n slot names. */
static PyObject *slot_names(int n) {
    PyObject *names = PyTuple_New(n);
    for (int i = 0; names && i < n; i++) {
        PyObject *name = PyUnicode_FromString(SLOT_NAMES[i]);
        if (!name) { Py_CLEAR(names); break; }
        PyTuple_SET_ITEM(names, i, name);
    }
    return names;
}

PyMODINIT_FUNC PyInit__kernel(void) {
    PyObject *mod = PyModule_Create(&module);
    if (!mod) return NULL;
    pick_isa(NULL);
    PyObject *starts = PyTuple_New(S_SIZE);
    for (int i = 0; starts && i < S_SIZE; i++) {
        PyObject *v = PyFloat_FromDouble(SLOT_STARTS[i]);
        if (!v) { Py_CLEAR(starts); break; }
        PyTuple_SET_ITEM(starts, i, v);
    }
    /* PyModule_AddObject steals the reference only on success */
    PyObject *kinds = Py_BuildValue("{sisisisi}", "float32", K_F32, "float64", K_F64, "bfloat16", K_BF16,
                                    "float16", K_F16);
    PyObject *values[] = {slot_names(S_SIZE), starts, slot_names(S_FINITE), kinds};
    const char *keys[] = {"SLOTS", "STATE_START", "METRIC_SUMS", "KINDS"};
    int bad = PyModule_AddIntConstant(mod, "BLOCK", BLOCK);
    for (int i = 0; i < 4; i++) {
        if (!bad && values[i] && !PyModule_AddObject(mod, keys[i], values[i])) continue;
        bad = 1;
        Py_XDECREF(values[i]);
    }
    if (bad) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
#endif
