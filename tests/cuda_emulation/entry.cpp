// C entry points over the CUDA launchers (csrc/cuda/launchers.h) for ctypes, with host
// buffers and the emulated runtime (include/cuda_runtime.h) in place of a GPU.
#include <cstddef>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/launchers.h"

extern "C" {

int otq_emu_lut_linear(const void* x, int dtype, int64_t m, int64_t k,
                       const uint32_t* const* planes, int bits, const float* codebook,
                       bool per_channel, int64_t n, const void* bias, void* y, int split_k,
                       float* workspace) {
  return otq::cuda::lut_linear(x, dtype, m, k, planes, bits, codebook, per_channel, n, bias, y,
                               split_k, workspace, nullptr);
}

int otq_emu_lut_linear_mma(const void* x, int dtype, int64_t m, int64_t k,
                           const uint32_t* const* planes, int bits, const float* codebook,
                           bool per_channel, int64_t n, const void* bias, void* y, int split_k,
                           float* workspace) {
  return otq::cuda::lut_linear_mma(x, dtype, m, k, planes, bits, codebook, per_channel, n, bias,
                                   y, split_k, workspace, nullptr);
}

int otq_emu_lut_linear_frag(const void* x, int dtype, int64_t m, int64_t k,
                            const uint32_t* const* planes, int bits, const float* codebook,
                            bool per_channel, int64_t n, const void* bias, void* y,
                            int split_k, float* workspace, int block_rows) {
  return otq::cuda::lut_linear_frag(x, dtype, m, k, planes, bits, codebook, per_channel, n,
                                    bias, y, split_k, workspace, block_rows, nullptr);
}

int otq_emu_lut_conv2d(const void* x, int dtype, const int64_t* sizes, const int* params,
                       const uint32_t* const* planes, int bits, const float* codebook,
                       bool per_channel, const void* bias, void* y, bool y_nchw, int split_k,
                       float* workspace) {
  // sizes: batch, c, h, w, n; params: kh, kw, stride, padding, dilation (h, w each)
  const otq::cuda::ConvShape shape{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4],
                                   params[0], params[1], params[2], params[3],
                                   params[4], params[5], params[6], params[7]};
  return otq::cuda::lut_conv2d(x, dtype, shape, planes, bits, codebook, per_channel, bias, y,
                               y_nchw, split_k, workspace, nullptr);
}

size_t otq_emu_fit_rows_workspace_bytes(int64_t r, int64_t n, int bits) {
  return otq::cuda::fit_rows_workspace_bytes(r, n, bits);
}

int otq_emu_fit_rows(const float* x, int64_t r, int64_t n, int bits, bool nearest,
                     int64_t* codes, float* centroids, void* workspace, size_t workspace_bytes) {
  return otq::cuda::fit_rows(x, r, n, bits, nearest, codes, centroids, workspace,
                             workspace_bytes, nullptr);
}

int otq_emu_pack(const int64_t* codes, int64_t n, int64_t k, int bits, uint32_t* const* planes) {
  return otq::cuda::pack(codes, n, k, bits, planes, nullptr);
}

int otq_emu_unpack(const uint32_t* const* planes, int64_t n, int64_t k, int bits,
                   int64_t* codes) {
  return otq::cuda::unpack(planes, n, k, bits, codes, nullptr);
}

int otq_emu_dequantize(const uint32_t* const* planes, int bits, const float* codebook,
                       bool per_channel, int64_t n, int64_t k, int dtype, void* out) {
  return otq::cuda::dequantize(planes, bits, codebook, per_channel, n, k, dtype, out, nullptr);
}

int otq_emu_kernel_image_status() { return otq::cuda::kernel_image_status(); }

// An opt-in past every GPU's limit (256 KB): its error code, and whether it was left
// pending for the next launch check (1) or cleared (0).
static __global__ void otq_emu_any_kernel(int) {}

int otq_emu_refused_smem_opt_in(int* left_pending) {
  const int err = otq::cuda::allow_dynamic_smem(otq_emu_any_kernel, size_t{256} * 1024);
  *left_pending = cudaGetLastError() != cudaSuccess;
  return err;
}

const char* otq_emu_error_string(int code) { return otq::cuda::error_string(code); }

}  // extern "C"
