// The "native" execution path's kernels (see _native.py): one call per (group, dtype) bucket
// updates every tensor of it, the whole rule of LARS / TVLARS / CLARS, LALC or LAMB
// (docs/algorithms.md) in C++, built on first use with -O3 -march=native -fopenmp.
//
// Per tensor, inside one OpenMP region: pass 1 reads the tensor once for its sums of squares
// (float32 blocks that may over- or underflow are redone in double, see block_sums; float64
// sums that do are redone scaled, see norms_of)
// (||w||^2, ||g||^2 and, for LALC / LAMB, ||h||^2 / ||r||^2 of the update direction, computed
// and dropped), the threads meet at one barrier, every thread computes the tensor's scalars
// (trust ratio, layer learning rate) from the same sums, and pass 2 applies the update to the
// same slice of the tensor that the thread read in pass 1 (still in its L2/L3 cache: the two
// passes cost about one trip to memory). Tensors under SPLIT elements are done whole by one
// thread, without a barrier.
//
// Every loop is specialized at compile time on what varies per call (a GradScaler, weight
// decay, momentum, Nesterov: branch() below), so that each is one straight vector loop.
//
// The element-wise arithmetic follows the reference ``_update`` of each class operation by
// operation, in the parameters' dtype (built with -ffp-contract=off: no fused multiply-adds
// the reference does not make). Sums of squares accumulate in the dtype in LANES fixed lanes
// over blocks of BLOCK elements, then in double, lane after lane and block after block: the
// order is the source's, so the norms (and every result) are the same bits for any thread
// count and any vector ISA. The per-tensor scalars follow docs/algorithms.md section 8: computed in the
// parameters' dtype.
#include <cmath>
#include <cstdint>
#include <omp.h>

#include <type_traits>

namespace {

// the small lambdas of the loops below are inlined into them (else nothing vectorizes)
#define LB_INLINE __attribute__((always_inline))

constexpr int64_t LANES = 16;      // accumulators per sum of squares (see block_sums)
constexpr int64_t BLOCK = 1024;    // elements per block sum (a multiple of LANES)
constexpr int64_t SPLIT = 1 << 15;  // tensors at least this large are split among the threads
constexpr int64_t ALIGN = BLOCK;    // a thread's slice starts at a multiple of this

struct Args {
    int64_t n, nthreads;
    const int64_t* numel;
    void* const* w;
    void* const* g;
    void* const* s0;          // velocity / momentum_buffer / exp_avg, or null
    void* const* s1;          // exp_avg_sq, or null
    int64_t* const* count;    // step counters (LALC, LAMB), or null
    const void* lrf;          // per tensor: lr factor (TVLARS phi(t)), or null
    const void* tn;           // per tensor: the trust ratio's norm in place of ||g|| (CLARS), or null
    const void* scale;        // 0-d: GradScaler's grad_scale, or null
    const bool* ok;           // 0-d: no inf found by the GradScaler, or null
    double lr, mu, wd, eta, eps, damp, b1, b2, log_b1, log_b2, max_trust;
    int64_t adapt, nesterov, clip, has_max_trust;
    void* out;                // n x 5: fin, trust, lr_k, ||w||, ||g||
    const int64_t* block_offset;  // per tensor: its first block in scratch
    double* scratch;          // 3 sums per block of BLOCK elements, tensor after tensor
    // sharded parameters (_sharded.py), around the step's one all-reduce: MODE_SUMS writes each
    // tensor's local norms to sums (n x 3) and updates nothing; MODE_GIVEN takes the reduced
    // norms from sums instead of pass 1
    int64_t mode;
    double* sums;
};

constexpr int64_t MODE_FULL = 0, MODE_SUMS = 1, MODE_GIVEN = 2;

template <class T>
inline bool finite(T x) { return std::isfinite(x); }

// min that propagates NaN (torch.minimum)
template <class T>
inline T nan_min(T a, T b) { return (std::isnan(a) || a < b) ? a : b; }

// f(std::true_type) or f(std::false_type): a run-time flag as a compile-time constant
template <class F>
inline void branch(bool b, F&& f) {
    if (b) f(std::true_type{});
    else f(std::false_type{});
}

// Sums of squares of one block [b, be) (at most BLOCK elements) of w, of the unscaled gradient
// and of the rule's x (the update direction of LALC / LAMB; 0 for the LARS family), x spelled
// by the rule as a function of (i, unscaled g[i]) with its flags resolved (Rule::with_x), in
// LANES accumulators of type A, each summing every LANES-th element, then added in lane order
// in double: the order is fixed by this source, not by the vector width the compiler picks, so
// every CPU (AVX2, AVX-512, NEON or none) gets the same bits.
template <class A, class T, bool HS, class XF>
inline void block_sums_in(const T* w, const T* g, T sc, const XF& xf, int64_t b, int64_t be, double* out) {
    A aw[LANES] = {}, ag[LANES] = {}, ax[LANES] = {};
    const int64_t full = b + (be - b) / LANES * LANES;
    for (int64_t i = b; i < full; i += LANES) {
#pragma omp simd
        for (int64_t j = 0; j < LANES; ++j) {
            const T gi = HS ? g[i + j] / sc : g[i + j];
            const A wa = w[i + j], ga = gi, xa = xf(i + j, gi);
            aw[j] += wa * wa;
            ag[j] += ga * ga;
            ax[j] += xa * xa;
        }
    }
    for (int64_t i = full; i < be; ++i) {
        const int64_t j = i - full;
        const T gi = HS ? g[i] / sc : g[i];
        const A wa = w[i], ga = gi, xa = xf(i, gi);
        aw[j] += wa * wa;
        ag[j] += ga * ga;
        ax[j] += xa * xa;
    }
    double sw = 0, sg = 0, sx = 0;
    for (int64_t j = 0; j < LANES; ++j) {
        sw += aw[j];
        sg += ag[j];
        sx += ax[j];
    }
    out[0] = sw;
    out[1] = sg;
    out[2] = sx;
}

// A float32 block is summed in float32 (the fast vector loop: one multiply-add per element and
// sum, no conversion) and redone in double when one of its sums may have over- or underflowed:
// not finite (a square or the sum beyond 3.4e38; NaN too), or below 2^-90, where the squares
// under 2^-126 that lost bits (at most BLOCK of them, each off by less than 2^-126) could move the
// sum by more than 2^-26 of itself (exact zeros are redone too; all-zero blocks are rare). The
// decision is per block, so the bits stay the same for any thread count. float64 blocks are
// summed in double; their tensor sums are checked in norms_of.
template <class T, bool HS, bool HX, class XF>
inline void block_sums(const T* w, const T* g, T sc, const XF& xf, int64_t b, int64_t be, double* out) {
    if (std::is_same<T, double>::value) {
        block_sums_in<double, T, HS>(w, g, sc, xf, b, be, out);
        return;
    }
    block_sums_in<T, T, HS>(w, g, sc, xf, b, be, out);
    bool redo = false;
    for (int j = 0; j < (HX ? 3 : 2); ++j) redo = redo || !(out[j] >= 0x1p-90 && out[j] < INFINITY);
    if (redo) block_sums_in<double, T, HS>(w, g, sc, xf, b, be, out);
}

// The block sums of the blocks [s, e) covers (s a multiple of BLOCK), into out[3 * block].
template <class T, class Rule>
void sums(const Rule& R, int64_t t, int64_t s, int64_t e, bool skipped, double* out) {
    const T* w = static_cast<const T*>(R.a.w[t]);
    const T* g = static_cast<const T*>(R.a.g[t]);
    const T sc = R.scale;
    branch(R.has_scale, [&](auto HS) {
        R.with_x(t, skipped, [&](auto xf) {
            for (int64_t b = s; b < e; b += BLOCK)
                block_sums<T, decltype(HS)::value, Rule::kHasX>(w, g, sc, xf, b, b + BLOCK < e ? b + BLOCK : e,
                                                                out + 3 * (b / BLOCK));
        });
    });
}

// The tensor's sums: its block sums added in block order (the same for any thread count).
inline void total(const double* blocks, int64_t nblocks, double s[3]) {
    s[0] = s[1] = s[2] = 0;
    for (int64_t k = 0; k < nblocks; ++k)
        for (int j = 0; j < 3; ++j) s[j] += blocks[3 * k + j];
}

// The norms ||w||, ||g||, ||x|| of a float64 tensor whose sums of squares over- or underflowed,
// scaled as BLAS nrm2 does: max |v| first, then the sum of (v / 2^e)^2 (exact scaling), in one
// thread over the whole tensor (rare: data beyond 1e154 or below 1e-130, or all zeros).
template <class T, class Rule>
void rescue(const Rule& R, int64_t t, bool skipped, double* out) {
    const Args& a = R.a;
    const T* w = static_cast<const T*>(a.w[t]);
    const T* g = static_cast<const T*>(a.g[t]);
    const int64_t N = a.numel[t];
    const T sc = R.scale;
    branch(R.has_scale, [&](auto HS) {
        R.with_x(t, skipped, [&](auto xf) {
            double m[3] = {0, 0, 0};
            bool nan[3] = {false, false, false};
            auto vals = [&](int64_t i, double v[3]) {
                const T gi = decltype(HS)::value ? g[i] / sc : g[i];
                v[0] = w[i];
                v[1] = gi;
                v[2] = xf(i, gi);
            };
            for (int64_t i = 0; i < N; ++i) {
                double v[3];
                vals(i, v);
                for (int j = 0; j < 3; ++j) {
                    const double av = std::fabs(v[j]);
                    if (std::isnan(av)) nan[j] = true;
                    else if (av > m[j]) m[j] = av;
                }
            }
            int ex[3];
            double down[3], acc[3] = {0, 0, 0};
            for (int j = 0; j < 3; ++j) {
                std::frexp(m[j], &ex[j]);
                ex[j] = ex[j] < -1021 ? -1021 : (ex[j] > 1021 ? 1021 : ex[j]);
                down[j] = std::ldexp(1.0, -ex[j]);
            }
            if (std::isfinite(m[0]) && std::isfinite(m[1]) && std::isfinite(m[2])) {
                for (int64_t i = 0; i < N; ++i) {
                    double v[3];
                    vals(i, v);
                    for (int j = 0; j < 3; ++j) acc[j] += (v[j] * down[j]) * (v[j] * down[j]);
                }
            }
            for (int j = 0; j < 3; ++j)
                out[j] = nan[j] ? NAN : (std::isfinite(m[j]) ? std::ldexp(std::sqrt(acc[j]), ex[j]) : m[j]);
        });
    });
}

// The three norms of tensor t into s: pass 1 over this thread's slice [s0, e0) into the block
// sums, the tensor's sums, their square roots. A float64 sum that overflowed, or is below 2^-260
// (squares may have underflowed; exact zeros too), is redone by rescue(), by one thread while the
// others wait (every thread sees the same sums, so all take the same branch and barriers).
template <class T, class Rule>
void norms_of(const Rule& R, int64_t t, int64_t s0, int64_t e0, bool shared, bool writer, bool skipped,
              double s[3]) {
    const Args& a = R.a;
    double* blocks = a.scratch + 3 * a.block_offset[t];
    const int64_t nb = (a.numel[t] + BLOCK - 1) / BLOCK;
    sums<T>(R, t, s0, e0, skipped, blocks);
    if (shared) {
#pragma omp barrier
    }
    total(blocks, nb, s);
    bool redo = false;
    if (std::is_same<T, double>::value)
        for (int j = 0; j < (Rule::kHasX ? 3 : 2); ++j) redo = redo || s[j] == INFINITY || s[j] < 0x1p-260;
    if (!redo) {
        for (int j = 0; j < 3; ++j) s[j] = std::sqrt(s[j]);
        return;
    }
    if (!shared) {   // one thread has the whole tensor (which may be empty: no block to write)
        rescue<T>(R, t, skipped, s);
        return;
    }
    // a shared tensor has at least SPLIT elements, so at least one block of 3 slots
#pragma omp barrier
    if (writer) rescue<T>(R, t, skipped, blocks);   // every thread has read the block sums
#pragma omp barrier
    for (int j = 0; j < 3; ++j) s[j] = blocks[j];
}

// One tensor's step, pass 1 (norms), scalars, pass 2 (update), over this thread's slice
// [s0, e0): with `shared` the slice is one of several and the threads meet at barriers, else it
// is the whole tensor (no barrier); `writer` writes the outputs and counters.
template <class T, class Rule>
void tensor_step(Rule& R, int64_t t, int64_t s0, int64_t e0, bool shared, bool writer) {
    const Args& a = R.a;
    double s[3];   // ||w||, ||g||, ||x||
    if (a.mode == MODE_GIVEN) {
        for (int j = 0; j < 3; ++j) s[j] = a.sums[3 * t + j];
    } else {
        norms_of<T>(R, t, s0, e0, shared, writer, false, s);
    }
    if (a.mode == MODE_SUMS) {
        if (writer)
            for (int j = 0; j < 3; ++j) a.sums[3 * t + j] = s[j];
        return;
    }
    typename Rule::Scalars c = R.scalars(t, s);
    if (!c.fin && Rule::kSkipNorm && a.mode == MODE_FULL) {  // the direction's norm of a skipped
        if (shared) {                                        // tensor (rare; all threads alike)
#pragma omp barrier
        }
        norms_of<T>(R, t, s0, e0, shared, writer, true, s);
        R.skipped(c, s);
    }
    if (c.fin) R.apply(t, s0, e0, c);
    if (shared && Rule::kCounts) {   // the step counter is read above by every thread
#pragma omp barrier
    }
    if (writer) R.write(t, c);
}

// Every tensor: the small ones whole, one thread each; the large ones split among the threads
// in slices of whole blocks, the same slice in both passes.
template <class T, class Rule>
void run(Rule& R) {
    const Args& a = R.a;
    const int64_t n = a.n;
#pragma omp parallel num_threads(static_cast<int>(a.nthreads))
    {
        const int nth = omp_get_num_threads(), me = omp_get_thread_num();
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t t = 0; t < n; ++t)
            if (a.numel[t] < SPLIT || nth == 1) tensor_step<T>(R, t, 0, a.numel[t], false, true);
        if (nth > 1) {
            for (int64_t t = 0; t < n; ++t) {
                const int64_t N = a.numel[t];
                if (N < SPLIT) continue;
                const int64_t chunk = ((N + nth - 1) / nth + ALIGN - 1) / ALIGN * ALIGN;
                const int64_t s0 = me * chunk < N ? me * chunk : N;
                tensor_step<T>(R, t, s0, s0 + chunk < N ? s0 + chunk : N, true, me == 0);
            }
        }
    }
}

template <class T>
struct Base {
    const Args& a;
    const T scale;
    const bool has_scale, ok;
    explicit Base(const Args& args)
        : a(args),
          scale(args.scale ? *static_cast<const T*>(args.scale) : T(1)),
          has_scale(args.scale != nullptr),
          ok(args.ok ? *args.ok : true) {}
    inline void out5(int64_t t, bool fin, T trust, T lrk, T wn, T gn) const {
        T* o = static_cast<T*>(a.out) + 5 * t;
        o[0] = fin ? T(1) : T(0);
        o[1] = trust;
        o[2] = lrk;
        o[3] = wn;
        o[4] = gn;
    }
    // an update loop body f(i, g_i, d_i) over [s, e) with the unscaled gradient g_i and the
    // direction d_i = g_i + wd w_i (reference: g.div(scale), g.add_(w, alpha=wd))
    template <class F>
    void each(int64_t t, int64_t s, int64_t e, F&& f) const {
        const T* w = static_cast<const T*>(a.w[t]);
        const T* g = static_cast<const T*>(a.g[t]);
        const T sc = scale, wd = static_cast<T>(a.wd);
        branch(has_scale, [&](auto HS) {
            branch(a.wd != 0, [&](auto WD) {
                const T* const wp = w;
                const T* const gp = g;
                const T scl = sc, wdl = wd;
                const F body = f;
#pragma omp simd
                for (int64_t i = s; i < e; ++i) {
                    const T gi = HS ? gp[i] / scl : gp[i];
                    const T di = WD ? gi + wdl * wp[i] : gi;
                    body(i, gi, di);
                }
            });
        });
    }
    // without momentum (LARS, LALC): w += step d, step = -lr_k
    void plain_step(int64_t t, int64_t s, int64_t e, T step) const {
        T* w = static_cast<T*>(a.w[t]);
        each(t, s, e, [=](int64_t i, T, T d) LB_INLINE { w[i] = w[i] + d * step; });
    }
};

// ---------------------------------------------------------------- LARS, TVLARS, CLARS (lars.py)
template <class T>
struct Lars : Base<T> {
    using Base<T>::Base;
    using Base<T>::a;
    static constexpr bool kSkipNorm = false, kCounts = false, kHasX = false;
    struct Scalars { bool fin; T trust, lrk, wn, gn; };

    template <class F>
    void with_x(int64_t, bool, F&& f) const { f([](int64_t, T) LB_INLINE { return T(0); }); }

    Scalars scalars(int64_t t, const double s[3]) const {
        const T wn = static_cast<T>(s[0]), gn = static_cast<T>(s[1]);
        Scalars c;
        c.fin = finite(gn) && this->ok;
        c.wn = wn;
        c.gn = gn;
        T trust = T(1);
        if (a.adapt) {   // zero_norm_safe_ratio(||w||, norm + wd ||w||, eta, eps), clip at 1
            const T norm = a.tn ? static_cast<const T*>(a.tn)[t] : gn;
            const T den = norm + static_cast<T>(a.wd) * wn;
            if (wn > 0 && den > 0) trust = static_cast<T>(a.eta) * wn / (den + static_cast<T>(a.eps));
            if (a.clip && trust > T(1)) trust = T(1);
        }
        c.trust = trust;
        const T f = a.lrf ? static_cast<const T*>(a.lrf)[t] : T(1);
        c.lrk = static_cast<T>(a.lr) * f * trust;
        return c;
    }
    void skipped(Scalars&, const double*) const {}
    void write(int64_t t, const Scalars& c) const { this->out5(t, c.fin, c.trust, c.lrk, c.wn, c.gn); }

    // v = mu v + lr_k d; w -= v (Nesterov: w = (w - mu v) - lr_k d); no momentum: w -= lr_k d
    void apply(int64_t t, int64_t s, int64_t e, const Scalars& c) const {
        if (a.mu == 0) return this->plain_step(t, s, e, -c.lrk);
        T* w = static_cast<T*>(a.w[t]);
        const T mu = static_cast<T>(a.mu), nmu = -mu, lrk = c.lrk, step = -c.lrk;
        T* v = static_cast<T*>(a.s0[t]);
        if (a.nesterov) {
            this->each(t, s, e, [=](int64_t i, T, T d) LB_INLINE {
                const T vi = v[i] * mu + d * lrk;
                v[i] = vi;
                const T w1 = w[i] + vi * nmu;
                w[i] = w1 + d * step;
            });
        } else {
            this->each(t, s, e, [=](int64_t i, T, T d) LB_INLINE {
                const T vi = v[i] * mu + d * lrk;
                v[i] = vi;
                w[i] = w[i] - vi;
            });
        }
    }
};

// ---------------------------------------------------------------- LALC (lalc.py)
template <class T>
struct Lalc : Base<T> {
    using Base<T>::a;
    static constexpr bool kSkipNorm = true, kCounts = true, kHasX = true;
    struct Scalars { bool fin; T trust, lrk, wn, gn, cd; };
    explicit Lalc(const Args& args) : Base<T>(args) {}

    // the buffer's factor on d: 1 at a tensor's first update (buf = d), else 1 - dampening
    T coef_d(int64_t t) const {
        return a.mu == 0 || *a.count[t] == 0 ? T(1) : static_cast<T>(1.0 - a.damp);
    }
    // h of the reference for a finite gradient; for a skipped tensor, h of its zeroed
    // gradient with the buffer left as it is
    template <class F>
    void with_x(int64_t t, bool skipped, F&& f) const {
        const T* w = static_cast<const T*>(a.w[t]);
        const T* buf = static_cast<const T*>(a.mu != 0 ? a.s0[t] : nullptr);
        const T wd = static_cast<T>(a.wd), mu = static_cast<T>(a.mu), cd = coef_d(t);
        branch(skipped, [&](auto SK) {
            branch(a.wd != 0, [&](auto WD) {
                auto d_of = [=](int64_t i, T gi) LB_INLINE {
                    const T gz = SK ? T(0) : gi;
                    return WD ? gz + wd * w[i] : gz;
                };
                if (a.mu == 0) {
                    f(d_of);
                } else if (a.nesterov) {
                    f([=](int64_t i, T gi) LB_INLINE {
                        const T d = d_of(i, gi);
                        const T b = SK ? buf[i] : buf[i] * mu + d * cd;
                        return d + mu * b;
                    });
                } else {
                    f([=](int64_t i, T gi) LB_INLINE { return SK ? buf[i] : buf[i] * mu + d_of(i, gi) * cd; });
                }
            });
        });
    }

    Scalars scalars(int64_t t, const double s[3]) const {
        Scalars c;
        c.wn = static_cast<T>(s[0]);
        c.gn = static_cast<T>(s[1]);
        c.fin = finite(c.gn) && this->ok;
        c.cd = coef_d(t);
        set_lr(c, static_cast<T>(s[2]));
        return c;
    }
    // lr_k = min(lr, eta ||w|| / (||h|| + eps)) where ||w|| ||h|| > 0, else lr
    void set_lr(Scalars& c, T hn) const {
        const T lr = static_cast<T>(a.lr);
        T lrk = lr;
        if (a.adapt) {
            const T local = static_cast<T>(a.eta) * c.wn / (hn + static_cast<T>(a.eps));
            if (c.wn * hn > 0) lrk = nan_min(local, lr);
        }
        c.lrk = lrk;
        c.trust = lr > 0 ? lrk / lr : T(1);
    }
    void skipped(Scalars& c, const double s[3]) const { set_lr(c, static_cast<T>(s[2])); }
    void write(int64_t t, const Scalars& c) const {
        this->out5(t, c.fin, c.trust, c.lrk, c.wn, c.gn);
        if (c.fin && a.mu != 0) *a.count[t] += 1;
    }

    // buf = mu buf + c d; h = buf (Nesterov: d + mu buf); w -= lr_k h
    void apply(int64_t t, int64_t s, int64_t e, const Scalars& c) const {
        if (a.mu == 0) return this->plain_step(t, s, e, -c.lrk);
        T* w = static_cast<T*>(a.w[t]);
        const T mu = static_cast<T>(a.mu), step = -c.lrk, cd = c.cd;
        T* buf = static_cast<T*>(a.s0[t]);
        if (a.nesterov) {
            this->each(t, s, e, [=](int64_t i, T, T d) LB_INLINE {
                const T b = buf[i] * mu + d * cd;
                buf[i] = b;
                w[i] = w[i] + (d + mu * b) * step;
            });
        } else {
            this->each(t, s, e, [=](int64_t i, T, T d) LB_INLINE {
                const T b = buf[i] * mu + d * cd;
                buf[i] = b;
                w[i] = w[i] + b * step;
            });
        }
    }
};

// ---------------------------------------------------------------- LAMB (lamb.py)
template <class T>
struct Lamb : Base<T> {
    using Base<T>::a;
    static constexpr bool kSkipNorm = true, kCounts = true, kHasX = true;
    struct Corr { T rs2, ib1; };                 // rsqrt(1 - b2^n), 1 / (1 - b1^n)
    struct Scalars { bool fin; T trust, lrk, wn, gn; Corr k; };
    const T b1, b2, c1, c2, eps, wd;
    explicit Lamb(const Args& args)
        : Base<T>(args), b1(static_cast<T>(args.b1)), b2(static_cast<T>(args.b2)),
          c1(static_cast<T>(1.0 - args.b1)), c2(static_cast<T>(1.0 - args.b2)),
          eps(static_cast<T>(args.eps)), wd(static_cast<T>(args.wd)) {}

    // bias corrections at update number n: 1 - b^n = -expm1(n log b) in the dtype (docs/algorithms.md section 8)
    Corr corr(int64_t n) const {
        const T tn = static_cast<T>(n);
        const T bc1 = -std::expm1(tn * static_cast<T>(a.log_b1));
        const T bc2 = -std::expm1(tn * static_cast<T>(a.log_b2));
        return Corr{T(1) / std::sqrt(bc2), T(1) / bc1};
    }
    // a finite gradient makes this tensor's update number count + 1; a skipped tensor's r
    // uses max(count, 1) (the reference's clamp)
    Corr corr_of(int64_t t, bool skipped) const {
        const int64_t n = *a.count[t];
        return corr(skipped ? (n > 1 ? n : 1) : n + 1);
    }
    // r = m_hat / (sqrt(v_hat) + eps) (+ wd w), spelled as the reference
    static inline T r_hat(T m1, T v1, T rs2, T ib1, T eps) {
        const T r = std::sqrt(v1) * rs2 + eps;
        return (T(1) / r) * m1 * ib1;
    }
    // r of the new moments (skipped: of the old ones)
    template <class F>
    void with_x(int64_t t, bool skipped, F&& f) const {
        const T* w = static_cast<const T*>(a.w[t]);
        const T* m = static_cast<const T*>(a.s0[t]);
        const T* v = static_cast<const T*>(a.s1[t]);
        const Corr k = corr_of(t, skipped);
        const T rs2 = k.rs2, ib1 = k.ib1, b1_ = b1, b2_ = b2, c1_ = c1, c2_ = c2, eps_ = eps, wd_ = wd;
        branch(skipped, [&](auto SK) {
            branch(a.wd != 0, [&](auto WD) {
                f([=](int64_t i, T gi) LB_INLINE {
                    const T m1 = SK ? m[i] : m[i] * b1_ + c1_ * gi;
                    const T v1 = SK ? v[i] : v[i] * b2_ + c2_ * gi * gi;
                    const T r = r_hat(m1, v1, rs2, ib1, eps_);
                    return WD ? r + wd_ * w[i] : r;
                });
            });
        });
    }

    Scalars scalars(int64_t t, const double s[3]) const {
        Scalars c;
        c.wn = static_cast<T>(s[0]);
        c.gn = static_cast<T>(s[1]);
        c.fin = finite(c.gn) && this->ok;
        c.k = corr_of(t, false);
        set_lr(c, static_cast<T>(s[2]));
        return c;
    }
    void set_lr(Scalars& c, T rn) const {
        T trust = T(1);
        if (a.adapt) {   // zero_norm_safe_ratio(||w||, ||r||), optional clip
            if (c.wn > 0 && rn > 0) trust = c.wn / rn;
            if (a.has_max_trust && trust > static_cast<T>(a.max_trust)) trust = static_cast<T>(a.max_trust);
        }
        c.trust = trust;
        c.lrk = static_cast<T>(a.lr) * trust;
    }
    void skipped(Scalars& c, const double s[3]) const { set_lr(c, static_cast<T>(s[2])); }
    void write(int64_t t, const Scalars& c) const {
        this->out5(t, c.fin, c.trust, c.lrk, c.wn, c.gn);
        if (c.fin) *a.count[t] += 1;
    }

    // m, v updated; w -= lr_k r
    void apply(int64_t t, int64_t s, int64_t e, const Scalars& c) const {
        T* w = static_cast<T*>(a.w[t]);
        T* m = static_cast<T*>(a.s0[t]);
        T* v = static_cast<T*>(a.s1[t]);
        const T b1_ = b1, b2_ = b2, c1_ = c1, c2_ = c2, eps_ = eps, wd_ = wd, step = -c.lrk;
        const T rs2 = c.k.rs2, ib1 = c.k.ib1;
        branch(this->has_scale, [&](auto HS) {
            branch(a.wd != 0, [&](auto WD) {
                const T* const g = static_cast<const T*>(a.g[t]);
                T* const wl = w;
                T* const ml = m;
                T* const vl = v;
                const T sc = this->scale;
#pragma omp simd
                for (int64_t i = s; i < e; ++i) {
                    const T gi = HS ? g[i] / sc : g[i];
                    const T m1 = ml[i] * b1_ + c1_ * gi;
                    const T v1 = vl[i] * b2_ + c2_ * gi * gi;
                    ml[i] = m1;
                    vl[i] = v1;
                    const T r0 = r_hat(m1, v1, rs2, ib1, eps_);
                    const T r = WD ? r0 + wd_ * wl[i] : r0;
                    wl[i] = wl[i] + r * step;
                }
            });
        });
    }
};

}  // namespace

extern "C" {
int largebatch_native_abi() { return 4; }
int64_t largebatch_native_block() { return BLOCK; }
void largebatch_lars_f32(const Args* a) { Lars<float> r(*a); run<float>(r); }
void largebatch_lars_f64(const Args* a) { Lars<double> r(*a); run<double>(r); }
void largebatch_lalc_f32(const Args* a) { Lalc<float> r(*a); run<float>(r); }
void largebatch_lalc_f64(const Args* a) { Lalc<double> r(*a); run<double>(r); }
void largebatch_lamb_f32(const Args* a) { Lamb<float> r(*a); run<float>(r); }
void largebatch_lamb_f64(const Args* a) { Lamb<double> r(*a); run<double>(r); }
}
