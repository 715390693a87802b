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
// (a NaN key stays visible, as it would be to dense attention). The T-th largest is found by a
// bitwise search over order-preserving integer keys (no sort, no branch on the data).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

// Saliency as an unsigned integer with the same order (and the same equalities, -0 folded into
// +0), so the threshold search below is integer compares that vectorize and never branch.
inline uint32_t order_key(float s) {
  s += 0.0f;  // -0 -> +0: the two compare equal as floats
  uint32_t u;
  std::memcpy(&u, &s, sizeof(u));
  return u ^ (static_cast<uint32_t>(static_cast<int32_t>(u) >> 31) | 0x80000000u);
}

constexpr int64_t kBlock = 8;  // rows whose thresholds are searched together (independent chains)

// kD: the head dim when known at compile time (64, 128: the loops over channels unroll), else 0
template <typename scalar_t, int64_t kD>
void compress_impl(const at::Tensor& keys, const at::Tensor& qn, int64_t T, bool squared, bool want_sign,
                   at::Tensor& vals, at::Tensor& keep, at::Tensor& sign, at::Tensor& mean) {
  const int64_t B = keys.size(0), H = keys.size(1), S = keys.size(2), D = kD ? kD : keys.size(3);
  const int64_t D8 = D / 8, P = D - T, rows = B * H * S;
  const scalar_t* kp = keys.data_ptr<scalar_t>();
  const float* qp = qn.data_ptr<float>();
  scalar_t* vp = vals.data_ptr<scalar_t>();
  uint8_t* keepp = keep.data_ptr<uint8_t>();
  uint8_t* signp = want_sign ? sign.data_ptr<uint8_t>() : nullptr;
  float* meanp = mean.data_ptr<float>();
  at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> sal(kBlock * D);
    std::vector<uint32_t> order(kBlock * D), kept(D);
    std::vector<scalar_t> packed(D);
    uint32_t thr[kBlock];
    for (int64_t first = begin; first < end; first += kBlock) {
      const int64_t n = std::min(kBlock, end - first);
      // saliency of each row (NaN counts as the largest) and its order key
      for (int64_t r = 0; r < n; ++r) {
        const scalar_t* k = kp + (first + r) * D;
        const float* q = qp + ((first + r) / S) * D;
        float* sl = sal.data() + r * D;
        uint32_t* o = order.data() + r * D;
        for (int64_t c = 0; c < D; ++c) {
          const float x = to_float(k[c]);
          const float s = (squared ? x * x : std::fabs(x)) * q[c];
          sl[c] = std::isnan(s) ? INFINITY : s;
          o[c] = order_key(sl[c]);
        }
      }
      // thr[r] = row r's T-th largest key: the largest value with at least T keys >= it, built bit
      // by bit from the top; the rows' searches interleave (each pass waits on its previous one)
      if (P > 0) {
        std::fill(thr, thr + kBlock, 0u);
        for (int bit = 31; bit >= 0; --bit) {
          for (int64_t r = 0; r < n; ++r) {
            const uint32_t cand = thr[r] | (1u << bit);
            const uint32_t* o = order.data() + r * D;
            uint32_t count = 0;
            for (int64_t c = 0; c < D; ++c) count += static_cast<uint32_t>(o[c] >= cand);
            thr[r] = count >= static_cast<uint32_t>(T) ? cand : thr[r];
          }
        }
      }
      for (int64_t r = 0; r < n; ++r) {
        const int64_t row = first + r;
        const scalar_t* k = kp + row * D;
        const float* sl = sal.data() + r * D;
        const uint32_t* o = order.data() + r * D;
        if (P == 0) {
          std::fill(kept.begin(), kept.end(), 1u);
        } else {
          // keep everything above thr, then the lowest channels among those equal to it until T are kept
          const uint32_t t = thr[r];
          uint32_t above = 0, equal = 0;
          for (int64_t c = 0; c < D; ++c) {
            above += o[c] > t;
            equal += o[c] == t;
          }
          uint32_t ties = static_cast<uint32_t>(T) - above;
          if (equal == ties) {  // the usual case: every channel at the threshold is kept
            for (int64_t c = 0; c < D; ++c) kept[c] = o[c] >= t;
          } else {
            for (int64_t c = 0; c < D; ++c) {
              const uint32_t eq = o[c] == t;
              const uint32_t take = static_cast<uint32_t>(o[c] > t) | (eq & static_cast<uint32_t>(ties > 0));
              ties -= eq & take;
              kept[c] = take;
            }
          }
        }
        float pruned_sum = 0.f;
        for (int64_t c = 0; c < D; ++c) pruned_sum += kept[c] ? 0.f : sl[c];
        uint8_t* kb = keepp + row * D8;
        uint8_t* sb = signp ? signp + row * D8 : nullptr;
        for (int64_t byte = 0; byte < D8; ++byte) {
          uint32_t kbits = 0, sbits = 0;
          for (int64_t bit = 0; bit < 8; ++bit) {
            const int64_t c = byte * 8 + bit;
            kbits |= kept[c] << bit;
            sbits |= static_cast<uint32_t>(!kept[c] & (to_float(k[c]) > 0.f)) << bit;
          }
          kb[byte] = static_cast<uint8_t>(kbits);
          if (sb) sb[byte] = static_cast<uint8_t>(sbits);
        }
        int64_t j = 0;
        for (int64_t c = 0; c < D; ++c) {  // compaction without a branch: always write, advance when kept
          packed[j] = k[c];
          j += kept[c];
        }
        std::memcpy(vp + row * T, packed.data(), T * sizeof(scalar_t));
        meanp[row] = P ? pruned_sum / static_cast<float>(P) : 0.f;
      }
    }
  });
}

template <typename scalar_t>
void compress_dispatch(const at::Tensor& keys, const at::Tensor& qn, int64_t T, bool squared, bool want_sign,
                       at::Tensor& vals, at::Tensor& keep, at::Tensor& sign, at::Tensor& mean) {
  switch (keys.size(3)) {
    case 64: compress_impl<scalar_t, 64>(keys, qn, T, squared, want_sign, vals, keep, sign, mean); break;
    case 128: compress_impl<scalar_t, 128>(keys, qn, T, squared, want_sign, vals, keep, sign, mean); break;
    default: compress_impl<scalar_t, 0>(keys, qn, T, squared, want_sign, vals, keep, sign, mean);
  }
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
    case at::kFloat: compress_dispatch<float>(keys, qn, T, squared, want_sign, vals, keep, sign, mean); break;
    case at::kBFloat16: compress_dispatch<c10::BFloat16>(keys, qn, T, squared, want_sign, vals, keep, sign, mean); break;
    case at::kHalf: compress_dispatch<c10::Half>(keys, qn, T, squared, want_sign, vals, keep, sign, mean); break;
    default: TORCH_CHECK(false, "keys must be float32, bfloat16 or float16");
  }
  return {vals, keep, sign, mean};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compress_fixed", &compress_fixed, "SparK ratio selection + packing of keys, one pass per row");
}
