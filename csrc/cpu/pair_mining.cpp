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
//      (AVX-512). A key j is a candidate for query r's list when its bf16 similarity a
//      could still be among the k best exact ones: sign * a + tol(r, j, a) >= L, where
//      tol bounds |a - exact| rigorously (ScreenTol) and L is a lower bound on the list's
//      k-th best exact value: with T the k-th best sign * a so far (exact, a k-slot
//      vector minimum, see Screen), the k keys at or above T have exact values >=
//      T - max_j tol. A tile row's candidates are compressed into a local array and
//      absorbed after the row (T and L first, then the keys still passing L are kept), and
//      the kept buffer drops the keys a raised L excludes whenever it fills.
//   2. The survivors are rescored exactly -- an fp32 dot product of the two unit rows
//      (AVX-512) -- bucketed by (query block, key block) so that both blocks' rows are
//      cache-resident while their pairs are computed (~190 survivors a query at MOSEI's
//      size: in query order their key rows would stream 10 GB of random rows from memory).
//   3. Per query the k best exact values (ties to the lower index) are the output.
// A key the screen drops has exact < L <= the final k-th best, strictly: nothing the
// fp32 pass would output is lost, and the output differs from the fp32 path's only
// where the two fp32 roundings of one similarity (this dot product vs the GEMM's)
// order an exact tie differently. Measured (N = 16,326, D = 877, k = 50, random
// rows, 2 threads, instrumented): 0.85-0.9 s a call against the fp32 pass's 2.3 s; of it
// the bf16 GEMMs 0.30 s and the mirrored tiles' transposes 0.05 s, the scan and the
// top-k 0.25-0.3 s (an exact streaming top-k: ~243 + ~328 inserts a query, its
// theoretical k (1 + ln(n / k)) for keys in random order), the rescoring of ~186 keys a
// query 0.12 s, the final selection 0.045 s, bucketing 0.02 s, preparation 0.02 s.
// (Before, a sort-when-full buffer's nth_element, per-key branchy offers, serial bucketing
// and two N x D temporaries made it 1.05-1.4 s.) The assumption the bound rests on:
// ATen's bf16 mm accumulates in fp32 and rounds once (oneDNN's AVX512-BF16 kernels and
// ATen's fallback both do).
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

#include "avx512.h"
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

// One 8 x 8 block of 16-bit values: dst[c * ld_dst + r] = src[r * ld_src + c] (the classic
// three rounds of SSE2 unpacks: 16-, 32-, then 64-bit interleaves).
inline void transpose8x8_u16(const uint16_t* src, int64_t ld_src, uint16_t* dst, int64_t ld_dst) {
  __m128i a[8], b[8], c[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i * ld_src));
  for (int i = 0; i < 4; ++i) {
    b[2 * i] = _mm_unpacklo_epi16(a[2 * i], a[2 * i + 1]);
    b[2 * i + 1] = _mm_unpackhi_epi16(a[2 * i], a[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3 (h = 0) and 4-7 (h = 1)
    c[4 * h + 0] = _mm_unpacklo_epi32(b[4 * h + 0], b[4 * h + 2]);  // columns 0, 1
    c[4 * h + 1] = _mm_unpackhi_epi32(b[4 * h + 0], b[4 * h + 2]);  // columns 2, 3
    c[4 * h + 2] = _mm_unpacklo_epi32(b[4 * h + 1], b[4 * h + 3]);  // columns 4, 5
    c[4 * h + 3] = _mm_unpackhi_epi32(b[4 * h + 1], b[4 * h + 3]);  // columns 6, 7
  }
  for (int i = 0; i < 4; ++i) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * i) * ld_dst), _mm_unpacklo_epi64(c[i], c[4 + i]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (2 * i + 1) * ld_dst), _mm_unpackhi_epi64(c[i], c[4 + i]));
  }
}

// dst (cols x rows) = src (rows x cols)^T in 32 x 32 blocks (both sides' lines stay in L1),
// column strips across the threads; 16-bit values through 8 x 8 SSE2 blocks. ATen's
// copy_ of the transposed view ran on one thread: 0.05 s of MOSEI's call for its ~120
// mirrored tiles (measured), a scalar blocked loop on two 0.04 s.
template <typename T>
void transpose_into(const T* src, T* dst, int64_t rows, int64_t cols) {
  constexpr int64_t kT = 32;
  at::parallel_for(0, (cols + kT - 1) / kT, 4, [&](int64_t b0, int64_t b1) {
    for (int64_t c0 = b0 * kT; c0 < std::min(cols, b1 * kT); c0 += kT) {
      const int64_t c1 = std::min(cols, c0 + kT);
      for (int64_t r0 = 0; r0 < rows; r0 += kT) {
        const int64_t r1 = std::min(rows, r0 + kT);
        int64_t cv = c0, rv = r0;  // the part done in 8 x 8 blocks: [r0, rv) x [c0, cv)
        if constexpr (sizeof(T) == 2) {
          cv = c0 + (c1 - c0) / 8 * 8;
          rv = r0 + (r1 - r0) / 8 * 8;
          const uint16_t* s16 = reinterpret_cast<const uint16_t*>(src);
          uint16_t* d16 = reinterpret_cast<uint16_t*>(dst);
          for (int64_t c = c0; c < cv; c += 8) {
            for (int64_t r = r0; r < rv; r += 8) transpose8x8_u16(s16 + r * cols + c, cols, d16 + c * rows + r, rows);
          }
        }
        for (int64_t c = c0; c < c1; ++c) {
          for (int64_t r = (c < cv ? rv : r0); r < r1; ++r) dst[c * rows + r] = src[r * cols + c];
        }
      }
    }
  });
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
        T* dst = tile_t_buf.data_ptr<T>();
        transpose_into(s, dst, qb, kb);
        st = dst;
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
    const __mmask16 m = lanes(d - i);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// The next key row's lines, requested while the current dot product runs (the rows come
// from L3: measured 0.13 -> 0.115 s of rescoring at MOSEI's size).
inline void prefetch_row(const float* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(float)); off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
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
  float s;      // sign * a (pass 1), then sign * the exact similarity (passes 2, 3)
  int32_t idx;  // key row
};

// One list of one query in pass 1: T, the exact k-th best sign * a so far (-inf until k
// values are seen), kept in `top` -- k slots, the rest of the last 16-lane vector +inf, so
// that T is the minimum -- the bound L = T - tol(rf_max, |T|) derived from it, and the kept
// keys. A value above T replaces the minimum, and T is the new minimum: a few vector
// instructions for k <= 64, and T is never stale, so that no key is offered that an exact
// streaming top-k would not take (a sort-when-full buffer, measured here, spent 0.15 s of
// the 1.1 s call in nth_element and offered ~1,064 keys a query).
struct Screen {
  std::vector<float> top;
  std::vector<Kept> buf;
  float T = -std::numeric_limits<float>::infinity();
  float L = -std::numeric_limits<float>::infinity();
  size_t cap = 0;

  void reset(int64_t k, size_t cap0) {
    const int64_t slots = (k + 15) / 16 * 16;
    top.assign(static_cast<size_t>(slots), std::numeric_limits<float>::infinity());
    std::fill(top.begin(), top.begin() + k, -std::numeric_limits<float>::infinity());
    cap = cap0;
    buf.reserve(cap0);  // the buffer's size before its first filter: no regrowth until then
  }

  // s > T: s replaces one slot holding T, then T (and L) follow the new minimum.
  __attribute__((target("avx512f,avx512bw,avx512vl"))) void insert(float s, const ScreenTol& tol, float rf_max) {
    float* v = top.data();
    switch (top.size() / 16) {
      case 1: T = replace_min<1>(v, s); break;
      case 2: T = replace_min<2>(v, s); break;
      case 3: T = replace_min<3>(v, s); break;
      case 4: T = replace_min<4>(v, s); break;
      default: T = replace_min_any(v, static_cast<int64_t>(top.size()) / 16, s); break;
    }
    // the k keys at or above T have exact >= s - tol(s) >= T - tol(rf_max, |T|)
    // (x - rel |x| is increasing, so the smallest of them bounds all)
    if (T != -std::numeric_limits<float>::infinity()) L = std::max(L, T - tol.of(rf_max, std::fabs(T)));
  }

  // k <= 64: the slots as NV registers, one lane (the first holding T) replaced by a masked
  // move -- a scalar store into a vector just loaded back stalls store forwarding, which
  // made this 30 ns an insert -- and the new minimum.
  template <int NV>
  __attribute__((target("avx512f,avx512bw,avx512vl"))) float replace_min(float* v, float s) const {
    __m512 x[NV];
    uint64_t hit = 0;
    const __m512 vt = _mm512_set1_ps(T);
    for (int i = 0; i < NV; ++i) {
      x[i] = _mm512_loadu_ps(v + 16 * i);
      hit |= static_cast<uint64_t>(_mm512_cmpeq_ps_mask(x[i], vt)) << (16 * i);
    }
    const uint64_t one = hit & (~hit + 1);  // the lowest set bit: T is in the slots
    const __m512 vs = _mm512_set1_ps(s);
    __m512 mn = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    for (int i = 0; i < NV; ++i) {
      x[i] = _mm512_mask_mov_ps(x[i], static_cast<__mmask16>(one >> (16 * i)), vs);
      _mm512_storeu_ps(v + 16 * i, x[i]);
      mn = _mm512_min_ps(mn, x[i]);
    }
    return _mm512_reduce_min_ps(mn);
  }

  __attribute__((target("avx512f,avx512bw,avx512vl"))) float replace_min_any(float* v, int64_t nv, float s) const {
    *std::find(v, v + 16 * nv, T) = s;
    __m512 mn = _mm512_loadu_ps(v);
    for (int64_t i = 1; i < nv; ++i) mn = _mm512_min_ps(mn, _mm512_loadu_ps(v + 16 * i));
    return _mm512_reduce_min_ps(mn);
  }

  // One tile row's candidates (the keys the vector test admitted against the L the row
  // started with: sign * a, key row, tol): T and L first, then the candidates that still
  // pass the raised L are kept, and the buffer drops the keys a raised L excludes once it
  // fills. A whole row at a time, so that the branchy work is one short loop per list.
  void absorb(const float* s, const int32_t* idx, const float* t, int64_t n, const ScreenTol& tol,
              float rf_max, const float* rf) {
    if (n == 0) return;
    for (int64_t i = 0; i < n; ++i) {
      if (s[i] > T) insert(s[i], tol, rf_max);
    }
    for (int64_t i = 0; i < n; ++i) {
      if (s[i] + t[i] >= L) buf.push_back(Kept{s[i], idx[i]});
    }
    if (buf.size() >= cap) {
      filter(tol, rf);
      if (buf.size() * 2 > cap) cap *= 2;
    }
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

// Candidates of one tile row for one list; 16 slots of slack for the full-vector stores.
struct RowCands {
  alignas(64) float s[kBlock + 16];
  alignas(64) float t[kBlock + 16];
  alignas(64) int32_t idx[kBlock + 16];
  int64_t n = 0;

  // Appends the lanes of `m` (register compress, then one full-width store: Zen 4
  // microcodes the compress-to-memory form).
  __attribute__((target("avx512f,avx512bw,avx512vl"))) void add(__mmask16 m, __m512 sv, __m512 tv, __m512i iv) {
    _mm512_storeu_ps(s + n, _mm512_maskz_compress_ps(m, sv));
    _mm512_storeu_ps(t + n, _mm512_maskz_compress_ps(m, tv));
    _mm512_storeu_si512(idx + n, _mm512_maskz_compress_epi32(m, iv));
    n += __builtin_popcount(m);
  }
};

// Pass 1 for one query over keys j0 .. j0 + len - 1 (len <= kBlock): bf16 similarities
// `row`, dense int32 labels `lab`, the keys' residual norms `rf` (indexed by key row),
// `self` the query's own row relative to j0. The vector test runs against the L each list
// had when the row began; the row's candidates are then absorbed list by list.
__attribute__((target("avx512f,avx512bw,avx512vl"))) void scan_screen(ScreenQuery& sq, const at::BFloat16* row,
                                                    int64_t len, int64_t j0, const int32_t* lab,
                                                    int32_t ql, int64_t self, const ScreenTol& tol,
                                                    const float* rf, float rf_max) {
  RowCands pc, nc;
  const __m512i vql = _mm512_set1_epi32(ql);
  const __m512 vbase = _mm512_set1_ps(tol.base), vmul = _mm512_set1_ps(tol.mul),
               vrel = _mm512_set1_ps(tol.rel);
  const __m512 vlp = _mm512_set1_ps(sq.pos.L), vln = _mm512_set1_ps(sq.neg.L);
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(row);
  for (int64_t j = 0; j < len; j += 16) {
    const __mmask16 m = lanes(len - j);
    const __m512 a = bf16_to_f32(_mm256_maskz_loadu_epi16(m, raw + j));
    const __mmask16 same = _mm512_mask_cmpeq_epi32_mask(m, _mm512_maskz_loadu_epi32(m, lab + j), vql);
    const __m512 t = _mm512_fmadd_ps(vrel, _mm512_abs_ps(a),
                                     _mm512_fmadd_ps(vmul, _mm512_maskz_loadu_ps(m, rf + j0 + j), vbase));
    // NaN similarities (rows with NaN / inf entries) fail both ordered comparisons
    __mmask16 mp = same & _mm512_cmp_ps_mask(_mm512_add_ps(a, t), vlp, _CMP_GE_OQ);
    const __mmask16 mn = static_cast<__mmask16>(~same & m) &
                         _mm512_cmp_ps_mask(_mm512_sub_ps(t, a), vln, _CMP_GE_OQ);
    if ((mp | mn) == 0) continue;
    if (self >= j && self < j + 16) mp &= static_cast<__mmask16>(~(1u << (self - j)));
    const __m512i iv = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(j0 + j)), iota);
    if (mp) pc.add(mp, a, t, iv);
    if (mn) nc.add(mn, _mm512_sub_ps(_mm512_setzero_ps(), a), t, iv);
  }
  sq.pos.absorb(pc.s, pc.idx, pc.t, pc.n, tol, rf_max, rf);
  sq.neg.absorb(nc.s, nc.idx, nc.t, nc.n, tol, rf_max, rf);
}

// |x - float(bf16(x))| per row: the rows' rounding residual norms, rounded up (the 1e-4
// covers the fp32 sum of D squares). One fused pass over both copies: the tensor
// expression allocated two N x D fp32 temporaries (~40 ms of MOSEI's call in page faults
// and passes).
__attribute__((target("avx512f,avx512bw,avx512vl"))) float residual_norm(const float* a, const uint16_t* b,
                                                                       int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = lanes(d - i);
    const __m512 e = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, a + i), bf16_to_f32(_mm256_maskz_loadu_epi16(m, b + i)));
    acc = _mm512_fmadd_ps(e, e, acc);
  }
  return std::sqrt(_mm512_reduce_add_ps(acc)) * (1.0f + 1e-4f);
}

at::Tensor residual_norms(const at::Tensor& x32, const at::Tensor& x16) {
  const int64_t n = x32.size(0), d = x32.size(1);
  at::Tensor out = at::empty({n}, x32.options());
  const float* a = x32.const_data_ptr<float>();
  const uint16_t* b = reinterpret_cast<const uint16_t*>(x16.const_data_ptr<at::BFloat16>());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) o[r] = residual_norm(a + r * d, b + r * d, d);
  });
  return out;
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
    state[r].pos.reset(k, cap0);
    state[r].neg.reset(k, cap0);
    tols[r] = screen_tol(d, rq[r]);
  }

  // pass 1: the bf16 tiles (mine_blocked's tiling and symmetric half)
  for_each_tile_row<at::BFloat16>(qb16, fb, symmetric,
                                  [&](int64_t r, const at::BFloat16* row, int64_t len, int64_t j0) {
    scan_screen(state[r], row, len, j0, labels + j0, qlabels[r], qindex[r] - j0, tols[r], rf, rf_max);
  });

  // Passes 2 and 3 per block of kRescoreBlock queries, in parallel over the blocks: each
  // list's final bound, then the exact rescoring in (query block, key block) order so that
  // both blocks' rows are cache-resident while their pairs are computed, then the
  // selection, while the block's lists are still in cache. A list's kept keys are in
  // increasing key order (keys reach a query in increasing order and the filters keep it),
  // so one cursor per list walks them key block by key block: no pair array to sort (a
  // counting sort of the ~3 M pairs, its 48 MB faulted in at every call, took 0.07 s of
  // MOSEI's call).
  constexpr int64_t kRescoreBlock = 512;
  const int64_t nbq = (q + kRescoreBlock - 1) / kRescoreBlock;
  const int64_t nbk = (n + kRescoreBlock - 1) / kRescoreBlock;
  at::parallel_for(0, nbq, 1, [&](int64_t b0, int64_t b1) {
    std::vector<size_t> cursor;
    for (int64_t qb = b0; qb < b1; ++qb) {
      const int64_t r0 = qb * kRescoreBlock, r1 = std::min(q, r0 + kRescoreBlock);
      for (int64_t r = r0; r < r1; ++r) {
        for (Screen* sc : {&state[r].pos, &state[r].neg}) sc->filter(tols[r], rf);
      }
      cursor.assign(static_cast<size_t>(2 * (r1 - r0)), 0);
      for (int64_t kb = 0; kb < nbk; ++kb) {
        const int64_t end = std::min(n, (kb + 1) * kRescoreBlock);
        for (int64_t r = r0; r < r1; ++r) {
          for (int list = 0; list < 2; ++list) {
            std::vector<Kept>& buf = list == 0 ? state[r].pos.buf : state[r].neg.buf;
            const float sign = list == 0 ? 1.0f : -1.0f;  // s holds sign * exact, as it held sign * a
            size_t& c = cursor[static_cast<size_t>(2 * (r - r0) + list)];
            for (; c < buf.size() && buf[c].idx < end; ++c) {
              if (c + 1 < buf.size()) prefetch_row(f32 + static_cast<int64_t>(buf[c + 1].idx) * d, d);
              buf[c].s = sign * dot_avx512(q32 + r * d, f32 + static_cast<int64_t>(buf[c].idx) * d, d);
            }
          }
        }
      }
      // pass 3: the k best sign * exact values per list, ties to the lower index (NaN
      // cannot occur: NaN keys were never kept)
      for (int64_t r = r0; r < r1; ++r) {
        for (int list = 0; list < 2; ++list) {
          std::vector<Kept>& buf = list == 0 ? state[r].pos.buf : state[r].neg.buf;
          const float sign = list == 0 ? 1.0f : -1.0f;
          auto before = [](const Kept& x, const Kept& y) { return x.s != y.s ? x.s > y.s : x.idx < y.idx; };
          const int64_t m = std::min<int64_t>(k, static_cast<int64_t>(buf.size()));
          if (m < static_cast<int64_t>(buf.size())) std::nth_element(buf.begin(), buf.begin() + m, buf.end(), before);
          std::sort(buf.begin(), buf.begin() + m, before);
          int64_t* oi = (list == 0 ? pos_idx : neg_idx) + r * k;
          float* os = (list == 0 ? pos_sim : neg_sim) + r * k;
          for (int64_t t = 0; t < m; ++t) {
            oi[t] = buf[t].idx;
            os[t] = sign * buf[t].s;
          }
          for (int64_t t = m; t < k; ++t) {
            oi[t] = -1;
            os[t] = std::numeric_limits<float>::quiet_NaN();
          }
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
