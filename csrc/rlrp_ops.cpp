// CPU kernels of the cpp backend, registered as torch.ops.rlrp_fast.*.
//
// Each op is "ATen's GEMM / transposed convolution + one fused elementwise pass": the
// contraction W^T g is left to ATen (oneDNN/MKL beat anything we could write here), and
// everything around it -- the division by the stabilised z before, the multiplication by the
// activation, the per-sample scale and the per-sample L1 norm after -- is done in a single
// parallel pass over memory instead of the three or four separate passes plain PyTorch needs.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

namespace rlrp_fast {
namespace {

using at::Tensor;

// Elements per parallel/reduction block. Fixed (not derived from the thread count) so that
// the per-sample L1 norms are bit-identical whatever the number of threads.
constexpr int64_t kBlock = 1 << 14;

// The memory format every output of these ops has: channels-last when `like` is laid out
// channels-last, contiguous otherwise (ATen's suggest_memory_format; the fake
// implementations in Python follow the same rule).
at::MemoryFormat layout_of(const Tensor& like) { return like.suggest_memory_format(); }

// True when t is stored densely in `fmt`: two such tensors of one shape hold element i at the
// same offset, and sample n occupies the contiguous range [n*S, (n+1)*S).
bool flat_in(const Tensor& t, at::MemoryFormat fmt) { return t.is_contiguous(fmt); }

// The layer's geometry as the ops receive it (conv_dims 0 is a Linear).
struct Geometry {
  at::IntArrayRef stride, padding, dilation;
  int64_t groups;
  int64_t conv_dims;
};

void check_relevance(const Tensor& g, const Tensor& weight) {
  TORCH_CHECK(g.device().is_cpu() && weight.device().is_cpu(),
              "rlrp_fast: the cpp backend runs on CPU tensors");
  TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble,
              "rlrp_fast: relevance must be float32 or float64, got ", g.scalar_type());
  TORCH_CHECK(weight.scalar_type() == g.scalar_type(), "rlrp_fast: weight dtype ",
              weight.scalar_type(), " differs from relevance dtype ", g.scalar_type());
  TORCH_CHECK(g.dim() >= 1, "rlrp_fast: relevance needs a batch dim");
}

void check_geometry(const Tensor& weight, at::IntArrayRef out_shape, const Geometry& geo) {
  TORCH_CHECK(geo.conv_dims >= 0 && geo.conv_dims <= 3, "rlrp_fast: conv_dims must be 0..3, ",
              "got ", geo.conv_dims);
  if (geo.conv_dims == 0) return;
  const auto d = static_cast<size_t>(geo.conv_dims);
  TORCH_CHECK(out_shape.size() == d + 2, "rlrp_fast: the input shape must have ", d + 2,
              " dims, got ", out_shape.size());
  TORCH_CHECK(weight.dim() == geo.conv_dims + 2, "rlrp_fast: weight must have ", d + 2,
              " dims, got ", weight.dim());
  TORCH_CHECK(geo.stride.size() == d && geo.padding.size() == d && geo.dilation.size() == d,
              "rlrp_fast: stride, padding and dilation need ", d, " values each");
}

// -- W^T g ---------------------------------------------------------------------------------

// A 1x1 convolution (any stride and padding, one group) on NCHW-contiguous data is one GEMM
// per sample on the output grid; its adjoint scatters that GEMM's result onto the input grid.
// ATen's convolution_backward gets there the long way (a zero fill, then for stride > 1 a
// slow strided copy), and these are two thirds of a ResNet50's layers.
bool is_pointwise(const Tensor& weight, const Geometry& geo, at::MemoryFormat fmt) {
  if (geo.conv_dims == 0 || geo.groups != 1 || fmt != at::MemoryFormat::Contiguous) return false;
  for (int64_t i = 0; i < geo.conv_dims; ++i) {
    if (weight.size(2 + i) != 1) return false;
  }
  return true;
}

bool is_unit_grid(const Geometry& geo) {
  for (int64_t i = 0; i < geo.conv_dims; ++i) {
    if (geo.stride[i] != 1 || geo.padding[i] != 0) return false;
  }
  return true;
}

// W^T g of a pointwise convolution on its output grid: (N, C_in, prod(output spatial)).
Tensor pointwise_transpose(const Tensor& g, const Tensor& weight) {
  const int64_t n = g.size(0), c_out = g.size(1), c_in = weight.size(1);
  Tensor w_t = weight.reshape({c_out, c_in}).t();  // (C_in, C_out), a view
  Tensor g3 = g.reshape({n, c_out, -1});
  // One GEMM per sample straight into its slice of a dense buffer (the epilogues index it
  // densely): at::matmul would fold the batch into one transposed GEMM and pay two full
  // copies for it.
  Tensor buf = at::empty({n, c_in, g3.size(2)}, g.options());
  for (int64_t i = 0; i < n; ++i) {
    Tensor slice = buf[i];
    at::mm_out(slice, w_t, g3[i]);
  }
  return buf;
}

// The transposed convolution's output_padding that recovers the input size out_shape from g;
// rejects a g that no input of that shape yields.
std::vector<int64_t> output_padding_of(const Tensor& g, const Tensor& weight,
                                       at::IntArrayRef out_shape, const Geometry& geo) {
  TORCH_CHECK(g.dim() == geo.conv_dims + 2 && g.size(0) == out_shape[0] &&
                  g.size(1) == weight.size(0),
              "rlrp_fast: relevance of shape ", g.sizes(), " cannot come from an input of ",
              "shape ", out_shape, " with weight ", weight.sizes());
  std::vector<int64_t> output_padding(geo.conv_dims);
  for (int64_t i = 0; i < geo.conv_dims; ++i) {
    const int64_t covered = (g.size(2 + i) - 1) * geo.stride[i] - 2 * geo.padding[i] +
                            geo.dilation[i] * (weight.size(2 + i) - 1) + 1;
    output_padding[i] = out_shape[2 + i] - covered;
    TORCH_CHECK(output_padding[i] >= 0 && output_padding[i] < std::max(geo.stride[i],
                                                                        geo.dilation[i]),
                "rlrp_fast: relevance of shape ", g.sizes(), " cannot come from an input of ",
                "shape ", out_shape, " with this geometry");
  }
  return output_padding;
}

// W^T g for a Linear or the adjoint of ConvNd, with shape out_shape, laid out in fmt.
Tensor transpose_apply(const Tensor& g, const Tensor& weight, at::IntArrayRef out_shape,
                       at::MemoryFormat fmt, const Geometry& geo) {
  if (geo.conv_dims == 0) {
    return g.dim() == 2 ? at::mm(g, weight) : at::matmul(g, weight);  // (..., out)(out, in)
  }
  // The transposed convolution with the output_padding that recovers the input's size.
  // (convolution_backward's grad_input computes the same without that bookkeeping, but
  // measured 0-3% slower end to end on VGG16/ResNet50 here.) Its output takes g's layout, so
  // g goes to the wanted layout first (a no-op unless a and g disagree).
  const std::vector<int64_t> output_padding = output_padding_of(g, weight, out_shape, geo);
  Tensor gf = flat_in(g, fmt) ? g : g.contiguous(fmt);
  return at::convolution(gf, weight, std::nullopt, geo.stride, geo.padding, geo.dilation,
                         /*transposed=*/true, output_padding, geo.groups);
}

// -- elementwise kernels ---------------------------------------------------------------------

// Per-sample sums of fixed blocks, added in block order: deterministic.
void finish_l1(const std::vector<double>& partial, int64_t n_samples, int64_t per, double* out) {
  for (int64_t n = 0; n < n_samples; ++n) {
    double sum = 0;
    for (int64_t k = 0; k < per; ++k) sum += partial[n * per + k];
    out[n] = sum;
  }
}

// t <- t * a * s in place over [0, len) (a may be null: factor 1); returns sum |t| when
// want_sum. One pass: each value is summed while still in a register. Partial sums run in
// T over short chunks (16 lanes x 16 values: the compiler vectorises them without
// -ffast-math, and their rounding stays ~1e-7 relative), then go to double.
template <typename T, typename A>
double scale_abs_sum(T* __restrict__ t, const A* __restrict__ a, T s, int64_t len,
                     bool want_sum) {
  constexpr int kLanes = 16;
  constexpr int64_t kChunk = 256;
  double sum = 0;
  for (int64_t lo = 0; lo < len; lo += kChunk) {
    const int64_t hi = std::min(len, lo + kChunk);
    T acc[kLanes] = {};
    int64_t i = lo;
    for (; i + kLanes <= hi; i += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        const T v = a ? t[i + j] * static_cast<T>(a[i + j]) * s : t[i + j] * s;
        t[i + j] = v;
        acc[j] += std::abs(v);
      }
    }
    for (; i < hi; ++i) {
      const T v = a ? t[i] * static_cast<T>(a[i]) * s : t[i] * s;
      t[i] = v;
      acc[0] += std::abs(v);
    }
    if (want_sum) {
      for (int j = 0; j < kLanes; ++j) sum += static_cast<double>(acc[j]);
    }
  }
  return sum;
}

// t <- t * a * scale[n] in place (a, scale may be null: factor 1); l1[n] <- sum |t| over
// sample n when l1 is not null. t and a share a flat layout of per_sample elements a sample.
template <typename T, typename A>
void epilogue_flat(T* t, const A* a, const T* scale, int64_t n_samples, int64_t per_sample,
                   double* l1) {
  const int64_t blocks_per_sample = std::max<int64_t>(1, (per_sample + kBlock - 1) / kBlock);
  std::vector<double> partial(n_samples * blocks_per_sample, 0.0);
  at::parallel_for(0, n_samples * blocks_per_sample, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks_per_sample;
      const int64_t lo = n * per_sample + (b % blocks_per_sample) * kBlock;
      const int64_t hi = std::min(lo + kBlock, (n + 1) * per_sample);
      partial[b] = scale_abs_sum<T, A>(t + lo, a ? a + lo : nullptr,
                                       scale ? scale[n] : T(1), hi - lo, l1 != nullptr);
    }
  });
  if (l1) finish_l1(partial, n_samples, blocks_per_sample, l1);
}

// The pointwise-convolution epilogue: out[n, c, x] = buf[n, c, grid(x)] * a * scale[n] where
// input position x lies on the output grid (x + padding divisible by stride, inside the
// grid), 0 elsewhere; l1 as above. Spatial dims are padded to 3 (size 1, stride 1, pad 0).
template <typename T, typename A>
void epilogue_scatter(T* out, const T* buf, const A* a, const T* scale, int64_t n_samples,
                      int64_t channels, const int64_t* in_sz, const int64_t* grid_sz,
                      const int64_t* st, const int64_t* pad, double* l1) {
  const int64_t plane = in_sz[0] * in_sz[1] * in_sz[2];
  const int64_t grid_plane = grid_sz[0] * grid_sz[1] * grid_sz[2];
  std::vector<int64_t> map[3];  // per input coordinate: its grid index, -1 off the grid
  for (int d = 0; d < 3; ++d) {
    map[d].resize(in_sz[d]);
    for (int64_t x = 0; x < in_sz[d]; ++x) {
      const int64_t p = x + pad[d];
      map[d][x] = (p % st[d] == 0 && p / st[d] < grid_sz[d]) ? p / st[d] : -1;
    }
  }
  const int64_t n_planes = n_samples * channels;
  std::vector<double> partial(n_planes, 0.0);
  const int64_t grain = std::max<int64_t>(1, kBlock / std::max<int64_t>(1, plane));
  at::parallel_for(0, n_planes, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t pl = p0; pl < p1; ++pl) {
      const T s = scale ? scale[pl / channels] : T(1);
      T* o = out + pl * plane;
      const A* ap = a ? a + pl * plane : nullptr;
      const T* bp = buf + pl * grid_plane;
      double sum = 0;
      int64_t i = 0;
      for (int64_t z = 0; z < in_sz[0]; ++z) {
        for (int64_t y = 0; y < in_sz[1]; ++y) {
          const bool row_on = map[0][z] >= 0 && map[1][y] >= 0;
          const T* row = bp + (map[0][z] * grid_sz[1] + map[1][y]) * grid_sz[2];
          for (int64_t x = 0; x < in_sz[2]; ++x, ++i) {
            const int64_t gx = map[2][x];
            T v = T(0);
            if (row_on && gx >= 0) {
              v = ap ? row[gx] * static_cast<T>(ap[i]) * s : row[gx] * s;
              sum += static_cast<double>(std::abs(v));
            }
            o[i] = v;
          }
        }
      }
      partial[pl] = sum;
    }
  });
  if (l1) finish_l1(partial, n_samples, channels, l1);
}

// q <- g / stab(z), stab(z) = z + eps * (sign(z) + (z == 0)) (zennit's stabiliser).
template <typename T, typename Z>
void divide_stabilized(T* q, const T* g, const Z* z, double eps, int64_t numel) {
  const T e = static_cast<T>(eps);
  at::parallel_for(0, numel, kBlock, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T zi = static_cast<T>(z[i]);
      // sign(z) + (z == 0) is -1 for z < 0 and +1 otherwise (NaN stays NaN either way)
      q[i] = g[i] / (zi + (zi < T(0) ? -e : e));
    }
  });
}

// -- depthwise convolutions ------------------------------------------------------------------

// One input channel a group (groups == C_in), C_out = mult * C_in: ATen's CPU transposed
// convolution takes a slow generic path for these (a GEMM of one row per group), while the
// adjoint is a small stencil per channel. It is computed directly here, the epilogue fused.
// Largest kernel extent per dim the direct path takes (its tap lists live on the stack).
constexpr int64_t kMaxKernel = 64;

bool is_depthwise(const Tensor& weight, at::IntArrayRef out_shape, const Geometry& geo) {
  if (geo.conv_dims == 0 || geo.groups == 1 || geo.groups != out_shape[1] ||
      weight.size(1) != 1) {
    return false;
  }
  for (int64_t i = 0; i < geo.conv_dims; ++i) {
    if (weight.size(2 + i) > kMaxKernel) return false;
  }
  return true;
}

// The geometry padded to 3 spatial dims (size 1, kernel 1, stride 1, padding 0 in front).
struct Grid3 {
  int64_t in[3] = {1, 1, 1}, out[3] = {1, 1, 1}, k[3] = {1, 1, 1};
  int64_t st[3] = {1, 1, 1}, pad[3] = {0, 0, 0}, dil[3] = {1, 1, 1};

  Grid3(const Tensor& g, const Tensor& weight, at::IntArrayRef out_shape, const Geometry& geo) {
    const int64_t off = 3 - geo.conv_dims;
    for (int64_t i = 0; i < geo.conv_dims; ++i) {
      in[off + i] = out_shape[2 + i];
      out[off + i] = g.size(2 + i);
      k[off + i] = weight.size(2 + i);
      st[off + i] = geo.stride[i];
      pad[off + i] = geo.padding[i];
      dil[off + i] = geo.dilation[i];
    }
  }
  int64_t in_plane() const { return in[0] * in[1] * in[2]; }
  int64_t out_plane() const { return out[0] * out[1] * out[2]; }
  int64_t taps() const { return k[0] * k[1] * k[2]; }

  // The output indices [lo, hi) whose tap kk of dim d lands inside the input:
  // 0 <= o * st + kk * dil - pad < in.
  void range(int d, int64_t kk, int64_t* lo, int64_t* hi) const {
    const int64_t shift = kk * dil[d] - pad[d];
    const int64_t first = shift >= 0 ? 0 : (-shift + st[d] - 1) / st[d];
    const int64_t last = in[d] - 1 - shift;  // o * st <= last
    *lo = first;
    *hi = last < 0 ? 0 : std::min(out[d], last / st[d] + 1);
  }

  // Per input coordinate of dim d: the (tap, output index) pairs that read it.
  std::vector<std::vector<std::pair<int64_t, int64_t>>> readers(int d) const {
    std::vector<std::vector<std::pair<int64_t, int64_t>>> r(in[d]);
    for (int64_t x = 0; x < in[d]; ++x) {
      for (int64_t kk = 0; kk < k[d]; ++kk) {
        const int64_t p = x + pad[d] - kk * dil[d];
        if (p >= 0 && p % st[d] == 0 && p / st[d] < out[d]) r[x].emplace_back(kk, p / st[d]);
      }
    }
    return r;
  }
};

// The extension is built for the baseline x86-64 ISA (one portable binary), but the depthwise
// stencils below are nothing but multiply-adds: GCC builds them for AVX-512 and AVX2 too and
// picks one when the library loads (an ifunc). On the functions holding the hot loops
// themselves: a clone's callees get the baseline ISA unless inlined.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
#define RLRP_ISA_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLRP_ISA_CLONES
#endif

using Readers = std::vector<std::vector<std::pair<int64_t, int64_t>>>;

// The taps of dim d that phase ph reads: input position ph + m * stride takes tap k from
// output position m + off (floor division: off may be negative). Returns their count.
inline int64_t phase_taps(const Grid3& grid, int d, int64_t ph, int64_t* taps, int64_t* off) {
  int64_t n = 0;
  const int64_t st = grid.st[d];
  for (int64_t k = 0; k < grid.k[d]; ++k) {
    const int64_t r = ph + grid.pad[d] - k * grid.dil[d];
    if (((r % st) + st) % st == 0) {
      taps[n] = k;
      off[n++] = r >= 0 ? r / st : -((-r + st - 1) / st);
    }
  }
  return n;
}

// One NCHW plane (n, c) of W^T g, then the epilogue over the plane; returns its sum |.| when
// want_sum. Input positions of one phase (i = ph + m * stride, per dim) read the same taps at
// consecutive output positions, so each input row of a phase is a sum of contiguous axpys
// into the scratch row acc, written out once (strided by the stride). g points at the plane
// of output channel c * mult, w at that channel's taps.
template <typename T, typename A>
RLRP_ISA_CLONES double depthwise_plane(T* __restrict__ o, const T* g, const T* w,
                                       const A* a, T s, int64_t mult, const Grid3& grid,
                                       T* __restrict__ acc, bool want_sum) {
  const int64_t out_plane = grid.out_plane(), taps = grid.taps();
  int64_t tap0[kMaxKernel], off0[kMaxKernel], tap1[kMaxKernel], off1[kMaxKernel];
  int64_t tap2[kMaxKernel], off2[kMaxKernel];
  for (int64_t ph0 = 0; ph0 < std::min(grid.st[0], grid.in[0]); ++ph0) {
    const int64_t n0 = phase_taps(grid, 0, ph0, tap0, off0);
    for (int64_t ph1 = 0; ph1 < std::min(grid.st[1], grid.in[1]); ++ph1) {
      const int64_t n1 = phase_taps(grid, 1, ph1, tap1, off1);
      for (int64_t ph2 = 0; ph2 < std::min(grid.st[2], grid.in[2]); ++ph2) {
        const int64_t n2 = phase_taps(grid, 2, ph2, tap2, off2);
        const int64_t count2 = (grid.in[2] - ph2 + grid.st[2] - 1) / grid.st[2];
        for (int64_t i0 = ph0, m0 = 0; i0 < grid.in[0]; i0 += grid.st[0], ++m0) {
          for (int64_t i1 = ph1, m1 = 0; i1 < grid.in[1]; i1 += grid.st[1], ++m1) {
            std::fill(acc, acc + count2, T(0));
            for (int64_t j = 0; j < mult; ++j) {
              for (int64_t t0 = 0; t0 < n0; ++t0) {
                const int64_t q0 = m0 + off0[t0];
                if (q0 < 0 || q0 >= grid.out[0]) continue;
                for (int64_t t1 = 0; t1 < n1; ++t1) {
                  const int64_t q1 = m1 + off1[t1];
                  if (q1 < 0 || q1 >= grid.out[1]) continue;
                  const T* grow = g + j * out_plane + (q0 * grid.out[1] + q1) * grid.out[2];
                  const T* wrow =
                      w + j * taps + (tap0[t0] * grid.k[1] + tap1[t1]) * grid.k[2];
                  for (int64_t t2 = 0; t2 < n2; ++t2) {
                    const T wv = wrow[tap2[t2]];
                    const int64_t lo = std::max<int64_t>(0, -off2[t2]);
                    const int64_t hi = std::min(count2, grid.out[2] - off2[t2]);
                    const T* __restrict__ src = grow + off2[t2];
                    for (int64_t m2 = lo; m2 < hi; ++m2) acc[m2] += wv * src[m2];
                  }
                }
              }
            }
            T* orow = o + (i0 * grid.in[1] + i1) * grid.in[2] + ph2;
            if (grid.st[2] == 1) {
              std::copy(acc, acc + count2, orow);
            } else {
              for (int64_t m2 = 0; m2 < count2; ++m2) orow[m2 * grid.st[2]] = acc[m2];
            }
          }
        }
      }
    }
  }
  return scale_abs_sum<T, A>(o, a, s, grid.in_plane(), want_sum);
}

// o[p * ld + c] += sum over the taps reading input position p = (i0, i1, i2) and j < mult of
// g[q * ld_g + c * mult + j] * w_t[tap * ld_g + c * mult + j], q the output position the tap
// reads: the channels of one position as a vector (channels-last rows, NCHW channel blocks).
template <typename T>
RLRP_ISA_CLONES void gather_position(T* __restrict__ o, const T* __restrict__ g, const T* __restrict__ w_t,
                            int64_t channels, int64_t mult, int64_t ld_g, const Grid3& grid,
                            const Readers* readers, int64_t i0, int64_t i1, int64_t i2) {
  for (const auto& [k0, o0] : readers[0][i0]) {
    for (const auto& [k1, o1] : readers[1][i1]) {
      for (const auto& [k2, o2] : readers[2][i2]) {
        const T* __restrict__ gq = g + ((o0 * grid.out[1] + o1) * grid.out[2] + o2) * ld_g;
        const T* __restrict__ wq = w_t + ((k0 * grid.k[1] + k1) * grid.k[2] + k2) * ld_g;
        if (mult == 1) {
          for (int64_t c = 0; c < channels; ++c) o[c] += gq[c] * wq[c];
        } else {
          for (int64_t c = 0; c < channels; ++c) {
            T sum = T(0);
            for (int64_t j = 0; j < mult; ++j) sum += gq[c * mult + j] * wq[c * mult + j];
            o[c] += sum;
          }
        }
      }
    }
  }
}

// Channels of one stencil vector (an AVX-512 register of floats).
constexpr int64_t kLanes = 16;

// Positions of a register tile in the gather below (kTile x kLanes accumulators).
constexpr int64_t kTile = 4;

#if defined(__GNUC__)
// kLanes values as one vector value (GCC/Clang vector extensions): the tile's sums then stay
// in registers (as arrays, GCC keeps them on the stack).
template <typename T>
struct LaneVec {
  typedef T type __attribute__((vector_size(kLanes * sizeof(T))));
};
template <typename T>
__attribute__((always_inline)) inline typename LaneVec<T>::type load_lanes(const T* p) {
  typename LaneVec<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
#define RLRP_LANE_VECTORS 1
#endif
// Most (tap row, output row) pairs one input row reads: 7x7x7 kernels fit.
constexpr int64_t kMaxRowPairs = 512;

// Channel multiplier 1, `lanes` (<= kLanes) channels of one sample, channel-minor: writes
// input row (i0, i1) of W^T g to o (o[p * ldo + c], input position p; g[q * ldg + c], output
// position q; w_t[tap * ldw + c]). Positions of one phase (i2 = ph + m * stride) read the
// same taps at consecutive output positions, so interior runs of them are computed kTile at
// a time with the sums in registers and each weight vector loaded once for the tile; border
// positions test each tap. kFull: lanes == kLanes, known to the compiler.
template <typename T, bool kFull>
RLRP_ISA_CLONES void gather_row_lanes(T* __restrict__ o, int64_t ldo, const T* __restrict__ g,
                             int64_t ldg, const T* __restrict__ w_t, int64_t ldw,
                             int64_t lanes, const Grid3& grid, const Readers* readers,
                             int64_t i0, int64_t i1) {
  const int64_t nl = kFull ? kLanes : lanes;
  // the (output row, tap row) pairs that read this input row
  const T* g_rows[kMaxRowPairs];
  const T* w_rows[kMaxRowPairs];
  int64_t n_rows = 0;
  for (const auto& [k0, o0] : readers[0][i0]) {
    for (const auto& [k1, o1] : readers[1][i1]) {
      g_rows[n_rows] = g + (o0 * grid.out[1] + o1) * grid.out[2] * ldg;
      w_rows[n_rows] = w_t + (k0 * grid.k[1] + k1) * grid.k[2] * ldw;
      ++n_rows;
    }
  }
  const int64_t s2 = grid.st[2], width = grid.in[2], out_w = grid.out[2];
  for (int64_t ph = 0; ph < std::min(s2, width); ++ph) {
    // this phase's taps: k2 reads output m + off[t] at input position ph + m * s2
    int64_t taps[kMaxKernel], off[kMaxKernel];
    const int64_t n_taps = phase_taps(grid, 2, ph, taps, off);
    const int64_t count = (width - ph + s2 - 1) / s2;  // positions of this phase
    int64_t lo = 0, hi = count;  // where every tap reads inside the output row
    for (int64_t t = 0; t < n_taps; ++t) {
      lo = std::max(lo, -off[t]);
      hi = std::min(hi, out_w - off[t]);
    }
    auto one = [&](int64_t m) {
      T acc[kLanes] = {};
      for (int64_t r = 0; r < n_rows; ++r) {
        for (int64_t t = 0; t < n_taps; ++t) {
          const int64_t q = m + off[t];
          if (q < 0 || q >= out_w) continue;
          const T* __restrict__ gq = g_rows[r] + q * ldg;
          const T* __restrict__ wq = w_rows[r] + taps[t] * ldw;
          for (int64_t c = 0; c < nl; ++c) acc[c] += gq[c] * wq[c];
        }
      }
      T* __restrict__ op = o + (ph + m * s2) * ldo;
      for (int64_t c = 0; c < nl; ++c) op[c] = acc[c];
    };
    if (lo >= hi) {
      for (int64_t m = 0; m < count; ++m) one(m);
      continue;
    }
    for (int64_t m = 0; m < lo; ++m) one(m);
    int64_t m = lo;
#ifdef RLRP_LANE_VECTORS
    if (kFull) {
      using V = typename LaneVec<T>::type;
      static_assert(kTile == 4, "the vector tile below holds 4 positions");
      for (; m + kTile <= hi; m += kTile) {
        V acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
        for (int64_t r = 0; r < n_rows; ++r) {
          for (int64_t t = 0; t < n_taps; ++t) {
            const T* gq = g_rows[r] + (m + off[t]) * ldg;
            const V w = load_lanes(w_rows[r] + taps[t] * ldw);
            acc0 += load_lanes(gq) * w;
            acc1 += load_lanes(gq + ldg) * w;
            acc2 += load_lanes(gq + 2 * ldg) * w;
            acc3 += load_lanes(gq + 3 * ldg) * w;
          }
        }
        T* op = o + (ph + m * s2) * ldo;
        std::memcpy(op, &acc0, sizeof(V));
        std::memcpy(op + s2 * ldo, &acc1, sizeof(V));
        std::memcpy(op + 2 * s2 * ldo, &acc2, sizeof(V));
        std::memcpy(op + 3 * s2 * ldo, &acc3, sizeof(V));
      }
    }
#endif
    for (; m + kTile <= hi; m += kTile) {
      T acc[kTile][kLanes] = {};
      for (int64_t r = 0; r < n_rows; ++r) {
        for (int64_t t = 0; t < n_taps; ++t) {
          const T* __restrict__ gq = g_rows[r] + (m + off[t]) * ldg;
          const T* __restrict__ wq = w_rows[r] + taps[t] * ldw;
          for (int64_t u = 0; u < kTile; ++u) {
            for (int64_t c = 0; c < nl; ++c) acc[u][c] += gq[u * ldg + c] * wq[c];
          }
        }
      }
      for (int64_t u = 0; u < kTile; ++u) {
        T* __restrict__ op = o + (ph + (m + u) * s2) * ldo;
        for (int64_t c = 0; c < nl; ++c) op[c] = acc[u][c];
      }
    }
    for (; m < count; ++m) one(m);
  }
}

// W^T g for `lanes` channels of one sample, channel-minor (as above), any multiplier: the
// register-tiled gather for multiplier 1, else position by position.
template <typename T>
inline void stencil_channel_minor(T* o, int64_t ldo, const T* g, int64_t ldg, const T* w_t,
                                  int64_t ldw, int64_t lanes, int64_t mult, const Grid3& grid,
                                  const Readers* readers) {
  if (mult == 1 && grid.k[0] * grid.k[1] <= kMaxRowPairs) {
    for (int64_t i0 = 0; i0 < grid.in[0]; ++i0) {
      for (int64_t i1 = 0; i1 < grid.in[1]; ++i1) {
        T* row = o + (i0 * grid.in[1] + i1) * grid.in[2] * ldo;
        if (lanes == kLanes) {
          gather_row_lanes<T, true>(row, ldo, g, ldg, w_t, ldw, lanes, grid, readers, i0, i1);
        } else {
          gather_row_lanes<T, false>(row, ldo, g, ldg, w_t, ldw, lanes, grid, readers, i0, i1);
        }
      }
    }
    return;
  }
  for (int64_t p = 0; p < grid.in_plane(); ++p) std::fill(o + p * ldo, o + p * ldo + lanes, T(0));
  for (int64_t i0 = 0, p = 0; i0 < grid.in[0]; ++i0) {
    for (int64_t i1 = 0; i1 < grid.in[1]; ++i1) {
      for (int64_t i2 = 0; i2 < grid.in[2]; ++i2, ++p) {
        gather_position<T>(o + p * ldo, g, w_t, lanes, mult, ldg, grid, readers, i0, i1, i2);
      }
    }
  }
}

// NCHW channels [c0, c0 + cb) of one sample, on a grid small enough for the block to stay in
// cache: the block's g and weights are transposed into channel-minor scratch (the planes'
// rows are too short to vectorise), the stencil runs on vectors of channels, and the result
// is transposed back with the epilogue; sums[c] gets plane c's sum |.|. g, w and a point at
// the block's first plane / taps.
template <typename T, typename A>
RLRP_ISA_CLONES void depthwise_channel_block(T* __restrict__ out, const T* g, const T* w,
                                             const A* a, T s, int64_t cb, int64_t mult,
                                             const Grid3& grid, const Readers* readers,
                                             T* gbuf, T* wbuf, T* obuf, double* sums,
                                             bool want_sum) {
  const int64_t plane = grid.in_plane(), out_plane = grid.out_plane(), taps = grid.taps();
  const int64_t ld = cb * mult;
  for (int64_t co = 0; co < ld; ++co) {
    for (int64_t q = 0; q < out_plane; ++q) gbuf[q * ld + co] = g[co * out_plane + q];
    for (int64_t k = 0; k < taps; ++k) wbuf[k * ld + co] = w[co * taps + k];
  }
  stencil_channel_minor<T>(obuf, cb, gbuf, ld, wbuf, ld, cb, mult, grid, readers);
  for (int64_t c = 0; c < cb; ++c) {
    T* o = out + c * plane;
    for (int64_t p = 0; p < plane; ++p) o[p] = obuf[p * cb + c];
    sums[c] = scale_abs_sum<T, A>(o, a ? a + c * plane : nullptr, s, plane, want_sum);
  }
}

// Channels-last channels [c0, c0 + lanes) of one sample: the stencil straight into the
// output (o, a at the sample's channel c0, g at the sample's first output channel of c0),
// then the epilogue over those channels; returns their sum |.| when want_sum.
template <typename T, typename A>
RLRP_ISA_CLONES double depthwise_channels_last(T* o, const T* g, const T* w_t, const A* a,
                                               T s, int64_t channels, int64_t lanes,
                                               int64_t mult, const Grid3& grid,
                                               const Readers* readers, bool want_sum) {
  const int64_t plane = grid.in_plane();
  stencil_channel_minor<T>(o, channels, g, channels * mult, w_t, channels * mult, lanes, mult,
                           grid, readers);
  // the epilogue: lane partial sums in T over chunks of positions, then to double
  constexpr int64_t kChunk = 256;
  double sum = 0;
  for (int64_t p0 = 0; p0 < plane; p0 += kChunk) {
    T acc[kLanes] = {};
    for (int64_t p = p0; p < std::min(plane, p0 + kChunk); ++p) {
      T* __restrict__ op = o + p * channels;
      const A* ap = a ? a + p * channels : nullptr;
      for (int64_t c = 0; c < lanes; ++c) {
        const T v = ap ? op[c] * static_cast<T>(ap[c]) * s : op[c] * s;
        op[c] = v;
        acc[c] += std::abs(v);
      }
    }
    if (want_sum) {
      for (int64_t c = 0; c < lanes; ++c) sum += static_cast<double>(acc[c]);
    }
  }
  return sum;
}

// Channels per NCHW block, and the largest grid that takes blocks rather than planes.
constexpr int64_t kChannelBlock = kLanes;
constexpr int64_t kBlockedPlaneMax = 1024;

// NCHW: every (n, c) plane, in parallel; l1 partial sums per plane (deterministic).
template <typename T, typename A>
void depthwise_planes(T* out, const T* g, const T* w, const A* a, const T* scale,
                      int64_t n_samples, int64_t channels, int64_t mult, const Grid3& grid,
                      double* l1) {
  const int64_t plane = grid.in_plane(), out_plane = grid.out_plane(), taps = grid.taps();
  std::vector<double> partial(n_samples * channels, 0.0);
  if (std::max(plane, out_plane) > kBlockedPlaneMax) {
    const int64_t grain = std::max<int64_t>(1, kBlock / plane);
    at::parallel_for(0, n_samples * channels, grain, [&](int64_t p0, int64_t p1) {
      std::vector<T> acc(grid.in[2]);
      for (int64_t pl = p0; pl < p1; ++pl) {
        const int64_t n = pl / channels, c = pl % channels;
        partial[pl] = depthwise_plane<T, A>(
            out + pl * plane, g + (n * channels + c) * mult * out_plane, w + c * mult * taps,
            a ? a + pl * plane : nullptr, scale ? scale[n] : T(1), mult, grid, acc.data(),
            l1 != nullptr);
      }
    });
  } else {
    const Readers readers[3] = {grid.readers(0), grid.readers(1), grid.readers(2)};
    const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
    const int64_t grain = std::max<int64_t>(1, kBlock / (plane * kChannelBlock));
    at::parallel_for(0, n_samples * blocks, grain, [&](int64_t b0, int64_t b1) {
      const int64_t ld = kChannelBlock * mult;
      std::vector<T> gbuf(out_plane * ld), wbuf(taps * ld), obuf(plane * kChannelBlock);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b / blocks, c0 = (b % blocks) * kChannelBlock;
        const int64_t cb = std::min(kChannelBlock, channels - c0), pl = n * channels + c0;
        depthwise_channel_block<T, A>(
            out + pl * plane, g + (n * channels + c0) * mult * out_plane, w + c0 * mult * taps,
            a ? a + pl * plane : nullptr, scale ? scale[n] : T(1), cb, mult, grid, readers,
            gbuf.data(), wbuf.data(), obuf.data(), partial.data() + pl, l1 != nullptr);
      }
    });
  }
  if (l1) finish_l1(partial, n_samples, channels, l1);
}

// Channels-last: every (sample, block of kLanes channels), in parallel; l1 partial sums per
// block (deterministic).
template <typename T, typename A>
void depthwise_rows(T* out, const T* g, const T* w_t, const A* a, const T* scale,
                    int64_t n_samples, int64_t channels, int64_t mult, const Grid3& grid,
                    double* l1) {
  const Readers readers[3] = {grid.readers(0), grid.readers(1), grid.readers(2)};
  const int64_t sample = grid.in_plane() * channels;
  const int64_t g_sample = grid.out_plane() * channels * mult;
  const int64_t blocks = (channels + kLanes - 1) / kLanes;
  std::vector<double> partial(n_samples * blocks, 0.0);
  const int64_t grain = std::max<int64_t>(1, kBlock / (grid.in_plane() * kLanes));
  at::parallel_for(0, n_samples * blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / blocks, c0 = (b % blocks) * kLanes;
      partial[b] = depthwise_channels_last<T, A>(
          out + n * sample + c0, g + n * g_sample + c0 * mult, w_t + c0 * mult,
          a ? a + n * sample + c0 : nullptr, scale ? scale[n] : T(1), channels,
          std::min(kLanes, channels - c0), mult, grid, readers, l1 != nullptr);
    }
  });
  if (l1) finish_l1(partial, n_samples, blocks, l1);
}

// The whole depthwise contraction: scale ⊙ a ⊙ W^T g into a fresh tensor of out_shape laid
// out in fmt, per-sample L1 into *l1_acc (double) when it is defined.
Tensor depthwise_contract(const Tensor& g, const Tensor& weight, const Tensor& a,
                          const Tensor& scale, Tensor* l1_acc, at::IntArrayRef out_shape,
                          at::MemoryFormat fmt, const Geometry& geo) {
  output_padding_of(g, weight, out_shape, geo);
  const Grid3 grid(g, weight, out_shape, geo);
  const int64_t n = out_shape[0], channels = out_shape[1], mult = weight.size(0) / channels;
  const bool channels_last = fmt != at::MemoryFormat::Contiguous;
  Tensor gc = g.contiguous(fmt);
  // channels-last gathers C-long weight vectors per tap: [taps, C_out]
  Tensor wc = channels_last ? weight.reshape({weight.size(0), -1}).t().contiguous()
                            : weight.contiguous();
  Tensor t = at::empty(out_shape, g.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "rlrp_depthwise", [&] {
    using T = scalar_t;
    const T* sp = scale.defined() ? scale.const_data_ptr<T>() : nullptr;
    double* lp = l1_acc ? l1_acc->data_ptr<double>() : nullptr;
    auto run = [&](auto* ap) {
      using A = std::remove_const_t<std::remove_pointer_t<decltype(ap)>>;
      (channels_last ? &depthwise_rows<T, A> : &depthwise_planes<T, A>)(
          t.data_ptr<T>(), gc.const_data_ptr<T>(), wc.const_data_ptr<T>(), ap, sp, n, channels,
          mult, grid, lp);
    };
    if (!a.defined()) {
      run(static_cast<const T*>(nullptr));
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(),
                                      "rlrp_depthwise_a", [&] {
        run(a.const_data_ptr<scalar_t>());
      });
    }
  });
  return t;
}

// The whole contraction: W^T g, then the epilogue (times a, times scale[n], per-sample L1
// into *l1 when l1 is not null), returned with out_shape laid out in fmt. a and scale may be
// undefined; a defined a must be dense in fmt.
Tensor contract(const Tensor& g, const Tensor& weight, const Tensor& a, const Tensor& scale,
                Tensor* l1, at::IntArrayRef out_shape, at::MemoryFormat fmt,
                const Geometry& geo) {
  check_geometry(weight, out_shape, geo);
  const int64_t n = out_shape[0];
  Tensor l1_acc;
  if (l1) l1_acc = at::empty({n}, g.options().dtype(at::kDouble));
  if (is_depthwise(weight, out_shape, geo)) {
    Tensor t = depthwise_contract(g, weight, a, scale, l1 ? &l1_acc : nullptr, out_shape, fmt,
                                  geo);
    if (l1) *l1 = l1_acc.to(g.scalar_type());
    return t;
  }
  const bool pointwise = is_pointwise(weight, geo, fmt);
  const bool scatter = pointwise && !is_unit_grid(geo);
  Tensor t, buf;
  if (pointwise) {
    buf = pointwise_transpose(g, weight);
    t = scatter ? at::empty(out_shape, g.options()) : buf.view(out_shape);
  } else {
    t = transpose_apply(g, weight, out_shape, fmt, geo);
    TORCH_CHECK(t.sizes() == out_shape, "rlrp_fast: W^T g has shape ", t.sizes(),
                " but the layer's input has ", out_shape);
    if (!flat_in(t, fmt)) t = t.contiguous(fmt);
  }
  if (!scatter && !a.defined() && !scale.defined() && !l1) return t;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "rlrp_contract", [&] {
    using T = scalar_t;
    T* tp = t.data_ptr<T>();
    const T* sp = scale.defined() ? scale.const_data_ptr<T>() : nullptr;
    double* lp = l1 ? l1_acc.data_ptr<double>() : nullptr;
    auto run = [&](auto* ap) {
      using A = std::remove_const_t<std::remove_pointer_t<decltype(ap)>>;
      if (!scatter) {
        epilogue_flat<T, A>(tp, ap, sp, n, n == 0 ? 0 : t.numel() / n, lp);
        return;
      }
      int64_t in_sz[3] = {1, 1, 1}, grid_sz[3] = {1, 1, 1}, st[3] = {1, 1, 1};
      int64_t pad[3] = {0, 0, 0};
      const int64_t off = 3 - geo.conv_dims;
      for (int64_t i = 0; i < geo.conv_dims; ++i) {
        in_sz[off + i] = out_shape[2 + i];
        grid_sz[off + i] = g.size(2 + i);
        st[off + i] = geo.stride[i];
        pad[off + i] = geo.padding[i];
      }
      epilogue_scatter<T, A>(tp, buf.const_data_ptr<T>(), ap, sp, n, out_shape[1], in_sz,
                             grid_sz, st, pad, lp);
    };
    if (!a.defined()) {
      run(static_cast<const T*>(nullptr));
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.scalar_type(),
                                      "rlrp_contract_a", [&] {
        run(a.const_data_ptr<scalar_t>());
      });
    }
  });
  if (l1) *l1 = l1_acc.to(g.scalar_type());
  return t;
}

}  // namespace

// (R~, ||R~||_1 per sample) with R~ = g_scale[n] * a * (W^T g). Shapes: g (N, out...),
// weight as the layer's, a (N, in...) of any float dtype, g_scale (N,) or None.
// Returns R~ shaped and laid out like a (relevance dtype) and the (N,) norms.
std::tuple<Tensor, Tensor> affine_relevance_l1(const Tensor& g, const Tensor& weight,
                                               const Tensor& a,
                                               const std::optional<Tensor>& g_scale,
                                               at::IntArrayRef stride, at::IntArrayRef padding,
                                               at::IntArrayRef dilation, int64_t groups,
                                               int64_t conv_dims) {
  check_relevance(g, weight);
  TORCH_CHECK(a.device().is_cpu(), "rlrp_fast: a must be a CPU tensor");
  TORCH_CHECK(a.dim() >= 1 && a.size(0) == g.size(0), "rlrp_fast: a and g disagree on the ",
              "batch size: ", a.sizes(), " vs ", g.sizes());
  const auto fmt = layout_of(a);
  Tensor ac = flat_in(a, fmt) ? a : a.contiguous(fmt);  // copies only views with holes
  Tensor scale;
  if (g_scale.has_value()) {
    scale = g_scale->to(g.scalar_type()).contiguous();
    TORCH_CHECK(scale.numel() == g.size(0), "rlrp_fast: g_scale must have one value per ",
                "sample, got ", scale.sizes());
  }
  Tensor l1;
  Tensor t = contract(g, weight, ac, scale, &l1, a.sizes(), fmt,
                      {stride, padding, dilation, groups, conv_dims});
  return {t, l1};
}

// a * W^T(g / stab(z)) -- the classic rules' contraction. a and z optional (None: factor 1,
// no division); eps = 0 divides by z itself. input_shape is the layer input's shape.
// Returns a relevance-dtype tensor of input_shape, laid out like a (like g when a is None).
Tensor affine_relevance(const Tensor& g, const Tensor& weight, const std::optional<Tensor>& a,
                        const std::optional<Tensor>& z, double eps, at::IntArrayRef input_shape,
                        at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, int64_t conv_dims) {
  check_relevance(g, weight);
  Tensor q = g;
  if (z.has_value()) {
    TORCH_CHECK(z->sizes() == g.sizes(), "rlrp_fast: z has shape ", z->sizes(),
                " but g has ", g.sizes());
    const auto gfmt = layout_of(g);
    Tensor gc = flat_in(g, gfmt) ? g : g.contiguous(gfmt);
    Tensor zc = flat_in(*z, gfmt) ? *z : z->contiguous(gfmt);
    q = at::empty_like(gc);  // the GEMM needs g / stab(z) materialised; stab(z) never is
    AT_DISPATCH_FLOATING_TYPES(gc.scalar_type(), "affine_relevance_q", [&] {
      using T = scalar_t;
      T* qp = q.data_ptr<T>();
      const T* gp = gc.const_data_ptr<T>();
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zc.scalar_type(),
                                      "affine_relevance_z", [&] {
        divide_stabilized<T, scalar_t>(qp, gp, zc.const_data_ptr<scalar_t>(), eps, q.numel());
      });
    });
  }
  Tensor ac;
  at::MemoryFormat fmt = at::MemoryFormat::Contiguous;
  if (a.has_value()) {
    TORCH_CHECK(a->sizes() == input_shape, "rlrp_fast: a has shape ", a->sizes(),
                " but input_shape is ", input_shape);
    fmt = layout_of(*a);
    ac = flat_in(*a, fmt) ? *a : a->contiguous(fmt);
  } else if (static_cast<int64_t>(input_shape.size()) == g.dim()) {
    fmt = layout_of(g);
  }
  return contract(q, weight, ac, Tensor(), nullptr, input_shape, fmt,
                  {stride, padding, dilation, groups, conv_dims});
}

TORCH_LIBRARY(rlrp_fast, m) {
  m.def("affine_relevance_l1(Tensor g, Tensor weight, Tensor a, Tensor? g_scale, "
        "int[] stride, int[] padding, int[] dilation, int groups, int conv_dims) "
        "-> (Tensor, Tensor)");
  m.def("affine_relevance(Tensor g, Tensor weight, Tensor? a, Tensor? z, float eps, "
        "int[] input_shape, int[] stride, int[] padding, int[] dilation, int groups, "
        "int conv_dims) -> Tensor");
}

TORCH_LIBRARY_IMPL(rlrp_fast, CPU, m) {
  m.impl("affine_relevance_l1", &affine_relevance_l1);
  m.impl("affine_relevance", &affine_relevance);
}

}  // namespace rlrp_fast

// Importing rlrp_fast._C runs the registrations above; the module itself has no functions.
extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
