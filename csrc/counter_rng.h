// Counter-based dropout RNG shared by every msa_fast CPU kernel (and mirrored bit for bit by the Triton kernels and by
// msa_fast.testing.reference.counter_rng_bits, so the three backends draw the same mask for the same seed).
//
// Why counter-based: the keep-bit of element n is a pure function of (seed, n), so a backward pass regenerates the
// mask instead of storing it (no B*H*Lq*Lk bytes kept for attention dropout), any thread can draw any element
// (no sequential generator state), and the loop vectorises (32-bit integer multiply/xor/shift only).
//
// bits(seed, n) = fmix32(fmix32(lo32(n) ^ lo32(seed)) ^ hi32(seed) ^ hi32(n) * 0x9E3779B1)   (all mod 2^32)
// with MurmurHash3's finaliser fmix32. Keep element n iff bits(seed, n) >= threshold(p), threshold = floor(p * 2^32)
// (P(keep) = 1 - p up to 2^-32); kept elements are scaled by 1 / (1 - p).
#pragma once

#include <cmath>
#include <cstdint>

namespace msa_fast {

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// Per-call key: the parts of the hash that do not depend on the low counter word.
struct RngKey {
  uint32_t s0, s1;
  explicit RngKey(uint64_t seed) : s0(uint32_t(seed)), s1(uint32_t(seed >> 32)) {}
  // second-round word for counters whose high 32 bits are `hi` (constant over long runs: hoist it out of loops)
  uint32_t hi_word(uint32_t hi) const { return s1 ^ (hi * 0x9E3779B1u); }
  uint32_t bits(uint32_t lo, uint32_t hi_w) const { return fmix32(fmix32(lo ^ s0) ^ hi_w); }
  uint32_t bits64(uint64_t n) const { return bits(uint32_t(n), hi_word(uint32_t(n >> 32))); }
};

// floor(p * 2^32) for p in [0, 1); callers handle p >= 1 (everything dropped) themselves.
inline uint32_t keep_threshold(double p) {
  const double t = std::floor(p * 4294967296.0);
  return t >= 4294967295.0 ? 0xFFFFFFFFu : uint32_t(t);
}

}  // namespace msa_fast
