// Mixture of expert FFNs on CPU (ops "expert_mixture" / "expert_mixture_topk"): at::addmm / at::mm for the GEMMs,
// fused OpenMP passes (at::parallel_for) for everything between them.
//
// Dense: Z_e = x @ w1[e] (E GEMMs into one (E, N, h) buffer, saved for the backward, bias not added);
//   one fused pass: S = act(Z + b1) * gates (blockwise) and out = gates @ b2; then out += S @ W2c, one GEMM with
//   W2c = w2 viewed as (E*h, d) (K = E*h). No weight copies, and the small gates @ b2 / gatesᵀ dout products live
//   in the passes (no extra BLAS calls or temporaries). At MOSI shapes all six GEMMs together run at ~80 % of the
//   2-core fp32 peak; the passes are a few percent of the time (see README / msa_fast/bench/ops.py).
//   backward: dS = dout @ W2cᵀ (one GEMM); one fused pass over row chunks recomputes a = act(Z + b1), act' and
//   writes S = a*g, dZ = dS*g*act', dgates = Σ_h dS*a + dout·b2 and per-chunk partial sums of db1 = Σ dZ and
//   db2 = Σ g*dout (reduced afterwards: deterministic); then dW2 = Sᵀ dout (one GEMM), dW1[e] = xᵀ dZ_e and
//   dx = Σ_e dZ_e w1[e]ᵀ (per-expert GEMMs into / accumulated onto the outputs).
// Top-k: stable counting sort of the N*k slots by expert (histogram + prefix sum + scatter), gather x rows, one
//   addmm per non-empty expert segment for each layer (a C++ loop, no Python), act pass, unpermute by a gather
//   (out[n] = Σ_j w[n,j] Y[pos[n,j]]; deterministic). Saves order, pos, offsets, Z (M, h), Y (M, d).
//
// GELU is exact (erf). float uses the Abramowitz–Stegun 7.1.26 erf (|err| <= 1.5e-7, the formula of ATen's AVX2
// Vectorized<float>::erf) with a polynomial exp so the passes vectorise; double uses std::erf / std::exp.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_math.h"
#include "poison.h"

namespace msa_fast {
namespace {

// ---- activation math --------------------------------------------------------------------------------------------
inline float fast_expf(float x) {
  // exp(x) = 2^n * exp(r), r = x - n ln2 in [-ln2/2, ln2/2]; Cephes polynomial (~1 ulp); clamped range.
  x = std::min(88.0f, std::max(-87.0f, x));
  const float fn = std::nearbyint(x * 1.44269504088896341f);
  float r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  const float p = exp_reduced(r);
  const int32_t n = static_cast<int32_t>(fn);
  int32_t bits = (n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// erf(z/√2) and exp(-z²/2) for GELU and its derivative (they share the exponential).
inline void erf_exp_half(float z, float& erf_v, float& e) {
  const float u = std::fabs(z) * 0.70710678118654752f;
  e = fast_expf(-u * u);  // = exp(-z²/2)
  const float t = 1.0f / (1.0f + 0.3275911f * u);
  const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                                     t * 1.061405429f))));
  const float v = 1.0f - poly * e;
  erf_v = z < 0.0f ? -v : v;
}

inline void erf_exp_half(double z, double& erf_v, double& e) {
  erf_v = std::erf(z * 0.70710678118654752440);
  e = std::exp(-0.5 * z * z);
}

template <typename T, bool GELU>
inline T act(T z) {
  if constexpr (GELU) {
    T ev, e;
    erf_exp_half(z, ev, e);
    return T(0.5) * z * (T(1) + ev);
  } else {
    return z > T(0) ? z : T(0);
  }
}

// a = act(z), da = act'(z)
template <typename T, bool GELU>
inline void act_and_grad(T z, T& a, T& da) {
  if constexpr (GELU) {
    T ev, e;
    erf_exp_half(z, ev, e);
    const T cdf = T(0.5) * (T(1) + ev);
    a = z * cdf;
    da = cdf + z * e * T(0.39894228040143267794);  // 1/√(2π)
  } else {
    a = z > T(0) ? z : T(0);
    da = z > T(0) ? T(1) : T(0);
  }
}

void check_cpu(const torch::Tensor& t, const char* name, int64_t ndim, at::ScalarType dt) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == ndim, name, " must be ", ndim, "-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

constexpr int64_t kRowGrain = 16;

// ---- dense fused passes -----------------------------------------------------------------------------------------
// Forward: z (E, N, H) = x @ w1[e] without the bias; s[n, e*H + j] = act(z + b1) * g[n, e];
// out[n] = Σ_e g[n, e] b2[e] (the addmm_ that follows adds s @ W2c).
template <typename T, bool GELU>
void gate_forward_pass(const T* z, const T* b1, const T* g, const T* b2, T* s, T* out, int64_t N, int64_t E,
                       int64_t H, int64_t D) {
  at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      T* __restrict orow = out + n * D;
      for (int64_t c = 0; c < D; ++c) orow[c] = T(0);
      for (int64_t e = 0; e < E; ++e) {
        const T ge = g[n * E + e];
        const T* __restrict zr = z + (e * N + n) * H;
        const T* __restrict br = b1 + e * H;
        T* __restrict sr = s + n * E * H + e * H;
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) sr[j] = act<T, GELU>(zr[j] + br[j]) * ge;
        const T* __restrict bb = b2 + e * D;
        for (int64_t c = 0; c < D; ++c) orow[c] += ge * bb[c];
      }
    }
  });
}

// Backward, one pass over the rows, in chunks (partial bias sums per chunk, reduced afterwards: deterministic).
// ds (N, E*H) = dout @ W2cᵀ; writes s (N, E*H) = act(z + b1)·g, dz (E, N, H) = ds·g·act'(z + b1),
// dg (N, E) = Σ_h ds·act + dout·b2[e], db1p (chunks, E*H) = Σ dz, db2p (chunks, E*D) = Σ g·dout.
template <typename T, bool GELU>
void gate_backward_pass(const T* z, const T* b1, const T* g, const T* dout, const T* b2, const T* ds, T* s, T* dz,
                        T* dg, T* db1p, T* db2p, int64_t N, int64_t E, int64_t H, int64_t D, int64_t chunks) {
  const int64_t rows = (N + chunks - 1) / chunks;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* __restrict p1 = db1p + c * E * H;
      T* __restrict p2 = db2p + c * E * D;
      for (int64_t n = c * rows; n < std::min(N, (c + 1) * rows); ++n) {
        const T* __restrict go = dout + n * D;
        for (int64_t e = 0; e < E; ++e) {
          const T ge = g[n * E + e];
          const T* __restrict zr = z + (e * N + n) * H;
          const T* __restrict br = b1 + e * H;
          const T* __restrict dr = ds + n * E * H + e * H;
          T* __restrict sr = s + n * E * H + e * H;
          T* __restrict dzr = dz + (e * N + n) * H;
          T* __restrict pr = p1 + e * H;
          T acc = T(0);
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 0; j < H; ++j) {
            T a, da;
            act_and_grad<T, GELU>(zr[j] + br[j], a, da);
            const T dsv = dr[j];
            acc += dsv * a;
            sr[j] = a * ge;
            const T dzv = dsv * ge * da;
            dzr[j] = dzv;
            pr[j] += dzv;
          }
          const T* __restrict bb = b2 + e * D;
          T* __restrict q = p2 + e * D;
          T bacc = T(0);
          for (int64_t k = 0; k < D; ++k) {
            bacc += go[k] * bb[k];
            q[k] += ge * go[k];
          }
          dg[n * E + e] = acc + bacc;
        }
      }
    }
  });
}

template <typename T, bool GELU>
void act_pass(const T* z, T* a, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    const T* __restrict zp = z;
    T* __restrict ap = a;
    for (int64_t i = i0; i < i1; ++i) ap[i] = act<T, GELU>(zp[i]);
  });
}

// dz (in: dA, out: dA * act'(z))
template <typename T, bool GELU>
void act_grad_pass(const T* z, T* dz, int64_t n) {
  at::parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    const T* __restrict zp = z;
    T* __restrict dp = dz;
    for (int64_t i = i0; i < i1; ++i) {
      T a, da;
      act_and_grad<T, GELU>(zp[i], a, da);
      dp[i] *= da;
    }
  });
}

template <typename F>
void dispatch_act(bool gelu, F&& f) {
  if (gelu)
    f(std::true_type{});
  else
    f(std::false_type{});
}

}  // namespace

// x (N, d), gates (N, E), w1 (E, d, h), b1 (E, h), w2 (E, h, d), b2 (E, d) → (out (N, d), Z (E, N, h) = x @ w1[e]
// without the bias)
std::vector<torch::Tensor> expert_mixture_forward(torch::Tensor x, torch::Tensor gates, torch::Tensor w1,
                                                  torch::Tensor b1, torch::Tensor w2, torch::Tensor b2, bool gelu) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "x must be float32 or float64, got ", dt);
  check_cpu(x, "x", 2, dt);
  check_cpu(gates, "gates", 2, dt);
  check_cpu(w1, "w1", 3, dt);
  check_cpu(b1, "b1", 2, dt);
  check_cpu(w2, "w2", 3, dt);
  check_cpu(b2, "b2", 2, dt);
  const int64_t N = x.size(0), D = x.size(1), E = w1.size(0), H = w1.size(2);
  TORCH_CHECK(w1.size(1) == D && gates.size(0) == N && gates.size(1) == E, "gates / w1 shape mismatch");
  TORCH_CHECK(b1.size(0) == E && b1.size(1) == H && w2.size(0) == E && w2.size(1) == H && w2.size(2) == D &&
                  b2.size(0) == E && b2.size(1) == D,
              "b1 / w2 / b2 shape mismatch");
  auto z = maybe_poison(torch::empty({E, N, H}, x.options()));
  auto out = maybe_poison(torch::empty({N, D}, x.options()));
  if (N == 0) return {out, z};
  for (int64_t e = 0; e < E; ++e) {  // E GEMMs into contiguous slices: no (d, E*h) weight copy
    auto ze = z[e];
    at::mm_out(ze, x, w1[e]);
  }
  auto s = torch::empty({N, E * H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "expert_mixture_forward", [&] {
    dispatch_act(gelu, [&](auto g) {
      gate_forward_pass<scalar_t, decltype(g)::value>(z.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(),
                                                      gates.data_ptr<scalar_t>(), b2.data_ptr<scalar_t>(),
                                                      s.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, E, H, D);
    });
  });
  out.addmm_(s, w2.view({E * H, D}));  // one GEMM over all experts (K = E*h)
  return {out, z};
}

// → (dx, dgates, dw1, db1, dw2, db2)
std::vector<torch::Tensor> expert_mixture_backward(torch::Tensor x, torch::Tensor gates, torch::Tensor w1,
                                                   torch::Tensor b1, torch::Tensor w2, torch::Tensor b2,
                                                   torch::Tensor z, torch::Tensor dout, bool gelu) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "x must be float32 or float64, got ", dt);
  check_cpu(x, "x", 2, dt);
  check_cpu(gates, "gates", 2, dt);
  check_cpu(w1, "w1", 3, dt);
  check_cpu(b1, "b1", 2, dt);
  check_cpu(w2, "w2", 3, dt);
  check_cpu(b2, "b2", 2, dt);
  check_cpu(z, "z", 3, dt);
  check_cpu(dout, "dout", 2, dt);
  const int64_t N = x.size(0), D = x.size(1), E = w1.size(0), H = w1.size(2);
  TORCH_CHECK(z.size(0) == E && z.size(1) == N && z.size(2) == H && dout.size(0) == N && dout.size(1) == D,
              "z / dout shape mismatch");
  auto dx = maybe_poison(torch::empty({N, D}, x.options()));
  auto dg = maybe_poison(torch::empty({N, E}, x.options()));
  auto dw1 = maybe_poison(torch::empty({E, D, H}, x.options()));
  auto db1 = maybe_poison(torch::empty({E, H}, x.options()));
  auto dw2 = maybe_poison(torch::empty({E, H, D}, x.options()));
  auto db2 = maybe_poison(torch::empty({E, D}, x.options()));
  if (N == 0) {
    for (auto* t : {&dw1, &db1, &dw2, &db2}) t->zero_();
    return {dx, dg, dw1, db1, dw2, db2};
  }
  auto w2c = w2.view({E * H, D});
  auto ds = at::mm(dout, w2c.t());  // (N, E*H)
  auto s = torch::empty({N, E * H}, x.options());
  auto dz = torch::empty({E, N, H}, x.options());
  const int64_t chunks = std::min<int64_t>(N, 4 * at::get_num_threads());
  auto db1p = torch::zeros({chunks, E * H}, x.options());
  auto db2p = torch::zeros({chunks, E * D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "expert_mixture_backward", [&] {
    dispatch_act(gelu, [&](auto g) {
      gate_backward_pass<scalar_t, decltype(g)::value>(
          z.data_ptr<scalar_t>(), b1.data_ptr<scalar_t>(), gates.data_ptr<scalar_t>(), dout.data_ptr<scalar_t>(),
          b2.data_ptr<scalar_t>(), ds.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(),
          dg.data_ptr<scalar_t>(), db1p.data_ptr<scalar_t>(), db2p.data_ptr<scalar_t>(), N, E, H, D, chunks);
    });
  });
  auto dw2_2d = dw2.view({E * H, D});
  auto db1_1d = db1.view({E * H});
  auto db2_1d = db2.view({E * D});
  at::mm_out(dw2_2d, s.t(), dout);
  at::sum_out(db1_1d, db1p, {0});
  at::sum_out(db2_1d, db2p, {0});
  for (int64_t e = 0; e < E; ++e) {
    auto dw1e = dw1[e];
    at::mm_out(dw1e, x.t(), dz[e]);
    if (e == 0)
      at::mm_out(dx, dz[0], w1[0].t());
    else
      dx.addmm_(dz[e], w1[e].t());
  }
  return {dx, dg, dw1, db1, dw2, db2};
}

// ---- top-k ------------------------------------------------------------------------------------------------------
// x (N, d), idx (N, k) int64, w (N, k) → (out (N, d), order (M,), pos (M,), offsets (E+1,), Z (M, h), Y (M, d))
std::vector<torch::Tensor> expert_mixture_topk_forward(torch::Tensor x, torch::Tensor idx, torch::Tensor wt,
                                                       torch::Tensor w1, torch::Tensor b1, torch::Tensor w2,
                                                       torch::Tensor b2, bool gelu) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "x must be float32 or float64, got ", dt);
  check_cpu(x, "x", 2, dt);
  check_cpu(idx, "expert_idx", 2, at::kLong);
  check_cpu(wt, "expert_weight", 2, dt);
  check_cpu(w1, "w1", 3, dt);
  check_cpu(b1, "b1", 2, dt);
  check_cpu(w2, "w2", 3, dt);
  check_cpu(b2, "b2", 2, dt);
  const int64_t N = x.size(0), D = x.size(1), K = idx.size(1), E = w1.size(0), H = w1.size(2), M = N * K;
  TORCH_CHECK(idx.size(0) == N && wt.size(0) == N && wt.size(1) == K, "expert_idx / expert_weight shape mismatch");
  // permute: histogram + exclusive prefix sum + stable scatter
  auto order = torch::empty({M}, idx.options());
  auto pos = torch::empty({M}, idx.options());
  auto offsets = torch::zeros({E + 1}, idx.options());
  const int64_t* ip = idx.data_ptr<int64_t>();
  int64_t* op = order.data_ptr<int64_t>();
  int64_t* pp = pos.data_ptr<int64_t>();
  int64_t* offp = offsets.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i) {
    TORCH_CHECK(ip[i] >= 0 && ip[i] < E, "expert_idx must lie in [0, ", E, "), got ", ip[i]);
    ++offp[ip[i] + 1];
  }
  for (int64_t e = 0; e < E; ++e) offp[e + 1] += offp[e];
  {
    std::vector<int64_t> cursor(offp, offp + E);
    for (int64_t i = 0; i < M; ++i) {
      const int64_t p = cursor[ip[i]]++;
      op[p] = i;
      pp[i] = p;
    }
  }
  auto z = maybe_poison(torch::empty({M, H}, x.options()));
  auto y = maybe_poison(torch::empty({M, D}, x.options()));
  auto out = maybe_poison(torch::empty({N, D}, x.options()));
  auto xp = torch::empty({M, D}, x.options());
  auto a = torch::empty({M, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dt, "expert_mixture_topk_forward", [&] {
    const scalar_t* xd = x.data_ptr<scalar_t>();
    scalar_t* xpd = xp.data_ptr<scalar_t>();
    at::parallel_for(0, M, 64, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) std::memcpy(xpd + p * D, xd + (op[p] / K) * D, D * sizeof(scalar_t));
    });
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = offp[e], s1 = offp[e + 1];
      if (s1 == s0) continue;
      auto ze = z.narrow(0, s0, s1 - s0);
      at::addmm_out(ze, b1[e], xp.narrow(0, s0, s1 - s0), w1[e]);
    }
    dispatch_act(gelu, [&](auto g) {
      act_pass<scalar_t, decltype(g)::value>(z.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), M * H);
    });
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = offp[e], s1 = offp[e + 1];
      if (s1 == s0) continue;
      auto ye = y.narrow(0, s0, s1 - s0);
      at::addmm_out(ye, b2[e], a.narrow(0, s0, s1 - s0), w2[e]);
    }
    const scalar_t* yd = y.data_ptr<scalar_t>();
    const scalar_t* wd = wt.data_ptr<scalar_t>();
    scalar_t* od = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        scalar_t* __restrict orow = od + n * D;
        for (int64_t c = 0; c < D; ++c) orow[c] = scalar_t(0);
        for (int64_t j = 0; j < K; ++j) {
          const scalar_t w = wd[n * K + j];
          const scalar_t* __restrict yr = yd + pp[n * K + j] * D;
          for (int64_t c = 0; c < D; ++c) orow[c] += w * yr[c];
        }
      }
    });
  });
  return {out, order, pos, offsets, z, y};
}

// → (dx, dexpert_weight, dw1, db1, dw2, db2)
std::vector<torch::Tensor> expert_mixture_topk_backward(torch::Tensor x, torch::Tensor wt, torch::Tensor w1,
                                                        torch::Tensor w2, torch::Tensor order, torch::Tensor pos,
                                                        torch::Tensor offsets, torch::Tensor z, torch::Tensor y,
                                                        torch::Tensor dout, bool gelu) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, "x must be float32 or float64, got ", dt);
  check_cpu(x, "x", 2, dt);
  check_cpu(wt, "expert_weight", 2, dt);
  check_cpu(w1, "w1", 3, dt);
  check_cpu(w2, "w2", 3, dt);
  check_cpu(order, "order", 1, at::kLong);
  check_cpu(pos, "pos", 1, at::kLong);
  check_cpu(offsets, "offsets", 1, at::kLong);
  check_cpu(z, "z", 2, dt);
  check_cpu(y, "y", 2, dt);
  check_cpu(dout, "dout", 2, dt);
  const int64_t N = x.size(0), D = x.size(1), K = wt.size(1), E = w1.size(0), H = w1.size(2), M = N * K;
  TORCH_CHECK(order.size(0) == M && pos.size(0) == M && offsets.size(0) == E + 1 && z.size(0) == M &&
                  z.size(1) == H && y.size(0) == M && y.size(1) == D && dout.size(0) == N && dout.size(1) == D,
              "saved tensor shape mismatch");
  auto dx = maybe_poison(torch::empty({N, D}, x.options()));
  auto dwt = maybe_poison(torch::empty({N, K}, x.options()));
  auto dw1 = maybe_poison(torch::empty({E, D, H}, x.options()));
  auto db1 = maybe_poison(torch::empty({E, H}, x.options()));
  auto dw2 = maybe_poison(torch::empty({E, H, D}, x.options()));
  auto db2 = maybe_poison(torch::empty({E, D}, x.options()));
  auto xp = torch::empty({M, D}, x.options());
  auto dy = torch::empty({M, D}, x.options());
  auto a = torch::empty({M, H}, x.options());
  auto dz = torch::empty({M, H}, x.options());
  auto dxp = torch::empty({M, D}, x.options());
  const int64_t* op = order.data_ptr<int64_t>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  const int64_t* offp = offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(dt, "expert_mixture_topk_backward", [&] {
    const scalar_t* xd = x.data_ptr<scalar_t>();
    const scalar_t* wd = wt.data_ptr<scalar_t>();
    const scalar_t* yd = y.data_ptr<scalar_t>();
    const scalar_t* gd = dout.data_ptr<scalar_t>();
    scalar_t* dwtd = dwt.data_ptr<scalar_t>();
    scalar_t* xpd = xp.data_ptr<scalar_t>();
    scalar_t* dyd = dy.data_ptr<scalar_t>();
    // dexpert_weight[n, j] = dout[n]·Y[pos]; dY[p] = w[slot] dout[token]; Xp[p] = x[token]
    at::parallel_for(0, M, 64, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t slot = op[p], n = slot / K;
        const scalar_t w = wd[slot];
        const scalar_t* __restrict go = gd + n * D;
        const scalar_t* __restrict yr = yd + p * D;
        scalar_t* __restrict dr = dyd + p * D;
        scalar_t acc = scalar_t(0);
        for (int64_t c = 0; c < D; ++c) {
          acc += go[c] * yr[c];
          dr[c] = w * go[c];
        }
        dwtd[slot] = acc;
        std::memcpy(xpd + p * D, xd + n * D, D * sizeof(scalar_t));
      }
    });
    dispatch_act(gelu, [&](auto g) {
      act_pass<scalar_t, decltype(g)::value>(z.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(), M * H);
    });
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = offp[e], s1 = offp[e + 1];
      if (s1 == s0) {
        dw2[e].zero_();
        db2[e].zero_();
        continue;
      }
      auto dye = dy.narrow(0, s0, s1 - s0);
      auto dw2e = dw2[e], db2e = db2[e], dze = dz.narrow(0, s0, s1 - s0);
      at::mm_out(dw2e, a.narrow(0, s0, s1 - s0).t(), dye);
      at::sum_out(db2e, dye, {0});
      at::mm_out(dze, dye, w2[e].t());
    }
    dispatch_act(gelu, [&](auto g) {
      act_grad_pass<scalar_t, decltype(g)::value>(z.data_ptr<scalar_t>(), dz.data_ptr<scalar_t>(), M * H);
    });
    for (int64_t e = 0; e < E; ++e) {
      const int64_t s0 = offp[e], s1 = offp[e + 1];
      if (s1 == s0) {
        dw1[e].zero_();
        db1[e].zero_();
        continue;
      }
      auto dze = dz.narrow(0, s0, s1 - s0);
      auto dw1e = dw1[e], db1e = db1[e], dxpe = dxp.narrow(0, s0, s1 - s0);
      at::mm_out(dw1e, xp.narrow(0, s0, s1 - s0).t(), dze);
      at::sum_out(db1e, dze, {0});
      at::mm_out(dxpe, dze, w1[e].t());
    }
    const scalar_t* dxpd = dxp.data_ptr<scalar_t>();
    scalar_t* dxd = dx.data_ptr<scalar_t>();
    at::parallel_for(0, N, kRowGrain, [&](int64_t n0, int64_t n1) {
      for (int64_t n = n0; n < n1; ++n) {
        scalar_t* __restrict orow = dxd + n * D;
        for (int64_t c = 0; c < D; ++c) orow[c] = scalar_t(0);
        for (int64_t j = 0; j < K; ++j) {
          const scalar_t* __restrict r = dxpd + pp[n * K + j] * D;
          for (int64_t c = 0; c < D; ++c) orow[c] += r[c];
        }
      }
    });
  });
  return {dx, dwt, dw1, db1, dw2, db2};
}

}  // namespace msa_fast
