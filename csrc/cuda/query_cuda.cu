// CUDA kernel of the multi-probe query. Same contract, messages and output as
// csrc/cpu/query_cpu.cpp: for the same inputs the active sets are bit-identical.
//
// Design. Rows are processed in chunks of R rows so that the scratch stays under kScratchBytes
// (a dense int32 counter per neuron and row, like the CPU's per-thread counter array). Per chunk:
//   1. flips:     one thread per (row, table) runs probe_flips (lsh_common.h, shared with the CPU).
//   2. count:     one block per (row, table, probe) walks the probed bucket and atomically adds 1
//                 to the neuron's counter. Within a table the probed buckets are distinct, so a
//                 neuron gets at most one hit per table (counts <= L). (query_shared: below.)
//                 A neuron's first hit also lists it in the row's candidate list, so that steps
//                 4-6 scan the row's candidates, not all N counters (at 4M outputs they scanned
//                 4 GB per query); a row whose list overflows (crowded buckets) scans all N, with
//                 the same result: those steps do not depend on the order they visit ids in.
//   3. labels:    one thread per row takes the row's labels in order, skipping padding and
//                 repeats, and marks them chosen (counter = -1, the CPU's kChosen).
//   4. levels:    one block per row histograms the counts (levels 1..L) and finds the level h*
//                 where the budget (less the labels and the `tail` reserved for draws) runs out: every candidate above h* is taken, plus the m
//                 candidates of level h* with the smallest seeded tie-break keys; writes the
//                 row's head (labels + candidates taken).
//   5. threshold: one block per row radix-selects (8 bits a pass, from the top) the m-th smallest
//                 key of level h*; skipped when the whole level fits. Keys are distinct within a
//                 row (seeded_hash is a bijection of the neuron id for a fixed row), so "key <= T"
//                 picks exactly m.
//   6. compact:   one block per row writes the taken candidates (key, -hits, id) into [R, W]
//                 scratch, W = the chunk's largest take (padding sorts last).
//   7. order:     torch.sort(stable) by key, then a stable sort by -hits: hits descending, ties by
//                 key ascending, which is the CPU's order; emitted after the labels and marked
//                 chosen.
//   8. fill:      one block per row takes the seeded draws j = 0 .. 4*budget+63 in tiles of 256
//                 (a draw is kept if its neuron is not chosen and no earlier draw of the tile has
//                 it; a block prefix sum places the kept ones in draw order), then, if the budget
//                 is still not full, the full-period walk the same way. This is the CPU's
//                 sequential loop, in parallel.
//   9. reset:     before the next chunk, one block per row zeroes the counters it touched (its
//                 listed candidates and its output), so only the first chunk's counters are memset.
// Synchronisations: one per chunk to read W (skipped while capturing a CUDA graph, where W is
// the budget), and one at the end to raise what the kernels found (labels out of range, too
// many labels for the budget, malformed tables).
//
// query_shared (one set for the batch, seeded as set -1) reuses the kernels: every row's probes
// count into one counter row (exact int32 counts, as the CPU's), each
// distinct probed bucket once with the number of times it was probed (count_distinct_buckets: the
// rows of a batch probe many of the same buckets, and counting each probe would repeat the reads and
// make their atomics contend on the same counters), the
// labels of all rows are de-duplicated in parallel (first occurrence in row-major order, by an
// atomicMin of the position), and all candidates are compacted and sorted (key, then stable by
// -hits), which for a single set keeps the whole GPU busy; then emit and fill as above. Its one
// synchronisation reads the error flag and the number of candidates together, after the
// compaction: the sorts then cover the candidates only, not N entries.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "cuda_common.cuh"
#include "lsh_common.h"
#include "op_checks.h"

namespace lsh_torch {
namespace {

using cuda::ceil_div;
using cuda::kFullMask;

constexpr int32_t kChosen = -1;                        // counter of a neuron already in the set
constexpr int64_t kScratchBytes = int64_t(512) << 20;  // per-chunk scratch bound (counters dominate)
constexpr int kRowThreads = 512;                       // block size of the per-row scan kernels
constexpr int kFillThreads = 256;                      // block size (= tile) of the fill kernel

enum QueryError : int64_t {
  kLabelRange = 1,
  kCodeRange = 2,
  kBadOffsets = 3,
  kBadItem = 4,
  kRepeatedItem = 5,
  kTooManyLabels = 6,
  kTooManyLabelsShared = 7,
  kInternal = 8,
  kNegativeMargin = 9,
  kOffsetsRange = 10,
  kOffsetsOrder = 11,
  kItemOrder = 12,
};


// What names row b's random streams: query's row_keys[b] where given, else b (as on the CPU).
__device__ __forceinline__ int64_t stream_row(const int64_t* __restrict__ row_keys, int64_t b) {
  return row_keys != nullptr ? row_keys[b] : b;
}

__device__ __forceinline__ uint64_t gcd_u64(uint64_t a, uint64_t b) {
  while (b != 0) {
    const uint64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

// Labels in range; with a budget of 0 (the kernels return before placing labels) none may be
// dropped silently. `per_row`: the number of labels per row for query, 0 for query_shared.
__global__ void check_labels_kernel(const int64_t* __restrict__ labels, int64_t count, int64_t n, bool no_budget,
                                    int64_t per_row, int64_t* flag) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = labels[i];
    if (!valid_label(v, n)) cuda::report(flag, kLabelRange, v);
    else if (no_budget && v >= 0)
      cuda::report(flag, per_row ? kTooManyLabels : kTooManyLabelsShared, per_row ? i / per_row : 0);
  }
}

// The CPU's up-front table check (query_cpu.cpp: check_and_view), O(L * 2^K): every table's offsets
// run from 0 to N and never decrease, whatever the budget and batch.
__global__ void check_offsets_kernel(const int32_t* __restrict__ offsets, int64_t num_tables, int64_t buckets,
                                     int64_t n, int64_t* flag) {
  const int64_t total = num_tables * (buckets + 1);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = t / (buckets + 1), k = t - l * (buckets + 1);
    const int32_t v = offsets[t];
    if ((k == 0 && v != 0) || (k == buckets && v != n)) cuda::report(flag, kOffsetsRange, l);
    else if (k < buckets && v > offsets[t + 1]) cuda::report(flag, kOffsetsOrder, l);
  }
}

// Margins are distances (>= 0; NaN refused, as on the CPU): probe_flips' order assumes it.
__global__ void check_margins_kernel(const float* __restrict__ margins, int64_t count, int64_t num_tables, int bits,
                                     int64_t* flag) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (!(margins[i] >= 0)) cuda::report(flag, kNegativeMargin, i / (num_tables * bits), i / bits % num_tables);
  }
}

// 1. flips[(r * L + l) * probes + p].
__global__ void flips_kernel(const float* __restrict__ margins, int64_t row0, int64_t rows, int64_t num_tables,
                             int bits, int probes, uint32_t* __restrict__ flips) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows * num_tables) return;
  const int64_t r = t / num_tables, l = t - r * num_tables;
  probe_flips(margins + ((row0 + r) * num_tables + l) * bits, bits, probes, flips + t * probes);
}

// 2. query: hits[r, id] += 1 for every neuron of every probed bucket. One block per (r, l, p).
// A count above L is reported (valid tables never give one).
__global__ void count_kernel(const int32_t* __restrict__ codes, const int32_t* __restrict__ offsets,
                             const int32_t* __restrict__ items, const uint32_t* __restrict__ flips, int64_t row0,
                             int64_t num_tables, int64_t buckets, int64_t n, int probes, int32_t* __restrict__ hits,
                             int32_t* __restrict__ listed, int32_t* __restrict__ list, int64_t cap, int64_t* flag) {
  const int64_t blk = blockIdx.x;
  const int64_t rl = blk / probes, p = blk - rl * probes;
  const int64_t r = rl / num_tables, l = rl - r * num_tables;
  const int32_t code = codes[(row0 + r) * num_tables + l];
  if (code < 0 || code >= buckets) {
    if (threadIdx.x == 0 && p == 0) cuda::report(flag, kCodeRange, code, l);
    return;
  }
  const uint32_t bucket = static_cast<uint32_t>(code) ^ flips[rl * probes + p];  // flips only set bits < K
  const int32_t* o = offsets + l * (buckets + 1);
  const int32_t lo = o[bucket], hi = o[bucket + 1];
  if (lo < 0 || hi < lo || hi > n) {
    if (threadIdx.x == 0) cuda::report(flag, kBadOffsets, l, bucket);
    return;
  }
  const int32_t* it = items + l * n;
  int32_t* h = hits + r * n;
  for (int64_t i = lo + static_cast<int64_t>(threadIdx.x); i < hi; i += blockDim.x) {
    const int32_t id = it[i];
    if (id < 0 || id >= n) {
      cuda::report(flag, kBadItem, id, l);
      continue;
    }
    // The contract (and the CPU) requires ascending ids in a bucket; counting here does not rely on it.
    if (i > lo && it[i - 1] >= id) cuda::report(flag, kItemOrder, id, it[i - 1]);
    // A neuron sits in one bucket per table and the probed buckets of a table are distinct, so
    // valid tables never count a neuron more than L times per row.
    const int32_t before = atomicAdd(h + id, 1);
    if (before >= num_tables) cuda::report(flag, kRepeatedItem, id, l);
    if (before == 0) {  // the row's new candidate
      const int32_t slot = atomicAdd(listed + r, 1);
      if (slot < cap) list[r * cap + slot] = id;
    }
  }
}

// The ids that a row's scans (steps 4-6) visit: its listed candidates, or every id where the list
// overflowed. Ids that are not candidates have counter 0 or kChosen, which the scans skip anyway.
struct RowIds {
  const int32_t* list;  // nullptr: the ids 0 .. count - 1
  int64_t count;
  __device__ int64_t operator[](int64_t i) const { return list != nullptr ? list[i] : i; }
};

__device__ RowIds row_ids(const int32_t* listed, const int32_t* list, int64_t cap, int64_t r, int64_t n) {
  const int64_t count = listed[r];
  return count <= cap ? RowIds{list + r * cap, count} : RowIds{nullptr, n};
}

constexpr int64_t kNoSpan = std::numeric_limits<int64_t>::max();  // an empty or invalid bucket: sorts last

// 2'. query_shared: the probed buckets as spans [begin, end) of the flat items (table l's offset l * n
// included), one thread per (row, table, probe), checked as count_kernel checks them. A bucket's
// begin identifies it (empty buckets are kNoSpan): equal begins are repeated probes.
__global__ void span_kernel(const int32_t* __restrict__ codes, const int32_t* __restrict__ offsets,
                            const uint32_t* __restrict__ flips, int64_t spans, int64_t num_tables, int64_t buckets,
                            int64_t n, int probes, int64_t* __restrict__ begin, int64_t* __restrict__ end,
                            int64_t* flag) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= spans) return;
  const int64_t rl = s / probes, p = s - rl * probes;
  const int64_t l = rl % num_tables;
  begin[s] = end[s] = kNoSpan;
  const int32_t code = codes[rl];  // codes are [B, L]: (row, table) = rl
  if (code < 0 || code >= buckets) {
    if (p == 0) cuda::report(flag, kCodeRange, code, l);
    return;
  }
  const uint32_t bucket = static_cast<uint32_t>(code) ^ flips[rl * probes + p];  // flips only set bits < K
  const int32_t* o = offsets + l * (buckets + 1);
  const int32_t lo = o[bucket], hi = o[bucket + 1];
  if (lo < 0 || hi < lo || hi > n) {
    cuda::report(flag, kBadOffsets, l, bucket);
    return;
  }
  if (lo < hi) begin[s] = l * n + lo, end[s] = l * n + hi;
}

// 2''. query_shared: hits[id] += weight for every neuron of each distinct probed bucket, from the
// spans sorted by begin: block s counts its span if it is the first of its run of equal begins,
// weight = the run's length. One block per span (the repeats return at once).
__global__ void count_spans_kernel(const int64_t* __restrict__ sorted_begin, const int64_t* __restrict__ sorted_end,
                                   const bool* __restrict__ first, const int32_t* __restrict__ run,
                                   const int32_t* __restrict__ run_length, const int32_t* __restrict__ items,
                                   int64_t n, int32_t* __restrict__ hits, int64_t* flag) {
  const int64_t s = blockIdx.x;
  const int64_t lo = sorted_begin[s];
  if (!first[s] || lo == kNoSpan) return;
  const int32_t weight = run_length[run[s]];
  const int64_t hi = sorted_end[s], l = lo / n;
  for (int64_t i = lo + static_cast<int64_t>(threadIdx.x); i < hi; i += blockDim.x) {
    const int32_t id = items[i];
    if (id < 0 || id >= n) {
      cuda::report(flag, kBadItem, id, l);
      continue;
    }
    if (i > lo && items[i - 1] >= id) cuda::report(flag, kItemOrder, id, items[i - 1]);
    atomicAdd(hits + id, weight);
  }
}

// 3. Labels first, in order, without padding and repeats. One thread per row.
__global__ void labels_kernel(const int64_t* __restrict__ labels, int64_t num_labels, int64_t row0, int64_t rows,
                              int64_t n, int64_t budget, int32_t* __restrict__ hits, int64_t* __restrict__ out,
                              int32_t* __restrict__ filled, int64_t* flag) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const int64_t b = row0 + r;
  int32_t* h = hits + r * n;
  int64_t* o = out + b * budget;
  int64_t f = 0;
  for (int64_t j = 0; j < num_labels; ++j) {
    const int64_t id = labels[b * num_labels + j];
    if (id < 0 || id >= n || h[id] == kChosen) continue;  // out of range: reported by check_labels_kernel
    if (f >= budget) {
      cuda::report(flag, kTooManyLabels, b);
      break;
    }
    h[id] = kChosen;
    o[f++] = id;
  }
  filled[r] = static_cast<int32_t>(f);
}

// 4. meta[r] = {take, h*, m, count of level h*}, head[row0 + r] = labels + take. One block per row.
__global__ void levels_kernel(const int32_t* __restrict__ hits, int64_t n, const int32_t* __restrict__ listed,
                              const int32_t* __restrict__ list, int64_t cap, int num_tables, int64_t budget,
                              int64_t tail, const int32_t* __restrict__ filled, int32_t* __restrict__ meta,
                              int64_t row0, int64_t* __restrict__ head) {
  __shared__ int cnt[kMaxTables + 1];
  const int64_t r = blockIdx.x;
  for (int i = threadIdx.x; i <= num_tables; i += blockDim.x) cnt[i] = 0;
  __syncthreads();
  const int32_t* h = hits + r * n;
  const RowIds ids = row_ids(listed, list, cap, r, n);
  const int lane = threadIdx.x & 31;
  for (int64_t base = threadIdx.x - lane; base < ids.count; base += blockDim.x) {  // warp-uniform trip count
    const int64_t i = base + lane;
    const int32_t c = i < ids.count ? h[ids[i]] : 0;
    const bool valid = c > 0 && c <= num_tables;
    const unsigned peers = __match_any_sync(kFullMask, valid ? c : 0);
    if (valid && lane == __ffs(peers) - 1) atomicAdd(&cnt[c], __popc(peers));
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t candidates = 0;
    for (int i = 1; i <= num_tables; ++i) candidates += cnt[i];
    const int64_t take = std::min<int64_t>(std::max<int64_t>(0, budget - filled[r] - tail), candidates);
    int32_t hstar = 0, m = 0, level_count = 0;
    if (take > 0) {
      int64_t cum = 0;
      for (int lvl = num_tables; lvl >= 1; --lvl) {
        if (cum + cnt[lvl] >= take) {
          hstar = lvl;
          m = static_cast<int32_t>(take - cum);
          level_count = cnt[lvl];
          break;
        }
        cum += cnt[lvl];
      }
    }
    meta[r * 4 + 0] = static_cast<int32_t>(take);
    meta[r * 4 + 1] = hstar;
    meta[r * 4 + 2] = m;
    meta[r * 4 + 3] = level_count;
    head[row0 + r] = filled[r] + take;
  }
}

// 5. thresh[r] = the m-th smallest tie-break key of level h* (all ones when the level fits).
__global__ void threshold_kernel(const int32_t* __restrict__ hits, int64_t n, const int32_t* __restrict__ listed,
                                 const int32_t* __restrict__ list, int64_t cap, int64_t row0, int64_t seed,
                                 const int64_t* __restrict__ row_keys, const int32_t* __restrict__ meta,
                                 unsigned long long* __restrict__ thresh) {
  __shared__ unsigned int hist[256];
  __shared__ unsigned long long s_prefix, s_mask;
  __shared__ int s_remaining, s_done;
  const int64_t r = blockIdx.x;
  const int32_t take = meta[r * 4 + 0], hstar = meta[r * 4 + 1], m = meta[r * 4 + 2], level_count = meta[r * 4 + 3];
  if (take == 0 || m == level_count) {
    if (threadIdx.x == 0) thresh[r] = ~0ull;
    return;
  }
  const uint64_t key0 = stream_key(seed, kTieBreak, stream_row(row_keys, row0 + r));
  const int32_t* h = hits + r * n;
  const RowIds ids = row_ids(listed, list, cap, r, n);
  unsigned long long prefix = 0, mask = 0;
  int remaining = m;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int64_t i = threadIdx.x; i < ids.count; i += blockDim.x) {
      const int64_t id = ids[i];
      if (h[id] != hstar) continue;
      const unsigned long long k = keyed_hash(key0, static_cast<uint64_t>(id));
      if ((k & mask) == prefix) atomicAdd(&hist[(k >> shift) & 0xffu], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int cum = 0, digit = 0;
      for (; digit < 255; ++digit) {  // the current bin holds >= remaining keys, so digit 255 is the last resort
        if (cum + static_cast<int>(hist[digit]) >= remaining) break;
        cum += static_cast<int>(hist[digit]);
      }
      remaining -= cum;
      prefix |= static_cast<unsigned long long>(digit) << shift;
      mask |= 0xffull << shift;
      s_prefix = prefix;
      s_mask = mask;
      s_remaining = remaining;
      s_done = static_cast<int>(hist[digit]) == remaining;  // the whole bin is taken
    }
    __syncthreads();
    prefix = s_prefix;
    mask = s_mask;
    remaining = s_remaining;
    if (s_done) {
      if (threadIdx.x == 0) thresh[r] = prefix | ((1ull << shift) - 1ull);
      return;
    }
  }
  if (threadIdx.x == 0) thresh[r] = prefix;  // not reached: keys of a row are distinct
}

// 6. The taken candidates into [rows, W] scratch, in any order (step 7 sorts them).
__global__ void compact_kernel(const int32_t* __restrict__ hits, int64_t n, const int32_t* __restrict__ listed,
                               const int32_t* __restrict__ list, int64_t cap, int num_tables, int64_t row0,
                               int64_t seed, const int64_t* __restrict__ row_keys, const int32_t* __restrict__ meta,
                               const unsigned long long* __restrict__ thresh, int64_t width,
                               int64_t* __restrict__ sel_key, int32_t* __restrict__ sel_level,
                               int32_t* __restrict__ sel_id, int64_t* flag) {
  __shared__ int cursor;
  const int64_t r = blockIdx.x;
  const int32_t take = meta[r * 4 + 0], hstar = meta[r * 4 + 1];
  if (take == 0) return;
  if (threadIdx.x == 0) cursor = 0;
  __syncthreads();
  const unsigned long long limit = thresh[r];
  const uint64_t key0 = stream_key(seed, kTieBreak, stream_row(row_keys, row0 + r));
  const int32_t* h = hits + r * n;
  const RowIds ids = row_ids(listed, list, cap, r, n);
  const int lane = threadIdx.x & 31;
  for (int64_t base = threadIdx.x - lane; base < ids.count; base += blockDim.x) {  // warp-uniform trip count
    const int64_t i = base + lane;
    const int64_t id = i < ids.count ? ids[i] : 0;
    const int32_t c = i < ids.count ? h[id] : 0;
    bool keep = c >= hstar && c <= num_tables;  // hstar >= 1 excludes 0 and kChosen
    unsigned long long k = 0;
    if (keep) {
      k = keyed_hash(key0, static_cast<uint64_t>(id));
      keep = c > hstar || k <= limit;
    }
    const unsigned ballot = __ballot_sync(kFullMask, keep);
    if (ballot == 0) continue;
    int slot0 = 0;
    if (lane == __ffs(ballot) - 1) slot0 = atomicAdd(&cursor, __popc(ballot));
    slot0 = __shfl_sync(kFullMask, slot0, __ffs(ballot) - 1);
    if (keep) {
      const int64_t slot = slot0 + __popc(ballot & ((1u << lane) - 1u));
      if (slot < width) {
        const int64_t at = r * width + slot;
        sel_key[at] = static_cast<int64_t>(k ^ (1ull << 63));  // unsigned order as signed order
        sel_level[at] = -c;                                    // hits descending
        sel_id[at] = static_cast<int32_t>(id);
      }
    }
  }
  __syncthreads();
  if (threadIdx.x == 0 && cursor != take) cuda::report(flag, kInternal, row0 + r, cursor, take);
}

// 7b. The ordered candidates after the labels; marks them chosen. One thread per (r, i).
__global__ void emit_kernel(const int32_t* __restrict__ ordered, int64_t width, int64_t rows,
                            const int32_t* __restrict__ meta, const int32_t* __restrict__ filled, int64_t row0,
                            int64_t n, int64_t budget, int32_t* __restrict__ hits, int64_t* __restrict__ out) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows * width) return;
  const int64_t r = t / width, i = t - r * width;
  if (i >= meta[r * 4 + 0]) return;
  const int32_t id = ordered[t];
  if (id < 0 || id >= n) return;  // not reached: padding sorts after the take
  out[(row0 + r) * budget + filled[r] + i] = id;
  hits[r * n + id] = kChosen;
}

// 9. The chunk's counters back to zero for the next chunk: every one it touched is a listed
// candidate (all N where the list overflowed) or in the row's output (labels, fill draws). One
// block per row: O(candidates + budget), where zeroing every chunk cost O(N) per row.
__global__ void reset_kernel(int32_t* __restrict__ hits, int64_t n, const int32_t* __restrict__ listed,
                             const int32_t* __restrict__ list, int64_t cap, const int64_t* __restrict__ out,
                             int64_t row0, int64_t budget) {
  const int64_t r = blockIdx.x;
  int32_t* h = hits + r * n;
  const RowIds ids = row_ids(listed, list, cap, r, n);
  for (int64_t i = threadIdx.x; i < ids.count; i += blockDim.x) h[ids[i]] = 0;
  const int64_t* o = out + (row0 + r) * budget;
  for (int64_t j = threadIdx.x; j < budget; j += blockDim.x) {
    const int64_t id = o[j];
    if (id >= 0 && id < n) h[id] = 0;  // (a row the kernels flagged may leave entries unwritten)
  }
}

// 8. Seeded random fill up to the budget. One block per row.
// Set r writes output row row0 + r and draws from the streams of set seed_row0 + r (the row for
// query, -1 for query_shared), or of row_keys[row0 + r] where query's row_keys are given.
__global__ void __launch_bounds__(kFillThreads) fill_kernel(int64_t row0, int64_t seed_row0,
                                                            const int64_t* __restrict__ row_keys, int64_t n,
                                                            int64_t budget, int64_t seed,
                                                            const int32_t* __restrict__ meta,
                                                            const int32_t* __restrict__ filled_labels,
                                                            int32_t* __restrict__ hits, int64_t* __restrict__ out) {
  __shared__ int32_t s_ids[kFillThreads];
  __shared__ int scan[kFillThreads / 32];
  __shared__ unsigned long long s_walk[2];
  const int64_t r = blockIdx.x, b = row_keys != nullptr ? row_keys[row0 + r] : seed_row0 + r;
  int32_t* h = hits + r * n;
  int64_t* o = out + (row0 + r) * budget;
  int64_t filled = static_cast<int64_t>(filled_labels[r]) + meta[r * 4 + 0];
  if (filled >= budget) return;  // block-uniform
  const uint64_t un = static_cast<uint64_t>(n);
  const uint64_t draw_key = stream_key(seed, kFillDraw, b);
  const uint64_t max_draws = 4 * static_cast<uint64_t>(budget) + 64;
  for (uint64_t t0 = 0; filled < budget && t0 < max_draws; t0 += kFillThreads) {
    const uint64_t j = t0 + threadIdx.x;
    int32_t id = -1;
    bool keep = false;
    if (j < max_draws) {
      id = static_cast<int32_t>(keyed_hash(draw_key, j) % un);
      keep = h[id] != kChosen;
    }
    s_ids[threadIdx.x] = id;
    __syncthreads();
    if (keep) {
      for (int q = 0; q < static_cast<int>(threadIdx.x); ++q) {
        if (s_ids[q] == id) {  // an earlier draw of this tile has it
          keep = false;
          break;
        }
      }
    }
    int total = 0;
    const int pos = cuda::block_exclusive_scan<kFillThreads>(keep ? 1 : 0, scan, &total);
    if (keep && filled + pos < budget) {
      o[filled + pos] = id;
      h[id] = kChosen;
    }
    filled = std::min<int64_t>(budget, filled + total);
    __syncthreads();
  }
  if (filled >= budget) return;  // block-uniform
  // The budget is close to N: walk a seeded full-period arithmetic sequence.
  if (threadIdx.x == 0) {
    const uint64_t pos = seeded_hash(seed, kFillWalk, b, 0) % un;
    uint64_t stride = un > 1 ? 1 + seeded_hash(seed, kFillWalk, b, 1) % (un - 1) : 1;
    while (gcd_u64(stride, un) != 1) ++stride;
    s_walk[0] = pos;
    s_walk[1] = stride;
  }
  __syncthreads();
  const uint64_t pos0 = s_walk[0], stride = s_walk[1];
  for (uint64_t t0 = 0; filled < budget && t0 < un; t0 += kFillThreads) {
    const uint64_t i = t0 + threadIdx.x;
    uint64_t p = 0;
    bool keep = false;
    if (i < un) {
      p = (pos0 + i * stride) % un;  // i, stride < 2^31: no overflow
      keep = h[p] != kChosen;
    }
    int total = 0;
    const int pos = cuda::block_exclusive_scan<kFillThreads>(keep ? 1 : 0, scan, &total);
    if (keep && filled + pos < budget) {
      o[filled + pos] = static_cast<int64_t>(p);
      h[p] = kChosen;
    }
    filled = std::min<int64_t>(budget, filled + total);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// query_shared only

// first[id] = the smallest flat position (row-major over [B, M]) holding label id.
__global__ void first_label_kernel(const int64_t* __restrict__ labels, int64_t count, int64_t n,
                                   int32_t* __restrict__ first) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < count;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t id = labels[q];
    if (id >= 0 && id < n) atomicMin(first + id, static_cast<int32_t>(q));
  }
}

__global__ void keep_label_kernel(const int64_t* __restrict__ labels, int64_t count, int64_t n,
                                  const int32_t* __restrict__ first, int32_t* __restrict__ keep) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < count;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t id = labels[q];
    keep[q] = id >= 0 && id < n && first[id] == q ? 1 : 0;
  }
}

// The distinct labels in first-occurrence order; position = inclusive prefix sum - 1.
__global__ void place_labels_kernel(const int64_t* __restrict__ labels, int64_t count, const int32_t* __restrict__ keep,
                                    const int32_t* __restrict__ position, int64_t budget, int32_t* __restrict__ hits,
                                    int64_t* __restrict__ out, int32_t* __restrict__ filled, int64_t* flag) {
  for (int64_t q = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; q < count;
       q += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (q == count - 1) {
      const int64_t total = position[q];
      if (total > budget) cuda::report(flag, kTooManyLabelsShared, total);
      filled[0] = static_cast<int32_t>(total < budget ? total : budget);
    }
    if (!keep[q]) continue;
    const int64_t at = position[q] - 1;
    if (at >= budget) continue;
    const int64_t id = labels[q];
    out[at] = id;
    hits[id] = kChosen;
  }
}

// Every candidate (counted, not chosen) into [1, n] scratch; count[0] = how many.
__global__ void compact_all_kernel(const int32_t* __restrict__ hits, int64_t n, int64_t seed,
                                   int64_t* __restrict__ sel_key, int32_t* __restrict__ sel_level,
                                   int32_t* __restrict__ sel_id, int32_t* __restrict__ count) {
  const uint64_t key0 = stream_key(seed, kTieBreak, -1);
  const int lane = threadIdx.x & 31;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x - lane; base < n; base += step) {
    const int64_t id = base + lane;
    const int32_t c = id < n ? hits[id] : 0;
    const bool keep = c > 0;  // kChosen is negative
    const unsigned ballot = __ballot_sync(kFullMask, keep);
    if (ballot == 0) continue;
    int slot0 = 0;
    if (lane == __ffs(ballot) - 1) slot0 = atomicAdd(count, __popc(ballot));
    slot0 = __shfl_sync(kFullMask, slot0, __ffs(ballot) - 1);
    if (keep) {
      const int64_t slot = slot0 + __popc(ballot & ((1u << lane) - 1u));
      sel_key[slot] = static_cast<int64_t>(keyed_hash(key0, static_cast<uint64_t>(id)) ^ (1ull << 63));
      sel_level[slot] = -c;  // hits descending
      sel_id[slot] = static_cast<int32_t>(id);
    }
  }
}

// meta[0] = take = min(budget - labels - tail, candidates); the other fields are unused here.
// head[0] = labels + take.
__global__ void shared_meta_kernel(const int32_t* __restrict__ count, const int32_t* __restrict__ filled,
                                   int64_t budget, int64_t tail, int32_t* __restrict__ meta, int64_t* __restrict__ head) {
  const int64_t room = budget - filled[0] - tail > 0 ? budget - filled[0] - tail : 0;
  meta[0] = static_cast<int32_t>(count[0] < room ? count[0] : room);
  meta[1] = meta[2] = meta[3] = 0;
  head[0] = filled[0] + meta[0];
}

// ---------------------------------------------------------------------------------------------
// Host side

struct QueryInputs {
  at::Tensor codes, margins, offsets, items, labels;  // contiguous; labels undefined if absent
  int64_t batch, num_tables, n, buckets, bits, num_labels;
};

// The shared checks (op_checks.h), plus device checks.
QueryInputs check_query(const at::Tensor& codes, const at::Tensor& margins, const at::Tensor& offsets,
                        const at::Tensor& items, int64_t probes, int64_t budget, int64_t tail,
                        const std::optional<at::Tensor>& labels_in, const char* op) {
  const QueryShape shape = check_query_args(codes, margins, offsets, items, probes, budget, tail, labels_in, op);
  cuda::check_cuda(codes, "codes", op);
  const at::Device device = codes.device();
  cuda::check_same_device(margins, device, "margins", op);
  cuda::check_same_device(offsets, device, "offsets", op);
  cuda::check_same_device(items, device, "items", op);
  QueryInputs in;
  if (labels_in.has_value() && labels_in->defined()) {
    cuda::check_same_device(*labels_in, device, "labels", op);
    in.labels = labels_in->contiguous();
  }
  in.codes = codes.contiguous();
  in.margins = margins.contiguous();
  in.offsets = offsets.contiguous();
  in.items = items.contiguous();
  in.batch = shape.batch;
  in.num_tables = shape.num_tables;
  in.n = shape.n;
  in.buckets = shape.buckets;
  in.bits = shape.bits;
  in.num_labels = shape.num_labels;
  return in;
}

// The CPU's up-front checks in its order (offsets, margins, labels), whatever the budget and batch.
void check_inputs(const QueryInputs& in, int64_t budget, bool shared, cudaStream_t stream, int64_t* flag) {
  const int64_t entries = in.num_tables * (in.buckets + 1);
  if (entries > 0) {
    check_offsets_kernel<<<std::min<int64_t>(ceil_div(entries, 256), 4096), 256, 0, stream>>>(
        in.offsets.data_ptr<int32_t>(), in.num_tables, in.buckets, in.n, flag);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t num_margins = in.margins.numel();
  if (num_margins > 0) {
    check_margins_kernel<<<std::min<int64_t>(ceil_div(num_margins, 256), 4096), 256, 0, stream>>>(
        in.margins.data_ptr<float>(), num_margins, in.num_tables, static_cast<int>(in.bits), flag);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t count = in.labels.defined() ? in.labels.numel() : 0;
  if (count == 0) return;
  check_labels_kernel<<<std::min<int64_t>(ceil_div(count, 256), 4096), 256, 0, stream>>>(
      in.labels.data_ptr<int64_t>(), count, in.n, budget == 0, shared ? 0 : in.num_labels, flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Raises what the kernels recorded, with the CPU's messages where the CPU checks the same thing.
void raise_if(const std::array<int64_t, 4>& e, const QueryInputs& in, int64_t budget, const char* op) {
  switch (e[0]) {
    case 0:
      return;
    case kLabelRange:
      TORCH_CHECK_VALUE(false, op, ": labels must be in [0, N = ", in.n, ") or -1 / ", kIgnoreIndex, " for padding, got ", e[1]);
    case kCodeRange:
      TORCH_CHECK(false, op, ": codes must be in [0, 2^K = ", in.buckets, "), got ", e[1], " (table ", e[2], ")");
    case kBadOffsets:
      TORCH_CHECK(false, op, ": offsets of table ", e[1], " are not a CSR layout over [0, N = ", in.n,
                  "] (bucket ", e[2], "); tables must come from build_tables");
    case kBadItem:
      TORCH_CHECK(false, op, ": items of table ", e[2], " hold neuron id ", e[1], " outside [0, N = ", in.n,
                  "); tables must come from build_tables");
    case kRepeatedItem:
      TORCH_CHECK(false, op, ": neuron ", e[1], " was found more than once in table ", e[2],
                  "; tables must come from build_tables");
    case kTooManyLabels:
      TORCH_CHECK(false, op, ": row ", e[1], " has more distinct labels than the budget ", budget,
                  "; raise the active budget");
    case kTooManyLabelsShared:
      TORCH_CHECK(false, op, ": the batch has more distinct labels than the budget ", budget,
                  "; raise the active budget");
    case kOffsetsRange:
      TORCH_CHECK(false, op, ": offsets of table ", e[1], " must run from 0 to N = ", in.n);
    case kOffsetsOrder:
      TORCH_CHECK(false, op, ": offsets of table ", e[1], " must be non-decreasing");
    case kItemOrder:
      TORCH_CHECK(false, op, ": the ids in each bucket of items must ascend, within [0, N = ", in.n, "), got ", e[1],
                  " after ", e[2]);
    case kNegativeMargin:
      TORCH_CHECK(false, op, ": margins must be >= 0 (distances to the hyperplanes, as hash_codes gives them), got a "
                  "negative or NaN one at row ", e[1], ", table ", e[2]);
    default:
      TORCH_CHECK(false, op, ": internal error ", e[0], " (", e[1], ", ", e[2], ", ", e[3],
                  "); please report it with the inputs");
  }
}

void raise_if_flagged(const cuda::ErrorFlag& flag, const QueryInputs& in, int64_t budget, const char* op) {
  raise_if(flag.read(), in, budget, op);
}

int count_threads_for(const QueryInputs& in) {
  return static_cast<int>(std::clamp<int64_t>(ceil_div(ceil_div(in.n, in.buckets), 32) * 32, 32, 256));
}

// Hits descending, ties by key ascending: sort by key, then stable by -hits. [rows, width] int32.
at::Tensor order_candidates(const at::Tensor& sel_key, const at::Tensor& sel_level, const at::Tensor& sel_id) {
  const auto by_key = std::get<1>(at::sort(sel_key, /*stable=*/true, /*dim=*/1, /*descending=*/false));
  const auto level_by_key = sel_level.gather(1, by_key);
  const auto id_by_key = sel_id.gather(1, by_key);
  const auto by_level = std::get<1>(at::sort(level_by_key, /*stable=*/true, /*dim=*/1, /*descending=*/false));
  return id_by_key.gather(1, by_level).contiguous();
}

// query_shared's counting (2' and 2''): the spans sorted by begin, each run of equal begins (one
// bucket probed that many times) counted once with its length as the weight, as the CPU's
// merge_repeated_spans does. No synchronisation: the runs are marked, numbered and measured on the device
// (scratch: ~80 bytes per probe, 3 MB for 1,024 rows x 20 tables x 2 probes).
void count_distinct_buckets(const QueryInputs& in, const at::Tensor& flips, int64_t probes, at::Tensor& hits,
                            int64_t* flag, cudaStream_t stream) {
  const int64_t spans = in.batch * in.num_tables * probes;
  const auto long_opts = in.codes.options().dtype(at::kLong);
  auto begin = at::empty({spans}, long_opts), end = at::empty({spans}, long_opts);
  span_kernel<<<ceil_div(spans, 256), 256, 0, stream>>>(
      in.codes.data_ptr<int32_t>(), in.offsets.data_ptr<int32_t>(),
      reinterpret_cast<const uint32_t*>(flips.data_ptr<int32_t>()),
      spans, in.num_tables, in.buckets, in.n, static_cast<int>(probes), begin.data_ptr<int64_t>(),
      end.data_ptr<int64_t>(), flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto [sorted_begin, order] = at::sort(begin);
  const auto sorted_end = end.index_select(0, order);
  auto first = at::ones({spans}, long_opts.dtype(at::kBool));
  if (spans > 1)  // a run starts where the begin changes
    first.narrow(0, 1, spans - 1).copy_(sorted_begin.narrow(0, 1, spans - 1).ne(sorted_begin.narrow(0, 0, spans - 1)));
  const auto run = at::cumsum(first, 0, at::kInt).sub_(1);
  const auto ones = at::ones({spans}, in.codes.options());
  const auto run_length = at::zeros({spans}, in.codes.options()).index_add_(0, run, ones);
  count_spans_kernel<<<spans, count_threads_for(in), 0, stream>>>(
      sorted_begin.data_ptr<int64_t>(), sorted_end.data_ptr<int64_t>(), first.data_ptr<bool>(),
      run.data_ptr<int32_t>(), run_length.data_ptr<int32_t>(), in.items.data_ptr<int32_t>(), in.n,
      hits.data_ptr<int32_t>(), flag);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> query_cuda(const at::Tensor& codes_in, const at::Tensor& margins_in,
                                              const at::Tensor& offsets_in, const at::Tensor& items_in, int64_t probes,
                                              int64_t budget, const std::optional<at::Tensor>& labels_in, int64_t seed,
                                              int64_t tail, const std::optional<at::Tensor>& row_keys_in) {
  const char* op = "query";
  const QueryInputs in =
      check_query(codes_in, margins_in, offsets_in, items_in, probes, budget, tail, labels_in, op);
  check_row_keys(row_keys_in, codes_in);
  const at::Tensor row_keys =
      row_keys_in.has_value() && row_keys_in->defined() ? row_keys_in->contiguous() : at::Tensor();
  const int64_t* keys = row_keys.defined() ? row_keys.data_ptr<int64_t>() : nullptr;
  const int64_t batch = in.batch, num_tables = in.num_tables, n = in.n;
  const c10::cuda::CUDAGuard guard(in.codes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto active = at::empty({batch, budget}, in.codes.options().dtype(at::kLong));
  auto head = at::zeros({batch}, in.codes.options().dtype(at::kLong));
  cuda::ErrorFlag flag(in.codes.device(), stream);
  check_inputs(in, budget, /*shared=*/false, stream, flag.ptr());
  if (batch == 0 || budget == 0) {  // the CPU checks the tables and margins even then
    raise_if_flagged(flag, in, budget, op);
    return {active, head};
  }

  // Room for a row's candidate list: four times the expected count (L x probes x the mean bucket
  // size), at most N / 8 (beyond that a list read plus a scattered counter read cost more than
  // scanning all N counters), at least 1,024 (all N below that); a row with more scans all N.
  const int64_t expected = 4 * num_tables * probes * ceil_div(n, in.buckets);
  const int64_t cap = std::min<int64_t>(n, std::max<int64_t>(1024, std::min<int64_t>(n / 8, expected)));
  // Rows per chunk: an int32 counter per neuron, the candidate list, the selection scratch and its sorted copies.
  const int64_t per_row = 4 * n + 4 * cap + 64 * budget + 4 * num_tables * probes + 64;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(batch, kScratchBytes / per_row));
  const auto int_opts = in.codes.options();
  auto hits = at::zeros({chunk, n}, int_opts);  // zeroed once: each chunk resets what it touched (9)
  auto listed = at::empty({chunk}, int_opts);
  auto list = at::empty({chunk, cap}, int_opts);
  auto flips = at::empty({chunk * num_tables * probes}, int_opts);
  auto filled = at::empty({chunk}, int_opts);
  auto meta = at::empty({chunk, 4}, int_opts);
  auto thresh = at::empty({chunk}, int_opts.dtype(at::kLong));
  const bool capturing = cuda::stream_is_capturing(stream);
  const int count_threads = count_threads_for(in);

  for (int64_t row0 = 0; row0 < batch; row0 += chunk) {
    const int64_t rows = std::min(chunk, batch - row0);
    C10_CUDA_CHECK(cudaMemsetAsync(listed.data_ptr<int32_t>(), 0, rows * sizeof(int32_t), stream));
    if (num_tables > 0) {  // L = 0 is valid (no candidates, fill only) but would be an empty grid
      flips_kernel<<<ceil_div(rows * num_tables, 128), 128, 0, stream>>>(
          in.margins.data_ptr<float>(), row0, rows, num_tables, static_cast<int>(in.bits), static_cast<int>(probes),
          reinterpret_cast<uint32_t*>(flips.data_ptr<int32_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      count_kernel<<<rows * num_tables * probes, count_threads, 0, stream>>>(
          in.codes.data_ptr<int32_t>(), in.offsets.data_ptr<int32_t>(), in.items.data_ptr<int32_t>(),
          reinterpret_cast<const uint32_t*>(flips.data_ptr<int32_t>()), row0, num_tables, in.buckets, n,
          static_cast<int>(probes), hits.data_ptr<int32_t>(), listed.data_ptr<int32_t>(), list.data_ptr<int32_t>(), cap,
          flag.ptr());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    labels_kernel<<<ceil_div(rows, 128), 128, 0, stream>>>(
        in.num_labels ? in.labels.data_ptr<int64_t>() : nullptr, in.num_labels, row0, rows, n, budget,
        hits.data_ptr<int32_t>(), active.data_ptr<int64_t>(), filled.data_ptr<int32_t>(), flag.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    levels_kernel<<<rows, kRowThreads, 0, stream>>>(hits.data_ptr<int32_t>(), n, listed.data_ptr<int32_t>(),
                                                    list.data_ptr<int32_t>(), cap, static_cast<int>(num_tables), budget,
                                                    tail, filled.data_ptr<int32_t>(), meta.data_ptr<int32_t>(), row0,
                                                    head.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Width of the selection scratch: the chunk's largest take (one synchronisation), or the
    // budget while a CUDA graph is being captured (padding sorts last, the result is the same).
    const int64_t width = capturing ? budget : meta.narrow(0, 0, rows).select(1, 0).max().item<int32_t>();
    if (width > 0) {
      threshold_kernel<<<rows, kRowThreads, 0, stream>>>(
          hits.data_ptr<int32_t>(), n, listed.data_ptr<int32_t>(), list.data_ptr<int32_t>(), cap, row0, seed, keys,
          meta.data_ptr<int32_t>(),
          reinterpret_cast<unsigned long long*>(thresh.data_ptr<int64_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      auto sel_key = at::full({rows, width}, std::numeric_limits<int64_t>::max(), int_opts.dtype(at::kLong));
      auto sel_level = at::full({rows, width}, std::numeric_limits<int32_t>::max(), int_opts);
      auto sel_id = at::full({rows, width}, -1, int_opts);
      compact_kernel<<<rows, kRowThreads, 0, stream>>>(
          hits.data_ptr<int32_t>(), n, listed.data_ptr<int32_t>(), list.data_ptr<int32_t>(), cap,
          static_cast<int>(num_tables), row0, seed, keys, meta.data_ptr<int32_t>(),
          reinterpret_cast<const unsigned long long*>(thresh.data_ptr<int64_t>()), width,
          sel_key.data_ptr<int64_t>(), sel_level.data_ptr<int32_t>(), sel_id.data_ptr<int32_t>(), flag.ptr());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const auto ordered = order_candidates(sel_key, sel_level, sel_id);
      emit_kernel<<<ceil_div(rows * width, 256), 256, 0, stream>>>(
          ordered.data_ptr<int32_t>(), width, rows, meta.data_ptr<int32_t>(), filled.data_ptr<int32_t>(), row0, n,
          budget, hits.data_ptr<int32_t>(), active.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    fill_kernel<<<rows, kFillThreads, 0, stream>>>(row0, /*seed_row0=*/row0, keys, n, budget, seed,
                                                   meta.data_ptr<int32_t>(), filled.data_ptr<int32_t>(),
                                                   hits.data_ptr<int32_t>(), active.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (row0 + rows < batch) {
      reset_kernel<<<rows, kRowThreads, 0, stream>>>(hits.data_ptr<int32_t>(), n, listed.data_ptr<int32_t>(),
                                                     list.data_ptr<int32_t>(), cap, active.data_ptr<int64_t>(), row0,
                                                     budget);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  raise_if_flagged(flag, in, budget, op);
  return {active, head};
}

std::tuple<at::Tensor, at::Tensor> query_shared_cuda(const at::Tensor& codes_in, const at::Tensor& margins_in,
                                                     const at::Tensor& offsets_in, const at::Tensor& items_in,
                                                     int64_t probes, int64_t budget,
                                                     const std::optional<at::Tensor>& labels_in, int64_t seed,
                                                     int64_t tail) {
  const char* op = "query_shared";
  const QueryInputs in =
      check_query(codes_in, margins_in, offsets_in, items_in, probes, budget, tail, labels_in, op);
  const int64_t batch = in.batch, num_tables = in.num_tables, n = in.n;
  const c10::cuda::CUDAGuard guard(in.codes.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto int_opts = in.codes.options();
  auto indices = at::empty({budget}, int_opts.dtype(at::kLong));
  auto head = at::zeros({}, int_opts.dtype(at::kLong));
  cuda::ErrorFlag flag(in.codes.device(), stream);
  check_inputs(in, budget, /*shared=*/true, stream, flag.ptr());
  if (budget == 0) {  // the CPU checks the tables and margins even then
    raise_if_flagged(flag, in, budget, op);
    return {indices, head};
  }
  auto hits = at::zeros({1, n}, int_opts);
  if (batch > 0 && num_tables > 0) {  // L = 0: no candidates, and an empty grid is a launch error
    TORCH_CHECK(batch * num_tables * probes < std::numeric_limits<int32_t>::max(), op, ": B * L * probes is too large");
    auto flips = at::empty({batch * num_tables * probes}, int_opts);
    flips_kernel<<<ceil_div(batch * num_tables, 128), 128, 0, stream>>>(
        in.margins.data_ptr<float>(), 0, batch, num_tables, static_cast<int>(in.bits), static_cast<int>(probes),
        reinterpret_cast<uint32_t*>(flips.data_ptr<int32_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    count_distinct_buckets(in, flips, probes, hits, flag.ptr(), stream);
  }
  auto filled = at::zeros({1}, int_opts);
  const int64_t num_flat = in.labels.defined() ? in.labels.numel() : 0;
  if (num_flat > 0) {
    auto first = at::full({n}, std::numeric_limits<int32_t>::max(), int_opts);
    auto keep = at::empty({num_flat}, int_opts);
    const int64_t blocks = std::min<int64_t>(ceil_div(num_flat, 256), 4096);
    first_label_kernel<<<blocks, 256, 0, stream>>>(in.labels.data_ptr<int64_t>(), num_flat, n,
                                                   first.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    keep_label_kernel<<<blocks, 256, 0, stream>>>(in.labels.data_ptr<int64_t>(), num_flat, n,
                                                  first.data_ptr<int32_t>(), keep.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto position = at::cumsum(keep, 0, at::kInt);
    place_labels_kernel<<<blocks, 256, 0, stream>>>(in.labels.data_ptr<int64_t>(), num_flat,
                                                    keep.data_ptr<int32_t>(), position.data_ptr<int32_t>(), budget,
                                                    hits.data_ptr<int32_t>(), indices.data_ptr<int64_t>(),
                                                    filled.data_ptr<int32_t>(), flag.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // All candidates, then the same order as per row: hits descending, ties by key ascending.
  auto count = at::zeros({1}, int_opts);
  auto sel_key = at::full({1, n}, std::numeric_limits<int64_t>::max(), int_opts.dtype(at::kLong));
  auto sel_level = at::full({1, n}, std::numeric_limits<int32_t>::max(), int_opts);
  auto sel_id = at::full({1, n}, -1, int_opts);
  compact_all_kernel<<<std::min<int64_t>(ceil_div(n, 256), 2048), 256, 0, stream>>>(
      hits.data_ptr<int32_t>(), n, seed, sel_key.data_ptr<int64_t>(), sel_level.data_ptr<int32_t>(),
      sel_id.data_ptr<int32_t>(), count.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The op's one synchronisation, after the last kernel that reports problems: raise them, and
  // sort only the candidates found (a few per cent of N at N = 4M), not N entries. While a CUDA
  // graph is being captured nothing can be read back: all N are sorted (padding sorts last).
  const auto [problem, found] = flag.read_with(count, /*when_capturing=*/n);
  raise_if(problem, in, budget, op);
  auto meta = at::empty({1, 4}, int_opts);
  shared_meta_kernel<<<1, 1, 0, stream>>>(count.data_ptr<int32_t>(), filled.data_ptr<int32_t>(), budget, tail,
                                          meta.data_ptr<int32_t>(), head.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (found > 0) {
    const auto ordered = order_candidates(sel_key.narrow(1, 0, found), sel_level.narrow(1, 0, found),
                                          sel_id.narrow(1, 0, found));
    emit_kernel<<<ceil_div(found, 256), 256, 0, stream>>>(ordered.data_ptr<int32_t>(), found, 1,
                                                          meta.data_ptr<int32_t>(), filled.data_ptr<int32_t>(), 0, n,
                                                          budget, hits.data_ptr<int32_t>(),
                                                          indices.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  fill_kernel<<<1, kFillThreads, 0, stream>>>(0, /*seed_row0=*/-1, /*row_keys=*/nullptr, n, budget, seed,
                                              meta.data_ptr<int32_t>(), filled.data_ptr<int32_t>(),
                                              hits.data_ptr<int32_t>(), indices.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {indices, head};
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CUDA, m) {
  m.impl("query", &query_cuda);
  m.impl("query_shared", &query_shared_cuda);
}

}  // namespace lsh_torch
