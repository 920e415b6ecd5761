// CPU kernel of row_topk: each row's k highest scores, in torch.sort's descending stable order.
// torch.topk partial-sorts (value, index) pairs over the whole row (about 6 ns an element on the
// 2-core machine: 25 ms of a 108 ms LM step at 1,024 x 8,192). Here a threshold read off a sample of
// the row (256 entries, one every U / 256) passes about 1.5k + 8 U / 256 of the U entries, found by
// vectorized compares into a bit mask per 32 entries; only those are selected and sorted. A threshold
// that passes fewer than k falls back to the whole row: the same result, only slower.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "op_checks.h"

namespace lsh_torch {
namespace {

// Unsigned keys in the values' order, every NaN above +inf and -0.0 equal to 0.0: torch.sort's order.
// Branch-free (selects), so that the threshold pass below vectorizes.
inline uint32_t sort_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint32_t key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return v != v ? 0xffffffffu : v == 0.0f ? 0x80000000u : key;
}

inline uint64_t sort_key(double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  const uint64_t sign = uint64_t(1) << 63;
  const uint64_t key = (bits & sign) ? ~bits : (bits | sign);
  return v != v ? ~uint64_t(0) : v == 0.0 ? sign : key;
}

// The value of a key (NaN for the NaN key, 0.0 for both zeros'): the threshold as a value, which
// the pass below compares without computing keys.
inline float value_of(uint32_t key) {
  if (key == 0xffffffffu) return std::numeric_limits<float>::quiet_NaN();
  const uint32_t bits = (key & 0x80000000u) ? (key ^ 0x80000000u) : ~key;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

inline double value_of(uint64_t key) {
  const uint64_t sign = uint64_t(1) << 63;
  if (key == ~uint64_t(0)) return std::numeric_limits<double>::quiet_NaN();
  const uint64_t bits = (key & sign) ? (key ^ sign) : ~key;
  double v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

template <typename Key>
struct Entry {
  Key key;
  int64_t column;
};

// Higher key first, then lower column: a stable descending sort's order.
template <typename Key>
bool before(const Entry<Key>& a, const Entry<Key>& b) {
  return a.key > b.key || (a.key == b.key && a.column < b.column);
}

constexpr int64_t kSample = 256;  // entries per row that set the threshold
constexpr int64_t kBlock = 32;    // entries the threshold pass compares into one bit mask

template <typename scalar_t>
void row_topk_rows(const scalar_t* scores, int64_t rows_begin, int64_t rows_end, int64_t width, int64_t k,
                   int64_t* out) {
  // float16 and bfloat16 widen exactly to float.
  using Value = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using Key = decltype(sort_key(Value{}));
  thread_local std::vector<int64_t> columns;
  thread_local std::vector<Entry<Key>> kept;
  thread_local std::vector<Key> sample;
  columns.resize(width);  // the passing entries' columns
  const int64_t stride = std::max<int64_t>(1, width / kSample), sampled = (width + stride - 1) / stride;
  // The sample's rank (from the top) whose key is the threshold: 1.5x the rank of the k-th of the row,
  // and 8 more, keep about that many times k (or 8 strides more) of the row.
  const int64_t rank = k * sampled * 3 / (2 * width) + 8;
  for (int64_t row = rows_begin; row < rows_end; ++row) {
    const scalar_t* s = scores + row * width;
    // An entry is kept if its key is at least the threshold's: v >= t, or v is NaN (a NaN t keeps the
    // NaNs alone, -inf every entry).
    Value threshold = -std::numeric_limits<Value>::infinity();
    if (rank < sampled && width > 4 * k) {
      sample.resize(sampled);
      for (int64_t j = 0; j < sampled; ++j) sample[j] = sort_key(static_cast<Value>(s[j * stride]));
      std::nth_element(sample.begin(), sample.begin() + (rank - 1), sample.end(), std::greater<Key>());
      threshold = value_of(sample[rank - 1]);
    }
    int64_t count = 0;
    for (int pass = 0; pass < 2; ++pass) {
      count = 0;
      int64_t* dst = columns.data();
      // A bit per entry of a block (vectorized compares), then only the passing entries listed: about 1.5k +
      // 8 U / 256 of U, most blocks hold none or one.
      for (int64_t j0 = 0; j0 < width; j0 += kBlock) {
        const int64_t n = std::min(kBlock, width - j0);
        uint32_t passed = 0;
        for (int64_t i = 0; i < n; ++i) {
          const auto v = static_cast<Value>(s[j0 + i]);
          passed |= static_cast<uint32_t>((v >= threshold) | (v != v)) << i;
        }
        for (; passed; passed &= passed - 1) dst[count++] = j0 + __builtin_ctz(passed);
      }
      if (count >= k) break;
      threshold = -std::numeric_limits<Value>::infinity();  // too few past the sample's threshold: the whole row
    }
    kept.resize(count);
    for (int64_t i = 0; i < count; ++i) kept[i] = {sort_key(static_cast<Value>(s[columns[i]])), columns[i]};
    auto first = kept.begin(), last = kept.end();
    if (count > k) std::nth_element(first, first + k, last, before<Key>);
    std::sort(first, first + k, before<Key>);
    int64_t* o = out + row * k;
    for (int64_t i = 0; i < k; ++i) o[i] = kept[i].column;
  }
}

at::Tensor row_topk_cpu(const at::Tensor& scores_in, int64_t k) {
  check_row_topk_args(scores_in, k);
  TORCH_CHECK(scores_in.device().is_cpu(), "row_topk: scores must be a CPU tensor, got one on ", scores_in.device());
  const auto scores = scores_in.contiguous();
  const int64_t batch = scores.size(0), width = scores.size(1);
  auto out = at::empty({batch, k}, scores.options().dtype(at::kLong));
  if (batch == 0 || k == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(), "row_topk", [&] {
    const scalar_t* s = scores.data_ptr<scalar_t>();
    int64_t* o = out.data_ptr<int64_t>();
    at::parallel_for(0, batch, std::max<int64_t>(1, 32768 / width), [&](int64_t begin, int64_t end) {
      row_topk_rows(s, begin, end, width, k, o);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CPU, m) { m.impl("row_topk", &row_topk_cpu); }

}  // namespace lsh_torch
