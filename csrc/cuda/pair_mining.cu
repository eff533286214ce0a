// CUDA kernel of msa_fast::mine_pairs (contract §3.4, FD-CMDIE eq. 7-8): a tiled
// normalised GEMM whose epilogue feeds a per-row running top-k.
//
//   sim(i, j) = (<q_i, f_j> * inv_q[i]) * inv_f[j],   inv_x[r] = 1 / |x_r|  (0 for a zero row)
//   pos_i = the k rows j with labels[j] == query_labels[i], j != query_index[i],
//           of largest sim, sorted descending;
//   neg_i = the k rows j with labels[j] != query_labels[i] of smallest sim,
//           sorted ascending;
//   ties go to the lower j; fewer than k candidates: -1 / NaN; a NaN similarity (a
//   query or key row with a NaN / inf entry) is never a candidate.
//
// Shapes: features (N, D), labels (N,) int64, queries (Q, D), query_labels (Q,)
// int64, query_index (Q,) int64 in [-1, N), 1 <= k <= 64. Outputs (Q, k): int64
// indices and similarities in fp32 (fp64 for fp64 inputs), like the reference.
//
// D is padded to a multiple of 8 by the wrapper (see mine_pairs_cuda).
// Tiling. One block of 8 warps owns kBQ = 32 query rows and streams the keys in
// tiles of kBN = 64 rows. Per tile:
//   1. GEMM: the raw (un-normalised) dot products of the 32 x 64 tile, D staged
//      through shared memory in chunks of kBK columns (zero padded past Q, N, D):
//      - fp16 / bf16: WMMA m16n16k16 on tensor cores, fp32 accumulation, one
//        16 x 16 fragment per warp, kBK = 64;
//      - fp32 / fp64: SIMT, one IEEE fma per term (no TF32: the result must agree
//        with the fp32 reference to rounding), a 2 x 4 register tile per thread,
//        kBK = 32.
//      The raw tile goes to shared memory (fp32 / fp64, kBQ x kBN).
//   2. Epilogue and selection: warp w owns the rows 4w .. 4w+3 of the block; lane
//      l takes keys j0 + l and j0 + 32 + l, scales the dot product by the two
//      precomputed inverse norms, applies the label and self tests and offers
//      the candidate to the row's two lists (WarpTopK).
// Key splits. With few queries (a batch mined against a memory bank) Q / 32
// blocks cannot fill the GPU, so blockIdx.y also splits the keys into S ranges
// of whole tiles, S ~ 2 x SMs / (Q / 32) (at least 4 tiles per range). Each
// (query block, range) keeps the exact top-k of its range in an (S, Q, k)
// buffer, and a second kernel merges the S lists of each row with the same
// WarpTopK. The k best of a union are among the k best of its parts and the
// order is a strict total order, so the result is identical for every S.
// MSA_FAST_MINE_PAIRS_SPLITS=S (> 0) forces S, for tests and benchmarks.
// Memory: the inputs, N + Q inverse norms and the (Q, k) outputs -- O((Q + N) D
// + Q k) -- plus 21-42 KiB of shared memory per block and, when S > 1, the
// (S, Q, k) partial lists, S Q <= Q + 64 x SMs for the automatic S; the Q x N matrix
// never exists.
//
// Numeric choices.
//   - Normalising in the epilogue, rather than the rows beforehand, keeps fp16 /
//     bf16 products exact: a product of two 11-bit (fp16) or 8-bit (bf16)
//     significands fits the 24 bits of fp32, so the only difference from the
//     reference (promote to fp32, normalise, fp32 GEMM) is rounding of the fp32
//     sums and of the two scalings, ~1e-7 relative -- not bf16's 4e-3. It also
//     saves the N x D normalised copy. Rows whose squared norm overflows the
//     accumulation dtype are out of range, as in the reference.
//   - The inverse norms are ATen's (linalg_vector_norm in fp32 / fp64, the
//     reference's op), computed once per call: a zero row gets 0, so it has
//     similarity exactly 0 to everything.
//   - Every similarity is computed by the same sequence of operations whatever
//     the position of its key in a tile or split, so identical rows tie exactly
//     (given equal norms: ATen may round the norms of identical rows at
//     different addresses differently, as it does for the reference) and the
//     lower-index rule decides them.
//   - fp64 inputs take the SIMT path in fp64 (the reference computes in fp64).
#include <ATen/ATen.h>

#include "pair_mining.h"
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>

namespace msa_fast {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kBQ = 32;                      // query rows per block
constexpr int kRowsPerWarp = kBQ / kWarps;   // lists per warp, kept in registers
constexpr int kBN = 64;                      // keys per tile: two per lane in the selection
constexpr int kLdS = kBN + 4;                // +4 words: the WMMA / SIMT stores of a row
                                             // block fall on different banks
constexpr int kMaxK = 64;                    // two list slots per lane
// __launch_bounds__(kThreads, 1): at least one block per SM, so ptxas may give a
// thread up to 255 registers. Without the minimum it capped sm_120 at 128 and the
// fp64 lists spilled (the compile gate requires no spill).
constexpr unsigned kFull = 0xffffffffu;
static_assert(kBQ % kWarps == 0 && kBN == 64, "the selection takes two keys per lane");

template <typename T>
__device__ __forceinline__ T quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// "a is output before b": larger (pos) / smaller (neg) similarity, then lower index.
// A strict total order on (sim, index) pairs with distinct indices, so the k best
// candidates do not depend on the order in which they are offered.
template <bool kLargest, typename T>
__device__ __forceinline__ bool ranks_before(T as, int ai, T bs, int bi) {
  if (as != bs) return kLargest ? as > bs : as < bs;
  return ai < bi;
}

// One query row's sorted top-k list, spread over a warp: lane l holds slots l
// (s0, i0) and l + 32 (s1, i1). Every member is called by all 32 lanes with
// warp-uniform arguments unless stated otherwise; `size` and the cached worst
// entry are warp-uniform. tests/test_pair_mining_cuda.py emulates this struct
// lane by lane (_WarpTopKEmu): keep the two in step.
template <typename T, bool kLargest>
struct WarpTopK {
  T s0, s1;
  int i0, i1;
  int size, k;
  T worst_s;  // slot k - 1, valid once size == k
  int worst_i;

  __device__ __forceinline__ void init(int k_) {
    k = k_;
    size = 0;
    s0 = s1 = T(0);
    i0 = i1 = -1;
    worst_s = T(0);
    worst_i = -1;
  }

  // Whether (s, i) would enter the list (per lane).
  __device__ __forceinline__ bool admits(T s, int i) const {
    return size < k || ranks_before<kLargest>(s, i, worst_s, worst_i);
  }

  // Inserts (cs, ci), known to be admitted, at its sorted position p: slots
  // before p keep their entry, slots after p take their predecessor's.
  __device__ __forceinline__ void insert(T cs, int ci, int lane) {
    const bool b0 = lane < size && ranks_before<kLargest>(s0, i0, cs, ci);
    const bool b1 = lane + 32 < size && ranks_before<kLargest>(s1, i1, cs, ci);
    // The valid prefix is sorted, so the entries ranking before cs are slots 0 .. p-1.
    const int p = __popc(__ballot_sync(kFull, b0)) + __popc(__ballot_sync(kFull, b1));
    T prev_s0 = __shfl_up_sync(kFull, s0, 1);  // slot lane - 1
    int prev_i0 = __shfl_up_sync(kFull, i0, 1);
    T prev_s1 = __shfl_up_sync(kFull, s1, 1);  // slot lane + 31
    int prev_i1 = __shfl_up_sync(kFull, i1, 1);
    const T s31 = __shfl_sync(kFull, s0, 31);
    const int i31 = __shfl_sync(kFull, i0, 31);
    if (lane == 0) {  // slot 32's predecessor is slot 31, in the other register
      prev_s1 = s31;
      prev_i1 = i31;
    }
    if (lane > p) {
      s0 = prev_s0;
      i0 = prev_i0;
    } else if (lane == p) {
      s0 = cs;
      i0 = ci;
    }
    if (lane + 32 > p) {
      s1 = prev_s1;
      i1 = prev_i1;
    } else if (lane + 32 == p) {
      s1 = cs;
      i1 = ci;
    }
    size = min(size + 1, k);
    if (size == k) {
      const int src = (k - 1) & 31;
      const T a = __shfl_sync(kFull, s0, src);
      const T b = __shfl_sync(kFull, s1, src);
      const int ia = __shfl_sync(kFull, i0, src);
      const int ib = __shfl_sync(kFull, i1, src);
      worst_s = k - 1 < 32 ? a : b;
      worst_i = k - 1 < 32 ? ia : ib;
    }
  }

  // Lane l offers key `key` with similarity v when `ok` (per lane). The ballot
  // filters against the k-th entry in one step; the few survivors are inserted
  // one at a time, lowest lane first.
  __device__ __forceinline__ void offer(bool ok, T v, int key, int lane) {
    unsigned mask = __ballot_sync(kFull, ok && admits(v, key));
    while (mask) {
      const int src = __ffs(mask) - 1;
      mask &= mask - 1;
      const T cs = __shfl_sync(kFull, v, src);
      const int ci = __shfl_sync(kFull, key, src);
      if (admits(cs, ci)) insert(cs, ci, lane);  // re-check: the list improved meanwhile
    }
  }

  // Writes slots 0 .. k-1 of one output row, -1 / NaN past `size` (per lane).
  __device__ __forceinline__ void write(int64_t* idx, T* sim, int lane) const {
    const T nan = quiet_nan<T>();
    if (lane < k) {
      idx[lane] = lane < size ? i0 : -1;
      sim[lane] = lane < size ? s0 : nan;
    }
    if (lane + 32 < k) {
      idx[lane + 32] = lane + 32 < size ? i1 : -1;
      sim[lane + 32] = lane + 32 < size ? s1 : nan;
    }
  }
};

// Copies rows r0 .. r0 + kRows - 1, columns c0 .. c0 + kBK - 1 of a row-major
// (rows_total, d) matrix into dst (row stride kLd), zeros outside the matrix:
// zero columns add exactly nothing to a dot product, zero rows are never selected
// (their keys / queries are masked). Consecutive threads read consecutive
// columns (coalesced). kVec: 16-byte loads of kVecElems elements, for d a
// multiple of kVecElems and 16-byte aligned bases.
template <int kRows, int kBK, int kLd, bool kVec, typename E>
__device__ __forceinline__ void stage(E* __restrict__ dst, const E* __restrict__ src, int r0,
                                      int rows_total, int c0, int d) {
  if constexpr (kVec) {
    constexpr int kVecElems = 16 / sizeof(E);
    constexpr int kPerRow = kBK / kVecElems;
    static_assert(kBK % kVecElems == 0 && (kLd * sizeof(E)) % 16 == 0, "16-byte rows");
    for (int e = threadIdx.x; e < kRows * kPerRow; e += kThreads) {
      const int r = e / kPerRow, c = (e % kPerRow) * kVecElems;
      const int gr = r0 + r, gc = c0 + c;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      // d % kVecElems == 0 and gc % kVecElems == 0: the vector is all in or all out.
      if (gr < rows_total && gc < d) {
        v = *reinterpret_cast<const uint4*>(src + static_cast<int64_t>(gr) * d + gc);
      }
      *reinterpret_cast<uint4*>(dst + r * kLd + c) = v;
    }
  } else {
    for (int e = threadIdx.x; e < kRows * kBK; e += kThreads) {
      const int r = e / kBK, c = e % kBK;
      const int gr = r0 + r, gc = c0 + c;
      dst[r * kLd + c] = (gr < rows_total && gc < d) ? src[static_cast<int64_t>(gr) * d + gc] : E(0);
    }
  }
}

// fp16 / bf16 tile: tensor cores (WMMA m16n16k16), fp32 accumulation. The inputs
// travel as raw 16-bit words (unsigned short) and are only reinterpreted as
// T16 by the WMMA loads: staging needs no half arithmetic or conversion.
template <typename T16, bool kVec>
struct MmaTile {
  using in_t = unsigned short;
  using acc_t = float;
  static constexpr int kBK = 64;
  // +8 elements: 144-byte rows keep the 16-byte (uint4) and 32-byte (WMMA)
  // alignment, and the 8 rows an ldmatrix phase reads start on 8 different
  // 4-bank groups (conflict-free).
  static constexpr int kLd = kBK + 8;
  static_assert((kBQ / 16) * (kBN / 16) == kWarps, "one 16 x 16 fragment per warp");

  struct Smem {
    alignas(128) unsigned short a[kBQ * kLd];
    alignas(128) unsigned short b[kBN * kLd];
  };

  // s_tile[r][c] = <queries[row0 + r], features[j0 + c]> (raw), then a barrier.
  static __device__ __forceinline__ void run(Smem& sm, float (*s_tile)[kLdS],
                                             const in_t* __restrict__ qp,
                                             const in_t* __restrict__ fp, int row0, int j0,
                                             int q, int n, int d) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32;
    const int fr = warp / (kBN / 16);  // fragment row block: queries 16 fr ..
    const int fc = warp % (kBN / 16);  // fragment column block: keys j0 + 16 fc ..
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    const T16* a_s = reinterpret_cast<const T16*>(sm.a);
    const T16* b_s = reinterpret_cast<const T16*>(sm.b);
    for (int c0 = 0; c0 < d; c0 += kBK) {
      stage<kBQ, kBK, kLd, kVec>(sm.a, qp, row0, q, c0, d);
      stage<kBN, kBK, kLd, kVec>(sm.b, fp, j0, n, c0, d);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        // A = 16 query rows x 16 columns (row major); B = K^T, i.e. 16 key rows
        // read as a column-major 16 x 16 matrix, so no transpose is staged.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T16, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T16, wmma::col_major> b;
        wmma::load_matrix_sync(a, a_s + fr * 16 * kLd + kk, kLd);
        wmma::load_matrix_sync(b, b_s + fc * 16 * kLd + kk, kLd);
        wmma::mma_sync(acc, a, b, acc);
      }
      __syncthreads();  // the next chunk overwrites sm
    }
    wmma::store_matrix_sync(&s_tile[fr * 16][fc * 16], acc, kLdS, wmma::mem_row_major);
    __syncthreads();
  }
};

// fp32 / fp64 tile: SIMT with one correctly rounded fma per term, in increasing
// column order for every output, so the result does not depend on the key's
// position in the tile.
template <typename T>
struct SimtTile {
  using in_t = T;
  using acc_t = T;
  static constexpr int kBK = 32;
  // +1 element: the 16 key rows a half-warp reads at one column, and the 2 query
  // rows, fall on different banks.
  static constexpr int kLd = kBK + 1;
  static_assert(kThreads == (kBQ / 2) * (kBN / 4), "a 2 x 4 register tile per thread");

  struct Smem {
    T a[kBQ * kLd];
    T b[kBN * kLd];
  };

  static __device__ __forceinline__ void run(Smem& sm, T (*s_tile)[kLdS],
                                             const in_t* __restrict__ qp,
                                             const in_t* __restrict__ fp, int row0, int j0,
                                             int q, int n, int d) {
    // Thread t computes rows 2 (t / 16) + {0, 1} and columns t % 16 + 16 m,
    // m = 0 .. 3: 2 + 4 shared loads per 8 fmas.
    const int tr = threadIdx.x / 16;
    const int tc = threadIdx.x % 16;
    T acc[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int m = 0; m < 4; ++m) acc[i][m] = T(0);
    }
    for (int c0 = 0; c0 < d; c0 += kBK) {
      stage<kBQ, kBK, kLd, false>(sm.a, qp, row0, q, c0, d);
      stage<kBN, kBK, kLd, false>(sm.b, fp, j0, n, c0, d);
      __syncthreads();
#pragma unroll 8
      for (int kk = 0; kk < kBK; ++kk) {
        const T a0 = sm.a[(2 * tr) * kLd + kk];
        const T a1 = sm.a[(2 * tr + 1) * kLd + kk];
#pragma unroll
        for (int m = 0; m < 4; ++m) {
          const T b = sm.b[(tc + 16 * m) * kLd + kk];
          acc[0][m] = fma_rn(a0, b, acc[0][m]);
          acc[1][m] = fma_rn(a1, b, acc[1][m]);
        }
      }
      __syncthreads();  // the next chunk overwrites sm
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int m = 0; m < 4; ++m) s_tile[2 * tr + i][tc + 16 * m] = acc[i][m];
    }
    __syncthreads();
  }
};

template <typename Tile>
__global__ void __launch_bounds__(kThreads, 1)
mine_pairs_kernel(const typename Tile::in_t* __restrict__ feats,
                  const typename Tile::in_t* __restrict__ queries,
                  const typename Tile::acc_t* __restrict__ inv_f,
                  const typename Tile::acc_t* __restrict__ inv_q,
                  const int64_t* __restrict__ labels, const int64_t* __restrict__ qlabels,
                  const int64_t* __restrict__ qindex, int n, int q, int d, int k,
                  int tiles_per_split, int64_t* __restrict__ pos_idx,
                  typename Tile::acc_t* __restrict__ pos_sim, int64_t* __restrict__ neg_idx,
                  typename Tile::acc_t* __restrict__ neg_sim) {
  using T = typename Tile::acc_t;
  __shared__ typename Tile::Smem sm;
  __shared__ __align__(128) T s_tile[kBQ][kLdS];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row0 = blockIdx.x * kBQ;
  // This block's keys [j_begin, j_end): whole tiles, so no tile straddles two ranges.
  const int64_t span = static_cast<int64_t>(tiles_per_split) * kBN;
  const int j_begin = static_cast<int>(blockIdx.y * span);
  const int j_end = static_cast<int>(min(static_cast<int64_t>(n), j_begin + span));

  // The warp's rows; out-of-range rows (last block) still take part in the GEMM
  // and the barriers but never select. Everything here is warp-uniform.
  bool active[kRowsPerWarp];
  int64_t ql[kRowsPerWarp];
  int self[kRowsPerWarp];
  T iq[kRowsPerWarp];
  WarpTopK<T, true> pos[kRowsPerWarp];
  WarpTopK<T, false> neg[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int row = row0 + warp * kRowsPerWarp + r;
    active[r] = row < q;
    ql[r] = active[r] ? qlabels[row] : 0;
    self[r] = active[r] ? static_cast<int>(qindex[row]) : -1;
    iq[r] = active[r] ? inv_q[row] : T(0);
    pos[r].init(k);
    neg[r].init(k);
  }

  for (int j0 = j_begin; j0 < j_end; j0 += kBN) {
    // The lane's two keys, loaded before the GEMM so that the loads overlap it.
    int key[2];
    bool valid[2];
    int64_t lab[2];
    T inv[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      key[h] = j0 + lane + 32 * h;
      valid[h] = key[h] < j_end;
      lab[h] = valid[h] ? labels[key[h]] : 0;
      inv[h] = valid[h] ? inv_f[key[h]] : T(0);
    }

    Tile::run(sm, s_tile, queries, feats, row0, j0, q, n, d);

#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      if (!active[r]) continue;
      const int lr = warp * kRowsPerWarp + r;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // Same association for every (row, key): identical rows tie exactly.
        const T v = (s_tile[lr][lane + 32 * h] * iq[r]) * inv[h];
        // NaN: the query or the key row has a NaN / inf entry, so no valid similarity
        // (never mined, never mining). Not filtered, it would fill a list that is not full.
        const bool same = valid[h] && lab[h] == ql[r] && !isnan(v);
        pos[r].offer(same && key[h] != self[r], v, key[h], lane);
        neg[r].offer(valid[h] && lab[h] != ql[r] && !isnan(v), v, key[h], lane);
      }
    }
    // s_tile and sm are rewritten by the next tile (also when d == 0, where
    // Tile::run's chunk loop has no barrier of its own).
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    if (!active[r]) continue;
    // Row `row` of split blockIdx.y in an (S, Q, k) buffer; S = 1: the outputs.
    const int64_t row = row0 + warp * kRowsPerWarp + r;
    const int64_t off = (static_cast<int64_t>(blockIdx.y) * q + row) * k;
    pos[r].write(pos_idx + off, pos_sim + off, lane);
    neg[r].write(neg_idx + off, neg_sim + off, lane);
  }
}

// Merges the S partial lists (S, Q, k) of each row into the (Q, k) output: one
// warp per row offers the S k entries, 32 at a time, to a fresh WarpTopK.
template <typename T, bool kLargest>
__global__ void __launch_bounds__(kThreads, 1)
merge_splits_kernel(const int64_t* __restrict__ part_idx, const T* __restrict__ part_sim,
                    int splits, int q, int k, int64_t* __restrict__ out_idx,
                    T* __restrict__ out_sim) {
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * kWarps + threadIdx.x / 32;
  if (row >= q) return;  // a whole warp: no block-wide barrier in this kernel
  WarpTopK<T, kLargest> list;
  list.init(k);
  for (int s = 0; s < splits; ++s) {
    const int64_t base = (static_cast<int64_t>(s) * q + row) * k;
    for (int t = 0; t < k; t += 32) {
      const int slot = t + lane;
      const int64_t idx = slot < k ? part_idx[base + slot] : -1;
      const T v = idx >= 0 ? part_sim[base + slot] : T(0);
      list.offer(idx >= 0, v, static_cast<int>(idx), lane);
    }
  }
  const int64_t off = static_cast<int64_t>(row) * k;
  list.write(out_idx + off, out_sim + off, lane);
}

// Number of key ranges (see "Key splits"): enough (query block, range) blocks
// for two resident blocks per SM, each range at least kMinTilesPerSplit tiles so
// that the merge stays small next to the mining.
constexpr int64_t kMinTilesPerSplit = 4;

int64_t choose_splits(int64_t q, int64_t n) {
  const int64_t ntiles = (n + kBN - 1) / kBN;
  if (ntiles <= 1) return 1;
  int64_t want = 0;
  if (const char* env = std::getenv("MSA_FAST_MINE_PAIRS_SPLITS")) {
    want = std::max<int64_t>(0, std::atoll(env));
  }
  if (want == 0) {
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t qblocks = (q + kBQ - 1) / kBQ;
    want = std::min((2 * sms + qblocks - 1) / qblocks,
                    std::max<int64_t>(1, ntiles / kMinTilesPerSplit));
  }
  // gridDim.y is at most 65535.
  return std::clamp<int64_t>(want, 1, std::min<int64_t>(ntiles, 65535));
}

// 1 / |x_r| per row in `dtype` (0 for a zero row), with the reference's norm op.
at::Tensor inverse_norms(const at::Tensor& x, at::ScalarType dtype) {
  const auto norm = at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, /*keepdim=*/false, dtype);
  return at::where(norm > 0, norm.reciprocal(), at::zeros_like(norm)).contiguous();
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<std::uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

template <typename Tile>
void launch(const at::Tensor& f, const at::Tensor& qs, const at::Tensor& inv_f,
            const at::Tensor& inv_q, const at::Tensor& lab, const at::Tensor& qlab,
            const at::Tensor& qi, int64_t k, at::Tensor& pos_idx, at::Tensor& pos_sim,
            at::Tensor& neg_idx, at::Tensor& neg_sim) {
  using in_t = typename Tile::in_t;
  using acc_t = typename Tile::acc_t;
  const int64_t n = f.size(0);
  const int64_t q = qs.size(0);
  const int64_t ntiles = (n + kBN - 1) / kBN;
  int64_t splits = choose_splits(q, n);
  const int64_t tiles_per_split = std::max<int64_t>(1, (ntiles + splits - 1) / splits);
  // Rounding tiles_per_split up may leave trailing ranges empty: drop them.
  splits = std::max<int64_t>(1, (ntiles + tiles_per_split - 1) / tiles_per_split);
  auto stream = at::cuda::getCurrentCUDAStream();

  at::Tensor p_idx = pos_idx, p_sim = pos_sim, n_idx = neg_idx, n_sim = neg_sim;
  if (splits > 1) {
    p_idx = at::empty({splits, q, k}, pos_idx.options());
    n_idx = at::empty({splits, q, k}, neg_idx.options());
    p_sim = at::empty({splits, q, k}, pos_sim.options());
    n_sim = at::empty({splits, q, k}, neg_sim.options());
  }
  const dim3 grid(static_cast<unsigned>((q + kBQ - 1) / kBQ), static_cast<unsigned>(splits));
  mine_pairs_kernel<Tile><<<grid, kThreads, 0, stream>>>(
      static_cast<const in_t*>(f.const_data_ptr()), static_cast<const in_t*>(qs.const_data_ptr()),
      inv_f.const_data_ptr<acc_t>(), inv_q.const_data_ptr<acc_t>(), lab.const_data_ptr<int64_t>(),
      qlab.const_data_ptr<int64_t>(), qi.const_data_ptr<int64_t>(), static_cast<int>(n),
      static_cast<int>(q), static_cast<int>(f.size(1)), static_cast<int>(k),
      static_cast<int>(tiles_per_split), p_idx.data_ptr<int64_t>(), p_sim.data_ptr<acc_t>(),
      n_idx.data_ptr<int64_t>(), n_sim.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits == 1) return;
  const dim3 mgrid(static_cast<unsigned>((q + kWarps - 1) / kWarps));
  merge_splits_kernel<acc_t, true><<<mgrid, kThreads, 0, stream>>>(
      p_idx.const_data_ptr<int64_t>(), p_sim.const_data_ptr<acc_t>(), static_cast<int>(splits),
      static_cast<int>(q), static_cast<int>(k), pos_idx.data_ptr<int64_t>(),
      pos_sim.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  merge_splits_kernel<acc_t, false><<<mgrid, kThreads, 0, stream>>>(
      n_idx.const_data_ptr<int64_t>(), n_sim.const_data_ptr<acc_t>(), static_cast<int>(splits),
      static_cast<int>(q), static_cast<int>(k), neg_idx.data_ptr<int64_t>(),
      neg_sim.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T16>
void launch_mma(bool vec, const at::Tensor& f, const at::Tensor& qs, const at::Tensor& inv_f,
                const at::Tensor& inv_q, const at::Tensor& lab, const at::Tensor& qlab,
                const at::Tensor& qi, int64_t k, at::Tensor& pos_idx, at::Tensor& pos_sim,
                at::Tensor& neg_idx, at::Tensor& neg_sim) {
  if (vec) {
    launch<MmaTile<T16, true>>(f, qs, inv_f, inv_q, lab, qlab, qi, k, pos_idx, pos_sim, neg_idx,
                               neg_sim);
  } else {
    launch<MmaTile<T16, false>>(f, qs, inv_f, inv_q, lab, qlab, qi, k, pos_idx, pos_sim, neg_idx,
                                neg_sim);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mine_pairs_cuda(
    const at::Tensor& features, const at::Tensor& labels, const at::Tensor& queries,
    const at::Tensor& query_labels, const at::Tensor& query_index, int64_t k) {
  check_mine_pairs_args(features, labels, queries, query_labels, query_index);
  const int64_t n = features.size(0);
  const int64_t d = features.size(1);
  const int64_t q = queries.size(0);
  TORCH_CHECK(k >= 1 && k <= kMaxK, "mine_pairs: k: the cuda kernel supports 1 <= k <= ", kMaxK,
              ", got ", k, " (use backend='eager' or 'triton' for larger k)");
  TORCH_CHECK(n < std::numeric_limits<int>::max() - kBN &&
                  q < std::numeric_limits<int>::max() - kBQ && d < std::numeric_limits<int>::max(),
              "mine_pairs: cuda kernel: N, Q and D must fit in int32, got N=", n, " Q=", q,
              " D=", d);
  for (const at::Tensor* t : {&labels, &queries, &query_labels, &query_index}) {
    TORCH_CHECK(t->device() == features.device(),
                "mine_pairs (cuda kernel): expected every tensor on ", features.device(), ", got ",
                t->device());
  }
  TORCH_CHECK(features.is_cuda(), "mine_pairs (cuda kernel): expected CUDA tensors, got ",
              features.device());
  const auto in_dtype = features.scalar_type();
  TORCH_CHECK(in_dtype == at::kHalf || in_dtype == at::kBFloat16 || in_dtype == at::kFloat ||
                  in_dtype == at::kDouble,
              "mine_pairs (cuda kernel): features: expected float16, bfloat16, float32 or "
              "float64, got ",
              in_dtype);

  const c10::cuda::CUDAGuard guard(features.device());
  const auto acc_dtype = in_dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto pos_idx = at::empty({q, k}, features.options().dtype(at::kLong));
  auto neg_idx = at::empty({q, k}, features.options().dtype(at::kLong));
  auto pos_sim = at::empty({q, k}, features.options().dtype(acc_dtype));
  auto neg_sim = at::empty({q, k}, features.options().dtype(acc_dtype));
  if (q == 0) return {pos_idx, pos_sim, neg_idx, neg_sim};

  const auto qi = query_index.contiguous();
  check_query_index_range(qi, n);  // one host sync

  // The default call passes the features as the queries: one set of norms.
  const bool same_rows = same_storage_rows(queries, features);
  // D is padded with zero columns to a multiple of 8 (zeros add exactly nothing to a
  // dot product or a norm): every row is then 16-byte aligned, so the fp16 / bf16
  // staging always takes the vector path (D = 877 would force the scalar one), and
  // copies of a row start at the same alignment, so ATen's norm reduction -- whose
  // order follows a row's alignment -- gives them bit-equal norms and the lower-index
  // tie rule holds.
  const int64_t pad = (8 - d % 8) % 8;
  const auto padded = [pad](const at::Tensor& x) {
    return pad ? at::constant_pad_nd(x, {0, pad}) : x.contiguous();
  };
  const at::Tensor f = padded(features);
  const at::Tensor qs = same_rows ? f : padded(queries);
  const at::Tensor inv_f = inverse_norms(f, acc_dtype);
  const at::Tensor inv_q = same_rows ? inv_f : inverse_norms(qs, acc_dtype);
  const auto lab = labels.contiguous();
  const auto qlab = query_labels.contiguous();

  switch (in_dtype) {
    case at::kHalf:
    case at::kBFloat16: {
      const bool vec = f.size(1) % 8 == 0 && aligned16(f) && aligned16(qs);
      if (in_dtype == at::kHalf) {
        launch_mma<__half>(vec, f, qs, inv_f, inv_q, lab, qlab, qi, k, pos_idx, pos_sim, neg_idx,
                           neg_sim);
      } else {
        launch_mma<__nv_bfloat16>(vec, f, qs, inv_f, inv_q, lab, qlab, qi, k, pos_idx, pos_sim,
                                  neg_idx, neg_sim);
      }
      break;
    }
    case at::kFloat:
      launch<SimtTile<float>>(f, qs, inv_f, inv_q, lab, qlab, qi, k, pos_idx, pos_sim, neg_idx,
                              neg_sim);
      break;
    default:  // kDouble
      launch<SimtTile<double>>(f, qs, inv_f, inv_q, lab, qlab, qi, k, pos_idx, pos_sim, neg_idx,
                               neg_sim);
      break;
  }
  return {pos_idx, pos_sim, neg_idx, neg_sim};
}

}  // namespace

TORCH_LIBRARY_IMPL(msa_fast, CUDA, m) { m.impl("mine_pairs", &mine_pairs_cuda); }

}  // namespace msa_fast
