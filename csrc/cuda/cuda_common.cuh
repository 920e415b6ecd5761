// Helpers shared by the CUDA kernels of lsh_torch: argument checks, the device-side error flag
// that turns a bad index found inside a kernel into a TORCH_CHECK on the host, and small
// warp/block primitives. Header-only; every .cu in this folder includes it.
//
// Error flag: kernels that meet an input they cannot use (an index out of range, a code outside
// the table) never read or write out of bounds; they skip the element and record the first
// problem in a 4 x int64 device buffer. After the launches, the host copies the buffer back (one
// stream synchronisation) and raises the same message as the CPU kernel. While the current stream
// is capturing a CUDA graph the copy is not allowed, so the check is skipped there: the kernels
// stay memory-safe, but a bad index then yields zeros instead of an exception.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <utility>

namespace lsh_torch {
namespace cuda {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// Host-side checks

inline void check_cuda(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
}

// `t` must live on `device`, the CUDA device of the op's first tensor argument.
inline void check_same_device(const at::Tensor& t, const at::Device& device, const char* name, const char* op) {
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " like the other inputs, got one on ",
              t.device());
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool stream_is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

// A zeroed 4 x int64 device buffer: [code, a, b, c]. Codes are op-specific and > 0.
class ErrorFlag {
 public:
  ErrorFlag(const at::Device& device, cudaStream_t stream)
      : buf_(at::empty({4}, at::TensorOptions().dtype(at::kLong).device(device))), stream_(stream) {
    C10_CUDA_CHECK(cudaMemsetAsync(buf_.data_ptr<int64_t>(), 0, 4 * sizeof(int64_t), stream));
  }
  int64_t* ptr() { return buf_.data_ptr<int64_t>(); }
  // The recorded problem ({0, ...} if none). Synchronises the stream; returns {0, ...} without
  // synchronising while the stream is capturing a CUDA graph.
  std::array<int64_t, 4> read() const { return read_with(at::Tensor(), 0).first; }

  // read(), plus the value of a one-element integer device tensor (a count that sizes the next
  // launches) fetched in the same copy: one synchronisation for both. While the stream is
  // capturing a CUDA graph: {0, ...} and `when_capturing`.
  std::pair<std::array<int64_t, 4>, int64_t> read_with(const at::Tensor& scalar, int64_t when_capturing) const {
    std::array<int64_t, 4> out{0, 0, 0, 0};
    if (stream_is_capturing(stream_)) return {out, when_capturing};
    // A copy on the current stream: waits for the kernels before it.
    const auto host = (scalar.defined() ? at::cat({buf_, scalar.reshape({1}).to(at::kLong)}) : buf_).cpu();
    const int64_t* h = host.data_ptr<int64_t>();
    for (int i = 0; i < 4; ++i) out[i] = h[i];
    return {out, scalar.defined() ? h[4] : 0};
  }

 private:
  at::Tensor buf_;
  cudaStream_t stream_;
};

// Records (code, a, b, c) unless an earlier problem was recorded. Kernels on one stream run in
// order, so a problem found by an earlier launch wins over one found by a later launch.
__device__ __forceinline__ void report(int64_t* flag, int64_t code, int64_t a, int64_t b = 0, int64_t c = 0) {
  auto* f = reinterpret_cast<unsigned long long*>(flag);
  if (atomicCAS(f, 0ull, static_cast<unsigned long long>(code)) == 0ull) {
    flag[1] = a;
    flag[2] = b;
    flag[3] = c;
  }
}

// ---------------------------------------------------------------------------------------------
// Device primitives

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Exclusive prefix sum of one int per thread over a block of THREADS threads (a multiple of 32).
// `smem` holds THREADS / 32 ints; `total` gets the block's sum. Every thread must call it.
template <int THREADS>
__device__ __forceinline__ int block_exclusive_scan(int v, int* smem, int* total) {
  static_assert(THREADS % 32 == 0 && THREADS <= 1024, "block size must be a multiple of 32, at most 1024");
  constexpr int kWarps = THREADS / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += t;
  }
  if (lane == 31) smem[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int s = lane < kWarps ? smem[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int t = __shfl_up_sync(kFullMask, s, o);
      if (lane >= o) s += t;
    }
    if (lane < kWarps) smem[lane] = s;  // inclusive scan of the warp sums
  }
  __syncthreads();
  const int excl = (warp > 0 ? smem[warp - 1] : 0) + incl - v;
  *total = smem[kWarps - 1];
  __syncthreads();  // smem may be reused by the caller
  return excl;
}

// Products rounded on their own (never fused into an FMA), for results that must match the CPU
// kernels bit for bit (the CPU build does not contract a*b+c).
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }

}  // namespace cuda
}  // namespace lsh_torch
