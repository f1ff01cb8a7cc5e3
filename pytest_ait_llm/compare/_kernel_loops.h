/*
 * The hot loops of _kernel.c. That file includes this one once per instruction set (x86-64: AVX-512, AVX2+FMA,
 * baseline; AArch64: NEON; elsewhere: baseline), with ISA(name) giving each copy its own names; the module picks
 * one copy for the CPU it runs on when it is imported. Not a header of its own: it relies on _kernel.c's types and
 * helpers, and it #undefs its settings (ISA, VLANES, VMIN/VMAX, VWIDEN, VRCP14) at its end.
 *
 * The loops are written with GCC/Clang generic vector types of VLANES lanes, one register wide (vd: VLANES
 * float64; 8 for AVX-512, 4 for AVX2, 2 for SSE2 and NEON), so vectorisation does not depend on the optimiser and
 * needs no intrinsics: the x86 copies use a few (VMIN/VMAX, VWIDEN, VRCP14) where they measured faster, every
 * other target gets the generic forms below. Each quantity is summed in VLANES independent lanes, added up at the
 * end of a block. Loads and stores go through memcpy: any alignment is fine. Comparisons of vd give vl masks (all
 * ones / zeros per lane).
 */

#define vd ISA(vd_)
#define vl ISA(vl_)
#define vu64 ISA(vu64_)
#define vf ISA(vf_)
#define vu32 ISA(vu32_)
#define vu16 ISA(vu16_)
typedef double vd __attribute__((vector_size(8 * VLANES)));
typedef int64_t vl __attribute__((vector_size(8 * VLANES)));
typedef uint64_t vu64 __attribute__((vector_size(8 * VLANES)));
typedef float vf __attribute__((vector_size(4 * VLANES)));
typedef uint32_t vu32 __attribute__((vector_size(4 * VLANES)));
typedef uint16_t vu16 __attribute__((vector_size(2 * VLANES)));

static inline __attribute__((always_inline)) vd ISA(load)(const double *p) {
    vd v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) vd ISA(sel)(vl mask, vd a, vd b) {
    return (vd)(((vl)a & mask) | ((vl)b & ~mask));
}

#ifndef VWIDEN
#define VWIDEN(f) __builtin_convertvector((f), vd)
#endif
#ifndef VMIN
#define VMIN(a, b) ISA(sel)((a) < (b), (a), (b))
#define VMAX(a, b) ISA(sel)((a) > (b), (a), (b))
#endif

static inline __attribute__((always_inline)) vd ISA(vabs)(vd a) {
    return (vd)((vl)a & 0x7fffffffffffffffLL);
}

static inline __attribute__((always_inline)) double ISA(hsum)(vd a) {
    double s = 0;
    for (int j = 0; j < VLANES; j++) s += a[j];
    return s;
}

static inline __attribute__((always_inline)) double ISA(hmax)(vd a) {
    double s = a[0];
    for (int j = 1; j < VLANES; j++) s = a[j] > s ? a[j] : s;
    return s;
}

static inline __attribute__((always_inline)) double ISA(hmin)(vd a) {
    double s = a[0];
    for (int j = 1; j < VLANES; j++) s = a[j] < s ? a[j] : s;
    return s;
}

/* Lanes at or past n are masked out of every sum: a block's last vector may run past its data. */
static inline __attribute__((always_inline)) vl ISA(valid)(Py_ssize_t i, Py_ssize_t n) {
    vl iota;
    for (int j = 0; j < VLANES; j++) iota[j] = j;
    return iota < (vl){0} + (int64_t)(n - i);
}

/* ---- widening a block to float64 ------------------------------------------------------------------------- */

static inline __attribute__((always_inline)) vf ISA(half_to_float)(vu32 h) {
    /* IEEE half without F16C: the 15 magnitude bits shifted into a float's place are the value times 2^-112
     * (normal and subnormal halves alike); exponent 31 (inf/NaN) maps to the float's all-ones exponent. */
    vu32 mag = (h & 0x7fffu) << 13;
    vu32 bits = (vu32)((vf)mag * 0x1p112f);
    vu32 special = (vu32)((h & 0x7fffu) >= 0x7c00u);
    bits = (bits & ~special) | ((mag | 0x7f800000u) & special);
    return (vf)(bits | (h & 0x8000u) << 16);
}

static inline __attribute__((always_inline)) vd ISA(widen_one)(const char *src, int kind) {
    vd d;
    vf f;
    if (kind == K_F64) {
        memcpy(&d, src, sizeof d);
        return d;
    }
    if (kind == K_F32) {
        memcpy(&f, src, sizeof f);
    } else {
        vu16 h;
        memcpy(&h, src, sizeof h);
        vu32 w = __builtin_convertvector(h, vu32);
        f = kind == K_BF16 ? (vf)(w << 16) : ISA(half_to_float)(w);
    }
    return VWIDEN(f);
}

typedef struct { vd s, lo, hi; } ISA(StatLanes);

/* NaN/inf are not counted here: any of them makes the sum non-finite, and such a block is counted again exactly
 * (block_stats_slow). A finite sum that overflows only costs that recount. */
static inline __attribute__((always_inline)) void ISA(stat_step)(ISA(StatLanes) *a, vd v) {
    a->s += v;
    a->lo = VMIN(v, a->lo);
    a->hi = VMAX(v, a->hi);
}

/* dst[0:n] = src[0:n] as float64 (dst is a block buffer: whole vectors), and the block's sum/min/max in the same
 * loop; ``bad`` is set when the block may hold NaN/inf. */
static inline __attribute__((always_inline)) BlockStats ISA(widen_stats_kind)(const char *src, int kind,
                                                                              double *dst, Py_ssize_t n,
                                                                              int stats) {
    Py_ssize_t size = item_size(kind), i = 0, full = n - n % VLANES;
    ISA(StatLanes) a = {{0}, (vd){0} + INFINITY, (vd){0} - INFINITY};
    for (; i < full; i += VLANES) {
        /* the payloads are far larger than any cache and their 4 KB pages are scattered, which stops the CPU's
         * own prefetcher at every page: ask for the bytes PREFETCH_AHEAD elements ahead (-15 % time per pair) */
        __builtin_prefetch((const void *)((uintptr_t)src + (uintptr_t)((i + PREFETCH_AHEAD) * size)), 0, 3);
        vd v = ISA(widen_one)(src + i * size, kind);
        memcpy(dst + i, &v, sizeof v);
        if (stats) ISA(stat_step)(&a, v);
    }
    if (i < n) { /* the tail through one padded vector */
        char pad[8 * VLANES] = {0};
        memcpy(pad, src + i * size, (size_t)((n - i) * size));
        vd v = ISA(widen_one)(pad, kind);
        memcpy(dst + i, &v, sizeof v);
        /* lanes past the end: 0 adds nothing, and copies of a real value change no minimum or maximum */
        vl ok = ISA(valid)(i, n);
        v = ISA(sel)(ok, v, (vd){0} + v[0]);
        vd zero_pad = ISA(sel)(ok, v, (vd){0});
        if (stats) {
            a.s += zero_pad;
            a.lo = VMIN(v, a.lo);
            a.hi = VMAX(v, a.hi);
        }
    }
    double sum = ISA(hsum)(a.s);
    BlockStats b = {sum, ISA(hmin)(a.lo), ISA(hmax)(a.hi), !(fabs(sum) <= DBL_MAX)};
    return b;
}

/* One copy of the loop per element kind, so the kind is not tested inside it. */
static BlockStats ISA(widen_stats)(const char *src, int kind, double *dst, Py_ssize_t n) {
    switch (kind) {
    case K_F32: return ISA(widen_stats_kind)(src, K_F32, dst, n, 1);
    case K_F64: return ISA(widen_stats_kind)(src, K_F64, dst, n, 1);
    case K_BF16: return ISA(widen_stats_kind)(src, K_BF16, dst, n, 1);
    default: return ISA(widen_stats_kind)(src, K_F16, dst, n, 1);
    }
}

static void ISA(widen)(const char *src, int kind, double *dst, Py_ssize_t n) {
    switch (kind) {
    case K_F32: ISA(widen_stats_kind)(src, K_F32, dst, n, 0); break;
    case K_F64: ISA(widen_stats_kind)(src, K_F64, dst, n, 0); break;
    case K_BF16: ISA(widen_stats_kind)(src, K_BF16, dst, n, 0); break;
    default: ISA(widen_stats_kind)(src, K_F16, dst, n, 0); break;
    }
}

/* ---- exp(x) -----------------------------------------------------------------------------------------------
 * For x <= LSE_SAFE (the caller's shifts guarantee it). x = k ln2/2 + r with |r| <= ln2/4: exp(r) by its Taylor
 * series to r^10 (truncation < 1.1e-16 relative), times 2^(k/2) = 2^floor(k/2), built in the exponent bits, times
 * sqrt(2) when k is odd. x is raised to -708 first: exp(-708) ~ 3e-308 stands for anything smaller, and every
 * sum it joins also holds a term >= exp(-LSE_SAFE), 2e-261, so it changes no digit. */
static inline __attribute__((always_inline)) vd ISA(vexp)(vd x) {
    const double two_log2e = 2.8853900817779268, half_ln2_hi = 3.46573590184561908245e-01,
                 half_ln2_lo = 9.54107464635293850010e-11, shifter = 6755399441055744.0; /* 1.5 * 2^52 */
    x = VMAX(x, (vd){0} - 708.0);
    vd kd = x * two_log2e + shifter;
    /* kd's low mantissa bits hold 2^51 + k: halving gives 2^50 + floor(k/2), from which the exponent of 2^floor(k/2) */
    vu64 low = (vu64)kd;
    vu64 scale_bits = (((low & 0xfffffffffffffULL) >> 1) + (uint64_t)(1023 - 0x4000000000000LL)) << 52;
    vd odd = ISA(sel)((vl)(low & 1) != 0, (vd){0} + 1.4142135623730951, (vd){0} + 1.0);
    kd -= shifter;
    vd r = x - kd * half_ln2_hi - kd * half_ln2_lo;
    vd p = (vd){0} + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    return p * ((vd)scale_bits * odd);
}

/* exp(d) for |d| <= NEAR by its Taylor series to d^degree, no range reduction: degree 13 up to 0.34, 9 up to 0.1,
 * 7 up to 0.02 (truncation below 6e-18, 3e-17 and 7e-19 relative). bf16/fp16 ports stay within 0.02 almost
 * everywhere. */
static inline __attribute__((always_inline)) vd ISA(vexp_near)(vd d, int degree) {
    vd p = (vd){0} + INV_FACTORIAL[degree];
    for (int k = degree - 1; k >= 0; k--) p = p * d + INV_FACTORIAL[k];
    return p;
}

/* ---- per-block passes ------------------------------------------------------------------------------------ */

typedef struct { vd gm, gg, mm, dd, abs_sum, abs_max, rel_sum, rel_max; } ISA(ErrLanes);

/* 1/x for EPS < x < 1e38, several times cheaper than a float64 division: an approximate reciprocal refined by
 * Newton steps in float64, each squaring the relative error: AVX-512's 14-bit estimate twice (to ~4e-17), else
 * float32's correctly rounded reciprocal once (to ~4e-15). */
static inline __attribute__((always_inline)) vd ISA(recip)(vd x) {
#ifdef VRCP14
    vd y = VRCP14(x);
    y = y * (2.0 - x * y);
#else
    vd y = __builtin_convertvector(1.0f / __builtin_convertvector(x, vf), vd);
#endif
    return y * (2.0 - x * y);
}

static inline __attribute__((always_inline)) void ISA(err_step)(ISA(ErrLanes) *e, vd a, vd b, vl ok, int fast) {
    vd d = b - a, ad = ISA(vabs)(d), ag = ISA(vabs)(a);
    e->gm += a * b;
    e->gg += a * a;
    e->mm += b * b;
    e->dd += d * d;
    e->abs_sum += ad;
    e->abs_max = VMAX(ad, e->abs_max);
    vl counted = ok & (ag > EPS); /* |golden| <= EPS contributes no relative error */
    vd rel = ISA(sel)(counted, fast ? ad * ISA(recip)(ag) : ad / ag, (vd){0});
    e->rel_sum += rel;
    e->rel_max = VMAX(rel, e->rel_max);
}

/* ``near`` (a Taylor degree, or 0): the shifts are equal and every |m - g| of the block is small, so exp(m - shift)
 * is exp(g - shift) * exp(m - g), the second factor from ISA(vexp_near): a fraction of a second exp()'s work. */
static inline __attribute__((always_inline)) void ISA(kl_step)(vd *sg, vd *t, vd *sm, vd a, vd b, vl ok,
                                                               double shift_g, double shift_m, int near) {
    vd eg = ISA(sel)(ok, ISA(vexp)(a - shift_g), (vd){0});
    *sg += eg;
    *t += eg * (a - b);
    *sm += near ? eg * ISA(vexp_near)(b - a, near) : ISA(sel)(ok, ISA(vexp)(b - shift_m), (vd){0});
}

static inline __attribute__((always_inline)) void ISA(kl_loop)(vd *sg, vd *t, vd *sm, const double *g,
                                                               const double *m, Py_ssize_t full, Py_ssize_t n,
                                                               vd ta, vd tb, vl tail, double shift_g,
                                                               double shift_m, int near) {
    const vl all = (vl){0} - 1;
    for (Py_ssize_t i = 0; i < full; i += VLANES)
        ISA(kl_step)(sg, t, sm, ISA(load)(g + i), ISA(load)(m + i), all, shift_g, shift_m, near);
    if (full < n) ISA(kl_step)(sg, t, sm, ta, tb, tail, shift_g, shift_m, near);
}

/* Every metric sum of a finite block; exp() runs against the given shifts. Two loops over the (cache-resident)
 * block: the error sums, then the KL sums; one loop would need more vector registers than AVX-512 has.
 * ``fast``: every |golden| < 1e38, so the relative error may use ISA(recip). */
static inline __attribute__((always_inline)) BlockMetrics ISA(block_metrics_div)(
        const double *g, const double *m, Py_ssize_t n, double shift_g, double shift_m, int fast) {
    ISA(ErrLanes) e = {{0}, {0}, {0}, {0}, {0}, {0}, {0}, {0}};
    const vl all = (vl){0} - 1;
    Py_ssize_t i = 0, full = n - n % VLANES;
    for (; i < full; i += VLANES) ISA(err_step)(&e, ISA(load)(g + i), ISA(load)(m + i), all, fast);
    vl tail = ISA(valid)(full, n);
    vd ta = ISA(sel)(tail, ISA(load)(g + full), (vd){0}), tb = ISA(sel)(tail, ISA(load)(m + full), (vd){0});
    if (full < n) ISA(err_step)(&e, ta, tb, tail, fast);
    vd sg = {0}, t = {0}, sm = {0};
    double dmax = ISA(hmax)(e.abs_max);
    if (shift_g != shift_m || !(dmax <= NEAR))
        ISA(kl_loop)(&sg, &t, &sm, g, m, full, n, ta, tb, tail, shift_g, shift_m, 0);
    else if (dmax <= 0.02)
        ISA(kl_loop)(&sg, &t, &sm, g, m, full, n, ta, tb, tail, shift_g, shift_m, 7);
    else if (dmax <= 0.1)
        ISA(kl_loop)(&sg, &t, &sm, g, m, full, n, ta, tb, tail, shift_g, shift_m, 9);
    else
        ISA(kl_loop)(&sg, &t, &sm, g, m, full, n, ta, tb, tail, shift_g, shift_m, 13);
    BlockMetrics r = {ISA(hsum)(e.gm), ISA(hsum)(e.gg), ISA(hsum)(e.mm), ISA(hsum)(e.dd), ISA(hsum)(e.abs_sum),
                      ISA(hmax)(e.abs_max), ISA(hsum)(e.rel_sum), ISA(hmax)(e.rel_max), ISA(hsum)(sg),
                      ISA(hsum)(t), ISA(hsum)(sm)};
    return r;
}

static BlockMetrics ISA(block_metrics)(const double *g, const double *m, Py_ssize_t n, double shift_g,
                                       double shift_m, int fast) {
    return fast ? ISA(block_metrics_div)(g, m, n, shift_g, shift_m, 1)
                : ISA(block_metrics_div)(g, m, n, shift_g, shift_m, 0);
}

static void ISA(block_dots)(const double *g, const double *m, Py_ssize_t n, double *out) {
    vd gm = {0}, gg = {0}, mm = {0}, dd = {0};
    for (Py_ssize_t i = 0; i < n; i += VLANES) {
        vl ok = ISA(valid)(i, n);
        vd a = ISA(sel)(ok, ISA(load)(g + i), (vd){0}), b = ISA(sel)(ok, ISA(load)(m + i), (vd){0}), d = b - a;
        gm += a * b;
        gg += a * a;
        mm += b * b;
        dd += d * d;
    }
    out[0] += ISA(hsum)(gm);
    out[1] += ISA(hsum)(gg);
    out[2] += ISA(hsum)(mm);
    out[3] += ISA(hsum)(dd);
}

/* ---- the passes over a run ------------------------------------------------------------------------------- */

static void ISA(full_pass)(const char *g, int gk, const char *m, int mk, Py_ssize_t n, int count_g, int count_m,
                           double *st) {
    double gb[BLOCK], mb[BLOCK];
    memset(gb, 0, sizeof gb); /* lanes past a short block's end are read, then masked out */
    memset(mb, 0, sizeof mb);
    Py_ssize_t gs = item_size(gk), ms = item_size(mk);
    for (Py_ssize_t off = 0; off < n; off += BLOCK) {
        Py_ssize_t k = n - off < BLOCK ? n - off : BLOCK;
        BlockStats bg = ISA(widen_stats)(g + off * gs, gk, gb, k);
        BlockStats bm = ISA(widen_stats)(m + off * ms, mk, mb, k);
        if (count_g) add_stats(gb, k, &bg, st + S_G_NAN);
        if (count_m) add_stats(mb, k, &bm, st + S_M_NAN);
        if (!all_finite(gb, k, &bg) || !all_finite(mb, k, &bm)) st[S_FINITE] = 0.0;
        if (st[S_FINITE] == 0.0) continue; /* metrics stop at the first non-finite value; stats go on */
        move_shift(&st[S_SHIFT_G], bg.max, &st[S_SUM_G], &st[S_T]);
        move_shift(&st[S_SHIFT_M], bm.max, &st[S_SUM_M], NULL);
        int fast = bg.max < 1e38 && bg.min > -1e38;
        BlockMetrics r = ISA(block_metrics)(gb, mb, k, st[S_SHIFT_G], st[S_SHIFT_M], fast);
        st[S_N] += (double)k;
        st[S_GM] += r.gm; st[S_GG] += r.gg; st[S_MM] += r.mm; st[S_DD] += r.dd;
        st[S_ABS_SUM] += r.abs_sum; st[S_REL_SUM] += r.rel_sum;
        if (r.abs_max > st[S_ABS_MAX]) st[S_ABS_MAX] = r.abs_max;
        if (r.rel_max > st[S_REL_MAX]) st[S_REL_MAX] = r.rel_max;
        st[S_SUM_G] += r.sg; st[S_T] += r.t; st[S_SUM_M] += r.sm;
    }
}

static void ISA(light_pass)(const char *g, int gk, const char *m, int mk, Py_ssize_t n, double *st) {
    double gb[BLOCK], mb[BLOCK];
    memset(gb, 0, sizeof gb);
    memset(mb, 0, sizeof mb);
    Py_ssize_t gs = item_size(gk), ms = item_size(mk);
    for (Py_ssize_t off = 0; off < n; off += BLOCK) {
        Py_ssize_t k = n - off < BLOCK ? n - off : BLOCK;
        ISA(widen)(g + off * gs, gk, gb, k);
        ISA(widen)(m + off * ms, mk, mb, k);
        ISA(block_dots)(gb, mb, k, st + S_GM);
    }
    st[S_N] += (double)n;
}

/* This copy is done: forget its types and the including file's settings, ready for the next copy. */
#undef vd
#undef vl
#undef vu64
#undef vf
#undef vu32
#undef vu16
#undef VMIN
#undef VMAX
#undef VWIDEN
#undef VRCP14
#undef VLANES
#undef ISA
