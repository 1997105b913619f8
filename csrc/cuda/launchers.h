// Host launchers of the CUDA kernels. Plain C++: bindings.cpp includes this header
// without any CUDA or torch headers. Every launcher enqueues on `stream` (a cudaStream_t
// passed as void*) and returns 0 or a cudaError_t value (see error_string).
// Callers guarantee contiguous device buffers, 16-byte-aligned planes and valid sizes.
#pragma once

#include <cstddef>
#include <cstdint>

namespace otq::cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Rows of activations one kernel launch handles; larger M runs in chunks.
constexpr int kGemvMaxM = 8;

// y[m, n] (dtype) = x[m, k] (dtype) @ W^T + bias (dtype [n] or null), W from the
// planes and the float32 codebook [per_channel ? n : 1, 2**bits]. With split_k > 1,
// workspace must hold split_k * min(m, kGemvMaxM) * n floats.
int lut_linear(const void* x, int dtype, int64_t m, int64_t k, const uint32_t* const* planes,
               int bits, const float* codebook, bool per_channel, int64_t n, const void* bias,
               void* y, int split_k, float* workspace, void* stream);

// Rows of activations one tensor-core launch handles (two mma n-tiles).
constexpr int kMmaMaxM = 16;

// The same product on tensor cores (csrc/cuda/lut_mma.cu): dtype float16 or bfloat16 and
// bits 2..4 only (cudaErrorInvalidValue otherwise). With split_k > 1, workspace must hold
// split_k * min(m, kMmaMaxM) * n floats.
int lut_linear_mma(const void* x, int dtype, int64_t m, int64_t k, const uint32_t* const* planes,
                   int bits, const float* codebook, bool per_channel, int64_t n,
                   const void* bias, void* y, int split_k, float* workspace, void* stream);

// Columns of one span of the fragment-order code layout.
constexpr int kFragSpanColumns = 128;

// lut_linear_mma's product (csrc/cuda/lut_frag.cu) on the codes in fragment order, a
// runtime layout (DESIGN.md section 2; built by otq_kernels.backends.cuda.fragment_planes,
// never saved). With S = ceil(k / 128) spans and B = ceil(n / 16) row blocks, plane p of
// width w is int32 [B, S, 2w / q, 32, q] (q = 4 words, 2 for w = 1): lane l = 4g + t of
// row block b and span s holds, in its 2w words (q per part, parts in order), the 64 codes
// of rows 16b + g + 8r (r = 0, 1) and columns 128s + 32i + 8t + c (i < 4, c < 8), in the
// order (r, i, c), w bits each from bit 0 (code 0 past n and k). Same dtypes, bits,
// workspace and return codes as lut_linear_mma. block_rows: weight rows per thread block,
// 16, or 32 (each warp's x fragments serve two row blocks; per-layer codebooks, or
// per-channel ones at 2 and 3 bits only).
int lut_linear_frag(const void* x, int dtype, int64_t m, int64_t k,
                    const uint32_t* const* planes, int bits, const float* codebook,
                    bool per_channel, int64_t n, const void* bias, void* y, int split_k,
                    float* workspace, int block_rows, void* stream);

// A 2-D convolution's sizes (groups = 1): x [batch, c, h, w], weight [n, c, kh, kw].
struct ConvShape {
  int64_t batch, c, h, w, n;
  int kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

// Output size along one axis (0 when the kernel does not fit).
inline int64_t conv_out_size(int64_t in, int kernel, int stride, int pad, int dil) {
  const int64_t span = in + 2 * pad - static_cast<int64_t>(dil) * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// y = conv2d(x, W) + bias on tensor cores (csrc/cuda/lut_conv.cu): x channels-last
// [batch, h, w, c] in dtype float16 or bfloat16, bits 2..4, planes holding W's codes in
// tap-major (kh, kw, c) order (rows of K' = kh * kw * c), bias dtype [n] or null; y
// [batch, n, oh, ow] (y_nchw) or [batch, oh, ow, n]. With split_k > 1, workspace must
// hold split_k * batch * oh * ow * n floats.
int lut_conv2d(const void* x, int dtype, const ConvShape& shape, const uint32_t* const* planes,
               int bits, const float* codebook, bool per_channel, const void* bias, void* y,
               bool y_nchw, int split_k, float* workspace, void* stream);

// Bytes of workspace fit_rows needs for r rows of n values.
size_t fit_rows_workspace_bytes(int64_t r, int64_t n, int bits);

// Equal-mass binning of x float32 [r, n]: codes int64 [r, n], centroids float32 [r, 2**bits].
int fit_rows(const float* x, int64_t r, int64_t n, int bits, bool nearest, int64_t* codes,
             float* centroids, void* workspace, size_t workspace_bytes, void* stream);

// codes int64 [n, k] <-> bit planes (canonical layout).
int pack(const int64_t* codes, int64_t n, int64_t k, int bits, uint32_t* const* planes,
         void* stream);
int unpack(const uint32_t* const* planes, int64_t n, int64_t k, int bits, int64_t* codes,
           void* stream);

// The dense weight out [n, k] (dtype) of the planes and the float32 codebook
// [per_channel ? n : 1, 2**bits] (csrc/cuda/dequant.cu): the dequant path's expansion.
int dequantize(const uint32_t* const* planes, int bits, const float* codebook, bool per_channel,
               int64_t n, int64_t k, int dtype, void* out, void* stream);

// 0 if the current device can run these kernels, else why not (e.g.
// cudaErrorNoKernelImageForDevice: built for other GPU architectures).
int kernel_image_status();

const char* error_string(int code);

}  // namespace otq::cuda
