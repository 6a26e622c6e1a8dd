// deltaserve's CPU kernels (deltas_store.native builds this file once per machine):
//
// seeded_keep — the portable counter-based mask of deltas_store.compression.sparsify, bit for bit, on all
// cores: element i is kept iff mix32(mix32(i ^ key_a) ^ key_b) < threshold.
//
// assign_ / assign_runs_ — the hot-swap write: kept values (or the originals) into the flat weights, bit for
// bit, element by element or, for masks whose kept entries come in runs (block masks), one memcpy per run.
//
// side_linear_ — mixed-batch side products: out[r, t, :] += x[r, t, :] · ΔW_{slot(r)}ᵀ for every row r with a
// delta, in one call per Linear for the whole batch (no loop over deltas in Python, no weight written).
// embedding_side_ — the same for an embedding: each token's ΔE row added to its output, exactly.
//
// Each slot's ΔW is CSR (crow (O+1,) int32, col (nnz,) int32 or int16 read as uint16, val (nnz,) float32),
// plus optionally each kept value's output row (nnz,) int16 read as uint16. pack_slots checks these arrays once
// and returns a table of their pointers, which the caller keeps with the arrays and passes on every step
// (converting and checking 4·S tensors per call cost more than a small Linear's products). The rows of a slot
// are packed once per call as an (I, W) float32 panel (W = rows·T), so a kept value's index and value are
// loaded once per slot and multiply W contiguous floats. Two paths, measured in bench/mixed.py:
//   * scatter (every slot whose layout has row indices): the slot's columns in tiles of up to 8; per tile the
//     kept values are walked front to back in blocks, as eight lanes 16 values apart, each adding into a local
//     (O, tile) accumulator that stays in L1. There is no loop per output row, whose trip count (~7 kept
//     values at p = 0.99, < 1 at 0.999) would mispredict a branch per row, and consecutive updates land on
//     different rows (no store→load chain). Tiles run in parallel, split by cost: each writes only its own
//     columns of out. With 16-bit indices a kept value is 2 + 2 + 4 bytes.
//   * CSR (layouts without row indices: more than 65536 output rows): rows accumulated in registers over W
//     columns; output rows split across torch's intra-op threads.
#include <torch/extension.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace {

// The 32-bit xorshift-multiply hash of sparsify._mix32_ (there in int64 with explicit masking).
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x5BD1E995u;
  x ^= x >> 16;
  return x;
}

// acc[j] = Σ_k val[k] · panel[col[k] * W + j] for kept entries [begin, end) of one output row; W fixed.
template <int W, typename col_t>
inline void dot_fixed(const col_t* col, const float* val, int32_t begin, int32_t end, const float* panel,
                      float* acc) {
  // Four independent partial sums per column: rows hold few kept values, and one chain of dependent adds
  // would make every value wait for the previous one's add.
  float a0[W] = {}, a1[W] = {}, a2[W] = {}, a3[W] = {};
  int32_t k = begin;
  for (; k + 4 <= end; k += 4) {
    const float* x0 = panel + static_cast<int64_t>(col[k]) * W;
    const float* x1 = panel + static_cast<int64_t>(col[k + 1]) * W;
    const float* x2 = panel + static_cast<int64_t>(col[k + 2]) * W;
    const float* x3 = panel + static_cast<int64_t>(col[k + 3]) * W;
    const float v0 = val[k], v1 = val[k + 1], v2 = val[k + 2], v3 = val[k + 3];
    for (int j = 0; j < W; ++j) {
      a0[j] += v0 * x0[j];
      a1[j] += v1 * x1[j];
      a2[j] += v2 * x2[j];
      a3[j] += v3 * x3[j];
    }
  }
  for (; k < end; ++k) {
    const float* xr = panel + static_cast<int64_t>(col[k]) * W;
    for (int j = 0; j < W; ++j) a0[j] += val[k] * xr[j];
  }
  for (int j = 0; j < W; ++j) acc[j] = (a0[j] + a1[j]) + (a2[j] + a3[j]);
}

template <typename col_t>
inline void dot_any(const col_t* col, const float* val, int32_t begin, int32_t end, const float* panel,
                    int64_t w, float* acc) {
  std::fill(acc, acc + w, 0.f);
  for (int32_t k = begin; k < end; ++k) {
    const float v = val[k];
    const float* xr = panel + static_cast<int64_t>(col[k]) * w;
    for (int64_t j = 0; j < w; ++j) acc[j] += v * xr[j];
  }
}

// d[0..W) += v · x[0..W): one kept value's update of one accumulator row. Pairs and quads in one SSE op
// (x86-64 baseline), so an update costs about as many instructions as a scalar one.
template <int W>
inline void axpy(float* d, const float* x, float v) {
  for (int j = 0; j < W; ++j) d[j] += v * x[j];
}
#if defined(__SSE2__)
template <>
inline void axpy<2>(float* d, const float* x, float v) {
  double* dd = reinterpret_cast<double*>(d);
  const __m128 sum = _mm_add_ps(_mm_castpd_ps(_mm_load_sd(dd)),
                                _mm_mul_ps(_mm_set1_ps(v), _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(x)))));
  _mm_store_sd(dd, _mm_castps_pd(sum));
}
template <>
inline void axpy<4>(float* d, const float* x, float v) {
  _mm_storeu_ps(d, _mm_add_ps(_mm_loadu_ps(d), _mm_mul_ps(_mm_set1_ps(v), _mm_loadu_ps(x))));
}
template <>
inline void axpy<8>(float* d, const float* x, float v) {
  axpy<4>(d, x, v);
  axpy<4>(d + 4, x + 4, v);
}
#endif

// loc[row[k], :] += val[k] · panel[col[k], :] for every kept value k of one slot: loc is (O, W) floats, the
// panel's rows are W floats `stride` apart (a tile of W of the slot's columns).
template <int W, typename col_t>
void scatter_slot(const uint16_t* row, const col_t* col, const float* val, int64_t n, const float* panel,
                  int64_t stride, float* loc) {
  // Blocks of 8·kLane values walked as eight lanes kLane apart: neighbours in CSR order share an output row,
  // values kLane apart (a few rows on) do not, and every array is still read front to back (one stream). Each
  // lane is a chain of dependent read-add-writes of one accumulator row (~7 values a row at p = 0.99): eight
  // chains instead of four took a single thread from 1.07-1.2 to 0.97-0.99 ns per kept value (W = 2, 8.9 MB
  // of slots; CPU time, ad-hoc A/B of the two builds).
  constexpr int64_t kLane = 16, kBlock = 8 * kLane;
  int64_t k0 = 0;
  for (; k0 + kBlock <= n; k0 += kBlock) {
    const uint16_t* r = row + k0;
    const col_t* c = col + k0;
    const float* v = val + k0;
    for (int64_t k = 0; k < kLane; ++k) {
#define LANE(L) \
  axpy<W>(loc + int64_t(r[k + (L)*kLane]) * W, panel + int64_t(c[k + (L)*kLane]) * stride, v[k + (L)*kLane])
      LANE(0); LANE(1); LANE(2); LANE(3); LANE(4); LANE(5); LANE(6); LANE(7);
#undef LANE
    }
  }
  for (int64_t k = k0; k < n; ++k) axpy<W>(loc + int64_t(row[k]) * W, panel + int64_t(col[k]) * stride, val[k]);
}

// panel[c * w + j] = src[j][c]: w rows of I activations transposed into an (I, w) float panel. Written in
// order, w fixed where it is small (a decode slot serves a few rows), so the compiler interleaves the rows.
template <int W, typename scalar_t>
void pack_fixed(float* panel, const scalar_t* const* src, int64_t I) {
  const scalar_t* s[W];
  for (int j = 0; j < W; ++j) s[j] = src[j];
  for (int64_t c = 0; c < I; ++c) {
    for (int j = 0; j < W; ++j) panel[c * W + j] = static_cast<float>(s[j][c]);
  }
}

template <typename scalar_t>
void pack_panel(float* panel, const scalar_t* const* src, int64_t w, int64_t I) {
  switch (w) {
    case 1: pack_fixed<1>(panel, src, I); return;
    case 2: pack_fixed<2>(panel, src, I); return;
    case 3: pack_fixed<3>(panel, src, I); return;
    case 4: pack_fixed<4>(panel, src, I); return;
    default:
      for (int64_t c = 0; c < I; ++c) {
        for (int64_t j = 0; j < w; ++j) panel[c * w + j] = static_cast<float>(src[j][c]);
      }
  }
}

constexpr int64_t kTile = 8;  // columns per pass of the scatter path (its (O, 8) accumulator stays in L1/L2)
constexpr int64_t kParallelPanel = 1 << 16;  // panel floats from which packing them is split across threads
// Estimated scatter cost (units of tile_cost, ~0.5 ns each here) below which one thread does it all: entering
// a parallel region costs ~8 µs on a 2-core VM, more than splitting k_proj's 16 small slots saves.
constexpr double kParallelCost = 32768;

// One row of a packed slot table (pack_slots): where a slot's arrays live, and their sizes.
struct Slot {
  const int32_t* crow;
  const void* col;  // int32, or uint16 (int16 storage) where col16
  const float* val;
  const uint16_t* row;  // nullptr: the layout has no row indices (CSR path)
  int64_t nnz;
  int64_t out_features;
  bool col16;
};
constexpr int64_t kSlotFields = 7;  // crow, col, val, row (0 = none), nnz, out_features, col16

// The rows of a pack_slots table (checked by check_slot_groups) as Slots.
std::vector<Slot> unpack_slots(const torch::Tensor& slots) {
  const int64_t S = slots.size(0);
  const int64_t* t = slots.data_ptr<int64_t>();
  std::vector<Slot> unpacked(S);
  for (int64_t s = 0; s < S; ++s) {
    const int64_t* r = t + s * kSlotFields;
    unpacked[s] = Slot{reinterpret_cast<const int32_t*>(r[0]), reinterpret_cast<const void*>(r[1]),
                       reinterpret_cast<const float*>(r[2]), reinterpret_cast<const uint16_t*>(r[3]), r[4], r[5],
                       r[6] != 0};
  }
  return unpacked;
}

// f(col) with the slot's column indices at their stored width.
template <typename F>
inline void with_cols(const Slot& slot, F&& f) {
  if (slot.col16) {
    f(static_cast<const uint16_t*>(slot.col));
  } else {
    f(static_cast<const int32_t*>(slot.col));
  }
}

template <typename scalar_t>
void side_linear_kernel(torch::Tensor& out, const torch::Tensor& x, const std::vector<Slot>& slots,
                        const int64_t* slot_ptr, const int64_t* slot_rows) {
  const int64_t T = x.size(1), I = x.size(2), O = out.size(2);
  const int64_t S = static_cast<int64_t>(slots.size());
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  // Slot s: W_s = rows·T panel columns; its panel is floats [panel_off[s], +I·W_s) laid out (I, W_s), and
  // panel column j lands at out offset dst[dst_off[s] + j] (+ o).
  std::vector<int64_t> width(S), panel_off(S + 1, 0), dst_off(S + 1, 0);
  // A float32 slot serving one decode row reads x's row as its panel and adds straight into out's row: both
  // are already (I, 1) and (O, 1), so neither the panel copy nor the local accumulator is needed.
  std::vector<char> direct(S, 0);
  // Scatter work items (slot, first column of its tile), with their cumulative estimated cost; CSR slots.
  std::vector<std::pair<int64_t, int64_t>> tiles;
  std::vector<double> tile_cost{0.0};
  std::vector<int64_t> wide;
  int64_t widest = 0;
  for (int64_t s = 0; s < S; ++s) {
    width[s] = slots[s].nnz > 0 ? (slot_ptr[s + 1] - slot_ptr[s]) * T : 0;  // an empty slot adds nothing
    direct[s] = std::is_same_v<scalar_t, float> && width[s] == 1 && slots[s].row != nullptr;
    panel_off[s + 1] = panel_off[s] + (direct[s] ? 0 : I * width[s]);
    dst_off[s + 1] = dst_off[s] + width[s];
    if (width[s] == 0) continue;
    if (slots[s].row != nullptr) {
      for (int64_t j0 = 0; j0 < width[s]; j0 += kTile) {
        const int64_t tw = std::min(kTile, width[s] - j0);
        tiles.emplace_back(s, j0);
        tile_cost.push_back(tile_cost.back() + double(slots[s].nnz) * double(2 + tw) + double(O * tw));
      }
    } else {
      wide.push_back(s);
      widest = std::max(widest, width[s]);
    }
  }
  std::vector<int64_t> dst(dst_off[S]);
  std::unique_ptr<float[]> panels(new float[panel_off[S]]);  // every float is written before it is read
  // Decode panels are small (I·rows floats): packed inline, since entering a parallel region costs more.
  const int64_t panel_grain = panel_off[S] < kParallelPanel ? std::max<int64_t>(S, 1) : 1;
  at::parallel_for(0, S, panel_grain, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t w = width[s];
      if (w == 0) continue;
      std::vector<const scalar_t*> src(w);
      int64_t j = 0;
      for (int64_t a = slot_ptr[s]; a < slot_ptr[s + 1]; ++a) {
        for (int64_t t = 0; t < T; ++t, ++j) {
          const int64_t flat = slot_rows[a] * T + t;
          dst[dst_off[s] + j] = flat * O;
          src[j] = xp + flat * I;
        }
      }
      if (!direct[s]) pack_panel(panels.get() + panel_off[s], src.data(), w, I);
    }
  });
  const int64_t N = static_cast<int64_t>(tiles.size());
  if (N > 0) {
    // One task per thread, the tiles split by estimated cost (slot widths differ under skewed mixes); one task
    // when the work is too little to pay for entering a parallel region.
    const int64_t tasks = tile_cost.back() < kParallelCost ? 1 : std::min<int64_t>(N, at::get_num_threads());
    std::vector<int64_t> first(tasks + 1, N);
    first[0] = 0;
    for (int64_t t = 1, i = 0; t < tasks; ++t) {
      const double cut = tile_cost.back() * double(t) / double(tasks);
      while (i < N && (tile_cost[i] + tile_cost[i + 1]) / 2 < cut) ++i;
      first[t] = std::max(i, first[t - 1]);
    }
    at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> loc;
      for (int64_t i = first[t0]; i < first[t1]; ++i) {
        const auto [s, j0] = tiles[i];
        const int64_t w = width[s], tw = std::min(kTile, w - j0);
        const uint16_t* row = slots[s].row;
        const float* val = slots[s].val;
        const int64_t n = slots[s].nnz;
        if (direct[s]) {  // scalar_t is float here
          const int64_t flat = dst[dst_off[s]] / O;
          float* y = reinterpret_cast<float*>(op) + flat * O;
          const float* xr = reinterpret_cast<const float*>(xp) + flat * I;
          with_cols(slots[s], [&](const auto* col) { scatter_slot<1>(row, col, val, n, xr, 1, y); });
          continue;
        }
        loc.assign(static_cast<size_t>(O * tw), 0.f);
        const float* panel = panels.get() + panel_off[s] + j0;
        float* l = loc.data();
        with_cols(slots[s], [&](const auto* col) {
          switch (tw) {
            case 1: scatter_slot<1>(row, col, val, n, panel, w, l); break;
            case 2: scatter_slot<2>(row, col, val, n, panel, w, l); break;
            case 3: scatter_slot<3>(row, col, val, n, panel, w, l); break;
            case 4: scatter_slot<4>(row, col, val, n, panel, w, l); break;
            case 5: scatter_slot<5>(row, col, val, n, panel, w, l); break;
            case 6: scatter_slot<6>(row, col, val, n, panel, w, l); break;
            case 7: scatter_slot<7>(row, col, val, n, panel, w, l); break;
            default: scatter_slot<8>(row, col, val, n, panel, w, l); break;
          }
        });
        const int64_t* to = dst.data() + dst_off[s] + j0;
        for (int64_t j = 0; j < tw; ++j) {
          scalar_t* y = op + to[j];
          for (int64_t o = 0; o < O; ++o) y[o] = static_cast<scalar_t>(static_cast<float>(y[o]) + l[o * tw + j]);
        }
      }
    });
  }
  if (wide.empty()) return;
  // Output rows in blocks; inside a block one slot at a time, so its CSR streams and its panel stays hot.
  at::parallel_for(0, O, 64, [&](int64_t o0, int64_t o1) {
    std::vector<float> acc(widest);
    float* a = acc.data();
    for (const int64_t s : wide) {
      const int64_t w = width[s];
      const float* panel = panels.get() + panel_off[s];
      const int32_t* crow = slots[s].crow;
      const float* val = slots[s].val;
      const int64_t* to = dst.data() + dst_off[s];
      with_cols(slots[s], [&](const auto* col) {
        for (int64_t o = o0; o < o1; ++o) {
          const int32_t begin = crow[o], end = crow[o + 1];
          if (begin == end) continue;
          switch (w) {
            case 1: dot_fixed<1>(col, val, begin, end, panel, a); break;
            case 2: dot_fixed<2>(col, val, begin, end, panel, a); break;
            case 3: dot_fixed<3>(col, val, begin, end, panel, a); break;
            case 4: dot_fixed<4>(col, val, begin, end, panel, a); break;
            default: dot_any(col, val, begin, end, panel, w, a);
          }
          for (int64_t j = 0; j < w; ++j) {
            scalar_t& y = op[to[j] + o];
            y = static_cast<scalar_t>(static_cast<float>(y) + a[j]);
          }
        }
      });
    }
  });
}

}  // namespace

// Validates once what side_linear_ would otherwise check on every call (per slot: dtypes, contiguity, sizes,
// the CSR's end) and returns an (S, 7) int64 table of the slots' data pointers, nnz, out_features and column
// width. The table does not own the tensors: the caller keeps them alive while it uses the table
// (deltas_store.native wraps both in one object).
torch::Tensor pack_slots(std::vector<torch::Tensor> crows, std::vector<torch::Tensor> cols,
                         std::vector<torch::Tensor> vals, std::vector<torch::Tensor> kept_rows,
                         std::vector<int64_t> out_features) {
  const int64_t S = static_cast<int64_t>(crows.size());
  TORCH_CHECK(static_cast<int64_t>(cols.size()) == S && static_cast<int64_t>(vals.size()) == S &&
                  static_cast<int64_t>(kept_rows.size()) == S &&
                  static_cast<int64_t>(out_features.size()) == S,
              "one crow, col, val, kept_rows and out_features per slot");
  torch::Tensor table = torch::zeros({S, kSlotFields}, torch::kInt64);
  int64_t* t = table.data_ptr<int64_t>();
  for (int64_t s = 0; s < S; ++s) {
    const int64_t O = out_features[s];
    TORCH_CHECK(O >= 0, "out_features must be >= 0");
    for (const torch::Tensor* a : {&crows[s], &cols[s], &vals[s], &kept_rows[s]}) {
      TORCH_CHECK(a->device().is_cpu() && a->dim() == 1, "slot arrays must be 1-D CPU tensors");
    }
    t[s * kSlotFields + 5] = O;
    // A slot with no kept values (a Linear its delta leaves alone) is skipped by side_linear_: no arrays.
    if (cols[s].numel() == 0 && vals[s].numel() == 0) continue;
    TORCH_CHECK(crows[s].scalar_type() == torch::kInt32, "crow must be int32");
    // col: int32, or int16 read as uint16 (in_features <= 65536: 2 bytes less per kept value to stream).
    const bool col16 = cols[s].scalar_type() == torch::kInt16;
    TORCH_CHECK(col16 || cols[s].scalar_type() == torch::kInt32, "col must be int32 or int16");
    TORCH_CHECK(vals[s].scalar_type() == torch::kFloat32, "values must be float32");
    TORCH_CHECK(crows[s].is_contiguous() && cols[s].is_contiguous() && vals[s].is_contiguous(),
                "crow, col and val must be contiguous");
    TORCH_CHECK(crows[s].numel() == O + 1, "crow must have out_features + 1 entries");
    TORCH_CHECK(cols[s].numel() == vals[s].numel(), "col and val must match");
    // kept_rows: each kept value's output row (int16 read as uint16), or empty when the layout has none.
    TORCH_CHECK(kept_rows[s].numel() == 0 || (kept_rows[s].numel() == vals[s].numel() &&
                                              kept_rows[s].scalar_type() == torch::kInt16 &&
                                              kept_rows[s].is_contiguous() && O <= 65536),
                "kept_rows must be empty or one contiguous int16 per kept value (out_features <= 65536)");
    // Bounds are the layout's invariants (checked when the delta was loaded); the last offset is cheap to check.
    TORCH_CHECK(crows[s].data_ptr<int32_t>()[O] == cols[s].numel(), "crow must end at nnz");
    int64_t* r = t + s * kSlotFields;
    r[0] = reinterpret_cast<int64_t>(crows[s].data_ptr<int32_t>());
    r[1] = reinterpret_cast<int64_t>(cols[s].data_ptr());
    r[2] = reinterpret_cast<int64_t>(vals[s].data_ptr<float>());
    r[3] = kept_rows[s].numel() ? reinterpret_cast<int64_t>(kept_rows[s].data_ptr<int16_t>()) : 0;
    r[4] = cols[s].numel();
    r[5] = O;
    r[6] = col16;
  }
  return table;
}

namespace {

// The checks side_linear_ and embedding_side_ share: `slots` is a pack_slots table and slot_ptr / slot_rows
// split batch rows [0, B) among its S slots.
void check_slot_groups(const torch::Tensor& slots, const torch::Tensor& slot_ptr, const torch::Tensor& slot_rows,
                       int64_t B) {
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.dim() == 2 && slots.size(1) == kSlotFields &&
                  slots.is_contiguous() && slots.device().is_cpu(),
              "slots must be a table from pack_slots");
  const int64_t S = slots.size(0);
  TORCH_CHECK(slot_ptr.scalar_type() == torch::kInt64 && slot_rows.scalar_type() == torch::kInt64,
              "slot_ptr and slot_rows must be int64");
  TORCH_CHECK(slot_ptr.is_contiguous() && slot_rows.is_contiguous() && slot_ptr.device().is_cpu() &&
                  slot_rows.device().is_cpu(),
              "slot_ptr and slot_rows must be contiguous CPU tensors");
  TORCH_CHECK(slot_ptr.numel() == S + 1, "slot_ptr must have one entry per slot plus one");
  const int64_t* ptr = slot_ptr.data_ptr<int64_t>();
  const int64_t* rows = slot_rows.data_ptr<int64_t>();
  TORCH_CHECK(ptr[0] == 0 && ptr[S] == slot_rows.numel(), "slot_ptr must span slot_rows");
  for (int64_t s = 0; s < S; ++s) TORCH_CHECK(ptr[s] <= ptr[s + 1], "slot_ptr must not decrease");
  for (int64_t a = 0; a < slot_rows.numel(); ++a) TORCH_CHECK(rows[a] >= 0 && rows[a] < B, "row out of range");
}

}  // namespace

// out[r] += x[r] · ΔW_{slot(r)}ᵀ in place: slot s (a row of `slots`, from pack_slots) serves batch rows
// slot_rows[slot_ptr[s] : slot_ptr[s + 1]].
void side_linear_(torch::Tensor out, torch::Tensor x, torch::Tensor slots, torch::Tensor slot_ptr,
                  torch::Tensor slot_rows) {
  TORCH_CHECK(out.dim() == 3 && x.dim() == 3, "out and x must be (B, T, features)");
  TORCH_CHECK(out.is_contiguous() && x.is_contiguous(), "out and x must be contiguous");
  TORCH_CHECK(out.device().is_cpu() && x.device().is_cpu(), "the native side kernel runs on CPU");
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "out and x must share a dtype");
  TORCH_CHECK(out.size(0) == x.size(0) && out.size(1) == x.size(1), "out and x must share (B, T)");
  check_slot_groups(slots, slot_ptr, slot_rows, x.size(0));
  const int64_t O = out.size(2);
  const int64_t* ptr = slot_ptr.data_ptr<int64_t>();
  const int64_t* rows = slot_rows.data_ptr<int64_t>();
  const std::vector<Slot> unpacked = unpack_slots(slots);
  for (const Slot& slot : unpacked) {
    TORCH_CHECK(slot.out_features == O, "slot table packed for ", slot.out_features, " output features, out has ", O);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, x.scalar_type(),
                                  "side_linear_", [&] {
    side_linear_kernel<scalar_t>(out, x, unpacked, ptr, rows);
  });
}

namespace {

template <typename scalar_t, typename col_t>
void embedding_rows(scalar_t* y, const int32_t* crow, const col_t* col, const float* val, int64_t token) {
  for (int32_t k = crow[token]; k < crow[token + 1]; ++k) {
    scalar_t& e = y[static_cast<int64_t>(col[k])];
    // The value in the weight's dtype first, as patching computes weight + value (one rounding, like it).
    using acc_t = at::opmath_type<scalar_t>;  // float for half types, the type itself otherwise
    e = static_cast<scalar_t>(static_cast<acc_t>(e) + static_cast<acc_t>(static_cast<scalar_t>(val[k])));
  }
}

}  // namespace

// out[r, t, :] += ΔE_{slot(r)}[ids[r, t], :] in place, one add per kept value in out's dtype: exactly the
// patched embedding's row. Slots as side_linear_'s (a table from pack_slots, out_features = vocabulary).
void embedding_side_(torch::Tensor out, torch::Tensor ids, torch::Tensor slots, torch::Tensor slot_ptr,
                     torch::Tensor slot_rows) {
  TORCH_CHECK(out.dim() == 3 && out.is_contiguous() && out.device().is_cpu(), "out must be contiguous (B, T, H)");
  TORCH_CHECK(ids.dim() == 2 && ids.is_contiguous() && ids.scalar_type() == torch::kInt64 && ids.device().is_cpu(),
              "ids must be contiguous int64 (B, T)");
  TORCH_CHECK(out.size(0) == ids.size(0) && out.size(1) == ids.size(1), "out and ids must share (B, T)");
  check_slot_groups(slots, slot_ptr, slot_rows, ids.size(0));
  const int64_t S = slots.size(0), T = ids.size(1), H = out.size(2);
  const int64_t* ptr = slot_ptr.data_ptr<int64_t>();
  const int64_t* rows = slot_rows.data_ptr<int64_t>();
  const int64_t* id = ids.data_ptr<int64_t>();
  const std::vector<Slot> unpacked = unpack_slots(slots);
  for (int64_t s = 0; s < S; ++s) {
    if (unpacked[s].nnz == 0) continue;  // the delta leaves this embedding alone
    const int64_t V = unpacked[s].out_features;
    for (int64_t a = ptr[s]; a < ptr[s + 1]; ++a) {
      for (int64_t j = 0; j < T; ++j) {
        const int64_t token = id[rows[a] * T + j];
        TORCH_CHECK(token >= 0 && token < V, "token id ", token, " out of range for a vocabulary of ", V);
      }
    }
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::BFloat16, at::ScalarType::Half, out.scalar_type(),
                                  "embedding_side_", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t s = 0; s < S; ++s) {
      const Slot& slot = unpacked[s];
      if (slot.nnz == 0) continue;
      with_cols(slot, [&](const auto* col) {
        for (int64_t a = ptr[s]; a < ptr[s + 1]; ++a) {
          for (int64_t j = 0; j < T; ++j) {
            const int64_t flat = rows[a] * T + j;
            embedding_rows(op + flat * H, slot.crow, col, slot.val, id[flat]);
          }
        }
      });
    }
  });
}

namespace {

// keep[j] = whether element start + j is kept (its hash below `limit`), for j < n: no branch in the loop, so the
// compiler vectorizes it (two 32-bit multiplies and an unsigned compare per element).
#define DELTASERVE_HASH_RUN_BODY \
  for (int j = 0; j < n; ++j) keep[j] = mix32(mix32((start + static_cast<uint32_t>(j)) ^ ka) ^ kb) < limit;

inline void hash_run(uint32_t start, int n, uint32_t ka, uint32_t kb, uint32_t limit, uint8_t* keep) {
  DELTASERVE_HASH_RUN_BODY
}

#if defined(__GNUC__) && defined(__x86_64__)
// The same loop compiled for AVX2 (8 lanes of 32-bit multiplies; SSE2, the portable baseline, has no 32-bit
// multiply), chosen at run time where the CPU has it: the file stays portable.
__attribute__((target("avx2"))) void hash_run_avx2(uint32_t start, int n, uint32_t ka, uint32_t kb, uint32_t limit,
                                                    uint8_t* keep) {
  DELTASERVE_HASH_RUN_BODY
}
#endif

using HashRun = void (*)(uint32_t, int, uint32_t, uint32_t, uint32_t, uint8_t*);
const HashRun kHashRun = [] {
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();  // this may run among other static initialisers
  if (__builtin_cpu_supports("avx2")) return HashRun{hash_run_avx2};
#endif
  return HashRun{hash_run};
}();

}  // namespace

torch::Tensor seeded_keep(int64_t numel, int64_t key_a, int64_t key_b, int64_t threshold) {
  TORCH_CHECK(numel >= 0 && numel < (int64_t(1) << 32), "numel must be in [0, 2**32)");
  TORCH_CHECK(key_a >= 0 && key_a <= 0xFFFFFFFFll && key_b >= 0 && key_b <= 0xFFFFFFFFll, "keys are 32-bit");
  TORCH_CHECK(threshold >= 0 && threshold <= (int64_t(1) << 32), "threshold must be in [0, 2**32]");
  constexpr int64_t kBlock = 1 << 16;
  constexpr int kRun = 1024;  // positions hashed, then compacted, per pass
  const int64_t blocks = (numel + kBlock - 1) / kBlock;
  const uint32_t ka = static_cast<uint32_t>(key_a), kb = static_cast<uint32_t>(key_b);
  if (threshold > 0xFFFFFFFFll) return torch::arange(numel, torch::kInt64);  // density 1: every hash is below
  const uint32_t limit = static_cast<uint32_t>(threshold);
  std::vector<std::vector<int64_t>> kept(blocks);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    uint8_t keep[kRun];
    int64_t idx[kRun];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t start = b * kBlock, stop = std::min(numel, start + kBlock);
      std::vector<int64_t>& out = kept[b];
      out.reserve(static_cast<size_t>((stop - start) * (static_cast<double>(limit) / 4294967296.0) * 1.2) + 16);
      for (int64_t run = start; run < stop; run += kRun) {
        const int n = static_cast<int>(std::min<int64_t>(kRun, stop - run));
        kHashRun(static_cast<uint32_t>(run), n, ka, kb, limit, keep);
        const int padded = (n + 7) & ~7;
        std::memset(keep + n, 0, static_cast<size_t>(padded - n));
        int count = 0;
        for (int j = 0; j < padded; j += 8) {  // eight flags at a time: at low density most words are zero
          uint64_t word;
          std::memcpy(&word, keep + j, sizeof word);
          if (word == 0) continue;
          for (int k = j; k < j + 8; ++k) {  // branch-free within a word, whatever the density
            idx[count] = run + k;
            count += keep[k];
          }
        }
        out.insert(out.end(), idx, idx + count);
      }
    }
  });
  std::vector<int64_t> offset(blocks + 1, 0);
  for (int64_t b = 0; b < blocks; ++b) offset[b + 1] = offset[b] + static_cast<int64_t>(kept[b].size());
  torch::Tensor result = torch::empty({offset[blocks]}, torch::kInt64);
  int64_t* dst = result.data_ptr<int64_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) std::copy(kept[b].begin(), kept[b].end(), dst + offset[b]);
  });
  return result;
}

namespace {

template <typename bits_t>
void assign_kernel(bits_t* dst, const int64_t* index, const bits_t* src, int64_t n) {
  constexpr int64_t kAhead = 16;  // prefetch the weight line a few writes ahead: the writes are random
  at::parallel_for(0, n, 1 << 15, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      if (k + kAhead < k1) __builtin_prefetch(dst + index[k + kAhead], 1, 0);
      dst[index[k]] = src[k];
    }
  });
}

}  // namespace

// dst.flat[starts[r] + j] = src[offsets[r] + j] for 0 <= j < offsets[r + 1] - offsets[r]: sorted, disjoint runs
// of consecutive positions, one memcpy each, so the index data read is one start per run, not one per value.
void assign_runs_(torch::Tensor dst, torch::Tensor starts, torch::Tensor offsets, torch::Tensor src) {
  TORCH_CHECK(dst.device().is_cpu() && starts.device().is_cpu() && offsets.device().is_cpu() && src.device().is_cpu(),
              "CPU tensors only");
  TORCH_CHECK(dst.is_contiguous() && starts.is_contiguous() && offsets.is_contiguous() && src.is_contiguous(),
              "contiguous tensors only");
  TORCH_CHECK(starts.scalar_type() == torch::kInt64 && starts.dim() == 1, "starts must be 1-D int64");
  TORCH_CHECK(offsets.scalar_type() == torch::kInt64 && offsets.dim() == 1 && offsets.numel() == starts.numel() + 1,
              "offsets must be 1-D int64 with one more entry than starts");
  TORCH_CHECK(src.dim() == 1 && dst.element_size() == src.element_size(), "src: 1-D, dst's element size");
  const int64_t runs = starts.numel();
  const int64_t* st = starts.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[runs] == src.numel(), "offsets must run from 0 to src.numel()");
  if (runs == 0) return;
  TORCH_CHECK(st[0] >= 0 && st[runs - 1] + (off[runs] - off[runs - 1]) <= dst.numel(),
              "run out of range (runs must be sorted)");
  const int64_t es = dst.element_size();
  char* d = static_cast<char*>(dst.data_ptr());
  const char* s = static_cast<const char*>(src.data_ptr());
  constexpr int64_t kAhead = 8;  // runs land on random weight lines: prefetch a few runs ahead
  at::parallel_for(0, runs, 1 << 12, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (r + kAhead < r1) __builtin_prefetch(d + st[r + kAhead] * es, 1, 0);
      std::memcpy(d + st[r] * es, s + off[r] * es, (off[r + 1] - off[r]) * es);
    }
  });
}

// dst.flat[index[k]] = src[k], bit for bit (raw element copies of 2, 4 or 8 bytes); indices are the caller's
// invariant (a prepared delta's, bounds-checked when it was read) and only their range is checked here.
void assign_(torch::Tensor dst, torch::Tensor index, torch::Tensor src) {
  TORCH_CHECK(dst.device().is_cpu() && index.device().is_cpu() && src.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(dst.is_contiguous() && index.is_contiguous() && src.is_contiguous(), "contiguous tensors only");
  TORCH_CHECK(index.scalar_type() == torch::kInt64 && index.dim() == 1, "index must be 1-D int64");
  TORCH_CHECK(src.dim() == 1 && src.numel() == index.numel(), "one value per index");
  TORCH_CHECK(dst.element_size() == src.element_size(), "dst and src must have the same element size");
  const int64_t n = index.numel();
  if (n == 0) return;
  const int64_t* idx = index.data_ptr<int64_t>();
  TORCH_CHECK(idx[0] >= 0 && idx[n - 1] < dst.numel(), "index out of range (indices must be sorted)");
  switch (dst.element_size()) {
    case 2: assign_kernel(static_cast<int16_t*>(dst.data_ptr()), idx, static_cast<const int16_t*>(src.data_ptr()), n); break;
    case 4: assign_kernel(static_cast<int32_t*>(dst.data_ptr()), idx, static_cast<const int32_t*>(src.data_ptr()), n); break;
    case 8: assign_kernel(static_cast<int64_t*>(dst.data_ptr()), idx, static_cast<const int64_t*>(src.data_ptr()), n); break;
    default: TORCH_CHECK(false, "element size must be 2, 4 or 8 bytes");
  }
}

// How many of torch's intra-op threads at::parallel_for spreads `tasks` unit tasks over: 1 when the module
// was built without OpenMP (at::parallel_for then runs serially, silently).
int64_t parallel_threads(int64_t tasks) {
  std::vector<int> used(tasks, -1);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) used[t] = at::get_thread_num();
  });
  std::sort(used.begin(), used.end());
  return std::unique(used.begin(), used.end()) - used.begin();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every kernel releases the GIL once its arguments are converted: the server's event loop streams tokens and
  // takes requests while the worker thread is inside one.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("parallel_threads", &parallel_threads, release(),
        "distinct threads at::parallel_for uses for `tasks` unit tasks");
  m.def("assign_", &assign_, release(), "dst.flat[index] = src, bit for bit (sorted int64 index)");
  m.def("assign_runs_", &assign_runs_, release(),
        "dst.flat[runs] = src, one memcpy per run of consecutive positions");
  m.def("pack_slots", &pack_slots, release(), "validate slots' CSR arrays once: an (S, 7) int64 pointer table");
  m.def("side_linear_", &side_linear_, release(), "out += x · ΔWᵀ per row's delta slot (in place)");
  m.def("embedding_side_", &embedding_side_, release(), "out += each token's ΔE row per row's delta slot");
  m.def("seeded_keep", &seeded_keep, release(),
        "sorted int64 indices i < numel with mix32(mix32(i ^ a) ^ b) < threshold");
}
