// Fused CPU kernel: attention logits of queries against SparK-packed keys, without ever
// materialising the dense keys. For every packed row (token) it rebuilds the key row in
// registers -- kept values expanded into their channels, pruned channels filled with
// sign * scale_t * chan_c -- and dots it with all M query rows that share the kv-head.
//
//   q     [B, H, M, D]   float32 (M = GQA group * query length)
//   vals  [B, H, S, T]   float32 / bfloat16 / float16, kept values in ascending channel order;
//         or 1-D (variable T per row, rows stored back to back): row offsets are rebuilt from the
//         popcounts of the keep bytes, a block of rows at a time
//   keep  [B, H, S, D/8] uint8 bit mask, sign [B, H, S, D/8] uint8 (or empty: no recovery)
//   scale [B, H, S]      float32 (or empty: 1), chan [B, H, D] float32 (or empty: 1)
//   out   [B, H, M, S]   float32
//
// Built on the machine that runs it (-march=native): the AVX-512 path (expand-loads of the kept
// values, mask blends for the fill) is compiled where the CPU has AVX512F/BW/VL/VBMI2, else a
// portable scalar path with the same semantics.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VBMI2__)
#include <immintrin.h>
#define SPARKKV_AVX512 1
#else
#define SPARKKV_AVX512 0
#endif

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(c10::Half x) { return static_cast<float>(x); }

template <typename scalar_t>
void scalar_row(const float* q, int64_t M, int64_t D, const scalar_t* v, const uint8_t* kb,
                const uint8_t* sb, float sc, const float* chan, bool fill, float* krow,
                float* out, int64_t out_stride) {
  int64_t j = 0;
  for (int64_t c = 0; c < D; ++c) {
    const bool kept = (kb[c >> 3] >> (c & 7)) & 1;
    if (kept) {
      krow[c] = to_float(v[j++]);
    } else if (fill) {
      const float mag = sc * (chan ? chan[c] : 1.f);
      krow[c] = ((sb[c >> 3] >> (c & 7)) & 1) ? mag : -mag;
    } else {
      krow[c] = 0.f;
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const float* qm = q + m * D;
    float acc = 0.f;
    for (int64_t c = 0; c < D; ++c) acc += qm[c] * krow[c];
    out[m * out_stride] = acc;
  }
}

#if SPARKKV_AVX512
template <typename scalar_t>
inline __m512 expand16(const scalar_t* v, uint16_t mask);

template <>
inline __m512 expand16<float>(const float* v, uint16_t mask) {
  return _mm512_maskz_expandloadu_ps(mask, v);
}
template <>
inline __m512 expand16<c10::BFloat16>(const c10::BFloat16* v, uint16_t mask) {
  __m256i h = _mm256_maskz_expandloadu_epi16(mask, v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <>
inline __m512 expand16<c10::Half>(const c10::Half* v, uint16_t mask) {
  __m256i h = _mm256_maskz_expandloadu_epi16(mask, v);
  return _mm512_cvtph_ps(h);
}

// One packed row against M query rows; D is a multiple of 16.
template <typename scalar_t>
void avx512_row(const float* q, int64_t M, int64_t D, const scalar_t* v, const uint8_t* kb,
                const uint8_t* sb, float sc, const float* chan, bool fill, float* out,
                int64_t out_stride) {
  constexpr int kMaxM = 16;
  __m512 acc[kMaxM];
  for (int64_t m0 = 0; m0 < M; m0 += kMaxM) {
    const int64_t mm = std::min<int64_t>(kMaxM, M - m0);
    for (int64_t m = 0; m < mm; ++m) acc[m] = _mm512_setzero_ps();
    const scalar_t* vp = v;
    const __m512 scv = _mm512_set1_ps(sc);
    for (int64_t c = 0; c < D; c += 16) {
      uint16_t km, sm = 0;
      std::memcpy(&km, kb + (c >> 3), 2);
      if (sb) std::memcpy(&sm, sb + (c >> 3), 2);
      __m512 kf = expand16<scalar_t>(vp, km);
      vp += __builtin_popcount(km);
      if (fill) {
        __m512 mag = chan ? _mm512_mul_ps(scv, _mm512_loadu_ps(chan + c)) : scv;
        __m512 neg = _mm512_sub_ps(_mm512_setzero_ps(), mag);
        __m512 f = _mm512_mask_blend_ps(static_cast<__mmask16>(sm), neg, mag);
        kf = _mm512_mask_blend_ps(static_cast<__mmask16>(km), f, kf);
      }
      for (int64_t m = 0; m < mm; ++m)
        acc[m] = _mm512_fmadd_ps(kf, _mm512_loadu_ps(q + (m0 + m) * D + c), acc[m]);
    }
    for (int64_t m = 0; m < mm; ++m) out[(m0 + m) * out_stride] = _mm512_reduce_add_ps(acc[m]);
  }
}
#endif

inline int64_t row_popcount(const uint8_t* kb, int64_t d8) {
  int64_t n = 0;
  for (int64_t i = 0; i < d8; ++i) n += __builtin_popcount(kb[i]);
  return n;
}

template <typename scalar_t>
void packed_qk_impl(const at::Tensor& q, const at::Tensor& vals, const at::Tensor& keep,
                    const at::Tensor& sign, const at::Tensor& scale, const at::Tensor& chan,
                    at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), M = q.size(2), D = q.size(3);
  const int64_t S = keep.size(2), D8 = D / 8;
  const bool fixed = vals.dim() == 4;
  const int64_t T = fixed ? vals.size(3) : -1;
  const float* qp = q.data_ptr<float>();
  const scalar_t* vp = vals.data_ptr<scalar_t>();
  const uint8_t* kp = keep.data_ptr<uint8_t>();
  const uint8_t* sp = sign.numel() ? sign.data_ptr<uint8_t>() : nullptr;
  const float* scp = scale.numel() ? scale.data_ptr<float>() : nullptr;
  const float* cp = chan.numel() ? chan.data_ptr<float>() : nullptr;
  const bool fill = sp != nullptr;
  float* op = out.data_ptr<float>();
  constexpr int64_t kBlock = 256;  // tokens per work item
  const int64_t blocks = (S + kBlock - 1) / kBlock;
  const int64_t items = B * H * blocks;
  // Variable T: first offset (into the flat vals) of every work item's first row.
  std::vector<int64_t> start(fixed ? 0 : items + 1, 0);
  if (!fixed) {
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / blocks, t0 = (item % blocks) * kBlock, t1 = std::min(S, t0 + kBlock);
        int64_t n = 0;
        for (int64_t t = t0; t < t1; ++t) n += row_popcount(kp + (bh * S + t) * D8, D8);
        start[item + 1] = n;
      }
    });
    for (int64_t i = 0; i < items; ++i) start[i + 1] += start[i];
    TORCH_CHECK(start[items] == vals.numel(), "flat vals hold ", vals.numel(), " values but the keep masks count ", start[items]);
  }
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> krow(D);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / blocks, t0 = (item % blocks) * kBlock;
      const int64_t t1 = std::min(S, t0 + kBlock);
      const float* qh = qp + bh * M * D;
      const float* ch = cp ? cp + bh * D : nullptr;
      int64_t offset = fixed ? 0 : start[item];
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t row = bh * S + t;
        const float sc = scp ? scp[row] : 1.f;
        const uint8_t* kb = kp + row * D8;
        const uint8_t* sb = sp ? sp + row * D8 : nullptr;
        const scalar_t* v = fixed ? vp + row * T : vp + offset;
        if (!fixed) offset += row_popcount(kb, D8);
        float* o = op + bh * M * S + t;
#if SPARKKV_AVX512
        if (D % 16 == 0) {
          avx512_row<scalar_t>(qh, M, D, v, kb, sb, sc, ch, fill, o, S);
          continue;
        }
#endif
        scalar_row<scalar_t>(qh, M, D, v, kb, sb, sc, ch, fill, krow.data(), o, S);
      }
    }
  });
}

}  // namespace

at::Tensor packed_qk(at::Tensor q, at::Tensor vals, at::Tensor keep, at::Tensor sign,
                     at::Tensor scale, at::Tensor chan) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be contiguous float32 [B, H, M, D]");
  TORCH_CHECK((vals.dim() == 4 || vals.dim() == 1) && vals.is_contiguous(), "vals must be contiguous [B, H, S, T] or flat 1-D");
  TORCH_CHECK(keep.dim() == 4 && keep.scalar_type() == at::kByte && keep.is_contiguous(), "keep must be contiguous uint8 [B, H, S, D/8]");
  TORCH_CHECK(q.size(3) % 8 == 0 && keep.size(3) * 8 == q.size(3), "head_dim mismatch between q and keep");
  TORCH_CHECK(!sign.numel() || (sign.sizes() == keep.sizes() && sign.is_contiguous()), "sign must match keep");
  TORCH_CHECK(!scale.numel() || (scale.scalar_type() == at::kFloat && scale.is_contiguous()), "scale must be contiguous float32 [B, H, S]");
  TORCH_CHECK(!chan.numel() || (chan.scalar_type() == at::kFloat && chan.is_contiguous()), "chan must be contiguous float32 [B, H, D]");
  auto out = at::empty({q.size(0), q.size(1), q.size(2), keep.size(2)}, q.options());
  switch (vals.scalar_type()) {
    case at::kFloat: packed_qk_impl<float>(q, vals, keep, sign, scale, chan, out); break;
    case at::kBFloat16: packed_qk_impl<c10::BFloat16>(q, vals, keep, sign, scale, chan, out); break;
    case at::kHalf: packed_qk_impl<c10::Half>(q, vals, keep, sign, scale, chan, out); break;
    default: TORCH_CHECK(false, "vals must be float32, bfloat16 or float16");
  }
  return out;
}

bool has_avx512_path() { return SPARKKV_AVX512; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_qk", &packed_qk, "logits of float32 queries against SparK-packed keys");
  m.def("has_avx512_path", &has_avx512_path, "whether the AVX-512 path was compiled in");
}
