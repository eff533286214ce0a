// CPU kernel of msa_fast::mine_pairs (contract §3.4, FD-CMDIE eq. 7-8).
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
// bf16 screening (fp32 math, a CPU with AVX512-BF16, a similarity GEMM of at least
// 2^31 multiply-adds; MSA_FAST_MINING_SCREEN=auto|always|never, see use_screen). Three
// passes, the lists equal to the exact fp32 ones:
//   1. The tiles are multiplied in bf16 (oneDNN, fp32 accumulation, one rounding of
//      the output: 2.2x the fp32 GEMM's rate here) and scanned 16 keys at a time
//      (AVX-512). A key j is kept for query r's list when its bf16 similarity a could
//      still be among the k best exact ones: sign * a + tol(r, j, a) >= L, where tol
//      bounds |a - exact| rigorously (ScreenTol) and L is a lower bound on the list's
//      k-th best exact value: with T the k-th best sign * a so far (compacted lazily), the k
//      keys at or above T have exact values >= T - max_j tol. The kept keys go to a
//      buffer that drops the keys a raised L excludes whenever it fills.
//   2. The survivors are rescored exactly -- an fp32 dot product of the two unit rows
//      (AVX-512) -- bucketed by (query block, key block) so that both blocks' rows are
//      cache-resident while their pairs are computed (~190 survivors a query at MOSEI's
//      size: in query order their key rows would stream 10 GB of random rows from memory).
//   3. Per query the k best exact values (ties to the lower index) are the output.
// A key the screen drops has exact < L <= the final k-th best, strictly: nothing the
// fp32 pass would output is lost, and the output differs from the fp32 path's only
// where the two fp32 roundings of one similarity (this dot product vs the GEMM's)
// order an exact tie differently. Measured (N = 16,326, D = 877, k = 50, random
// rows, 2 threads): 1.9 s against the fp32 pass's 2.3 s, 1.07-1.17 s since a mirrored
// tile's rows and columns are interleaved between the threads; of it (instrumented) the
// bf16 GEMMs and transposes 0.33 s, the scan 0.43-0.57 s (mostly the ~900 offers a query
// of the streaming top-k: its threshold starts at -inf), the rescoring of ~186 keys a
// query 0.14 s, bounds, bucketing, final sort and preparation ~0.2 s together. The
// assumption the bound rests on: ATen's bf16 mm accumulates in fp32 and rounds
// once (oneDNN's AVX512-BF16 kernels and ATen's fallback both do).
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

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
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

// The tiling of both passes: the tiles (I, J) of qm x fm^T, kBlock x kBlock, with at::mm
// (MKL / oneDNN, multithreaded; J >= I only when symmetric), each consumed at once:
// visit(r, row, len, j0) for every query row r of the tile (its similarities to keys
// j0 .. j0 + len - 1), in parallel over rows. An off-diagonal symmetric tile also feeds
// its columns, transposed into a second buffer, to the queries of block J. Flat tile
// buffers are reused for every tile; edge tiles view a prefix so that the mm output (and
// the transposed copy) stay contiguous. Memory: two tiles.
template <typename T, typename Visit>
void for_each_tile_row(const at::Tensor& qm, const at::Tensor& fm, bool symmetric, const Visit& visit) {
  const int64_t n = fm.size(0);
  const int64_t q = qm.size(0);
  const int64_t qb_max = std::min(kBlock, q);
  const int64_t kb_max = std::min(kBlock, n);
  at::Tensor tile_buf = at::empty({qb_max * kb_max}, fm.options());
  at::Tensor tile_t_buf = symmetric ? at::empty({qb_max * kb_max}, fm.options()) : at::Tensor();
  for (int64_t q0 = 0; q0 < q; q0 += kBlock) {
    const int64_t qb = std::min(kBlock, q - q0);
    const at::Tensor qblock = qm.narrow(0, q0, qb);
    for (int64_t j0 = symmetric ? q0 : 0; j0 < n; j0 += kBlock) {
      const int64_t kb = std::min(kBlock, n - j0);
      at::Tensor tile = tile_buf.narrow(0, 0, qb * kb).view({qb, kb});
      at::mm_out(tile, qblock, fm.narrow(0, j0, kb).t());
      const T* s = tile.const_data_ptr<T>();
      // Columns of an off-diagonal tile are the rows of the mirrored tile (J, I).
      const bool mirror = symmetric && j0 != q0;
      const T* st = nullptr;
      if (mirror) {
        at::Tensor tile_t = tile_t_buf.narrow(0, 0, kb * qb).view({kb, qb});
        tile_t.copy_(tile.t());
        st = tile_t.const_data_ptr<T>();
      }
      const int64_t work = mirror ? qb + kb : qb;
      at::parallel_for(0, work, 8, [&](int64_t w0, int64_t w1) {
        for (int64_t w = w0; w < w1; ++w) {
          // a mirrored tile's rows and columns interleaved (row 0, column 0, row 1, ...):
          // ATen gives each thread one contiguous chunk of the range, and the two halves cost
          // differently -- the columns of tile (0, J) are block J's first keys, whose streaming
          // top-k admits nearly every key (measured: pass 1 906 -> 766 ms at MOSEI's size)
          const int64_t pair = std::min(qb, kb);
          const bool col = mirror && (w < 2 * pair ? (w & 1) != 0 : w - pair >= qb);
          const int64_t i = !mirror ? w : w < 2 * pair ? (w >> 1) : w - pair;
          if (!col) {
            visit(q0 + i, s + i * kb, kb, j0);  // query q0 + i against keys j0 ..
          } else {
            visit(j0 + i, st + i * qb, qb, q0);  // query j0 + i against keys q0 ..
          }
        }
      });
    }
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
  for_each_tile_row<scalar_t>(qn, fn, symmetric, [&](int64_t r, const scalar_t* row, int64_t len, int64_t j0) {
    scan(pos[r], neg[r], row, len, j0, labels + j0, qlabels[r], qindex[r] - j0);
  });
  at::parallel_for(0, q, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      pos[r].write(pos_idx + r * k, pos_sim + r * k, k);
      neg[r].write(neg_idx + r * k, neg_sim + r * k, k);
    }
  });
}

// ---------------------------------------------------------------------------
// bf16 screening with exact fp32 rescoring (see the header comment)
// ---------------------------------------------------------------------------

__attribute__((target("avx512f,avx512bw,avx512vl"))) float dot_avx512(const float* a, const float* b, int64_t d) {
  __m512 acc0 = _mm512_setzero_ps();
  __m512 acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i < d; i += 16) {
    const __mmask16 m = d - i >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (d - i)) - 1u);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// |a - exact| <= tol = base_r + rf_j * (1 + rq_r) + rel * |a|, for the bf16 similarity
// a = bf16(fl32(sum_i q~_i f~_i)) of the rounded unit rows q~ = q + dq, f~ = f + df and
// exact = this file's fp32 dot product of q and f:
//   q~.f~ - q.f = q.df + dq.f + dq.df, bounded by |df| + |dq| + |dq||df| (Cauchy-Schwarz,
//   unit rows: |q|, |f| <= 1 + 1e-5), with rq = |dq|, rf = |df| measured per row;
//   both fp32 accumulations (the GEMM's and the dot's) by gamma_D sum|q_i f_i| each,
//   gamma_D = D 2^-24 / (1 - D 2^-24), sum|q_i f_i| <= (1 + 2^-8)^2 (1 + 1e-5);
//   the output's rounding by u |pre| <= u |a| / (1 - u), u = 2^-8.
// base_r = rq_r (1 + 1e-5) + 2 gamma_D * 1.01; then 5 % slack and 1e-6 on top.
struct ScreenTol {
  float base;  // of this query
  float mul;   // of rf_j
  float rel;
  float of(float rf, float abs_a) const { return base + mul * rf + rel * abs_a; }
};

inline ScreenTol screen_tol(int64_t d, float rq) {
  const double u = std::ldexp(1.0, -8);
  const double g = static_cast<double>(d) * std::ldexp(1.0, -24);
  const double gamma = g / (1 - g);
  const double base = (rq * (1 + 1e-5) + 2 * gamma * 1.01) * 1.05 + 1e-6;
  const double mul = (1 + 1e-5 + rq) * 1.05;
  const double rel = u / (1 - u) * 1.05;
  return ScreenTol{static_cast<float>(base), static_cast<float>(mul), static_cast<float>(rel)};
}

struct Kept {
  float s;      // sign * a (pass 1), then the exact similarity (passes 2, 3)
  int32_t idx;  // key row
};

// One list of one query in pass 1: T, the k-th best sign * a so far (`top` holds the
// values above it, compacted to the best k whenever it reaches 2k: O(1) a value, and T
// between compactions is a stale, lower, still valid bound), the bound L = T - tol(rf_max,
// |T|) derived from it, and the kept keys.
struct Screen {
  std::vector<float> top;
  std::vector<Kept> buf;
  float T = -std::numeric_limits<float>::infinity();
  float L = -std::numeric_limits<float>::infinity();
  size_t cap = 0;

  // Keys the vector test admitted (sign * a + tol >= L): update T and L, keep the key if
  // it still passes, and drop the keys a raised L has excluded once the buffer fills.
  void offer(float s, int32_t idx, float tol_j, int64_t k, const ScreenTol& tol, float rf_max,
             const float* rf) {
    if (s > T) {
      top.push_back(s);
      if (static_cast<int64_t>(top.size()) == 2 * k) settle(k, tol, rf_max);
    }
    if (s + tol_j < L) return;
    buf.push_back(Kept{s, idx});
    if (buf.size() >= cap) {
      filter(tol, rf);
      if (buf.size() * 2 > cap) cap *= 2;
    }
  }

  // Compacts `top` to its best k, so that T is the exact k-th best value seen, and raises L
  // from it: the k keys at or above T have exact >= s - tol(s) >= T - tol(rf_max, |T|)
  // (x - rel |x| is increasing, so the smallest of them bounds all). No-op below k values.
  void settle(int64_t k, const ScreenTol& tol, float rf_max) {
    if (static_cast<int64_t>(top.size()) < k) return;
    std::nth_element(top.begin(), top.begin() + (k - 1), top.end(), std::greater<float>());
    T = top[k - 1];
    top.resize(k);
    L = std::max(L, T - tol.of(rf_max, std::fabs(T)));
  }

  // Drops the kept keys whose exact value is certainly below L: s + tol(s, j) < L.
  void filter(const ScreenTol& tol, const float* rf) {
    size_t w = 0;
    for (const Kept& c : buf) {
      if (c.s + tol.of(rf[c.idx], std::fabs(c.s)) >= L) buf[w++] = c;
    }
    buf.resize(w);
  }
};

struct ScreenQuery {
  Screen pos, neg;
};

inline __attribute__((target("avx512f,avx512bw,avx512vl"))) __m512 bf16_to_f32(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

// Pass 1 for one query over keys j0 .. j0 + len - 1: bf16 similarities `row`, dense
// int32 labels `lab`, the keys' residual norms `rf` (indexed by key row), `self` the
// query's own row relative to j0.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void scan_screen(ScreenQuery& sq, const at::BFloat16* row,
                                                    int64_t len, int64_t j0, const int32_t* lab,
                                                    int32_t ql, int64_t self, const ScreenTol& tol,
                                                    const float* rf, float rf_max, int64_t k) {
  const __m512i vql = _mm512_set1_epi32(ql);
  const __m512 vbase = _mm512_set1_ps(tol.base), vmul = _mm512_set1_ps(tol.mul),
               vrel = _mm512_set1_ps(tol.rel);
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(row);
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = len - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << (len - j)) - 1u);
    const __m512 a = bf16_to_f32(_mm256_maskz_loadu_epi16(m, raw + j));
    const __mmask16 same = _mm512_mask_cmpeq_epi32_mask(m, _mm512_maskz_loadu_epi32(m, lab + j), vql);
    const __m512 t = _mm512_fmadd_ps(vrel, _mm512_abs_ps(a),
                                     _mm512_fmadd_ps(vmul, _mm512_maskz_loadu_ps(m, rf + j0 + j), vbase));
    // NaN similarities (rows with NaN / inf entries) fail both ordered comparisons
    const __mmask16 mp = same & _mm512_cmp_ps_mask(_mm512_add_ps(a, t), _mm512_set1_ps(sq.pos.L), _CMP_GE_OQ);
    const __mmask16 mn = static_cast<__mmask16>(~same & m) &
                         _mm512_cmp_ps_mask(_mm512_sub_ps(t, a), _mm512_set1_ps(sq.neg.L), _CMP_GE_OQ);
    if ((mp | mn) == 0) continue;
    alignas(64) float av[16];
    _mm512_store_ps(av, a);
    alignas(64) float tv[16];
    _mm512_store_ps(tv, t);
    for (uint32_t bits = mp; bits != 0; bits &= bits - 1) {
      const int b = __builtin_ctz(bits);
      if (j + b == self) continue;
      sq.pos.offer(av[b], static_cast<int32_t>(j0 + j + b), tv[b], k, tol, rf_max, rf);
    }
    for (uint32_t bits = mn; bits != 0; bits &= bits - 1) {
      const int b = __builtin_ctz(bits);
      sq.neg.offer(-av[b], static_cast<int32_t>(j0 + j + b), tv[b], k, tol, rf_max, rf);
    }
  }
}

// |x - float(bf16(x))| per row: the rows' rounding residual norms (rounded up).
at::Tensor residual_norms(const at::Tensor& x32, const at::Tensor& x16) {
  return at::linalg_vector_norm(x32 - x16.to(at::kFloat), 2, at::IntArrayRef{1}, false)
             .mul_(1.0f + 1e-4f)
             .contiguous();
}

void mine_screened(const at::Tensor& fn, const at::Tensor& qn, bool symmetric, const int32_t* labels,
                   const int32_t* qlabels, const int64_t* qindex, int64_t k, int64_t* pos_idx,
                   float* pos_sim, int64_t* neg_idx, float* neg_sim) {
  const int64_t n = fn.size(0);
  const int64_t q = qn.size(0);
  const int64_t d = fn.size(1);
  const at::Tensor fb = fn.to(at::kBFloat16);
  const at::Tensor qb16 = symmetric ? fb : qn.to(at::kBFloat16);
  const at::Tensor rf_t = residual_norms(fn, fb);
  const at::Tensor rq_t = symmetric ? rf_t : residual_norms(qn, qb16);
  const float* rf = rf_t.const_data_ptr<float>();
  const float* rq = rq_t.const_data_ptr<float>();
  const float rf_max = n > 0 ? rf_t.max().item<float>() : 0.0f;
  const float* f32 = fn.const_data_ptr<float>();
  const float* q32 = qn.const_data_ptr<float>();

  std::vector<ScreenQuery> state(static_cast<size_t>(q));
  std::vector<ScreenTol> tols(static_cast<size_t>(q));
  const size_t cap0 = static_cast<size_t>(std::max<int64_t>(2 * k + 64, 128));
  for (int64_t r = 0; r < q; ++r) {
    state[r].pos.cap = state[r].neg.cap = cap0;
    tols[r] = screen_tol(d, rq[r]);
  }

  // pass 1: the bf16 tiles (mine_blocked's tiling and symmetric half)
  for_each_tile_row<at::BFloat16>(qb16, fb, symmetric,
                                  [&](int64_t r, const at::BFloat16* row, int64_t len, int64_t j0) {
    scan_screen(state[r], row, len, j0, labels + j0, qlabels[r], qindex[r] - j0, tols[r], rf, rf_max, k);
  });

  // the final bound of every list, then pass 2: exact rescoring, bucketed by blocks
  at::parallel_for(0, q, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (Screen* sc : {&state[r].pos, &state[r].neg}) {
        sc->settle(k, tols[r], rf_max);
        sc->filter(tols[r], rf);
      }
    }
  });
  constexpr int64_t kRescoreBlock = 512;
  const int64_t nbq = (q + kRescoreBlock - 1) / kRescoreBlock;
  const int64_t nbk = (n + kRescoreBlock - 1) / kRescoreBlock;
  std::vector<int64_t> count(static_cast<size_t>(nbq * nbk + 1), 0);
  for (int64_t r = 0; r < q; ++r) {
    for (const Screen* sc : {&state[r].pos, &state[r].neg}) {
      for (const Kept& c : sc->buf) ++count[(r / kRescoreBlock) * nbk + c.idx / kRescoreBlock + 1];
    }
  }
  for (size_t b = 1; b < count.size(); ++b) count[b] += count[b - 1];
  struct Pair {
    int32_t r;
    Kept* slot;
  };
  std::vector<Pair> pairs(static_cast<size_t>(count.back()));
  {
    std::vector<int64_t> fill(count.begin(), count.end() - 1);
    for (int64_t r = 0; r < q; ++r) {
      for (Screen* sc : {&state[r].pos, &state[r].neg}) {
        for (Kept& c : sc->buf) {
          pairs[fill[(r / kRescoreBlock) * nbk + c.idx / kRescoreBlock]++] = Pair{static_cast<int32_t>(r), &c};
        }
      }
    }
  }
  at::parallel_for(0, nbq * nbk, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t p = count[b]; p < count[b + 1]; ++p) {
        const Pair& pr = pairs[p];
        pr.slot->s = dot_avx512(q32 + static_cast<int64_t>(pr.r) * d, f32 + static_cast<int64_t>(pr.slot->idx) * d, d);
      }
    }
  });

  // pass 3: the k best exact values per list, ties to the lower index
  at::parallel_for(0, q, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int list = 0; list < 2; ++list) {
        std::vector<Kept>& buf = list == 0 ? state[r].pos.buf : state[r].neg.buf;
        const float sign = list == 0 ? 1.0f : -1.0f;
        // the neg list ranks by -exact; NaN cannot occur (NaN keys were never kept)
        auto before = [sign](const Kept& x, const Kept& y) {
          const float a = sign * x.s, b = sign * y.s;
          return a != b ? a > b : x.idx < y.idx;
        };
        const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(buf.size()));
        std::partial_sort(buf.begin(), buf.begin() + m, buf.end(), before);
        int64_t* oi = (list == 0 ? pos_idx : neg_idx) + r * k;
        float* os = (list == 0 ? pos_sim : neg_sim) + r * k;
        for (int64_t t = 0; t < m; ++t) {
          oi[t] = buf[t].idx;
          os[t] = buf[t].s;
        }
        for (int64_t t = m; t < k; ++t) {
          oi[t] = -1;
          os[t] = std::numeric_limits<float>::quiet_NaN();
        }
      }
    }
  });
}

// Whether to screen in bf16 (MSA_FAST_MINING_SCREEN=never | always | auto, the default).
// auto: fp32 math (not fp64), a CPU with native bf16 dot products (AVX512-BF16: without
// them oneDNN emulates bf16 and the screen is slower than the fp32 pass) and a similarity
// GEMM of at least 2^31 multiply-adds (MOSEI-sized: below that the fp32 pass takes a
// fraction of a second anyway). `always` still needs AVX-512 F/BW/VL (the scan and the
// exact dot product); the tests use it to compare the screened lists on small data. Both need
// row and label ids within int32.
bool use_screen(bool is_f64, int64_t q, int64_t n, int64_t d, bool symmetric) {
  if (is_f64 || d == 0 || n >= (int64_t{1} << 31) || !__builtin_cpu_supports("avx512f") ||
      !__builtin_cpu_supports("avx512bw") || !__builtin_cpu_supports("avx512vl")) {
    return false;
  }
  const char* env = std::getenv("MSA_FAST_MINING_SCREEN");
  if (env != nullptr && std::strcmp(env, "never") == 0) return false;
  if (env != nullptr && std::strcmp(env, "always") == 0) return true;
  const double macs = static_cast<double>(q) * static_cast<double>(n) * static_cast<double>(d) *
                      (symmetric ? 0.5 : 1.0);
  return __builtin_cpu_supports("avx512bf16") && macs >= 2147483648.0;
}

// Dense int32 ids of the labels (one id per distinct value among labels and query
// labels), so that 16 of them compare in one AVX-512 instruction.
std::pair<at::Tensor, at::Tensor> dense_labels(const at::Tensor& labels, const at::Tensor& qlabels) {
  const at::Tensor all = at::cat({labels, qlabels});
  const auto uniq = at::_unique2(all, /*sorted=*/true, /*return_inverse=*/true, /*return_counts=*/false);
  const at::Tensor inv = std::get<1>(uniq).to(at::kInt);
  return {inv.narrow(0, 0, labels.size(0)).contiguous(), inv.narrow(0, labels.size(0), qlabels.size(0)).contiguous()};
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

  if (use_screen(is_f64, q, n, features.size(1), same_rows)) {
    const auto ids = dense_labels(lab, qlab);
    mine_screened(fn, qn, same_rows, ids.first.const_data_ptr<int32_t>(), ids.second.const_data_ptr<int32_t>(),
                  qi.const_data_ptr<int64_t>(), k, pos_idx.data_ptr<int64_t>(), pos_sim.data_ptr<float>(),
                  neg_idx.data_ptr<int64_t>(), neg_sim.data_ptr<float>());
    return {pos_idx, pos_sim, neg_idx, neg_sim};
  }
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
