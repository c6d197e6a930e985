// One decode step of the Llama-style decoder, every block in one C++ call (CPU, float32).
//
// Why: at batch 1 a decode step is ~33 matrix-vector products (memory-bound, MKL) and ~200
// small ops. Each matrix-vector product streams megabytes of weights through the caches, so
// every small op after it starts cold: measured 10-30 us per op from Python on a 2-core Xeon,
// about as much as all the weight reads together. Here the small ops (RMSNorm, RoPE, the cache
// write, SwiGLU, and attention over the cache) are plain loops over a few hundred floats, and
// only the matrix products go through ATen (MKL). Same math as the decoder forward over a KVCache (see fused_decode.py).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Eight partial sums, so that the compiler vectorizes the loop without reassociating floats itself.
float dot(const float* a, const float* b, int64_t n) {
  float partial[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int u = 0; u < 8; ++u) partial[u] += a[j + u] * b[j + u];
  float total = 0.f;
  for (int u = 0; u < 8; ++u) total += partial[u];
  for (; j < n; ++j) total += a[j] * b[j];
  return total;
}

// out[b] = x[b] * rsqrt(mean(x[b]^2) + eps) * w, rows of width D.
void rms_norm_rows(const float* x, const float* w, float* out, int64_t B, int64_t D, float eps) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * D;
    float* yr = out + b * D;
    const float sum_sq = dot(xr, xr, D);
    const float r = 1.f / std::sqrt(sum_sq / static_cast<float>(D) + eps);
    for (int64_t j = 0; j < D; ++j) yr[j] = xr[j] * r * w[j];
  }
}

// Attention of one decode step, for every (row, KV head) pair in parallel: the n_groups query
// heads of KV head h ([B, Hkv, G, hd]) against its keys/values at slots 0..pos of the cache
// ([B, Hkv, max_len, hd]); slots whose key_mask is false are skipped (padding). Plain softmax
// in float; out [B, Hkv, G, hd] (= [B, D] with query head kvh * G + g, as the PyTorch step).
void attend(const float* q, const float* k, const float* v, const bool* key_mask, float* out, int64_t B,
            int64_t Hkv, int64_t G, int64_t max_len, int64_t hd, int64_t pos) {
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
  // Threads only pay off for long caches or large batches (a parallel region costs microseconds).
  const int64_t work = G * (pos + 1) * hd;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(work, 1));
  at::parallel_for(0, B * Hkv, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(pos + 1);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv;
      const float* keys = k + bh * max_len * hd;
      const float* values = v + bh * max_len * hd;
      const bool* visible = key_mask == nullptr ? nullptr : key_mask + b * max_len;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = q + (bh * G + g) * hd;
        float* y = out + (bh * G + g) * hd;
        float top = -INFINITY;
        for (int64_t l = 0; l <= pos; ++l) {
          if (visible != nullptr && !visible[l]) { scores[l] = -INFINITY; continue; }
          scores[l] = dot(qg, keys + l * hd, hd) * scale;
          top = std::max(top, scores[l]);
        }
        float total = 0.f;
        for (int64_t l = 0; l <= pos; ++l) {
          scores[l] = std::exp(scores[l] - top);   // exp(-inf) = 0 for the skipped slots
          total += scores[l];
        }
        std::fill_n(y, hd, 0.f);
        for (int64_t l = 0; l <= pos; ++l) {
          const float p = scores[l] / total;
          if (p == 0.f) continue;
          for (int64_t j = 0; j < hd; ++j) y[j] += p * values[l * hd + j];
        }
      }
    }
  });
}

void check_float_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              name, " must be a contiguous float32 CPU tensor (got ", t.scalar_type(), " on ", t.device(), ")");
}

class FusedDecoder {
 public:
  // blocks: per block [norm1 (D), qkv_proj (H+2Hkv)hd x D, out_proj D x D, norm2 (D),
  // gate_up_proj 2I x D, down_proj D x I], the module's own tensors (no copies).
  FusedDecoder(torch::Tensor embedding, std::vector<torch::Tensor> blocks, torch::Tensor final_norm,
               int64_t n_heads, int64_t n_kv_heads, double eps)
      : embedding_(embedding), blocks_(std::move(blocks)), final_norm_(final_norm),
        n_heads_(n_heads), n_kv_heads_(n_kv_heads), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(blocks_.size() % 6 == 0, "blocks: 6 tensors per block, got ", blocks_.size());
    TORCH_CHECK(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads");
    check_float_cpu(embedding_, "embedding");
    check_float_cpu(final_norm_, "final_norm");
    for (const auto& t : blocks_) check_float_cpu(t, "block weight");
    dim_ = embedding_.size(1);
    TORCH_CHECK(dim_ % n_heads == 0 && (dim_ / n_heads) % 2 == 0, "hidden dim / n_heads must be even");
    head_dim_ = dim_ / n_heads;
  }

  // token [B] int64; k_cache, v_cache [n_layers, B, Hkv, max_len, hd] (this step writes slot
  // `pos`); key_mask [B, max_len] bool or None; cos, sin_signed [B, n_steps, hd], row `step`
  // is this token's. Returns the final-normed hidden state [B, D].
  torch::Tensor step(const torch::Tensor& token, torch::Tensor& k_cache, torch::Tensor& v_cache,
                     const c10::optional<torch::Tensor>& key_mask, int64_t pos, const torch::Tensor& cos,
                     const torch::Tensor& sin_signed, int64_t step) const {
    const int64_t B = token.size(0), D = dim_, hd = head_dim_, H = n_heads_, Hkv = n_kv_heads_;
    const int64_t n_layers = static_cast<int64_t>(blocks_.size() / 6);
    check_float_cpu(k_cache, "k_cache");
    check_float_cpu(v_cache, "v_cache");
    check_float_cpu(cos, "cos");
    check_float_cpu(sin_signed, "sin_signed");
    TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.dim() == 5 && k_cache.size(0) == n_layers &&
                k_cache.size(1) == B && k_cache.size(2) == Hkv && k_cache.size(4) == hd,
                "k_cache/v_cache must be [n_layers, B, n_kv_heads, max_len, head_dim]");
    const int64_t max_len = k_cache.size(3);
    TORCH_CHECK(pos >= 0 && pos < max_len, "KV cache holds ", max_len, " positions; slot ", pos, " was asked for");
    TORCH_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(2) == hd && step >= 0 && step < cos.size(1),
                "cos/sin must be [B, n_steps, head_dim] with step < n_steps");
    TORCH_CHECK(token.device().is_cpu() && token.scalar_type() == torch::kInt64 && token.dim() == 1,
                "token must be an int64 CPU tensor [B]");

    auto opts = embedding_.options();
    auto x = torch::empty({B, D}, opts);            // the residual stream
    auto h = torch::empty({B, D}, opts);            // normed input of a projection
    auto q = torch::empty({B, Hkv, H / Hkv, hd}, opts);
    const int64_t vocab = embedding_.size(0);
    const auto tokens = token.contiguous();       // held: a copy made here must outlive the pointer
    const auto* tok = tokens.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(tok[b] >= 0 && tok[b] < vocab, "token id ", tok[b], " is outside the vocabulary of ", vocab);
      std::copy_n(embedding_.data_ptr<float>() + tok[b] * D, D, x.data_ptr<float>() + b * D);
    }
    const bool* mask = nullptr;
    torch::Tensor mask_tensor;
    if (key_mask.has_value()) {
      mask_tensor = key_mask->contiguous();
      TORCH_CHECK(mask_tensor.device().is_cpu() && mask_tensor.scalar_type() == torch::kBool &&
                  mask_tensor.dim() == 2 && mask_tensor.size(0) == B && mask_tensor.size(1) == max_len,
                  "key_mask must be a bool CPU tensor [B, max_len]");
      mask = mask_tensor.data_ptr<bool>();
    }
    auto y = torch::empty({B, D}, opts);           // attention output, [B, Hkv, G, hd] flattened

    const float* cos_p = cos.data_ptr<float>() + step * hd;
    const float* sin_p = sin_signed.data_ptr<float>() + step * hd;
    const int64_t table_stride = cos.size(1) * hd, half = hd / 2;
    for (int64_t i = 0; i < n_layers; ++i) {
      const torch::Tensor* w = &blocks_[6 * i];
      // Attention: x += out_proj(attention(rope(q), rope(k) and v written to the cache))
      rms_norm_rows(x.data_ptr<float>(), w[0].data_ptr<float>(), h.data_ptr<float>(), B, D, eps_);
      auto qkv = at::mm(h, w[1].t());                                          // [B, (H + 2 Hkv) hd]
      auto k_layer = k_cache[i], v_layer = v_cache[i];                          // [B, Hkv, max_len, hd]
      const float* qkv_p = qkv.data_ptr<float>();
      float* k_p = k_layer.data_ptr<float>();
      float* v_p = v_layer.data_ptr<float>();
      float* q_p = q.data_ptr<float>();
      const int64_t width = qkv.size(1);
      for (int64_t b = 0; b < B; ++b) {
        const float* c = cos_p + b * table_stride;
        const float* s = sin_p + b * table_stride;
        // Rotate-half RoPE on the H query and Hkv key heads: x * cos + swap_halves(x) * sin_signed.
        for (int64_t head = 0; head < H + Hkv; ++head) {
          const float* src = qkv_p + b * width + head * hd;
          float* dst = head < H ? q_p + (b * H + head) * hd
                                : k_p + ((b * Hkv + head - H) * max_len + pos) * hd;
          for (int64_t j = 0; j < hd; ++j) dst[j] = src[j] * c[j] + src[j < half ? j + half : j - half] * s[j];
        }
        for (int64_t head = 0; head < Hkv; ++head) {
          const float* src = qkv_p + b * width + (H + Hkv + head) * hd;
          std::copy_n(src, hd, v_p + ((b * Hkv + head) * max_len + pos) * hd);
        }
      }
      attend(q_p, k_p, v_p, mask, y.data_ptr<float>(), B, Hkv, H / Hkv, max_len, hd, pos);
      x.addmm_(y, w[2].t());
      // MLP: x += down_proj(silu(gate) * up)
      rms_norm_rows(x.data_ptr<float>(), w[3].data_ptr<float>(), h.data_ptr<float>(), B, D, eps_);
      auto gate_up = at::mm(h, w[4].t());                                      // [B, 2 I]
      const int64_t inter = gate_up.size(1) / 2;
      auto act = torch::empty({B, inter}, opts);
      const float* gu = gate_up.data_ptr<float>();
      float* a = act.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b)
        for (int64_t j = 0; j < inter; ++j) {
          const float g = gu[b * 2 * inter + j];
          a[b * inter + j] = g / (1.f + std::exp(-g)) * gu[b * 2 * inter + inter + j];
        }
      x.addmm_(act, w[5].t());
    }
    rms_norm_rows(x.data_ptr<float>(), final_norm_.data_ptr<float>(), h.data_ptr<float>(), B, D, eps_);
    return h;
  }

 private:
  torch::Tensor embedding_;
  std::vector<torch::Tensor> blocks_;
  torch::Tensor final_norm_;
  int64_t n_heads_, n_kv_heads_, dim_ = 0, head_dim_ = 0;
  float eps_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<FusedDecoder>(m, "FusedDecoder")
      .def(pybind11::init<torch::Tensor, std::vector<torch::Tensor>, torch::Tensor, int64_t, int64_t, double>())
      .def("step", &FusedDecoder::step);
}
