// Fused CPU ops for a DiT block's work around its Linear GEMMs (fp32, rows of the hidden size D):
//   ln_modulate            out = LN(x) * (1 + scale) + shift                   (no affine, per-sample rows)
//   residual_ln_modulate_  x += gate * (branch + bias); branch = LN(x) * (1 + scale) + shift   (in place)
//   bias_gelu_             h = gelu_tanh(h + bias)                              (in place, the fc1 epilogue)
//   attention              softmax(q k^T / sqrt(d)) v per (sample, head): (B, H, N, d) views -> (B, N, H, d)
// The row ops make one pass over memory each; rows (attention: heads) are spread over threads with
// at::parallel_for. The row loops are compiled three times (AVX-512, AVX2, portable) and the loader picks
// the best the CPU has.
// Narrow headers, not <torch/extension.h>: the whole C++ frontend took 64 s of a 2-core install to
// compile; these take 17 s.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
// Feature-based clones (not arch=: the resolver would test the CPU model and miss, say, an AMD EPYC with AVX-512).
#define TF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TF_CLONES
#endif

namespace {

// exp(x) for x in [-87, 88] with Cephes' degree-6 polynomial: branch-free, so the compiler vectorizes it
// (std::exp would not). Relative error about 2e-7.
__attribute__((always_inline)) inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : x;  // not std::min/max: templates from the default target do not inline into the clones
  x = x > 88.0f ? 88.0f : x;
  // round(x / ln 2) as a truncation of a positive number: no floor call, so every ISA vectorizes it
  const int32_t ni = static_cast<int32_t>(x * 1.44269504088896341f + 126.5f) - 126;
  const float n = static_cast<float>(ni);
  float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (ni + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Mean and inverse std of one row, two passes over a row that sits in L1.
TF_CLONES void row_stats(const float* x, int64_t d, float eps, float* mean_out, float* rstd_out) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < d; ++i) sum += x[i];
  const float mean = sum / d;
  float sq = 0.f;
#pragma omp simd reduction(+ : sq)
  for (int64_t i = 0; i < d; ++i) sq += (x[i] - mean) * (x[i] - mean);
  *mean_out = mean;
  *rstd_out = 1.0f / std::sqrt(sq / d + eps);
}

TF_CLONES void row_modulate(const float* x, float* out, const float* shift, const float* scale, float mean,
                            float rstd, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) out[i] = (x[i] - mean) * rstd * (1.0f + scale[i]) + shift[i];
}

TF_CLONES void row_residual(float* x, const float* branch, const float* bias, const float* gate, int64_t d) {
  if (bias) {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) x[i] += gate[i] * (branch[i] + bias[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) x[i] += gate[i] * branch[i];
  }
}

// gelu_tanh(h) = 0.5 h (1 + tanh(u)) = h / (1 + exp(-2u)),  u = sqrt(2/pi) (h + 0.044715 h^3)
TF_CLONES void row_bias_gelu(float* h, const float* bias, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) {
    const float v = h[i] + bias[i];
    const float u2 = -1.5957691216057308f * (v + 0.044715f * v * v * v);
    h[i] = v / (1.0f + fast_exp(u2));
  }
}

// softmax numerators of one score row in place, exp((s - max) * scale); returns their sum.
TF_CLONES float row_softmax_numerators(float* s, int64_t n, float scale) {
  float mx = s[0];
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = fast_exp((s[j] - mx) * scale);
    s[j] = e;
    sum += e;
  }
  return sum;
}

TF_CLONES void row_scale(float* x, int64_t n, float f) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= f;
}

// (n, d) rows with row stride ld -> (d, n) contiguous: the k^T operand of the score GEMM.
void transpose_rows(const float* k, int64_t ld, int64_t n, int64_t d, float* kt) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < d; ++j) kt[j * n + i] = k[i * ld + j];
}

void check_heads(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(t.dim() == 4 && t.sizes() == q.sizes() && t.stride(3) == 1, name,
              " must be (B, H, N, d) like q, with unit stride along d");
  TORCH_CHECK(t.size(2) < 2 || t.stride(2) >= t.size(3), name, "'s rows of d must not overlap (stride along N >= d)");
}

// A GEMM operand's leading dimension: the stride between rows, any value >= d when there is one row.
int64_t row_stride(const at::Tensor& t) { return t.size(2) > 1 ? t.stride(2) : t.size(3); }

// Rows of a (B, N, D) tensor are grouped by sample b = row / N; modulation rows are (B, D) with any row stride.
void check_tokens(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), name, " must be a contiguous (B, N, D) tensor");
}

void check_rows(const at::Tensor& m, const at::Tensor& x, const char* name) {
  TORCH_CHECK(m.device().is_cpu() && m.scalar_type() == at::kFloat, name, " must be a float32 CPU tensor");
  TORCH_CHECK(m.dim() == 2 && m.size(0) == x.size(0) && m.size(1) == x.size(2) && m.stride(1) == 1, name,
              " must be (B, D) with unit stride along D");
}

// Grain: enough rows per task that a task is worth a thread hand-off.
int64_t grain(int64_t d) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)); }

}  // namespace

at::Tensor ln_modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, double eps) {
  check_tokens(x, "x");
  check_rows(shift, x, "shift");
  check_rows(scale, x, "scale");
  auto out = at::empty_like(x);
  const int64_t n = x.size(1), d = x.size(2);
  const float* px = x.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const float* psh = shift.data_ptr<float>();
  const float* psc = scale.data_ptr<float>();
  const int64_t sh_stride = shift.stride(0), sc_stride = scale.stride(0);
  at::parallel_for(0, x.size(0) * n, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / n;
      float mean, rstd;
      row_stats(px + r * d, d, static_cast<float>(eps), &mean, &rstd);
      row_modulate(px + r * d, po + r * d, psh + b * sh_stride, psc + b * sc_stride, mean, rstd, d);
    }
  });
  return out;
}

void residual_ln_modulate_(at::Tensor& x, at::Tensor& branch, const std::optional<at::Tensor>& bias,
                           const at::Tensor& gate, const at::Tensor& shift, const at::Tensor& scale, double eps) {
  check_tokens(x, "x");
  check_tokens(branch, "branch");
  TORCH_CHECK(branch.sizes() == x.sizes(), "branch must have the shape of x");
  check_rows(gate, x, "gate");
  check_rows(shift, x, "shift");
  check_rows(scale, x, "scale");
  const float* pbias = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == x.size(2) &&
                    bias->is_contiguous(), "bias must be a contiguous float32 (D,) tensor");
    pbias = bias->data_ptr<float>();
  }
  const int64_t n = x.size(1), d = x.size(2);
  float* px = x.data_ptr<float>();
  float* pbr = branch.data_ptr<float>();
  const float* pg = gate.data_ptr<float>();
  const float* psh = shift.data_ptr<float>();
  const float* psc = scale.data_ptr<float>();
  const int64_t g_stride = gate.stride(0), sh_stride = shift.stride(0), sc_stride = scale.stride(0);
  at::parallel_for(0, x.size(0) * n, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / n;
      float* xr = px + r * d;
      float* br = pbr + r * d;
      row_residual(xr, br, pbias, pg + b * g_stride, d);
      float mean, rstd;
      row_stats(xr, d, static_cast<float>(eps), &mean, &rstd);
      row_modulate(xr, br, psh + b * sh_stride, psc + b * sc_stride, mean, rstd, d);
    }
  });
}

void bias_gelu_(at::Tensor& h, const at::Tensor& bias) {
  TORCH_CHECK(h.device().is_cpu() && h.scalar_type() == at::kFloat && h.is_contiguous(),
              "h must be a contiguous float32 CPU tensor");
  TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.dim() == 1 && bias.is_contiguous() &&
                  h.dim() >= 1 && h.size(-1) == bias.size(0),
              "bias must be a contiguous float32 tensor of the last dimension of h");
  const int64_t d = bias.size(0), rows = h.numel() / std::max<int64_t>(d, 1);
  float* ph = h.data_ptr<float>();
  const float* pb = bias.data_ptr<float>();
  at::parallel_for(0, rows, grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) row_bias_gelu(ph + r * d, pb, d);
  });
}

// Exact attention, one (sample, head, block of query rows) per task: the score block (rows x N, at most
// 256 KiB: it stays in L2) = q k^T by oneDNN's f32 BRGEMM micro-kernel (PyTorch's cpublas::brgemm; MKL's
// sgemm where the ukernel is absent), softmax numerators in place, then (numerators v) / row sums written
// straight into the (B, N, H, d) output. q, k, v are strided views (the columns of one qkv GEMM output).
// Measured beside PyTorch's CPU SDPA at DiT-S/2 shapes in docs/runtime.md.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_heads(q, q, "q");
  check_heads(k, q, "k");
  check_heads(v, q, "v");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), d = q.size(3);
  auto out = at::empty({B, N, H, d}, q.options());
  if (out.numel() == 0) return out;
  const int64_t rows_per_block = std::min<int64_t>(N, std::max<int64_t>(16, 65536 / N));
  const int64_t blocks = (N + rows_per_block - 1) / rows_per_block;
  const float* pq = q.data_ptr<float>();
  const float* pk = k.data_ptr<float>();
  const float* pv = v.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt(d * N), scores(rows_per_block * N), sums(rows_per_block);
    int64_t head_in_kt = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / blocks, b = head / H, h = head % H;
      const int64_t first = (task % blocks) * rows_per_block, m = std::min(rows_per_block, N - first);
      if (head != head_in_kt) {  // consecutive tasks share a head's k^T
        transpose_rows(pk + b * k.stride(0) + h * k.stride(1), k.stride(2), N, d, kt.data());
        head_in_kt = head;
      }
      const float* qh = pq + b * q.stride(0) + h * q.stride(1) + first * q.stride(2);
      at::native::cpublas::brgemm(m, N, d, row_stride(q), N, N, false, qh, kt.data(), scores.data(), false);
      for (int64_t i = 0; i < m; ++i) sums[i] = row_softmax_numerators(scores.data() + i * N, N, scale);
      float* o = po + ((b * N + first) * H + h) * d;
      const float* vh = pv + b * v.stride(0) + h * v.stride(1);
      at::native::cpublas::brgemm(m, d, N, N, row_stride(v), H * d, false, scores.data(), vh, o, false);
      for (int64_t i = 0; i < m; ++i) row_scale(o + i * H * d, d, 1.0f / sums[i]);
    }
  });
  return out;
}

// Which of the compiled row loops this CPU runs (the same test the target_clones resolver makes).
std::string isa() {
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512";
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
  return "portable";
}

TORCH_LIBRARY(tinyfusion_cpu, m) {
  m.def("ln_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor");
  m.def("residual_ln_modulate_(Tensor(a!) x, Tensor(b!) branch, Tensor? bias, Tensor gate, Tensor shift, "
        "Tensor scale, float eps) -> ()");
  m.def("bias_gelu_(Tensor(a!) h, Tensor bias) -> ()");
  m.def("attention(Tensor q, Tensor k, Tensor v) -> Tensor");
}

TORCH_LIBRARY_IMPL(tinyfusion_cpu, CPU, m) {
  m.impl("ln_modulate", &ln_modulate);
  m.impl("residual_ln_modulate_", &residual_ln_modulate_);
  m.impl("bias_gelu_", &bias_gelu_);
  m.impl("attention", &attention);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "tinyfusion fused CPU ops; the ops themselves are torch.ops.tinyfusion_cpu.*";
  m.def("isa", &isa, "the instruction set the fused row loops run with: avx512, avx2 or portable");
}
