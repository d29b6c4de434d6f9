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

// The whole contraction: W^T g, then the epilogue (times a, times scale[n], per-sample L1
// into *l1 when l1 is not null), returned with out_shape laid out in fmt. a and scale may be
// undefined; a defined a must be dense in fmt.
Tensor contract(const Tensor& g, const Tensor& weight, const Tensor& a, const Tensor& scale,
                Tensor* l1, at::IntArrayRef out_shape, at::MemoryFormat fmt,
                const Geometry& geo) {
  check_geometry(weight, out_shape, geo);
  const int64_t n = out_shape[0];
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
  Tensor l1_acc;
  if (l1) l1_acc = at::empty({n}, g.options().dtype(at::kDouble));
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
