// CPU bottleneck exchange (backend "cpp"): every modality token attends to the K <= 16 bottleneck tokens of its
// sample, through its modality's own projection k_m / v_m. Contract: msa_fast/ops/_cpp_backend.py.
//
// Design (why): with K <= 16 keys the work per query row is tiny (K dot products of length D, a K-wide softmax, K
// axpys of length D), so the general attention kernel's 64-key tiles waste most of their lanes and the eager
// composition pays for materialising (B, H, L, K) score / probability tensors several times. Here one task owns a
// block of query rows of one (modality, batch, head); the whole k / v tile of that (b, h) is held in registers / L1:
//   kt[d]  (KP lanes: one vector per head-dim element, scale folded in) so the scores of a row are D broadcast-FMAs
//          into one KP-lane vector (KP = K rounded up to 4 / 8 / 16, padding lanes masked to -inf);
//   v[j]   (D/16 16-lane vectors per key) so the output row is K broadcast-FMAs;
// and the softmax is one vector exp plus two horizontal reductions. Backward recomputes P from lse (dV = Pᵀ dO,
// dS = P ∘ (dP − delta), dQ = dS K, dK = dSᵀ Q); one task owns every row of one (modality, b, h), so dK / dV are
// accumulated in task-local registers and written once (no atomics, no reduction pass). The list entry points take
// one tensor per modality (no torch.cat of the queries, no split of the outputs) and compute delta = rowsum(dO ∘ O)
// = Σ_j P_j dP_j in the kernel, so the backward needs neither O nor a separate delta pass.
// The fast path is float32 with D ∈ {16, 32, 64} and K <= 16; float64 (gradcheck), other head dims and K > 16 take
// a plain scalar path with the same row semantics.
//
// Row semantics (those of msa_fast.testing.reference.masked_softmax, checked by tests/test_ops_fuzz.py): a padded
// query row, or one whose valid scores are all -inf (e.g. every key padded), gives zeros and lse = +inf; a row with a
// NaN or +inf score on a valid key gives NaN (output and lse; the backward then gives NaN on the valid keys);
// padded keys never matter (their k / v are not read into the tiles).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "cpu_math.h"
#include "poison.h"

namespace msa_fast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kRowBlock = 128;  // forward: query rows per task

// One modality's view of the tensors: element strides between (b, h) slices so that the same code serves the
// per-modality tensors of the list entry points and the segments of the concatenated contract tensors.
template <typename T>
struct Seg {
  const T *q = nullptr, *k = nullptr, *v = nullptr;
  const bool* qv = nullptr;  // (B, ·) query validity, row stride qv_b; null = every row valid
  T* o = nullptr;            // forward output (q's layout)
  T* lse = nullptr;          // forward output / backward input
  const T *dout = nullptr, *delta = nullptr;  // backward inputs (dout: q's layout; delta: lse's layout or null)
  T *dq = nullptr, *dk = nullptr, *dv = nullptr;
  int64_t L = 0;       // query rows per (b, h)
  int64_t q_bh = 0;    // stride of q / o / dout / dq between (b, h) slices
  int64_t kv_bh = 0;   // stride of k / v / dk / dv between (b, h) slices
  int64_t qv_b = 0;    // stride of qv between samples
  int64_t lse_bh = 0;  // stride of lse / delta between (b, h) slices

  // The same view moved to sample b, (b, h) slice bh: every pointer at that slice's first element (null stays null).
  Seg slice(int64_t b, int64_t bh) const {
    const auto at = [](auto* p, int64_t n) { return p != nullptr ? p + n : p; };
    Seg s = *this;
    s.q = at(q, bh * q_bh), s.o = at(o, bh * q_bh), s.dout = at(dout, bh * q_bh), s.dq = at(dq, bh * q_bh);
    s.k = at(k, bh * kv_bh), s.v = at(v, bh * kv_bh), s.dk = at(dk, bh * kv_bh), s.dv = at(dv, bh * kv_bh);
    s.lse = at(lse, bh * lse_bh), s.delta = at(delta, bh * lse_bh);
    s.qv = at(qv, b * qv_b);
    return s;
  }
};

struct Dims {
  int64_t B, H, K, D;
  const bool* kvalid;  // (B, K), null = every key valid
  double scale;
  const bool* key_valid(int64_t b) const { return kvalid != nullptr ? kvalid + b * K : nullptr; }
};

// The per-modality fields both list entry points share: q / k / v of modality m (contiguous (B, H, L_m, D) and
// (B, H, K, D)) and the strides between their (b, h) slices.
template <typename T>
Seg<T> list_segment(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  Seg<T> s;
  s.q = q.data_ptr<T>();
  s.k = k.data_ptr<T>();
  s.v = v.data_ptr<T>();
  s.L = q.size(2);
  s.q_bh = s.L * q.size(3);
  s.kv_bh = k.size(2) * k.size(3);
  s.qv_b = s.L;
  s.lse_bh = s.L;
  return s;
}

// ---- float32 fast path -------------------------------------------------------------------------------------------
typedef float vd __attribute__((vector_size(64)));  // 16 head-dim lanes
template <int N>
struct Vec {
  typedef float f __attribute__((vector_size(N * 4)));
  typedef int i __attribute__((vector_size(N * 4)));
};

inline vd load_d(const float* p) {
  vd x;
  std::memcpy(&x, p, sizeof(vd));
  return x;
}
inline void store_d(float* p, vd x) { std::memcpy(p, &x, sizeof(vd)); }

template <typename V>
inline V splat(float x) {
  return V{} + x;
}

// Horizontal max / sum of a 4 / 8 / 16-lane vector (log-step shuffles).
template <int N>
inline float hmax(typename Vec<N>::f x) {
  if constexpr (N == 16) {
    typename Vec<8>::f a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7);
    typename Vec<8>::f b = __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    return hmax<8>(a > b ? a : b);
  } else if constexpr (N == 8) {
    typename Vec<4>::f a = __builtin_shufflevector(x, x, 0, 1, 2, 3);
    typename Vec<4>::f b = __builtin_shufflevector(x, x, 4, 5, 6, 7);
    return hmax<4>(a > b ? a : b);
  } else {
    static_assert(N == 4);
    typename Vec<4>::f s = __builtin_shufflevector(x, x, 2, 3, 0, 1);
    x = x > s ? x : s;
    s = __builtin_shufflevector(x, x, 1, 0, 3, 2);
    x = x > s ? x : s;
    return x[0];
  }
}
template <int N>
inline float hsum(typename Vec<N>::f x) {
  if constexpr (N == 16) {
    return hsum<8>(__builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15));
  } else if constexpr (N == 8) {
    return hsum<4>(__builtin_shufflevector(x, x, 0, 1, 2, 3) + __builtin_shufflevector(x, x, 4, 5, 6, 7));
  } else {
    static_assert(N == 4);
    x += __builtin_shufflevector(x, x, 2, 3, 0, 1);
    x += __builtin_shufflevector(x, x, 1, 0, 3, 2);
    return x[0];
  }
}

// exp on N lanes for x <= ~0 (and -inf): Cephes-style range reduction x = n ln2 + r, degree-6 polynomial (~1 ulp
// on [-87, 0]); lanes below -87.3 (masked scores, -inf) give exactly 0. NaN lanes give NaN.
template <int N>
inline typename Vec<N>::f vexp(typename Vec<N>::f x) {
  using V = typename Vec<N>::f;
  using VI = typename Vec<N>::i;
  const V lo = splat<V>(-87.3f);
  const V xc = x < lo ? lo : x;
  const V y = xc * 1.44269504088896341f + 0.5f;
  V n = __builtin_convertvector(__builtin_convertvector(y, VI), V);  // truncation toward zero
  n = n > y ? n - 1.0f : n;                                          // floor (y < 0)
  const V r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  const V p = exp_reduced(r);
  const VI e = (__builtin_convertvector(n, VI) + 127) << 23;
  V sc;
  std::memcpy(&sc, &e, sizeof(V));
  return x < lo ? V{} : p * sc;
}

// natural log on 16 lanes for finite x >= 1 (the softmax normaliser: the max lane contributes exp(0) = 1):
// x = 2^e · f, Cephes logf polynomial on f - 1 ∈ [-0.29, 0.41] (~1 ulp). log(1) = 0 exactly.
inline vd vlog(vd x) {
  typedef int vdi __attribute__((vector_size(64)));
  vdi bits;
  std::memcpy(&bits, &x, sizeof(vd));
  vdi e = (bits >> 23) - 126;  // x = 2^e · f with f ∈ [0.5, 1)
  const vdi fb = (bits & 0x7fffff) | 0x3f000000;
  vd f;
  std::memcpy(&f, &fb, sizeof(vd));
  const vdi small = f < 0.707106781186547524f;
  e = small ? e - 1 : e;
  f = small ? f + f - 1.0f : f - 1.0f;
  const vd ef = __builtin_convertvector(e, vd);
  const vd z = f * f;
  vd y = splat<vd>(7.0376836292e-2f);
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += ef * -2.12194440e-4f;
  y -= 0.5f * z;
  return f + y + ef * 0.693359375f;
}

// k / v tile of one (b, h): kt[d] lane j = scale * k[j, d] (0 on padded / masked lanes), keep[j] = lane j is a valid
// key (all bits) or not (0), vr[j] = v row j (0 on padded / masked lanes) as DV 16-lane chunks; kr = unscaled k rows
// (backward, dQ = dS K), vt[d] lane j = v[j, d] (backward, dP = dO Vᵀ).
template <int KP, int DV>
struct Tile {
  static constexpr int D = 16 * DV;
  using V = typename Vec<KP>::f;
  using VI = typename Vec<KP>::i;
  V kt[D];
  VI keep;
  vd vr[KP][DV];

  void load(const float* k, const float* v, int K, const bool* kvalid, float scale) {
    float buf[D][KP];
    std::memset(buf, 0, sizeof(buf));
    int keepb[KP];
    for (int j = 0; j < KP; ++j) {
      const bool ok = j < K && (kvalid == nullptr || kvalid[j]);
      keepb[j] = ok ? -1 : 0;
      for (int c = 0; c < DV; ++c) vr[j][c] = ok ? load_d(v + size_t(j) * D + 16 * c) : vd{};
      if (ok)
        for (int d = 0; d < D; ++d) buf[d][j] = scale * k[size_t(j) * D + d];
    }
    std::memcpy(&keep, keepb, sizeof(VI));
    std::memcpy(kt, buf, sizeof(kt));
  }
};

// Scores of one row: scale * q . k_j on valid lanes, -inf on the others (a select: a masked lane is -inf even when
// its raw score is NaN / inf). Two partial sums shorten the FMA chain.
template <int KP, int DV>
inline typename Vec<KP>::f row_scores(const float* __restrict qi, const typename Vec<KP>::f* kt,
                                      typename Vec<KP>::i keep) {
  using V = typename Vec<KP>::f;
  constexpr int D = 16 * DV;
  V s0 = {}, s1 = {};
  for (int d = 0; d < D; d += 2) {
    s0 += qi[d] * kt[d];
    s1 += qi[d + 1] * kt[d + 1];
  }
  return keep ? s0 + s1 : splat<V>(-kInf);
}

// R consecutive query rows (rows i .. i+R-1 of one (b, h)) in lockstep: the rows are independent, so interleaving
// their FMA / exp chains keeps the core busy (one row alone is latency-bound: ~5 dependent stages).
template <int KP, int DV, int R>
inline void fwd_rows(const Tile<KP, DV>& t, const float* __restrict q, const bool* qv, float* __restrict o,
                     float* __restrict mb, float* __restrict lb, int64_t i) {
  using V = typename Vec<KP>::f;
  constexpr int D = 16 * DV;
  bool valid[R];
  bool any = false;
  for (int r = 0; r < R; ++r) any |= (valid[r] = qv == nullptr || qv[i + r]);
  if (!any) {  // padded rows (ragged lengths: whole groups at the end)
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < DV; ++c) store_d(o + (i + r) * D + 16 * c, vd{});
      mb[r] = kInf;
      lb[r] = 1.0f;
    }
    return;
  }
  const V inf = splat<V>(kInf);
  V s[R], p[R];
  float m[R], l[R];
  for (int r = 0; r < R; ++r) s[r] = row_scores<KP, DV>(q + (i + r) * D, t.kt, t.keep);
  for (int r = 0; r < R; ++r) m[r] = hmax<KP>(s[r] < inf ? s[r] : inf);  // +inf: NaN / +inf score on a valid key
  for (int r = 0; r < R; ++r) p[r] = vexp<KP>(s[r] - (std::abs(m[r]) < kInf ? m[r] : 0.0f));
  for (int r = 0; r < R; ++r) l[r] = hsum<KP>(p[r]);
  vd acc[R][DV] = {};
  for (int j = 0; j < KP; ++j)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < DV; ++c) acc[r][c] += p[r][j] * t.vr[j][c];
  for (int r = 0; r < R; ++r) {
    float* __restrict oi = o + (i + r) * D;
    if (valid[r] && std::abs(m[r]) < kInf) {
      const float inv = 1.0f / l[r];
      for (int c = 0; c < DV; ++c) store_d(oi + 16 * c, acc[r][c] * inv);
      mb[r] = m[r];
      lb[r] = l[r];
    } else {  // padded row or no valid finite key: zeros, lse = +inf; NaN / +inf score: NaN
      const float fill = !valid[r] || m[r] == -kInf ? 0.0f : std::numeric_limits<float>::quiet_NaN();
      for (int c = 0; c < DV; ++c) store_d(oi + 16 * c, splat<vd>(fill));
      mb[r] = fill == 0.0f ? kInf : fill;
      lb[r] = 1.0f;
    }
  }
}

template <int KP, int DV>
void fwd_block_f32(const Seg<float>& all, const Dims& dm, int64_t b, int64_t bh, int64_t r0, int64_t r1) {
  constexpr int R = 4;
  const Seg<float> sg = all.slice(b, bh);
  const float *q = sg.q, *k = sg.k, *v = sg.v;
  const bool* qv = sg.qv;
  float *o = sg.o, *lse = sg.lse;
  Tile<KP, DV> t;
  t.load(k, v, int(dm.K), dm.key_valid(b), float(dm.scale));
  // lse = m + log(l) in one vectorised pass after the rows (a scalar logf per row costs ~15% of the forward);
  // special rows carry (m, l) = (+inf, 1) → lse = +inf, or (NaN, 1) → NaN
  static_assert(kRowBlock % 16 == 0);
  float mb[kRowBlock], lb[kRowBlock];
  int64_t i = r0;
  for (; i + R <= r1; i += R) fwd_rows<KP, DV, R>(t, q, qv, o, mb + (i - r0), lb + (i - r0), i);
  for (; i < r1; ++i) fwd_rows<KP, DV, 1>(t, q, qv, o, mb + (i - r0), lb + (i - r0), i);
  const int n = int(r1 - r0);
  for (int r = n; r < (n + 15) / 16 * 16; ++r) mb[r] = lb[r] = 1.0f;
  for (int r = 0; r < n; r += 16) {
    const vd x = load_d(mb + r) + vlog(load_d(lb + r));
    std::memcpy(lse + r0 + r, &x, sizeof(float) * size_t(std::min(16, n - r)));
  }
}

// Backward of R consecutive rows in lockstep; dK / dV of the (b, h) accumulate into dk / dv. A row with lse = +inf
// (padded query row / no valid key) has P = 0: dQ row 0 and no contribution (its q / dout are not used, so NaN in
// a padded row's q changes nothing).
template <int KP, int DV, int R>
inline void bwd_rows(const Tile<KP, DV>& t, const typename Vec<KP>::f* vt, const float* __restrict q,
                     const float* __restrict g, const float* __restrict lse, const float* __restrict delta,
                     float* __restrict dq, float scale, vd (&dk)[KP][DV], vd (&dv)[KP][DV], int64_t i) {
  using V = typename Vec<KP>::f;
  constexpr int D = 16 * DV;
  bool live[R];
  bool any = false;
  for (int r = 0; r < R; ++r) any |= (live[r] = lse[i + r] != kInf);
  if (!any) {
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < DV; ++c) store_d(dq + (i + r) * D + 16 * c, vd{});
    return;
  }
  const V nan = splat<V>(std::numeric_limits<float>::quiet_NaN());
  V p[R], ds[R];
  for (int r = 0; r < R; ++r) {
    const V s = row_scores<KP, DV>(q + (i + r) * D, t.kt, t.keep);
    const float li = lse[i + r];
    // NaN row (a NaN / +inf score in forward): NaN on the valid keys, 0 on masked ones (the reference's masked_fill)
    p[r] = !live[r] ? V{} : li != li ? (t.keep ? nan : V{}) : vexp<KP>(s - li);
  }
  for (int r = 0; r < R; ++r) {
    const float* __restrict gi = g + (i + r) * D;
    V g0 = {}, g1 = {};
    for (int d = 0; d < D; d += 2) {
      g0 += gi[d] * vt[d];
      g1 += gi[d + 1] * vt[d + 1];
    }
    const V dp = g0 + g1;
    const float di = delta != nullptr ? delta[i + r] : hsum<KP>(p[r] * dp);
    // masked / padding lanes and dead rows: dS = 0 (also on a NaN row, whose delta is NaN)
    ds[r] = t.keep && live[r] ? p[r] * (dp - di) * scale : V{};
  }
  vd qr[R][DV], gr[R][DV], acc[R][DV] = {};
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) {
      qr[r][c] = live[r] ? load_d(q + (i + r) * D + 16 * c) : vd{};
      gr[r][c] = live[r] ? load_d(g + (i + r) * D + 16 * c) : vd{};
    }
  for (int j = 0; j < KP; ++j)
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < DV; ++c) {
        acc[r][c] += ds[r][j] * t.vr[j][c];
        dk[j][c] += ds[r][j] * qr[r][c];
        dv[j][c] += p[r][j] * gr[r][c];
      }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < DV; ++c) store_d(dq + (i + r) * D + 16 * c, live[r] ? acc[r][c] : vd{});
}

template <int KP, int DV>
void bwd_slice_f32(const Seg<float>& all, const Dims& dm, int64_t b, int64_t bh) {
  using V = typename Vec<KP>::f;
  constexpr int D = 16 * DV, R = 4, CHUNK = 64;  // dK / dV: per-chunk partial sums, then summed (two-level sum)
  const Seg<float> sg = all.slice(b, bh);
  const float *q = sg.q, *dout = sg.dout, *lse = sg.lse, *delta = sg.delta, *k = sg.k, *v = sg.v;
  float* dq = sg.dq;
  const bool* kvalid = dm.key_valid(b);
  const int K = int(dm.K);
  const float scale = float(dm.scale);
  Tile<KP, DV> t;  // kt (scores), keep; vr is reused for the unscaled k rows (dQ = dS K)
  t.load(k, v, K, kvalid, scale);
  V vt[D];
  {
    float buf[D][KP];
    std::memset(buf, 0, sizeof(buf));
    for (int j = 0; j < K; ++j)
      if (kvalid == nullptr || kvalid[j]) {
        for (int d = 0; d < D; ++d) buf[d][j] = v[size_t(j) * D + d];
        for (int c = 0; c < DV; ++c) t.vr[j][c] = load_d(k + size_t(j) * D + 16 * c);
      }
    std::memcpy(vt, buf, sizeof(vt));
  }
  vd dk[KP][DV] = {}, dv[KP][DV] = {};
  for (int64_t c0 = 0; c0 < sg.L; c0 += CHUNK) {
    const int64_t c1 = std::min(sg.L, c0 + CHUNK);
    vd pk[KP][DV] = {}, pv[KP][DV] = {};
    int64_t i = c0;
    for (; i + R <= c1; i += R) bwd_rows<KP, DV, R>(t, vt, q, dout, lse, delta, dq, scale, pk, pv, i);
    for (; i < c1; ++i) bwd_rows<KP, DV, 1>(t, vt, q, dout, lse, delta, dq, scale, pk, pv, i);
    for (int j = 0; j < KP; ++j)
      for (int c = 0; c < DV; ++c) {
        dk[j][c] += pk[j][c];
        dv[j][c] += pv[j][c];
      }
  }
  float *dkp = sg.dk, *dvp = sg.dv;
  for (int j = 0; j < K; ++j)
    for (int c = 0; c < DV; ++c) {
      store_d(dkp + size_t(j) * D + 16 * c, dk[j][c]);
      store_d(dvp + size_t(j) * D + 16 * c, dv[j][c]);
    }
}

// ---- generic path (float64, other head dims, K > 16) -------------------------------------------------------------
template <typename T>
inline T exp_t(T x) {
  return std::exp(x);
}

template <typename T>
void fwd_block_generic(const Seg<T>& all, const Dims& dm, int64_t b, int64_t bh, int64_t r0, int64_t r1,
                       std::vector<T>& s) {
  const int64_t K = dm.K, D = dm.D;
  const T inf = std::numeric_limits<T>::infinity();
  const Seg<T> sg = all.slice(b, bh);
  const T *q = sg.q, *k = sg.k, *v = sg.v;
  T *o = sg.o, *lse = sg.lse;
  const bool* qv = sg.qv;
  const bool* kv = dm.key_valid(b);
  s.resize(size_t(K));
  for (int64_t i = r0; i < r1; ++i) {
    const T* qi = q + i * D;
    T* oi = o + i * D;
    if (qv != nullptr && !qv[i]) {
      std::fill(oi, oi + D, T(0));
      lse[i] = inf;
      continue;
    }
    T m = -inf;
    for (int64_t j = 0; j < K; ++j) {
      if (kv != nullptr && !kv[j]) {
        s[j] = -inf;
        continue;
      }
      T acc = T(0);
      for (int64_t d = 0; d < D; ++d) acc += qi[d] * k[j * D + d];
      s[j] = acc * T(dm.scale);
      const T sj = s[j] < inf ? s[j] : inf;  // NaN / +inf → +inf (a bad row)
      m = sj > m ? sj : m;
    }
    if (!(m < inf) || m == -inf) {
      const T fill = m == -inf ? T(0) : std::numeric_limits<T>::quiet_NaN();
      std::fill(oi, oi + D, fill);
      lse[i] = m == -inf ? inf : fill;
      continue;
    }
    std::fill(oi, oi + D, T(0));
    T l = T(0);
    for (int64_t j = 0; j < K; ++j) {
      if (kv != nullptr && !kv[j]) continue;  // a padded key's v is never read
      const T p = exp_t<T>(s[j] - m);
      l += p;
      for (int64_t d = 0; d < D; ++d) oi[d] += p * v[j * D + d];
    }
    const T inv = T(1) / l;
    for (int64_t d = 0; d < D; ++d) oi[d] *= inv;
    lse[i] = m + std::log(l);
  }
}

template <typename T>
void bwd_slice_generic(const Seg<T>& all, const Dims& dm, int64_t b, int64_t bh, std::vector<T>& buf) {
  const int64_t K = dm.K, D = dm.D;
  const T inf = std::numeric_limits<T>::infinity();
  const T scale = T(dm.scale);
  const Seg<T> sg = all.slice(b, bh);
  const T *q = sg.q, *g = sg.dout, *lse = sg.lse, *delta = sg.delta, *k = sg.k, *v = sg.v;
  T *dq = sg.dq, *dk = sg.dk, *dv = sg.dv;
  const bool* kv = dm.key_valid(b);
  std::fill(dk, dk + K * D, T(0));
  std::fill(dv, dv + K * D, T(0));
  buf.assign(size_t(2 * K + 2 * K * D), T(0));
  T* p = buf.data();
  T* ds = p + K;
  T* pk = ds + K;  // per-chunk partial dK / dV (two-level sum over the rows)
  T* pv = pk + K * D;
  constexpr int64_t CHUNK = 64;
  for (int64_t i = 0; i < sg.L; ++i) {
    if (i % CHUNK == 0 && i > 0) {
      for (int64_t e = 0; e < K * D; ++e) {
        dk[e] += pk[e];
        dv[e] += pv[e];
        pk[e] = pv[e] = T(0);
      }
    }
    const T* qi = q + i * D;
    const T* gi = g + i * D;
    T* dqi = dq + i * D;
    std::fill(dqi, dqi + D, T(0));
    const T li = lse[i];
    if (li == inf) continue;
    T dsum = T(0);
    for (int64_t j = 0; j < K; ++j) {
      if (kv != nullptr && !kv[j]) {
        p[j] = ds[j] = T(0);
        continue;
      }
      T acc = T(0), dp = T(0);
      for (int64_t d = 0; d < D; ++d) {
        acc += qi[d] * k[j * D + d];
        dp += gi[d] * v[j * D + d];
      }
      p[j] = li != li ? std::numeric_limits<T>::quiet_NaN() : exp_t<T>(acc * scale - li);
      ds[j] = dp;
      dsum += p[j] * dp;
    }
    const T di = delta != nullptr ? delta[i] : dsum;
    for (int64_t j = 0; j < K; ++j) {
      if (kv != nullptr && !kv[j]) continue;
      const T dsj = p[j] * (ds[j] - di) * scale;
      for (int64_t d = 0; d < D; ++d) {
        dqi[d] += dsj * k[j * D + d];
        pk[j * D + d] += dsj * qi[d];
        pv[j * D + d] += p[j] * gi[d];
      }
    }
  }
  for (int64_t e = 0; e < K * D; ++e) {
    dk[e] += pk[e];
    dv[e] += pv[e];
  }
}

// ---- drivers -----------------------------------------------------------------------------------------------------
template <typename F>
bool with_fast(int64_t K, int64_t D, F&& f) {
  auto by_d = [&](auto kp) -> bool {
    constexpr int KP = decltype(kp)::value;
    switch (D) {
      case 16: f(std::integral_constant<int, KP>{}, std::integral_constant<int, 1>{}); return true;
      case 32: f(std::integral_constant<int, KP>{}, std::integral_constant<int, 2>{}); return true;
      case 64: f(std::integral_constant<int, KP>{}, std::integral_constant<int, 4>{}); return true;
      default: return false;
    }
  };
  if (K <= 4) return by_d(std::integral_constant<int, 4>{});
  if (K <= 8) return by_d(std::integral_constant<int, 8>{});
  if (K <= 16) return by_d(std::integral_constant<int, 16>{});
  return false;
}

template <typename T>
void run_forward(const std::vector<Seg<T>>& segs, const Dims& dm) {
  const int64_t BH = dm.B * dm.H;
  std::vector<int64_t> blk_seg, blk_start;  // row blocks of one (b, h), all modalities
  for (int64_t m = 0; m < int64_t(segs.size()); ++m)
    for (int64_t r = 0; r < segs[m].L; r += kRowBlock) {
      blk_seg.push_back(m);
      blk_start.push_back(r);
    }
  const int64_t nb = int64_t(blk_seg.size());
  if (nb == 0 || BH == 0) return;
  bool fast = false;
  if constexpr (std::is_same_v<T, float>) fast = with_fast(dm.K, dm.D, [](auto, auto) {});
#pragma omp parallel
  {
    std::vector<T> scratch;
#pragma omp for schedule(dynamic, 4)
    for (int64_t task = 0; task < BH * nb; ++task) {
      const int64_t bh = task / nb, blk = task % nb, b = bh / dm.H;
      const Seg<T>& sg = segs[blk_seg[blk]];
      const int64_t r0 = blk_start[blk], r1 = std::min(sg.L, r0 + kRowBlock);
      if constexpr (std::is_same_v<T, float>) {
        if (fast) {
          with_fast(dm.K, dm.D, [&](auto kp, auto dv) {
            fwd_block_f32<decltype(kp)::value, decltype(dv)::value>(sg, dm, b, bh, r0, r1);
          });
          continue;
        }
      }
      fwd_block_generic<T>(sg, dm, b, bh, r0, r1, scratch);
    }
  }
}

template <typename T>
void run_backward(const std::vector<Seg<T>>& segs, const Dims& dm) {
  const int64_t BH = dm.B * dm.H, M = int64_t(segs.size());
  bool fast = false;
  if constexpr (std::is_same_v<T, float>) fast = with_fast(dm.K, dm.D, [](auto, auto) {});
#pragma omp parallel
  {
    std::vector<T> scratch;
#pragma omp for schedule(dynamic, 2)
    for (int64_t task = 0; task < BH * M; ++task) {
      const int64_t bh = task / M, b = bh / dm.H;
      const Seg<T>& sg = segs[task % M];
      if constexpr (std::is_same_v<T, float>) {
        if (fast) {
          with_fast(dm.K, dm.D, [&](auto kp, auto dv) {
            bwd_slice_f32<decltype(kp)::value, decltype(dv)::value>(sg, dm, b, bh);
          });
          continue;
        }
      }
      bwd_slice_generic<T>(sg, dm, b, bh, scratch);
    }
  }
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_key_valid(const std::optional<torch::Tensor>& kv, int64_t B, int64_t K) {
  if (!kv.has_value() || !kv->defined()) return;
  check(*kv, "key_valid");
  TORCH_CHECK(kv->scalar_type() == torch::kBool && kv->dim() == 2 && kv->size(0) == B && kv->size(1) == K,
              "key_valid must be bool (B, K)");
}

const bool* opt_bool(const std::optional<torch::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<bool>() : nullptr;
}

}  // namespace

// ---- concatenated contract (OPS_CONTRACT.md): q (B,H,Lq,D) with M segments, k/v (B,H,M,K,D) ----------------------
std::vector<torch::Tensor> bottleneck_forward(torch::Tensor q, std::vector<int64_t> offsets, torch::Tensor k,
                                              torch::Tensor v, torch::Tensor key_valid,
                                              std::optional<torch::Tensor> q_valid, double scale) {
  for (const auto& [t, n] : {std::pair{q, "q"}, std::pair{k, "k"}, std::pair{v, "v"}}) check(t, n);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 5 && v.sizes() == k.sizes(), "q must be (B,H,Lq,D), k/v (B,H,M,K,D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), M = k.size(2), K = k.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(4) == D, "k must be (B, H, M, K, D)");
  TORCH_CHECK(int64_t(offsets.size()) == M + 1 && offsets.front() == 0 && offsets.back() == Lq,
              "q_offsets must have M+1 entries running 0..Lq");
  for (int64_t m = 0; m < M; ++m) TORCH_CHECK(offsets[m] <= offsets[m + 1], "q_offsets must be non-decreasing");
  const std::optional<torch::Tensor> kv{key_valid};
  check_key_valid(kv, B, K);
  const bool has_qv = q_valid.has_value() && q_valid->defined();
  if (has_qv) {
    check(*q_valid, "q_valid");
    TORCH_CHECK(q_valid->scalar_type() == torch::kBool && q_valid->numel() == B * Lq, "q_valid must be bool (B, Lq)");
  }
  auto out = maybe_poison(torch::empty_like(q));
  auto lse = maybe_poison(torch::empty({B, H, Lq}, q.options()));
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    std::vector<Seg<T>> segs(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) {
      Seg<T>& s = segs[m];
      s.q = q.data_ptr<T>() + offsets[m] * D;
      s.o = out.data_ptr<T>() + offsets[m] * D;
      s.k = k.data_ptr<T>() + m * K * D;
      s.v = v.data_ptr<T>() + m * K * D;
      s.qv = has_qv ? q_valid->data_ptr<bool>() + offsets[m] : nullptr;
      s.lse = lse.data_ptr<T>() + offsets[m];
      s.L = offsets[m + 1] - offsets[m];
      s.q_bh = Lq * D;
      s.kv_bh = M * K * D;
      s.qv_b = Lq;
      s.lse_bh = Lq;
    }
    run_forward<T>(segs, Dims{B, H, K, D, opt_bool(kv), scale});
  });
  return {out, lse};
}

std::vector<torch::Tensor> bottleneck_backward(torch::Tensor q, std::vector<int64_t> offsets, torch::Tensor k,
                                               torch::Tensor v, torch::Tensor key_valid, torch::Tensor lse,
                                               torch::Tensor delta, torch::Tensor dout, double scale) {
  for (const auto& [t, n] : {std::pair{q, "q"}, std::pair{k, "k"}, std::pair{v, "v"}, std::pair{lse, "lse"},
                             std::pair{delta, "delta"}, std::pair{dout, "dout"}})
    check(t, n);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 5 && v.sizes() == k.sizes(), "q must be (B,H,Lq,D), k/v (B,H,M,K,D)");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), M = k.size(2), K = k.size(3);
  TORCH_CHECK(int64_t(offsets.size()) == M + 1 && offsets.front() == 0 && offsets.back() == Lq,
              "q_offsets must run 0..Lq");
  TORCH_CHECK(lse.numel() == B * H * Lq && delta.numel() == B * H * Lq, "lse/delta must be (B, H, Lq)");
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout must match q");
  for (const auto& t : {k, v, lse, delta, dout})
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "q, k, v, lse, delta, dout dtypes differ");
  const std::optional<torch::Tensor> kv{key_valid};
  check_key_valid(kv, B, K);
  auto dq = maybe_poison(torch::empty_like(q));
  auto dk = maybe_poison(torch::empty_like(k));
  auto dv = maybe_poison(torch::empty_like(v));
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    std::vector<Seg<T>> segs(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) {
      Seg<T>& s = segs[m];
      s.q = q.data_ptr<T>() + offsets[m] * D;
      s.dout = dout.data_ptr<T>() + offsets[m] * D;
      s.dq = dq.data_ptr<T>() + offsets[m] * D;
      s.k = k.data_ptr<T>() + m * K * D;
      s.v = v.data_ptr<T>() + m * K * D;
      s.dk = dk.data_ptr<T>() + m * K * D;
      s.dv = dv.data_ptr<T>() + m * K * D;
      s.lse = lse.data_ptr<T>() + offsets[m];
      s.delta = delta.data_ptr<T>() + offsets[m];
      s.L = offsets[m + 1] - offsets[m];
      s.q_bh = Lq * D;
      s.kv_bh = M * K * D;
      s.lse_bh = Lq;
    }
    run_backward<T>(segs, Dims{B, H, K, D, opt_bool(kv), scale});
  });
  return {dq, dk, dv};
}

// ---- one tensor per modality: qs[m] (B,H,L_m,D), ks[m] / vs[m] (B,H,K,D), q_valids[m] (B,L_m) bool or None -------
// → outs (M) then lses (M, each (B,H,L_m)).
std::vector<torch::Tensor> bottleneck_forward_list(std::vector<torch::Tensor> qs, std::vector<torch::Tensor> ks,
                                                   std::vector<torch::Tensor> vs,
                                                   std::optional<torch::Tensor> key_valid,
                                                   std::vector<std::optional<torch::Tensor>> q_valids,
                                                   double scale) {
  const int64_t M = int64_t(qs.size());
  TORCH_CHECK(M > 0 && int64_t(ks.size()) == M && int64_t(vs.size()) == M, "qs, ks, vs must have M > 0 entries");
  TORCH_CHECK(q_valids.empty() || int64_t(q_valids.size()) == M, "q_valids must be empty or have M entries");
  const int64_t B = qs[0].size(0), H = qs[0].size(1), D = qs[0].size(3), K = ks[0].size(2);
  const auto dt = qs[0].scalar_type();
  for (int64_t m = 0; m < M; ++m) {
    check(qs[m], "qs[m]");
    check(ks[m], "ks[m]");
    check(vs[m], "vs[m]");
    TORCH_CHECK(qs[m].dim() == 4 && qs[m].size(0) == B && qs[m].size(1) == H && qs[m].size(3) == D,
                "qs[m] must be (B, H, L_m, D)");
    TORCH_CHECK(ks[m].dim() == 4 && ks[m].size(0) == B && ks[m].size(1) == H && ks[m].size(2) == K &&
                    ks[m].size(3) == D && vs[m].sizes() == ks[m].sizes(),
                "ks[m], vs[m] must be (B, H, K, D)");
    TORCH_CHECK(qs[m].scalar_type() == dt && ks[m].scalar_type() == dt && vs[m].scalar_type() == dt,
                "q, k, v dtypes differ");
    if (!q_valids.empty() && q_valids[m].has_value() && q_valids[m]->defined()) {
      check(*q_valids[m], "q_valids[m]");
      TORCH_CHECK(q_valids[m]->scalar_type() == torch::kBool && q_valids[m]->numel() == B * qs[m].size(2),
                  "q_valids[m] must be bool (B, L_m)");
    }
  }
  check_key_valid(key_valid, B, K);
  std::vector<torch::Tensor> res(static_cast<size_t>(2 * M));
  for (int64_t m = 0; m < M; ++m) {
    res[m] = maybe_poison(torch::empty_like(qs[m]));
    res[M + m] = maybe_poison(torch::empty({B, H, qs[m].size(2)}, qs[m].options()));
  }
  dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    std::vector<Seg<T>> segs(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) {
      Seg<T>& s = segs[m] = list_segment<T>(qs[m], ks[m], vs[m]);
      s.o = res[m].data_ptr<T>();
      s.lse = res[M + m].data_ptr<T>();
      s.qv = q_valids.empty() ? nullptr : opt_bool(q_valids[m]);
    }
    run_forward<T>(segs, Dims{B, H, K, D, opt_bool(key_valid), scale});
  });
  return res;
}

// → dqs (M), dks (M), dvs (M). delta = rowsum(dout ∘ out) is computed in the kernel (as Σ_j P_j dP_j).
std::vector<torch::Tensor> bottleneck_backward_list(std::vector<torch::Tensor> qs, std::vector<torch::Tensor> ks,
                                                    std::vector<torch::Tensor> vs,
                                                    std::optional<torch::Tensor> key_valid,
                                                    std::vector<torch::Tensor> lses,
                                                    std::vector<torch::Tensor> douts, double scale) {
  const int64_t M = int64_t(qs.size());
  TORCH_CHECK(M > 0 && int64_t(ks.size()) == M && int64_t(vs.size()) == M && int64_t(lses.size()) == M &&
                  int64_t(douts.size()) == M,
              "qs, ks, vs, lses, douts must have M > 0 entries");
  const int64_t B = qs[0].size(0), H = qs[0].size(1), D = qs[0].size(3), K = ks[0].size(2);
  const auto dt = qs[0].scalar_type();
  for (int64_t m = 0; m < M; ++m) {
    for (const auto& [t, n] : {std::pair{qs[m], "qs[m]"}, std::pair{ks[m], "ks[m]"}, std::pair{vs[m], "vs[m]"},
                               std::pair{lses[m], "lses[m]"}, std::pair{douts[m], "douts[m]"}}) {
      check(t, n);
      TORCH_CHECK(t.scalar_type() == dt, n, " has another dtype than qs[0]");
    }
    TORCH_CHECK(qs[m].dim() == 4 && qs[m].size(0) == B && qs[m].size(1) == H && qs[m].size(3) == D,
                "qs[m] must be (B, H, L_m, D)");
    TORCH_CHECK(ks[m].dim() == 4 && ks[m].size(0) == B && ks[m].size(1) == H && ks[m].size(2) == K &&
                    ks[m].size(3) == D && vs[m].sizes() == ks[m].sizes(),
                "ks[m], vs[m] must be (B, H, K, D)");
    TORCH_CHECK(douts[m].sizes() == qs[m].sizes(), "douts[m] must match qs[m]");
    TORCH_CHECK(lses[m].numel() == B * H * qs[m].size(2), "lses[m] must be (B, H, L_m)");
  }
  check_key_valid(key_valid, B, K);
  std::vector<torch::Tensor> res(static_cast<size_t>(3 * M));
  for (int64_t m = 0; m < M; ++m) {
    res[m] = maybe_poison(torch::empty_like(qs[m]));
    res[M + m] = maybe_poison(torch::empty_like(ks[m]));
    res[2 * M + m] = maybe_poison(torch::empty_like(vs[m]));
  }
  dispatch_float(dt, [&](auto tag) {
    using T = decltype(tag);
    std::vector<Seg<T>> segs(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) {
      Seg<T>& s = segs[m] = list_segment<T>(qs[m], ks[m], vs[m]);
      s.lse = lses[m].data_ptr<T>();
      s.dout = douts[m].data_ptr<T>();
      s.dq = res[m].data_ptr<T>();
      s.dk = res[M + m].data_ptr<T>();
      s.dv = res[2 * M + m].data_ptr<T>();
    }
    run_backward<T>(segs, Dims{B, H, K, D, opt_bool(key_valid), scale});
  });
  return res;
}

}  // namespace msa_fast
