// Pieces of mine_pairs shared by the CPU (csrc/cpu/pair_mining.cpp) and CUDA
// (csrc/cuda/pair_mining.cu) kernels: the argument checks (C++ callers reach the
// op without the Python wrapper's validation) and the row normalisation.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace msa_fast {

// Device-independent checks of the op schema in csrc/ops.cpp; each kernel adds
// its own (device, k range) after this.
inline void check_mine_pairs_args(const at::Tensor& features, const at::Tensor& labels,
                                  const at::Tensor& queries, const at::Tensor& query_labels,
                                  const at::Tensor& query_index) {
  TORCH_CHECK(features.dim() == 2, "mine_pairs: features: expected rank 2 (N, D), got shape ",
              features.sizes());
  TORCH_CHECK(features.is_floating_point(), "mine_pairs: features: expected a floating dtype, got ",
              features.scalar_type());
  const int64_t n = features.size(0);
  const int64_t d = features.size(1);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n,
              "mine_pairs: labels: expected shape (", n, ",), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "mine_pairs: labels: expected int64, got ",
              labels.scalar_type());
  TORCH_CHECK(queries.dim() == 2 && queries.size(1) == d,
              "mine_pairs: queries: expected shape (Q, ", d, "), got ", queries.sizes());
  TORCH_CHECK(queries.scalar_type() == features.scalar_type(),
              "mine_pairs: queries: expected dtype ", features.scalar_type(), ", got ",
              queries.scalar_type());
  const int64_t q = queries.size(0);
  TORCH_CHECK(query_labels.dim() == 1 && query_labels.size(0) == q,
              "mine_pairs: query_labels: expected shape (", q, ",), got ", query_labels.sizes());
  TORCH_CHECK(query_labels.scalar_type() == at::kLong,
              "mine_pairs: query_labels: expected int64, got ", query_labels.scalar_type());
  TORCH_CHECK(query_index.dim() == 1 && query_index.size(0) == q,
              "mine_pairs: query_index: expected shape (", q, ",), got ", query_index.sizes());
  TORCH_CHECK(query_index.scalar_type() == at::kLong,
              "mine_pairs: query_index: expected int64, got ", query_index.scalar_type());
}

// query_index values in [-1, n - 1] (-1: the query is not a row of features). With
// n == 0 this admits only -1. Reads the range back to the host: one sync on a GPU.
inline void check_query_index_range(const at::Tensor& query_index, int64_t n) {
  const auto mm = at::aminmax(query_index);
  const int64_t lo = std::get<0>(mm).item<int64_t>();
  const int64_t hi = std::get<1>(mm).item<int64_t>();
  TORCH_CHECK(lo >= -1 && hi < n, "mine_pairs: query_index: expected values in [-1, ", n - 1,
              "], got range [", lo, ", ", hi, "]");
}

// True when the queries are the feature rows themselves (the default call), so the
// kernels normalise once and may use the symmetry of the similarity matrix.
inline bool same_storage_rows(const at::Tensor& queries, const at::Tensor& features) {
  return queries.is_same(features) ||
         (queries.data_ptr() == features.data_ptr() && queries.sizes() == features.sizes() &&
          queries.strides() == features.strides());
}

// x / |x| per row with a zero row kept zero -- the same ATen ops as
// msa_fast.ops.reference.normalize_rows, so every path sees identical unit rows.
inline at::Tensor normalize_rows(const at::Tensor& x) {
  auto norm = at::linalg_vector_norm(x, 2, at::IntArrayRef{1}, /*keepdim=*/true);
  auto inv = at::where(norm > 0, norm.reciprocal(), at::zeros_like(norm));
  return (x * inv).contiguous();
}

}  // namespace msa_fast
