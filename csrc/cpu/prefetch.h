// Software prefetch of gathered rows, for the CPU kernels that read or update rows at random places in
// a matrix far larger than the caches (the hardware prefetcher cannot guess the next row).
#pragma once
#include <cstdint>

namespace lsh_torch {

// Fetches the `d` elements of `row` into the cache; called a few rows before their use, so that the
// cache misses of consecutive rows overlap.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t d) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t at = 0; at < d * static_cast<int64_t>(sizeof(scalar_t)); at += 64) __builtin_prefetch(bytes + at);
}

}  // namespace lsh_torch
