// CPU kernel of the multi-probe query: labels first, LSH candidates ranked by bucket hits,
// seeded random fill up to the budget. One row per task; a per-thread counter array of N.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "lsh_common.h"

namespace lsh_torch {
namespace {

constexpr int32_t kChosen = -1;  // counter value of a neuron already in the row's active set

struct Candidate {
  int32_t hits;
  uint64_t key;  // seeded tie-break
  int32_t id;
};

at::Tensor query_cpu(const at::Tensor& codes_in, const at::Tensor& margins_in, const at::Tensor& offsets_in,
                     const at::Tensor& items_in, int64_t probes, int64_t budget,
                     const std::optional<at::Tensor>& labels_in, int64_t seed) {
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.scalar_type() == at::kInt,
              "query: codes must be int32 [B, L], got ", codes_in.scalar_type(), " of shape ", codes_in.sizes());
  TORCH_CHECK(offsets_in.dim() == 2 && offsets_in.scalar_type() == at::kInt,
              "query: offsets must be int32 [L, 2^K + 1], got ", offsets_in.scalar_type(), " of shape ", offsets_in.sizes());
  TORCH_CHECK(items_in.dim() == 2 && items_in.scalar_type() == at::kInt,
              "query: items must be int32 [L, N], got ", items_in.scalar_type(), " of shape ", items_in.sizes());
  const int64_t batch = codes_in.size(0), num_tables = codes_in.size(1), n = items_in.size(1);
  const int64_t buckets = offsets_in.size(1) - 1;
  TORCH_CHECK(buckets >= 2 && (buckets & (buckets - 1)) == 0, "query: offsets must have 2^K + 1 columns, got ",
              offsets_in.size(1));
  const int64_t bits = __builtin_ctzll(static_cast<uint64_t>(buckets));
  TORCH_CHECK(bits <= kMaxBits, "query: bits (K) must be at most ", kMaxBits);
  TORCH_CHECK(offsets_in.size(0) == num_tables && items_in.size(0) == num_tables,
              "query: codes, offsets and items must agree on the number of tables L, got ", num_tables, ", ",
              offsets_in.size(0), " and ", items_in.size(0));
  TORCH_CHECK(margins_in.dim() == 2 && margins_in.scalar_type() == at::kFloat && margins_in.size(0) == batch &&
                  margins_in.size(1) == num_tables * bits,
              "query: margins must be float32 [B, L*K] = [", batch, ", ", num_tables * bits, "], got ",
              margins_in.scalar_type(), " of shape ", margins_in.sizes());
  TORCH_CHECK(probes >= 1 && probes <= std::min<int64_t>(kMaxProbes, buckets),
              "query: probes must be in [1, min(", kMaxProbes, ", 2^K = ", buckets, ")], got ", probes);
  TORCH_CHECK(budget >= 0 && budget <= n, "query: budget must be in [0, N = ", n, "], got ", budget);
  at::Tensor labels;
  int64_t num_labels = 0;
  if (labels_in.has_value() && labels_in->defined()) {
    TORCH_CHECK(labels_in->dim() == 2 && labels_in->scalar_type() == at::kLong && labels_in->size(0) == batch,
                "query: labels must be int64 [B, M] with B = ", batch, ", got ", labels_in->scalar_type(),
                " of shape ", labels_in->sizes());
    labels = labels_in->contiguous();
    num_labels = labels.size(1);
    const int64_t* lab = labels.data_ptr<int64_t>();
    for (int64_t i = 0; i < labels.numel(); ++i) {
      TORCH_CHECK(lab[i] >= -1 && lab[i] < n, "query: labels must be in [0, N = ", n, ") or -1 for padding, got ",
                  lab[i]);
    }
  }
  const auto codes = codes_in.contiguous();
  const auto margins = margins_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  const auto items = items_in.contiguous();
  auto active = at::empty({batch, budget}, codes.options().dtype(at::kLong));
  if (batch == 0 || budget == 0) return active;

  const int32_t* code = codes.data_ptr<int32_t>();
  const float* margin = margins.data_ptr<float>();
  const int32_t* off = offsets.data_ptr<int32_t>();
  const int32_t* item = items.data_ptr<int32_t>();
  const int64_t* lab = num_labels ? labels.data_ptr<int64_t>() : nullptr;
  int64_t* out = active.data_ptr<int64_t>();

  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> hits(n, 0);  // bucket hits per neuron, kChosen once selected
    std::vector<int32_t> touched;     // neurons whose counter is non-zero, to reset cheaply
    std::vector<Candidate> cand;
    std::vector<uint32_t> flips(probes);
    for (int64_t b = begin; b < end; ++b) {
      int64_t* row = out + b * budget;
      int64_t filled = 0;
      auto choose = [&](int32_t id) {
        if (hits[id] == 0) touched.push_back(id);
        hits[id] = kChosen;
        row[filled++] = id;
      };
      for (int64_t j = 0; j < num_labels; ++j) {
        const int64_t id = lab[b * num_labels + j];
        if (id < 0 || hits[id] == kChosen) continue;
        TORCH_CHECK(filled < budget, "query: row ", b, " has more distinct labels than the budget ", budget,
                    "; raise the active budget");
        choose(static_cast<int32_t>(id));
      }
      for (int64_t l = 0; l < num_tables; ++l) {
        probe_flips(margin + (b * num_tables + l) * bits, static_cast<int>(bits), static_cast<int>(probes), flips.data());
        const int32_t* o = off + l * (buckets + 1);
        for (int64_t p = 0; p < probes; ++p) {
          const uint32_t bucket = static_cast<uint32_t>(code[b * num_tables + l]) ^ flips[p];
          for (int32_t i = o[bucket]; i < o[bucket + 1]; ++i) {
            const int32_t id = item[l * n + i];
            int32_t& h = hits[id];
            if (h == kChosen) continue;
            if (h == 0) touched.push_back(id);
            ++h;
          }
        }
      }
      cand.clear();
      for (int32_t id : touched)
        if (hits[id] > 0) cand.push_back({hits[id], seeded_hash(seed, kTieBreak, b, id), id});
      auto better = [](const Candidate& a, const Candidate& c) {
        return a.hits > c.hits || (a.hits == c.hits && a.key < c.key);
      };
      const int64_t take = std::min<int64_t>(budget - filled, static_cast<int64_t>(cand.size()));
      if (take < static_cast<int64_t>(cand.size())) std::nth_element(cand.begin(), cand.begin() + take, cand.end(), better);
      std::sort(cand.begin(), cand.begin() + take, better);
      for (int64_t i = 0; i < take; ++i) choose(cand[i].id);
      // Random fill: seeded draws, then (rarely, when the budget is close to N) a walk over a
      // seeded full-period arithmetic sequence, which is sure to finish.
      const uint64_t max_draws = 4 * static_cast<uint64_t>(budget) + 64;
      for (uint64_t j = 0; filled < budget && j < max_draws; ++j) {
        const auto id = static_cast<int32_t>(seeded_hash(seed, kFillDraw, b, j) % static_cast<uint64_t>(n));
        if (hits[id] != kChosen) choose(id);
      }
      if (filled < budget) {
        const uint64_t un = static_cast<uint64_t>(n);
        uint64_t pos = seeded_hash(seed, kFillWalk, b, 0) % un;
        uint64_t stride = un > 1 ? 1 + seeded_hash(seed, kFillWalk, b, 1) % (un - 1) : 1;
        while (std::gcd(stride, un) != 1) ++stride;
        for (uint64_t i = 0; filled < budget && i < un; ++i, pos = (pos + stride) % un)
          if (hits[pos] != kChosen) choose(static_cast<int32_t>(pos));
      }
      for (int32_t id : touched) hits[id] = 0;
      touched.clear();
    }
  });
  return active;
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CPU, m) { m.impl("query", &query_cpu); }

}  // namespace lsh_torch
