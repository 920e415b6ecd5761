// CUDA kernels of hashing: the asymmetric MIPS transform, SRP and DWTA codes, row fingerprints and the
// table build.
// Same contract and messages as csrc/cpu/hashing_cpu.cpp.
//
// Design
// - mips_transform: one warp per 32 rows computes the row norms. The warp stages 32 x 32 tiles
//   in shared memory (coalesced loads) and each lane then sums its own row in column order with
//   products that are not fused into FMAs: the same order and roundings as the CPU loop, so the
//   norms, the largest norm (an atomicMax on the bit pattern of the non-negative, non-NaN norms,
//   starting at +0 like the CPU) and therefore the outputs are bit-identical to the CPU kernel
//   (sqrt and division are IEEE-rounded in CUDA unless --use_fast_math, which setup.py never
//   passes). A second, elementwise kernel writes the [n, d + 1] output.
// - hash_codes: one thread per (row, table); elementwise, bit-identical to the CPU.
// - dwta_codes: one thread per (row, bin) computes the bin's hash and margins (lsh_common.h:
//   dwta_hash, the CPU's function) into a [n, L*H] scratch of hashes (-1: empty) and the margins;
//   a second kernel, one thread per (row, table), densifies the table's empty bins (dwta_source,
//   shared with the CPU too: it reads only non-empty bins, which no thread writes) and packs the
//   code. Bin indices outside [0, d) are skipped and reported through the error flag, read once
//   at the end: bit-identical codes and margins to the CPU.
// - build_tables: codes are range-checked on the device (error flag, one synchronisation), the
//   codes of each table are sorted with a stable sort (torch.sort(stable=True), which keeps equal
//   codes in ascending neuron order: exactly the CPU's counting-sort order), and each offset is
//   the lower bound of its bucket in the sorted codes (a binary search per bucket).
// - update_tables: not the CPU's merge; each table's entries and the joining rows become keys
//   code * N + id (leaving entries an out-of-range key), sorted per table (ids ascend inside a
//   bucket, as from build_tables), then the offsets are found as above. One synchronisation. Every
//   row is checked against its old bucket (the CPU skips rows whose code in a table is unchanged).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "cuda_common.cuh"
#include "lsh_common.h"
#include "op_checks.h"

namespace lsh_torch {
namespace {

using cuda::ceil_div;
using cuda::mul_rn;

int64_t grid_for(int64_t work, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, threads), int64_t(1) << 20));
}

// ---------------------------------------------------------------------------------------------
// mips_transform

constexpr int kNormWarps = 4;  // warps per block of the norm kernel (tile: 32 x 33 opmath values each)

__device__ __forceinline__ void atomic_max_nonneg(float* addr, float v) {
  atomicMax(reinterpret_cast<unsigned int*>(addr), __float_as_uint(v));
}
__device__ __forceinline__ void atomic_max_nonneg(double* addr, double v) {
  atomicMax(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(__double_as_longlong(v)));
}

// norms[i] = sqrt(sum_k src[i, k]^2), summed in k order like the CPU. With max_norm, also the
// largest non-NaN norm (max_norm must start at +0; non-negative floats order like their bits).
template <typename scalar_t, typename acc_t>
__global__ void row_norms_kernel(const scalar_t* __restrict__ src, int64_t n, int64_t d, acc_t* __restrict__ norms,
                                 acc_t* __restrict__ max_norm) {
  __shared__ acc_t tile[kNormWarps][32][33];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * kNormWarps + warp) * 32;
  if (base >= n) return;  // warp-uniform; the kernel only synchronises within a warp
  acc_t s = 0;
  for (int64_t c0 = 0; c0 < d; c0 += 32) {
    const int64_t col = c0 + lane;
    for (int r = 0; r < 32; ++r) {
      const int64_t row = base + r;
      tile[warp][r][lane] = (row < n && col < d) ? static_cast<acc_t>(src[row * d + col]) : acc_t(0);
    }
    __syncwarp();
    const int cols = static_cast<int>(d - c0 < 32 ? d - c0 : 32);
    for (int k = 0; k < cols; ++k) {
      const acc_t v = tile[warp][lane][k];
      s = s + mul_rn(v, v);
    }
    __syncwarp();
  }
  const int64_t row = base + lane;
  const acc_t norm = row >= n || squares_in_range(s) ? std::sqrt(s)
                     : rescaled_norm(src + row * d, d, s, [](acc_t u, acc_t v) { return mul_rn(u, v); });
  if (row < n) norms[row] = norm;
  if (max_norm != nullptr) {
    acc_t v = (row < n && !(norm != norm)) ? norm : acc_t(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const acc_t other = __shfl_xor_sync(cuda::kFullMask, v, o);
      v = other > v ? other : v;
    }
    if (lane == 0 && v > acc_t(0)) atomic_max_nonneg(max_norm, v);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void mips_write_kernel(const scalar_t* __restrict__ src, int64_t n, int64_t d,
                                  const acc_t* __restrict__ norms, const acc_t* __restrict__ max_norm, bool query,
                                  scalar_t* __restrict__ dst) {
  const int64_t total = n * (d + 1);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / (d + 1), k = idx - i * (d + 1);
    const acc_t norm = norms[i];
    const acc_t scale_by = query ? norm : *max_norm;
    const acc_t inv = scale_by > acc_t(0) ? acc_t(1) / scale_by : acc_t(0);
    if (k < d) {
      dst[idx] = static_cast<scalar_t>(mul_rn(static_cast<acc_t>(src[i * d + k]), inv));
    } else {
      acc_t extra = 0;
      if (!query) {
        const acc_t r = mul_rn(norm, inv);
        const acc_t z = acc_t(1) - mul_rn(r, r);
        extra = std::sqrt(acc_t(0) < z ? z : acc_t(0));  // std::max(0, z) of the CPU: NaN -> 0
      }
      dst[idx] = static_cast<scalar_t>(extra);
    }
  }
}

at::Tensor mips_transform_cuda(const at::Tensor& rows_in, bool query, const std::optional<at::Tensor>& max_norm_in) {
  const double given_max_norm = check_mips_args(rows_in, query, max_norm_in);
  cuda::check_cuda(rows_in, "rows", "mips_transform");
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const auto rows = rows_in.contiguous();
  const int64_t n = rows.size(0), d = rows.size(1);
  auto out = at::empty({n, d + 1}, rows.options());
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "mips_transform_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    auto norms = at::empty({n}, rows.options().dtype(acc_dtype));
    // +0 (the CPU's starting max), or the given M
    auto max_norm = at::full({1}, given_max_norm, rows.options().dtype(acc_dtype));
    const bool find_max = !query && given_max_norm == 0;
    const int64_t blocks = ceil_div(n, 32 * kNormWarps);
    row_norms_kernel<scalar_t, acc_t><<<blocks, 32 * kNormWarps, 0, stream>>>(
        rows.data_ptr<scalar_t>(), n, d, norms.data_ptr<acc_t>(), find_max ? max_norm.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // As on the CPU, non-finite data rows are an error, and a given M must bound every norm: both
    // read from the largest norm (max propagates NaN), one sync, at table-build time only.
    if (!query) {
      const double largest = norms.max().item<double>();
      TORCH_CHECK(std::isfinite(largest),
                  "mips_transform: rows must be finite, a row has a NaN or inf (or a norm beyond the dtype's range)");
      // The bound in acc_t, as the CPU computes it (`largest` is an acc_t norm: its cast back is exact).
      const acc_t bound = static_cast<acc_t>(given_max_norm) * acc_t(1 + kMaxNormTolerance);
      TORCH_CHECK(given_max_norm == 0 || static_cast<acc_t>(largest) <= bound,
                  "mips_transform: every row's norm must be at most max_norm = ", given_max_norm, " (up to a relative ",
                  kMaxNormTolerance, "), got a row of norm ", largest, " (", largest / given_max_norm - 1,
                  " above it)");
    }
    mips_write_kernel<scalar_t, acc_t><<<grid_for(n * (d + 1), 256), 256, 0, stream>>>(
        rows.data_ptr<scalar_t>(), n, d, norms.data_ptr<acc_t>(), max_norm.data_ptr<acc_t>(), query,
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// hash_codes

template <typename scalar_t>
__global__ void hash_codes_kernel(const scalar_t* __restrict__ p, int64_t total, int bits, int32_t* __restrict__ codes,
                                  float* __restrict__ margins) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int32_t code = 0;
    for (int k = 0; k < bits; ++k) {
      const float v = static_cast<float>(p[t * bits + k]);
      code |= static_cast<int32_t>(v > 0.0f) << k;
      if (margins) margins[t * bits + k] = (v != v) ? std::numeric_limits<float>::infinity() : fabsf(v);
    }
    codes[t] = code;
  }
}

std::tuple<at::Tensor, at::Tensor> hash_codes_cuda(const at::Tensor& proj_in, int64_t num_tables, int64_t bits,
                                                   bool with_margins) {
  check_bits_tables("hash_codes", num_tables, bits);
  TORCH_CHECK(proj_in.dim() == 2, "hash_codes: projections must be 2-D [n, L*K], got shape ", proj_in.sizes());
  TORCH_CHECK(at::isFloatingType(proj_in.scalar_type()),
              "hash_codes: projections must be a floating tensor, got ", proj_in.scalar_type());
  TORCH_CHECK(proj_in.size(1) == num_tables * bits, "hash_codes: projections must have L*K = ",
              num_tables * bits, " columns, got ", proj_in.size(1));
  cuda::check_cuda(proj_in, "projections", "hash_codes");
  const c10::cuda::CUDAGuard guard(proj_in.device());
  const auto proj = proj_in.contiguous();
  const int64_t n = proj.size(0);
  auto codes = at::empty({n, num_tables}, proj.options().dtype(at::kInt));
  auto margins = at::empty({n, with_margins ? num_tables * bits : 0}, proj.options().dtype(at::kFloat));
  if (n == 0) return {codes, margins};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, proj.scalar_type(), "hash_codes_cuda", [&] {
    hash_codes_kernel<scalar_t><<<grid_for(n * num_tables, 256), 256, 0, stream>>>(
        proj.data_ptr<scalar_t>(), n * num_tables, static_cast<int>(bits), codes.data_ptr<int32_t>(),
        with_margins ? margins.data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {codes, margins};
}

// ---------------------------------------------------------------------------------------------
// dwta_codes

template <typename scalar_t>
__global__ void dwta_hash_kernel(const scalar_t* __restrict__ rows, const int64_t* __restrict__ bins, int64_t n,
                                 int64_t d, int64_t num_bins, int64_t bin_size, int bin_bits,
                                 int32_t* __restrict__ hashes, float* __restrict__ margins, int64_t* flag) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t total = n * num_bins;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / num_bins, g = t - i * num_bins;
    const int64_t* bin = bins + g * bin_size;
    bool ok = true;
    for (int64_t j = 0; j < bin_size; ++j) {
      if (bin[j] < 0 || bin[j] >= d) {
        cuda::report(flag, 1, bin[j]);
        ok = false;
      }
    }
    if (!ok) {
      hashes[t] = 0;
      for (int k = 0; k < bin_bits; ++k) margins[t * bin_bits + k] = 0.0f;
      continue;
    }
    hashes[t] = dwta_hash<acc_t>(rows + i * d, bin, bin_size, bin_bits, margins + t * bin_bits);
  }
}

__global__ void dwta_pack_kernel(const int32_t* __restrict__ hashes, int64_t n, int64_t num_tables,
                                 int64_t hashes_per_table, int bin_bits, float* __restrict__ margins,
                                 int32_t* __restrict__ codes) {
  const int64_t total = n * num_tables, num_bins = num_tables * hashes_per_table;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = t / num_tables, l = t - i * num_tables;
    const int32_t* h = hashes + i * num_bins;
    float* m = margins + i * num_bins * bin_bits;
    int32_t code = 0;
    for (int64_t k = 0; k < hashes_per_table; ++k) {
      const int64_t g = l * hashes_per_table + k;
      int32_t v = h[g];
      if (v < 0) {
        const int64_t j = dwta_source(h, num_bins, g);
        v = j < 0 ? 0 : h[j];
        if (j >= 0)
          for (int b = 0; b < bin_bits; ++b) m[g * bin_bits + b] = m[j * bin_bits + b];
      }
      code |= v << (k * bin_bits);
    }
    codes[t] = code;
  }
}

std::tuple<at::Tensor, at::Tensor> dwta_codes_cuda(const at::Tensor& rows_in, const at::Tensor& bins_in,
                                                   int64_t num_tables) {
  const DwtaShape s = check_dwta_args(rows_in, bins_in, num_tables);
  cuda::check_cuda(rows_in, "rows", "dwta_codes");
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const auto rows = rows_in.contiguous();
  const auto bins = bins_in.contiguous();
  auto codes = at::empty({s.n, num_tables}, rows.options().dtype(at::kInt));
  auto margins = at::empty({s.n, s.num_bins * s.bin_bits}, rows.options().dtype(at::kFloat));
  if (s.n == 0) {  // no kernel reads the bins: checked here, as the CPU checks them for any n (one sync)
    TORCH_CHECK(!(bins.lt(0) | bins.ge(s.d)).any().item<bool>(), "dwta_codes: bins must hold dimension indices in "
                "[0, d = ", s.d, ")");
    return {codes, margins};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto hashes = at::empty({s.n, s.num_bins}, rows.options().dtype(at::kInt));
  cuda::ErrorFlag flag(rows.device(), stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "dwta_codes_cuda", [&] {
    dwta_hash_kernel<scalar_t><<<grid_for(s.n * s.num_bins, 256), 256, 0, stream>>>(
        rows.data_ptr<scalar_t>(), bins.data_ptr<int64_t>(), s.n, s.d, s.num_bins, s.bin_size,
        static_cast<int>(s.bin_bits), hashes.data_ptr<int32_t>(), margins.data_ptr<float>(), flag.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  dwta_pack_kernel<<<grid_for(s.n * num_tables, 256), 256, 0, stream>>>(
      hashes.data_ptr<int32_t>(), s.n, num_tables, s.hashes_per_table, static_cast<int>(s.bin_bits),
      margins.data_ptr<float>(), codes.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto err = flag.read();
  TORCH_CHECK(err[0] == 0, "dwta_codes: bins must hold dimension indices in [0, d = ", s.d, "), got ", err[1]);
  return {codes, margins};
}

// ---------------------------------------------------------------------------------------------
// build_tables

__global__ void check_codes_kernel(const int32_t* __restrict__ codes, int64_t total, int64_t buckets, int64_t* flag) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int32_t c = codes[t];
    if (c < 0 || c >= buckets) cuda::report(flag, 1, c);
  }
}

// offsets[l, k] = number of keys of table l below k * scale = lower bound of k * scale in the
// sorted keys (row l of `sorted`, `stride` apart): codes with scale 1 (build_tables) or
// code * N + id (update_tables).
template <typename key_t>
__global__ void offsets_kernel(const key_t* __restrict__ sorted, int64_t n, int64_t stride, int64_t num_tables,
                               int64_t buckets, int64_t scale, int32_t* __restrict__ offsets) {
  const int64_t total = num_tables * (buckets + 1);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = t / (buckets + 1), k = t - l * (buckets + 1);
    const key_t* s = sorted + l * stride;
    int64_t lo = 0, hi = n;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(s[mid]) < k * scale) lo = mid + 1; else hi = mid;
    }
    offsets[t] = static_cast<int32_t>(lo);
  }
}

// ---------------------------------------------------------------------------------------------
// update_tables: every entry of the old tables and every joining row becomes a key code * N + id
// (a leaving row's old entry becomes kEmptyKey), each table's keys are sorted, and the first N of
// them are the new tables. A sort of L x (N + R) keys is a few milliseconds on a GPU, so unlike the
// CPU's merge this path does not avoid the sort; it exists so that the op runs on every device.
// Problems are recorded in the error flag (kernels skip what they cannot use) and read once.

constexpr int64_t kEmptyKey = std::numeric_limits<int64_t>::max();
enum UpdateProblem : int64_t { kRowRange = 1, kRowOrder, kOldCode, kNewCode, kOffsets, kItemOrder, kLeaving, kDuplicate };

// One thread per moved row: range and order checks, and its joining keys (column N + r).
__global__ void update_join_kernel(const int64_t* __restrict__ rows, const int32_t* __restrict__ old_codes,
                                   const int32_t* __restrict__ new_codes, int64_t moved, int64_t num_tables, int64_t n,
                                   int64_t buckets, int64_t* __restrict__ keys, int64_t* flag) {
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < moved;
       r += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = rows[r];
    if (row < 0 || row >= n) cuda::report(flag, kRowRange, row);
    if (r > 0 && rows[r - 1] >= row) cuda::report(flag, kRowOrder, rows[r - 1], row);
    for (int64_t l = 0; l < num_tables; ++l) {
      const int32_t before = old_codes[r * num_tables + l], after = new_codes[r * num_tables + l];
      if (before < 0 || before >= buckets) cuda::report(flag, kOldCode, before);
      const bool ok = after >= 0 && after < buckets && row >= 0 && row < n;
      if (!ok) cuda::report(flag, kNewCode, after);
      keys[l * (n + moved) + n + r] = ok ? after * n + row : kEmptyKey;
    }
  }
}

// One thread per (table, old entry): its bucket (a binary search of the offsets), the checks,
// and its key, or kEmptyKey if its row leaves that bucket (counted per table).
__global__ void update_keys_kernel(const int32_t* __restrict__ offsets, const int32_t* __restrict__ items,
                                   const int64_t* __restrict__ rows, const int32_t* __restrict__ old_codes,
                                   int64_t moved, int64_t num_tables, int64_t n, int64_t buckets,
                                   int64_t* __restrict__ keys, int32_t* __restrict__ left, int64_t* flag) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < num_tables * n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = t / n, p = t - l * n;
    const int32_t* off = offsets + l * (buckets + 1);
    if (p == 0 && (off[0] != 0 || off[buckets] != n)) cuda::report(flag, kOffsets, l, off[0], off[buckets]);
    for (int64_t k = p; k < buckets; k += n) {
      if (off[k] > off[k + 1]) cuda::report(flag, kOffsets, l, off[k], off[k + 1]);
    }
    int64_t lo = 0, hi = buckets;  // the last bucket k with off[k] <= p
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (off[mid] <= p) lo = mid; else hi = mid;
    }
    const int64_t k = lo, id = items[t];
    int64_t key = kEmptyKey;
    if (id < 0 || id >= n || (p > off[k] && p > 0 && items[t - 1] >= id)) {
      cuda::report(flag, kItemOrder, l, k, id);
    } else {
      key = k * n + id;
      int64_t a = 0, b = moved;  // is id a moved row, and does it leave this bucket?
      while (a < b) {
        const int64_t mid = a + (b - a) / 2;
        if (rows[mid] < id) a = mid + 1; else b = mid;
      }
      if (a < moved && rows[a] == id && old_codes[a * num_tables + l] == k) {
        key = kEmptyKey;
        atomicAdd(left + l, 1);
      }
    }
    keys[l * (n + moved) + p] = key;
  }
}

__global__ void update_left_kernel(const int32_t* __restrict__ left, int64_t num_tables, int64_t moved, int64_t* flag) {
  for (int64_t l = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; l < num_tables;
       l += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (left[l] != moved) cuda::report(flag, kLeaving, l, left[l], moved);
  }
}

// One thread per (table, new entry): the id, and no (code, id) twice.
__global__ void update_items_kernel(const int64_t* __restrict__ sorted, int64_t num_tables, int64_t n, int64_t stride,
                                    int32_t* __restrict__ items, int64_t* flag) {
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < num_tables * n;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t l = t / n, p = t - l * n, key = sorted[l * stride + p];
    if (key == kEmptyKey || (p > 0 && sorted[l * stride + p - 1] == key)) cuda::report(flag, kDuplicate, l, key);
    items[t] = key == kEmptyKey ? 0 : static_cast<int32_t>(key % n);
  }
}

std::tuple<at::Tensor, at::Tensor> update_tables_cuda(const at::Tensor& offsets_in, const at::Tensor& items_in,
                                                      const at::Tensor& rows_in, const at::Tensor& old_codes_in,
                                                      const at::Tensor& new_codes_in) {
  const auto s = check_update_tables_args(offsets_in, items_in, rows_in, old_codes_in, new_codes_in);
  cuda::check_cuda(offsets_in, "offsets", "update_tables");
  const auto device = offsets_in.device();
  cuda::check_same_device(items_in, device, "items", "update_tables");
  cuda::check_same_device(rows_in, device, "rows", "update_tables");
  cuda::check_same_device(old_codes_in, device, "old_codes", "update_tables");
  cuda::check_same_device(new_codes_in, device, "new_codes", "update_tables");
  const c10::cuda::CUDAGuard guard(device);
  const int64_t num_tables = s.num_tables, buckets = s.buckets, n = s.n, moved = s.moved;
  const auto offsets = offsets_in.contiguous();
  const auto items = items_in.contiguous();
  const auto rows = rows_in.contiguous();
  const auto old_codes = old_codes_in.contiguous();
  const auto new_codes = new_codes_in.contiguous();
  if (n == 0) {  // no entries: every offset must be 0 (one synchronisation, in this corner only)
    TORCH_CHECK(!offsets.ne(0).any().item<bool>(), "update_tables: offsets of every table must run from 0 to N = 0");
    return {offsets.clone(), items.clone()};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cuda::ErrorFlag flag(device, stream);
  auto keys = at::empty({num_tables, n + moved}, items.options().dtype(at::kLong));
  auto left = at::zeros({num_tables}, items.options());
  if (moved > 0) {
    update_join_kernel<<<grid_for(moved, 256), 256, 0, stream>>>(
        rows.data_ptr<int64_t>(), old_codes.data_ptr<int32_t>(), new_codes.data_ptr<int32_t>(), moved, num_tables, n,
        buckets, keys.data_ptr<int64_t>(), flag.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  update_keys_kernel<<<grid_for(num_tables * n, 256), 256, 0, stream>>>(
      offsets.data_ptr<int32_t>(), items.data_ptr<int32_t>(), rows.data_ptr<int64_t>(), old_codes.data_ptr<int32_t>(),
      moved, num_tables, n, buckets, keys.data_ptr<int64_t>(), left.data_ptr<int32_t>(), flag.ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  update_left_kernel<<<grid_for(num_tables, 256), 256, 0, stream>>>(left.data_ptr<int32_t>(), num_tables, moved,
                                                                     flag.ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto sorted = std::get<0>(at::sort(keys, /*stable=*/false, /*dim=*/1, /*descending=*/false));
  auto out_items = at::empty_like(items);
  auto out_offsets = at::empty_like(offsets);
  update_items_kernel<<<grid_for(num_tables * n, 256), 256, 0, stream>>>(
      sorted.data_ptr<int64_t>(), num_tables, n, n + moved, out_items.data_ptr<int32_t>(), flag.ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  offsets_kernel<int64_t><<<grid_for(num_tables * (buckets + 1), 256), 256, 0, stream>>>(
      sorted.data_ptr<int64_t>(), n, n + moved, num_tables, buckets, n, out_offsets.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto err = flag.read();
  switch (err[0]) {
    case 0: break;
    case kRowRange: TORCH_CHECK(false, "update_tables: rows must be in [0, N = ", n, "), got ", err[1]);
    case kRowOrder:
      TORCH_CHECK(false, "update_tables: rows must be strictly increasing, got ", err[1], " before ", err[2]);
    case kOldCode: TORCH_CHECK(false, "update_tables: old_codes must be in [0, 2^K = ", buckets, "), got ", err[1]);
    case kNewCode: TORCH_CHECK(false, "update_tables: new_codes must be in [0, 2^K = ", buckets, "), got ", err[1]);
    case kOffsets:
      TORCH_CHECK(false, "update_tables: offsets of table ", err[1], " must run from 0 to N = ", n,
                  " and be nondecreasing, got ", err[2], " then ", err[3]);
    case kItemOrder:
      TORCH_CHECK(false, "update_tables: items of a bucket must be ascending ids in [0, N = ", n, "), got ", err[3],
                  " in bucket ", err[2], " of table ", err[1]);
    case kLeaving:
      TORCH_CHECK(false, "update_tables: ", err[3] - err[2], " of the rows are not in their old buckets of table ",
                  err[1], "; the tables do not match old_codes");
    default:
      TORCH_CHECK(false, "update_tables: a row joins a bucket of table ", err[1],
                  " where it already is; the tables do not match old_codes");
  }
  return {out_offsets, out_items};
}

// ---------------------------------------------------------------------------------------------
// row_fingerprints: the CPU kernel's arithmetic exactly, so that fingerprints taken on either device
// compare equal (a layer moved between devices would otherwise see every row as changed): 8 lanes
// per row, lane j sums the columns k = j (mod 8) in order with unfused products (the CPU's part[j]),
// then the 8 partial sums are added in order. 4 rows per warp.

constexpr int kFingerprintLanes = 8;

template <typename scalar_t, typename acc_t>
__global__ void row_fingerprints_kernel(const scalar_t* __restrict__ rows, const float* __restrict__ v, int64_t n,
                                        int64_t d, float* __restrict__ out) {
  constexpr int kRowsPerWarp = 32 / kFingerprintLanes;
  const int lane = threadIdx.x & 31, group = lane / kFingerprintLanes, j = lane % kFingerprintLanes;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  // Grid-stride over groups of rows (the grid is capped); the loop bound is warp-uniform.
  for (int64_t first = warp * kRowsPerWarp; first < n; first += warps * kRowsPerWarp) {
    const int64_t row = first + group;
    acc_t part = 0;
    if (row < n) {
      const scalar_t* r = rows + row * d;
      for (int64_t k = j; k < d; k += kFingerprintLanes)
        part = part + mul_rn(static_cast<acc_t>(r[k]), static_cast<acc_t>(v[k]));
    }
    acc_t s = 0;
#pragma unroll
    for (int q = 0; q < kFingerprintLanes; ++q) s = s + __shfl_sync(cuda::kFullMask, part, group * kFingerprintLanes + q);
    if (row < n && j == 0) out[row] = static_cast<float>(s);
  }
}

at::Tensor row_fingerprints_cuda(const at::Tensor& rows_in, const at::Tensor& vector_in) {
  check_fingerprint_args(rows_in, vector_in);
  cuda::check_cuda(rows_in, "rows", "row_fingerprints");
  const c10::cuda::CUDAGuard guard(rows_in.device());
  const auto rows = rows_in.contiguous();
  const auto vector = vector_in.contiguous();
  const int64_t n = rows.size(0), d = rows.size(1);
  auto out = at::empty({n}, rows.options().dtype(at::kFloat));
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "row_fingerprints", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kThreads = 256;
    row_fingerprints_kernel<scalar_t, acc_t><<<grid_for(n * kFingerprintLanes, kThreads), kThreads, 0, stream>>>(
        rows.data_ptr<scalar_t>(), vector.data_ptr<float>(), n, d, out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> build_tables_cuda(const at::Tensor& codes_in, int64_t bits) {
  check_build_tables_args(codes_in, bits);
  cuda::check_cuda(codes_in, "codes", "build_tables");
  const c10::cuda::CUDAGuard guard(codes_in.device());
  // Table-major [L, N], the layout the sort reads: a view's transpose when the caller's codes are so (no copy).
  const auto codes = codes_in.t().contiguous();
  const int64_t n = codes_in.size(0), num_tables = codes_in.size(1), buckets = int64_t(1) << bits;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (n == 0) {
    return {at::zeros({num_tables, buckets + 1}, codes.options()), at::empty({num_tables, 0}, codes.options())};
  }
  cuda::ErrorFlag flag(codes.device(), stream);
  check_codes_kernel<<<grid_for(n * num_tables, 256), 256, 0, stream>>>(codes.data_ptr<int32_t>(), n * num_tables,
                                                                          buckets, flag.ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto err = flag.read();
  TORCH_CHECK(err[0] == 0, "build_tables: codes must be in [0, 2^bits = ", buckets, "), got ", err[1]);
  // [L, N] sorted along N; a stable sort keeps equal codes in ascending neuron id.
  auto [sorted, order] = at::sort(codes, /*stable=*/true, /*dim=*/1, /*descending=*/false);
  auto items = order.to(at::kInt);
  auto offsets = at::empty({num_tables, buckets + 1}, codes.options());
  offsets_kernel<int32_t><<<grid_for(num_tables * (buckets + 1), 256), 256, 0, stream>>>(
      sorted.contiguous().data_ptr<int32_t>(), n, n, num_tables, buckets, 1, offsets.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {offsets, items};
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CUDA, m) {
  m.impl("mips_transform", &mips_transform_cuda);
  m.impl("hash_codes", &hash_codes_cuda);
  m.impl("dwta_codes", &dwta_codes_cuda);
  m.impl("row_fingerprints", &row_fingerprints_cuda);
  m.impl("build_tables", &build_tables_cuda);
  m.impl("update_tables", &update_tables_cuda);
}

}  // namespace lsh_torch
