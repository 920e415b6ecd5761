// CPU kernels of hashing: the asymmetric MIPS transform, SRP and DWTA codes, row fingerprints and the
// table build.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "lsh_common.h"
#include "op_checks.h"

namespace lsh_torch {
namespace {

// Asks the kernel to back a fresh block with 2 MB pages, where transparent huge pages are on request
// (the usual "madvise" setting): its first writes then fault 512x less often. The items of 670K
// outputs in 20 tables (54 MB), fresh at every rebuild then: update_tables took 61 ms with 4 KB pages,
// 35 with 2 MB ones.
void advise_huge_pages(void* data, size_t bytes) {
#ifdef MADV_HUGEPAGE
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const auto begin = reinterpret_cast<uintptr_t>(data), end = begin + bytes;
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: failure is harmless
#endif
}

// Tables (items [L, N], offsets) and fingerprints are rebuilt into new tensors, and the old ones freed, at
// every rebuild. glibc maps blocks this large afresh from the kernel each time (above its mmap
// threshold, at most 32 MB), and faulting in 54 MB of items at 670K outputs cost update_tables 70-190 ms
// of system time in bursts on the 2-core machine (the merge itself: 6 ms). So those outputs come from
// this allocator, which keeps the last kKeptBlocks freed blocks and hands one of the same size out again:
// a layer's rebuilds then swap two buffers. Freed blocks past kKeptBlocks go back to the system.
class ReusedBlocks final : public c10::Allocator {
 public:
  static constexpr size_t kKeptBlocks = 2;

  c10::DataPtr allocate(size_t bytes) override {
    void* data = take(bytes);
    if (data == nullptr) {
      data = c10::alloc_cpu(bytes);
      advise_huge_pages(data, bytes);  // a reused block's pages are in place already
    }
    std::lock_guard<std::mutex> lock(state().mutex);
    state().sizes[data] = bytes;
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  struct Block {
    void* data;
    size_t bytes;
  };
  struct State {
    std::mutex mutex;
    std::unordered_map<void*, size_t> sizes;  // of the blocks handed out
    std::deque<Block> kept;                   // freed, oldest first
  };
  // Never destroyed: tensors may be freed after static destructors have run, at exit.
  static State& state() {
    static State* s = new State;
    return *s;
  }

  static void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(state().mutex);
    auto& kept = state().kept;
    for (auto it = kept.begin(); it != kept.end(); ++it)
      if (it->bytes == bytes) {
        void* data = it->data;
        kept.erase(it);
        return data;
      }
    return nullptr;
  }

  static void release(void* data) {
    void* dropped = nullptr;
    {
      std::lock_guard<std::mutex> lock(state().mutex);
      auto found = state().sizes.find(data);
      if (found == state().sizes.end()) {  // not handed out here (cannot happen): freed, not kept
        dropped = data;
      } else {
        const size_t bytes = found->second;
        state().sizes.erase(found);
        state().kept.push_back({data, bytes});
        if (state().kept.size() > kKeptBlocks) {
          dropped = state().kept.front().data;
          state().kept.pop_front();
        }
      }
    }
    if (dropped != nullptr) c10::free_cpu(dropped);
  }
};

// An uninitialised CPU tensor for a rebuild's output: from ReusedBlocks from 1 MB on.
at::Tensor empty_rebuilt(at::IntArrayRef sizes, at::ScalarType dtype) {
  constexpr size_t kReusedFrom = size_t(1) << 20;
  if (static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype) < kReusedFrom)
    return at::empty(sizes, at::TensorOptions().dtype(dtype));
  static ReusedBlocks allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype, std::nullopt);
}

at::Tensor mips_transform_cpu(const at::Tensor& rows_in, bool query, const std::optional<at::Tensor>& max_norm_in) {
  const double given_max_norm = check_mips_args(rows_in, query, max_norm_in);
  const auto rows = rows_in.contiguous();
  const int64_t n = rows.size(0), d = rows.size(1);
  auto out = at::empty({n, d + 1}, rows.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "mips_transform", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = rows.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    std::vector<acc_t> norms(n);
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        acc_t s = 0;
        for (int64_t k = 0; k < d; ++k) s += static_cast<acc_t>(src[i * d + k]) * static_cast<acc_t>(src[i * d + k]);
        norms[i] = squares_in_range(s) ? std::sqrt(s)
                                       : rescaled_norm(src + i * d, d, s, [](acc_t u, acc_t v) { return u * v; });
      }
    });
    // Data rows share one scale (the largest norm) so that inner products keep their order; a
    // non-finite data row would make every row garbage, so it is an error (queries may be NaN).
    acc_t max_norm = 0;
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(query || std::isfinite(norms[i]), "mips_transform: rows must be finite, row ", i,
                  " has a NaN or inf (or a norm beyond the dtype's range)");
      max_norm = std::max(max_norm, norms[i]);
    }
    if (given_max_norm > 0) {
      // Up to kMaxNormTolerance (r slightly above 1 below: clamped).
      TORCH_CHECK(max_norm <= static_cast<acc_t>(given_max_norm) * acc_t(1 + kMaxNormTolerance),
                  "mips_transform: every row's norm must be at most max_norm = ", given_max_norm, " (up to a relative ",
                  kMaxNormTolerance, "), got a row of norm ", max_norm, " (", max_norm / given_max_norm - 1,
                  " above it)");
      max_norm = static_cast<acc_t>(given_max_norm);
    }
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t scale_by = query ? norms[i] : max_norm;
        const acc_t inv = scale_by > 0 ? acc_t(1) / scale_by : acc_t(0);
        for (int64_t k = 0; k < d; ++k) dst[i * (d + 1) + k] = static_cast<scalar_t>(static_cast<acc_t>(src[i * d + k]) * inv);
        const acc_t r = norms[i] * inv;
        dst[i * (d + 1) + d] = static_cast<scalar_t>(query ? acc_t(0) : std::sqrt(std::max(acc_t(0), acc_t(1) - r * r)));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> hash_codes_cpu(const at::Tensor& proj_in, int64_t num_tables, int64_t bits,
                                                  bool with_margins) {
  check_bits_tables("hash_codes", num_tables, bits);
  TORCH_CHECK(proj_in.dim() == 2, "hash_codes: projections must be 2-D [n, L*K], got shape ", proj_in.sizes());
  TORCH_CHECK(at::isFloatingType(proj_in.scalar_type()),
              "hash_codes: projections must be a floating tensor, got ", proj_in.scalar_type());
  TORCH_CHECK(proj_in.size(1) == num_tables * bits, "hash_codes: projections must have L*K = ",
              num_tables * bits, " columns, got ", proj_in.size(1));
  const auto proj = proj_in.contiguous();
  const int64_t n = proj.size(0);
  auto codes = at::empty({n, num_tables}, proj.options().dtype(at::kInt));
  auto margins = at::empty({n, with_margins ? num_tables * bits : 0}, proj.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, proj.scalar_type(), "hash_codes", [&] {
    const scalar_t* p = proj.data_ptr<scalar_t>();
    int32_t* c = codes.data_ptr<int32_t>();
    float* m = with_margins ? margins.data_ptr<float>() : nullptr;
    at::parallel_for(0, n * num_tables, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        int32_t code = 0;
        for (int64_t k = 0; k < bits; ++k) code |= static_cast<int32_t>(static_cast<float>(p[t * bits + k]) > 0) << k;
        c[t] = code;
      }
      if (m)  // a second pass, so that the codes' loop stays branch-free without margins
        for (int64_t i = begin * bits; i < end * bits; ++i) {
          const float v = static_cast<float>(p[i]);
          m[i] = std::isnan(v) ? std::numeric_limits<float>::infinity() : std::fabs(v);
        }
    });
  });
  return {codes, margins};
}

std::tuple<at::Tensor, at::Tensor> dwta_codes_cpu(const at::Tensor& rows_in, const at::Tensor& bins_in,
                                                  int64_t num_tables) {
  const DwtaShape s = check_dwta_args(rows_in, bins_in, num_tables);
  TORCH_CHECK(rows_in.device().is_cpu(), "dwta_codes: rows must be a CPU tensor, got one on ", rows_in.device());
  const auto rows = rows_in.contiguous();
  const auto bins = bins_in.contiguous();
  const int64_t* bin = bins.data_ptr<int64_t>();
  for (int64_t i = 0; i < s.num_bins * s.bin_size; ++i)
    TORCH_CHECK(bin[i] >= 0 && bin[i] < s.d, "dwta_codes: bins must hold dimension indices in [0, d = ", s.d,
                "), got ", bin[i]);
  auto codes = at::empty({s.n, num_tables}, rows.options().dtype(at::kInt));
  auto margins = at::empty({s.n, s.num_bins * s.bin_bits}, rows.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "dwta_codes", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = rows.data_ptr<scalar_t>();
    int32_t* c = codes.data_ptr<int32_t>();
    float* m = margins.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 65536 / (s.num_bins * s.bin_size));
    at::parallel_for(0, s.n, grain, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> hashes(s.num_bins);
      for (int64_t i = begin; i < end; ++i) {
        float* mi = m + i * s.num_bins * s.bin_bits;
        for (int64_t g = 0; g < s.num_bins; ++g)
          hashes[g] = dwta_hash<acc_t>(src + i * s.d, bin + g * s.bin_size, s.bin_size, static_cast<int>(s.bin_bits),
                                       mi + g * s.bin_bits);
        // Densify: empty bins take a non-empty bin's hash and margins (those are never overwritten).
        for (int64_t l = 0; l < num_tables; ++l) {
          int32_t code = 0;
          for (int64_t h = 0; h < s.hashes_per_table; ++h) {
            const int64_t g = l * s.hashes_per_table + h;
            int32_t v = hashes[g];
            if (v < 0) {
              const int64_t j = dwta_source(hashes.data(), s.num_bins, g);
              v = j < 0 ? 0 : hashes[j];
              if (j >= 0) std::copy(mi + j * s.bin_bits, mi + (j + 1) * s.bin_bits, mi + g * s.bin_bits);
            }
            code |= v << (h * s.bin_bits);
          }
          c[i * num_tables + l] = code;
        }
      }
    });
  });
  return {codes, margins};
}

at::Tensor row_fingerprints_cpu(const at::Tensor& rows_in, const at::Tensor& vector_in) {
  check_fingerprint_args(rows_in, vector_in);
  TORCH_CHECK(rows_in.device().is_cpu(), "row_fingerprints: rows must be a CPU tensor, got one on ", rows_in.device());
  const auto rows = rows_in.contiguous();
  const auto vector = vector_in.contiguous();
  const int64_t n = rows.size(0), d = rows.size(1);
  auto out = empty_rebuilt({n}, at::kFloat);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "row_fingerprints", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = rows.data_ptr<scalar_t>();
    const float* v = vector.data_ptr<float>();
    float* dst = out.data_ptr<float>();
    // Eight independent partial sums (k mod 8) let the compiler vectorize without reordering
    // a single sum: torch.mv took 4x the time of one memory pass over a 670K x 128 weight.
    constexpr int64_t kLanes = 8;
    at::parallel_for(0, n, 512, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* r = src + i * d;
        acc_t part[kLanes] = {};
        int64_t k = 0;
        for (; k + kLanes <= d; k += kLanes)
          for (int64_t j = 0; j < kLanes; ++j) part[j] += static_cast<acc_t>(r[k + j]) * static_cast<acc_t>(v[k + j]);
        for (int64_t j = 0; k < d; ++k, ++j) part[j] += static_cast<acc_t>(r[k]) * static_cast<acc_t>(v[k]);
        acc_t s = 0;
        for (int64_t j = 0; j < kLanes; ++j) s += part[j];
        dst[i] = static_cast<float>(s);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> build_tables_cpu(const at::Tensor& codes_in, int64_t bits) {
  check_build_tables_args(codes_in, bits);
  // Table-major copy: each table's pass then reads its codes contiguously instead of with stride L
  // (at L = 50 the strided reads made the build 5x slower).
  const auto codes = codes_in.t().contiguous();
  const int64_t n = codes.size(1), num_tables = codes.size(0), buckets = int64_t(1) << bits;
  auto offsets = empty_rebuilt({num_tables, buckets + 1}, at::kInt).zero_();
  auto items = empty_rebuilt({num_tables, n}, at::kInt);
  const int32_t* c = codes.data_ptr<int32_t>();
  int32_t* off = offsets.data_ptr<int32_t>();
  int32_t* it = items.data_ptr<int32_t>();
  at::parallel_for(0, num_tables, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> cursor(buckets);
    for (int64_t l = begin; l < end; ++l) {
      int32_t* o = off + l * (buckets + 1);
      const int32_t* cl = c + l * n;
      for (int64_t i = 0; i < n; ++i) {
        TORCH_CHECK(cl[i] >= 0 && cl[i] < buckets, "build_tables: codes must be in [0, 2^bits = ",
                    buckets, "), got ", cl[i]);
        ++o[cl[i] + 1];
      }
      for (int64_t k = 0; k < buckets; ++k) o[k + 1] += o[k];
      std::copy(o, o + buckets, cursor.begin());
      for (int64_t i = 0; i < n; ++i) it[l * n + cursor[cl[i]]++] = static_cast<int32_t>(i);
    }
  });
  return {offsets, items};
}

// What went wrong merging one bucket (kind 0: nothing).
struct MergeProblem {
  int kind = 0;  // 1: ids not ascending or out of range, 2: leaving row `id` is not there, 3: a joining row
                 // already is, 4: more rows stay than may (some leaving row is missing)
  int32_t id = 0, previous = 0;
};

// One bucket of update_tables: its `count` ids (`in`, ascending) minus the `num_leaving` rows of
// `leaving`, plus the `num_joining` rows of `joining` (both ascending), ascending, into `out`,
// which has room for exactly count - num_leaving + num_joining. One vectorizable pass checks the
// bucket's ids; the runs between moves are then copied whole.
MergeProblem merge_bucket(const int32_t* __restrict__ in, int32_t count, const int32_t* __restrict__ leaving,
                          int32_t num_leaving, const int32_t* __restrict__ joining, int32_t num_joining, int32_t n,
                          int32_t* __restrict__ out) {
  int32_t descents = 0;  // an int sum, which the compiler vectorizes (a bool one it did not)
  for (int32_t p = 1; p < count; ++p) descents += in[p - 1] >= in[p];
  if (descents || (count && (in[0] < 0 || in[count - 1] >= n))) {
    for (int32_t p = 0; p < count; ++p)
      if (in[p] < 0 || in[p] >= n || (p && in[p] <= in[p - 1])) return {1, in[p], p ? in[p - 1] : -1};
  }
  // Writes never pass `room`: a missing leaving row would otherwise let the copies overrun it.
  const int32_t room = count - num_leaving + num_joining;
  int32_t read = 0, w = 0, a = 0, b = 0;
  while (a < num_leaving || b < num_joining) {
    const bool leaves = a < num_leaving && (b == num_joining || leaving[a] <= joining[b]);
    const int32_t id = leaves ? leaving[a] : joining[b];
    int32_t end = read;  // past the ids below `id`: a short walk (a bisection's branches mispredict)
    while (end < count && in[end] < id) ++end;
    if (w + (end - read) + (num_joining - b) > room) return {4};
    std::copy(in + read, in + end, out + w);
    w += end - read;
    read = end;
    const bool there = read < count && in[read] == id;
    if (leaves) {
      if (!there) return {2, id};
      ++read, ++a;
    } else {
      if (there) return {3, id};
      out[w++] = id, ++b;
    }
  }
  if (w + (count - read) > room) return {4};
  std::copy(in + read, in + count, out + w);
  return {};
}

// Per table: the moved rows, sorted by old and by new bucket (a counting sort, stable, so ids stay
// ascending), then one sequential merge pass over the buckets: the others' entries are copied, not
// re-sorted (bench_output_layer's rebuild column).
std::tuple<at::Tensor, at::Tensor> update_tables_cpu(const at::Tensor& offsets_in, const at::Tensor& items_in,
                                                     const at::Tensor& rows_in, const at::Tensor& old_codes_in,
                                                     const at::Tensor& new_codes_in) {
  const auto s = check_update_tables_args(offsets_in, items_in, rows_in, old_codes_in, new_codes_in);
  const int64_t num_tables = s.num_tables, buckets = s.buckets, n = s.n, moved = s.moved;
  const auto offsets = offsets_in.contiguous();
  const auto items = items_in.contiguous();
  const auto rows = rows_in.contiguous();
  const auto old_codes = old_codes_in.t().contiguous();  // table-major [L, R]
  const auto new_codes = new_codes_in.t().contiguous();
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < moved; ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < n, "update_tables: rows must be in [0, N = ", n, "), got ", r[i]);
    TORCH_CHECK(i == 0 || r[i] > r[i - 1], "update_tables: rows must be strictly increasing, got ", r[i - 1],
                " before ", r[i]);
  }
  auto out_offsets = empty_rebuilt(offsets.sizes(), at::kInt);
  auto out_items = empty_rebuilt(items.sizes(), at::kInt);
  const int32_t* off_all = offsets.data_ptr<int32_t>();
  const int32_t* it_all = items.data_ptr<int32_t>();
  int32_t* new_off_all = out_offsets.data_ptr<int32_t>();
  int32_t* new_it_all = out_items.data_ptr<int32_t>();
  at::parallel_for(0, num_tables, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> leave_at(buckets + 1), join_at(buckets + 1), leaving(moved), joining(moved);
    // Rows by bucket: start[k] .. start[k + 1] of `sorted` hold bucket k's rows, ascending. Only the
    // rows whose code in this table changed (`other`: the code on the other side): a row that would leave
    // and rejoin its bucket stays in place, unchecked (most of a rebuild's moved rows keep most codes; at
    // 670K outputs, 17K moved rows of which 15% changed each code: 8.9 against 11.0 ms, medians of 3 runs).
    const auto by_bucket = [&](const int32_t* codes, const int32_t* other, const char* name,
                               std::vector<int32_t>& start, std::vector<int32_t>& sorted) {
      std::fill(start.begin(), start.end(), 0);
      for (int64_t i = 0; i < moved; ++i) {
        TORCH_CHECK(codes[i] >= 0 && codes[i] < buckets, "update_tables: ", name, " must be in [0, 2^K = ", buckets,
                    "), got ", codes[i]);
        start[codes[i] + 1] += codes[i] != other[i];
      }
      for (int64_t k = 0; k < buckets; ++k) start[k + 1] += start[k];
      std::vector<int32_t> cursor(start.begin(), start.end() - 1);
      for (int64_t i = 0; i < moved; ++i)
        if (codes[i] != other[i]) sorted[cursor[codes[i]]++] = static_cast<int32_t>(r[i]);
    };
    for (int64_t l = begin; l < end; ++l) {
      const int32_t* off = off_all + l * (buckets + 1);
      const int32_t* it = it_all + l * n;
      int32_t* new_off = new_off_all + l * (buckets + 1);
      int32_t* out = new_it_all + l * n;
      TORCH_CHECK(off[0] == 0 && off[buckets] == n, "update_tables: offsets of table ", l, " must run from 0 to N = ",
                  n, ", got ", off[0], " to ", off[buckets]);
      const int32_t* old_l = old_codes.data_ptr<int32_t>() + l * moved;
      const int32_t* new_l = new_codes.data_ptr<int32_t>() + l * moved;
      by_bucket(old_l, new_l, "old_codes", leave_at, leaving);
      by_bucket(new_l, old_l, "new_codes", join_at, joining);
      // Each bucket holds at least the rows that leave it: then no write below passes the table's end.
      for (int64_t k = 0; k < buckets; ++k) {
        TORCH_CHECK(off[k] <= off[k + 1], "update_tables: offsets of table ", l, " must be nondecreasing, got ",
                    off[k], " then ", off[k + 1], " at bucket ", k);
        TORCH_CHECK(off[k + 1] - off[k] >= leave_at[k + 1] - leave_at[k], "update_tables: bucket ", k, " of table ", l,
                    " holds fewer rows than old_codes put there; the tables do not match old_codes");
      }
      new_off[0] = 0;
      for (int64_t k = 0; k < buckets; ++k) {
        const int32_t leave = leave_at[k], num_leaving = leave_at[k + 1] - leave, join = join_at[k],
                      num_joining = join_at[k + 1] - join;
        const auto problem = merge_bucket(it + off[k], off[k + 1] - off[k], leaving.data() + leave, num_leaving,
                                          joining.data() + join, num_joining, static_cast<int32_t>(n),
                                          out + new_off[k]);
        TORCH_CHECK(problem.kind != 1, "update_tables: items of a bucket must be ascending ids in [0, N = ", n,
                    "), got ", problem.id, " after ", problem.previous, " in bucket ", k, " of table ", l);
        TORCH_CHECK(problem.kind != 2, "update_tables: row ", problem.id, " is not in bucket ", k, " of table ", l,
                    " (its old code there); the tables do not match old_codes");
        TORCH_CHECK(problem.kind != 3, "update_tables: row ", problem.id, " joins bucket ", k, " of table ", l,
                    " where it already is; the tables do not match old_codes");
        TORCH_CHECK(problem.kind != 4, "update_tables: bucket ", k, " of table ", l,
                    " lacks a row that old_codes put there; the tables do not match old_codes");
        new_off[k + 1] = static_cast<int32_t>(int64_t(new_off[k]) + (off[k + 1] - off[k]) - num_leaving + num_joining);
      }
    }
  });
  return {out_offsets, out_items};
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CPU, m) {
  m.impl("mips_transform", &mips_transform_cpu);
  m.impl("hash_codes", &hash_codes_cpu);
  m.impl("dwta_codes", &dwta_codes_cpu);
  m.impl("row_fingerprints", &row_fingerprints_cpu);
  m.impl("build_tables", &build_tables_cpu);
  m.impl("update_tables", &update_tables_cpu);
}

}  // namespace lsh_torch
