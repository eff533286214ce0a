// Every C++/CUDA op of msa_fast is declared here, once; csrc/cpu/*.cpp and
// csrc/cuda/*.cu provide the per-device kernels with TORCH_LIBRARY_IMPL.
// Fake (meta) kernels and autograd are registered from Python
// (msa_fast/ops/*.py), next to the public wrapper of each op.
#include <torch/library.h>

TORCH_LIBRARY(msa_fast, m) {
  // contract §3.4. Cosine similarity of each query row with every feature row and a
  // label-aware running top-k: pos = k most similar rows with the query's label
  // (the query's own row, query_index >= 0, excluded), neg = k least similar
  // rows with another label. Sorted (pos descending, neg ascending), ties to the
  // lower index, missing slots -1 / NaN. Never materialises Q x N.
  m.def(
      "mine_pairs(Tensor features, Tensor labels, Tensor queries, Tensor query_labels, "
      "Tensor query_index, int k) -> (Tensor pos_idx, Tensor pos_sim, Tensor neg_idx, "
      "Tensor neg_sim)");
  // contract §3.3. softmax(q k^T * scale) v over the unmasked keys (key_padding_mask
  // True = ignore), and the rows' log-sum-exp for the backward; a batch row with every
  // key masked outputs 0 (lse +inf) and gets gradient 0.
  m.def("attention(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, float scale) -> (Tensor dq, Tensor dk, Tensor dv)");
}
