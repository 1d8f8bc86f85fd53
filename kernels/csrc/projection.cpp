// The top-k projection of one weight tensor on the CPU in three passes over memory (issue 18, part 1):
// per-neuron floor and a histogram of magnitudes together, the threshold bucket's candidates, then
// mask, zeroing and decay together (and a pass over the one slice that holds ties at the threshold).
// The set kept is the one of kernels/topk.py's threshold path (its
// tie rule included): first each neuron's `floor` largest along `floor_dim`, then every other entry
// strictly above the k'-th largest of the rest, then entries equal to it in ascending flat-index order.
//
// Magnitudes are compared as the IEEE-754 bits of |w| (sign bit cleared), an order-preserving integer
// key for non-negative floats, so nothing is sorted: a 32768-bucket histogram of the top bits finds the
// bucket of the k'-th largest, and nth_element over that bucket's few entries the exact key.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kShift = 16;
constexpr int64_t kBuckets = int64_t(1) << (31 - kShift);  // keys have the sign bit clear
constexpr int kLanes = 4;  // interleaved sub-histograms: runs of one bucket do not serialize on one counter

inline uint32_t key_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits & 0x7fffffffu;
}

// The `f` largest keys of a stream, largest first; earlier (lower) positions win ties. `low` is what a
// key must exceed to enter (-1 until there are f), kept apart so that the common case is one compare.
struct Top {
  uint32_t key[16];
  int64_t pos[16];
  int n = 0;
  inline void push(uint32_t k, int64_t p, int f, int64_t& low) {  // call only when k > low
    int i = n < f ? n++ : f - 1;
    while (i > 0 && key[i - 1] < k) {
      key[i] = key[i - 1];
      pos[i] = pos[i - 1];
      --i;
    }
    key[i] = k;
    pos[i] = p;
    if (n == f) low = key[f - 1];
  }
};

}  // namespace

// w: a contiguous float32 tensor of 1 or 2 dims, updated in place (w <- mask * w * factor). Returns the
// bool mask with exactly k entries. floor_dim: 0 (each column keeps its `floor` largest over rows),
// 1 (each row over its columns) or -1 (no floor).
torch::Tensor project_(torch::Tensor w, int64_t k, int64_t floor, int64_t floor_dim, double factor) {
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.is_contiguous() && w.device().is_cpu(),
              "project_: a contiguous float32 CPU tensor");
  TORCH_CHECK(w.dim() >= 1 && w.dim() <= 2, "project_: 1 or 2 dims");
  const int64_t n = w.numel();
  TORCH_CHECK(k >= 1 && k <= n, "project_: k out of range");
  TORCH_CHECK(floor >= 0 && floor <= 16, "project_: a floor of at most 16");
  float* data = w.data_ptr<float>();
  auto mask_t = torch::zeros(w.sizes(), torch::dtype(torch::kBool));
  bool* mask = mask_t.data_ptr<bool>();
  const float fac = static_cast<float>(factor);

  const int64_t rows = w.dim() == 2 ? w.size(0) : 1;
  const int64_t cols = w.dim() == 2 ? w.size(1) : n;
  const bool floored = floor > 0 && floor_dim >= 0 && w.dim() == 2;
  const int f = floored ? static_cast<int>(std::min<int64_t>(floor, floor_dim == 0 ? rows : cols)) : 0;

  // Pass 1: the histogram of every key and each neuron's floor. Each part reads a block of columns over
  // all rows (floor along rows), a block of whole rows (floor along columns), or a flat range (no floor).
  const int threads = std::max(1, at::get_num_threads());
  const bool by_columns = f > 0 && floor_dim == 0, by_rows = f > 0 && floor_dim == 1;
  const int64_t units = by_columns ? cols : by_rows ? rows : n;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(units, threads));
  std::vector<std::vector<uint32_t>> hist(parts, std::vector<uint32_t>(kBuckets * kLanes, 0));
  std::vector<int64_t> floor_pos(static_cast<size_t>(f) * (by_columns ? cols : by_rows ? rows : 0));
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part) {
      uint32_t* h = hist[part].data();
      const int64_t u0 = units * part / parts, u1 = units * (part + 1) / parts;
      if (by_columns) {
        std::vector<Top> top(u1 - u0);
        std::vector<int64_t> low(u1 - u0, -1);
        for (int64_t r = 0; r < rows; ++r) {
          const float* row = data + r * cols;
          for (int64_t c = u0; c < u1; ++c) {
            const uint32_t key = key_of(row[c]);
            ++h[((key >> kShift) << 2) | (c & 3)];
            if (int64_t(key) > low[c - u0]) top[c - u0].push(key, r * cols + c, f, low[c - u0]);
          }
        }
        for (int64_t c = u0; c < u1; ++c)
          for (int i = 0; i < f; ++i) floor_pos[c * f + i] = top[c - u0].pos[i];
      } else if (by_rows) {
        for (int64_t r = u0; r < u1; ++r) {
          const float* row = data + r * cols;
          Top top;
          int64_t low = -1;
          for (int64_t c = 0; c < cols; ++c) {
            const uint32_t key = key_of(row[c]);
            ++h[((key >> kShift) << 2) | (c & 3)];
            if (int64_t(key) > low) top.push(key, r * cols + c, f, low);
          }
          for (int i = 0; i < f; ++i) floor_pos[r * f + i] = top.pos[i];
        }
      } else {
        for (int64_t i = u0; i < u1; ++i) ++h[((key_of(data[i]) >> kShift) << 2) | (i & 3)];
      }
    }
  });
  std::vector<int64_t> counts(kBuckets, 0);
  for (const auto& h : hist)
    for (int64_t b = 0; b < kBuckets; ++b) counts[b] += int64_t(h[4 * b]) + h[4 * b + 1] + h[4 * b + 2] + h[4 * b + 3];
  // the floor's entries are kept already: out of the histogram, into the mask
  int64_t kept = 0;
  for (int64_t p : floor_pos) {
    if (!mask[p]) {
      mask[p] = true;
      --counts[key_of(data[p]) >> kShift];
      ++kept;
    }
  }
  const int64_t remaining = k - kept;
  TORCH_CHECK(remaining >= 0, "project_: the floor does not fit in k");

  uint32_t threshold = 0;
  int64_t tie_quota = 0;  // entries equal to the threshold still to keep, lowest index first
  if (remaining > 0) {
    int64_t above = 0, bucket = kBuckets - 1;
    for (; bucket > 0 && above + counts[bucket] < remaining; --bucket) above += counts[bucket];
    const int64_t need = remaining - above;  // 1 <= need <= counts[bucket]
    // Pass 2: the bucket's candidates (not the floor's), whose need-th largest is the threshold
    std::vector<std::vector<uint32_t>> found(parts);
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t part = p0; part < p1; ++part) {
        const int64_t i0 = n * part / parts, i1 = n * (part + 1) / parts;
        auto& out = found[part];
        for (int64_t i = i0; i < i1; ++i) {
          const uint32_t key = key_of(data[i]);
          if ((key >> kShift) == static_cast<uint32_t>(bucket) && !mask[i]) out.push_back(key);
        }
      }
    });
    std::vector<uint32_t> cand;
    for (auto& v : found) cand.insert(cand.end(), v.begin(), v.end());
    TORCH_CHECK(static_cast<int64_t>(cand.size()) >= need, "project_: internal error (bucket count)");
    std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end(), std::greater<uint32_t>());
    threshold = cand[need - 1];
    int64_t greater = 0;
    for (uint32_t c : cand) greater += c > threshold;
    tie_quota = need - greater;
  }

  // Pass 3: keep what is above the threshold, zero and decay in one write; entries equal to it are left
  // as they are and counted per part.
  const int64_t slices = std::max<int64_t>(1, std::min<int64_t>(n / 4096, 256));
  std::vector<int64_t> ties(slices, 0);
  at::parallel_for(0, slices, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part) {
      const int64_t i0 = n * part / slices, i1 = n * (part + 1) / slices;
      int64_t tied = 0;
      const bool open = remaining > 0;
      for (int64_t i = i0; i < i1; ++i) {  // branch-free: the compiler may vectorize it
        const float x = data[i];
        const uint32_t key = key_of(x);
        const bool floor_kept = mask[i];
        const bool tie = open & !floor_kept & (key == threshold);
        const bool keep = floor_kept | (open & (key > threshold));
        tied += tie;
        mask[i] = keep;
        data[i] = keep ? x * fac : (tie ? x : 0.0f);
      }
      ties[part] = tied;
    }
  });
  // Pass 4, over the parts with ties only (usually one): the first `tie_quota` in index order are kept.
  std::vector<int64_t> quota(slices, 0);
  for (int64_t part = 0; part < slices; ++part) {
    quota[part] = std::min(ties[part], tie_quota);
    tie_quota -= quota[part];
  }
  at::parallel_for(0, slices, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t part = p0; part < p1; ++part) {
      if (ties[part] == 0) continue;
      const int64_t i0 = n * part / slices, i1 = n * (part + 1) / slices;
      int64_t left = quota[part];
      for (int64_t i = i0; i < i1; ++i) {
        if (mask[i] || key_of(data[i]) != threshold) continue;
        const bool keep = left > 0;
        left -= keep;
        mask[i] = keep;
        data[i] = keep ? data[i] * fac : 0.0f;
      }
    }
  });
  return mask_t;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("project_", &project_, "top-k mask (exactly k, per-neuron floor), zeroing and decay of w in place");
}
