// Vectorized CPU row kernel of fastdistill::topk_targets_rows: a teacher's top-k targets from its float32 logits.
//
// Included by kernels_default.cpp and kernels_avx2.cpp right after cpu_kernels_impl.h (whose Vec, vexp, any_lane and
// BlockedSum it uses), with FASTDISTILL_CPU_NS naming the namespace. No include guard on purpose.
//
// Per row z [V] (contract: fastdistill/train/targets.py, topk_from_hidden):
//   pass 1   the k largest entries: a k-entry min-heap whose smallest value is a threshold; a chunk of the row is looked
//            at lane by lane only when one of its lanes beats the threshold, which after the first chunks is rare, so
//            the pass runs at the speed of a vector compare. Ties keep the lower index (the scan is in index order
//            and only a strictly larger value replaces the heap's smallest).
//   pass 2   per temperature t: the tail mass, summed over the other V - k entries themselves (entries below the
//            k-th value tau, plus the entries equal to tau that did not make the top k), never as 1 - sum(top k),
//            which is rounding noise once the top k hold more than 0.9999 of the mass. exp((z - max) / t) in float32,
//            blocked sums folded into doubles (BlockedSum); the top-k sum in double.
// Outputs: indices (ascending) and their logits, lse_t = max / t + log(total_t), log_tail_t = log(tail_t / total_t).
// A row with a NaN or +inf gives NaN lse and log_tail (its top logits are what the scan saw).

namespace fastdistill::cpu::FASTDISTILL_CPU_NS {
namespace {

struct HeapEntry {
  float value;
  int64_t index;
};

// "a is better than b": larger value, or the same value at a lower index. The heap keeps its worst entry on top.
inline bool better(const HeapEntry& a, const HeapEntry& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

void topk_row(const TopkTargetsArgs& args, int64_t row, std::vector<HeapEntry>& heap) {
  constexpr int64_t W = Vec<float>::size();
  const float* z = args.logits + row * args.row_stride;
  const int64_t V = args.vocab, k = args.k;
  auto worse_on_top = [](const HeapEntry& a, const HeapEntry& b) { return better(a, b); };

  // pass 1: selection (k <= V is checked by the op)
  heap.clear();
  for (int64_t j = 0; j < k; ++j) heap.push_back({z[j], j});
  std::make_heap(heap.begin(), heap.end(), worse_on_top);
  bool bad = false;  // NaN or +inf seen
  for (int64_t j = 0; j < k; ++j) bad |= !(z[j] < std::numeric_limits<float>::infinity());
  Vec<float> vbad(0);
  const Vec<float> vinf(std::numeric_limits<float>::infinity());
  int64_t j = k;
  for (; j + W <= V; j += W) {
    const Vec<float> x = Vec<float>::loadu(z + j);
    vbad = vbad | (x >= vinf) | (x != x);
    if (!any_lane(x > Vec<float>(heap.front().value))) continue;
    for (int64_t l = 0; l < W; ++l) {
      const float v = z[j + l];
      if (v > heap.front().value) {
        std::pop_heap(heap.begin(), heap.end(), worse_on_top);
        heap.back() = {v, j + l};
        std::push_heap(heap.begin(), heap.end(), worse_on_top);
      }
    }
  }
  for (; j < V; ++j) {
    const float v = z[j];
    bad |= !(v < std::numeric_limits<float>::infinity());
    if (v > heap.front().value) {
      std::pop_heap(heap.begin(), heap.end(), worse_on_top);
      heap.back() = {v, j};
      std::push_heap(heap.begin(), heap.end(), worse_on_top);
    }
  }
  bad |= any_lane(vbad);

  const float tau = heap.front().value;  // the k-th largest value
  int64_t top_at_tau = 0;
  float zmax = -std::numeric_limits<float>::infinity();
  for (const HeapEntry& e : heap) {
    top_at_tau += e.value == tau;
    zmax = std::max(zmax, e.value);
  }
  std::sort(heap.begin(), heap.end(), [](const HeapEntry& a, const HeapEntry& b) { return a.index < b.index; });
  for (int64_t i = 0; i < k; ++i) {
    args.indices[row * k + i] = heap[i].index;
    args.top_logits[row * k + i] = heap[i].value;
  }

  // pass 2: per temperature, the tail and the total
  for (int64_t ti = 0; ti < args.n_temps; ++ti) {
    float* lse = args.lse + row * args.n_temps + ti;
    float* log_tail = args.log_tail + row * args.n_temps + ti;
    if (bad || zmax == -std::numeric_limits<float>::infinity()) {  // NaN / +inf, or an all -inf row
      *lse = *log_tail = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const double inv_t = args.inv_temperatures[ti];
    const Vec<float> vmax(zmax), vinv(static_cast<float>(inv_t)), vtau(tau), zero(0);
    BlockedSum<float> tail;
    int64_t at_tau = 0;
    int64_t c = 0;
    for (; c + W <= V; c += W) {
      const Vec<float> x = Vec<float>::loadu(z + c);
      tail.add(Vec<float>::blendv(zero, vexp((x - vmax) * vinv), x < vtau));
      if (any_lane(x == vtau)) {
        for (int64_t l = 0; l < W; ++l) at_tau += z[c + l] == tau;
      }
    }
    double tail_sum = tail.finish();
    for (; c < V; ++c) {
      if (z[c] < tau) tail_sum += std::exp((static_cast<double>(z[c]) - zmax) * inv_t);
      at_tau += z[c] == tau;
    }
    // entries equal to tau beyond the ones in the top k are tail entries too
    tail_sum += static_cast<double>(at_tau - top_at_tau) * std::exp((static_cast<double>(tau) - zmax) * inv_t);
    double top_sum = 0;
    for (const HeapEntry& e : heap) top_sum += std::exp((static_cast<double>(e.value) - zmax) * inv_t);
    const double total = top_sum + tail_sum;
    *lse = static_cast<float>(zmax * inv_t + std::log(total));
    *log_tail = static_cast<float>(std::log(tail_sum) - std::log(total));
  }
}

}  // namespace

void topk_targets_rows_range(const TopkTargetsArgs& args, int64_t begin, int64_t end) {
  std::vector<HeapEntry> heap;
  heap.reserve(static_cast<size_t>(args.k));
  for (int64_t row = begin; row < end; ++row) topk_row(args, row, heap);
}

}  // namespace fastdistill::cpu::FASTDISTILL_CPU_NS
