// CUDA kernels of the sparse linear layer: out[b, a] = W[active[b, a]] . x[b] + bias[active[b, a]]
// and its gradients. Same contract and messages as csrc/cpu/sparse_linear_cpu.cpp. All sums run
// in at::opmath_type (float32 for half and bfloat16) and in a fixed order, so every result is
// bitwise reproducible from run to run on one GPU (no atomics on floating-point values); results
// equal the CPU's to rounding (grad_input's summation order differs; the weight gradient's is the
// CPU's, but its products may contract into FMAs).
//
// Design
// - sparse_linear: one warp per (b, a) pair; lanes stride over d (16-byte vector loads when the
//   rows allow), then a shuffle reduction. Pairs of one row are adjacent, so x[b] stays in cache.
// - grad_input: a thread per (b, k) sums over a in order (coalesced reads of each gathered row
//   across the threads of a block). Few rows and a long budget would leave the GPU idle, so the
//   budget is split into S chunks whose partial sums a second kernel adds in chunk order.
// - grad_weight(_rows): the (row, pair) keys are sorted with a stable sort, which keeps the
//   pairs of a row in ascending order (the CPU's sort order); one warp per row-run then sums its
//   pairs in that order (lanes over d) and writes the row once. No races, no float atomics.
//   The compact form numbers the runs with a prefix sum; its size is read back with the error
//   flag (one synchronisation), as the op's output size depends on the data.
// Active indices are checked inside the kernels (error flag, see cuda_common.cuh): a bad index
// is never dereferenced and raises the CPU's message after the launches.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "cuda_common.cuh"
#include "op_checks.h"

namespace lsh_torch {
namespace {

using cuda::ceil_div;
using cuda::kFullMask;

constexpr int64_t kActiveRange = 1;  // error code: (index)

void check_matrix(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating, got ", t.scalar_type());
}

void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* na, const char* nb, const char* op) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", na, " and ", nb, " must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
}

void check_active_shape(const at::Tensor& active, int64_t batch, const char* op) {
  TORCH_CHECK(active.dim() == 2 && active.scalar_type() == at::kLong, op, ": active must be int64 [B, A], got ",
              active.scalar_type(), " of shape ", active.sizes());
  TORCH_CHECK(active.size(0) == batch, op, ": active has ", active.size(0), " rows but the batch has ", batch);
}

void raise_if(const std::array<int64_t, 4>& e, int64_t num_rows, const char* op) {
  TORCH_CHECK(e[0] == 0, op, ": active index ", e[1], " is outside [0, ", num_rows, ")");
}

void raise_if_flagged(const cuda::ErrorFlag& flag, int64_t num_rows, const char* op) {
  raise_if(flag.read(), num_rows, op);
}

int64_t grid_for(int64_t work, int threads) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(work, threads), int64_t(1) << 20));
}

__global__ void check_indices_kernel(const int64_t* __restrict__ idx, int64_t count, int64_t num_rows, int64_t* flag) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = idx[i];
    if (v < 0 || v >= num_rows) cuda::report(flag, kActiveRange, v);
  }
}

// VEC consecutive elements loaded as one 16-byte (or narrower) access.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t v[VEC];
};

template <typename scalar_t>
constexpr int max_vec() {
  return 16 / sizeof(scalar_t) > 0 ? static_cast<int>(16 / sizeof(scalar_t)) : 1;
}

bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// ---------------------------------------------------------------------------------------------
// Forward

template <typename scalar_t, typename acc_t, int VEC>
__global__ void sparse_linear_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                     const scalar_t* __restrict__ bias, const int64_t* __restrict__ active,
                                     scalar_t* __restrict__ out, int64_t pairs, int64_t budget, int64_t d,
                                     int64_t num_rows, int64_t* flag) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_block = blockDim.x >> 5;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * warps_per_block + (threadIdx.x >> 5); p < pairs; p += stride) {
    const int64_t row = active[p];  // the same for the whole warp
    if (row < 0 || row >= num_rows) {
      if (lane == 0) {
        cuda::report(flag, kActiveRange, row);
        out[p] = scalar_t(0);
      }
      continue;
    }
    const scalar_t* wr = w + row * d;
    const scalar_t* xr = x + (p / budget) * d;
    acc_t acc = 0;
    if constexpr (VEC > 1) {
      using P = Pack<scalar_t, VEC>;
      const P* wv = reinterpret_cast<const P*>(wr);
      const P* xv = reinterpret_cast<const P*>(xr);
      for (int64_t k = lane; k < d / VEC; k += 32) {
        const P a = wv[k], c = xv[k];
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc += static_cast<acc_t>(a.v[e]) * static_cast<acc_t>(c.v[e]);
      }
    } else {
      for (int64_t k = lane; k < d; k += 32) acc += static_cast<acc_t>(wr[k]) * static_cast<acc_t>(xr[k]);
    }
    acc = cuda::warp_sum(acc);
    if (lane == 0) {
      if (bias != nullptr) acc += static_cast<acc_t>(bias[row]);
      out[p] = static_cast<scalar_t>(acc);
    }
  }
}

at::Tensor sparse_linear_cuda(const at::Tensor& x_in, const at::Tensor& w_in, const std::optional<at::Tensor>& bias_in,
                              const at::Tensor& active_in) {
  const char* op = "sparse_linear";
  check_matrix(x_in, "x", op);
  check_matrix(w_in, "weight", op);
  check_same_dtype(x_in, w_in, "x", "weight", op);
  TORCH_CHECK(x_in.size(1) == w_in.size(1), op, ": x has ", x_in.size(1), " features but weight expects ", w_in.size(1));
  const bool has_bias = bias_in.has_value() && bias_in->defined();
  if (has_bias) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == w_in.size(0), op, ": bias must be [", w_in.size(0),
                "], got shape ", bias_in->sizes());
    check_same_dtype(x_in, *bias_in, "x", "bias", op);
  }
  check_active_shape(active_in, x_in.size(0), op);
  cuda::check_cuda(x_in, "x", op);
  const at::Device device = x_in.device();
  cuda::check_same_device(w_in, device, "weight", op);
  if (has_bias) cuda::check_same_device(*bias_in, device, "bias", op);
  cuda::check_same_device(active_in, device, "active", op);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto x = x_in.contiguous(), w = w_in.contiguous(), active = active_in.contiguous();
  const at::Tensor bias = has_bias ? bias_in->contiguous() : at::Tensor();
  const int64_t batch = x.size(0), d = x.size(1), budget = active.size(1), num_rows = w.size(0);
  const int64_t pairs = batch * budget;
  auto out = at::empty({batch, budget}, x.options());
  if (pairs == 0) return out;
  cuda::ErrorFlag flag(device, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_linear_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = max_vec<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const bool vec = d % kVec == 0 && aligned_to(xp, 16) && aligned_to(wp, 16);
    constexpr int threads = 256;
    const int64_t blocks = grid_for(pairs, threads / 32);
    auto launch = [&](auto vec_tag) {
      constexpr int V = decltype(vec_tag)::value;
      sparse_linear_kernel<scalar_t, acc_t, V><<<blocks, threads, 0, stream>>>(
          xp, wp, has_bias ? bias.data_ptr<scalar_t>() : nullptr, active.data_ptr<int64_t>(),
          out.data_ptr<scalar_t>(), pairs, budget, d, num_rows, flag.ptr());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vec) launch(std::integral_constant<int, kVec>{});
    else launch(std::integral_constant<int, 1>{});
  });
  raise_if_flagged(flag, num_rows, op);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Gradient with respect to x

// Block (tile of d, row b, chunk s): thread k sums g[b, a] * W[active[b, a], k] over the chunk's a.
template <typename scalar_t, typename acc_t>
__global__ void grad_input_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ w,
                                  const int64_t* __restrict__ active, scalar_t* __restrict__ grad_x,
                                  acc_t* __restrict__ partial, int64_t batch, int64_t budget, int64_t d,
                                  int64_t num_rows, int64_t tiles, int64_t chunk, int64_t* flag) {
  const int64_t b = blockIdx.x / tiles, tile = blockIdx.x - b * tiles, s = blockIdx.y;
  const int64_t k = tile * blockDim.x + threadIdx.x;
  const int64_t a0 = s * chunk, a1 = std::min(budget, a0 + chunk);
  const int64_t* ar = active + b * budget;
  const scalar_t* gr = g + b * budget;
  acc_t acc = 0;
#pragma unroll 4
  for (int64_t a = a0; a < a1; ++a) {
    const int64_t row = ar[a];
    if (row < 0 || row >= num_rows) {
      if (tile == 0 && threadIdx.x == 0) cuda::report(flag, kActiveRange, row);
      continue;
    }
    if (k < d) acc += static_cast<acc_t>(gr[a]) * static_cast<acc_t>(w[row * d + k]);
  }
  if (k >= d) return;
  if (partial != nullptr) partial[(s * batch + b) * d + k] = acc;
  else grad_x[b * d + k] = static_cast<scalar_t>(acc);
}

template <typename scalar_t, typename acc_t>
__global__ void sum_chunks_kernel(const acc_t* __restrict__ partial, int64_t chunks, int64_t total,
                                  scalar_t* __restrict__ grad_x) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t acc = 0;
    for (int64_t s = 0; s < chunks; ++s) acc += partial[s * total + i];
    grad_x[i] = static_cast<scalar_t>(acc);
  }
}

at::Tensor sparse_linear_grad_input_cuda(const at::Tensor& g_in, const at::Tensor& w_in, const at::Tensor& active_in) {
  const char* op = "sparse_linear_grad_input";
  check_matrix(g_in, "grad_out", op);
  check_matrix(w_in, "weight", op);
  check_same_dtype(g_in, w_in, "grad_out", "weight", op);
  check_active_shape(active_in, g_in.size(0), op);
  TORCH_CHECK(g_in.size(1) == active_in.size(1), op, ": grad_out must be [B, A] like active, got ", g_in.sizes());
  cuda::check_cuda(g_in, "grad_out", op);
  const at::Device device = g_in.device();
  cuda::check_same_device(w_in, device, "weight", op);
  cuda::check_same_device(active_in, device, "active", op);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto g = g_in.contiguous(), w = w_in.contiguous(), active = active_in.contiguous();
  const int64_t batch = g.size(0), budget = g.size(1), d = w.size(1), num_rows = w.size(0);
  auto grad_x = at::empty({batch, d}, g.options());
  if (batch == 0) return grad_x;
  if (budget == 0) return grad_x.zero_();
  cuda::ErrorFlag flag(device, stream);
  if (d == 0) {  // nothing to compute, but the indices are still checked
    check_indices_kernel<<<grid_for(batch * budget, 256), 256, 0, stream>>>(active.data_ptr<int64_t>(),
                                                                           batch * budget, num_rows, flag.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    raise_if_flagged(flag, num_rows, op);
    return grad_x;
  }
  const int threads = static_cast<int>(std::min<int64_t>(256, ceil_div(d, 32) * 32));
  const int64_t tiles = ceil_div(d, threads);
  // Split the budget so that about 1024 blocks run (each chunk at least 32 long); a fixed target,
  // not the SM count, so the result does not depend on the GPU model.
  int64_t chunks = std::clamp<int64_t>(ceil_div(1024, batch * tiles), 1, std::max<int64_t>(1, budget / 32));
  chunks = std::min<int64_t>(chunks, 65535);
  const int64_t chunk = ceil_div(budget, chunks);
  chunks = ceil_div(budget, chunk);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "sparse_linear_grad_input_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partial;
    if (chunks > 1) {
      partial = at::empty({chunks, batch, d}, g.options().dtype(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat));
    }
    // A grid's x dimension holds 2^31 - 1 blocks: past it the cast cut the grid short, leaving grad_x unwritten.
    TORCH_CHECK(batch * tiles < (int64_t(1) << 31), op, ": batch x ceil(in_features / ", threads, ") = ",
                batch * tiles, " thread blocks is too many for one launch (at most 2^31 - 1): split the batch");
    const dim3 grid(static_cast<unsigned>(batch * tiles), static_cast<unsigned>(chunks));
    grad_input_kernel<scalar_t, acc_t><<<grid, threads, 0, stream>>>(
        g.data_ptr<scalar_t>(), w.data_ptr<scalar_t>(), active.data_ptr<int64_t>(), grad_x.data_ptr<scalar_t>(),
        chunks > 1 ? partial.data_ptr<acc_t>() : nullptr, batch, budget, d, num_rows, tiles, chunk, flag.ptr());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (chunks > 1) {
      sum_chunks_kernel<scalar_t, acc_t><<<grid_for(batch * d, 256), 256, 0, stream>>>(
          partial.data_ptr<acc_t>(), chunks, batch * d, grad_x.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  raise_if_flagged(flag, num_rows, op);
  return grad_x;
}

// ---------------------------------------------------------------------------------------------
// Gradient with respect to weight and bias

// key[p] = active[p] as int32 (sorts the pairs by row), or -1 for an index outside [0, num_rows).
__global__ void row_keys_kernel(const int64_t* __restrict__ active, int64_t pairs, int64_t num_rows,
                                int32_t* __restrict__ keys, int64_t* flag) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t v = active[p];
    if (v < 0 || v >= num_rows) {
      cuda::report(flag, kActiveRange, v);
      keys[p] = -1;
    } else {
      keys[p] = static_cast<int32_t>(v);
    }
  }
}

__global__ void run_starts_kernel(const int32_t* __restrict__ sorted, int64_t pairs, int32_t* __restrict__ starts) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    starts[i] = sorted[i] >= 0 && (i == 0 || sorted[i - 1] != sorted[i]) ? 1 : 0;
  }
}

// One warp per sorted position; the warp at the start of a row's run sums the run in order.
// Dense (run_index == nullptr): the row lands at its own index. Compact: at run_index[i] - 1.
template <typename scalar_t, typename acc_t>
__global__ void weight_grad_kernel(const int32_t* __restrict__ sorted, const int64_t* __restrict__ perm,
                                   const int32_t* __restrict__ run_index, const scalar_t* __restrict__ g,
                                   const scalar_t* __restrict__ x, int64_t pairs, int64_t budget, int64_t d,
                                   scalar_t* __restrict__ grad_w, scalar_t* __restrict__ grad_b,
                                   int64_t* __restrict__ rows_out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_block = blockDim.x >> 5;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * warps_per_block + (threadIdx.x >> 5); i < pairs; i += stride) {
    const int32_t row = sorted[i];  // warp-uniform
    if (row < 0 || (i > 0 && sorted[i - 1] == row)) continue;
    int64_t end = i;
    for (;;) {  // the run is a prefix of the lanes' positions, since the keys are sorted
      const int64_t j = end + lane;
      const unsigned same = __ballot_sync(kFullMask, j < pairs && sorted[j] == row);
      end += __popc(same);
      if (same != kFullMask) break;
    }
    const int64_t dst = run_index != nullptr ? static_cast<int64_t>(run_index[i]) - 1 : static_cast<int64_t>(row);
    for (int64_t k0 = 0; k0 < d; k0 += 32) {
      const int64_t k = k0 + lane;
      acc_t acc = 0;
      for (int64_t q = i; q < end; ++q) {
        const int64_t pair = perm[q];
        if (k < d) acc += static_cast<acc_t>(g[pair]) * static_cast<acc_t>(x[(pair / budget) * d + k]);
      }
      if (k < d) grad_w[dst * d + k] = static_cast<scalar_t>(acc);
    }
    if (lane == 0) {
      acc_t bias_acc = 0;
      for (int64_t q = i; q < end; ++q) bias_acc += static_cast<acc_t>(g[perm[q]]);
      grad_b[dst] = static_cast<scalar_t>(bias_acc);
      if (rows_out != nullptr) rows_out[dst] = row;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> weight_grad_impl(const at::Tensor& g_in, const at::Tensor& x_in,
                                                                const at::Tensor& active_in, int64_t num_rows,
                                                                bool dense, const char* op) {
  check_matrix(g_in, "grad_out", op);
  check_matrix(x_in, "x", op);
  check_same_dtype(g_in, x_in, "grad_out", "x", op);
  TORCH_CHECK(g_in.size(0) == x_in.size(0), op, ": grad_out and x must have the same batch size, got ",
              g_in.size(0), " and ", x_in.size(0));
  check_active_shape(active_in, g_in.size(0), op);
  TORCH_CHECK(g_in.size(1) == active_in.size(1), op, ": grad_out must be [B, A] like active, got ", g_in.sizes());
  cuda::check_cuda(g_in, "grad_out", op);
  const at::Device device = g_in.device();
  cuda::check_same_device(x_in, device, "x", op);
  cuda::check_same_device(active_in, device, "active", op);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto g = g_in.contiguous(), x = x_in.contiguous(), active = active_in.contiguous();
  const int64_t budget = g.size(1), d = x.size(1), pairs = g.numel();
  TORCH_CHECK(pairs < std::numeric_limits<uint32_t>::max(), op, ": B*A must be below 2^32");
  TORCH_CHECK(num_rows <= std::numeric_limits<int32_t>::max(), op, ": num_rows must be below 2^31, got ", num_rows);

  auto empty_rows = [&]() { return at::empty({0}, active.options()); };
  if (pairs == 0) {
    if (dense) return {empty_rows(), at::zeros({num_rows, d}, x.options()), at::zeros({num_rows}, x.options())};
    return {empty_rows(), at::empty({0, d}, x.options()), at::empty({0}, x.options())};
  }
  cuda::ErrorFlag flag(device, stream);
  auto keys = at::empty({pairs}, active.options().dtype(at::kInt));
  row_keys_kernel<<<grid_for(pairs, 256), 256, 0, stream>>>(active.data_ptr<int64_t>(), pairs, num_rows,
                                                           keys.data_ptr<int32_t>(), flag.ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Stable: the pairs of a row stay in ascending order, the order in which the CPU sums them.
  auto [sorted_keys, perm_keys] = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto sorted = sorted_keys.contiguous();
  const auto perm = perm_keys.contiguous();

  at::Tensor rows, grad_w, grad_b, run_index;
  if (dense) {
    raise_if_flagged(flag, num_rows, op);
    rows = empty_rows();
    grad_w = at::zeros({num_rows, d}, x.options());
    grad_b = at::zeros({num_rows}, x.options());
  } else {
    auto starts = at::empty({pairs}, keys.options());
    run_starts_kernel<<<grid_for(pairs, 256), 256, 0, stream>>>(sorted.data_ptr<int32_t>(), pairs,
                                                               starts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    run_index = at::cumsum(starts, 0, at::kInt);
    // The problems found and the number of distinct rows, in one synchronisation.
    const auto [problem, touched] = flag.read_with(run_index[pairs - 1], /*when_capturing=*/-1);
    TORCH_CHECK(touched >= 0, op, ": cannot be captured in a CUDA graph (its output size depends on the data)");
    raise_if(problem, num_rows, op);
    rows = at::empty({touched}, active.options());
    grad_w = at::empty({touched, d}, x.options());
    grad_b = at::empty({touched}, x.options());
    if (touched == 0) return {rows, grad_w, grad_b};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "sparse_linear_grad_weight_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int threads = 256;
    weight_grad_kernel<scalar_t, acc_t><<<grid_for(pairs, threads / 32), threads, 0, stream>>>(
        sorted.data_ptr<int32_t>(), perm.data_ptr<int64_t>(), dense ? nullptr : run_index.data_ptr<int32_t>(),
        g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), pairs, budget, d, grad_w.data_ptr<scalar_t>(),
        grad_b.data_ptr<scalar_t>(), dense ? nullptr : rows.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {rows, grad_w, grad_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_linear_grad_weight_rows_cuda(const at::Tensor& g,
                                                                                   const at::Tensor& x,
                                                                                   const at::Tensor& active) {
  // The compact form needs no row count; rows only have to fit an int32 sort key.
  return weight_grad_impl(g, x, active, std::numeric_limits<int32_t>::max(), false, "sparse_linear_grad_weight_rows");
}

std::tuple<at::Tensor, at::Tensor> sparse_linear_grad_weight_cuda(const at::Tensor& g, const at::Tensor& x,
                                                                  const at::Tensor& active, int64_t num_rows) {
  check_grad_weight_rows(num_rows, "sparse_linear_grad_weight");
  auto [rows, grad_w, grad_b] = weight_grad_impl(g, x, active, num_rows, true, "sparse_linear_grad_weight");
  return {grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CUDA, m) {
  m.impl("sparse_linear", &sparse_linear_cuda);
  m.impl("sparse_linear_grad_input", &sparse_linear_grad_input_cuda);
  m.impl("sparse_linear_grad_weight_rows", &sparse_linear_grad_weight_rows_cuda);
  m.impl("sparse_linear_grad_weight", &sparse_linear_grad_weight_cuda);
}

}  // namespace lsh_torch
