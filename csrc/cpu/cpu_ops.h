// CPU kernels of otq_kernels._C. Callers (bindings.cpp) validate shapes; pointers are
// contiguous row-major buffers. Plane p of a [n, k] code matrix is uint32 [n, row_words].
#pragma once

#include <cstdint>

#include "../planes.h"

namespace otq::cpu {

// Calls with less work than these run on one thread: waking the OpenMP team costs more
// than it saves there (2-core test machine: a few µs). Weights expanded by dequantize;
// multiply-adds (m * n * k) of lut_linear, which costs several times more per weight.
constexpr int64_t kMinParallelWeights = int64_t{1} << 14;
constexpr int64_t kMinParallelMacs = int64_t{1} << 12;

struct Planes {
  uint32_t* ptr[kMaxPlanes];
};

// codes int64 [n, k] (values < 2**bits) -> planes (padding words and fields zeroed).
void pack(const int64_t* codes, int64_t n, int64_t k, int bits, Planes planes);

// planes -> codes int64 [n, k].
void unpack(Planes planes, int64_t n, int64_t k, int bits, int64_t* codes);

// Equal-mass ("ot") binning of each row of x [r, n]: codes int64 [r, n] and centroids
// float32 [r, 2**bits] (ascending, unused levels = last centroid).
void fit_rows(const float* x, int64_t r, int64_t n, int bits, bool nearest, int64_t* codes,
              float* centroids);
void fit_rows(const double* x, int64_t r, int64_t n, int bits, bool nearest, int64_t* codes,
              float* centroids);

// y[m, n] = x[m, k] @ W^T (+ bias), W[j, :] = codebook[g(j), code(j, :)]; fp32 throughout.
// codebook is float32 [groups, 2**bits] with groups 1 (tensor) or n (channel); bias may be null.
void lut_linear(const float* x, int64_t m, int64_t k, Planes planes, int bits,
                const float* codebook, int64_t groups, int64_t n, const float* bias, float* y);

// out[n, k] = codebook[g(j), code(j, :)] in float32 (the dequant path's dense weight);
// codebook float32 [groups, 2**bits], groups 1 (tensor) or n (channel).
void dequantize(Planes planes, int64_t n, int64_t k, int bits, const float* codebook,
                int64_t groups, float* out);

}  // namespace otq::cpu
