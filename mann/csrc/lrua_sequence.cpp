// The whole-episode LRUA sequence of mann/fused.py (MANNSequence) with its time loops in C++, for every reading
// (key or add vector written, zeroing on or off, read weights from M_t or M_{t-1}, key strength or none, any heads).
//
// The same math as sequence_forward_step / sequence_backward_step and lrua_forward / lrua_backward in
// mann/fused.py (read those first: they carry the equations and the shapes). The per-step matrix products stay
// ATen calls; the LRUA memory (Eq. 2-8 and their gradients), the LSTM cell's backward and the head layer's
// backward are loops over each episode's rows, episodes split over OpenMP threads where the memory is large
// enough, with AVX2 + FMA versions for float where compiled in; each step writes what the backward needs straight
// into [T, ...] buffers (reused across calls, see mann/fused.py). Sums may be taken in another order than ATen's,
// so results agree to rounding: tests/test_conformance.py checks outputs and gradients against a plain-autograd
// model in float64 and float32.
//
// Shapes: B batch, T steps, H controller width, G = 4H gates, R heads, W memory width, N slots, RW = R*W,
// P head-layer outputs (R*W keys, R alphas, then R*W add vectors when `add`, R strengths when `strength`).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;
constexpr double kEps = 1e-8;  // mann.memory.EPS

// What the forward saves per step, stacked over time: the indices into its list of [T, ...] tensors. kM has
// T + 1 entries, M_{t-1} at t (the initial memory at 0); kMraw, kSim belong to the memory the read weights come
// from (M_t, or M_{t-1}); kBeta, kSlope (the key strength and softplus' of its pre-activation) are empty
// without a strength.
enum : int { kZ, kSG, kGt, kCprev, kTC, kKeys, kContent, kS, kDiff, kKeep, kM, kMraw, kKraw, kSim, kWr, kWw,
             kBeta, kSlope, kSaved };

// An out= argument from a temporary view (it lives to the end of the full expression).
Tensor& L(Tensor&& t) { return t; }


// ---- Small dense helpers on W-long rows: portable loops, and AVX2 + FMA versions for float where compiled in.

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
inline void axpy(T a, const T* x, T* y, int64_t n) {  // y += a x
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// out[r * stride] = a[r] . x for r < R (rows a[r] = a + r * W).
template <typename T>
inline void dots(const T* a, const T* x, int64_t R, int64_t W, T* out, int64_t stride) {
  for (int64_t r = 0; r < R; ++r) out[r * stride] = dot(a + r * W, x, W);
}

// out[0:W] = sum_n coef[n] rows[n] (rows: N x W, row-major).
template <typename T>
inline void combine(const T* coef, const T* rows, int64_t N, int64_t W, T* out) {
  std::fill(out, out + W, T(0));
  for (int64_t n = 0; n < N; ++n) axpy(coef[n], rows + n * W, out, W);
}


// One row of Eq. 8 and what Eq. 2 needs of it: row = (zeroed ? 0 : prev) + sum_r a[r * a_stride] x[r]; returns
// |row|^2 and sets out[r * out_stride] = y[r] . row (x, y: R rows of W).
template <typename T>
inline T write_row_loops(const T* prev, bool zeroed, const T* a, int64_t a_stride, const T* x, const T* y,
                         int64_t R, int64_t W, T* row, T* out, int64_t out_stride) {
  if (zeroed)
    std::fill(row, row + W, T(0));
  else
    std::copy(prev, prev + W, row);
  for (int64_t r = 0; r < R; ++r) axpy(a[r * a_stride], x + r * W, row, W);
  dots(y, row, R, W, out, out_stride);
  return dot(row, row, W);
}

// One row of dM_t: row += sum_r (a[r * s] u[r] + b[r * s] v[r]) + c m; then out[r * s] = x[r] . row.
template <typename T>
inline void grad_row_loops(T* row, const T* a, const T* u, const T* b, const T* v, T c, const T* m, const T* x,
                           int64_t R, int64_t W, int64_t s, T* out) {
  for (int64_t r = 0; r < R; ++r) {
    axpy(a[r * s], u + r * W, row, W);
    axpy(b[r * s], v + r * W, row, W);
  }
  axpy(c, m, row, W);
  dots(x, row, R, W, out, s);
}

// The portable loops by default; float gets one-pass AVX2 versions below where compiled in.
template <typename T>
inline T write_row(const T* prev, bool zeroed, const T* a, int64_t a_stride, const T* x, const T* y, int64_t R,
                   int64_t W, T* row, T* out, int64_t out_stride) {
  return write_row_loops(prev, zeroed, a, a_stride, x, y, R, W, row, out, out_stride);
}

template <typename T>
inline void grad_row(T* row, const T* a, const T* u, const T* b, const T* v, T c, const T* m, const T* x, int64_t R,
                     int64_t W, int64_t s, T* out) {
  grad_row_loops(row, a, u, b, v, c, m, x, R, W, s, out);
}

#if defined(__AVX2__) && defined(__FMA__)
inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}

template <>
inline float dot<float>(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <>
inline void axpy<float>(float a, const float* x, float* y, int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += a * x[i];
}

template <>
inline void dots<float>(const float* a, const float* x, int64_t R, int64_t W, float* out, int64_t stride) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) {  // four rows per pass over x
    const float *a0 = a + r * W, *a1 = a0 + W, *a2 = a1 + W, *a3 = a2 + W;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    int64_t w = 0;
    for (; w + 8 <= W; w += 8) {
      const __m256 xv = _mm256_loadu_ps(x + w);
      s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a0 + w), xv, s0);
      s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a1 + w), xv, s1);
      s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a2 + w), xv, s2);
      s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a3 + w), xv, s3);
    }
    float t0 = hsum(s0), t1 = hsum(s1), t2 = hsum(s2), t3 = hsum(s3);
    for (; w < W; ++w) {
      t0 += a0[w] * x[w];
      t1 += a1[w] * x[w];
      t2 += a2[w] * x[w];
      t3 += a3[w] * x[w];
    }
    out[r * stride] = t0;
    out[(r + 1) * stride] = t1;
    out[(r + 2) * stride] = t2;
    out[(r + 3) * stride] = t3;
  }
  for (; r < R; ++r) out[r * stride] = dot(a + r * W, x, W);
}

// K chunks of 8 columns of `combine`, accumulated in registers over all N rows.
template <int K>
inline void combine_block(const float* coef, const float* rows, int64_t N, int64_t W, float* out) {
  __m256 acc[K];
  for (int k = 0; k < K; ++k) acc[k] = _mm256_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    const __m256 c = _mm256_set1_ps(coef[n]);
    const float* row = rows + n * W;
    for (int k = 0; k < K; ++k) acc[k] = _mm256_fmadd_ps(c, _mm256_loadu_ps(row + 8 * k), acc[k]);
  }
  for (int k = 0; k < K; ++k) _mm256_storeu_ps(out + 8 * k, acc[k]);
}

template <>
inline void combine<float>(const float* coef, const float* rows, int64_t N, int64_t W, float* out) {
  int64_t w = 0;
  for (; w + 32 <= W; w += 32) combine_block<4>(coef, rows + w, N, W, out + w);
  switch ((W - w) / 8) {
    case 3: combine_block<3>(coef, rows + w, N, W, out + w); w += 24; break;
    case 2: combine_block<2>(coef, rows + w, N, W, out + w); w += 16; break;
    case 1: combine_block<1>(coef, rows + w, N, W, out + w); w += 8; break;
    default: break;
  }
  for (; w < W; ++w) {
    float acc = 0;
    for (int64_t n = 0; n < N; ++n) acc += coef[n] * rows[n * W + w];
    out[w] = acc;
  }
}
// write_row and grad_row in one pass over the row, in registers, for up to four heads.
template <>
inline float write_row<float>(const float* prev, bool zeroed, const float* a, int64_t a_stride, const float* x,
                              const float* y, int64_t R, int64_t W, float* row, float* out, int64_t out_stride) {
  if (R > 4) return write_row_loops(prev, zeroed, a, a_stride, x, y, R, W, row, out, out_stride);
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  const float* xr[4] = {x, x, x, x};
  const float* yr[4] = {y, y, y, y};
  for (int64_t r = 0; r < R; ++r) {
    c[r] = a[r * a_stride];
    xr[r] = x + r * W;
    yr[r] = y + r * W;
  }
  const __m256 c0 = _mm256_set1_ps(c[0]), c1 = _mm256_set1_ps(c[1]), c2 = _mm256_set1_ps(c[2]),
               c3 = _mm256_set1_ps(c[3]);
  __m256 sq = _mm256_setzero_ps(), d0 = sq, d1 = sq, d2 = sq, d3 = sq;
  int64_t w = 0;
  for (; w + 8 <= W; w += 8) {  // unused heads add 0 * x[0]
    __m256 v = zeroed ? _mm256_setzero_ps() : _mm256_loadu_ps(prev + w);
    v = _mm256_fmadd_ps(c0, _mm256_loadu_ps(xr[0] + w), v);
    v = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xr[1] + w), v);
    v = _mm256_fmadd_ps(c2, _mm256_loadu_ps(xr[2] + w), v);
    v = _mm256_fmadd_ps(c3, _mm256_loadu_ps(xr[3] + w), v);
    _mm256_storeu_ps(row + w, v);
    sq = _mm256_fmadd_ps(v, v, sq);
    d0 = _mm256_fmadd_ps(_mm256_loadu_ps(yr[0] + w), v, d0);
    d1 = _mm256_fmadd_ps(_mm256_loadu_ps(yr[1] + w), v, d1);
    d2 = _mm256_fmadd_ps(_mm256_loadu_ps(yr[2] + w), v, d2);
    d3 = _mm256_fmadd_ps(_mm256_loadu_ps(yr[3] + w), v, d3);
  }
  float q = hsum(sq), dd[4] = {hsum(d0), hsum(d1), hsum(d2), hsum(d3)};
  for (; w < W; ++w) {
    float v = zeroed ? 0.f : prev[w];
    for (int64_t r = 0; r < R; ++r) v += c[r] * xr[r][w];
    row[w] = v;
    q += v * v;
    for (int64_t r = 0; r < R; ++r) dd[r] += yr[r][w] * v;
  }
  for (int64_t r = 0; r < R; ++r) out[r * out_stride] = dd[r];
  return q;
}

template <>
inline void grad_row<float>(float* row, const float* a, const float* u, const float* b, const float* v, float c,
                            const float* m, const float* x, int64_t R, int64_t W, int64_t s, float* out) {
  if (R > 4) return grad_row_loops(row, a, u, b, v, c, m, x, R, W, s, out);
  float ca[4] = {0.f, 0.f, 0.f, 0.f}, cb[4] = {0.f, 0.f, 0.f, 0.f};
  const float *ur[4] = {u, u, u, u}, *vr[4] = {v, v, v, v}, *xr[4] = {x, x, x, x};
  for (int64_t r = 0; r < R; ++r) {
    ca[r] = a[r * s];
    cb[r] = b[r * s];
    ur[r] = u + r * W;
    vr[r] = v + r * W;
    xr[r] = x + r * W;
  }
  const __m256 cm = _mm256_set1_ps(c);
  __m256 ka[4], kb[4];
  for (int r = 0; r < 4; ++r) {
    ka[r] = _mm256_set1_ps(ca[r]);
    kb[r] = _mm256_set1_ps(cb[r]);
  }
  __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
  int64_t w = 0;
  for (; w + 8 <= W; w += 8) {
    __m256 g = _mm256_fmadd_ps(cm, _mm256_loadu_ps(m + w), _mm256_loadu_ps(row + w));
    for (int r = 0; r < 4; ++r) {
      g = _mm256_fmadd_ps(ka[r], _mm256_loadu_ps(ur[r] + w), g);
      g = _mm256_fmadd_ps(kb[r], _mm256_loadu_ps(vr[r] + w), g);
    }
    _mm256_storeu_ps(row + w, g);
    d0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr[0] + w), g, d0);
    d1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr[1] + w), g, d1);
    d2 = _mm256_fmadd_ps(_mm256_loadu_ps(xr[2] + w), g, d2);
    d3 = _mm256_fmadd_ps(_mm256_loadu_ps(xr[3] + w), g, d3);
  }
  float dd[4] = {hsum(d0), hsum(d1), hsum(d2), hsum(d3)};
  for (; w < W; ++w) {
    float g = row[w] + c * m[w];
    for (int64_t r = 0; r < R; ++r) g += ca[r] * ur[r][w] + cb[r] * vr[r][w];
    row[w] = g;
    for (int64_t r = 0; r < R; ++r) dd[r] += xr[r][w] * g;
  }
  for (int64_t r = 0; r < R; ++r) out[r * s] = dd[r];
}
#endif

// ---- The memory step (Eq. 5-8, then Eq. 2-4 on M_t) for one episode b, forward and backward.
// Row-major pointers to episode b's slices.

struct Dims {
  int64_t R, N, W;
};

// Eq. 6 on w_u_{t-1}: the R least-used rows in the order of a stable sort (ties to the lower index, NaN last).
template <typename T>
void least_used(const T* usage, int64_t N, int64_t R, std::vector<int64_t>& idx) {
  idx.clear();
  for (int64_t n = 0; n < N; ++n) {
    const T u = usage[n];
    const int64_t size = static_cast<int64_t>(idx.size());
    if (size == R && !(u < usage[idx.back()])) continue;
    int64_t p = size;
    while (p > 0 && u < usage[idx[p - 1]]) --p;  // after every equal one: stable
    idx.insert(idx.begin() + p, n);
    if (static_cast<int64_t>(idx.size()) > R) idx.pop_back();
  }
}

// In: keys, content [R, W]; alpha [R]; mem_prev [N, W]; usage_prev [N]; wr_prev [R, N].
// Out: s [R] sigmoid(alpha); keep [1] the zeroed row (-1: none); diff [R, N] = w_r_{t-1} - w_lu; ww [R, N]
// (Eq. 7); m1 [N, W] (Eq. 8); m_raw [N], k_raw [R] the norms; sim [R, N] (Eq. 2, the cosine before the
// softmax and the strength), of m1 if `after`, else of mem_prev.
template <typename T>
void memory_write(Dims d, const T* keys, const T* content, const T* alpha, const T* mem_prev, const T* usage_prev,
                  const T* wr_prev, bool zero, bool after, T* s, int64_t* keep, T* diff, T* ww, T* m1, T* m_raw,
                  T* k_raw, T* sim) {
  const int64_t R = d.R, N = d.N, W = d.W;
  thread_local std::vector<int64_t> lu;
  thread_local std::vector<T> w_lu, unused;
  lu.reserve(R + 1);
  unused.resize(R);
  least_used(usage_prev, N, R, lu);
  w_lu.assign(N, T(0));
  for (int64_t i : lu) w_lu[i] = T(1);
  const int64_t zeroed = zero ? lu[0] : -1;
  *keep = zeroed;
  for (int64_t r = 0; r < R; ++r) {
    const T sr = T(1) / (T(1) + std::exp(-alpha[r]));
    s[r] = sr;
    for (int64_t n = 0; n < N; ++n) {
      const T dd = wr_prev[r * N + n] - w_lu[n];
      diff[r * N + n] = dd;
      ww[r * N + n] = w_lu[n] + sr * dd;  // Eq. 7
    }
    k_raw[r] = std::sqrt(dot(keys + r * W, keys + r * W, W));
  }
  for (int64_t n = 0; n < N; ++n) {
    const T* prev = mem_prev + n * W;
    T norm;
    if (after) {  // Eq. 8, the row's norm and k_r . M_t(n) in one pass
      norm = std::sqrt(write_row(prev, n == zeroed, ww + n, N, content, keys, R, W, m1 + n * W, sim + n, N));
    } else {  // the norm and k_r . M_{t-1}(n), then Eq. 8
      norm = std::sqrt(dot(prev, prev, W));
      dots(keys, prev, R, W, sim + n, N);
      write_row(prev, n == zeroed, ww + n, N, content, keys, R, W, m1 + n * W, unused.data(), 1);
    }
    m_raw[n] = norm;
    for (int64_t r = 0; r < R; ++r) sim[r * N + n] /= (k_raw[r] + T(kEps)) * (norm + T(kEps));  // Eq. 2
  }
}

// In: wr [R, N] (Eq. 3, the softmax of sim), ww, m1, usage_prev. Out: reads [R, W] (Eq. 4), usage [N] (Eq. 5).
template <typename T>
void memory_read(Dims d, const T* wr, const T* ww, const T* m1, const T* usage_prev, double gamma, T* reads,
                 T* usage) {
  const int64_t R = d.R, N = d.N, W = d.W;
  for (int64_t r = 0; r < R; ++r) combine(wr + r * N, m1, N, W, reads + r * W);  // Eq. 4
  for (int64_t n = 0; n < N; ++n) {
    T wsum = 0;
    for (int64_t r = 0; r < R; ++r) wsum += wr[r * N + n] + ww[r * N + n];
    usage[n] = wsum + T(gamma) * usage_prev[n];  // Eq. 5
  }
}

// In: what the forward saved (m1: M_t; m_addr: the memory the read weights come from, m1 itself if `after`;
// beta [R]: the key strength, or null), and d_reads [R, W] (the reads' gradient, from the output and step t+1).
// In/out: the carries from step t+1 to step t: dm [N, W] (M_t in, M_{t-1} out), du [N] (w_u_t), dwr [R, N] (w_r_t).
// Out: g_keys, g_content [R, W] (with `same_content`, g_keys holds both), g_alpha [R], g_beta [R] (with beta).
// Scratch: g_a, g_b [R, N], g_mnorm [N].
template <typename T>
void memory_backward(Dims d, const T* keys, const T* content, bool same_content, const T* s, int64_t keep,
                     const T* diff, const T* ww, const T* m1, const T* m_addr, bool after, const T* beta,
                     const T* m_raw, const T* k_raw, const T* sim, const T* wr, const T* d_reads, double gamma, T* dm,
                     T* du, T* dwr, T* g_keys, T* g_content, T* g_alpha, T* g_beta, T* g_a, T* g_b, T* g_mnorm) {
  const int64_t R = d.R, N = d.N, W = d.W;
  // read (Eq. 4, from M_t) and usage (Eq. 5) into the read weights: g_a = d w_r_t
  for (int64_t n = 0; n < N; ++n) dots(d_reads, m1 + n * W, R, W, g_a + n, N);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t n = 0; n < N; ++n) g_a[r * N + n] += dwr[r * N + n] + du[n];
  // softmax (Eq. 3) of beta * sim, then the cosine (Eq. 2): sim = D / q, q = (|k| + eps)(|M| + eps); g_b = dD
  std::fill(g_mnorm, g_mnorm + N, T(0));
  for (int64_t r = 0; r < R; ++r) {
    const T* gw = g_a + r * N;
    const T* p = wr + r * N;
    const T inner = dot(gw, p, N);
    const T kq = k_raw[r] + T(kEps);
    const T b = beta ? beta[r] : T(1);
    T g_knorm = 0, g_b_r = 0;
    for (int64_t n = 0; n < N; ++n) {
      const T g_logit = p[n] * (gw[n] - inner);
      g_b_r += g_logit * sim[r * N + n];
      const T g_sim = g_logit * b;
      const T q = kq * (m_raw[n] + T(kEps));
      const T gq = -(g_sim * sim[r * N + n]) / q;
      g_b[r * N + n] = g_sim / q;
      g_knorm += gq * (m_raw[n] + T(kEps));
      g_mnorm[n] += gq * kq;
    }
    g_alpha[r] = g_knorm;  // d|k_r| until the end
    if (beta) g_beta[r] = g_b_r;
  }
  // every path into row n of M_t: the next step, the read, and (`after`) the dot products and the row norm
  // (d|M|/dM = M/|M|, 0 at 0); dm becomes dM_t; then the write (Eq. 8) into the write weights (Eq. 7): g_a holds
  // d w_w_t
  for (int64_t n = 0; n < N; ++n) {
    T* g_row = dm + n * W;
    if (after) {
      grad_row(g_row, wr + n, d_reads, g_b + n, keys, g_mnorm[n] / std::max(m_raw[n], T(1e-30)), m1 + n * W,
               content, R, W, N, g_a + n);
    } else {
      for (int64_t r = 0; r < R; ++r) axpy(wr[r * N + n], d_reads + r * W, g_row, W);
      dots(content, g_row, R, W, g_a + n, N);
    }
    for (int64_t r = 0; r < R; ++r) g_a[r * N + n] += du[n];
  }
  for (int64_t r = 0; r < R; ++r) {
    combine(g_b + r * N, m_addr, N, W, g_keys + r * W);  // through the dot products
    axpy(g_alpha[r] / std::max(k_raw[r], T(1e-30)), keys + r * W, g_keys + r * W, W);  // through |k|
    combine(ww + r * N, dm, N, W, g_content + r * W);  // through the write
    if (same_content) axpy(T(1), g_content + r * W, g_keys + r * W, W);
    const T sr = s[r];
    const T* gw = g_a + r * N;
    g_alpha[r] = dot(gw, diff + r * N, N) * sr * (T(1) - sr);
    for (int64_t n = 0; n < N; ++n) dwr[r * N + n] = gw[n] * sr;
  }
  if (keep >= 0) std::fill(dm + keep * W, dm + keep * W + W, T(0));  // the row zeroed before the write
  if (!after)  // the dot products and row norms of M_{t-1}
    for (int64_t n = 0; n < N; ++n) {
      T* g_row = dm + n * W;
      for (int64_t r = 0; r < R; ++r) axpy(g_b[r * N + n], keys + r * W, g_row, W);
      axpy(g_mnorm[n] / std::max(m_raw[n], T(1e-30)), m_addr + n * W, g_row, W);
    }
  for (int64_t n = 0; n < N; ++n) du[n] *= T(gamma);
}

// The head layer's backward for one episode: keys = tanh(.), alphas, add vectors = tanh(.) (when `add`), strengths
// = softplus(.) + 1 (when `slope`, softplus' [R], is given) into d_out [P] (the gradient of the head layer's
// output), from g_keys, g_content [R, W], g_alpha [R] and g_beta [R].
template <typename T>
void head_backward(int64_t R, int64_t W, const T* keys, const T* content, bool add, const T* slope, const T* g_keys,
                   const T* g_content, const T* g_alpha, const T* g_beta, T* d_out) {
  const int64_t RW = R * W;
  for (int64_t i = 0; i < RW; ++i) d_out[i] = g_keys[i] * (T(1) - keys[i] * keys[i]);
  for (int64_t r = 0; r < R; ++r) d_out[RW + r] = g_alpha[r];
  if (add)
    for (int64_t i = 0; i < RW; ++i) d_out[RW + R + i] = g_content[i] * (T(1) - content[i] * content[i]);
  if (slope)
    for (int64_t r = 0; r < R; ++r) d_out[RW + R + (add ? RW : 0) + r] = g_beta[r] * slope[r];
}

// The LSTM cell's backward for one episode (H units): sg [4H] the sigmoid of the gates (i, f, ., o), g [H] the
// tanh of the cell input, tc [H] tanh(c_t), c_prev [H], dh [H] the gradient of h_t. In/out: dc [H], the gradient
// of c_t in, of c_{t-1} out. Out: d_gates [4H], the gradient of the gates' pre-activations.
template <typename T>
void lstm_backward(int64_t H, const T* sg, const T* g, const T* tc, const T* c_prev, const T* dh, T* dc,
                   T* d_gates) {
  for (int64_t h = 0; h < H; ++h) {
    const T i = sg[h], f = sg[H + h], o = sg[3 * H + h], gg = g[h], t = tc[h];
    const T dcn = dc[h] + dh[h] * o * (T(1) - t * t);
    d_gates[h] = dcn * gg * (i * (T(1) - i));
    d_gates[H + h] = dcn * c_prev[h] * (f * (T(1) - f));
    d_gates[2 * H + h] = dcn * i * (T(1) - gg * gg);
    d_gates[3 * H + h] = dh[h] * t * (o * (T(1) - o));
    dc[h] = dcn * f;
  }
}

}  // namespace

template <typename T>
T* ptr(const Tensor& t) {
  return t.data_ptr<T>();
}

// Episodes per task of at::parallel_for for `work` elements per episode: one where that is large (the paper's
// 128 x 40 x 4 memory), all where it is so small that a parallel region costs more than it saves (a 16 x 16
// memory with one head; and on a busy machine every region waits for its slowest thread).
int64_t grain(int64_t work) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, work));
}

// Returns {hs [T, B, H], reads [T, B, RW], saved...} (saved: the kSaved stacks named above). `workspace`: empty,
// or the saved stacks of an earlier call that are no longer needed, to be written over.
std::vector<Tensor> sequence_forward(const Tensor& x_proj, const Tensor& w_rec_t, const Tensor& w_head_t,
                                     const Tensor& b_head, Tensor h, Tensor c, Tensor memory, Tensor usage,
                                     Tensor wr, Tensor reads, double gamma, bool zero, bool after, bool add,
                                     bool strength, const std::vector<Tensor>& workspace) {
  at::NoGradGuard no_grad;
  const int64_t B = x_proj.size(0), T = x_proj.size(1), H = h.size(1), N = usage.size(1);
  const int64_t R = reads.size(1), W = reads.size(2), RW = R * W, P = w_head_t.size(1);
  const Dims dims{R, N, W};
  auto opts = x_proj.options();
  Tensor hs = at::empty({T, B, H}, opts), rs = at::empty({T, B, RW}, opts);
  // the saved stacks: the caller's buffers from an earlier call where they fit (fresh pages cost more than the
  // writes into them), else new ones
  std::vector<Tensor> sv(kSaved);
  auto buf = [&](int k, at::IntArrayRef sizes, at::TensorOptions o) {
    const bool fits = static_cast<int64_t>(workspace.size()) == kSaved && workspace[k].sizes() == sizes &&
                      workspace[k].dtype() == o.dtype() && workspace[k].device() == o.device();
    sv[k] = fits ? workspace[k] : at::empty(sizes, o);
  };
  buf(kZ, {T, B, RW + H}, opts);
  buf(kSG, {T, B, 4 * H}, opts);
  buf(kGt, {T, B, H}, opts);
  buf(kCprev, {T, B, H}, opts);
  buf(kTC, {T, B, H}, opts);
  buf(kKeys, {T, B, R, W}, opts);
  if (add)
    buf(kContent, {T, B, R, W}, opts);
  else
    sv[kContent] = sv[kKeys];
  buf(kS, {T, B, R}, opts);
  buf(kDiff, {T, B, R, N}, opts);
  buf(kKeep, {T, B}, opts.dtype(at::kLong));
  buf(kM, {T + 1, B, N, W}, opts);
  buf(kMraw, {T, B, N}, opts);
  buf(kKraw, {T, B, R}, opts);
  buf(kSim, {T, B, R, N}, opts);
  buf(kWr, {T, B, R, N}, opts);
  buf(kWw, {T, B, R, N}, opts);
  buf(kBeta, {strength ? T : 0, B, R}, opts);
  buf(kSlope, {strength ? T : 0, B, R}, opts);
  sv[kM][0].copy_(memory);
  usage = usage.contiguous();
  wr = wr.contiguous();
  reads = reads.reshape({B, RW});
  Tensor usage_next = at::empty_like(usage);
  for (int64_t t = 0; t < T; ++t) {
    // the LSTM controller on [r_{t-1}, h_{t-1}] (its input projection is hoisted: x_proj)
    Tensor z = sv[kZ][t];
    z.narrow(1, 0, RW).copy_(reads);
    z.narrow(1, RW, H).copy_(h);
    Tensor gates = at::addmm(x_proj.select(1, t), z, w_rec_t);
    Tensor sg = sv[kSG][t];
    at::sigmoid_out(sg, gates);
    Tensor g = sv[kGt][t];
    at::tanh_out(g, gates.narrow(1, 2 * H, H));
    sv[kCprev][t].copy_(c);
    c = at::addcmul(sg.narrow(1, H, H) * c, sg.narrow(1, 0, H), g);
    Tensor tc = sv[kTC][t];
    at::tanh_out(tc, c);
    h = hs[t];
    at::mul_out(h, sg.narrow(1, 3 * H, H), tc);
    // the head layer: keys, write gates, add vectors
    Tensor out = at::addmm(b_head, h, w_head_t);
    Tensor keys = sv[kKeys][t];
    at::tanh_out(L(keys.view({B, RW})), out.narrow(1, 0, RW));
    Tensor content = keys;
    if (add) {
      content = sv[kContent][t];
      at::tanh_out(L(content.view({B, RW})), out.narrow(1, RW + R, RW));
    }
    Tensor beta;
    if (strength) {  // softplus(.) + 1, as F.softplus (threshold 20)
      Tensor pre = out.narrow(1, P - R, R);
      beta = sv[kBeta][t];
      beta.copy_(at::softplus(pre, 1, 20)).add_(1);
      at::sigmoid_out(L(sv[kSlope][t]), pre);
    }
    // the memory (Eq. 5-8, 2-4), one episode per task
    Tensor s = sv[kS][t], keep = sv[kKeep][t], diff = sv[kDiff][t], ww = sv[kWw][t], m1 = sv[kM][t + 1];
    Tensor mem_prev = sv[kM][t];
    Tensor m_raw = sv[kMraw][t], k_raw = sv[kKraw][t], sim = sv[kSim][t], wr_t = sv[kWr][t], rd = rs[t];
    AT_DISPATCH_FLOATING_TYPES(x_proj.scalar_type(), "memory_write", [&] {
      const scalar_t* alpha = ptr<scalar_t>(out) + RW;
      at::parallel_for(0, B, grain(N * W * R), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          memory_write<scalar_t>(
              dims, ptr<scalar_t>(keys) + b * RW, ptr<scalar_t>(content) + b * RW, alpha + b * P,
              ptr<scalar_t>(mem_prev) + b * N * W, ptr<scalar_t>(usage) + b * N, ptr<scalar_t>(wr) + b * R * N,
              zero, after, ptr<scalar_t>(s) + b * R, ptr<int64_t>(keep) + b, ptr<scalar_t>(diff) + b * R * N,
              ptr<scalar_t>(ww) + b * R * N, ptr<scalar_t>(m1) + b * N * W, ptr<scalar_t>(m_raw) + b * N,
              ptr<scalar_t>(k_raw) + b * R, ptr<scalar_t>(sim) + b * R * N);
      });
    });
    at::_softmax_out(wr_t, strength ? sim * beta.unsqueeze(-1) : sim, -1, false);  // Eq. 3
    AT_DISPATCH_FLOATING_TYPES(x_proj.scalar_type(), "memory_read", [&] {
      at::parallel_for(0, B, grain(N * W * R), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          memory_read<scalar_t>(dims, ptr<scalar_t>(wr_t) + b * R * N, ptr<scalar_t>(ww) + b * R * N,
                                ptr<scalar_t>(m1) + b * N * W, ptr<scalar_t>(usage) + b * N, gamma,
                                ptr<scalar_t>(rd) + b * RW, ptr<scalar_t>(usage_next) + b * N);
      });
    });
    std::swap(usage, usage_next);
    if (t == 0) usage_next = at::empty_like(usage);  // the caller's initial usage is not ours to overwrite
    wr = wr_t;
    reads = rd;
  }
  std::vector<Tensor> result{hs, rs};
  result.insert(result.end(), sv.begin(), sv.end());
  return result;
}

// Back through time. `saved` as returned by sequence_forward (after hs and reads); d_hs [B, T, H], d_rs [B, T, RW];
// the reading as given to sequence_forward (`zero` is in the saved rows). Returns {g_x_proj [B, T, G], g_w_rec
// [G, RW + H], g_w_head [P, H], g_b_head [P]}, then the initial state's gradients: h, c, memory, usage, wr, reads.
std::vector<Tensor> sequence_backward(const std::vector<Tensor>& sv, const Tensor& hs, const Tensor& d_hs,
                                      const Tensor& d_rs, const Tensor& w_rec, const Tensor& w_head, double gamma,
                                      bool /*zero*/, bool after, bool add, bool strength) {
  at::NoGradGuard no_grad;
  const Tensor& keys_all = sv[kKeys];
  const int64_t T = keys_all.size(0), B = keys_all.size(1), R = keys_all.size(2), W = keys_all.size(3);
  const int64_t N = sv[kM].size(2), H = sv[kGt].size(2), RW = R * W, G = 4 * H, P = w_head.size(0);
  const Dims dims{R, N, W};
  auto opts = d_hs.options();
  Tensor d_gates_all = at::empty({T, B, G}, opts), d_out_all = at::empty({T, B, P}, opts);
  Tensor dh_next = at::zeros({B, H}, opts), dr_next = at::zeros({B, R, W}, opts), dc = at::zeros({B, H}, opts);
  Tensor dm = at::zeros({B, N, W}, opts), du = at::zeros({B, N}, opts), dwr = at::zeros({B, R, N}, opts);
  Tensor g_keys = at::empty({B, R, W}, opts), g_content = at::empty({B, R, W}, opts);
  Tensor g_alpha = at::empty({B, R}, opts), g_beta = at::empty({B, R}, opts);
  Tensor g_a = at::empty({B, R, N}, opts), g_b = at::empty({B, R, N}, opts);
  Tensor g_mnorm = at::empty({B, N}, opts);
  for (int64_t t = T - 1; t >= 0; --t) {
    Tensor sg = sv[kSG][t], g = sv[kGt][t], c_prev = sv[kCprev][t], tc = sv[kTC][t];
    Tensor keys = sv[kKeys][t], content = add ? sv[kContent][t] : keys, s = sv[kS][t], diff = sv[kDiff][t];
    Tensor keep = sv[kKeep][t], m1 = sv[kM][t + 1], m_addr = after ? m1 : sv[kM][t];
    Tensor m_raw = sv[kMraw][t], k_raw = sv[kKraw][t];
    Tensor beta = strength ? sv[kBeta][t] : Tensor(), slope = strength ? sv[kSlope][t] : Tensor();
    Tensor sim = sv[kSim][t], wr = sv[kWr][t], ww = sv[kWw][t];
    Tensor d_reads = at::add(d_rs.select(1, t).reshape({B, R, W}), dr_next);
    // the memory step's backward (LRUAStep.backward), one episode per task
    AT_DISPATCH_FLOATING_TYPES(d_hs.scalar_type(), "memory_backward", [&] {
      at::parallel_for(0, B, grain(N * W * R), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          memory_backward<scalar_t>(
              dims, ptr<scalar_t>(keys) + b * RW, ptr<scalar_t>(content) + b * RW, !add, ptr<scalar_t>(s) + b * R,
              ptr<int64_t>(keep)[b], ptr<scalar_t>(diff) + b * R * N, ptr<scalar_t>(ww) + b * R * N,
              ptr<scalar_t>(m1) + b * N * W, ptr<scalar_t>(m_addr) + b * N * W, after,
              strength ? ptr<scalar_t>(beta) + b * R : nullptr, ptr<scalar_t>(m_raw) + b * N,
              ptr<scalar_t>(k_raw) + b * R, ptr<scalar_t>(sim) + b * R * N, ptr<scalar_t>(wr) + b * R * N,
              ptr<scalar_t>(d_reads) + b * RW, gamma, ptr<scalar_t>(dm) + b * N * W, ptr<scalar_t>(du) + b * N,
              ptr<scalar_t>(dwr) + b * R * N, ptr<scalar_t>(g_keys) + b * RW, ptr<scalar_t>(g_content) + b * RW,
              ptr<scalar_t>(g_alpha) + b * R, ptr<scalar_t>(g_beta) + b * R, ptr<scalar_t>(g_a) + b * R * N,
              ptr<scalar_t>(g_b) + b * R * N, ptr<scalar_t>(g_mnorm) + b * N);
          head_backward<scalar_t>(R, W, ptr<scalar_t>(keys) + b * RW, ptr<scalar_t>(content) + b * RW, add,
                                  strength ? ptr<scalar_t>(slope) + b * R : nullptr, ptr<scalar_t>(g_keys) + b * RW,
                                  ptr<scalar_t>(g_content) + b * RW, ptr<scalar_t>(g_alpha) + b * R,
                                  ptr<scalar_t>(g_beta) + b * R, ptr<scalar_t>(d_out_all) + (t * B + b) * P);
        }
      });
    });
    Tensor d_out = d_out_all[t];
    Tensor dh = at::addmm(d_hs.select(1, t) + dh_next, d_out, w_head);
    Tensor d_gates = d_gates_all[t];
    AT_DISPATCH_FLOATING_TYPES(d_hs.scalar_type(), "lstm_backward", [&] {
      at::parallel_for(0, B, grain(4 * H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          lstm_backward<scalar_t>(H, ptr<scalar_t>(sg) + b * G, ptr<scalar_t>(g) + b * H, ptr<scalar_t>(tc) + b * H,
                                  ptr<scalar_t>(c_prev) + b * H, ptr<scalar_t>(dh) + b * H, ptr<scalar_t>(dc) + b * H,
                                  ptr<scalar_t>(d_gates) + b * G);
      });
    });
    Tensor dz = at::mm(d_gates, w_rec);
    dh_next = dz.narrow(1, RW, H);
    dr_next = dz.narrow(1, 0, RW).reshape({B, R, W});
  }
  Tensor d_out = d_out_all.view({T * B, P}), d_gates = d_gates_all.view({T * B, G});
  Tensor g_w_rec = at::mm(d_gates.t(), sv[kZ].view({T * B, RW + H}));
  Tensor g_w_head = at::mm(d_out.t(), hs.reshape({T * B, H}));
  return {d_gates_all.transpose(0, 1), g_w_rec, g_w_head, d_out.sum(0), dh_next, dc, dm, du, dwr, dr_next};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sequence_forward", &sequence_forward, "MANNSequence forward (see mann/fused.py)");
  m.def("sequence_backward", &sequence_backward, "MANNSequence backward (see mann/fused.py)");
}
