// Implicit-GEMM 2-D convolution on tensor cores with pair look-ups (groups = 1), fp16/bf16
// activations, 2-4-bit codes:
//   y[b, n, oh, ow] = bias[n] + sum over (kh, kw, c) of W[n, c, kh, kw] x[b, c, ih, iw],
//   ih = oh * sh - ph + kh * dh, iw = ow * sw - pw + kw * dw (zero outside the image).
//
// As a GEMM: A = W's rows (output channels, 16 per block, as in lut_mma.cu), B = the
// im2col columns of the output pixels (8 per n-tile, NT n-tiles per block, all sharing
// each A fragment), K' = (kh, kw, c) "tap-major": the codes are re-packed in that order
// once per layer (otq_kernels.backends.cuda.tap_major_planes), and x is channels-last
// [B, H, W, C], so a lane's 8 adjacent K' columns of a group are 8 channels of one tap
// of one pixel, one 16-byte load when C % 8 == 0 (masked element loads otherwise).
// The 4 warps of a block take turns over the groups of its K' range (split-K over
// gridDim.y, pixel tiles over gridDim.z); their fp32 results are summed in shared memory
// and written to y in NCHW or NHWC order, or as fp32 partials [splits, P, N] that
// conv_fixup_kernel sums (with the bias) into y.
#include "common.cuh"
#include "gemv_common.cuh"
#include "launchers.h"
#include "pair_tables.cuh"

namespace otq::cuda {
namespace {

// Output pixel p = (b * OH + oh) * OW + ow of y, in NCHW or NHWC order.
struct OutIndex {
  int64_t pixels_per_image, n;
  bool nchw;

  __device__ __forceinline__ int64_t operator()(int64_t p, int64_t row) const {
    if (!nchw) return p * n + row;
    return (p / pixels_per_image * n + row) * pixels_per_image + p % pixels_per_image;
  }
};

// The geometry of one launch: x [B, H, W, C] channels-last, y [B, N, OH, OW]. The sizes
// of one image and K' are below 2**31 (lut_conv2d checks), so per-group index arithmetic
// is 32-bit.
struct ConvGeometry {
  int c, h, w, oh, ow;
  int64_t pixels;  // B * OH * OW
  int kw, sh, sw, ph, pw, dh, dw;
  int k;  // K' = KH * KW * C
};

// Where a lane's 8 K' columns of a group lie: column col = channel c of tap (kh, kw). A
// warp's groups are kWarps apart, so the cursor moves on without a division.
struct TapCursor {
  int col, c, kh, kw;

  __device__ __forceinline__ TapCursor(const ConvGeometry& geo, int col_) : col(col_) {
    const int tap = col / geo.c;
    c = col - tap * geo.c;
    kh = tap / geo.kw;
    kw = tap - kh * geo.kw;
  }

  __device__ __forceinline__ void advance(const ConvGeometry& geo, int columns) {
    col += columns;
    c += columns;
    while (c >= geo.c) {
      c -= geo.c;
      if (++kw == geo.kw) kw = 0, ++kh;
    }
  }
};

// One lane's B columns: in n-tile j, B column g (= lane / 4) is output pixel p0 + 8j + g
// (clamped to the last pixel: its D columns are never written). The lane's 8 K' columns of
// a group start at 32 * group + 8 * t (t = lane % 4).
template <typename T, int NT>
struct ConvLaneX {
  int64_t corner[NT];  // x's offset of channel 0 at (ih0, iw0) of the pixel's image
  int ih0[NT], iw0[NT];  // the pixel's tap (0, 0), maybe outside the image
  int t;

  __device__ __forceinline__ ConvLaneX(const ConvGeometry& geo, int64_t p0) {
    const int lane = threadIdx.x % kWarpSize, g = lane / 4;
    t = lane % 4;
    const int64_t per_image = static_cast<int64_t>(geo.oh) * geo.ow;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      int64_t p = p0 + 8 * j + g;
      p = p < geo.pixels ? p : geo.pixels - 1;
      const int pix = static_cast<int>(p % per_image);
      ih0[j] = pix / geo.ow * geo.sh - geo.ph;
      iw0[j] = pix % geo.ow * geo.sw - geo.pw;
      corner[j] = (p / per_image * geo.h * geo.w + static_cast<int64_t>(ih0[j]) * geo.w +
                   iw0[j]) * geo.c;
    }
  }

  __device__ __forceinline__ int first_column(int64_t group) const {
    return static_cast<int>(group) * kGroup + kLaneColumns * t;
  }

  // Whether n-tile j's pixel moved by (dy, dx) lies in the image.
  __device__ __forceinline__ bool inside(const ConvGeometry& geo, int j, int dy, int dx) const {
    return static_cast<unsigned>(ih0[j] + dy) < static_cast<unsigned>(geo.h) &&
           static_cast<unsigned>(iw0[j] + dx) < static_cast<unsigned>(geo.w);
  }

  // b[j] = the lane's 8 columns at `at` for n-tile j as 4 packed pairs: one tap's 8
  // channels, one 16-byte load (C % 8 == 0 and x 16-byte aligned), zero outside the image
  // or past K'.
  __device__ __forceinline__ void load(uint32_t (&b)[NT][4], const T* x, const ConvGeometry& geo,
                                       const TapCursor& at) const {
    const int dy = at.kh * geo.dh, dx = at.kw * geo.dw;
    const int64_t shift = (static_cast<int64_t>(dy) * geo.w + dx) * geo.c + at.c;
    const bool in_k = at.col < geo.k;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      const uint4 v = in_k && inside(geo, j, dy, dx)
                          ? __ldg(reinterpret_cast<const uint4*>(x + (corner[j] + shift)))
                          : make_uint4(0u, 0u, 0u, 0u);
      b[j][0] = v.x, b[j][1] = v.y, b[j][2] = v.z, b[j][3] = v.w;
    }
  }

  // The same column by column (any C, any alignment): element loads, zero outside the
  // image or past K'.
  __device__ __forceinline__ void load_elements(uint32_t (&b)[NT][4], const T* x,
                                                const ConvGeometry& geo, int64_t group) const {
    const T zero = from_float<T>(0.f);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const TapCursor at(geo, first_column(group) + i);
      const int dy = at.kh * geo.dh, dx = at.kw * geo.dw;
      const int64_t shift = (static_cast<int64_t>(dy) * geo.w + dx) * geo.c + at.c;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const T v = at.col < geo.k && inside(geo, j, dy, dx) ? x[corner[j] + shift] : zero;
        const uint32_t half = i % 2 ? pack2(zero, v) : pack2(v, zero);
        b[j][i / 2] = i % 2 ? b[j][i / 2] | half : half;
      }
    }
  }
};

template <typename T, int BITS, bool PER_CHANNEL, int NT, bool VEC>
__global__ void __launch_bounds__(kThreads)
    lut_conv_kernel(const T* __restrict__ x, ConvGeometry geo, PlaneArgs planes,
                    const float* __restrict__ codebook, int64_t n, const T* __restrict__ bias,
                    T* __restrict__ y, OutIndex out, float* __restrict__ partial,
                    int64_t groups_per_split, int64_t first_tile) {
  uint32_t* table = dynamic_shared<uint32_t>();
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t block_row = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t p0 = (first_tile + blockIdx.z) * kTileBatch * NT;
  build_pair_tables<T, BITS, PER_CHANNEL>(table, codebook, block_row, n);
  __syncthreads();

  const int64_t g_begin = static_cast<int64_t>(blockIdx.y) * groups_per_split;
  const int64_t g_end = min(padded_k(geo.k) / kGroup, g_begin + groups_per_split);
  float d[NT][4] = {};
  {
    const LaneTile<T, BITS, PER_CHANNEL, NT, 1> tile(table, x, 1, 0, planes, block_row, n);
    const ConvLaneX<T, NT> columns(geo, p0);
    TapCursor at(geo, columns.first_column(g_begin + warp));
#pragma unroll 1
    for (int64_t group = g_begin + warp; group < g_end; group += kWarps) {
      LaneWords<BITS, 1> words[2];
      tile.load(words, group);
      uint32_t b[1][NT][4];
      if (VEC) {
        columns.load(b[0], x, geo, at);
        at.advance(geo, kWarps * kGroup);
      } else {
        columns.load_elements(b[0], x, geo, group);
      }
      tile.accumulate(d, words, b);
    }
  }

  // The warps' sums as in store_block_sums (pair_tables.cuh), stored by pixel. Not shared:
  // one helper for both changed ptxas' register allocation of the timed lut_mma kernels
  // (session 42: 56-104 -> 56-120; session 43, with a store functor: the 3-bit one-row
  // kernel 95 -> 103).
  __syncthreads();  // every warp is done with the tables: reuse them for the warps' sums
  float* sums = reinterpret_cast<float*>(table);  // [warp][lane][4 * NT]
#pragma unroll
  for (int i = 0; i < 4 * NT; ++i) sums[(warp * kWarpSize + lane) * 4 * NT + i] = d[i / 4][i % 4];
  __syncthreads();
  if (warp != 0) return;
#pragma unroll
  for (int i = 0; i < 4 * NT; ++i) {
    float s = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += sums[(w * kWarpSize + lane) * 4 * NT + i];
    const int64_t row = block_row + lane / 4 + 8 * (i % 4 / 2);
    const int64_t p = p0 + 8 * (i / 4) + 2 * (lane % 4) + i % 2;
    if (row >= n || p >= geo.pixels) continue;
    if (partial != nullptr)
      partial[(static_cast<int64_t>(blockIdx.y) * geo.pixels + p) * n + row] = s;
    else
      y[out(p, row)] = from_float<T>(s + (bias != nullptr ? to_float(bias[row]) : 0.f));
  }
}

// y[out(p, row)] = sum over splits of partial[s, p, row] + bias[row]; partial [splits, P, N].
template <typename T>
__global__ void conv_fixup_kernel(const float* __restrict__ partial, int splits, int64_t pn,
                                  const T* __restrict__ bias, T* __restrict__ y, OutIndex out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < pn;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int sp = 0; sp < splits; ++sp) s += partial[sp * pn + i];
    const int64_t row = i % out.n;
    y[out(i / out.n, row)] = from_float<T>(s + (bias != nullptr ? to_float(bias[row]) : 0.f));
  }
}

// Pixels per block: 8 n-tiles (64 pixels) unless the whole output is smaller.
constexpr int kWideTiles = 8;
constexpr int kNarrowTiles = 2;

template <typename T, int BITS, bool PER_CHANNEL, int NT>
auto conv_kernel(bool vec) {
  return vec ? lut_conv_kernel<T, BITS, PER_CHANNEL, NT, true>
             : lut_conv_kernel<T, BITS, PER_CHANNEL, NT, false>;
}

struct ConvLaunch {
  const void* x;
  ConvGeometry geo;
  PlaneArgs planes;
  const float* codebook;
  bool per_channel;
  int64_t n;
  const void* bias;
  void* y;
  OutIndex out;
  int split_k;
  float* workspace;
  cudaStream_t stream;
};

template <typename T, int BITS, bool PER_CHANNEL, int NT>
int launch_conv(const ConvLaunch& a) {
  const T* x = static_cast<const T*>(a.x);
  const bool vec = a.geo.c % kLaneColumns == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  const auto kernel = conv_kernel<T, BITS, PER_CHANNEL, NT>(vec);
  const int sum_words = kThreads * 4 * NT;
  const int words = table_words<BITS>(PER_CHANNEL);
  const size_t smem = sizeof(uint32_t) * (words > sum_words ? words : sum_words);
  const cudaError_t err = allow_dynamic_smem(kernel, smem);
  if (err != cudaSuccess) return static_cast<int>(err);
  const SplitK split(a.geo.k, a.split_k);
  const int64_t pixel_tiles = (a.geo.pixels + kTileBatch * NT - 1) / (kTileBatch * NT);
  float* partial = split.splits > 1 ? a.workspace : nullptr;
  const T* bias = static_cast<const T*>(a.bias);
  T* y = static_cast<T*>(a.y);
  for (int64_t first = 0; first < pixel_tiles; first += kMaxGridY) {  // gridDim.z <= 65535
    const int64_t tiles = pixel_tiles - first < kMaxGridY ? pixel_tiles - first : kMaxGridY;
    const dim3 grid(static_cast<unsigned>((a.n + kTileRows - 1) / kTileRows),
                    static_cast<unsigned>(split.splits), static_cast<unsigned>(tiles));
    OTQ_LAUNCH(grid, kThreads, smem, a.stream, kernel)(x, a.geo, a.planes, a.codebook, a.n,
                                                        bias, y, a.out, partial,
                                                        split.groups_per_split, first);
  }
  if (partial != nullptr) {
    const int64_t pn = a.geo.pixels * a.n;
    OTQ_LAUNCH(blocks_for(pn, 256), 256, 0, a.stream, conv_fixup_kernel<T>)(
        partial, static_cast<int>(split.splits), pn, bias, y, a.out);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename T, int BITS>
int launch_conv(const ConvLaunch& a) {
  const bool wide = a.geo.pixels > kTileBatch * kNarrowTiles;
  if (a.per_channel)
    return wide ? launch_conv<T, BITS, true, kWideTiles>(a)
                : launch_conv<T, BITS, true, kNarrowTiles>(a);
  return wide ? launch_conv<T, BITS, false, kWideTiles>(a)
              : launch_conv<T, BITS, false, kNarrowTiles>(a);
}

template <typename T>
int launch_conv(int bits, const ConvLaunch& a) {
  switch (bits) {
    case 2: return launch_conv<T, 2>(a);
    case 3: return launch_conv<T, 3>(a);
    case 4: return launch_conv<T, 4>(a);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace

int lut_conv2d(const void* x, int dtype, const ConvShape& s, const uint32_t* const* planes,
               int bits, const float* codebook, bool per_channel, const void* bias, void* y,
               bool y_nchw, int split_k, float* workspace, void* stream) {
  const int64_t oh = conv_out_size(s.h, s.kh, s.stride_h, s.pad_h, s.dil_h);
  const int64_t ow = conv_out_size(s.w, s.kw, s.stride_w, s.pad_w, s.dil_w);
  const int64_t k = static_cast<int64_t>(s.kh) * s.kw * s.c;
  constexpr int64_t kMaxInt = (int64_t{1} << 31) - 1;
  if (bits < kMinBits || bits > kMaxMmaBits || s.batch <= 0 || s.c <= 0 || s.n <= 0 ||
      oh <= 0 || ow <= 0 || split_k < 1 || padded_k(k) + kWarps * kGroup > kMaxInt ||
      s.h * s.w * s.c > kMaxInt || oh * ow > kMaxInt)
    return static_cast<int>(cudaErrorInvalidValue);
  const ConvGeometry geo{static_cast<int>(s.c), static_cast<int>(s.h), static_cast<int>(s.w),
                         static_cast<int>(oh), static_cast<int>(ow), s.batch * oh * ow, s.kw,
                         s.stride_h, s.stride_w, s.pad_h, s.pad_w, s.dil_h, s.dil_w,
                         static_cast<int>(k)};
  const ConvLaunch a{x, geo, plane_args(planes, bits, k), codebook, per_channel, s.n, bias, y,
                     OutIndex{oh * ow, s.n, y_nchw}, split_k, workspace, as_stream(stream)};
  switch (dtype) {
    case kFloat16: return launch_conv<__half>(bits, a);
    case kBFloat16: return launch_conv<__nv_bfloat16>(bits, a);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace otq::cuda
