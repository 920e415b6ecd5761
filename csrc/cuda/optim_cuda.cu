// CUDA kernel of the lazy (row-sparse) Adam step. Same contract and messages as
// csrc/cpu/optim_cpu.cpp.
//
// Design: the rows are checked first (one synchronisation; like the CPU, a bad row raises before
// any row is updated), then one thread per (touched row, column) does the fused update in the
// CPU's operation order with products that are not fused into FMAs, so the result equals the CPU
// kernel's bit for bit. Rows must be unique (LazyAdam passes a coalesced gradient's indices); a
// repeated row would be updated by two threads at once, as it would by two CPU threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cuda_common.cuh"
#include "op_checks.h"

namespace lsh_torch {
namespace {

using cuda::ceil_div;
using cuda::mul_rn;

__global__ void check_rows_kernel(const int64_t* __restrict__ rows, int64_t count, int64_t num_rows, int64_t* flag) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = rows[i];
    if (r < 0 || r >= num_rows) cuda::report(flag, 1, r);
    else if (i > 0 && rows[i - 1] >= r) cuda::report(flag, 2, r);  // unique rows: no two updates race
  }
}

template <typename scalar_t, typename acc_t>
__global__ void lazy_adam_kernel(scalar_t* __restrict__ p, scalar_t* __restrict__ m, scalar_t* __restrict__ v,
                                 const int64_t* __restrict__ rows, const scalar_t* __restrict__ g, int64_t count,
                                 int64_t width, int64_t num_rows, acc_t lr, acc_t c1, acc_t c2, acc_t e,
                                 acc_t keep) {
  const int64_t total = count * width;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t i = idx / width, k = idx - i * width;
    const int64_t row = rows[i];
    if (row < 0 || row >= num_rows) continue;  // checked before the launch
    const int64_t at = row * width + k;
    const acc_t gk = static_cast<acc_t>(g[idx]);
    // SparseAdam's operations in its order (as the CPU kernel):
    // mk = m + (gk - m) * c1;  vk = v + (gk * gk - v) * c2;  p = p * keep - mk / (sqrt(vk) + e) * lr
    const acc_t mo = static_cast<acc_t>(m[at]), vo = static_cast<acc_t>(v[at]);
    const acc_t mk = mo + mul_rn(gk - mo, c1);
    const acc_t gg = mul_rn(gk, gk);  // g^2 or v overflowing: Adam's order, as the CPU kernel
    const acc_t vk = isfinite(gg) && isfinite(vo) ? vo + mul_rn(gg - vo, c2)
                                                  : mul_rn(vo, acc_t(1) - c2) + mul_rn(mul_rn(c2, gk), gk);
    m[at] = static_cast<scalar_t>(mk);
    v[at] = static_cast<scalar_t>(vk);
    p[at] = static_cast<scalar_t>(mul_rn(static_cast<acc_t>(p[at]), keep) - mul_rn(mk / (std::sqrt(vk) + e), lr));
  }
}

void lazy_adam_cuda(at::Tensor& param, at::Tensor& exp_avg, at::Tensor& exp_avg_sq, const at::Tensor& rows_in,
                    const at::Tensor& grad_in, double step_size, double beta1, double beta2, double eps,
                    double decay) {
  const char* op = "lazy_adam_";
  const int64_t width =
      check_lazy_adam_args(param, exp_avg, exp_avg_sq, rows_in, grad_in, step_size, beta1, beta2, eps, decay, op);
  cuda::check_cuda(param, "param", op);
  const at::Device device = param.device();
  cuda::check_same_device(exp_avg, device, "exp_avg", op);
  cuda::check_same_device(exp_avg_sq, device, "exp_avg_sq", op);
  cuda::check_same_device(rows_in, device, "rows", op);
  cuda::check_same_device(grad_in, device, "grad_rows", op);
  const int64_t num_rows = param.size(0);
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto rows = rows_in.contiguous();
  const auto grad = grad_in.contiguous();
  const int64_t count = rows.numel();
  if (count == 0) return;
  cuda::ErrorFlag flag(device, stream);
  check_rows_kernel<<<std::min<int64_t>(ceil_div(count, 256), 4096), 256, 0, stream>>>(rows.data_ptr<int64_t>(),
                                                                                      count, num_rows, flag.ptr());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto e = flag.read();
  TORCH_CHECK(e[0] != 1, op, ": rows must be in [0, ", num_rows, "), got ", e[1]);
  TORCH_CHECK(e[0] != 2, op, ": rows must be strictly increasing (coalesce the gradient)");
  if (width == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "lazy_adam_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(ceil_div(count * width, 256), int64_t(1) << 20));
    lazy_adam_kernel<scalar_t, acc_t><<<blocks, 256, 0, stream>>>(
        param.data_ptr<scalar_t>(), exp_avg.data_ptr<scalar_t>(), exp_avg_sq.data_ptr<scalar_t>(),
        rows.data_ptr<int64_t>(), grad.data_ptr<scalar_t>(), count, width, num_rows, static_cast<acc_t>(step_size),
        static_cast<acc_t>(1.0 - beta1), static_cast<acc_t>(1.0 - beta2), static_cast<acc_t>(eps),
        static_cast<acc_t>(1.0 - decay));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CUDA, m) { m.impl("lazy_adam_", &lazy_adam_cuda); }

}  // namespace lsh_torch
