// Test hook shared by every msa_fast CPU kernel: when g_poison is set (msa_fast._C.set_poison(True)), outputs
// allocated with empty() are filled with NaN before a kernel writes them, so an element a kernel forgets to write
// shows up in the tests (torch::empty is not visible to Python monkeypatching).
#pragma once

#include <torch/extension.h>

#include <limits>

namespace msa_fast {

inline bool g_poison = false;

inline torch::Tensor maybe_poison(torch::Tensor t) {
  if (g_poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

}  // namespace msa_fast
