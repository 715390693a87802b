// Fused CPU compression of keys with a fixed number of kept channels (SparK's ratio selection):
// saliency -> top-T selection -> packing, in one pass per row (token, kv-head), with no
// [B, H, S, D] intermediate. The plain PyTorch path in sparkkv/method.py computes the same thing
// (same tie rule) and is its reference.
//
//   keys  [B, H, S, D]  float32 / bfloat16 / float16, contiguous
//   qn    [B, H, D]     float32: per-channel window query norms
//   T     kept channels per row; squared: saliency K^2 * qn (else |K| * qn)
// returns
//   vals  [B, H, S, T]  keys' dtype: kept values, ascending channels
//   keep  [B, H, S, D/8] uint8: bit c % 8 of byte c / 8 set when channel c is kept
//   sign  [B, H, S, D/8] uint8: bit set when channel c is pruned and K > 0 (empty if !want_sign)
//   mean  [B, H, S]     float32: mean saliency of the pruned channels (0 when none is pruned)
//
// Selection: the T largest saliencies; ties go to the lower channel; NaN counts as the largest
// (a NaN key stays visible, as it would be to dense attention).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename scalar_t>
void compress_impl(const at::Tensor& keys, const at::Tensor& qn, int64_t T, bool squared, bool want_sign,
                   at::Tensor& vals, at::Tensor& keep, at::Tensor& sign, at::Tensor& mean) {
  const int64_t B = keys.size(0), H = keys.size(1), S = keys.size(2), D = keys.size(3);
  const int64_t D8 = D / 8, P = D - T, rows = B * H * S;
  const scalar_t* kp = keys.data_ptr<scalar_t>();
  const float* qp = qn.data_ptr<float>();
  scalar_t* vp = vals.data_ptr<scalar_t>();
  uint8_t* keepp = keep.data_ptr<uint8_t>();
  uint8_t* signp = want_sign ? sign.data_ptr<uint8_t>() : nullptr;
  float* meanp = mean.data_ptr<float>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> sal(D), tmp(D);
    std::vector<uint8_t> kept(D);
    for (int64_t row = begin; row < end; ++row) {
      const scalar_t* k = kp + row * D;
      const float* q = qp + (row / S) * D;
      for (int64_t c = 0; c < D; ++c) {
        const float x = to_float(k[c]);
        const float s = (squared ? x * x : std::fabs(x)) * q[c];
        sal[c] = std::isnan(s) ? INFINITY : s;  // NaN first; a strict weak order needs no NaN
      }
      if (P == 0) {
        std::fill(kept.begin(), kept.end(), 1);
      } else {
        // threshold = the T-th largest saliency; keep everything above it, then the lowest
        // channels among those equal to it until T are kept
        std::copy(sal.begin(), sal.end(), tmp.begin());
        std::nth_element(tmp.begin(), tmp.begin() + (T - 1), tmp.end(), std::greater<float>());
        const float thr = tmp[T - 1];
        int64_t above = 0;
        for (int64_t c = 0; c < D; ++c) above += sal[c] > thr;
        int64_t ties = T - above;
        for (int64_t c = 0; c < D; ++c) {
          const bool take = sal[c] > thr || (sal[c] == thr && ties > 0);
          ties -= (sal[c] == thr && take);
          kept[c] = take;
        }
      }
      scalar_t* v = vp + row * T;
      uint8_t* kb = keepp + row * D8;
      uint8_t* sb = signp ? signp + row * D8 : nullptr;
      float pruned_sum = 0.f;
      int64_t j = 0;
      for (int64_t byte = 0; byte < D8; ++byte) {
        uint8_t kbits = 0, sbits = 0;
        for (int64_t bit = 0; bit < 8; ++bit) {
          const int64_t c = byte * 8 + bit;
          if (kept[c]) {
            kbits |= static_cast<uint8_t>(1u << bit);
            v[j++] = k[c];
          } else {
            pruned_sum += sal[c];
            if (to_float(k[c]) > 0.f) sbits |= static_cast<uint8_t>(1u << bit);
          }
        }
        kb[byte] = kbits;
        if (sb) sb[byte] = sbits;
      }
      meanp[row] = P ? pruned_sum / static_cast<float>(P) : 0.f;
    }
  });
}

}  // namespace

std::vector<at::Tensor> compress_fixed(at::Tensor keys, at::Tensor qn, int64_t T, bool squared, bool want_sign) {
  TORCH_CHECK(keys.dim() == 4 && keys.is_contiguous(), "keys must be contiguous [B, H, S, D]");
  const int64_t B = keys.size(0), H = keys.size(1), S = keys.size(2), D = keys.size(3);
  TORCH_CHECK(D % 8 == 0, "head_dim must be a multiple of 8");
  TORCH_CHECK(T >= 1 && T <= D, "T must be in [1, D]");
  TORCH_CHECK(qn.scalar_type() == at::kFloat && qn.is_contiguous() && qn.numel() == B * H * D, "qn must be contiguous float32 [B, H, D]");
  auto u8 = keys.options().dtype(at::kByte);
  auto vals = at::empty({B, H, S, T}, keys.options());
  auto keep = at::empty({B, H, S, D / 8}, u8);
  auto sign = want_sign ? at::empty({B, H, S, D / 8}, u8) : at::empty({0}, u8);
  auto mean = at::empty({B, H, S}, keys.options().dtype(at::kFloat));
  switch (keys.scalar_type()) {
    case at::kFloat: compress_impl<float>(keys, qn, T, squared, want_sign, vals, keep, sign, mean); break;
    case at::kBFloat16: compress_impl<c10::BFloat16>(keys, qn, T, squared, want_sign, vals, keep, sign, mean); break;
    case at::kHalf: compress_impl<c10::Half>(keys, qn, T, squared, want_sign, vals, keep, sign, mean); break;
    default: TORCH_CHECK(false, "keys must be float32, bfloat16 or float16");
  }
  return {vals, keep, sign, mean};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compress_fixed", &compress_fixed, "SparK ratio selection + packing of keys, one pass per row");
}
