// kiban's compiled cell featurizer: CSR rows of a file -> scGPT / Geneformer tokens, padded per batch.
//
// The Python side is kiban/data/cell_kernel.py, which builds this file with the system C++ compiler
// (kiban/native.py: -O3 -ffp-contract=off, so no fused multiply-adds and every float operation
// rounds as numpy's does) and calls it through ctypes, twice per pool of batches:
//
//   cell_scan    per row, one pass over its stored entries: the problem code, the match counts, the
//                total; the kept entries (value, vocabulary gene) copied out in column order
//   cell_tokens  per usable row: the body (the top max_genes, in gene or rank order) and its value
//                ids, written with its padding at the row's place in its batch's arrays
//
// Both split their rows over `threads` threads. The output is exactly CellBatchFeaturizer's numpy
// path and the per-cell CellFeaturizer's. A row the kernel cannot vouch for gets code 6 and the caller
// takes the numpy path for its batch: unsorted, repeated or out-of-range column indices, a total whose
// rounding could depend on the order of adding, quantile edges out of order, a NaN score.
//
// Row codes: 0 usable; 1 a NaN or infinite value; 2 a negative value; 3 no expressed gene in a
// "useful" column (the reader's code 3); 5 refused by the featurizer (no matched gene, a zero total);
// 6 take the numpy path. cell_tokens skips rows whose code is not 0.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr int USABLE = 0, NONFINITE = 1, NEGATIVE = 2, UNEXPRESSED = 3, REFUSED = 5, NUMPY = 6;
constexpr int32_t LEFT_OUT = -2;  // column_gene of a column the reader leaves out (highly variable genes)
constexpr uint8_t SMALL_INTEGERS = 1, GENE_ORDER = 2;  // row flags from cell_scan

// fn(first, last) over [0, n_rows) split into `threads` contiguous parts, one thread each.
template <typename Fn>
void in_parallel(int64_t n_rows, int threads, Fn fn) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(threads, n_rows));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < parts; ++t) pool.emplace_back(fn, n_rows * t / parts, n_rows * (t + 1) / parts);
  fn(0, n_rows / parts);
  for (auto& thread : pool) thread.join();
}

// Sorts items (a key in the high 32 bits, a payload in the low 32) by key, ties in any order: LSD
// radix, 8 bits a pass, every pass's histogram counted in one read (two copies, so that runs of one
// digit do not serialise on one counter); passes whose digit is the same for every item are skipped.
void sort_items(std::vector<uint64_t>& items, std::vector<uint64_t>& tmp, int key_bits) {
  const size_t n = items.size();
  const int passes = (key_bits + 7) / 8;
  uint32_t count[2][4][256];
  std::memset(count, 0, sizeof count);
  for (size_t i = 0; i < n; ++i) {
    const uint32_t key = uint32_t(items[i] >> 32);
    for (int p = 0; p < passes; ++p) ++count[i & 1][p][(key >> (8 * p)) & 0xFF];
  }
  tmp.resize(n);
  for (int p = 0; p < passes; ++p) {
    uint32_t start[256];
    uint32_t sum = 0;
    bool single = false;
    for (int d = 0; d < 256; ++d) {
      const uint32_t c = count[0][p][d] + count[1][p][d];
      single |= c == n;
      start[d] = sum;
      sum += c;
    }
    if (single) continue;  // every item has this digit: the pass changes nothing
    const int shift = 32 + 8 * p;
    for (size_t i = 0; i < n; ++i) tmp[start[(items[i] >> shift) & 0xFF]++] = items[i];
    items.swap(tmp);
  }
}

int bits_for(uint64_t largest) {
  int bits = 0;
  while (bits < 32 && (largest >> bits) != 0) bits += 8;
  return bits;
}

uint32_t float_bits(float v) {  // v >= 0: the bit pattern orders as the value
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u;
}

// Granularity of a float: the exponent of its lowest set significand bit (a positive value is a whole
// multiple of 2**granularity), from the bits. Meaningless for zero, NaN and infinity (never kept).
int granularity(float v) {
  const uint32_t u = float_bits(v);
  const int exponent = int((u >> 23) & 0xFF);
  const uint32_t mantissa = u & 0x7FFFFFu;
  if (exponent == 0) return -149 + __builtin_ctz(mantissa | (1u << 23));  // subnormal
  return exponent - 150 + __builtin_ctz(mantissa | 0x800000u);
}

struct Scanned {  // what cell_scan learns of a row besides its kept entries
  int64_t matched = 0, unmatched = 0;
  double total = 0.0;
  uint8_t flags = 0;
  float largest = 0;
};

// One pass over a row's stored entries: its code, and its kept entries at values / genes.
template <typename Index>
int scan_row(const float* data, const Index* indices, int64_t lo, int64_t hi, int64_t n_columns,
             const int32_t* column_gene, const uint8_t* column_repeated, const uint8_t* column_useful,
             int32_t* seen, int32_t stamp, float* values, int32_t* genes, Scanned& out) {
  int64_t previous = -1, useful = 0, matched = 0, unmatched = 0;
  bool in_order = true, nonfinite = false, negative = false, gene_order = true;
  double sum = 0.0;
  int finest = 1 << 20;
  float largest = 0;
  int32_t last_gene = -1;
  for (int64_t e = lo; e < hi; ++e) {
    const int64_t c = int64_t(indices[e]);
    in_order &= c > previous && c < n_columns;
    previous = c;
    const float v = data[e];
    nonfinite |= !std::isfinite(v);
    negative |= v < 0;
    if (v == 0 || !in_order) continue;  // a stored zero is not an expressed gene
    const int32_t g = column_gene[c];
    if (g == LEFT_OUT) continue;
    sum += double(v);
    finest = std::min(finest, granularity(v));
    useful += column_useful[c];
    if (g < 0) {
      ++unmatched;
      continue;
    }
    if (column_repeated[c]) {  // a vocabulary gene several columns name: the row's first one counts
      if (seen[g] == stamp) continue;
      seen[g] = stamp;
    }
    values[matched] = v;
    genes[matched] = g;
    ++matched;
    largest = std::max(largest, v);
    gene_order &= g > last_gene;
    last_gene = g;
  }
  if (!in_order) return NUMPY;  // unsorted, repeated or impossible columns: scipy's canonical form first
  if (nonfinite) return NONFINITE;  // as the reader: NaN or infinity outranks a negative value
  if (negative) return NEGATIVE;
  out.matched = matched;
  out.unmatched = unmatched;
  out.total = sum;
  out.largest = largest;
  const bool integral = finest >= 0;  // every kept value a whole multiple of 2**0
  out.flags = uint8_t((integral ? SMALL_INTEGERS : 0) | (gene_order ? GENE_ORDER : 0));
  if (useful == 0) return UNEXPRESSED;
  if (matched == 0 || !(sum > 0)) return REFUSED;
  // every partial sum exact, in any order: numpy's pairwise sum gives the same total
  if (!(sum < std::ldexp(1.0, std::min(finest, 960) + 51))) return NUMPY;
  return USABLE;
}

struct Ranked {
  double score;
  uint32_t gene, entry;
};

struct Row {  // scratch of one thread, reused row after row
  std::vector<uint32_t> by_gene;
  std::vector<uint64_t> items, tmp;
  std::vector<uint32_t> histogram;
  std::vector<double> edges, sorted;
  std::vector<int64_t> bins, bin_of;
  std::vector<Ranked> ranked;
};

// The entries of a row (distinct genes) in gene order, or nullptr where they already are.
const uint32_t* gene_order(const int32_t* genes, size_t n, bool in_order, int gene_bits, Row& s) {
  if (in_order) return nullptr;
  s.items.resize(n);
  for (size_t k = 0; k < n; ++k) s.items[k] = (uint64_t(uint32_t(genes[k])) << 32) | k;
  sort_items(s.items, s.tmp, gene_bits);
  s.by_gene.resize(n);
  for (size_t k = 0; k < n; ++k) s.by_gene[k] = uint32_t(s.items[k]);
  return s.by_gene.data();
}

// np.quantile(values, q, method="linear") with numpy's own arithmetic: virtual index (n - 1) * q,
// neighbours floor and floor + 1 (the last value at or past the end), then numpy's _lerp. `at(p)` is
// the p-th smallest value. False when the edges are out of order (np.digitize would refuse them).
template <typename At>
bool quantile_edges(size_t n, const double* q, int64_t n_q, At at, std::vector<double>& edges) {
  const int64_t last = int64_t(n) - 1;
  edges.resize(size_t(n_q));
  bool ordered = true;
  for (int64_t j = 0; j < n_q; ++j) {
    const double virtual_index = double(last) * q[j];
    const double below = std::floor(virtual_index);
    const bool past = virtual_index >= double(last);
    const int64_t lo = past ? last : int64_t(below);
    const int64_t hi = past ? last : int64_t(below + 1);
    const double gamma = past ? virtual_index + 1 : virtual_index - below;
    const double a = at(lo), b = at(hi);
    const double diff = b - a;
    edges[size_t(j)] = gamma >= 0.5 ? b - diff * (1 - gamma) : a + diff * gamma;
    ordered &= j == 0 || edges[size_t(j)] >= edges[size_t(j - 1)];
  }
  return ordered;
}

// scGPT's bins of a row's values: np.digitize on its quantile edges (the number of edges at or below
// each value). Small integers (counts): a histogram over the values gives the quantiles and one bin
// per distinct value (s.bin_of[value]); other values: a radix sort of their bits, one bin per entry
// (s.bins[entry]). *threshold: the keep-th largest value (the top-k cut). Returns which of the two
// tables holds the bins (BY_VALUE or BY_ENTRY), or 0 when the edges are out of order.
constexpr int BY_VALUE = 1, BY_ENTRY = 2;
int bin_row(const float* values, size_t n, size_t keep, bool small_integers, float largest, const double* q,
             int64_t n_q, Row& s, double* threshold) {
  if (small_integers && largest < float(4 * n + 4096)) {
    const size_t top = size_t(largest);
    // counted in four interleaved copies (repeated values do not serialise on one counter), then
    // summed into [v]: the number of values below v
    const size_t stride = top + 2;
    s.histogram.assign(4 * stride, 0);
    uint32_t* h = s.histogram.data();
    for (size_t k = 0; k < n; ++k) ++h[(k & 3) * stride + size_t(values[k]) + 1];
    for (size_t v = 1; v < stride; ++v) h[v] += h[v - 1] + h[stride + v] + h[2 * stride + v] + h[3 * stride + v];
    size_t cursor = 0;  // the p-th smallest value v: histogram[v] <= p < histogram[v + 1]
    auto at = [&](int64_t p) {
      while (s.histogram[cursor] > size_t(p)) --cursor;
      while (s.histogram[cursor + 1] <= size_t(p)) ++cursor;
      return double(cursor);
    };
    if (!quantile_edges(n, q, n_q, at, s.edges)) return 0;
    s.bin_of.resize(top + 1);
    size_t edge = 0;
    for (size_t v = 0; v <= top; ++v) {
      while (edge < size_t(n_q) && s.edges[edge] <= double(v)) ++edge;
      s.bin_of[v] = int64_t(edge);
    }
    *threshold = n > keep ? at(int64_t(n - keep)) : 0.0;
    return BY_VALUE;
  }
  s.items.resize(n);
  for (size_t k = 0; k < n; ++k) s.items[k] = (uint64_t(float_bits(values[k])) << 32) | k;
  sort_items(s.items, s.tmp, 32);
  s.sorted.resize(n);
  for (size_t p = 0; p < n; ++p) s.sorted[p] = double(values[uint32_t(s.items[p])]);
  if (!quantile_edges(n, q, n_q, [&](int64_t p) { return s.sorted[size_t(p)]; }, s.edges)) return 0;
  s.bins.resize(n);
  size_t edge = 0;
  for (size_t p = 0; p < n; ++p) {
    while (edge < size_t(n_q) && s.edges[edge] <= s.sorted[p]) ++edge;
    s.bins[uint32_t(s.items[p])] = int64_t(edge);
  }
  *threshold = n > keep ? s.sorted[n - keep] : 0.0;
  return BY_ENTRY;
}

// The binned body: the top `keep` by value (ties to the lower gene) in gene order, that is every value
// above the keep-th largest and as many equal to it as are left, the lower genes first.
template <bool PER_VALUE>
void binned_body(const float* values, const int32_t* genes, const uint32_t* order, size_t n, size_t keep,
                 double threshold, const int64_t* bin_table, const int64_t* token_ids, int64_t* out_genes,
                 int64_t* out_values) {
  size_t ties = keep;
  if (n > keep)
    for (size_t k = 0; k < n; ++k) ties -= double(values[k]) > threshold;
  size_t p = 0;
  for (size_t i = 0; i < n && p < keep; ++i) {
    const size_t k = order != nullptr ? order[i] : i;
    const float v = values[k];
    if (n > keep && double(v) <= threshold) {
      if (double(v) < threshold || ties == 0) continue;
      --ties;
    }
    out_genes[p] = token_ids[genes[k]];
    out_values[p] = PER_VALUE ? bin_table[size_t(v)] : bin_table[k];
    ++p;
  }
}

struct Settings {  // the featurizer's tokenization
  int tokenization;  // 0 binning, 1 rank
  int64_t n_bins;
  const double* q;
  int64_t n_q;
  int64_t max_genes;
  const int64_t* token_ids;
  int64_t cls_id, eos_id, pad_id;  // cls / eos -1: none
  const double* gene_medians;      // nullptr: none
  double target_sum;
  int gene_bits;
  int head() const { return cls_id >= 0 ? 1 : 0; }
  int tail() const { return (eos_id >= 0 && tokenization == 1) ? 1 : 0; }
};

// The tokens of one usable row into out_genes / out_values / out_mask (width elements each, padding
// included). False when the row needs the numpy path (edges out of order, a NaN score).
bool token_row(const float* values, const int32_t* genes, size_t n, const Scanned& row, const Settings& z,
               size_t width, int64_t* out_genes, int64_t* out_values, uint8_t* out_mask, Row& s) {
  const int head = z.head(), tail = z.tail();
  const size_t keep = std::min<size_t>(n, size_t(z.max_genes));
  if (z.tokenization == 0) {
    const uint32_t* order = gene_order(genes, n, row.flags & GENE_ORDER, z.gene_bits, s);
    double threshold;
    const int table = bin_row(values, n, keep, row.flags & SMALL_INTEGERS, row.largest, z.q, z.n_q, s, &threshold);
    if (table == 0) return false;
    if (table == BY_VALUE)
      binned_body<true>(values, genes, order, n, keep, threshold, s.bin_of.data(), z.token_ids, out_genes + head,
                        out_values + head);
    else
      binned_body<false>(values, genes, order, n, keep, threshold, s.bins.data(), z.token_ids, out_genes + head,
                         out_values + head);
    if (head) out_values[0] = z.n_bins;  // "no value" (CLS)
  } else {
    const double scale = z.target_sum / row.total;
    bool nan = false;
    s.ranked.resize(n);
    for (size_t k = 0; k < n; ++k) {
      double score = double(values[k]) * scale;
      if (z.gene_medians != nullptr) score = score / z.gene_medians[genes[k]];
      nan |= std::isnan(score);
      s.ranked[k] = Ranked{score, uint32_t(genes[k]), uint32_t(k)};
    }
    if (nan) return false;
    auto higher = [](const Ranked& x, const Ranked& y) {  // genes are distinct: a total order
      return x.score > y.score || (x.score == y.score && x.gene < y.gene);
    };
    if (keep < n) std::partial_sort(s.ranked.begin(), s.ranked.begin() + keep, s.ranked.end(), higher);
    else std::sort(s.ranked.begin(), s.ranked.end(), higher);
    for (size_t p = 0; p < keep; ++p) out_genes[head + p] = z.token_ids[genes[s.ranked[p].entry]];
    for (size_t p = 0; p < size_t(head) + keep + size_t(tail); ++p) out_values[p] = int64_t(p);
    if (tail) out_genes[head + keep] = z.eos_id;
  }
  if (head) out_genes[0] = z.cls_id;
  const size_t length = size_t(head) + keep + size_t(tail);
  for (size_t p = length; p < width; ++p) {  // padding
    out_genes[p] = z.pad_id;
    out_values[p] = 0;
  }
  std::memset(out_mask, 1, length);
  std::memset(out_mask + length, 0, width - length);
  return true;
}

}  // namespace

extern "C" {

// Featurizes batches [bounds[b], bounds[b + 1]) of the rows [starts[r], ends[r]) of a CSR matrix's
// data / indices (index_bytes 4: int32 indices, 8: int64), batches split over `threads` threads.
//
// Per row: code, n_matched, n_unmatched, total. Per batch with usable rows: width[b] (the longest
// body plus head and tail) and its usable rows' tokens, row after row at stride width[b], from the
// start of gene_buffers[b] / value_buffers[b] / mask_buffers[b] (int64, int64, bool; room for
// capacity[b] elements a row). width[b] = 0: no usable row; -1: a row needs the numpy path.
// profile_index / profile_scaled (nullptr: not wanted): each usable row's kept entries in column
// order from profile_offset[r], the gene and value * target_sum / total (for the caller's log1p).
void cell_batches(const float* data, const void* indices, int index_bytes, const int64_t* starts,
                  const int64_t* ends, const int64_t* bounds, int64_t n_batches, int64_t n_columns,
                  const int32_t* column_gene, const uint8_t* column_repeated, const uint8_t* column_useful,
                  int64_t vocab_size, int tokenization, int64_t n_bins, const double* q, int64_t n_q,
                  int64_t max_genes, const int64_t* token_ids, int64_t cls_id, int64_t eos_id, int64_t pad_id,
                  const double* gene_medians, double target_sum, const int64_t* capacity,
                  const int64_t* gene_buffers, const int64_t* value_buffers, const int64_t* mask_buffers,
                  const int64_t* profile_offset, int64_t* profile_index, double* profile_scaled, int64_t* width,
                  int8_t* code, int64_t* n_matched, int64_t* n_unmatched, double* total, int threads) {
  const Settings z{tokenization, n_bins, q, n_q, max_genes, token_ids, cls_id, eos_id, pad_id,
                   gene_medians, target_sum, bits_for(uint64_t(vocab_size))};
  in_parallel(n_batches, threads, [&](int64_t first_batch, int64_t last_batch) {
    std::vector<int32_t> seen(size_t(vocab_size), -1);  // vocabulary gene -> the last row that counted it
    std::vector<float> values;
    std::vector<int32_t> genes;
    std::vector<int64_t> offset;
    std::vector<Scanned> rows;
    Row s;
    for (int64_t b = first_batch; b < last_batch; ++b) {
      const int64_t lo = bounds[b], hi = bounds[b + 1];
      int64_t room = 0;
      offset.resize(size_t(hi - lo));
      for (int64_t r = lo; r < hi; ++r) {
        offset[size_t(r - lo)] = room;
        room += ends[r] - starts[r];
      }
      values.resize(size_t(room));
      genes.resize(size_t(room));
      rows.assign(size_t(hi - lo), Scanned{});
      bool numpy = false;
      int64_t longest = -1;
      for (int64_t r = lo; r < hi; ++r) {
        Scanned& row = rows[size_t(r - lo)];
        float* v = values.data() + offset[size_t(r - lo)];
        int32_t* g = genes.data() + offset[size_t(r - lo)];
        const int status =
            index_bytes == 4
                ? scan_row(data, static_cast<const int32_t*>(indices), starts[r], ends[r], n_columns, column_gene,
                           column_repeated, column_useful, seen.data(), int32_t(r), v, g, row)
                : scan_row(data, static_cast<const int64_t*>(indices), starts[r], ends[r], n_columns, column_gene,
                           column_repeated, column_useful, seen.data(), int32_t(r), v, g, row);
        code[r] = int8_t(status);
        n_matched[r] = row.matched;
        n_unmatched[r] = row.unmatched;
        total[r] = row.total;
        numpy |= status == NUMPY;
        if (status == USABLE) longest = std::max(longest, row.matched);
      }
      if (numpy || longest < 0) {
        width[b] = numpy ? -1 : 0;
        continue;
      }
      const int64_t w = z.head() + z.tail() + std::min(longest, max_genes);
      width[b] = w;
      if (w > capacity[b]) {  // the caller sized the buffers from the stored entries: never happens
        width[b] = -1;
        continue;
      }
      int64_t at = 0;
      for (int64_t r = lo; r < hi && width[b] > 0; ++r) {
        if (code[r] != USABLE) continue;
        const Scanned& row = rows[size_t(r - lo)];
        const float* v = values.data() + offset[size_t(r - lo)];
        const int32_t* g = genes.data() + offset[size_t(r - lo)];
        int64_t* out_genes = reinterpret_cast<int64_t*>(gene_buffers[b]) + at * w;
        int64_t* out_values = reinterpret_cast<int64_t*>(value_buffers[b]) + at * w;
        uint8_t* out_mask = reinterpret_cast<uint8_t*>(mask_buffers[b]) + at * w;
        if (!token_row(v, g, size_t(row.matched), row, z, size_t(w), out_genes, out_values, out_mask, s)) {
          code[r] = NUMPY;
          width[b] = -1;
          break;
        }
        if (profile_index != nullptr) {
          const double scale = target_sum / row.total;
          for (int64_t k = 0; k < row.matched; ++k) {
            profile_index[profile_offset[r] + k] = g[k];
            profile_scaled[profile_offset[r] + k] = double(v[k]) * scale;
          }
        }
        ++at;
      }
    }
  });
}

}  // extern "C"
