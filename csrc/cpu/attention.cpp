// CPU kernel of msa_fast::attention and msa_fast::attention_backward (contract §3.3).
//
//   out[b, h, i] = sum_j p_ij v[b, h, j],  p_ij = exp(s_ij - lse_i) over the unmasked keys j,
//   s_ij = scale * <q[b, h, i], k[b, h, j]>,  lse_i = log sum_j exp(s_ij);
//   a batch row whose keys are all masked outputs 0 (lse = +inf) and gets gradient 0.
//   backward: dv_j = sum_i p_ij do_i,  ds_ij = p_ij (<do_i, v_j> - <do_i, out_i>),
//             dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i.
//
// Shapes: q (B, H, Lq, Dh), k and v (B, H, Lk, Dh), key_padding_mask (B, Lk) bool, True =
// ignore; out like q, lse (B, H, Lq) fp32. fp32 only (the Python wrapper computes fp16 /
// bf16 inputs in fp32, as the reference does); Dh <= 128; AVX-512 F.
//
// Why a kernel of our own when PyTorch's CPU flash attention exists: MSA heads are narrow
// (Dh = 16 in every seed model), and at that width a head row is one AVX-512 register. Per
// (b, h) the kernel transposes K and V once (Dh x Lk, so that 16 scores or 16 <do, v_j> are
// Dh broadcast FMAs with no horizontal sum) and walks the queries one at a time: scores,
// softmax and P V for a query touch one row of scores in L1 and K, V (2 x 51 KB at 800
// keys) in L2. PyTorch's kernel runs the same products as small GEMM calls per block,
// whose fixed cost dominates at K = 16. The keys after a batch row's last unmasked one
// are never read (FD-CMDIE pads every sequence to 875 frames). Measured in
// benchmarks/ops/bench_attention.py (one thread, (8, 4, 875, 875, 16), last 75 keys
// padded): see docs/backends.md.
//
// Numerics: fp32 throughout, FMA accumulation in key order; exp is 2^(x log2 e) with a
// degree-7 polynomial on [-1/2, 1/2] (relative error < 1e-7) and _mm512_scalef_ps; masked
// lanes are zeroed explicitly, so a masked key's weight and gradient are exactly 0.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "avx512.h"

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace msa_fast {
namespace {

constexpr int64_t kMaxHeadDim = 128;

// The kernels below are compiled for AVX-512 F (a region, so that their lambdas are too);
// the argument checks and the registration outside it run on any x86-64, and the entry
// points refuse a CPU without AVX-512 before calling in.
#pragma GCC push_options
#pragma GCC target("avx512f")

// exp(x) for x <= 0 (softmax numerators: x = s - max or s - lse); below -87 it underflows to
// ~0, and the callers zero the masked lanes themselves.
inline __m512 exp_nonpos(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);  // [-1/2, 1/2]: 2^f by its Taylor series in f ln 2
  __m512 p = _mm512_set1_ps(1.5252733804059840e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// The lanes of register v of a head row held in NV registers: all 16 but in the last.
template <int NV>
inline __mmask16 row_lanes(int v, __mmask16 tail) {
  return v == NV - 1 ? tail : static_cast<__mmask16>(0xFFFF);
}

// Per batch row: the number of keys up to the last unmasked one (0: all masked) and, per
// chunk of 16 keys, the unmasked lanes.
struct KeyMask {
  std::vector<int64_t> live;               // (B,)
  std::vector<std::vector<__mmask16>> ok;  // (B, chunks)
};

KeyMask key_mask(const c10::optional<at::Tensor>& mask, int64_t b, int64_t lk) {
  KeyMask km;
  km.live.assign(static_cast<size_t>(b), lk);
  km.ok.resize(static_cast<size_t>(b));
  const at::Tensor m = mask.has_value() ? mask->contiguous() : at::Tensor();
  const bool* mp = m.defined() ? m.const_data_ptr<bool>() : nullptr;
  for (int64_t r = 0; r < b; ++r) {
    int64_t live = lk;
    if (mp != nullptr) {
      while (live > 0 && mp[r * lk + live - 1]) --live;
    }
    km.live[r] = live;
    std::vector<__mmask16>& ok = km.ok[r];
    ok.assign(static_cast<size_t>((live + 15) / 16), 0);
    for (int64_t j = 0; j < live; ++j) {
      if (mp == nullptr || !mp[r * lk + j]) ok[j / 16] |= static_cast<__mmask16>(1u << (j % 16));
    }
  }
  return km;
}

// dst (dh x ld) = src (n x dh)^T, the columns n .. ld - 1 zero.
void transpose_rows(const float* src, int64_t n, int64_t dh, float* dst, int64_t ld) {
  for (int64_t d = 0; d < dh; ++d) {
    float* row = dst + d * ld;
    for (int64_t j = 0; j < n; ++j) row[j] = src[j * dh + d];
    for (int64_t j = n; j < ld; ++j) row[j] = 0.0f;
  }
}

// Scores of QB queries x (rows of dh floats) against the 16 keys of every chunk: the columns
// of the transposed matrix t (dh x ld), scaled, into s (QB rows of ld floats). A key row is
// read once for the QB queries, and the QB accumulators are independent FMA chains.
template <int QB>
inline void block_scores(const float* x, const float* t, int64_t ld, int64_t dh, int64_t chunks,
                                    float scale, float* s) {
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t c = 0; c < chunks; ++c) {
    __m512 acc[QB];
    for (int u = 0; u < QB; ++u) acc[u] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dh; ++d) {
      const __m512 td = _mm512_loadu_ps(t + d * ld + 16 * c);
      for (int u = 0; u < QB; ++u) acc[u] = _mm512_fmadd_ps(_mm512_set1_ps(x[u * dh + d]), td, acc[u]);
    }
    for (int u = 0; u < QB; ++u) _mm512_storeu_ps(s + u * ld + 16 * c, _mm512_mul_ps(acc[u], vscale));
  }
}

// acc[u] (NV registers each) = sum_j w[u * ld + j] rows[j] over j < n, for QB weight rows; a
// row of dh floats is loaded once for the QB of them.
template <int NV, int QB>
inline void block_weighted_rows(const float* w, int64_t ld, const float* rows, int64_t n, int64_t dh,
                                           __mmask16 tail, __m512 (*acc)[NV]) {
  for (int u = 0; u < QB; ++u) {
    for (int v = 0; v < NV; ++v) acc[u][v] = _mm512_setzero_ps();
  }
  for (int64_t j = 0; j < n; ++j) {
    const float* r = rows + j * dh;
    for (int v = 0; v < NV; ++v) {
      const __m512 rv = v == NV - 1 ? _mm512_maskz_loadu_ps(tail, r + 16 * v) : _mm512_loadu_ps(r + 16 * v);
      for (int u = 0; u < QB; ++u) acc[u][v] = _mm512_fmadd_ps(_mm512_set1_ps(w[u * ld + j]), rv, acc[u][v]);
    }
  }
}

// Queries per block: QB x NV accumulators stay in registers (32 zmm).
template <int NV>
constexpr int block_of() {
  return NV <= 1 ? 8 : NV <= 2 ? 4 : NV <= 4 ? 2 : 1;
}

// Forward of QB queries (rows Q, outputs O, LSE) of one head whose batch row has `live`
// keys (>= 1) with unmasked lanes ok[c].
template <int NV, int QB>
void forward_block(const float* Q, const float* kt, const float* V, float* O, float* LSE, int64_t live,
                              int64_t ld, int64_t dh, const __mmask16* ok, float scale, float* s) {
  const int64_t chunks = ld / 16;
  const __mmask16 tail = lanes(dh - 16 * (NV - 1));
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  block_scores<QB>(Q, kt, ld, dh, chunks, scale, s);
  float inv[QB];
  for (int u = 0; u < QB; ++u) {
    float* su = s + u * ld;
    __m512 vmax = ninf;
    for (int64_t c = 0; c < chunks; ++c) vmax = _mm512_max_ps(vmax, _mm512_mask_mov_ps(ninf, ok[c], _mm512_loadu_ps(su + 16 * c)));
    const float m = _mm512_reduce_max_ps(vmax);  // finite: the row has an unmasked key
    const __m512 vm = _mm512_set1_ps(m);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512 pc = _mm512_maskz_mov_ps(ok[c], exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(su + 16 * c), vm)));
      _mm512_storeu_ps(su + 16 * c, pc);
      vsum = _mm512_add_ps(vsum, pc);
    }
    const float l = _mm512_reduce_add_ps(vsum);
    inv[u] = 1.0f / l;
    LSE[u] = m + std::log(l);
  }
  __m512 acc[QB][NV];
  block_weighted_rows<NV, QB>(s, ld, V, live, dh, tail, acc);
  for (int u = 0; u < QB; ++u) {
    const __m512 vi = _mm512_set1_ps(inv[u]);
    float* ou = O + u * dh;
    for (int v = 0; v < NV - 1; ++v) _mm512_storeu_ps(ou + 16 * v, _mm512_mul_ps(acc[u][v], vi));
    _mm512_mask_storeu_ps(ou + 16 * (NV - 1), tail, _mm512_mul_ps(acc[u][NV - 1], vi));
  }
}

template <int NV>
void forward_head(const float* Q, const float* K, const float* V, float* O, float* LSE, int64_t lq,
                             int64_t dh, const KeyMask& km, int64_t b, float scale, std::vector<float>& kt,
                             std::vector<float>& srow) {
  const int64_t live = km.live[b];
  if (live == 0) {  // every key masked: zeros (contract §3.3), lse +inf marks the row
    std::fill(O, O + lq * dh, 0.0f);
    std::fill(LSE, LSE + lq, std::numeric_limits<float>::infinity());
    return;
  }
  constexpr int QB = block_of<NV>();
  const int64_t ld = 16 * ((live + 15) / 16);
  kt.resize(static_cast<size_t>(dh * ld));
  srow.resize(static_cast<size_t>(QB * ld));
  transpose_rows(K, live, dh, kt.data(), ld);
  const __mmask16* ok = km.ok[b].data();
  int64_t i = 0;
  for (; i + QB <= lq; i += QB) {
    forward_block<NV, QB>(Q + i * dh, kt.data(), V, O + i * dh, LSE + i, live, ld, dh, ok, scale, srow.data());
  }
  for (; i < lq; ++i) {
    forward_block<NV, 1>(Q + i * dh, kt.data(), V, O + i * dh, LSE + i, live, ld, dh, ok, scale, srow.data());
  }
}

// Backward of QB queries of one head: P and dS for the block (QB rows of ld floats), dQ
// for its rows, and its share of dK, dV -- each key row read and written once a block.
template <int NV, int QB>
void backward_block(const float* dO, const float* Q, const float* K, const float* O, const float* LSE,
                               float* dQ, float* dK, float* dV, int64_t live, int64_t ld, int64_t dh,
                               const __mmask16* ok, float scale, const float* kt, const float* vt, float* p,
                               float* ds) {
  const int64_t chunks = ld / 16;
  const __mmask16 tail = lanes(dh - 16 * (NV - 1));
  const __m512 vscale = _mm512_set1_ps(scale);
  __m512 dov[QB][NV], qv[QB][NV];
  float delta[QB];
  for (int u = 0; u < QB; ++u) {
    __m512 dd = _mm512_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = row_lanes<NV>(v, tail);
      dov[u][v] = _mm512_maskz_loadu_ps(m, dO + u * dh + 16 * v);
      qv[u][v] = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, Q + u * dh + 16 * v), vscale);
      dd = _mm512_fmadd_ps(dov[u][v], _mm512_maskz_loadu_ps(m, O + u * dh + 16 * v), dd);
    }
    delta[u] = _mm512_reduce_add_ps(dd);  // <do_i, out_i>
  }
  block_scores<QB>(Q, kt, ld, dh, chunks, scale, p);
  block_scores<QB>(dO, vt, ld, dh, chunks, 1.0f, ds);
  for (int u = 0; u < QB; ++u) {
    const __m512 lse = _mm512_set1_ps(LSE[u]), dl = _mm512_set1_ps(delta[u]);
    float* pu = p + u * ld;
    float* du = ds + u * ld;
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512 pc = _mm512_maskz_mov_ps(ok[c], exp_nonpos(_mm512_sub_ps(_mm512_loadu_ps(pu + 16 * c), lse)));
      _mm512_storeu_ps(pu + 16 * c, pc);
      _mm512_storeu_ps(du + 16 * c, _mm512_mul_ps(pc, _mm512_sub_ps(_mm512_loadu_ps(du + 16 * c), dl)));
    }
  }
  __m512 dq[QB][NV];
  block_weighted_rows<NV, QB>(ds, ld, K, live, dh, tail, dq);
  for (int u = 0; u < QB; ++u) {
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = row_lanes<NV>(v, tail);
      _mm512_mask_storeu_ps(dQ + u * dh + 16 * v, m, _mm512_mul_ps(dq[u][v], vscale));
    }
  }
  for (int64_t j = 0; j < live; ++j) {
    float* dvj = dV + j * dh;
    float* dkj = dK + j * dh;
    for (int v = 0; v < NV; ++v) {
      const __mmask16 m = row_lanes<NV>(v, tail);
      __m512 av = _mm512_maskz_loadu_ps(m, dvj + 16 * v);
      __m512 ak = _mm512_maskz_loadu_ps(m, dkj + 16 * v);
      for (int u = 0; u < QB; ++u) {
        av = _mm512_fmadd_ps(_mm512_set1_ps(p[u * ld + j]), dov[u][v], av);
        ak = _mm512_fmadd_ps(_mm512_set1_ps(ds[u * ld + j]), qv[u][v], ak);
      }
      _mm512_mask_storeu_ps(dvj + 16 * v, m, av);
      _mm512_mask_storeu_ps(dkj + 16 * v, m, ak);
    }
  }
}

template <int NV>
void backward_head(const float* dO, const float* Q, const float* K, const float* V, const float* O,
                              const float* LSE, float* dQ, float* dK, float* dV, int64_t lq, int64_t lk, int64_t dh,
                              const KeyMask& km, int64_t b, float scale, std::vector<float>& kt,
                              std::vector<float>& vt, std::vector<float>& prow, std::vector<float>& dsrow) {
  std::fill(dK, dK + lk * dh, 0.0f);
  std::fill(dV, dV + lk * dh, 0.0f);
  const int64_t live = km.live[b];
  if (live == 0) {
    std::fill(dQ, dQ + lq * dh, 0.0f);
    return;
  }
  constexpr int QB = block_of<NV>();
  const int64_t ld = 16 * ((live + 15) / 16);
  kt.resize(static_cast<size_t>(dh * ld));
  vt.resize(static_cast<size_t>(dh * ld));
  prow.resize(static_cast<size_t>(QB * ld));
  dsrow.resize(static_cast<size_t>(QB * ld));
  transpose_rows(K, live, dh, kt.data(), ld);
  transpose_rows(V, live, dh, vt.data(), ld);
  const __mmask16* ok = km.ok[b].data();
  int64_t i = 0;
  for (; i + QB <= lq; i += QB) {
    backward_block<NV, QB>(dO + i * dh, Q + i * dh, K, O + i * dh, LSE + i, dQ + i * dh, dK, dV, live, ld, dh, ok,
                           scale, kt.data(), vt.data(), prow.data(), dsrow.data());
  }
  for (; i < lq; ++i) {
    backward_block<NV, 1>(dO + i * dh, Q + i * dh, K, O + i * dh, LSE + i, dQ + i * dh, dK, dV, live, ld, dh, ok,
                          scale, kt.data(), vt.data(), prow.data(), dsrow.data());
  }
}

#pragma GCC pop_options

void check_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(__builtin_cpu_supports("avx512f"), "attention (cpu kernel): needs AVX-512 F");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "attention (cpu kernel): expected CPU tensors, got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat, "attention (cpu kernel): expected float32, got ", t->scalar_type());
    TORCH_CHECK(t->dim() == 4, "attention (cpu kernel): expected (B, H, L, Dh) tensors, got ", t->sizes());
  }
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(1) == k.size(1) && q.size(3) == k.size(3) && k.sizes() == v.sizes(),
              "attention (cpu kernel): q ", q.sizes(), ", k ", k.sizes(), " and v ", v.sizes(), " do not match");
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= kMaxHeadDim, "attention (cpu kernel): Dh in [1, 128], got ", q.size(3));
  TORCH_CHECK(k.size(2) >= 1, "attention (cpu kernel): at least one key, got Lk = 0");
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 && mask->size(0) == q.size(0) &&
                    mask->size(1) == k.size(2),
                "attention (cpu kernel): key_padding_mask: expected bool (B, Lk), got ", mask->scalar_type(), " ",
                mask->sizes());
  }
}

#define MSA_ATTENTION_NV(dh, CALL)  \
  switch ((dh + 15) / 16) {         \
    case 1: CALL(1); break;         \
    case 2: CALL(2); break;         \
    case 3: CALL(3); break;         \
    case 4: CALL(4); break;         \
    case 5: CALL(5); break;         \
    case 6: CALL(6); break;         \
    case 7: CALL(7); break;         \
    default: CALL(8); break;        \
  }

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                                 const c10::optional<at::Tensor>& mask, double scale) {
  check_args(q_in, k_in, v_in, mask);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const int64_t b = q.size(0), h = q.size(1), lq = q.size(2), lk = k.size(2), dh = q.size(3);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({b, h, lq}, q.options());
  if (q.numel() == 0) return {out, lse};
  const KeyMask km = key_mask(mask, b, lk);
  const float* Q = q.const_data_ptr<float>();
  const float* K = k.const_data_ptr<float>();
  const float* V = v.const_data_ptr<float>();
  float* O = out.data_ptr<float>();
  float* L = lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, b * h, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> kt, srow;
    for (int64_t w = w0; w < w1; ++w) {
#define MSA_FWD(NV)                                                                                       \
  forward_head<NV>(Q + w * lq * dh, K + w * lk * dh, V + w * lk * dh, O + w * lq * dh, L + w * lq, lq, dh, km, \
                   w / h, sc, kt, srow)
      MSA_ATTENTION_NV(dh, MSA_FWD)
#undef MSA_FWD
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const c10::optional<at::Tensor>& mask, double scale) {
  check_args(q_in, k_in, v_in, mask);
  TORCH_CHECK(dout_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
              "attention_backward (cpu kernel): dout and out must be shaped like q");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor dout = dout_in.to(at::kFloat).contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  const int64_t b = q.size(0), h = q.size(1), lq = q.size(2), lk = k.size(2), dh = q.size(3);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  if (b * h == 0) return {dq, dk, dv};
  const KeyMask km = key_mask(mask, b, lk);
  const float *dO = dout.const_data_ptr<float>(), *Q = q.const_data_ptr<float>(), *K = k.const_data_ptr<float>(),
              *V = v.const_data_ptr<float>(), *O = out.const_data_ptr<float>(), *L = lse.const_data_ptr<float>();
  float *dQ = dq.data_ptr<float>(), *dK = dk.data_ptr<float>(), *dV = dv.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, b * h, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> kt, vt, prow, dsrow;
    for (int64_t w = w0; w < w1; ++w) {
#define MSA_BWD(NV)                                                                                           \
  backward_head<NV>(dO + w * lq * dh, Q + w * lq * dh, K + w * lk * dh, V + w * lk * dh, O + w * lq * dh,     \
                    L + w * lq, dQ + w * lq * dh, dK + w * lk * dh, dV + w * lk * dh, lq, lk, dh, km, w / h, sc, \
                    kt, vt, prow, dsrow)
      MSA_ATTENTION_NV(dh, MSA_BWD)
#undef MSA_BWD
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(msa_fast, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace msa_fast
