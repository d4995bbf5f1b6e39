// Fused dropout on CPU (op "dropout"): y = x * keep(seed, n) / (1 - p) for the row-major flat index n, with the
// counter RNG of counter_rng.h. The same call computes the backward (dy * keep / (1 - p)): the mask is regenerated
// from (seed, n), never stored. Why: torch's CPU dropout draws with a sequential generator (~10 ns / element on
// this 2-core machine, 20-30 % of DashFusion's and HME's training step); this loop vectorises.
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>

#include "counter_rng.h"
#include "poison.h"

namespace msa_fast {

torch::Tensor dropout_apply(torch::Tensor x, double p, int64_t seed) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must be float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "p must be in [0, 1), got ", p);
  x = x.contiguous();
  auto y = maybe_poison(torch::empty_like(x));
  const int64_t n = x.numel();
  const RngKey key{uint64_t(seed)};
  const uint32_t thr = keep_threshold(p);
  constexpr int64_t CHUNK = int64_t(1) << 16;  // divides 2^32: the counter's high word is constant per chunk
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dropout_apply", [&] {
    const scalar_t* __restrict xp = x.data_ptr<scalar_t>();
    scalar_t* __restrict yp = y.data_ptr<scalar_t>();
    const scalar_t inv = scalar_t(1.0 / (1.0 - p));
    at::parallel_for(0, (n + CHUNK - 1) / CHUNK, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t s = c * CHUNK, e = std::min(n, s + CHUNK);
        const uint32_t hw = key.hi_word(uint32_t(uint64_t(s) >> 32)), lo = uint32_t(s);
        const scalar_t* __restrict xc = xp + s;
        scalar_t* __restrict yc = yp + s;
        const RngKey k = key;  // locals: no possible aliasing with yc, so the loop vectorises (vpmulld + blend)
        const uint32_t t = thr;
        const scalar_t w = inv;
        for (int64_t i = 0; i < e - s; ++i) yc[i] = xc[i] * (k.bits(lo + uint32_t(i), hw) >= t ? w : scalar_t(0));
      }
    });
  });
  return y;
}

}  // namespace msa_fast
