// CPU kernel of msa_fast::mine_pairs (SPEC 3.4, FD-CMDIE eq. 7-8).
//
//   sim(i, j) = <q_i / |q_i|, f_j / |f_j|>        (0 when either row is zero)
//   pos_i = the k rows j with labels[j] == query_labels[i], j != query_index[i],
//           of largest sim, sorted descending;
//   neg_i = the k rows j with labels[j] != query_labels[i] of smallest sim,
//           sorted ascending;
//   ties go to the lower j; fewer than k candidates: -1 / NaN. A row with a NaN /
//   inf entry normalises to NaNs, so its similarities are NaN, which the strict
//   admission tests below never admit: it is neither mined nor mining.
//
// Shapes: features (N, D), labels (N,) int64, queries (Q, D), query_labels (Q,)
// int64, query_index (Q,) int64 in [-1, N). Outputs (Q, k): int64 indices and
// similarities in fp64 for fp64 inputs, fp32 otherwise (fp16 / bf16 are
// promoted to fp32 first, as the reference does).
//
// Algorithm: the rows are normalised once (one N x D copy, plus Q x D when the
// queries are not the features), then the Q x N similarity matrix is produced
// one kBlock x kBlock tile at a time with at::mm (MKL, multithreaded) and
// consumed immediately by a per-query running top-k. When the queries are the
// feature rows the matrix is symmetric and only the tiles on and above the
// diagonal are multiplied (half the FLOPs; see mine_blocked). Memory is
// O((Q + N) D + Q k + kBlock^2): the Q x N matrix never exists.
//
// The running top-k is a bounded binary heap per query whose root is the
// current worst kept entry. Keys are offered in increasing j (tiles are visited
// in order and scanned left to right), so a candidate that merely ties the worst
// kept similarity has a larger index and loses: the admission test is a strict
// comparison against a cached threshold, which keeps the hot loop branch-light.
// The heap comparator nevertheless orders ties by index, so the final sort is
// exact (sim, then lower index first).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "pair_mining.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace msa_fast {
namespace {

// Tile side: a 1024 x 1024 fp32 tile (4 MiB) is large enough for MKL to run
// near peak on the (1024 x D) @ (D x 1024) product and small enough to stay in
// the last-level cache while the selection pass reads it back.
constexpr int64_t kBlock = 1024;

template <typename scalar_t>
struct Cand {
  scalar_t sim;
  int64_t idx;
};

// "a is output before b": larger (pos) / smaller (neg) similarity, then lower index.
template <typename scalar_t, bool kLargest>
struct RanksBefore {
  bool operator()(const Cand<scalar_t>& a, const Cand<scalar_t>& b) const {
    if (a.sim != b.sim) return kLargest ? a.sim > b.sim : a.sim < b.sim;
    return a.idx < b.idx;
  }
};

// A bounded top-`cap` list over a caller-owned buffer. With RanksBefore as the
// heap's "less", std::*_heap keep the entry output last (the worst) at the root.
template <typename scalar_t, bool kLargest>
struct TopK {
  Cand<scalar_t>* buf;
  int64_t cap;
  int64_t size;
  // Admission threshold: +-inf until full, then the worst kept similarity.
  scalar_t thr;

  void reset(Cand<scalar_t>* b, int64_t c) {
    buf = b;
    cap = c;
    size = 0;
    thr = kLargest ? -std::numeric_limits<scalar_t>::infinity()
                   : std::numeric_limits<scalar_t>::infinity();
  }

  // Called only for candidates that pass `sim > thr` (pos) / `sim < thr` (neg),
  // in increasing idx order.
  void push(scalar_t sim, int64_t idx) {
    RanksBefore<scalar_t, kLargest> cmp;
    if (size < cap) {
      buf[size++] = Cand<scalar_t>{sim, idx};
      std::push_heap(buf, buf + size, cmp);
    } else {
      std::pop_heap(buf, buf + cap, cmp);
      buf[cap - 1] = Cand<scalar_t>{sim, idx};
      std::push_heap(buf, buf + cap, cmp);
    }
    if (size == cap) thr = buf[0].sim;
  }

  // Sorts in output order and writes k slots, padding with -1 / NaN.
  template <typename out_t>
  void write(int64_t* out_idx, out_t* out_sim, int64_t k) {
    std::sort_heap(buf, buf + size, RanksBefore<scalar_t, kLargest>());
    for (int64_t t = 0; t < size; ++t) {
      out_idx[t] = buf[t].idx;
      out_sim[t] = static_cast<out_t>(buf[t].sim);
    }
    for (int64_t t = size; t < k; ++t) {
      out_idx[t] = -1;
      out_sim[t] = std::numeric_limits<out_t>::quiet_NaN();
    }
  }
};

// Offers keys j0 .. j0 + len - 1 (similarities `row`, labels `lab`) to one
// query's two lists. `self` is the query's own row relative to j0 (any value
// outside [0, len) when it is not in this range).
template <typename scalar_t>
inline void scan(TopK<scalar_t, true>& p, TopK<scalar_t, false>& g, const scalar_t* row,
                 int64_t len, int64_t j0, const int64_t* lab, int64_t ql, int64_t self) {
  for (int64_t j = 0; j < len; ++j) {
    const scalar_t v = row[j];
    const bool same = lab[j] == ql;
    // Bitwise & on bools: one well-predicted branch per key and list, since
    // after warm-up almost no key beats the thresholds.
    if (same & (v > p.thr) & (j != self)) p.push(v, j0 + j);
    if (!same & (v < g.thr)) g.push(v, j0 + j);
  }
}

// Streams the similarity matrix tile by tile into the per-query lists.
//
// symmetric == true (the queries are the feature rows, the default call): S is
// symmetric, so only the tiles (I, J) with J >= I are multiplied -- half the
// GEMM -- and each off-diagonal tile feeds its rows to the queries of block I
// and, transposed, its columns to the queries of block J. Keys still reach every
// query in increasing order: block J's queries receive key blocks I < J as
// columns during outer iterations I = 0 .. J-1, then key blocks >= J as rows at
// outer iteration J.
template <typename scalar_t>
void mine_blocked(const at::Tensor& fn, const at::Tensor& qn, bool symmetric,
                  const int64_t* labels, const int64_t* qlabels, const int64_t* qindex,
                  int64_t k, int64_t* pos_idx, scalar_t* pos_sim, int64_t* neg_idx,
                  scalar_t* neg_sim) {
  const int64_t n = fn.size(0);
  const int64_t q = qn.size(0);
  const int64_t cap = std::min(k, n);  // never more than n candidates
  // Per-query state for all Q queries: O(Q k), as the outputs themselves.
  std::vector<Cand<scalar_t>> pos_buf(static_cast<size_t>(q * cap));
  std::vector<Cand<scalar_t>> neg_buf(static_cast<size_t>(q * cap));
  std::vector<TopK<scalar_t, true>> pos(static_cast<size_t>(q));
  std::vector<TopK<scalar_t, false>> neg(static_cast<size_t>(q));
  for (int64_t r = 0; r < q; ++r) {
    pos[r].reset(pos_buf.data() + r * cap, cap);
    neg[r].reset(neg_buf.data() + r * cap, cap);
  }
  // Flat tile buffers reused for every tile; edge tiles view a prefix so that
  // the mm output (and the transposed copy) stay contiguous.
  const int64_t qb_max = std::min(kBlock, q);
  const int64_t kb_max = std::min(kBlock, n);
  at::Tensor tile_buf = at::empty({qb_max * kb_max}, fn.options());
  at::Tensor tile_t_buf = symmetric ? at::empty({qb_max * kb_max}, fn.options()) : at::Tensor();

  for (int64_t q0 = 0; q0 < q; q0 += kBlock) {
    const int64_t qb = std::min(kBlock, q - q0);
    const at::Tensor qblock = qn.narrow(0, q0, qb);
    for (int64_t j0 = symmetric ? q0 : 0; j0 < n; j0 += kBlock) {
      const int64_t kb = std::min(kBlock, n - j0);
      at::Tensor tile = tile_buf.narrow(0, 0, qb * kb).view({qb, kb});
      at::mm_out(tile, qblock, fn.narrow(0, j0, kb).t());
      const scalar_t* s = tile.const_data_ptr<scalar_t>();
      // Columns of an off-diagonal tile are the rows of the mirrored tile (J, I).
      const bool mirror = symmetric && j0 != q0;
      const scalar_t* st = nullptr;
      if (mirror) {
        at::Tensor tile_t = tile_t_buf.narrow(0, 0, kb * qb).view({kb, qb});
        tile_t.copy_(tile.t());
        st = tile_t.const_data_ptr<scalar_t>();
      }
      const int64_t work = mirror ? qb + kb : qb;
      at::parallel_for(0, work, 8, [&](int64_t w0, int64_t w1) {
        for (int64_t w = w0; w < w1; ++w) {
          if (w < qb) {  // query q0 + w against keys j0 ..
            const int64_t r = q0 + w;
            scan(pos[r], neg[r], s + w * kb, kb, j0, labels + j0, qlabels[r], qindex[r] - j0);
          } else {  // query j0 + c against keys q0 .. (transposed tile)
            const int64_t c = w - qb;
            const int64_t r = j0 + c;
            scan(pos[r], neg[r], st + c * qb, qb, q0, labels + q0, qlabels[r], qindex[r] - q0);
          }
        }
      });
    }
  }
  at::parallel_for(0, q, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      pos[r].write(pos_idx + r * k, pos_sim + r * k, k);
      neg[r].write(neg_idx + r * k, neg_sim + r * k, k);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mine_pairs_cpu(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& queries,
    const at::Tensor& query_labels, const at::Tensor& query_index, int64_t k) {
  check_mine_pairs_args(features, labels, queries, query_labels, query_index);
  const int64_t n = features.size(0);
  const int64_t q = queries.size(0);
  TORCH_CHECK(k >= 1, "mine_pairs: k: expected an int >= 1, got ", k);
  for (const at::Tensor* t : {&features, &labels, &queries, &query_labels, &query_index}) {
    TORCH_CHECK(t->device().is_cpu(), "mine_pairs (cpu kernel): expected CPU tensors, got ",
                t->device());
  }

  const bool is_f64 = features.scalar_type() == at::kDouble;
  const auto dtype = is_f64 ? at::kDouble : at::kFloat;
  const auto opts = features.options().dtype(dtype);
  auto pos_idx = at::empty({q, k}, features.options().dtype(at::kLong));
  auto neg_idx = at::empty({q, k}, features.options().dtype(at::kLong));
  auto pos_sim = at::empty({q, k}, opts);
  auto neg_sim = at::empty({q, k}, opts);
  if (q == 0) return {pos_idx, pos_sim, neg_idx, neg_sim};

  const auto qi = query_index.contiguous();
  check_query_index_range(qi, n);

  // The default call passes the features as the queries: normalise them once.
  const at::Tensor fn = normalize_rows(features.to(dtype));
  const bool same_rows = same_storage_rows(queries, features);
  const at::Tensor qn = same_rows ? fn : normalize_rows(queries.to(dtype));
  const auto lab = labels.contiguous();
  const auto qlab = query_labels.contiguous();

  AT_DISPATCH_FLOATING_TYPES(fn.scalar_type(), "mine_pairs_cpu", [&] {
    mine_blocked<scalar_t>(fn, qn, same_rows, lab.const_data_ptr<int64_t>(), qlab.const_data_ptr<int64_t>(),
                           qi.const_data_ptr<int64_t>(), k, pos_idx.data_ptr<int64_t>(),
                           pos_sim.data_ptr<scalar_t>(), neg_idx.data_ptr<int64_t>(),
                           neg_sim.data_ptr<scalar_t>());
  });
  return {pos_idx, pos_sim, neg_idx, neg_sim};
}

}  // namespace

TORCH_LIBRARY_IMPL(msa_fast, CPU, m) { m.impl("mine_pairs", &mine_pairs_cpu); }

}  // namespace msa_fast
