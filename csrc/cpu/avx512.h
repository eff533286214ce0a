// Small AVX-512 pieces shared by the CPU kernels (csrc/cpu/*.cpp), which compile their
// vector code per function (target attributes / pragmas), never the whole file.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace msa_fast {

// The first min(count, 16) lanes of a 16-lane vector: the tail of a row of `count` values.
inline __mmask16 lanes(int64_t count) {
  return count >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << count) - 1u);
}

}  // namespace msa_fast
