// CPU kernels of msa_fast's fused ops (backend "cpp"); the contract is OPS_CONTRACT.md / msa_fast/ops/_cpp_backend.py.
//
// Design (why): MSA attention has short head dims (12..64) and moderate lengths (50..600), so the cost is in the
// score matrix traffic of the eager composition, not in FLOPs. Each task owns a block of BM query rows of one
// (batch, head) and streams the keys in blocks of BN with an online softmax (never an (Lq, Lk) matrix). Keys of a
// block are transposed into a (D, BN) buffer so the score loop runs over BN contiguous lanes (vectorises without
// horizontal reductions). Accumulation is in float for fp32 inputs, double for fp64 (gradcheck).
// OpenMP: forward over (B*H) x query blocks; backward over B*H (dq rows and dk/dv blocks of one (b, h) are then
// owned by one thread: no races, no atomics).
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "counter_rng.h"
#include "cpu_math.h"
#include "poison.h"

namespace msa_fast {
torch::Tensor dropout_apply(torch::Tensor x, double p, int64_t seed);  // dropout_cpu.cpp
std::vector<torch::Tensor> expert_mixture_forward(torch::Tensor x, torch::Tensor gates, torch::Tensor w1,
                                                  torch::Tensor b1, torch::Tensor w2, torch::Tensor b2,
                                                  bool gelu);  // expert_mixture_cpu.cpp
std::vector<torch::Tensor> expert_mixture_backward(torch::Tensor x, torch::Tensor gates, torch::Tensor w1,
                                                   torch::Tensor b1, torch::Tensor w2, torch::Tensor b2,
                                                   torch::Tensor z, torch::Tensor dout, bool gelu);
std::vector<torch::Tensor> expert_mixture_topk_forward(torch::Tensor x, torch::Tensor idx, torch::Tensor wt,
                                                       torch::Tensor w1, torch::Tensor b1, torch::Tensor w2,
                                                       torch::Tensor b2, bool gelu);
std::vector<torch::Tensor> expert_mixture_topk_backward(torch::Tensor x, torch::Tensor wt, torch::Tensor w1,
                                                        torch::Tensor w2, torch::Tensor order, torch::Tensor pos,
                                                        torch::Tensor offsets, torch::Tensor z, torch::Tensor y,
                                                        torch::Tensor dout, bool gelu);
std::vector<torch::Tensor> row_topk(torch::Tensor s, std::vector<int64_t> bounds, int64_t k,
                                    bool largest);  // partners_cpu.cpp
// bottleneck_cpu.cpp: concatenated contract (q (B,H,Lq,D) in M segments, k/v (B,H,M,K,D)) and one tensor per modality
std::vector<torch::Tensor> bottleneck_forward(torch::Tensor q, std::vector<int64_t> offsets, torch::Tensor k,
                                              torch::Tensor v, torch::Tensor key_valid,
                                              std::optional<torch::Tensor> q_valid, double scale);
std::vector<torch::Tensor> bottleneck_backward(torch::Tensor q, std::vector<int64_t> offsets, torch::Tensor k,
                                               torch::Tensor v, torch::Tensor key_valid, torch::Tensor lse,
                                               torch::Tensor delta, torch::Tensor dout, double scale);
std::vector<torch::Tensor> bottleneck_forward_list(std::vector<torch::Tensor> qs, std::vector<torch::Tensor> ks,
                                                   std::vector<torch::Tensor> vs,
                                                   std::optional<torch::Tensor> key_valid,
                                                   std::vector<std::optional<torch::Tensor>> q_valids,
                                                   double scale);
std::vector<torch::Tensor> bottleneck_backward_list(std::vector<torch::Tensor> qs, std::vector<torch::Tensor> ks,
                                                    std::vector<torch::Tensor> vs,
                                                    std::optional<torch::Tensor> key_valid,
                                                    std::vector<torch::Tensor> lses,
                                                    std::vector<torch::Tensor> douts, double scale);
}  // namespace msa_fast

namespace {

constexpr int BM = 64;  // query rows per tile (MSA text length 50 fits one tile)
constexpr int BN = 64;  // keys per tile

template <typename T>
constexpr T neg_inf() { return -std::numeric_limits<T>::infinity(); }
template <typename T>
constexpr T pos_inf() { return std::numeric_limits<T>::infinity(); }

// Per-thread scratch for one (BM x BN) tile.
template <typename T>
struct Scratch {
  std::vector<T> kt, vt, s, dp;
  explicit Scratch(int D)
      : kt(size_t(std::max(D, BM)) * BN), vt(size_t(std::max(D, BM)) * BN), s(BM * BN), dp(BM * BN) {}
};

// exp that GCC vectorises (libm's expf is a scalar call): Cephes-style range reduction x = n ln2 + r and a degree-6
// polynomial, ~1 ulp on [-87, 88]; inputs below -87.3 (masked scores, -inf) give exactly 0. Inputs here are <= ~0.
inline float vexp(float x) {
  const float xc = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  const float p = msa_fast::exp_reduced(r);
  const float scale = __builtin_bit_cast(float, (static_cast<int>(n) + 127) << 23);
  return x < -87.3f ? 0.0f : p * scale;
}
inline double vexp(double x) { return std::exp(x); }  // fp64 is for gradcheck: exactness over speed

// Attention dropout on the probabilities (counter RNG, csrc/counter_rng.h): element (row r, key j) of a call has
// counter r * Lk + j with r = bh * Lq + query row, so forward and backward (and every thread / tile split) draw the
// same keep-bit without storing a mask. `base` = counter of the row's first lane; `stride` = Lk (counters per row).
struct Dropout {
  msa_fast::RngKey key;
  uint32_t threshold;
  double inv_keep;  // 1 / (1 - p)
  uint64_t stride;
  Dropout(uint64_t seed, double p, uint64_t lk)
      : key(seed), threshold(msa_fast::keep_threshold(p)), inv_keep(1.0 / (1.0 - p)), stride(lk) {}
};

// z[j] = keep(base + j) / (1 - p) for the BN lanes of one tile row.
template <typename T>
inline void dropout_scales(const Dropout& d, uint64_t base, T* __restrict z) {
  const T inv = T(d.inv_keep);
  const uint32_t thr = d.threshold;
  if ((base >> 32) == ((base + BN - 1) >> 32)) {  // common case: one high word for the whole row (vectorises)
    const uint32_t hw = d.key.hi_word(uint32_t(base >> 32)), lo = uint32_t(base);
    for (int j = 0; j < BN; ++j) z[j] = d.key.bits(lo + uint32_t(j), hw) >= thr ? inv : T(0);
  } else {
    for (int j = 0; j < BN; ++j) z[j] = d.key.bits64(base + uint64_t(j)) >= thr ? inv : T(0);
  }
}

// The 8 x 8 float block at src (row stride ls) transposed into dst (row stride ld), in registers: three shuffle
// stages (pairs of floats, pairs of pairs, 128-bit halves). The scalar element-by-element transposes it replaces
// took 8-12 % of the forward and more of the backward (perf, D 32).
inline void transpose8x8(const float* __restrict src, size_t ls, float* __restrict dst, size_t ld) {
  typedef float v8 __attribute__((vector_size(32), aligned(4)));
  typedef int v8i __attribute__((vector_size(32)));
  v8 r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = *reinterpret_cast<const v8*>(src + i * ls);
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shuffle(r[i], r[i + 1], v8i{0, 8, 1, 9, 4, 12, 5, 13});
    t[i + 1] = __builtin_shuffle(r[i], r[i + 1], v8i{2, 10, 3, 11, 6, 14, 7, 15});
  }
  for (int h = 0; h < 8; h += 4)
    for (int p = 0; p < 2; ++p) {
      u[h + 2 * p] = __builtin_shuffle(t[h + p], t[h + p + 2], v8i{0, 1, 8, 9, 4, 5, 12, 13});
      u[h + 2 * p + 1] = __builtin_shuffle(t[h + p], t[h + p + 2], v8i{2, 3, 10, 11, 6, 7, 14, 15});
    }
  for (int c = 0; c < 4; ++c) {  // u[c] holds columns c and c + 4 of rows 0-3, u[c + 4] of rows 4-7
    *reinterpret_cast<v8*>(dst + c * ld) = __builtin_shuffle(u[c], u[c + 4], v8i{0, 1, 2, 3, 8, 9, 10, 11});
    *reinterpret_cast<v8*>(dst + (c + 4) * ld) = __builtin_shuffle(u[c], u[c + 4], v8i{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

// dst (cols x ld) = src (rows x ls) transposed for rows [0, n); 8 x 8 register blocks where both extents allow.
template <typename T>
inline void transpose_rows(const T* __restrict src, size_t ls, int n, int cols, T* __restrict dst, size_t ld) {
  int i0 = 0;
  if constexpr (std::is_same_v<T, float>) {
    if (cols % 8 == 0)
      for (; i0 + 8 <= n; i0 += 8)
        for (int c = 0; c < cols; c += 8) transpose8x8(src + i0 * ls + c, ls, dst + size_t(c) * ld + i0, ld);
  }
  for (int i = i0; i < n; ++i)
    for (int c = 0; c < cols; ++c) dst[size_t(c) * ld + i] = src[i * ls + c];
}

// dst (D x BN) = src rows [0, nb) transposed, zero padded to BN columns.
template <typename T>
inline void transpose_block(const T* __restrict src, int nb, int D, T* __restrict dst) {
  transpose_rows(src, size_t(D), nb, D, dst, size_t(BN));
  if (nb < BN)
    for (int d = 0; d < D; ++d) std::fill(dst + size_t(d) * BN + nb, dst + size_t(d + 1) * BN, T(0));
}

// Key-validity bias for a key block: 0 for valid keys, -inf for masked keys and the padding lanes [nb, BN).
template <typename T>
inline bool key_bias(const bool* kvalid, int nb, T* bias) {
  bool any = false;
  for (int j = 0; j < BN; ++j) {
    const bool ok = j < nb && kvalid[j];
    bias[j] = ok ? T(0) : neg_inf<T>();
    any |= ok;
  }
  return any;
}

// s (nr x BN) = scale * q[rows] . kt + bias  (kt: D x BN). DC > 0: head dim known at compile time.
template <typename T, int DC>
inline void tile_dot(const T* __restrict q, int nr, const T* __restrict kt, int Drt, T scale,
                     const T* __restrict bias, T* __restrict s) {
  const int D = DC > 0 ? DC : Drt;
  for (int i = 0; i < nr; ++i) {
    T acc[BN];
    for (int j = 0; j < BN; ++j) acc[j] = T(0);
    const T* qi = q + size_t(i) * D;
    for (int d = 0; d < D; ++d) {
      const T qd = qi[d];
      const T* kr = kt + size_t(d) * BN;
      for (int j = 0; j < BN; ++j) acc[j] += qd * kr[j];
    }
    T* srow = s + i * BN;
    if (bias != nullptr)  // a select, not an add: a masked lane is -inf even when its raw score is NaN / +inf
      for (int j = 0; j < BN; ++j) srow[j] = bias[j] == T(0) ? acc[j] * scale : bias[j];
    else
      for (int j = 0; j < BN; ++j) srow[j] = acc[j] * scale;
  }
}

// C[r, :] += sum_j A[r * lda + j] * Bm[j, :] for r < rows, j < n (Bm, C row stride D). Groups of R rows keep
// R x D accumulators in registers (R * D = 64 floats = 8 AVX registers) so the FMA chains are independent.
template <typename T, int DC>
inline void mm_rows(const T* __restrict A, int lda, int n, const T* __restrict Bm, int Drt, T* __restrict C,
                    int rows) {
  const int D = DC > 0 ? DC : Drt;
  int r0 = 0;
  if constexpr (DC > 0) {
    constexpr int R = DC >= 64 ? 1 : 64 / DC;
    for (; r0 + R <= rows; r0 += R) {
      T acc[R][DC];
      for (int r = 0; r < R; ++r)
        for (int d = 0; d < DC; ++d) acc[r][d] = C[size_t(r0 + r) * DC + d];
      for (int j = 0; j < n; ++j) {
        const T* b = Bm + size_t(j) * DC;
        for (int r = 0; r < R; ++r) {
          const T a = A[size_t(r0 + r) * lda + j];
          for (int d = 0; d < DC; ++d) acc[r][d] += a * b[d];
        }
      }
      for (int r = 0; r < R; ++r)
        for (int d = 0; d < DC; ++d) C[size_t(r0 + r) * DC + d] = acc[r][d];
    }
  }
  for (; r0 < rows; ++r0) {
    T* c = C + size_t(r0) * D;
    for (int j = 0; j < n; ++j) {
      const T a = A[size_t(r0) * lda + j];
      const T* b = Bm + size_t(j) * D;
      for (int d = 0; d < D; ++d) c[d] += a * b[d];
    }
  }
}

// max of a BN-wide score row, and whether every lane is < +inf (`ok` false: a valid key's score is NaN or +inf,
// which makes the reference's softmax row NaN; masked / padding lanes are exactly -inf, so they never clear it).
// The max is meaningless when !ok. float uses GCC vector extensions (the scalar max reduction does not
// auto-vectorise when NaN/inf semantics are kept).
inline float row_max(const float* s, bool& ok) {
  typedef float v8 __attribute__((vector_size(32)));
  typedef int v8i __attribute__((vector_size(32)));
  constexpr float I = std::numeric_limits<float>::infinity();
  const v8 inf = {I, I, I, I, I, I, I, I};
  v8 m, x;
  std::memcpy(&m, s, sizeof(v8));
  v8i good = m < inf;
  for (int j = 8; j < BN; j += 8) {
    std::memcpy(&x, s + j, sizeof(v8));
    m = m > x ? m : x;
    good &= x < inf;
  }
  float r = m[0];
  int g = good[0];
  for (int l = 1; l < 8; ++l) {
    r = r > m[l] ? r : m[l];
    g &= good[l];
  }
  ok = g != 0;
  return r;
}
inline double row_max(const double* s, bool& ok) {
  constexpr double inf = std::numeric_limits<double>::infinity();
  double r = s[0];
  bool g = s[0] < inf;
  for (int j = 1; j < BN; ++j) {
    r = r > s[j] ? r : s[j];
    g &= s[j] < inf;
  }
  ok = g;
  return r;
}

// dst (BN x BM) = src (nr x BN) transposed (rows beyond nr are not read).
template <typename T>
inline void transpose_tile(const T* __restrict src, int nr, T* __restrict dst) {
  transpose_rows(src, size_t(BN), nr, BN, dst, size_t(BM));
}

// float specialisation with explicit 8-lane vectors: the BN = 64 accumulators of a score row stay in 8 registers
// (the generic loop above is compiled with the accumulators on the stack).
template <int DC>
inline void tile_dot_f32(const float* __restrict q, int nr, const float* __restrict kt, int Drt, float scale,
                         const float* __restrict bias, float* __restrict s) {
  typedef float v8 __attribute__((vector_size(32), aligned(4)));
  static_assert(BN == 64, "tile_dot_f32 assumes 64-key tiles");
  const int D = DC > 0 ? DC : Drt;
  for (int i = 0; i < nr; ++i) {
    const float* qi = q + size_t(i) * D;
    v8 a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
    for (int d = 0; d < D; ++d) {
      const float x = qi[d];
      const v8* kr = reinterpret_cast<const v8*>(kt + size_t(d) * BN);
      a0 += x * kr[0]; a1 += x * kr[1]; a2 += x * kr[2]; a3 += x * kr[3];
      a4 += x * kr[4]; a5 += x * kr[5]; a6 += x * kr[6]; a7 += x * kr[7];
    }
    v8* out = reinterpret_cast<v8*>(s + size_t(i) * BN);
    if (bias != nullptr) {  // select (blend), not add: masked lanes stay -inf when q or k holds NaN / inf
      const v8* b = reinterpret_cast<const v8*>(bias);
      const v8 z = {};
      out[0] = b[0] == z ? a0 * scale : b[0]; out[1] = b[1] == z ? a1 * scale : b[1];
      out[2] = b[2] == z ? a2 * scale : b[2]; out[3] = b[3] == z ? a3 * scale : b[3];
      out[4] = b[4] == z ? a4 * scale : b[4]; out[5] = b[5] == z ? a5 * scale : b[5];
      out[6] = b[6] == z ? a6 * scale : b[6]; out[7] = b[7] == z ? a7 * scale : b[7];
    } else {
      out[0] = a0 * scale; out[1] = a1 * scale; out[2] = a2 * scale; out[3] = a3 * scale;
      out[4] = a4 * scale; out[5] = a5 * scale; out[6] = a6 * scale; out[7] = a7 * scale;
    }
  }
}

template <typename T, int DC>
inline void tile_scores(const T* q, int nr, const T* kt, int Drt, T scale, const T* bias, T* s) {
  if constexpr (std::is_same_v<T, float>)
    tile_dot_f32<DC>(q, nr, kt, Drt, scale, bias, s);
  else
    tile_dot<T, DC>(q, nr, kt, Drt, scale, bias, s);
}

// float mm_rows for head dims that are multiples of the vector width, with explicit vectors: GCC keeps the generic
// version's acc[R][DC] array on the stack (a store and a reload around every FMA — perf showed that loop at 47 % of
// the D = 16 forward). R rows x DC / W vectors = 8 accumulators in registers; the same summation order per element.
// W = 16 lanes where AVX-512 is compiled in (one instruction per 16 lanes; 32 vector registers), else 8 (AVX2).
#ifdef __AVX512F__
constexpr int kVecLanes = 16;
#else
constexpr int kVecLanes = 8;
#endif
template <int DC>
inline void mm_rows_f32(const float* __restrict A, int lda, int n, const float* __restrict Bm, float* __restrict C,
                        int rows) {
  typedef float vf __attribute__((vector_size(4 * kVecLanes), aligned(4)));
  static_assert(DC % kVecLanes == 0, "mm_rows_f32 needs a head dim that is a multiple of the vector width");
  constexpr int NV = DC / kVecLanes, R = NV >= 8 ? 1 : 8 / NV;
  const auto body = [&](auto rows_c, int r0) {  // RR rows in lockstep (R, then single rows for the tail)
    constexpr int RR = decltype(rows_c)::value;
    vf acc[RR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) acc[r][c] = reinterpret_cast<const vf*>(C + size_t(r0 + r) * DC)[c];
    for (int j = 0; j < n; ++j) {
      const vf* b = reinterpret_cast<const vf*>(Bm + size_t(j) * DC);
#pragma GCC unroll 8
      for (int r = 0; r < RR; ++r) {
        const float a = A[size_t(r0 + r) * lda + j];
#pragma GCC unroll 8
        for (int c = 0; c < NV; ++c) acc[r][c] += a * b[c];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NV; ++c) reinterpret_cast<vf*>(C + size_t(r0 + r) * DC)[c] = acc[r][c];
  };
  int r0 = 0;
  for (; r0 + R <= rows; r0 += R) body(std::integral_constant<int, R>{}, r0);
  for (; r0 < rows; ++r0) body(std::integral_constant<int, 1>{}, r0);
}

// mm_rows_f32 for head dims 8·a + 4 (HME's 12): per row a 8-lane vectors and one 4-lane vector, R rows in lockstep
// (R · (a + 1) = 8 accumulators).
template <int DC>
inline void mm_rows_f32_tail4(const float* __restrict A, int lda, int n, const float* __restrict Bm,
                              float* __restrict C, int rows) {
  typedef float v8 __attribute__((vector_size(32), aligned(4)));
  typedef float v4 __attribute__((vector_size(16), aligned(4)));
  static_assert(DC % 8 == 4 && DC < 64, "mm_rows_f32_tail4 is for head dims 8·a + 4");
  constexpr int NV = DC / 8, R = 8 / (NV + 1);
  const auto body = [&](auto rows_c, int r0) {
    constexpr int RR = decltype(rows_c)::value;
    v8 acc[RR][NV > 0 ? NV : 1];
    v4 tail[RR];
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      const float* c = C + size_t(r0 + r) * DC;
#pragma GCC unroll 8
      for (int q = 0; q < NV; ++q) acc[r][q] = reinterpret_cast<const v8*>(c)[q];
      tail[r] = *reinterpret_cast<const v4*>(c + 8 * NV);
    }
    for (int j = 0; j < n; ++j) {
      const float* b = Bm + size_t(j) * DC;
      const v4 bt = *reinterpret_cast<const v4*>(b + 8 * NV);
#pragma GCC unroll 8
      for (int r = 0; r < RR; ++r) {
        const float a = A[size_t(r0 + r) * lda + j];
#pragma GCC unroll 8
        for (int q = 0; q < NV; ++q) acc[r][q] += a * reinterpret_cast<const v8*>(b)[q];
        tail[r] += a * bt;
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < RR; ++r) {
      float* c = C + size_t(r0 + r) * DC;
#pragma GCC unroll 8
      for (int q = 0; q < NV; ++q) reinterpret_cast<v8*>(c)[q] = acc[r][q];
      *reinterpret_cast<v4*>(c + 8 * NV) = tail[r];
    }
  };
  int r0 = 0;
  for (; r0 + R <= rows; r0 += R) body(std::integral_constant<int, R>{}, r0);
  for (; r0 < rows; ++r0) body(std::integral_constant<int, 1>{}, r0);
}

// C += A Bm (see mm_rows): the vector versions where they apply.
template <typename T, int DC>
inline void mm_acc(const T* A, int lda, int n, const T* Bm, int Drt, T* C, int rows) {
  if constexpr (std::is_same_v<T, float> && DC > 0 && DC % kVecLanes == 0)
    mm_rows_f32<DC>(A, lda, n, Bm, C, rows);
  else if constexpr (std::is_same_v<T, float> && DC > 0 && DC % 8 == 4 && DC < 64)
    mm_rows_f32_tail4<DC>(A, lda, n, Bm, C, rows);
  else
    mm_rows<T, DC>(A, lda, n, Bm, Drt, C, rows);
}

// Online-softmax forward of query rows q[0, nr) (row stride D) against keys k/v[0, nk) (row stride D).
// Writes normalised output o (nr x D), lse (nr). qvalid (nr) may be null.
// Row outcomes (those of msa_fast.testing.reference.masked_softmax): a padded query row, or one whose valid scores
// are all -inf (e.g. every key padded), gives zeros and lse = +inf; a row with a NaN or +inf score on a valid key
// gives NaN (output and lse: the backward then propagates NaN); otherwise the softmax over the finite scores.
template <typename T, int DC>
void fwd_impl(const T* q, int nr, const bool* qvalid, const T* k, const T* v, const bool* kvalid, int nk, int Drt,
              T scale, T* o, T* lse, Scratch<T>& sc, const Dropout* drop, uint64_t row_base) {
  const int D = DC > 0 ? DC : Drt;
  T m[BM], l[BM], bias[BN];
  bool bad[BM];  // a NaN / +inf score on a valid key was seen
  for (int i = 0; i < nr; ++i) {
    m[i] = neg_inf<T>();
    l[i] = T(0);
    bad[i] = false;
  }
  std::fill(o, o + size_t(nr) * D, T(0));
  bool any_row = false;
  for (int i = 0; i < nr; ++i) any_row |= (qvalid == nullptr || qvalid[i]);
  for (int j0 = 0; any_row && j0 < nk; j0 += BN) {
    const int nb = std::min(BN, nk - j0);
    if (!key_bias(kvalid + j0, nb, bias)) continue;
    transpose_block(k + size_t(j0) * D, nb, D, sc.kt.data());
    tile_scores<T, DC>(q, nr, sc.kt.data(), D, scale, bias, sc.s.data());
    const T* __restrict vb = v + size_t(j0) * D;
    for (int i = 0; i < nr; ++i) {  // online softmax statistics; P overwrites S, O rows rescaled by alpha
      T* __restrict srow = sc.s.data() + i * BN;
      bool ok;
      const T bmax = row_max(srow, ok);
      bad[i] |= !ok;
      const T mnew = std::max(m[i], bmax);
      // invalid row / NaN row (its output is set at the end) / nothing valid yet: no contribution to O
      if ((qvalid != nullptr && !qvalid[i]) || bad[i] || mnew == neg_inf<T>()) {
        for (int j = 0; j < BN; ++j) srow[j] = T(0);
        continue;
      }
      const T alpha = m[i] == neg_inf<T>() ? T(0) : vexp(m[i] - mnew);
      T psum = T(0);
      for (int j = 0; j < BN; ++j) {
        const T p = vexp(srow[j] - mnew);  // masked / padding lanes: exp(-inf) = 0
        srow[j] = p;
        psum += p;
      }
      l[i] = l[i] * alpha + psum;  // the softmax normaliser counts every key; dropout only thins P V
      m[i] = mnew;
      if (drop != nullptr) {
        T z[BN];
        dropout_scales(*drop, row_base + uint64_t(i) * drop->stride + uint64_t(j0), z);
        for (int j = 0; j < BN; ++j) srow[j] *= z[j];
      }
      if (alpha != T(1)) {
        T* __restrict oi = o + size_t(i) * D;
        for (int d = 0; d < D; ++d) oi[d] *= alpha;
      }
    }
    mm_acc<T, DC>(sc.s.data(), BN, nb, vb, D, o, nr);  // O += P V
  }
  for (int i = 0; i < nr; ++i) {
    T* oi = o + size_t(i) * D;
    if (qvalid != nullptr && !qvalid[i]) {
      lse[i] = pos_inf<T>();
      for (int d = 0; d < D; ++d) oi[d] = T(0);
    } else if (bad[i]) {
      lse[i] = std::numeric_limits<T>::quiet_NaN();
      for (int d = 0; d < D; ++d) oi[d] = std::numeric_limits<T>::quiet_NaN();
    } else if (!(l[i] > T(0))) {
      lse[i] = pos_inf<T>();
      for (int d = 0; d < D; ++d) oi[d] = T(0);
    } else {
      const T inv = T(1) / l[i];
      for (int d = 0; d < D; ++d) oi[d] *= inv;
      lse[i] = m[i] + std::log(l[i]);
    }
  }
}

// Backward of query rows q[0, nr) against keys k/v[0, nk): accumulates dq (nr x D), dk/dv (nk x D).
// P is recomputed from lse (+inf rows give P = 0; NaN rows — a NaN / +inf score in forward — give P = dS = NaN on
// the valid keys and 0 on masked ones); dS = P * (dP - delta) * scale. Register accumulators per key row (dk, dv:
// loop j outer) and per query row (dq: loop i outer).
template <typename T, int DC>
void bwd_impl(const T* q, int nr, const T* k, const T* v, const bool* kvalid, int nk, int Drt, T scale,
              const T* lse, const T* delta, const T* dout, T* dq, T* dk, T* dv, Scratch<T>& sc, const Dropout* drop,
              uint64_t row_base) {
  const int D = DC > 0 ? DC : Drt;
  T bias[BN];
  bool any_row = false;
  for (int i = 0; i < nr; ++i) any_row |= lse[i] != pos_inf<T>();  // NaN rows take part (they propagate NaN)
  for (int j0 = 0; any_row && j0 < nk; j0 += BN) {
    const int nb = std::min(BN, nk - j0);
    if (!key_bias(kvalid + j0, nb, bias)) continue;
    const T* __restrict kb = k + size_t(j0) * D;
    const T* __restrict vb = v + size_t(j0) * D;
    T* __restrict dkb = dk + size_t(j0) * D;
    T* __restrict dvb = dv + size_t(j0) * D;
    transpose_block(kb, nb, D, sc.kt.data());
    transpose_block(vb, nb, D, sc.vt.data());
    tile_scores<T, DC>(q, nr, sc.kt.data(), D, scale, bias, sc.s.data());       // scores
    tile_scores<T, DC>(dout, nr, sc.vt.data(), D, T(1), nullptr, sc.dp.data());  // dP = dout . v^T
    for (int i = 0; i < nr; ++i) {
      T* __restrict p = sc.s.data() + i * BN;
      T* __restrict ds = sc.dp.data() + i * BN;
      const T li = lse[i];
      if (li == pos_inf<T>()) {  // padded query row / no valid key
        for (int j = 0; j < BN; ++j) p[j] = ds[j] = T(0);
        continue;
      }
      if (li != li) {  // NaN row: NaN on the valid keys, 0 on masked ones (the reference's masked_fill)
        for (int j = 0; j < BN; ++j) p[j] = ds[j] = bias[j] == T(0) ? std::numeric_limits<T>::quiet_NaN() : T(0);
        continue;
      }
      const T di = delta[i];
      if (drop != nullptr) {  // with Z = keep / (1 - p): dV uses P∘Z, dS = P∘(dP∘Z − delta)·scale
        T z[BN];
        dropout_scales(*drop, row_base + uint64_t(i) * drop->stride + uint64_t(j0), z);
        for (int j = 0; j < BN; ++j) {
          const T pj = vexp(p[j] - li);
          p[j] = pj * z[j];
          ds[j] = pj * (ds[j] * z[j] - di) * scale;
        }
        continue;
      }
      for (int j = 0; j < BN; ++j) {
        const T pj = vexp(p[j] - li);
        p[j] = pj;
        ds[j] = pj * (ds[j] - di) * scale;
      }
    }
    // dv_j += sum_i P_ij dout_i ; dk_j += sum_i dS_ij q_i (via transposed tiles) ; dq_i += sum_j dS_ij k_j
    transpose_tile(sc.s.data(), nr, sc.kt.data());   // kt / vt are free again: reuse as (BN x BM) buffers
    transpose_tile(sc.dp.data(), nr, sc.vt.data());
    mm_acc<T, DC>(sc.kt.data(), BM, nr, dout, D, dvb, nb);
    mm_acc<T, DC>(sc.vt.data(), BM, nr, q, D, dkb, nb);
    mm_acc<T, DC>(sc.dp.data(), BN, nb, kb, D, dq, nr);
  }
}

// Head-dim dispatch: the MSA head dims get compile-time specialisations (float only; fp64 is for gradcheck).
template <typename T>
void attend_rows_fwd(const T* q, int nr, const bool* qvalid, const T* k, const T* v, const bool* kvalid, int nk,
                     int D, T scale, T* o, T* lse, Scratch<T>& sc, const Dropout* drop = nullptr,
                     uint64_t row_base = 0) {
  if constexpr (std::is_same_v<T, float>) {
    switch (D) {
      case 12: return fwd_impl<T, 12>(q, nr, qvalid, k, v, kvalid, nk, D, scale, o, lse, sc, drop, row_base);
      case 16: return fwd_impl<T, 16>(q, nr, qvalid, k, v, kvalid, nk, D, scale, o, lse, sc, drop, row_base);
      case 32: return fwd_impl<T, 32>(q, nr, qvalid, k, v, kvalid, nk, D, scale, o, lse, sc, drop, row_base);
      case 64: return fwd_impl<T, 64>(q, nr, qvalid, k, v, kvalid, nk, D, scale, o, lse, sc, drop, row_base);
      default: break;
    }
  }
  fwd_impl<T, 0>(q, nr, qvalid, k, v, kvalid, nk, D, scale, o, lse, sc, drop, row_base);
}

template <typename T>
void attend_rows_bwd(const T* q, int nr, const T* k, const T* v, const bool* kvalid, int nk, int D, T scale,
                     const T* lse, const T* delta, const T* dout, T* dq, T* dk, T* dv, Scratch<T>& sc,
                     const Dropout* drop = nullptr, uint64_t row_base = 0) {
  if constexpr (std::is_same_v<T, float>) {
    switch (D) {
      case 12:
        return bwd_impl<T, 12>(q, nr, k, v, kvalid, nk, D, scale, lse, delta, dout, dq, dk, dv, sc, drop, row_base);
      case 16:
        return bwd_impl<T, 16>(q, nr, k, v, kvalid, nk, D, scale, lse, delta, dout, dq, dk, dv, sc, drop, row_base);
      case 32:
        return bwd_impl<T, 32>(q, nr, k, v, kvalid, nk, D, scale, lse, delta, dout, dq, dk, dv, sc, drop, row_base);
      case 64:
        return bwd_impl<T, 64>(q, nr, k, v, kvalid, nk, D, scale, lse, delta, dout, dq, dk, dv, sc, drop, row_base);
      default: break;
    }
  }
  bwd_impl<T, 0>(q, nr, k, v, kvalid, nk, D, scale, lse, delta, dout, dq, dk, dv, sc, drop, row_base);
}

using msa_fast::dispatch_float;
using msa_fast::maybe_poison;

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// ---------------------------------------------------------------------------------------------------------------
// Segmented attention (S sources concatenated along the key axis).
// q (B,H,Lq,D), k/v (B,H,Lk,D), key_valid (B,Lk) bool, offsets (S+1) int64 list, q_valid (B,Lq) bool or empty.
// Returns out (B,H,Lq,D), lse (B,H,S,Lq), o_src (S,B,H,Lq,D) or empty when S == 1.
std::vector<torch::Tensor> attention_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                             torch::Tensor key_valid, std::vector<int64_t> offsets,
                                             std::optional<torch::Tensor> q_valid, double scale, double dropout_p,
                                             int64_t seed) {
  for (const auto& [t, n] : {std::pair{q, "q"}, std::pair{k, "k"}, std::pair{v, "v"}, std::pair{key_valid, "key_valid"}})
    check_cpu(t, n);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be 4-D (B, H, L, D)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "q, k, v dtypes differ");
  TORCH_CHECK(key_valid.scalar_type() == torch::kBool, "key_valid must be bool");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.sizes() == k.sizes(), "k/v shape mismatch");
  TORCH_CHECK(key_valid.size(0) == B && key_valid.size(1) == Lk, "key_valid must be (B, Lk)");
  TORCH_CHECK(offsets.size() >= 2 && offsets.front() == 0 && offsets.back() == Lk, "offsets must run 0..Lk");
  const int64_t S = int64_t(offsets.size()) - 1;
  const bool has_qv = q_valid.has_value() && q_valid->defined();
  if (has_qv) {
    check_cpu(*q_valid, "q_valid");
    TORCH_CHECK(q_valid->scalar_type() == torch::kBool && q_valid->size(0) == B && q_valid->size(1) == Lq,
                "q_valid must be bool (B, Lq)");
  }
  auto out = maybe_poison(torch::empty_like(q));
  auto lse = maybe_poison(torch::empty({B, H, S, Lq}, q.options()));
  auto o_src = S > 1 ? maybe_poison(torch::empty({S, B, H, Lq, D}, q.options())) : torch::Tensor();
  const int64_t nqb = (Lq + BM - 1) / BM;
  const Dropout drop_cfg(uint64_t(seed), dropout_p, uint64_t(Lk));
  const Dropout* drop = dropout_p > 0.0 ? &drop_cfg : nullptr;
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* qp = q.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    const bool* kv = key_valid.data_ptr<bool>();
    const bool* qv = has_qv ? q_valid->data_ptr<bool>() : nullptr;
    T* op = out.data_ptr<T>();
    T* lp = lse.data_ptr<T>();
    T* sp = S > 1 ? o_src.data_ptr<T>() : nullptr;
#pragma omp parallel
    {
      Scratch<T> sc{int(D)};
      std::vector<T> o_s(size_t(BM) * D);
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < B * H * nqb; ++task) {
        const int64_t bh = task / nqb, b = bh / H, i0 = (task % nqb) * BM;
        const int nr = int(std::min<int64_t>(BM, Lq - i0));
        const T* qb = qp + (bh * Lq + i0) * D;
        const bool* qvb = qv ? qv + b * Lq + i0 : nullptr;
        T* ob = op + (bh * Lq + i0) * D;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t k0 = offsets[s], nk = offsets[s + 1] - offsets[s];
          T* lse_row = lp + (bh * S + s) * Lq + i0;
          T* dst = S > 1 ? sp + ((s * B * H + bh) * Lq + i0) * D : ob;
          attend_rows_fwd<T>(qb, nr, qvb, kp + (bh * Lk + k0) * D, vp + (bh * Lk + k0) * D, kv + b * Lk + k0,
                             int(nk), int(D), T(scale), dst, lse_row, sc, drop, uint64_t((bh * Lq + i0) * Lk + k0));
        }
        if (S > 1) {
          std::fill(ob, ob + size_t(nr) * D, T(0));
          for (int64_t s = 0; s < S; ++s) {
            const T* src = sp + ((s * B * H + bh) * Lq + i0) * D;
            for (int64_t x = 0; x < nr * D; ++x) ob[x] += src[x];
          }
        }
      }
    }
  });
  return {out, lse, o_src};
}

// dq, dk, dv of the segmented attention; lse, delta (B,H,S,Lq) in q's dtype; dout (B,H,Lq,D).
std::vector<torch::Tensor> attention_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                              torch::Tensor key_valid, std::vector<int64_t> offsets,
                                              torch::Tensor lse, torch::Tensor delta, torch::Tensor dout,
                                              double scale, double dropout_p, int64_t seed) {
  for (const auto& [t, n] : {std::pair{q, "q"}, std::pair{k, "k"}, std::pair{v, "v"}, std::pair{key_valid, "key_valid"},
                       std::pair{lse, "lse"}, std::pair{delta, "delta"}, std::pair{dout, "dout"}})
    check_cpu(t, n);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3), Lk = k.size(2);
  const int64_t S = int64_t(offsets.size()) - 1;
  TORCH_CHECK(lse.numel() == B * H * S * Lq && delta.numel() == B * H * S * Lq, "lse/delta must be (B, H, S, Lq)");
  TORCH_CHECK(dout.sizes() == q.sizes(), "dout must match q");
  TORCH_CHECK(lse.scalar_type() == q.scalar_type() && delta.scalar_type() == q.scalar_type() &&
                  dout.scalar_type() == q.scalar_type(), "lse/delta/dout dtype must match q");
  // zeros: every gradient element is an accumulation target (masked keys / empty rows stay 0)
  auto dq = torch::zeros_like(q), dk = torch::zeros_like(k), dv = torch::zeros_like(v);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  const Dropout drop_cfg(uint64_t(seed), dropout_p, uint64_t(Lk));
  const Dropout* drop = dropout_p > 0.0 ? &drop_cfg : nullptr;
  dispatch_float(q.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>(), *dop = dout.data_ptr<T>();
    const T *lp = lse.data_ptr<T>(), *dlp = delta.data_ptr<T>();
    const bool* kv = key_valid.data_ptr<bool>();
    T *dqp = dq.data_ptr<T>(), *dkp = dk.data_ptr<T>(), *dvp = dv.data_ptr<T>();
#pragma omp parallel
    {
      Scratch<T> sc{int(D)};
#pragma omp for schedule(dynamic, 1)
      for (int64_t bh = 0; bh < B * H; ++bh) {
        const int64_t b = bh / H;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t k0 = offsets[s], nk = offsets[s + 1] - offsets[s];
          for (int64_t i0 = 0; i0 < Lq; i0 += BM) {
            const int nr = int(std::min<int64_t>(BM, Lq - i0));
            const int64_t qoff = (bh * Lq + i0) * D, koff = (bh * Lk + k0) * D;
            attend_rows_bwd<T>(qp + qoff, nr, kp + koff, vp + koff, kv + b * Lk + k0, int(nk), int(D), T(scale),
                               lp + (bh * S + s) * Lq + i0, dlp + (bh * S + s) * Lq + i0, dop + qoff, dqp + qoff,
                               dkp + koff, dvp + koff, sc, drop, uint64_t((bh * Lq + i0) * Lk + k0));
          }
        }
      }
    }
  });
  return {dq, dk, dv};
}

// Bottleneck exchange: csrc/bottleneck_cpu.cpp (K <= 16 keys need another tiling than this file's 64-key tiles).

// ---------------------------------------------------------------------------------------------------------------
// Masked mean: x (B,L,D), valid (B,L) bool → (B,D); empty rows → 0.
torch::Tensor masked_mean_forward(torch::Tensor x, torch::Tensor valid) {
  check_cpu(x, "x");
  check_cpu(valid, "valid");
  const int64_t B = x.size(0), L = x.size(1), D = x.size(2);
  TORCH_CHECK(valid.scalar_type() == torch::kBool && valid.size(0) == B && valid.size(1) == L,
              "valid must be bool (B, L)");
  auto out = maybe_poison(torch::empty({B, D}, x.options()));
  dispatch_float(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    const bool* vp = valid.data_ptr<bool>();
    T* op = out.data_ptr<T>();
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      T* ob = op + b * D;
      std::fill(ob, ob + D, T(0));
      int64_t n = 0;
      for (int64_t l = 0; l < L; ++l) {
        if (!vp[b * L + l]) continue;
        ++n;
        const T* xr = xp + (b * L + l) * D;
        for (int64_t d = 0; d < D; ++d) ob[d] += xr[d];
      }
      const T inv = n > 0 ? T(1) / T(n) : T(0);
      for (int64_t d = 0; d < D; ++d) ob[d] *= inv;
    }
  });
  return out;
}

torch::Tensor masked_mean_backward(torch::Tensor valid, torch::Tensor dout, int64_t L) {
  check_cpu(valid, "valid");
  check_cpu(dout, "dout");
  const int64_t B = dout.size(0), D = dout.size(1);
  auto dx = maybe_poison(torch::empty({B, L, D}, dout.options()));
  dispatch_float(dout.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const bool* vp = valid.data_ptr<bool>();
    const T* gp = dout.data_ptr<T>();
    T* dxp = dx.data_ptr<T>();
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; ++b) {
      int64_t n = 0;
      for (int64_t l = 0; l < L; ++l) n += vp[b * L + l];
      const T inv = n > 0 ? T(1) / T(n) : T(0);
      for (int64_t l = 0; l < L; ++l) {
        T* row = dxp + (b * L + l) * D;
        const T w = vp[b * L + l] ? inv : T(0);
        for (int64_t d = 0; d < D; ++d) row[d] = w * gp[b * D + d];
      }
    }
  });
  return dx;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "msa_fast CPU kernels (OpenMP): segmented attention, bottleneck exchange, masked mean";
  m.def("attention_forward", &attention_forward,
        "segmented attention forward (optional counter-RNG dropout on P) -> (out, lse, o_src)");
  m.def("attention_backward", &attention_backward, "segmented attention backward (same dropout seed) -> (dq, dk, dv)");
  m.def("bottleneck_forward", &msa_fast::bottleneck_forward, "bottleneck exchange forward -> (out, lse)");
  m.def("bottleneck_backward", &msa_fast::bottleneck_backward, "bottleneck exchange backward -> (dq, dk, dv)");
  m.def("bottleneck_forward_list", &msa_fast::bottleneck_forward_list,
        "bottleneck exchange forward, one tensor per modality -> outs (M) + lses (M)");
  m.def("bottleneck_backward_list", &msa_fast::bottleneck_backward_list,
        "bottleneck exchange backward, one tensor per modality (delta in-kernel) -> dqs (M) + dks (M) + dvs (M)");
  m.def("dropout_apply", &msa_fast::dropout_apply, "x * keep(seed, n) / (1 - p) (counter RNG; also the backward)");
  m.def("row_topk", &msa_fast::row_topk, "row-wise top-k over column ranges -> (values, columns), best first");
  m.def("masked_mean_forward", &masked_mean_forward, "masked mean forward");
  m.def("masked_mean_backward", &masked_mean_backward, "masked mean backward");
  m.def("expert_mixture_forward", &msa_fast::expert_mixture_forward, "dense expert mixture forward -> (out, z)");
  m.def("expert_mixture_backward", &msa_fast::expert_mixture_backward,
        "dense expert mixture backward -> (dx, dgates, dw1, db1, dw2, db2)");
  m.def("expert_mixture_topk_forward", &msa_fast::expert_mixture_topk_forward,
        "top-k expert mixture forward -> (out, order, pos, offsets, z, y)");
  m.def("expert_mixture_topk_backward", &msa_fast::expert_mixture_topk_backward,
        "top-k expert mixture backward -> (dx, dexpert_weight, dw1, db1, dw2, db2)");
  m.def("set_poison", [](bool on) { msa_fast::g_poison = on; },
        "test hook: fill outputs with NaN before the kernels run");
  m.def("num_threads", []() { return at::get_num_threads(); });
}
