// C++ CPU kernels for curvsafe's four curvature ops (see kernels/*.py for the contracts).
//
// Inputs arrive as contiguous fp32 tensors (the Python dispatch upcasts); results are fp32. The GEMMs go through
// ATen (MKL/oneDNN), the kernels add what the composite PyTorch reference cannot do: only the lower triangle of a
// covariance, accumulated in place, per-thread accumulation of squared per-example gradients, and no full-size
// temporaries.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

void check_fp32_2d(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32");
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// Token ranges [start, end) of the non-empty segments of sorted segment ids.
std::vector<std::pair<int64_t, int64_t>> segment_ranges(const torch::Tensor& seg) {
  const int64_t T = seg.size(0);
  const int64_t* s = seg.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> ranges;
  int64_t start = 0;
  for (int64_t t = 1; t <= T; ++t) {
    if (t == T || s[t] != s[start]) {
      ranges.emplace_back(start, t);
      start = t;
    }
  }
  return ranges;
}

// The lower triangle (diagonal included) of out[i0:i0+n, i0:i0+n] += alpha * xw[:, i0:i0+n]^T x[:, i0:i0+n]:
// halves split recursively, so that all but the smallest diagonal blocks are large off-diagonal GEMMs (one
// addmm each, written in place into `out`); a diagonal block of at most `leaf` columns is one full GEMM.
void lower_products(const torch::Tensor& xw, const torch::Tensor& x, torch::Tensor& out, int64_t i0, int64_t n,
                    double alpha, int64_t leaf) {
  if (n <= leaf) {
    auto block = out.narrow(0, i0, n).narrow(1, i0, n);
    block.addmm_(xw.narrow(1, i0, n).t(), x.narrow(1, i0, n), 1.0, alpha);
    return;
  }
  const int64_t h = std::min(n - 1, (n / 2 + 63) / 64 * 64);  // a multiple of 64: aligned column blocks
  lower_products(xw, x, out, i0, h, alpha, leaf);
  lower_products(xw, x, out, i0 + h, n - h, alpha, leaf);
  auto below = out.narrow(0, i0 + h, n - h).narrow(1, i0, h);
  below.addmm_(xw.narrow(1, i0 + h, n - h).t(), x.narrow(1, i0, h), 1.0, alpha);
}

// out[j][i] = out[i][j] for i > j, in cache blocks, in parallel over block rows.
void mirror_lower(torch::Tensor& out) {
  const int64_t d = out.size(0);
  float* p = out.data_ptr<float>();
  constexpr int64_t B = 64;
  at::parallel_for(0, (d + B - 1) / B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t i_end = std::min(d, (bi + 1) * B);
      for (int64_t j0 = 0; j0 <= bi * B; j0 += B) {
        for (int64_t i = bi * B; i < i_end; ++i) {
          const int64_t j_end = std::min(i, j0 + B);
          for (int64_t j = j0; j < j_end; ++j) p[j * d + i] = p[i * d + j];
        }
      }
    }
  });
}

}  // namespace

// Copies the strict lower triangle of the square contiguous fp32 m onto its upper one, in place.
void mirror_lower_inplace(torch::Tensor m) {
  check_fp32_2d(m, "m");
  TORCH_CHECK(m.size(0) == m.size(1), "m must be square");
  mirror_lower(m);
}

// beta * out + alpha * x^T diag(mask) x, written into `out` when given (else a new matrix), computing only the
// lower triangle (recursive halves: large GEMMs in place, no temporaries but the masked rows) and mirroring it,
// so the result is exactly symmetric; with `lower_only` the mirror is skipped and the upper triangle holds
// unspecified values (the caller mirrors once, after many updates).
torch::Tensor covariance_update(torch::Tensor x, c10::optional<torch::Tensor> mask, c10::optional<torch::Tensor> out,
                                double alpha, double beta, bool lower_only) {
  check_fp32_2d(x, "x");
  const int64_t T = x.size(0), d = x.size(1);
  torch::Tensor xw = x;
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 1 && mask->size(0) == T, "mask must have shape (T,)");
    xw = x * mask->to(torch::kFloat32).unsqueeze(1);
  }
  torch::Tensor result;
  if (out.has_value()) {
    check_fp32_2d(*out, "out");
    TORCH_CHECK(out->size(0) == d && out->size(1) == d, "out must be (d, d)");
    result = *out;
    if (beta != 1.0) result.mul_(beta);
  } else {
    result = torch::zeros({d, d}, x.options());
  }
  if (T > 0) {
    lower_products(xw, x, result, 0, d, alpha, 256);
  }
  if (!lower_only) {
    mirror_lower(result);
  }
  return result;
}

// sum_n g_n <g_n, V>, g_n = sum_{t in n} gy_t x_t^T, without per-example gradients.
torch::Tensor linear_fisher_vp(torch::Tensor x, torch::Tensor gy, torch::Tensor V,
                               c10::optional<torch::Tensor> segment_ids, int64_t num_segments) {
  check_fp32_2d(x, "x");
  check_fp32_2d(gy, "gy");
  check_fp32_2d(V, "V");
  const int64_t T = x.size(0), d_in = x.size(1), d_out = gy.size(1);
  TORCH_CHECK(gy.size(0) == T && V.size(0) == d_out && V.size(1) == d_in, "shape mismatch");
  auto vx = at::mm(x, V.t());  // (T, d_out): V x_t
  auto c = torch::empty({T}, x.options());
  {
    const float* pv = vx.data_ptr<float>();
    const float* pg = gy.data_ptr<float>();
    float* pc = c.data_ptr<float>();
    at::parallel_for(0, T, 64, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        float acc = 0.f;
        const float* gv = pg + t * d_out;
        const float* vv = pv + t * d_out;
        for (int64_t i = 0; i < d_out; ++i) acc += gv[i] * vv[i];
        pc[t] = acc;
      }
    });
  }
  if (segment_ids.has_value() && T > 0) {
    auto seg = *segment_ids;
    const int64_t n = num_segments >= 0 ? num_segments : seg.max().item<int64_t>() + 1;
    auto sums = torch::zeros({n}, x.options()).index_add_(0, seg, c);
    c = sums.index_select(0, seg);
  }
  auto scaled = gy * c.unsqueeze(1);
  return at::mm(scaled.t(), x);
}

// sum_n g_n * g_n elementwise, one example's gradient at a time per thread.
torch::Tensor linear_fisher_diag(torch::Tensor x, torch::Tensor gy, c10::optional<torch::Tensor> segment_ids) {
  check_fp32_2d(x, "x");
  check_fp32_2d(gy, "gy");
  const int64_t d_in = x.size(1), d_out = gy.size(1);
  if (!segment_ids.has_value()) {
    return at::mm(gy.square().t(), x.square());
  }
  const auto ranges = segment_ranges(*segment_ids);
  const int64_t n = static_cast<int64_t>(ranges.size());
  const int nthreads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(n)));
  std::vector<torch::Tensor> partial(nthreads);
  for (auto& p : partial) p = torch::zeros({d_out, d_in}, x.options());
  at::parallel_for(0, nthreads, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      auto acc = partial[w];
      auto g = torch::empty({d_out, d_in}, x.options());
      for (int64_t k = w; k < n; k += nthreads) {
        const auto [s, t] = ranges[k];
        at::mm_out(g, gy.narrow(0, s, t - s).t(), x.narrow(0, s, t - s));
        acc.addcmul_(g, g);
      }
    }
  });
  auto out = partial[0];
  for (int w = 1; w < nthreads; ++w) out.add_(partial[w]);
  return out;
}

// QG @ ((QG^T V QA) * scale) @ QA^T.
// One matrix (2-D operands) or a batch of equally shaped ones (3-D operands, one batched GEMM per product).
torch::Tensor kron_eigen_apply(torch::Tensor V, torch::Tensor QA, torch::Tensor QG, torch::Tensor scale) {
  const int64_t dim = V.dim();
  TORCH_CHECK(dim == 2 || dim == 3, "V must be 2-D or 3-D (a batch)");
  for (auto* t : {&V, &QA, &QG, &scale}) {
    TORCH_CHECK(t->dim() == dim, "kron_eigen_apply operands must all be 2-D or all 3-D");
    TORCH_CHECK(t->scalar_type() == torch::kFloat32, "kron_eigen_apply operands must be float32");
    TORCH_CHECK(t->device().is_cpu() && t->is_contiguous(), "kron_eigen_apply operands must be contiguous CPU tensors");
  }
  auto rotated = at::matmul(at::matmul(QG.transpose(-2, -1), V), QA);
  rotated.mul_(scale);
  return at::matmul(at::matmul(QG, rotated), QA.transpose(-2, -1));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "curvsafe C++ CPU curvature kernels";
  m.def("covariance_update", &covariance_update, "beta * out + alpha * x^T diag(mask) x (lower triangle, mirrored)",
        py::arg("x"), py::arg("mask"), py::arg("out"), py::arg("alpha"), py::arg("beta"), py::arg("lower_only"));
  m.def("mirror_lower", &mirror_lower_inplace, "copy the strict lower triangle onto the upper one, in place",
        py::arg("m"));
  m.def("linear_fisher_vp", &linear_fisher_vp, "exact empirical Fisher-vector product of a linear layer",
        py::arg("x"), py::arg("gy"), py::arg("V"), py::arg("segment_ids"), py::arg("num_segments"));
  m.def("linear_fisher_diag", &linear_fisher_diag, "diagonal empirical Fisher of a linear layer", py::arg("x"),
        py::arg("gy"), py::arg("segment_ids"));
  m.def("kron_eigen_apply", &kron_eigen_apply, "QG ((QG^T V QA) * scale) QA^T", py::arg("V"), py::arg("QA"),
        py::arg("QG"), py::arg("scale"));
}
