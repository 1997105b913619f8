// The one pybind11 module otq_kernels._C. Entry points take raw data pointers (Python
// passes tensor.data_ptr()) plus sizes; CUDA ones also take the stream as an integer.
// The Python wrappers (otq_kernels/backends/{cpu,cuda}.py) validate dtypes, contiguity
// and devices; the checks here turn remaining misuse into ValueError, never a crash.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/simd.h"
#include "planes.h"
#ifdef OTQ_WITH_CUDA
#include "cuda/launchers.h"
#endif

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

namespace py = pybind11;
using Ptrs = std::vector<uintptr_t>;

namespace {

// Messages are literals or built only on failure: these checks run on every call.
void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

void check_bits(int bits) {
  if (!otq::valid_bits(bits))
    throw std::invalid_argument("bits must be in 2..8, got " + std::to_string(bits));
}

void check_size(int64_t value, const char* name) {
  if (value <= 0)
    throw std::invalid_argument(std::string(name) + " must be positive, got " +
                                std::to_string(value));
}

void check_ptr(uintptr_t ptr, const char* name) {
  if (ptr == 0) throw std::invalid_argument(std::string(name) + " is a null pointer");
}

void check_planes(const Ptrs& planes, int bits) {
  const int count = otq::plane_spec(bits).count;
  if (static_cast<int>(planes.size()) != count)
    throw std::invalid_argument("bits=" + std::to_string(bits) + " needs " +
                                std::to_string(count) + " planes, got " +
                                std::to_string(planes.size()));
  for (uintptr_t p : planes) check_ptr(p, "plane");
}

// (read in C++: a Python read of an unset variable costs ~1.8 µs per layer call)
void check_simd_env() {
  if (otq::cpu::simd_cap() == otq::cpu::Simd::kInvalid)
    throw std::invalid_argument(
        std::string("OTQ_CPU_SIMD must be one of ('avx512', 'avx2', 'none') or unset, got '") +
        std::getenv("OTQ_CPU_SIMD") + "'");
}

otq::cpu::Planes cpu_planes(const Ptrs& planes) {
  otq::cpu::Planes out{{nullptr, nullptr, nullptr, nullptr}};
  for (size_t i = 0; i < planes.size(); ++i) out.ptr[i] = reinterpret_cast<uint32_t*>(planes[i]);
  return out;
}

template <typename T>
T* as(uintptr_t ptr) {
  return reinterpret_cast<T*>(ptr);
}

void cpu_pack(uintptr_t codes, int64_t n, int64_t k, int bits, const Ptrs& planes) {
  check_bits(bits), check_size(n, "n"), check_size(k, "k"), check_ptr(codes, "codes");
  check_planes(planes, bits);
  py::gil_scoped_release release;
  otq::cpu::pack(as<const int64_t>(codes), n, k, bits, cpu_planes(planes));
}

void cpu_unpack(const Ptrs& planes, int64_t n, int64_t k, int bits, uintptr_t codes) {
  check_bits(bits), check_size(n, "n"), check_size(k, "k"), check_ptr(codes, "codes");
  check_planes(planes, bits);
  py::gil_scoped_release release;
  otq::cpu::unpack(cpu_planes(planes), n, k, bits, as<int64_t>(codes));
}

void cpu_fit_rows(uintptr_t x, bool is_double, int64_t r, int64_t n, int bits, bool nearest,
                  uintptr_t codes, uintptr_t centroids) {
  check_bits(bits), check_size(r, "r"), check_size(n, "n");
  require(n < (int64_t{1} << 32), "rows longer than 2**32 - 1 values are not supported");
  check_ptr(x, "x"), check_ptr(codes, "codes"), check_ptr(centroids, "centroids");
  py::gil_scoped_release release;
  if (is_double)
    otq::cpu::fit_rows(as<const double>(x), r, n, bits, nearest, as<int64_t>(codes),
                       as<float>(centroids));
  else
    otq::cpu::fit_rows(as<const float>(x), r, n, bits, nearest, as<int64_t>(codes),
                       as<float>(centroids));
}

void cpu_lut_linear(uintptr_t x, int64_t m, int64_t k, const Ptrs& planes, int bits,
                    uintptr_t codebook, int64_t groups, int64_t n, uintptr_t bias, uintptr_t y) {
  check_bits(bits), check_size(m, "m"), check_size(k, "k"), check_size(n, "n");
  require(groups == 1 || groups == n, "groups must be 1 or n");
  check_ptr(x, "x"), check_ptr(codebook, "codebook"), check_ptr(y, "y");
  check_planes(planes, bits), check_simd_env();
  py::gil_scoped_release release;
  otq::cpu::lut_linear(as<const float>(x), m, k, cpu_planes(planes), bits,
                       as<const float>(codebook), groups, n, as<const float>(bias), as<float>(y));
}

void cpu_dequantize(const Ptrs& planes, int64_t n, int64_t k, int bits, uintptr_t codebook,
                    int64_t groups, uintptr_t out) {
  check_bits(bits), check_size(n, "n"), check_size(k, "k");
  require(groups == 1 || groups == n, "groups must be 1 or n");
  check_ptr(codebook, "codebook"), check_ptr(out, "out");
  check_planes(planes, bits), check_simd_env();
  py::gil_scoped_release release;
  otq::cpu::dequantize(cpu_planes(planes), n, k, bits, as<const float>(codebook), groups,
                       as<float>(out));
}

// The explicit-SIMD path ("avx512", "avx2" or "none": the portable loops) that op
// ("linear": cpu_lut_linear with m rows of k columns; "dequantize") takes now.
std::string cpu_simd_path(const std::string& op, int64_t m, int64_t k) {
  check_size(m, "m"), check_size(k, "k"), check_simd_env();
  otq::cpu::Simd path;
  if (op == "linear")
    path = otq::cpu::lut_linear_path(m, k);
  else if (op == "dequantize")
    path = otq::cpu::dequantize_path();
  else
    throw std::invalid_argument("op must be 'linear' or 'dequantize', got '" + op + "'");
  return path == otq::cpu::Simd::kAvx512 ? "avx512"
         : path == otq::cpu::Simd::kAvx2 ? "avx2"
                                         : "none";
}

#ifdef OTQ_WITH_CUDA
void check_cuda(int err) {
  if (err != 0) throw std::runtime_error(std::string("CUDA error: ") + otq::cuda::error_string(err));
}

std::vector<uint32_t*> device_planes(const Ptrs& planes) {
  std::vector<uint32_t*> out(otq::kMaxPlanes, nullptr);
  for (size_t i = 0; i < planes.size(); ++i) {
    require(planes[i] % 16 == 0, "plane pointers must be 16-byte aligned");
    out[i] = reinterpret_cast<uint32_t*>(planes[i]);
  }
  return out;
}

void cuda_lut_linear(uintptr_t x, int dtype, int64_t m, int64_t k, const Ptrs& planes, int bits,
                     uintptr_t codebook, bool per_channel, int64_t n, uintptr_t bias, uintptr_t y,
                     int split_k, uintptr_t workspace, uintptr_t stream, int kernel) {
  check_bits(bits), check_size(m, "m"), check_size(k, "k"), check_size(n, "n");
  require(kernel >= 0 && kernel <= 3,
          "kernel must be 0 (gemv), 1 (mma), 2 (frag) or 3 (frag, 32-row blocks)");
  const bool frag = kernel >= 2;
  require(kernel == 0 || (dtype != 0 && (bits <= 4 || (frag && bits == 8 && !per_channel))),
          "the tensor-core kernels need float16/bfloat16 x and bits <= 4 (fragment order: "
          "or 8 bits with one codebook per layer)");
  require(kernel != 3 || !per_channel || bits <= 3,
          "32-row blocks take per-channel codebooks at 2 and 3 bits only");
  require(dtype >= 0 && dtype <= 2, "dtype must be 0 (f32), 1 (f16) or 2 (bf16)");
  require(split_k >= 1, "split_k must be >= 1");
  require(split_k == 1 || workspace != 0, "split_k > 1 needs a workspace");
  require(k < (int64_t{1} << 31) && n < (int64_t{1} << 31), "k and n must be < 2**31");
  check_ptr(x, "x"), check_ptr(codebook, "codebook"), check_ptr(y, "y");
  check_planes(planes, bits);
  auto dev = device_planes(planes);
  if (frag) {
    check_cuda(otq::cuda::lut_linear_frag(
        as<const void>(x), dtype, m, k, dev.data(), bits, as<const float>(codebook), per_channel,
        n, as<const void>(bias), as<void>(y), split_k, as<float>(workspace),
        kernel == 3 ? 32 : 16, as<void>(stream)));
    return;
  }
  const auto launcher = kernel == 1 ? otq::cuda::lut_linear_mma : otq::cuda::lut_linear;
  check_cuda(launcher(as<const void>(x), dtype, m, k, dev.data(), bits, as<const float>(codebook),
                      per_channel, n, as<const void>(bias), as<void>(y), split_k,
                      as<float>(workspace), as<void>(stream)));
}

// sizes: batch, c, h, w, n; params: kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w.
void cuda_lut_conv2d(uintptr_t x, int dtype, const std::vector<int64_t>& sizes,
                     const std::vector<int>& params, const Ptrs& planes, int bits,
                     uintptr_t codebook, bool per_channel, uintptr_t bias, uintptr_t y,
                     bool y_nchw, int split_k, uintptr_t workspace, uintptr_t stream) {
  require(sizes.size() == 5 && params.size() == 8, "sizes needs 5 values and params 8");
  for (const int64_t s : sizes) check_size(s, "size");
  require(params[0] > 0 && params[1] > 0 && params[2] > 0 && params[3] > 0 && params[4] >= 0 &&
              params[5] >= 0 && params[6] > 0 && params[7] > 0,
          "kernel, stride and dilation must be positive, padding >= 0");
  require(dtype == 1 || dtype == 2, "dtype must be 1 (f16) or 2 (bf16)");
  require(bits >= 2 && bits <= 4, "bits must be 2..4");
  require(split_k >= 1, "split_k must be >= 1");
  require(split_k == 1 || workspace != 0, "split_k > 1 needs a workspace");
  check_ptr(x, "x"), check_ptr(codebook, "codebook"), check_ptr(y, "y");
  check_planes(planes, bits);
  auto dev = device_planes(planes);
  const otq::cuda::ConvShape shape{sizes[0], sizes[1], sizes[2], sizes[3], sizes[4],
                                   params[0], params[1], params[2], params[3],
                                   params[4], params[5], params[6], params[7]};
  check_cuda(otq::cuda::lut_conv2d(as<const void>(x), dtype, shape, dev.data(), bits,
                                   as<const float>(codebook), per_channel, as<const void>(bias),
                                   as<void>(y), y_nchw, split_k, as<float>(workspace),
                                   as<void>(stream)));
}

void cuda_fit_rows(uintptr_t x, int64_t r, int64_t n, int bits, bool nearest, uintptr_t codes,
                   uintptr_t centroids, uintptr_t workspace, size_t workspace_bytes,
                   uintptr_t stream) {
  check_bits(bits), check_size(r, "r"), check_size(n, "n");
  require(n < (int64_t{1} << 31), "rows longer than 2**31 - 1 values are not supported");
  check_ptr(x, "x"), check_ptr(codes, "codes"), check_ptr(centroids, "centroids");
  check_ptr(workspace, "workspace");
  require(workspace_bytes >= otq::cuda::fit_rows_workspace_bytes(r, n, bits),
          "workspace too small: use cuda_fit_rows_workspace_bytes");
  check_cuda(otq::cuda::fit_rows(as<const float>(x), r, n, bits, nearest, as<int64_t>(codes),
                                 as<float>(centroids), as<void>(workspace), workspace_bytes,
                                 as<void>(stream)));
}

size_t cuda_fit_rows_workspace_bytes(int64_t r, int64_t n, int bits) {
  check_bits(bits), check_size(r, "r"), check_size(n, "n");
  return otq::cuda::fit_rows_workspace_bytes(r, n, bits);
}

void cuda_pack(uintptr_t codes, int64_t n, int64_t k, int bits, const Ptrs& planes,
               uintptr_t stream) {
  check_bits(bits), check_size(n, "n"), check_size(k, "k"), check_ptr(codes, "codes");
  check_planes(planes, bits);
  auto dev = device_planes(planes);
  check_cuda(otq::cuda::pack(as<const int64_t>(codes), n, k, bits, dev.data(), as<void>(stream)));
}

void cuda_unpack(const Ptrs& planes, int64_t n, int64_t k, int bits, uintptr_t codes,
                 uintptr_t stream) {
  check_bits(bits), check_size(n, "n"), check_size(k, "k"), check_ptr(codes, "codes");
  check_planes(planes, bits);
  auto dev = device_planes(planes);
  check_cuda(otq::cuda::unpack(dev.data(), n, k, bits, as<int64_t>(codes), as<void>(stream)));
}

// Raises unless the current device can run the CUDA kernels (an image for its architecture).
void cuda_check_kernel_image() { check_cuda(otq::cuda::kernel_image_status()); }

void cuda_dequantize(const Ptrs& planes, int bits, uintptr_t codebook, bool per_channel,
                     int64_t n, int64_t k, int dtype, uintptr_t out, uintptr_t stream) {
  check_bits(bits), check_size(n, "n"), check_size(k, "k");
  require(dtype >= 0 && dtype <= 2, "dtype must be 0 (f32), 1 (f16) or 2 (bf16)");
  check_ptr(codebook, "codebook"), check_ptr(out, "out");
  check_planes(planes, bits);
  auto dev = device_planes(planes);
  check_cuda(otq::cuda::dequantize(dev.data(), bits, as<const float>(codebook), per_channel, n,
                                   k, dtype, as<void>(out), as<void>(stream)));
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "otq_kernels native kernels (CPU always; CUDA when WITH_CUDA)";
  // otq_kernels/_native.py refuses a build of another API_VERSION (a stale in-place build
  // after a pull): bump both together whenever a binding below changes.
  m.attr("API_VERSION") = 2;
#ifdef OTQ_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
  using namespace py::literals;
  m.def("cpu_pack", &cpu_pack, "codes"_a, "n"_a, "k"_a, "bits"_a, "planes"_a,
        "Pack int64 codes [n, k] into the bit planes (pointers, widest first).");
  m.def("cpu_unpack", &cpu_unpack, "planes"_a, "n"_a, "k"_a, "bits"_a, "codes"_a,
        "Unpack bit planes into int64 codes [n, k].");
  m.def("cpu_fit_rows", &cpu_fit_rows, "x"_a, "is_double"_a, "r"_a, "n"_a, "bits"_a,
        "nearest"_a, "codes"_a, "centroids"_a,
        "Equal-mass binning of x [r, n] (float32 or float64): int64 codes, f32 centroids.");
  m.def("cpu_lut_linear", &cpu_lut_linear, "x"_a, "m"_a, "k"_a, "planes"_a, "bits"_a,
        "codebook"_a, "groups"_a, "n"_a, "bias"_a, "y"_a,
        "y[m, n] = x[m, k] @ W^T + bias in float32 (bias pointer 0 = none).");
  m.def("cpu_dequantize", &cpu_dequantize, "planes"_a, "n"_a, "k"_a, "bits"_a, "codebook"_a,
        "groups"_a, "out"_a, "Dense float32 weight out[n, k] = codebook[g(row), code].");
  m.def("cpu_simd_path", &cpu_simd_path, "op"_a, "m"_a, "k"_a,
        "The SIMD path ('avx512', 'avx2', 'none') of op 'linear' (m x k) or 'dequantize'.");
#ifdef OTQ_WITH_CUDA
  m.attr("GEMV_MAX_M") = otq::cuda::kGemvMaxM;
  m.def("cuda_lut_linear", &cuda_lut_linear, "x"_a, "dtype"_a, "m"_a, "k"_a, "planes"_a,
        "bits"_a, "codebook"_a, "per_channel"_a, "n"_a, "bias"_a, "y"_a, "split_k"_a,
        "workspace"_a, "stream"_a, "kernel"_a = 0,
        "LUT GEMV (dtype 0 f32, 1 f16, 2 bf16), fp32 accumulation; kernel 1: the mma "
        "kernel (f16/bf16, bits <= 4), 2: the same on fragment-order planes (also 8 bits "
        "per layer), 3: kernel 2 with 32-row blocks (per-channel codebooks: 2-3 bits).");
  m.def("cuda_lut_conv2d", &cuda_lut_conv2d, "x"_a, "dtype"_a, "sizes"_a, "params"_a,
        "planes"_a, "bits"_a, "codebook"_a, "per_channel"_a, "bias"_a, "y"_a, "y_nchw"_a,
        "split_k"_a, "workspace"_a, "stream"_a,
        "Implicit-GEMM conv2d on tensor cores: x channels-last f16/bf16, tap-major planes "
        "(bits 2-4), y NCHW or NHWC.");
  m.def("cuda_fit_rows_workspace_bytes", &cuda_fit_rows_workspace_bytes, "r"_a, "n"_a,
        "bits"_a, "Workspace bytes cuda_fit_rows needs.");
  m.def("cuda_fit_rows", &cuda_fit_rows, "x"_a, "r"_a, "n"_a, "bits"_a, "nearest"_a, "codes"_a,
        "centroids"_a, "workspace"_a, "workspace_bytes"_a, "stream"_a,
        "Equal-mass binning of x float32 [r, n] with CUB segmented radix sort.");
  m.def("cuda_pack", &cuda_pack, "codes"_a, "n"_a, "k"_a, "bits"_a, "planes"_a, "stream"_a,
        "Pack int64 codes [n, k] into bit planes on the GPU.");
  m.def("cuda_unpack", &cuda_unpack, "planes"_a, "n"_a, "k"_a, "bits"_a, "codes"_a, "stream"_a,
        "Unpack bit planes into int64 codes [n, k] on the GPU.");
  m.def("cuda_check_kernel_image", &cuda_check_kernel_image,
        "Raise RuntimeError unless the current device can run the CUDA kernels.");
  m.def("cuda_dequantize", &cuda_dequantize, "planes"_a, "bits"_a, "codebook"_a,
        "per_channel"_a, "n"_a, "k"_a, "dtype"_a, "out"_a, "stream"_a,
        "The dense weight out [n, k] (dtype 0 f32, 1 f16, 2 bf16) of bit planes and the "
        "float32 codebook.");
#endif
}
