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

// Per-neuron hit counters of type Hits: uint16_t in general, uint32_t for shared sets of batches
// whose hits can pass 65,534, uint8_t for per-row sets from fewer than kMaxHits tables (a neuron
// sits in one bucket per table and a row probes distinct buckets, so its hits never exceed L).
// One byte per neuron halves the footprint of the random increments of a query; still, 670K
// neurons' counters (670 KB) overflow a core's 512 KB L2, so a row of so wide a layer, or one that
// probes few of its neurons, counts only its repeat hits (ActiveSetBuilder::probe). Counts saturate
// at kMaxHits (never reached: the type is chosen by the most hits a query can give); kChosen marks a
// neuron already in the active set.
constexpr size_t kHistogramLevels = size_t(1) << 16;  // hit-count levels of a part's histogram (512 KB)
constexpr size_t kInterleavedLevels = 4096;           // up to which ActiveSetBuilder::collect counts in 4 histograms
constexpr int64_t kSlotsPerSpan = 4;  // a batch's probes merged by a count per bucket: up to this many buckets each
constexpr int64_t kRowsPerTask = 64;    // rows whose probe sequences a thread takes at a time (query_shared)
template <typename Hits>
constexpr Hits kChosenOf = std::numeric_limits<Hits>::max();
template <typename Hits>
constexpr Hits kMaxHitsOf = kChosenOf<Hits> - 1;

// The neurons one part of a query counted (each once, in the order first hit) and, once collected,
// their hits and how many have each hit count.
template <typename Hits>
struct Counted {
  std::vector<int32_t> ids;
  std::vector<Hits> hits;
  std::vector<int64_t> histogram;
};

// A neuron that finish() ranks: by hits, then by its tie-break key.
struct Candidate {
  uint64_t key;
  int32_t id;
  uint32_t hits;
};

// Per-thread state, reused across calls: a zeroed counter per neuron (allocating and clearing N
// counters per call would cost O(N) per step; users restore the zeros, see ActiveSetBuilder's
// destructor), and the builder's lists, whose pages a fresh allocation per call would fault in
// again (a shared query at 670K outputs counts ~500K neurons: megabytes per call).
template <typename Hits>
struct Scratch {
  std::vector<Hits> hits;
  std::vector<Counted<Hits>> parts;
  std::vector<int32_t> chosen;
  std::vector<Candidate> ranked;    // finish()'s candidates
  std::vector<uint64_t> seen;       // ActiveSetBuilder::count_repeats's bit per neuron
  std::vector<int32_t> repeats;     // and the hits after the first, in the order met
};

template <typename Hits>
Scratch<Hits>& thread_scratch(int64_t n) {
  thread_local Scratch<Hits> scratch;
  if (static_cast<int64_t>(scratch.hits.size()) < n) scratch.hits.assign(n, 0);
  return scratch;
}

struct Tables {
  const int32_t* code;     // [B, L]
  const float* margin;     // [B, L*K]
  const int32_t* offsets;  // [L, 2^K + 1]
  const int32_t* items;    // [L, N]
  const int64_t* labels;   // [B, M] or nullptr
  int64_t batch, num_tables, bits, n, probes, num_labels;
  const char* op;          // "query" or "query_shared", for messages
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
  // Margins are distances to the hyperplanes (hash_codes gives |projection|): probe_flips' order of
  // the probes assumes none is negative or NaN.
  const float* margin = margins.data_ptr<float>();
  for (int64_t i = 0; i < margins.numel(); ++i)
    TORCH_CHECK(margin[i] >= 0, op, ": margins must be >= 0 (distances to the hyperplanes, as hash_codes gives "
                "them), got ", margin[i], " at row ", i / (num_tables * bits), ", table ", i / bits % num_tables);
  if (labels.defined()) {
    TORCH_CHECK(labels.device().is_cpu(), op, ": labels must be a CPU tensor, got one on ", labels.device());
    const int64_t* lab = labels.data_ptr<int64_t>();
    for (int64_t i = 0; i < labels.numel(); ++i) {
      TORCH_CHECK_VALUE(valid_label(lab[i], n), op, ": labels must be in [0, N = ", n, ") or -1 / ", kIgnoreIndex,
                  " for padding, got ", lab[i]);
      // A budget of 0 returns before the labels are placed: none may be dropped silently.
      TORCH_CHECK(budget > 0 || lab[i] < 0, op, ": ",
                  std::string(op) == "query" ? "row " + std::to_string(i / labels.size(1)) : std::string("the batch"),
                  " has more distinct labels than the budget 0; raise the active budget");
    }
  }
  return {codes.data_ptr<int32_t>(), margins.data_ptr<float>(), offsets.data_ptr<int32_t>(),
          items.data_ptr<int32_t>(), num_labels ? labels.data_ptr<int64_t>() : nullptr,
          batch, num_tables, bits, n, probes, num_labels, op};
}

// Builds one active set into `out` [budget]; reusable across sets (counters reset in O(touched)).
template <typename Hits>
class ActiveSetBuilder {
  static constexpr Hits kChosen = kChosenOf<Hits>, kMaxHits = kMaxHitsOf<Hits>;

 public:
  explicit ActiveSetBuilder(const Tables& t)
      : t_(t), scratch_(thread_scratch<Hits>(t.n)), hits_(scratch_.hits), ranked_(scratch_.ranked) {
    scratch_.chosen.clear();
    if (scratch_.parts.empty()) scratch_.parts.resize(1);
    scratch_.parts[0].ids.clear();
  }
  ~ActiveSetBuilder() { reset(); }  // also after an exception, so the thread's counters stay zero
  ActiveSetBuilder(const ActiveSetBuilder&) = delete;
  ActiveSetBuilder& operator=(const ActiveSetBuilder&) = delete;

  // Starts a set: `set` names its random streams, the row's key for per-row sets (its index unless
  // row_keys are given), -1 for the batch-shared set.
  void start(int64_t* out, int64_t budget, int64_t tail, int64_t seed, int64_t set) {
    out_ = out, budget_ = budget, tail_ = tail, filled_ = 0, num_parts_ = 1, collected_ = false;
    seed_ = seed, set_ = set, tie_break_ = stream_key(seed, kTieBreak, set);  // seeded_hash(seed, kTieBreak, set, id)'s
  }

  void add_labels(int64_t row, int64_t set) {
    for (int64_t j = 0; j < t_.num_labels; ++j) {
      const int64_t id = t_.labels[row * t_.num_labels + j];
      if (id < 0 || hits_[id] == kChosen) continue;
      TORCH_CHECK(filled_ < budget_, t_.op, ": ", set < 0 ? std::string("the batch") : "row " + std::to_string(set),
                  " has more distinct labels than the budget ", budget_, "; raise the active budget");
      choose(static_cast<int32_t>(id));
    }
  }

  // Counts the probed buckets of input `row` for one set.
  void probe(int64_t row) {
    const int64_t per_row = t_.num_tables * t_.probes;
    spans_.resize(per_row);
    flips_.resize(t_.probes);
    row_spans(row, spans_.data(), flips_.data());
    // count_repeats() where the counters overflow the L2, or where they leave the L1 and the row probes
    // fewer entries than 0.6 N: then most neurons it hits are hit once, and count() would write, then
    // collect, a counter for each. (One thread, pools of 252-512, per-row default tables: 50K outputs,
    // L=40, 31 -> 23 ms per 1,024 rows, 100K 51 -> 33 ms; 8K (2.5 N entries) and 4K (a pool above the
    // entries: count_repeats lists the neurons hit once in passes more) faster with count().)
    const int64_t counter_bytes = t_.n * static_cast<int64_t>(sizeof(Hits));
    if (counter_bytes > kCachedCounterBytes ||
        (counter_bytes > kL1CounterBytes && span_entries(spans_.data(), per_row) * 5 < t_.n * 3))
      count_repeats(spans_.data(), per_row);
    else
      count(spans_.data(), per_row, 0, static_cast<int32_t>(t_.n), scratch_.parts[0].ids);
  }

  // The same for every input row into one set (query_shared), in parallel: part p of P counts the
  // neurons in [N p / P, N (p + 1) / P) of every probed bucket, so the parts write disjoint counters
  // (no races, no merge) and the counts equal those of probe() row after row. Each part then
  // collects its counts (finish()'s pass over the counted neurons, done here in parallel).
  void probe_all() {
    const int64_t per_row = t_.num_tables * t_.probes;
    spans_.resize(t_.batch * per_row);
    // In parallel over rows: the probe sequences were a third of the LM example's query (1,024 rows x 40 tables).
    at::parallel_for(0, t_.batch, kRowsPerTask, [&](int64_t begin, int64_t end) {
      std::vector<uint32_t> flips(t_.probes);
      for (int64_t row = begin; row < end; ++row) row_spans(row, spans_.data() + row * per_row, flips.data());
    });
    merge_repeated_spans();
    const auto num_spans = static_cast<int64_t>(spans_.size());
    // One part for small batches: starting the threads would cost more than the counting.
    const int64_t parts = num_spans >= 256 ? std::max(1, at::get_num_threads()) : 1;
    if (static_cast<int64_t>(scratch_.parts.size()) < parts) scratch_.parts.resize(parts);
    num_parts_ = parts;  // from here on reset() clears every part's counters
    for (int64_t p = 1; p < parts; ++p) scratch_.parts[p].ids.clear();
    std::exception_ptr error;
    try {
      at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          const auto lo = static_cast<int32_t>(t_.n * p / parts), hi = static_cast<int32_t>(t_.n * (p + 1) / parts);
          count(spans_.data(), num_spans, lo, hi, scratch_.parts[p].ids);
          collect(scratch_.parts[p]);
        }
      });
    } catch (...) {
      error = std::current_exception();
    }
    if (error) std::rethrow_exception(error);
    collected_ = true;
  }

  // Takes the best candidates (leaving `tail` entries), fills up with seeded uniform draws, and
  // resets the counters. Returns the head: labels and candidates, the entries before the draws.
  int64_t finish() {
    const int64_t seed = seed_, set = set_;
    // Only candidates with at least `floor` hits can be among the `room` best: the parts' hit-count
    // histograms find that floor, so the tie-break keys (a hash each) and the selection below
    // cover those few instead of every counted neuron.
    const int64_t room = std::max<int64_t>(0, budget_ - filled_ - tail_);
    if (!collected_) collect(scratch_.parts[0]);
    size_t top = 0;
    for (int64_t p = 0; p < num_parts_; ++p) top = std::max(top, scratch_.parts[p].histogram.size() - 1);
    histogram_.assign(std::max<size_t>(top, 1) + 1, 0);
    for (int64_t p = 0; p < num_parts_; ++p)
      for (size_t h = 0; h < scratch_.parts[p].histogram.size(); ++h) histogram_[h] += scratch_.parts[p].histogram[h];
    size_t floor = std::max<size_t>(top, 1);
    for (int64_t above = histogram_[floor]; floor > 1 && above < room; above += histogram_[--floor]) {}
    // Every candidate above the floor is taken (fewer than `room` are). They are placed by level
    // (a counting sort on the histogram: level h's block follows the levels above it), so that only
    // the floor's block needs a selection and each block a sort of its own: on a per-row pool of
    // 1,016 of a 50K-word LM head, nth_element and sort over all of them took 70% of the query.
    const size_t levels = histogram_.size();
    next_.assign(levels, 0);
    for (size_t h = levels - 1; h > floor; --h) next_[h - 1] = next_[h] + histogram_[h];
    const int64_t above = next_[floor];
    ranked_.resize(above + histogram_[floor]);
    for (int64_t p = 0; p < num_parts_; ++p) {
      Counted<Hits>& part = scratch_.parts[p];
      for (size_t i = 0; i < part.ids.size(); ++i) {
        const size_t level = std::min<size_t>(part.hits[i], levels - 1);
        if (level >= floor) ranked_[next_[level]++] = {keyed_hash(tie_break_, part.ids[i]), part.ids[i], part.hits[i]};
      }
      part.ids.clear();  // their counters are zero since collect()
    }
    // Within a block the hits are equal (ranked by key), but for the last histogram level, which holds
    // every count from there up (ranked by hits, then key).
    auto by_key = [](const Candidate& a, const Candidate& c) { return a.key < c.key; };
    auto better = [](const Candidate& a, const Candidate& c) {
      return a.hits > c.hits || (a.hits == c.hits && a.key < c.key);
    };
    const int64_t take = std::min<int64_t>(room, static_cast<int64_t>(ranked_.size()));
    const bool capped = levels == kHistogramLevels;  // only the last level can mix hit counts
    if (take < static_cast<int64_t>(ranked_.size())) {
      if (capped && floor == levels - 1)
        std::nth_element(ranked_.begin() + above, ranked_.begin() + take, ranked_.end(), better);
      else
        std::nth_element(ranked_.begin() + above, ranked_.begin() + take, ranked_.end(), by_key);
    }
    for (size_t h = levels - 1, begin = 0; h >= floor && static_cast<int64_t>(begin) < take; --h) {
      const size_t end = std::min<size_t>(begin + histogram_[h], take);
      if (capped && h == levels - 1)
        std::sort(ranked_.begin() + begin, ranked_.begin() + end, better);
      else
        std::sort(ranked_.begin() + begin, ranked_.begin() + end, by_key);
      begin = end;
    }
    for (int64_t i = 0; i < take; ++i) choose(ranked_[i].id);
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
  // A probed bucket: positions [begin, end) of t_.items (the table's offset included), probed
  // `weight` times (merge_repeated_spans; 1 otherwise).
  struct Span {
    int64_t begin, end, weight;
    int64_t slot;  // table * 2^K + bucket
  };

  // The rows of a batch probe many of the same buckets (measured during training: 97% of the probes
  // of the LM example's shared 2,048 set, half of the XMC demo's): each bucket is kept once, with
  // the number of times it was probed, so that count() reads it once and adds that many hits.
  void merge_repeated_spans() {
    const int64_t buckets = int64_t(1) << t_.bits, slots = t_.num_tables * buckets;
    if (slots <= kSlotsPerSpan * static_cast<int64_t>(spans_.size())) {
      // Few buckets for the probes (the LM example: 81,920 probes of 40 x 256 buckets): the probes counted per
      // bucket, in place of a sort (a third of that query). The same spans, in the same order (by position).
      probes_per_slot_.assign(slots, 0);
      for (const Span& s : spans_) probes_per_slot_[s.slot] += s.weight;
      size_t kept = 0;  // (at most one span per slot probed: written over those already counted)
      for (int64_t slot = 0; slot < slots; ++slot) {
        const int32_t* o = t_.offsets + (slot >> t_.bits) * (buckets + 1) + (slot & (buckets - 1));
        const int64_t start = (slot >> t_.bits) * t_.n;
        if (probes_per_slot_[slot] && o[0] != o[1])
          spans_[kept++] = {start + o[0], start + o[1], probes_per_slot_[slot], slot};
      }
      spans_.resize(kept);
      return;
    }
    auto empty = [](const Span& s) { return s.begin == s.end; };
    spans_.erase(std::remove_if(spans_.begin(), spans_.end(), empty), spans_.end());
    // Non-empty buckets that begin at the same position are the same bucket.
    std::sort(spans_.begin(), spans_.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
    size_t kept = 0;
    for (const Span& s : spans_) {
      if (kept && spans_[kept - 1].begin == s.begin)
        spans_[kept - 1].weight += s.weight;
      else
        spans_[kept++] = s;
    }
    spans_.resize(kept);
  }

  // The buckets input `row` probes, [L, probes].
  // `flips`: room for one table's probe sequence.
  void row_spans(int64_t row, Span* spans, uint32_t* flips) const {
    for (int64_t l = 0; l < t_.num_tables; ++l) {
      probe_flips(t_.margin + (row * t_.num_tables + l) * t_.bits, static_cast<int>(t_.bits),
                  static_cast<int>(t_.probes), flips);
      const int32_t* o = t_.offsets + l * ((int64_t(1) << t_.bits) + 1);
      const int32_t code = t_.code[row * t_.num_tables + l];
      // The bucket indexes offsets: an out-of-range code would read past them.
      TORCH_CHECK(code >= 0 && code < (int64_t(1) << t_.bits), t_.op, ": codes must be in [0, 2^K = ",
                  int64_t(1) << t_.bits, "), got ", code, " (table ", l, ")");
      for (int64_t p = 0; p < t_.probes; ++p) {
        const uint32_t bucket = static_cast<uint32_t>(code) ^ flips[p];
        spans[l * t_.probes + p] = {l * t_.n + o[bucket], l * t_.n + o[bucket + 1], 1, (l << t_.bits) + bucket};
      }
    }
  }

  // Adds a span's weight in hits to the neurons in [lo, hi) that it holds (saturating, as that many
  // single hits would); appends the newly hit ones to `ids`.
  void count(const Span* spans, int64_t num_spans, int32_t lo, int32_t hi, std::vector<int32_t>& ids) {
    // Every id is written past the end of `ids`, which grows by one if it was new: room for every
    // id the spans hold, or for the hi - lo neurons of the range (each added once) and the write
    // past them; trimmed at the end.
    size_t size = ids.size();
    ids.resize(size + std::min<int64_t>(span_entries(spans, num_spans), int64_t(hi) - lo + 1));
    int32_t* out = ids.data();
    // Branch-free on the counter: whether a neuron is new is a coin flip that a branch would
    // mispredict, stalling the independent counter reads the core could otherwise overlap
    // (they miss the L1: this loop is the query's time). A chosen neuron (kChosen) stays unchanged.
    for_each_id(spans, num_spans, lo, hi, [&](int32_t id, int64_t weight) {
      Hits& h = hits_[id];
      out[size] = id;
      size += h == 0;
      const auto raised = static_cast<Hits>(std::min<int64_t>(int64_t(h) + weight, kMaxHits));
      h = h == kChosen ? h : raised;
    });
    ids.resize(size);
  }

  // count() for one row's spans where the counters outgrow the L2 cache (670 KB at 670K outputs), so that
  // each count is a cache miss, or where the row probes few of the neurons. Most probed neurons are hit once
  // (about 70K of the 76K per row of LSHLinear.topk at 670K), and none of them is among the best unless fewer
  // than `room` neurons are hit twice: a first hit only sets a bit (N / 8 bytes, in L2), repeats go to the
  // counters. Neurons hit once are collected in a second pass, only when they are needed, and then only those
  // whose tie-break keys can rank them among the best (below; the others go uncounted). The same sets as
  // count(); at 670K, 1,024 topk rows: 603 -> 350-400 ms.
  void count_repeats(const Span* spans, int64_t num_spans) {
    std::vector<uint64_t>& seen = scratch_.seen;
    seen.assign((t_.n + 63) / 64, 0);
    uint64_t* bits = seen.data();
    for (int32_t id : scratch_.chosen) bits[id >> 6] |= uint64_t(1) << (id & 63);  // labels: counters hold kChosen
    std::vector<int32_t>& repeats = scratch_.repeats;
    repeats.resize(span_entries(spans, num_spans));
    int32_t* repeat = repeats.data();
    int64_t num_repeats = 0;
    // Branch-free, like count(): the repeats are listed (a sequential write) and counted in a loop
    // of their own below, whose counter reads are independent and overlap.
    for_each_id(spans, num_spans, 0, static_cast<int32_t>(t_.n), [&](int32_t id, int64_t) {  // one row: weights 1
      const uint64_t word = bits[id >> 6], mask = uint64_t(1) << (id & 63);
      bits[id >> 6] = word | mask;
      repeat[num_repeats] = id;
      num_repeats += (word & mask) != 0;
    });
    std::vector<int32_t>& ids = scratch_.parts[0].ids;  // empty before: probe() comes first
    ids.resize(num_repeats);
    int32_t* out = ids.data();
    size_t size = 0;
    for (int64_t i = 0; i < num_repeats; ++i) {
      Hits& h = hits_[repeat[i]];  // 0 until the second hit, which makes it 2 (and lists the neuron)
      out[size] = repeat[i];
      size += h == 0;
      h = h == 0 ? 2 : h + (h < kMaxHits);
    }
    ids.resize(size);
    const int64_t room = budget_ - filled_ - tail_;
    if (static_cast<int64_t>(size) >= room) return;
    // Too few repeats: the `room - size` neurons hit once with the smallest tie-break keys complete
    // the best (finish() ranks by hits, then key). Listing every neuron hit once read each one's
    // counter (a cache miss) and ranked thousands (at 670K per row, L=40: a 256-candidate query
    // took 1.5x a 236 one). So first only those with keys up to a threshold that about
    // 2 (room - size) + 32 of them pass (their number from the entries the repeats do not hold: at
    // most that many neurons were hit once, fewer where labels hold some), all of them in a pass
    // more if that leaves too few. The same sets: every neuron hit twice outranks those hit once.
    int64_t repeated_entries = 0;
    for (size_t i = 0; i < size; ++i) repeated_entries += hits_[ids[i]];
    const int64_t needed = room - static_cast<int64_t>(size);
    const double share = double(2 * needed + 32) / double(std::max<int64_t>(1, span_entries(spans, num_spans) - repeated_entries));
    const uint64_t every = std::numeric_limits<uint64_t>::max();
    const uint64_t threshold = share >= 0.5 ? every : static_cast<uint64_t>(share * 18446744073709551616.0);
    // Lists the neurons hit once with keys up to `last` (clearing its bit lists each once).
    auto list_hit_once = [&](uint64_t last) {
      for_each_id(spans, num_spans, 0, static_cast<int32_t>(t_.n), [&](int32_t id, int64_t) {
        if (last != every && keyed_hash(tie_break_, static_cast<uint64_t>(id)) > last) return;
        const uint64_t mask = uint64_t(1) << (id & 63);
        if (!(bits[id >> 6] & mask)) return;
        bits[id >> 6] &= ~mask;
        Hits& h = hits_[id];
        if (h == 0) ids.push_back(id), h = 1;
      });
    };
    list_hit_once(threshold);
    if (threshold != every && static_cast<int64_t>(ids.size() - size) < needed) list_hit_once(every);
  }

  static int64_t span_entries(const Span* spans, int64_t num_spans) {
    int64_t entries = 0;
    for (int64_t s = 0; s < num_spans; ++s) entries += spans[s].end - spans[s].begin;
    return entries;
  }

  // Calls f(id, the span's weight) for every id in [lo, hi) of every span.
  template <typename F>
  void for_each_id(const Span* spans, int64_t num_spans, int32_t lo, int32_t hi, F&& f) const {
    for (int64_t s = 0; s < num_spans; ++s) {
      // The part of a bucket a few spans ahead: cache misses (a random place in the L x N items,
      // too short a run for the hardware prefetcher) that the prefetches overlap with this
      // bucket's counting.
      if (s + kPrefetchAhead < num_spans) {
        const Span& ahead = spans[s + kPrefetchAhead];
        const int32_t* first = t_.items + guess(ahead, lo);
        const int32_t* last = t_.items + guess(ahead, hi);
        for (const int32_t* line = first; line <= last; line += kIdsPerLine) __builtin_prefetch(line);
      }
      // A bucket's ids ascend (build_tables and update_tables leave them so): a part's [lo, hi) is
      // one sub-range, so each part reads only its share. The parts' sub-ranges come from the same
      // computation and so tile the bucket; each part checks that its ids ascend within [lo, hi), so
      // a corrupt bucket raises instead of being miscounted (or written by two parts).
      const Span span = spans[s];
      const int64_t begin = lo > 0 ? first_at_least(span, lo) : span.begin;
      const int64_t end = hi < t_.n ? first_at_least(span, hi) : span.end;
      TORCH_CHECK(begin <= end, t_.op, kNotAscending, t_.n, ")");
      int32_t previous = lo - 1;
      for (int64_t i = begin; i < end; ++i) {
        const int32_t id = t_.items[i];
        TORCH_CHECK(id > previous && id < hi, t_.op, kNotAscending, t_.n, "), got ", id, " after ", previous);
        previous = id;
        f(id, span.weight);
      }
    }
  }

  static constexpr int64_t kPrefetchAhead = 16;
  // Counters of every neuron past half a core's L2, and past a part of its L1 (probe()).
  static constexpr int64_t kCachedCounterBytes = 256 * 1024;
  static constexpr int64_t kL1CounterBytes = 8 * 1024;
  static constexpr const char* kNotAscending = ": the ids in each bucket of items must ascend, within [0, N = ";
  static constexpr int64_t kIdsPerLine = 64 / sizeof(int32_t);

  // Where in `span` the ids >= v begin if the ids spread evenly over [0, N), as a bucket's do.
  int64_t guess(Span span, int32_t v) const { return span.begin + (span.end - span.begin) * v / t_.n; }

  // The first position in `span` holding an id >= v, if the ids ascend: the guess and a short
  // walk read a cache line or two, where bisection would miss the cache at every step.
  int64_t first_at_least(Span span, int32_t v) const {
    int64_t pos = guess(span, v);
    while (pos > span.begin && t_.items[pos - 1] >= v) --pos;
    while (pos < span.end && t_.items[pos] < v) ++pos;
    return pos;
  }

  // Moves the counters of `part`'s neurons into it (their hits and a histogram of them) and zeroes
  // them: one pass of random reads, the cost of finishing a set. Counted neurons were not chosen
  // when first hit, so their hits are in [1, kMaxHits].
  void collect(Counted<Hits>& part) {
    part.hits.resize(part.ids.size());
    Hits top = 0;
    for (size_t i = 0; i < part.ids.size(); ++i) {
      Hits& h = hits_[part.ids[i]];
      part.hits[i] = h;
      top = std::max(top, h);
      h = 0;
    }
    // Counts beyond kHistogramLevels - 1 share the last level: 32-bit counts (up to batch * L) would
    // otherwise size it by millions per part. The floor finish() reads off it is then only lower
    // (more candidates ranked by their exact hits), never wrong.
    const size_t levels = std::min<size_t>(top, kHistogramLevels - 1) + 1;
    // Four histograms side by side where they are small, one per neuron mod 4, summed after: most
    // neurons share a hit count (1), and increments of one level in a row each wait on the last one's
    // store. At 50K outputs per row this loop was 42% of finish().
    const size_t ways = levels <= kInterleavedLevels ? 4 : 1;
    part.histogram.assign(levels * ways, 0);
    int64_t* histogram = part.histogram.data();
    const Hits* hits = part.hits.data();
    const size_t count = part.hits.size();
    size_t i = 0;
    if (ways == 4)
      for (; i + 4 <= count; i += 4)
        for (size_t w = 0; w < 4; ++w) ++histogram[w * levels + std::min<size_t>(hits[i + w], levels - 1)];
    for (; i < count; ++i) ++histogram[std::min<size_t>(hits[i], levels - 1)];
    for (size_t w = 1; w < ways; ++w)
      for (size_t h = 0; h < levels; ++h) histogram[h] += histogram[w * levels + h];
    part.histogram.resize(levels);
  }

  void reset() {
    for (int32_t id : scratch_.chosen) hits_[id] = 0;
    scratch_.chosen.clear();
    for (int64_t p = 0; p < num_parts_; ++p) {  // only after an error: finish() clears them
      for (int32_t id : scratch_.parts[p].ids) hits_[id] = 0;
      scratch_.parts[p].ids.clear();
    }
  }

  void choose(int32_t id) {
    if (hits_[id] == 0) scratch_.chosen.push_back(id);
    hits_[id] = kChosen;
    out_[filled_++] = id;
  }

  const Tables& t_;
  Scratch<Hits>& scratch_;  // this thread's counters and lists
  std::vector<Hits>& hits_;  // bucket hits per neuron, kChosen once selected
  std::vector<Candidate>& ranked_;
  std::vector<int64_t> histogram_;  // counted neurons per hit count, over the parts
  std::vector<int64_t> next_;  // finish()'s next place in each level's block of ranked_
  std::vector<Span> spans_;
  std::vector<uint32_t> flips_;  // one table's probe sequence
  std::vector<int64_t> probes_per_slot_;  // merge_repeated_spans's count of each bucket's probes
  int64_t* out_ = nullptr;
  int64_t budget_ = 0, tail_ = 0, filled_ = 0, seed_ = 0, set_ = 0;
  uint64_t tie_break_ = 0;  // the set's stream of tie-break keys
  int64_t num_parts_ = 1;  // parts of scratch_ in use
  bool collected_ = false;  // probe_all() collected the parts
};

std::tuple<at::Tensor, at::Tensor> query_cpu(const at::Tensor& codes_in, const at::Tensor& margins_in,
                                             const at::Tensor& offsets_in, const at::Tensor& items_in, int64_t probes,
                                             int64_t budget, const std::optional<at::Tensor>& labels_in, int64_t seed,
                                             int64_t tail, const std::optional<at::Tensor>& row_keys_in) {
  const auto codes = codes_in.contiguous(), margins = margins_in.contiguous();
  const auto offsets = offsets_in.contiguous(), items = items_in.contiguous();
  const at::Tensor labels = labels_in.has_value() && labels_in->defined() ? labels_in->contiguous() : at::Tensor();
  const Tables t = check_and_view(codes, margins, offsets, items, probes, budget, tail, labels, "query");
  check_row_keys(row_keys_in, codes);
  const at::Tensor row_keys =
      row_keys_in.has_value() && row_keys_in->defined() ? row_keys_in->contiguous() : at::Tensor();
  const int64_t* keys = row_keys.defined() ? row_keys.data_ptr<int64_t>() : nullptr;
  auto active = at::empty({t.batch, budget}, codes.options().dtype(at::kLong));
  auto head = at::zeros({t.batch}, codes.options().dtype(at::kLong));
  if (t.batch == 0 || budget == 0) return {active, head};
  int64_t* out = active.data_ptr<int64_t>();
  int64_t* heads = head.data_ptr<int64_t>();
  auto build = [&](auto hits_type) {
    at::parallel_for(0, t.batch, 1, [&](int64_t begin, int64_t end) {
      ActiveSetBuilder<decltype(hits_type)> builder(t);
      for (int64_t b = begin; b < end; ++b) {
        builder.start(out + b * budget, budget, tail, seed, keys ? keys[b] : b);
        builder.add_labels(b, b);
        builder.probe(b);
        heads[b] = builder.finish();
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
  auto build = [&](auto hits_type) {
    ActiveSetBuilder<decltype(hits_type)> builder(t);
    builder.start(indices.data_ptr<int64_t>(), budget, tail, seed, -1);
    for (int64_t b = 0; b < t.batch; ++b) builder.add_labels(b, -1);
    builder.probe_all();
    head.fill_(builder.finish());
  };
  // A neuron's hits are at most batch * L (one bucket per table, a row's probes distinct): 16-bit
  // counters where that fits, 32-bit beyond (saturated counts would tie, ranked by the seed alone).
  if (t.batch * t.num_tables <= kMaxHitsOf<uint16_t>)
    build(uint16_t{});
  else
    build(uint32_t{});
  return {indices, head};
}

}  // namespace

TORCH_LIBRARY_IMPL(lsh_torch, CPU, m) {
  m.impl("query", &query_cpu);
  m.impl("query_shared", &query_shared_cpu);
}

}  // namespace lsh_torch
