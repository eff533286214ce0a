// CUDA kernel of msa_fast::mine_pairs (SPEC 3.4, FD-CMDIE eq. 7-8).
//
//   sim(i, j) = <q_i / |q_i|, f_j / |f_j|>        (0 when either row is zero)
//   pos_i = the k rows j with labels[j] == query_labels[i], j != query_index[i],
//           of largest sim, sorted descending;
//   neg_i = the k rows j with labels[j] != query_labels[i] of smallest sim,
//           sorted ascending;
//   ties go to the lower j; fewer than k candidates: -1 / NaN.
//
// Shapes: features (N, D), labels (N,) int64, queries (Q, D), query_labels (Q,)
// int64, query_index (Q,) int64 in [-1, N), k <= 64. Outputs (Q, k): int64
// indices and similarities in fp32 (fp64 for fp64 inputs; fp16 / bf16 inputs are
// promoted to fp32 first, as the reference does).
//
// Scheme (a simple, exact baseline; a tensor-core tiled version replaces the dot
// products later):
//   1. rows are normalised with the same ATen ops as the reference
//      (msa_fast.ops.reference.normalize_rows): one N x D (+ Q x D) copy;
//   2. one block of kWarps warps owns kWarps query rows, one warp per row. The
//      block streams the features in tiles of 32 keys (one key per lane) and
//      D in chunks of kChunkD through shared memory; lane l accumulates the dot
//      product of its warp's query with key j0 + l in fp32 (fp64);
//   3. each warp keeps its row's two sorted lists (pos, neg) in registers, two
//      slots per lane (slots lane and lane + 32, hence k <= 64). A tile's
//      candidates that beat the current k-th entry are inserted one at a time in
//      increasing key order (ballot, then a warp-wide shift by one slot).
// Memory: O((Q + N) D + Q k); the Q x N matrix never exists.
#include <ATen/ATen.h>

#include "pair_mining.h"
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace msa_fast {
namespace {

constexpr int kWarps = 8;           // query rows per block, one warp each
constexpr int kThreads = kWarps * 32;
constexpr int kTileKeys = 32;       // keys per tile: one per lane
constexpr int kChunkD = 64;         // feature columns staged in shared memory per step
constexpr int kMaxK = 64;           // two list slots per lane
constexpr unsigned kFull = 0xffffffffu;

template <typename T>
__device__ __forceinline__ T quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

// "a is output before b": larger (pos) / smaller (neg) similarity, then lower index.
template <bool kLargest, typename T>
__device__ __forceinline__ bool ranks_before(T as, int ai, T bs, int bi) {
  if (as != bs) return kLargest ? as > bs : as < bs;
  return ai < bi;
}

// One query row's sorted top-k list, spread over a warp: lane l holds slots l
// (s0, i0) and l + 32 (s1, i1). Every member is called by all 32 lanes with
// warp-uniform arguments unless stated otherwise; `size` and the cached worst
// entry are warp-uniform.
template <typename T, bool kLargest>
struct WarpTopK {
  T s0, s1;
  int i0, i1;
  int size, k;
  T worst_s;  // slot k - 1, valid once size == k
  int worst_i;

  __device__ void init(int k_) {
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

  // Lane l offers key `key` with similarity v when `ok` (per lane). Candidates
  // are inserted in increasing lane = increasing key order, which keeps the
  // lower-index rule exact: a later key that only ties the k-th entry loses.
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
  __device__ void write(int64_t* idx, T* sim, int lane) const {
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

template <typename T>
__global__ void __launch_bounds__(kThreads)
mine_pairs_kernel(const T* __restrict__ fn, const T* __restrict__ qn,
                  const int64_t* __restrict__ labels, const int64_t* __restrict__ qlabels,
                  const int64_t* __restrict__ qindex, int n, int q, int d, int k,
                  int64_t* __restrict__ pos_idx, T* __restrict__ pos_sim,
                  int64_t* __restrict__ neg_idx, T* __restrict__ neg_sim) {
  __shared__ T q_s[kWarps][kChunkD];
  // +1 column: lane l reads row l, so a row stride of kChunkD + 1 words puts
  // the 32 lanes on 32 different banks (fp32).
  __shared__ T k_s[kTileKeys][kChunkD + 1];

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row0 = blockIdx.x * kWarps;
  const int row = row0 + warp;
  const bool active = row < q;  // warp-uniform; inactive warps still help stage tiles
  const int64_t ql = active ? qlabels[row] : 0;
  const int64_t self = active ? qindex[row] : -1;

  WarpTopK<T, true> pos;
  WarpTopK<T, false> neg;
  pos.init(k);
  neg.init(k);

  for (int j0 = 0; j0 < n; j0 += kTileKeys) {
    T acc = T(0);
    for (int c0 = 0; c0 < d; c0 += kChunkD) {
      // Coalesced staging: consecutive threads read consecutive columns; zero
      // padding past N, Q or D adds nothing to the dot products.
      for (int e = threadIdx.x; e < kWarps * kChunkD; e += kThreads) {
        const int r = e / kChunkD, c = e % kChunkD;
        const int gr = row0 + r, gc = c0 + c;
        q_s[r][c] = (gr < q && gc < d) ? qn[static_cast<int64_t>(gr) * d + gc] : T(0);
      }
      for (int e = threadIdx.x; e < kTileKeys * kChunkD; e += kThreads) {
        const int r = e / kChunkD, c = e % kChunkD;
        const int gr = j0 + r, gc = c0 + c;
        k_s[r][c] = (gr < n && gc < d) ? fn[static_cast<int64_t>(gr) * d + gc] : T(0);
      }
      __syncthreads();
#pragma unroll 16
      for (int c = 0; c < kChunkD; ++c) acc += q_s[warp][c] * k_s[lane][c];
      __syncthreads();
    }
    if (active) {
      const int key = j0 + lane;
      const bool valid = key < n;
      const bool same = valid && labels[key] == ql;
      pos.offer(same && key != self, acc, key, lane);
      neg.offer(valid && !same, acc, key, lane);
    }
  }
  if (active) {
    const int64_t off = static_cast<int64_t>(row) * k;
    pos.write(pos_idx + off, pos_sim + off, lane);
    neg.write(neg_idx + off, neg_sim + off, lane);
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
  TORCH_CHECK(n < std::numeric_limits<int>::max() - kTileKeys &&
                  q < std::numeric_limits<int>::max() && d < std::numeric_limits<int>::max(),
              "mine_pairs: cuda kernel: N, Q and D must fit in int32, got N=", n, " Q=", q,
              " D=", d);
  for (const at::Tensor* t : {&labels, &queries, &query_labels, &query_index}) {
    TORCH_CHECK(t->device() == features.device(),
                "mine_pairs (cuda kernel): expected every tensor on ", features.device(), ", got ",
                t->device());
  }
  TORCH_CHECK(features.is_cuda(), "mine_pairs (cuda kernel): expected CUDA tensors, got ",
              features.device());

  const c10::cuda::CUDAGuard guard(features.device());
  const bool is_f64 = features.scalar_type() == at::kDouble;
  const auto dtype = is_f64 ? at::kDouble : at::kFloat;
  auto pos_idx = at::empty({q, k}, features.options().dtype(at::kLong));
  auto neg_idx = at::empty({q, k}, features.options().dtype(at::kLong));
  auto pos_sim = at::empty({q, k}, features.options().dtype(dtype));
  auto neg_sim = at::empty({q, k}, features.options().dtype(dtype));
  if (q == 0) return {pos_idx, pos_sim, neg_idx, neg_sim};

  const auto qi = query_index.contiguous();
  check_query_index_range(qi, n);  // one host sync on the GPU

  const at::Tensor fn = normalize_rows(features.to(dtype));
  const bool same_rows = same_storage_rows(queries, features);
  const at::Tensor qn = same_rows ? fn : normalize_rows(queries.to(dtype));
  const auto lab = labels.contiguous();
  const auto qlab = query_labels.contiguous();

  const dim3 grid(static_cast<unsigned>((q + kWarps - 1) / kWarps));
  const dim3 block(kThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(fn.scalar_type(), "mine_pairs_cuda", [&] {
    mine_pairs_kernel<scalar_t><<<grid, block, 0, stream>>>(
        fn.const_data_ptr<scalar_t>(), qn.const_data_ptr<scalar_t>(),
        lab.const_data_ptr<int64_t>(), qlab.const_data_ptr<int64_t>(),
        qi.const_data_ptr<int64_t>(), static_cast<int>(n), static_cast<int>(q),
        static_cast<int>(d), static_cast<int>(k), pos_idx.data_ptr<int64_t>(),
        pos_sim.data_ptr<scalar_t>(), neg_idx.data_ptr<int64_t>(), neg_sim.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {pos_idx, pos_sim, neg_idx, neg_sim};
}

}  // namespace

TORCH_LIBRARY_IMPL(msa_fast, CUDA, m) { m.impl("mine_pairs", &mine_pairs_cuda); }

}  // namespace msa_fast
