// Helpers shared by the CPU and CUDA kernels: the seeded counter hash that makes every random
// choice of the query reproducible (and reproducible by tests/reference.py), and limits.
#pragma once
#include <cmath>
#include <cstdint>
#include <limits>

#ifdef __CUDACC__
#define LSH_HD __host__ __device__ __forceinline__
#else
// Forced: GCC left keyed_hash a call in the query's hottest loop (7% of a per-row pool query).
#define LSH_HD inline __attribute__((always_inline))
#endif

namespace lsh_torch {

constexpr int64_t kMaxBits = 20;     // 2^K buckets per table; K = 20 is 4 MiB of offsets per table
constexpr int64_t kMaxTables = 1024;
constexpr int64_t kMaxProbes = 128;  // probed buckets per table
constexpr int64_t kIgnoreIndex = -100;  // F.cross_entropy's and Hugging Face's ignored label

// A label is a neuron id in [0, n) or padding: -1 or kIgnoreIndex.
LSH_HD bool valid_label(int64_t label, int64_t n) { return (label >= -1 && label < n) || label == kIgnoreIndex; }

// splitmix64's finaliser: a bijective 64-bit mixer.
LSH_HD uint64_t mix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Random streams of the query; a value depends only on (seed, stream, row, counter).
enum Stream : uint64_t { kTieBreak = 1, kFillDraw = 2, kFillWalk = 3, kDensify = 4, kProposalDraw = 5 };

// The key of one stream of one set (a row, or -1 for a shared set).
LSH_HD uint64_t stream_key(int64_t seed, uint64_t stream, int64_t row) {
  return mix64(mix64(mix64(static_cast<uint64_t>(seed)) ^ stream) + static_cast<uint64_t>(row));
}

// The counter-th value of the stream with that key: a bijection of the counter for a fixed key (tie-break keys
// are distinct). Mixed after the key is combined: key ^ mix64(counter) alone made every set's draws one
// XOR-translate of the same sequence, so with N a power of two only N distinct tails existed, and draws
// skipped for the head left the tail's inclusion odds uneven (at N = 64: 0.88-1.41 of |T| / |outside|).
LSH_HD uint64_t keyed_hash(uint64_t key, uint64_t counter) { return mix64(key ^ mix64(counter)); }

LSH_HD uint64_t seeded_hash(int64_t seed, uint64_t stream, int64_t row, uint64_t counter) {
  return keyed_hash(stream_key(seed, stream, row), counter);
}

// DWTA densification (Shrivastava, "Optimal Densification for Fast and Accurate Minwise Hashing",
// ICML 2017, as Chen & Shrivastava's densified WTA uses it): an empty bin g (every entry 0) of a
// row takes the hash of the first non-empty bin in a fixed pseudo-random sequence of the L*H bins,
// j_t = (stream_key(0, kDensify, g) ^ mix64(t)) mod L*H for t = 1..kDensifyAttempts (the sequence as first
// written: saved DWTA tables depend on it; a fixed sequence needs no better mixing), then the bins after g in
// circular order. The sequence depends on g alone, never on the row, so two rows with the same
// empty bins borrow from the same places (their codes can collide); it is fixed, not seeded, since
// the bins themselves are a seeded draw. `hashes[j]` < 0 marks an empty bin. Returns the source
// bin, or -1 if every bin of the row is empty.
constexpr int kDensifyAttempts = 32;

LSH_HD int64_t dwta_source(const int32_t* hashes, int64_t num_bins, int64_t g) {
  for (int t = 1; t <= kDensifyAttempts; ++t) {
    const int64_t j = static_cast<int64_t>((stream_key(0, kDensify, g) ^ mix64(static_cast<uint64_t>(t))) %
                                           static_cast<uint64_t>(num_bins));
    if (hashes[j] >= 0) return j;
  }
  for (int64_t s = 1; s < num_bins; ++s) {
    const int64_t j = (g + s) % num_bins;
    if (hashes[j] >= 0) return j;
  }
  return -1;
}

// One DWTA hash: the position a of the largest of row[bin[0 .. size-1]] (the lowest position
// among ties; NaN never wins; 0 if all are NaN) and, for each of its `bits` bits k, the margin
// row[bin[a]] - row[bin[a ^ 2^k]] in acc_t, rounded to float32 (NaN -> inf). Returns -1 if the
// bin is empty (every entry == 0; NaN is not 0), a to be replaced by densification. The caller
// has checked 0 <= bin[j] < d.
template <typename acc_t, typename scalar_t>
LSH_HD int32_t dwta_hash(const scalar_t* row, const int64_t* bin, int64_t size, int bits, float* margins) {
  int64_t best = -1;
  acc_t best_value = acc_t(0);
  bool empty = true;
  for (int64_t j = 0; j < size; ++j) {
    const acc_t v = static_cast<acc_t>(row[bin[j]]);
    if (v != acc_t(0)) empty = false;
    if (v == v && (best < 0 || v > best_value)) {
      best = j;
      best_value = v;
    }
  }
  if (best < 0) best = 0;
  const acc_t top = static_cast<acc_t>(row[bin[best]]);
  for (int k = 0; k < bits; ++k) {
    const acc_t other = static_cast<acc_t>(row[bin[best ^ (int64_t(1) << k)]]);
    const float m = static_cast<float>(top - other);
    margins[k] = m != m ? std::numeric_limits<float>::infinity() : m;
  }
  return empty ? -1 : static_cast<int32_t>(best);
}

// Multi-probe sequence of one table (Lv et al., VLDB 2007): the bucket itself, then the buckets
// whose codes differ in the bit sets with the smallest sum of margins |projection|, i.e. the
// bits the query was least sure about. Writes `probes` XOR masks (flips[0] == 0) in order of
// (score, mask over margin-sorted bit positions). Sets come from a heap with the shift/expand
// moves; a child's key always exceeds its parent's, so popping yields exactly the sorted order
// that tests/reference.py computes by enumerating every subset.
LSH_HD void probe_flips(const float* margin, int bits, int probes, uint32_t* flips) {
  flips[0] = 0;
  if (probes <= 1) return;
  // The `probes` smallest margins' positions, sorted by margin, ties by position (stable): the
  // p-th popped set and its children use sorted positions below `probes` only.
  const int ranked = bits < probes ? bits : probes;
  int order[kMaxBits];
  for (int i = 0, size = 0; i < bits; ++i) {
    if (size == ranked && !(margin[order[size - 1]] > margin[i])) continue;
    int j = size < ranked ? size++ : size - 1;
    while (j > 0 && margin[order[j - 1]] > margin[i]) { order[j] = order[j - 1]; --j; }
    order[j] = i;
  }
  struct Entry { double score; uint32_t mask; };
  auto score_of = [&](uint32_t mask) {
    double s = 0;
    for (int i = 0; i < ranked; ++i)
      if (mask >> i & 1u) s += static_cast<double>(margin[order[i]]);
    return s;
  };
  auto less = [](const Entry& a, const Entry& b) {
    return a.score < b.score || (a.score == b.score && a.mask < b.mask);
  };
  Entry heap[kMaxProbes + 1];
  int size = 0;
  auto push = [&](uint32_t mask) {
    int i = size++;
    heap[i] = Entry{score_of(mask), mask};
    while (i > 0 && less(heap[i], heap[(i - 1) / 2])) {
      Entry t = heap[i]; heap[i] = heap[(i - 1) / 2]; heap[(i - 1) / 2] = t;
      i = (i - 1) / 2;
    }
  };
  push(1u);
  for (int p = 1; p < probes; ++p) {
    const Entry top = heap[0];
    heap[0] = heap[--size];
    for (int i = 0;;) {
      int c = 2 * i + 1;
      if (c >= size) break;
      if (c + 1 < size && less(heap[c + 1], heap[c])) ++c;
      if (!less(heap[c], heap[i])) break;
      Entry t = heap[i]; heap[i] = heap[c]; heap[c] = t;
      i = c;
    }
    uint32_t flip = 0;
    int highest = 0;
    for (int i = 0; i < ranked; ++i)
      if (top.mask >> i & 1u) { flip |= 1u << order[i]; highest = i; }
    flips[p] = flip;
    if (highest + 1 < ranked) {
      push(top.mask + (1u << highest));           // shift: move the highest position up by one
      push(top.mask | (1u << (highest + 1)));     // expand: add the next position
    }
  }
}

// Row norms of the MIPS transform: the plain sum of squares s of a row, in column order (both kernels, bit for
// bit), unless s left the accumulator's range: a square overflowed (a finite row of norm 1e20 read inf in float32,
// refused as non-finite) or every square underflowed (rows of 1e-25 all read 0 and hashed alike). There the row
// is scaled by its largest |entry| first. Rows of ordinary range keep the plain sum: their norms (and codes) are
// as they were. (Entries whose squares underflow beside a sum in range change it by under d ulps.)
template <typename acc_t>
LSH_HD bool squares_in_range(acc_t s) {
  return s >= std::numeric_limits<acc_t>::min() / std::numeric_limits<acc_t>::epsilon() &&
         s <= std::numeric_limits<acc_t>::max();
}

// The norm of row[0..d) as its largest |entry| a times the norm of row / a (a row with a non-finite entry, or
// all zero: sqrt(s) as summed). `mul` is a product rounded on its own (the CUDA kernel's mul_rn: no FMA).
template <typename acc_t, typename scalar_t, typename Mul>
LSH_HD acc_t rescaled_norm(const scalar_t* row, int64_t d, acc_t s, Mul mul) {
  acc_t a = 0;
  for (int64_t k = 0; k < d; ++k) {
    const acc_t v = static_cast<acc_t>(row[k]);
    const acc_t m = v < 0 ? -v : v;
    if (!(m <= a)) a = m;  // NaN taken: then the sum's NaN stands
  }
  if (!(a > 0 && a <= std::numeric_limits<acc_t>::max())) return std::sqrt(s);
  acc_t t = 0;
  for (int64_t k = 0; k < d; ++k) {
    const acc_t v = static_cast<acc_t>(row[k]) / a;
    t = t + mul(v, v);
  }
  return mul(a, std::sqrt(t));
}

// ---------------------------------------------------------------------------------------------
// A tail drawn from a proposal (proposal_draw, proposal_log_weights; lsh_torch/proposal.py).

constexpr int64_t kMaxTries = 64;  // draws per tail entry: the counters column * kMaxTries + try stay distinct

// Try `attempt` of the entry in `column` of the tail of the row whose key is stream_key(seed, kProposalDraw, row):
// a uniform double in [0, 1) (53 random bits), the same on every device.
LSH_HD double proposal_uniform(uint64_t row_key, int64_t column, int64_t attempt) {
  const uint64_t h = keyed_hash(row_key, static_cast<uint64_t>(column) * kMaxTries + static_cast<uint64_t>(attempt));
  return static_cast<double>(h >> 11) * 0x1.0p-53;
}

// The neuron that x in [0, cdf[n-1]) draws: the first j with cdf[j] > x (n - 1 where none is: x rounded up to
// the total). guide [g] holds that neuron for g points evenly spaced over [0, cdf[n-1]] (`scale` = (g - 1) /
// cdf[n-1]): x's point below it is where the answer starts, a few steps up at most. A guide that points past the
// answer, or too far below it, costs a binary search, never a wrong answer.
LSH_HD int64_t proposal_inverse(const double* cdf, int64_t n, const int32_t* guide, int64_t g, double scale,
                                double x) {
  const double at = x * scale;
  int64_t lo = 0;
  if (at >= 0 && at < static_cast<double>(g)) {
    int64_t j = guide[static_cast<int64_t>(at)];
    if (j >= 0 && j < n && (j == 0 || cdf[j - 1] <= x)) {  // the answer is j or above
      for (int step = 0; step < 4 && cdf[j] <= x && j < n - 1; ++step) ++j;
      if (cdf[j] > x || j == n - 1) return j;
      lo = j + 1;
    }
  }
  int64_t hi = n - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (cdf[mid] > x) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// Is v among sorted[0 .. size)? (Branch-free halving: a mispredicted branch per step cost more than the search.)
LSH_HD bool in_sorted(const int64_t* sorted, int64_t size, int64_t v) {
  if (size <= 0) return false;
  const int64_t* base = sorted;
  for (int64_t len = size; len > 1;) {
    const int64_t half = len / 2;
    base = base[half - 1] < v ? base + half : base;
    len -= half;
  }
  return *base == v;
}

// A tail entry of neuron j outside its row's head has the log-weight -log(t P_j) = -(this + log(mass_j)), where P_j =
// q_j (1 - Q^tries) / (1 - Q) is its chance of ending on j, q_j = mass_j / total, t the tail's length and `rest` =
// 1 - Q, the proposal's share outside the row's head.
LSH_HD double proposal_row_log_scale(double rest, double total, int64_t t, int64_t tries) {
  // (1 - Q^tries) / (1 - Q): 1 + Q + ... + Q^(tries-1), `tries` where Q is 1
  const double reach = rest > 0 ? -expm1(static_cast<double>(tries) * log1p(-rest)) / rest : static_cast<double>(tries);
  return log(static_cast<double>(t) * reach / total);
}

}  // namespace lsh_torch
