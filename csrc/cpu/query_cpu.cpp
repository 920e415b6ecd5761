// CPU kernels of the multi-probe query. Both modes build an active set the same way: forced
// labels first, then LSH candidates ranked by bucket hits (ties broken by a seeded hash), then
// seeded uniform draws from the rest up to the budget (the tail; `tail` entries are reserved for
// it, so at most budget - labels - tail candidates are taken). `query` builds one set per input row (in parallel over
// rows); `query_shared` builds one set for the whole batch from the union of its rows' probes
// (counted in parallel over ranges of neuron ids).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <exception>
#include <limits>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include "lsh_common.h"
#include "op_checks.h"

namespace lsh_torch {
namespace {

// Per-neuron hit counters of type Hits: uint16_t in general, uint8_t for per-row sets from fewer
// than kMaxHits tables (a neuron sits in one bucket per table and a row probes distinct buckets,
// so its hits never exceed L). One byte per neuron keeps the counters of 670K neurons (670 KB)
// in a core's L2 cache, where the random increments of a query land (measured: see
// ActiveSetBuilder::count). Counts saturate at kMaxHits; kChosen marks a neuron already in the
// active set.
template <typename Hits>
constexpr Hits kChosenOf = std::numeric_limits<Hits>::max();
template <typename Hits>
constexpr Hits kMaxHitsOf = kChosenOf<Hits> - 1;

// One zeroed counter array per thread, reused across calls: allocating and clearing N counters
// per call would cost O(N) per step. Users restore the zeros (ActiveSetBuilder's destructor).
template <typename Hits>
std::vector<Hits>& thread_hits(int64_t n) {
  thread_local std::vector<Hits> hits;
  if (static_cast<int64_t>(hits.size()) < n) hits.assign(n, 0);
  return hits;
}

struct Tables {
  const int32_t* code;     // [B, L]
  const float* margin;     // [B, L*K]
  const int32_t* offsets;  // [L, 2^K + 1]
  const int32_t* items;    // [L, N]
  const int64_t* labels;   // [B, M] or nullptr
  int64_t batch, num_tables, bits, n, probes, num_labels;
};

Tables check_and_view(const at::Tensor& codes, const at::Tensor& margins, const at::Tensor& offsets,
                      const at::Tensor& items, int64_t probes, int64_t budget, int64_t tail,
                      const at::Tensor& labels, const char* op) {
  const QueryShape shape = check_query_args(codes, margins, offsets, items, probes, budget, tail, labels, op);
  for (const at::Tensor* t : {&codes, &margins, &offsets, &items})
    TORCH_CHECK(t->device().is_cpu(), op, ": all inputs must be CPU tensors, got one on ", t->device());
  const int64_t batch = shape.batch, num_tables = shape.num_tables, n = shape.n, buckets = shape.buckets;
  const int64_t bits = shape.bits, num_labels = shape.num_labels;
  // Tables are checked where it is cheap: offsets here (O(L * 2^K), not O(N)), item ids as the
  // probes read them (ActiveSetBuilder::count), so malformed tables raise instead of corrupting memory.
  const int32_t* off = offsets.data_ptr<int32_t>();
  for (int64_t l = 0; l < num_tables; ++l) {
    const int32_t* o = off + l * (buckets + 1);
    TORCH_CHECK(o[0] == 0 && o[buckets] == n, op, ": offsets of table ", l, " must run from 0 to N = ", n);
    for (int64_t k = 0; k < buckets; ++k)
      TORCH_CHECK(o[k] <= o[k + 1], op, ": offsets of table ", l, " must be non-decreasing");
  }
  if (labels.defined()) {
    TORCH_CHECK(labels.device().is_cpu(), op, ": labels must be a CPU tensor, got one on ", labels.device());
    const int64_t* lab = labels.data_ptr<int64_t>();
    for (int64_t i = 0; i < labels.numel(); ++i) {
      TORCH_CHECK(valid_label(lab[i], n), op, ": labels must be in [0, N = ", n, ") or -1 / ", kIgnoreIndex,
                  " for padding, got ", lab[i]);
      // A budget of 0 returns before the labels are placed: none may be dropped silently.
      TORCH_CHECK(budget > 0 || lab[i] < 0, "query: ",
                  std::string(op) == "query" ? "row " + std::to_string(i / labels.size(1)) : std::string("the batch"),
                  " has more distinct labels than the budget 0; raise the active budget");
    }
  }
  return {codes.data_ptr<int32_t>(), margins.data_ptr<float>(), offsets.data_ptr<int32_t>(),
          items.data_ptr<int32_t>(), num_labels ? labels.data_ptr<int64_t>() : nullptr,
          batch, num_tables, bits, n, probes, num_labels};
}

// Builds one active set into `out` [budget]; reusable across sets (counters reset in O(touched)).
template <typename Hits>
class ActiveSetBuilder {
  static constexpr Hits kChosen = kChosenOf<Hits>, kMaxHits = kMaxHitsOf<Hits>;

 public:
  explicit ActiveSetBuilder(const Tables& t) : t_(t), hits_(thread_hits<Hits>(t.n)) {}
  ~ActiveSetBuilder() { reset(); }  // also after an exception, so the thread's counters stay zero
  ActiveSetBuilder(const ActiveSetBuilder&) = delete;
  ActiveSetBuilder& operator=(const ActiveSetBuilder&) = delete;

  void start(int64_t* out, int64_t budget, int64_t tail) { out_ = out, budget_ = budget, tail_ = tail, filled_ = 0; }

  void add_labels(int64_t row, int64_t set) {
    for (int64_t j = 0; j < t_.num_labels; ++j) {
      const int64_t id = t_.labels[row * t_.num_labels + j];
      if (id < 0 || hits_[id] == kChosen) continue;
      TORCH_CHECK(filled_ < budget_, "query: ", set < 0 ? std::string("the batch") : "row " + std::to_string(set),
                  " has more distinct labels than the budget ", budget_, "; raise the active budget");
      choose(static_cast<int32_t>(id));
    }
  }

  // Counts the probed buckets of input `row` for one set.
  void probe(int64_t row) {
    const int64_t per_row = t_.num_tables * t_.probes;
    flips_.resize(per_row);
    row_flips(row, flips_.data());
    count(row, flips_.data(), 0, static_cast<int32_t>(t_.n), touched_);
  }

  // The same for every input row into one set (query_shared), in parallel: part p of P counts the
  // neurons in [N p / P, N (p + 1) / P) of every probed bucket, so the parts write disjoint counters
  // (no races, no merge) and the counts equal those of probe() row after row.
  void probe_all() {
    const int64_t per_row = t_.num_tables * t_.probes;
    flips_.resize(t_.batch * per_row);
    for (int64_t row = 0; row < t_.batch; ++row) row_flips(row, flips_.data() + row * per_row);
    // One part for small batches: starting the threads would cost more than the counting.
    const int64_t parts = t_.batch * per_row >= 256 ? std::max(1, at::get_num_threads()) : 1;
    std::vector<std::vector<int32_t>> touched(parts);
    std::exception_ptr error;
    try {
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t part = begin; part < end; ++part) {
          const auto lo = static_cast<int32_t>(t_.n * part / parts), hi = static_cast<int32_t>(t_.n * (part + 1) / parts);
          for (int64_t row = 0; row < t_.batch; ++row) count(row, flips_.data() + row * per_row, lo, hi, touched[part]);
        }
      });
    } catch (...) {
      error = std::current_exception();
    }
    for (const auto& part : touched) touched_.insert(touched_.end(), part.begin(), part.end());  // reset() clears them
    if (error) std::rethrow_exception(error);
  }

  // Takes the best candidates (leaving `tail` entries), fills up with seeded uniform draws, and
  // resets the counters. `set` names the random streams: the row for per-row sets, -1 for the
  // batch-shared set. Returns the head: labels and candidates, the entries before the draws.
  int64_t finish(int64_t seed, int64_t set) {
    // One pass over the touched neurons' counters (random reads: the cost of this step) copies
    // their hits into a dense array and zeroes them; the labels, already chosen, are marked again
    // below. Every later pass reads the dense array. Only candidates with at least `floor` hits can
    // be among the `room` best: a histogram of the hit counts finds that floor, so the tie-break
    // keys (a hash each) and the selection below cover those few instead of every touched neuron.
    const int64_t room = std::max<int64_t>(0, budget_ - filled_ - tail_);
    const size_t touched = touched_.size();
    touched_hits_.resize(touched);
    Hits top = 0;
    for (size_t i = 0; i < touched; ++i) {
      Hits& h = hits_[touched_[i]];
      const Hits hits = h == kChosen ? 0 : h;
      touched_hits_[i] = hits;
      top = std::max(top, hits);
      h = 0;
    }
    for (int64_t i = 0; i < filled_; ++i) hits_[out_[i]] = kChosen;  // the labels stay chosen
    histogram_.assign(static_cast<size_t>(top) + 1, 0);
    for (size_t i = 0; i < touched; ++i) ++histogram_[touched_hits_[i]];
    Hits floor = std::max<Hits>(top, 1);
    for (int64_t above = histogram_[floor]; floor > 1 && above < room; above += histogram_[--floor]) {}
    cand_.clear();
    if (top > 0)
      for (size_t i = 0; i < touched; ++i)
        if (touched_hits_[i] >= floor) cand_.push_back({touched_hits_[i], seeded_hash(seed, kTieBreak, set, touched_[i]), touched_[i]});
    touched_.clear();
    for (int64_t i = 0; i < filled_; ++i) touched_.push_back(static_cast<int32_t>(out_[i]));
    auto better = [](const Candidate& a, const Candidate& c) {
      return a.hits > c.hits || (a.hits == c.hits && a.key < c.key);
    };
    const int64_t take = std::min<int64_t>(room, static_cast<int64_t>(cand_.size()));
    if (take < static_cast<int64_t>(cand_.size()))
      std::nth_element(cand_.begin(), cand_.begin() + take, cand_.end(), better);
    std::sort(cand_.begin(), cand_.begin() + take, better);
    for (int64_t i = 0; i < take; ++i) choose(cand_[i].id);
    const int64_t head = filled_;
    // Seeded draws, then (rarely, when the budget is close to N) a walk over a seeded
    // full-period arithmetic sequence, which is sure to finish.
    const uint64_t n = static_cast<uint64_t>(t_.n);
    const uint64_t max_draws = 4 * static_cast<uint64_t>(budget_) + 64;
    for (uint64_t j = 0; filled_ < budget_ && j < max_draws; ++j) {
      const auto id = static_cast<int32_t>(seeded_hash(seed, kFillDraw, set, j) % n);
      if (hits_[id] != kChosen) choose(id);
    }
    if (filled_ < budget_) {
      uint64_t pos = seeded_hash(seed, kFillWalk, set, 0) % n;
      uint64_t stride = n > 1 ? 1 + seeded_hash(seed, kFillWalk, set, 1) % (n - 1) : 1;
      while (std::gcd(stride, n) != 1) ++stride;
      for (uint64_t i = 0; filled_ < budget_ && i < n; ++i, pos = (pos + stride) % n)
        if (hits_[pos] != kChosen) choose(static_cast<int32_t>(pos));
    }
    reset();
    return head;
  }

 private:
  struct Candidate {
    Hits hits;
    uint64_t key;
    int32_t id;
  };

  void row_flips(int64_t row, uint32_t* flips) const {  // [L, probes]
    for (int64_t l = 0; l < t_.num_tables; ++l)
      probe_flips(t_.margin + (row * t_.num_tables + l) * t_.bits, static_cast<int>(t_.bits),
                  static_cast<int>(t_.probes), flips + l * t_.probes);
  }

  // Adds one hit per probed bucket of `row` to the neurons in [lo, hi) that hold it.
  void count(int64_t row, const uint32_t* flips, int32_t lo, int32_t hi, std::vector<int32_t>& touched) {
    for (int64_t l = 0; l < t_.num_tables; ++l) {
      const int32_t* o = t_.offsets + l * ((int64_t(1) << t_.bits) + 1);
      const int32_t* items = t_.items + l * t_.n;
      const int32_t code = t_.code[row * t_.num_tables + l];
      // The bucket indexes offsets: an out-of-range code would read past them.
      TORCH_CHECK(code >= 0 && code < (int64_t(1) << t_.bits), "query: codes must be in [0, 2^K = ",
                  int64_t(1) << t_.bits, "), got ", code, " (table ", l, ")");
      for (int64_t p = 0; p < t_.probes; ++p) {
        const uint32_t bucket = static_cast<uint32_t>(code) ^ flips[l * t_.probes + p];
        // Branch-free on the counter: whether a neuron is new is a coin flip that a branch would
        // mispredict, stalling the independent counter reads the core could otherwise overlap
        // (they miss the L1: this loop is the query's time). Every id is written past the end of
        // `touched`, which grows by one if it was new; a chosen neuron (kChosen) stays unchanged.
        const int32_t begin = o[bucket], end = o[bucket + 1];
        size_t size = touched.size();
        touched.resize(size + std::max(0, end - begin));
        int32_t* out = touched.data();
        for (int32_t i = begin; i < end; ++i) {
          const int32_t id = items[i];
          TORCH_CHECK(static_cast<uint32_t>(id) < static_cast<uint32_t>(t_.n), "query: items hold neuron ", id,
                      ", outside [0, N = ", t_.n, ")");
          if (id < lo || id >= hi) continue;
          Hits& h = hits_[id];
          out[size] = id;
          size += h == 0;
          h += h < kMaxHits;
        }
        touched.resize(size);
      }
    }
  }

  void reset() {
    for (int32_t id : touched_) hits_[id] = 0;
    touched_.clear();
  }

  void choose(int32_t id) {
    if (hits_[id] == 0) touched_.push_back(id);
    hits_[id] = kChosen;
    out_[filled_++] = id;
  }

  const Tables& t_;
  std::vector<Hits>& hits_;       // bucket hits per neuron, kChosen once selected
  std::vector<int32_t> touched_;  // neurons whose counter is non-zero
  std::vector<Candidate> cand_;
  std::vector<int64_t> histogram_;  // touched neurons per hit count
  std::vector<Hits> touched_hits_;  // finish(): the hits of touched_[i]
  std::vector<uint32_t> flips_;
  int64_t* out_ = nullptr;
  int64_t budget_ = 0, tail_ = 0, filled_ = 0;
};

std::tuple<at::Tensor, at::Tensor> query_cpu(const at::Tensor& codes_in, const at::Tensor& margins_in,
                                             const at::Tensor& offsets_in, const at::Tensor& items_in, int64_t probes,
                                             int64_t budget, const std::optional<at::Tensor>& labels_in, int64_t seed,
                                             int64_t tail) {
  const auto codes = codes_in.contiguous(), margins = margins_in.contiguous();
  const auto offsets = offsets_in.contiguous(), items = items_in.contiguous();
  const at::Tensor labels = labels_in.has_value() && labels_in->defined() ? labels_in->contiguous() : at::Tensor();
  const Tables t = check_and_view(codes, margins, offsets, items, probes, budget, tail, labels, "query");
  auto active = at::empty({t.batch, budget}, codes.options().dtype(at::kLong));
  auto head = at::zeros({t.batch}, codes.options().dtype(at::kLong));
  if (t.batch == 0 || budget == 0) return {active, head};
  int64_t* out = active.data_ptr<int64_t>();
  int64_t* heads = head.data_ptr<int64_t>();
  auto build = [&](auto hits_type) {
    at::parallel_for(0, t.batch, 1, [&](int64_t begin, int64_t end) {
      ActiveSetBuilder<decltype(hits_type)> builder(t);
      for (int64_t b = begin; b < end; ++b) {
        builder.start(out + b * budget, budget, tail);
        builder.add_labels(b, b);
        builder.probe(b);
        heads[b] = builder.finish(seed, b);
      }
    });
  };
  // A row's hits are at most L: one-byte counters below kMaxHits tables, the same counts.
  if (t.num_tables < kMaxHitsOf<uint8_t>)
    build(uint8_t{});
  else
    build(uint16_t{});
  return {active, head};
}

std::tuple<at::Tensor, at::Tensor> query_shared_cpu(const at::Tensor& codes_in, const at::Tensor& margins_in,
                                                    const at::Tensor& offsets_in, const at::Tensor& items_in,
                                                    int64_t probes, int64_t budget,
                                                    const std::optional<at::Tensor>& labels_in, int64_t seed,
                                                    int64_t tail) {
  const auto codes = codes_in.contiguous(), margins = margins_in.contiguous();
  const auto offsets = offsets_in.contiguous(), items = items_in.contiguous();
  const at::Tensor labels = labels_in.has_value() && labels_in->defined() ? labels_in->contiguous() : at::Tensor();
  const Tables t = check_and_view(codes, margins, offsets, items, probes, budget, tail, labels, "query_shared");
  auto indices = at::empty({budget}, codes.options().dtype(at::kLong));
  auto head = at::zeros({}, codes.options().dtype(at::kLong));
  if (budget == 0) return {indices, head};
  ActiveSetBuilder<uint16_t> builder(t);  // a batch's hits can exceed 255
  builder.start(indices.data_ptr<int64_t>(), budget, tail);
  for (int64_t b = 0; b < t.batch; ++b) builder.add_labels(b, -1);
  builder.probe_all();
  head.fill_(builder.finish(seed, -1));
  return {indices, head};
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CPU, m) {
  m.impl("query", &query_cpu);
  m.impl("query_shared", &query_shared_cpu);
}

}  // namespace lsh_torch
