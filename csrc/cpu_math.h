// Helpers shared by msa_fast's CPU kernels: the exp polynomial their softmaxes / GELU use, and the float / double
// dispatch (a plain lambda call, not AT_DISPATCH: `#pragma omp` cannot sit inside a macro argument).
#pragma once

#include <torch/extension.h>

namespace msa_fast {

// exp(r) for the reduced argument r ∈ [-ln2/2, ln2/2] of a Cephes-style range reduction x = n ln2 + r: degree-6
// polynomial, ~1 ulp. V = float or a GCC vector of floats (the scalar coefficients broadcast).
template <typename V>
inline V exp_reduced(V r) {
  V p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// Calls f(float{}) or f(double{}) for a float32 / float64 tensor dtype; anything else is an error.
template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  if (t == at::kFloat) {
    f(float(0));
  } else if (t == at::kDouble) {
    f(double(0));
  } else {
    TORCH_CHECK(false, "msa_fast._C kernels take float32 or float64, got ", t);
  }
}

}  // namespace msa_fast
