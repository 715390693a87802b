// Fused CPU attention kernels over SparK-packed, quantized (or dense) keys and values.
//
//   decode: one pass per (batch, kv-head, split of the sequence): logits of the M query rows that
//           share the kv-head, online softmax, P.V -- over packed keys and packed or dense values,
//           never materialising them. Returns per-split partials (m, l, acc) for a log-sum-exp
//           merge with other splits and chunks (kernels/reference.py: merge_partials).
//   qk:     logits only (M query rows against packed keys), for multi-token forwards whose mask
//           differs per query row.
//
// Layouts (all contiguous):
//   q     [B, H, M, D]   float32 or bfloat16
//   dense operand        [B, H, S, D] float32 / bfloat16 / float16
//   packed operand       vals [B, H, S, T] (fixed T) or flat (variable T: row r owns popcount(keep[r])
//                        values, rows back to back), keep / sign uint8 [B, H, S, D/8] (bit c%8 of
//                        byte c/8), scale [B, H, S] (float32 / bfloat16 / float16), chan float32 [B, H, D].
//                        Or, instead of keep + sign, trits uint8 [B, H, S, ceil(D/5)]: channel c is
//                        digit c%5 of byte c/5 in base 3 (0 kept, 1 pruned negative, 2 pruned positive).
//                        A pruned entry is (sign ? +-1 : +1) * (scale ? scale : 1) * (chan ? chan : 1)
//                        when any of the three is stored, else 0.
//   quantized values     (a dense operand's values, or a fixed-T packed operand's kept values) as codes
//                        uint8 [B, H, S, ceil(N * bits / 8)] (bits 8 / 4 / 2, element n at bit n*bits,
//                        little-endian in the byte), dequantized as c * s + z, or (c - (2^bits-1)/2) * s
//                        without a zero; s (and z) per group of `group` elements of a row
//                        ([B, H, S, ceil(N / group)]) or of `group` tokens of an element ([B, H, G, N],
//                        token s in group (offset + s) / group). float32 / bfloat16 / float16 statistics.
//   bias  [B, 1 or H, S] float32 additive (-inf = masked), the same for all M rows.
//   out   m, l [B, H, P, M], acc [B, H, P, M, Dv] float32 (acc unnormalised; m = -inf, l = 0,
//         acc = 0 for a split that saw only masked tokens).
//
// Paths (chosen per call, see `Options`):
//   * AVX-512 (F/BW/VL/DQ/VBMI2 + BMI2), D <= 256; packed operands need D (Dv) % 16 == 0, dense
//     ones any head dim (the last partial chunk of a row is a masked load, zero lanes beyond it):
//       - bf16 dot products (AVX512_BF16, vdpbf16ps) for the logits when the query rows AND the
//         keys are bfloat16 (products are exact; pruned entries of the rebuilt key are rounded to
//         bfloat16, as `PackedTensor.dense()` stores them), and for P.V when the values are
//         bfloat16 (P is rounded to bfloat16 first, as PyTorch's bf16 attention does; l sums the
//         rounded P). Packed rows are rebuilt 32 channels at a time: the kept values are expanded
//         (vpexpandw from a register, merge-masked over the fill) straight into bf16 lanes.
//       - float32 FMAs otherwise: bf16 values expanded into the high halves of fp32 lanes
//         (a pdep-spread mask), fp16 through vcvtph2ps; pruned entries exact in float32.
//     Trits and quantized operands are not read by the AVX-512 paths (not testable on the machine
//     that wrote them): such calls take the AVX2 path below.
//   * AVX2 + FMA + F16C (any head dim; every operand kind): rows decoded into float32 tiles in L1
//     (packed rows expanded through a permutation table per keep byte, ternary codes through a
//     table per byte, codes dequantized 8 at a time), then float32 FMAs for the logits (8 key rows
//     per pass) and P.V. Taken when the AVX-512 paths are not compiled in or do not serve the call.
//   * portable scalar (no AVX2, or `portable` builds): float32, same semantics as the float32 path.
// Packed rows are expanded with vpexpand from memory (measured against the register form on this
// Zen 4 machine, see `kRegisterExpand`).
#ifndef SPARKKV_STANDALONE
#include <torch/extension.h>
#include <ATen/Parallel.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if !defined(SPARKKV_PORTABLE) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__AVX512VBMI2__) && defined(__BMI2__)
#include <immintrin.h>
#define SPARKKV_AVX512 1
#if defined(__AVX512BF16__)
#define SPARKKV_BF16DOT 1
#else
#define SPARKKV_BF16DOT 0
#endif
#else
#define SPARKKV_AVX512 0
#define SPARKKV_BF16DOT 0
#endif
#if !defined(SPARKKV_PORTABLE) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SPARKKV_AVX2 1
#else
#define SPARKKV_AVX2 0
#endif

namespace sparkkv {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int kBlock = 32;  // tokens per online-softmax block (a multiple of 8)

// ---------------------------------------------------------------------------------------------
// scalar conversions (portable)
// ---------------------------------------------------------------------------------------------
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as vcvtne2ps2bf16
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  uint32_t u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: man * 2^-24
      float f = std::ldexp(float(man), -24);
      return sign ? -f : f;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float load_elem(const void* base, int dtype, int64_t i) {
  switch (dtype) {
    case kF32: return static_cast<const float*>(base)[i];
    case kBF16: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
  }
}
inline int64_t popcount_bytes(const uint8_t* p, int64_t n) {
  int64_t total = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    total += __builtin_popcountll(w);
  }
  for (; i < n; ++i) total += __builtin_popcount(p[i]);
  return total;
}

// ---------------------------------------------------------------------------------------------
// problem description
// ---------------------------------------------------------------------------------------------
// Ternary mask code (packed.pack_trits): per byte, five base-3 digits; kept channels per byte
// (the padding digits of a row's last byte are 0, "kept", and are subtracted by the caller).
struct TritCounts {
  uint8_t kept[256];
  TritCounts() {
    for (int b = 0; b < 256; ++b) {
      int v = b, n = 0;
      for (int j = 0; j < 5; ++j, v /= 3) n += v % 3 == 0;
      kept[b] = uint8_t(n);
    }
  }
};
inline const TritCounts& trit_counts() {
  static const TritCounts t;
  return t;
}
inline int trit_at(const uint8_t* row, int64_t c) {
  static const int pow3[5] = {1, 3, 9, 27, 81};
  return (row[c / 5] / pow3[c % 5]) % 3;
}
inline int64_t trit_kept(const uint8_t* row, int64_t D) {
  const int64_t nb = (D + 4) / 5;
  int64_t n = 0;
  for (int64_t i = 0; i < nb; ++i) n += trit_counts().kept[row[i]];
  return n - (nb * 5 - D);
}

// Quantized values (quant.py): see the layouts above. `N` codes per row, `row_bytes` bytes per row;
// `groups`: statistics per row (row axis) or token groups per (b, h) (token and channel axes);
// `width`: statistics per token group (N, or D for the channel axis, where a packed row's kept
// value takes the statistics of its channel).
struct Quant {
  const uint8_t* codes = nullptr;
  int bits = 0;
  int64_t N = 0, row_bytes = 0, group = 1, groups = 0, offset = 0, width = 0;
  bool token_axis = false, channel = false;
  const void* scale = nullptr;
  const void* zero = nullptr;  // nullptr: symmetric mid-rise codes
  int sdtype = kF16;

  float mid() const { return float((1 << bits) - 1) * 0.5f; }
  int code(int64_t row, int64_t n) const {
    const uint8_t* r = codes + row * row_bytes;
    if (bits == 8) return r[n];
    const int64_t bit = n * bits;
    return (r[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
  }
  // index of the statistics of element n of row `row` (rows of S tokens per (b, h)); `col`: the
  // element's statistics column on the token axes (n, or its channel)
  int64_t stat_index(int64_t row, int64_t S, int64_t n, int64_t col) const {
    return token_axis ? ((row / S) * groups + (offset + row % S) / group) * width + col : row * groups + n / group;
  }
  float dequant(int64_t row, int64_t S, int64_t n, int64_t col) const {
    const int64_t i = stat_index(row, S, n, col);
    const float s = load_elem(scale, sdtype, i), c = float(code(row, n));
    return zero ? c * s + load_elem(zero, sdtype, i) : (c - mid()) * s;
  }
};

// One [B, H, S, D] operand: dense (no keep, no trits) or packed; its values raw (`vals`) or
// quantized (`q.codes`).
struct Operand {
  int dtype = kF32;
  const void* vals = nullptr;
  int64_t count = 0;  // elements in vals
  int64_t D = 0;
  int64_t S = 0;
  int64_t T = 0;  // values per row: D (dense), fixed T, or -1 (variable)
  const uint8_t* keep = nullptr;
  const uint8_t* sign = nullptr;
  const uint8_t* trits = nullptr;  // [B*H*S, ceil(D/5)], instead of keep and sign
  const void* scale = nullptr;
  int scale_dtype = kF32;
  const float* chan = nullptr;  // [B*H, D]
  Quant q;

  bool packed() const { return keep != nullptr || trits != nullptr; }
  bool quantized() const { return q.codes != nullptr; }
  bool signs() const { return sign != nullptr || trits != nullptr; }
  bool fills() const { return sign || trits || scale || chan; }
  int64_t d8() const { return D / 8; }
  int64_t tb() const { return (D + 4) / 5; }  // trit bytes per row
  float scale_at(int64_t row) const { return scale ? load_elem(scale, scale_dtype, row) : 1.f; }
  int64_t row_count(int64_t row) const {  // values stored for `row`
    if (!packed()) return D;
    if (T >= 0) return T;
    return keep ? popcount_bytes(keep + row * d8(), d8()) : trit_kept(trits + row * tb(), D);
  }
  // the j-th stored value of row `row` (in channel c), whose first raw value is element `off` of vals
  float stored(int64_t row, int64_t off, int64_t j, int64_t c) const {
    return quantized() ? q.dequant(row, S, j, q.channel ? c : j) : load_elem(vals, dtype, off + j);
  }
};

// Where row `row`'s first value lives: a function of the row for dense / fixed-T operands, a
// running offset for variable T (seeded with the item's first offset, see item_offsets).
struct Cursor {
  const Operand* op;
  int64_t next;
  int64_t start(int64_t row) const { return !op->packed() ? row * op->D : op->T >= 0 ? row * op->T : next; }
  void advance(int64_t row) {
    if (op->packed() && op->T < 0) next += op->row_count(row);
  }
};

struct Options {
  bool portable = false;  // force the scalar path
  bool bf16_dot = true;   // allow the bf16 dot-product stages (else float32 FMAs)
  bool avx512 = true;     // allow the AVX-512 paths (false: the AVX2 path, where compiled in)
};

// Operands read in place from pages (vLLM's KV pages, sparkkv/vllm/records.py): every field of K and
// V but `chan` describes page 0 (`[1, H, S, ...]`), and batch item b reads the same bytes of page
// ids[b], `stride` bytes per page; `chan`, the query rows and the bias stay indexed by b.
struct Paging {
  const int64_t* ids = nullptr;  // [B], nullptr: not paged
  int64_t stride = 0;
};

struct Problem {
  int64_t B = 0, H = 0, S = 0, M = 0, D = 0, Dv = 0;
  int q_dtype = kF32;
  const void* q = nullptr;  // [B, H, M, D]
  Operand K, V;
  const float* bias = nullptr;  // [B, bias_heads, S]
  int64_t bias_heads = 1;
  float scaling = 1.f;
  Options opt;
  Paging pages;
};

inline const void* shifted(const void* ptr, int64_t bytes) {
  return ptr ? static_cast<const uint8_t*>(ptr) + bytes : nullptr;
}
inline const uint8_t* shifted(const uint8_t* ptr, int64_t bytes) { return ptr ? ptr + bytes : nullptr; }

// `op` with its page fields moved `bytes` on and its `chan` moved to batch item b (D floats per head)
inline Operand on_page(Operand op, int64_t bytes, int64_t b, int64_t H) {
  op.vals = shifted(op.vals, bytes);
  op.keep = shifted(op.keep, bytes);
  op.sign = shifted(op.sign, bytes);
  op.trits = shifted(op.trits, bytes);
  op.scale = shifted(op.scale, bytes);
  op.q.codes = shifted(op.q.codes, bytes);
  op.q.scale = shifted(op.q.scale, bytes);
  op.q.zero = shifted(op.q.zero, bytes);
  if (op.chan) op.chan += b * H * op.D;
  return op;
}

// A paged problem's batch item b as a problem of one batch item over its own page
inline Problem page_item(const Problem& p, int64_t b) {
  Problem x = p;
  const int64_t bytes = p.pages.ids[b] * p.pages.stride;
  x.B = 1;
  x.pages = Paging{};
  x.K = on_page(p.K, bytes, b, p.H);
  x.V = on_page(p.V, bytes, b, p.H);
  x.q = shifted(p.q, b * p.H * p.M * p.D * (p.q_dtype == kF32 ? 4 : 2));
  if (p.bias) x.bias = p.bias + b * p.bias_heads * p.S;
  return x;
}

inline const float* bias_row(const Problem& p, int64_t bh) {
  if (!p.bias) return nullptr;
  const int64_t b = bh / p.H, h = bh % p.H;
  return p.bias + (b * p.bias_heads + (p.bias_heads == 1 ? 0 : h)) * p.S;
}

// First value offset of every item's first row for a variable-T operand; items are
// (bh, part) in that order, part covering rows [part * per, min(S, (part + 1) * per)).
inline std::vector<int64_t> item_offsets(const Operand& op, int64_t BH, int64_t S, int64_t parts, int64_t per,
                                         int64_t* total) {
  const int64_t items = BH * parts;
  std::vector<int64_t> start(items + 1, 0);
  for (int64_t item = 0; item < items; ++item) {
    const int64_t bh = item / parts, t0 = (item % parts) * per, t1 = std::min(S, t0 + per);
    if (t1 <= t0) continue;
    if (op.keep) {
      start[item + 1] = popcount_bytes(op.keep + (bh * S + t0) * op.d8(), (t1 - t0) * op.d8());
    } else {
      for (int64_t t = t0; t < t1; ++t) start[item + 1] += op.row_count(bh * S + t);
    }
  }
  for (int64_t i = 0; i < items; ++i) start[i + 1] += start[i];
  *total = start[items];
  return start;
}

// ---------------------------------------------------------------------------------------------
// portable scalar path
// ---------------------------------------------------------------------------------------------
// Row `row` of `op` (first value at element `off`) as float32 into out[D]; pruned entries exact.
inline void rebuild_row(const Operand& op, int64_t bh, int64_t row, int64_t off, float* out) {
  const int64_t D = op.D;
  if (!op.packed()) {
    for (int64_t c = 0; c < D; ++c) out[c] = op.stored(row, off, c, c);
    return;
  }
  const uint8_t* kb = op.keep ? op.keep + row * op.d8() : nullptr;
  const uint8_t* sb = op.sign ? op.sign + row * op.d8() : nullptr;
  const uint8_t* tb = op.trits ? op.trits + row * op.tb() : nullptr;
  const float s = op.scale_at(row);
  const float* ch = op.chan ? op.chan + bh * D : nullptr;
  const bool fill = op.fills();
  int64_t j = 0;
  for (int64_t c = 0; c < D; ++c) {
    bool kept, positive;
    if (tb) {
      const int t = trit_at(tb, c);
      kept = t == 0;
      positive = t == 2;
    } else {
      kept = (kb[c >> 3] >> (c & 7)) & 1;
      positive = !sb || ((sb[c >> 3] >> (c & 7)) & 1);
    }
    if (kept) {
      out[c] = op.stored(row, off, j++, c);
    } else if (fill) {
      float f = s * (ch ? ch[c] : 1.f);
      out[c] = positive ? f : -f;
    } else {
      out[c] = 0.f;
    }
  }
}

inline void load_q_f32(const Problem& p, int64_t bh, float* q) {
  for (int64_t i = 0; i < p.M * p.D; ++i) q[i] = load_elem(p.q, p.q_dtype, bh * p.M * p.D + i);
}

// One (bh, token range) item: online softmax over tokens one at a time.
inline void decode_item_scalar(const Problem& p, int64_t bh, int64_t t0, int64_t t1, int64_t koff, int64_t voff,
                               float* m_out, float* l_out, float* acc_out) {
  const int64_t M = p.M, D = p.D, Dv = p.Dv;
  std::vector<float> q(M * D), krow(D), vrow(Dv), logit(M);
  load_q_f32(p, bh, q.data());
  std::fill(m_out, m_out + M, -kInf);
  std::fill(l_out, l_out + M, 0.f);
  std::fill(acc_out, acc_out + M * Dv, 0.f);
  const float* bias = bias_row(p, bh);
  Cursor kc{&p.K, koff}, vc{&p.V, voff};
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t row = bh * p.S + t;
    const float b = bias ? bias[t] : 0.f;
    const int64_t kstart = kc.start(row), vstart = vc.start(row);
    kc.advance(row);
    vc.advance(row);
    if (b == -kInf) continue;
    rebuild_row(p.K, bh, row, kstart, krow.data());
    for (int64_t m = 0; m < M; ++m) {
      float dot = 0.f;
      for (int64_t c = 0; c < D; ++c) dot += q[m * D + c] * krow[c];
      logit[m] = dot * p.scaling + b;
    }
    rebuild_row(p.V, bh, row, vstart, vrow.data());
    for (int64_t m = 0; m < M; ++m) {
      const float x = logit[m];
      if (x == -kInf) continue;
      const float mn = std::max(m_out[m], x);
      const float alpha = std::exp(m_out[m] - mn), pm = std::exp(x - mn);
      float* a = acc_out + m * Dv;
      if (alpha != 1.f)
        for (int64_t c = 0; c < Dv; ++c) a[c] *= alpha;
      for (int64_t c = 0; c < Dv; ++c) a[c] += pm * vrow[c];
      l_out[m] = l_out[m] * alpha + pm;
      m_out[m] = mn;
    }
  }
}

inline void qk_item_scalar(const Problem& p, int64_t bh, int64_t t0, int64_t t1, int64_t koff, float* out) {
  const int64_t M = p.M, D = p.D;
  std::vector<float> q(M * D), krow(D);
  load_q_f32(p, bh, q.data());
  Cursor kc{&p.K, koff};
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t row = bh * p.S + t;
    rebuild_row(p.K, bh, row, kc.start(row), krow.data());
    kc.advance(row);
    for (int64_t m = 0; m < M; ++m) {
      float dot = 0.f;
      for (int64_t c = 0; c < D; ++c) dot += q[m * D + c] * krow[c];
      out[(bh * M + m) * p.S + t] = dot;
    }
  }
}

#if SPARKKV_AVX512
// ---------------------------------------------------------------------------------------------
// AVX-512 helpers
// ---------------------------------------------------------------------------------------------
inline uint32_t load_bits32(const uint8_t* p) {  // 4 mask bytes (32 channels), little endian
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint32_t load_bits16(const uint8_t* p) {  // 2 mask bytes (16 channels)
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}
// The mask bits of the 32-channel chunk starting at byte `byte` of a row of `d8` bytes (the last
// chunk of a row may hold only 16 channels).
inline uint32_t chunk_bits(const uint8_t* row, int64_t byte, int64_t d8) {
  return byte + 4 <= d8 ? load_bits32(row + byte) : load_bits16(row + byte);
}

// exp(x) for x <= 0 (the only arguments online softmax needs); -inf -> 0. Cody-Waite reduction
// and a degree-6 polynomial: about 1 ulp.
inline __m512 exp_nonpos(__m512 x) {
  const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-104.f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~underflow), _mm512_scalef_ps(y, n));
}

// Round float32 lanes to bfloat16 precision (nearest even), kept as float32.
inline __m512 round_bf16(__m512 x) {
#if SPARKKV_BF16DOT
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
#else
  __m512i u = _mm512_castps_si512(x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(int(0xffff0000u))));
#endif
}

// [sum(a), sum(b), sum(c), sum(d)]
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));  // a0+a2 b0+b2 a1+a3 b1+b3
  const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
  const __m512 abcd = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))),
                                    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(ab), _mm512_castps_pd(cd))));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Per-item state of one packed operand's fill: chan copied and zero-padded to a multiple of 32.
struct FillState {
  bool any = false, sign = false, chan = false;
  const float* chanp = nullptr;  // [D32] padded
};

inline FillState fill_state(const Operand& op, int64_t bh, int64_t D32, std::vector<float>& chanbuf) {
  FillState f;
  if (!op.packed()) return f;
  f.any = op.fills();
  f.sign = op.sign != nullptr;
  f.chan = op.chan != nullptr;
  if (f.chan) {
    chanbuf.assign(D32, 0.f);
    std::memcpy(chanbuf.data(), op.chan + bh * op.D, op.D * sizeof(float));
    f.chanp = chanbuf.data();
  }
  return f;
}

inline int elem_size(int dtype) { return dtype == kF32 ? 4 : 2; }

// prefetcht0 that survives optimisation: GCC deletes a loop whose only effect is
// __builtin_prefetch (C++ forward-progress dead-loop elimination).
inline void prefetch_line(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p))); }

// Per-block state of the value rows: where every token's values start, how many it stores,
// whether the register-form loads are safe, its scale. `prefetch(i)` is called by the logits loop
// at token i: P.V reads the block 32 channels at a time across its rows, an order the hardware
// prefetcher serves at about half the bandwidth of a row-major sweep (docs/kernels.md), so the
// value rows are requested row by row while the keys are walked.
struct ValueRows {
  const Operand* V = nullptr;
  int64_t row0 = 0;
  int64_t off[kBlock];
  int64_t cnt[kBlock];
  bool safe[kBlock];
  float scale[kBlock];

  void fill(const Operand& op, int64_t first_row, int n, Cursor& vc) {
    V = &op;
    row0 = first_row;
    for (int i = 0; i < n; ++i) {
      const int64_t row = row0 + i;
      off[i] = vc.start(row);
      cnt[i] = op.row_count(row);
      if (op.packed()) {
        safe[i] = off[i] + cnt[i] + 32 <= op.count;
        scale[i] = op.scale_at(row);
      }
      vc.advance(row);
    }
  }
  void prefetch(int i) const {
    const int es = elem_size(V->dtype);
    const char* v = static_cast<const char*>(V->vals) + off[i] * es;
    const int64_t bytes = cnt[i] * es;
    for (int64_t b = 0; b < bytes; b += 64) prefetch_line(v + b);
    if (bytes % 64) prefetch_line(v + bytes - 1);  // a row straddling a line boundary
    if (V->packed()) {
      prefetch_line(V->keep + (row0 + i) * V->d8());
      if (V->sign) prefetch_line(V->sign + (row0 + i) * V->d8());
    }
  }
};

// Expand form (docs/kernels.md). Memory form (default): vpexpand with a memory operand, which reads
// only the kept values. Register form (-DSPARKKV_EXPAND_REGISTER): load 64 bytes, then vpexpand
// from the register; the empty asm keeps GCC from folding the load back into the expand. On AMD
// Zen 4 the memory form measured 0-7% faster; the register form needs rows whose 64-byte load
// stays inside `vals` (`safe`).
#ifdef SPARKKV_EXPAND_REGISTER
constexpr bool kRegisterExpand = true;
#else
constexpr bool kRegisterExpand = false;
#endif
template <class T>
inline T opaque(T x) {
  asm("" : "+v"(x));
  return x;
}

// ---- float32 row chunks (16 channels) -------------------------------------------------------
// Fill of 16 channels in float32 (exact): +-scale * chan.
inline __m512 fill16_f32(const FillState& f, __m512 sv, int64_t c, uint16_t sm) {
  if (!f.any) return _mm512_setzero_ps();
  __m512 mag = f.chan ? _mm512_mul_ps(sv, _mm512_loadu_ps(f.chanp + c)) : sv;
  return f.sign ? _mm512_mask_xor_ps(mag, static_cast<__mmask16>(~sm), mag, _mm512_set1_ps(-0.f)) : mag;
}

// Dense 16 channels starting at element `p` as float32.
template <int DT>
inline __m512 load16_f32(const void* base, int64_t p) {
  if (DT == kF32) return _mm512_loadu_ps(static_cast<const float*>(base) + p);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + p));
  if (DT == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// The first `left` lanes of 16 channels as `load16_f32` reads them, the other lanes 0; a masked
// load reads (and faults on) nothing past `left` elements, so the tail of the last row of a
// [B, H, S, D] tensor with D % 16 != 0 is safe to read.
template <int DT>
inline __m512 load16_f32(const void* base, int64_t p, int64_t left) {
  if (left >= 16) return load16_f32<DT>(base, p);
  const __mmask16 k = static_cast<__mmask16>(_bzhi_u32(0xffffu, unsigned(left)));
  if (DT == kF32) return _mm512_maskz_loadu_ps(k, static_cast<const float*>(base) + p);
  const __m256i h = _mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(base) + p);
  if (DT == kBF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

// Packed 16 channels: kept values (ascending, from element `p`) expanded over `fill`.
template <int DT>
inline __m512 expand16_f32(const void* base, int64_t p, uint16_t km, __m512 fill, bool safe) {
  if (DT == kF32) {
    const float* v = static_cast<const float*>(base) + p;
    return safe && kRegisterExpand ? _mm512_mask_expand_ps(fill, km, opaque(_mm512_loadu_ps(v)))
                                   : _mm512_mask_expandloadu_ps(fill, km, v);
  }
  const uint16_t* v = static_cast<const uint16_t*>(base) + p;
  if (DT == kBF16) {  // kept bf16 values land in the high halves of fp32 lanes: exact conversion
    const __mmask32 k2 = _pdep_u32(km, 0xaaaaaaaau);
    const __m512i x =
        safe && kRegisterExpand
            ? _mm512_maskz_expand_epi16(k2, _mm512_castsi256_si512(opaque(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v)))))
            : _mm512_maskz_expandloadu_epi16(k2, v);
    return _mm512_mask_mov_ps(fill, km, _mm512_castsi512_ps(x));
  }
  const __m256i h = safe && kRegisterExpand
                        ? _mm256_maskz_expand_epi16(km, opaque(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v))))
                        : _mm256_maskz_expandloadu_epi16(km, v);
  return _mm512_mask_mov_ps(fill, km, _mm512_cvtph_ps(h));
}

// ---- logits stage: LT[mb][i][4] = q[4mb + j] . k[row0 + i] for i < n -------------------------
// Row `row` of keys as NC 16-channel float32 vectors (packed rows rebuilt, fill exact).
template <int DT>
inline void key_row_f32(const Operand& K, const FillState& f, int64_t row, int64_t off, int NC, __m512* kr) {
  if (!K.packed()) {
    // whole chunks unmasked (no per-chunk test in the unrolled loop), then the last one, partial when D % 16 != 0
    for (int k = 0; k + 1 < NC; ++k) kr[k] = load16_f32<DT>(K.vals, off + 16 * k);
    if (NC) kr[NC - 1] = load16_f32<DT>(K.vals, off + 16 * (NC - 1), K.D - 16 * (NC - 1));
    return;
  }
  const int64_t D8 = K.d8();
  const uint8_t* kb = K.keep + row * D8;
  const uint8_t* sb = K.sign ? K.sign + row * D8 : nullptr;
  const bool safe = !kRegisterExpand || off + K.row_count(row) + 32 <= K.count;
  const __m512 sv = _mm512_set1_ps(K.scale_at(row));
  int64_t p = off;
  for (int k = 0; k < NC; ++k) {
    const uint16_t km = uint16_t(load_bits16(kb + 2 * k)), sm = sb ? uint16_t(load_bits16(sb + 2 * k)) : 0;
    kr[k] = expand16_f32<DT>(K.vals, p, km, fill16_f32(f, sv, 16 * k, sm), safe);
    p += __builtin_popcount(km);
  }
}

// float32 FMAs; q is float32 [M4][D16] zero-padded. Two tokens per step (see qk_bf16). R: query
// rows per 4-row block that carry work (1 when M == 1: no padded rows' dot products).
template <int DT, int NC_T, int R>
void qk_f32(const Operand& K, const FillState& f, int64_t row0, int n, Cursor& kc, const float* q, int64_t M4,
            int64_t D16, float* LT, const ValueRows* vr) {
  const int NC = NC_T ? NC_T : int(D16 / 16);
  for (int i = 0; i < n; i += 2) {
    __m512 kr0[NC_T ? NC_T : 16], kr1[NC_T ? NC_T : 16];
    if (vr) vr->prefetch(i);
    key_row_f32<DT>(K, f, row0 + i, kc.start(row0 + i), NC, kr0);
    kc.advance(row0 + i);
    if (i + 1 < n) {
      if (vr) vr->prefetch(i + 1);
      key_row_f32<DT>(K, f, row0 + i + 1, kc.start(row0 + i + 1), NC, kr1);
      kc.advance(row0 + i + 1);
    } else {
      for (int k = 0; k < NC; ++k) kr1[k] = _mm512_setzero_ps();
    }
    for (int64_t mb = 0; mb < M4 / 4; ++mb) {
      const float* q0 = q + 4 * mb * D16;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      if (R == 1) {
        for (int k = 0; k < NC; ++k) {
          const __m512 q0k = _mm512_loadu_ps(q0 + 16 * k);
          a0 = _mm512_fmadd_ps(kr0[k], q0k, a0);
          b0 = _mm512_fmadd_ps(kr1[k], q0k, b0);
        }
        LT[(mb * kBlock + i) * 4] = _mm512_reduce_add_ps(a0);
        LT[(mb * kBlock + i + 1) * 4] = _mm512_reduce_add_ps(b0);
        continue;
      }
      for (int k = 0; k < NC; ++k) {
        const __m512 q0k = _mm512_loadu_ps(q0 + 16 * k), q1k = _mm512_loadu_ps(q0 + D16 + 16 * k);
        const __m512 q2k = _mm512_loadu_ps(q0 + 2 * D16 + 16 * k), q3k = _mm512_loadu_ps(q0 + 3 * D16 + 16 * k);
        a0 = _mm512_fmadd_ps(kr0[k], q0k, a0);
        b0 = _mm512_fmadd_ps(kr1[k], q0k, b0);
        a1 = _mm512_fmadd_ps(kr0[k], q1k, a1);
        b1 = _mm512_fmadd_ps(kr1[k], q1k, b1);
        a2 = _mm512_fmadd_ps(kr0[k], q2k, a2);
        b2 = _mm512_fmadd_ps(kr1[k], q2k, b2);
        a3 = _mm512_fmadd_ps(kr0[k], q3k, a3);
        b3 = _mm512_fmadd_ps(kr1[k], q3k, b3);
      }
      _mm_storeu_ps(LT + (mb * kBlock + i) * 4, reduce4(a0, a1, a2, a3));
      _mm_storeu_ps(LT + (mb * kBlock + i + 1) * 4, reduce4(b0, b1, b2, b3));  // see qk_bf16 for odd n
    }
  }
}

#if SPARKKV_BF16DOT
// ---- bf16 row chunks (32 channels) ----------------------------------------------------------
// Fill of 32 channels as bf16: +-bf16(scale * chan) (bf16(scale) broadcast when no chan).
inline __m512i fill32_bf16(const FillState& f, __m512 sv, __m512i magrow, int64_t c, uint32_t sm) {
  if (!f.any) return _mm512_setzero_si512();
  __m512i mag = magrow;
  if (f.chan)
    mag = (__m512i)_mm512_cvtne2ps_pbh(_mm512_mul_ps(sv, _mm512_loadu_ps(f.chanp + c + 16)),
                                       _mm512_mul_ps(sv, _mm512_loadu_ps(f.chanp + c)));
  // adding 0x8000 to a 16-bit lane flips its sign bit: negative where the sign bit is clear
  return f.sign ? _mm512_mask_add_epi16(mag, ~sm, mag, _mm512_set1_epi16(short(0x8000))) : mag;
}

inline __m512i magrow_bf16(float s) { return _mm512_set1_epi16(short(f32_to_bf16(s))); }

// 32 channels of a packed bf16 row: kept values (from `v`) expanded over `fill`.
inline __m512i expand32_bf16(const uint16_t* v, uint32_t km, __m512i fill, bool safe) {
  return safe && kRegisterExpand ? _mm512_mask_expand_epi16(fill, km, opaque(_mm512_loadu_si512(v)))
                                 : _mm512_mask_expandloadu_epi16(fill, km, v);
}

// Dense bf16 32 channels; when fewer than 32 are `left`, those (masked load: nothing past them is
// read) and zeros in the other lanes.
inline __m512i load32_bf16(const uint16_t* v, int64_t left) {
  return left >= 32 ? _mm512_loadu_si512(v) : _mm512_maskz_loadu_epi16(_bzhi_u32(~0u, unsigned(left)), v);
}

// Row `row` of bf16 keys as NC 32-channel bf16 vectors (packed rows rebuilt, fill rounded to bf16).
template <int NC_T>
inline void key_row_bf16(const Operand& K, const FillState& f, int64_t row, int64_t off, int NC, __m512i* kr) {
  const uint16_t* base = static_cast<const uint16_t*>(K.vals);
  if (!K.packed()) {
    for (int k = 0; k < NC; ++k) kr[k] = load32_bf16(base + off + 32 * k, K.D - 32 * k);
    return;
  }
  const int64_t D8 = K.d8();
  const uint8_t* kb = K.keep + row * D8;
  const uint8_t* sb = K.sign ? K.sign + row * D8 : nullptr;
  const bool safe = !kRegisterExpand || off + K.row_count(row) + 32 <= K.count;
  const float s = K.scale_at(row);
  const __m512 sv = _mm512_set1_ps(s);
  const __m512i magrow = magrow_bf16(s);
  const uint16_t* p = base + off;
  for (int k = 0; k < NC; ++k) {
    const uint32_t km = chunk_bits(kb, 4 * k, D8), sm = sb ? chunk_bits(sb, 4 * k, D8) : 0;
    kr[k] = expand32_bf16(p, km, fill32_bf16(f, sv, magrow, 32 * k, sm), safe);
    p += __builtin_popcount(km);
  }
}

// bf16 dot products; q is bf16 [M4][D32] zero-padded. Two tokens per step: their eight
// accumulator chains interleave, which keeps more independent work in the FP scheduler than one
// token's four chains followed by its reduction. R as in qk_f32.
template <int NC_T, int R>
void qk_bf16(const Operand& K, const FillState& f, int64_t row0, int n, Cursor& kc, const uint16_t* q, int64_t M4,
             int64_t D32, float* LT, const ValueRows* vr) {
  const int NC = NC_T ? NC_T : int(D32 / 32);
  for (int i = 0; i < n; i += 2) {
    const bool two = i + 1 < n;
    __m512i kr0[NC_T ? NC_T : 8], kr1[NC_T ? NC_T : 8];
    if (vr) vr->prefetch(i);
    key_row_bf16<NC_T>(K, f, row0 + i, kc.start(row0 + i), NC, kr0);
    kc.advance(row0 + i);
    if (two) {
      if (vr) vr->prefetch(i + 1);
      key_row_bf16<NC_T>(K, f, row0 + i + 1, kc.start(row0 + i + 1), NC, kr1);
      kc.advance(row0 + i + 1);
    } else {
      for (int k = 0; k < NC; ++k) kr1[k] = _mm512_setzero_si512();
    }
    for (int64_t mb = 0; mb < M4 / 4; ++mb) {
      const uint16_t* q0 = q + 4 * mb * D32;
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      if (R == 1) {
        for (int k = 0; k < NC; ++k) {
          const __m512bh q0k = (__m512bh)_mm512_loadu_si512(q0 + 32 * k);
          a0 = _mm512_dpbf16_ps(a0, (__m512bh)kr0[k], q0k);
          b0 = _mm512_dpbf16_ps(b0, (__m512bh)kr1[k], q0k);
        }
        LT[(mb * kBlock + i) * 4] = _mm512_reduce_add_ps(a0);
        LT[(mb * kBlock + i + 1) * 4] = _mm512_reduce_add_ps(b0);
        continue;
      }
      for (int k = 0; k < NC; ++k) {
        const __m512bh x = (__m512bh)kr0[k], y = (__m512bh)kr1[k];
        const __m512bh q0k = (__m512bh)_mm512_loadu_si512(q0 + 32 * k), q1k = (__m512bh)_mm512_loadu_si512(q0 + D32 + 32 * k);
        const __m512bh q2k = (__m512bh)_mm512_loadu_si512(q0 + 2 * D32 + 32 * k);
        const __m512bh q3k = (__m512bh)_mm512_loadu_si512(q0 + 3 * D32 + 32 * k);
        a0 = _mm512_dpbf16_ps(a0, x, q0k);
        b0 = _mm512_dpbf16_ps(b0, y, q0k);
        a1 = _mm512_dpbf16_ps(a1, x, q1k);
        b1 = _mm512_dpbf16_ps(b1, y, q1k);
        a2 = _mm512_dpbf16_ps(a2, x, q2k);
        b2 = _mm512_dpbf16_ps(b2, y, q2k);
        a3 = _mm512_dpbf16_ps(a3, x, q3k);
        b3 = _mm512_dpbf16_ps(b3, y, q3k);
      }
      _mm_storeu_ps(LT + (mb * kBlock + i) * 4, reduce4(a0, a1, a2, a3));
      // for odd n the last slot gets a zero row's logits: kBlock is even, and softmax ignores i >= n
      _mm_storeu_ps(LT + (mb * kBlock + i + 1) * 4, reduce4(b0, b1, b2, b3));
    }
  }
}
#endif  // SPARKKV_BF16DOT

// ---- online softmax over one block, one m-block of 4 rows -------------------------------------
// LT [kBlock][4] logits in, probabilities out (0 for tokens >= n and masked ones). m4/l4/alpha4:
// the 4 rows' running max, running sum, and the factor the accumulator must be rescaled by.
// Returns whether any probability is nonzero.
inline bool softmax_block(float* LT, int n, const float* bias, float scaling, float* m4, float* l4, float* alpha4,
                          bool round_p) {
  const int nz = (n + 3) / 4;
  const __m512i rep4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512 ninf = _mm512_set1_ps(-kInf);
  __m512 z[kBlock / 4];
  __m512 bm = ninf;
  for (int a = 0; a < nz; ++a) {
    const int left = std::min(4, n - 4 * a);
    const __mmask16 valid = static_cast<__mmask16>((1u << (4 * left)) - 1);
    __m512 x = _mm512_mul_ps(_mm512_loadu_ps(LT + 16 * a), _mm512_set1_ps(scaling));
    if (bias) {
      const __m128 b4 = _mm_maskz_loadu_ps(static_cast<__mmask8>((1u << left) - 1), bias + 4 * a);
      x = _mm512_add_ps(x, _mm512_permutexvar_ps(rep4, _mm512_castps128_ps512(b4)));
    }
    z[a] = _mm512_mask_mov_ps(ninf, valid, x);
    bm = _mm512_max_ps(bm, z[a]);
  }
  bm = _mm512_max_ps(bm, _mm512_shuffle_f32x4(bm, bm, 0x4e));
  bm = _mm512_max_ps(bm, _mm512_shuffle_f32x4(bm, bm, 0xb1));  // every 128-bit lane: max of rows 0..3
  const __m512 mr = _mm512_broadcast_f32x4(_mm_loadu_ps(m4));
  const __m512 mn = _mm512_max_ps(mr, bm);
  const __mmask16 dead = _mm512_cmp_ps_mask(mn, ninf, _CMP_EQ_OQ);
  if (dead == 0xffff) {  // every logit so far is masked
    std::memset(LT, 0, sizeof(float) * kBlock * 4);
    _mm_storeu_ps(alpha4, _mm_set1_ps(1.f));
    return false;
  }
  const __m512 ms = _mm512_mask_mov_ps(mn, dead, _mm512_setzero_ps());
  const __m512 alpha = exp_nonpos(_mm512_sub_ps(mr, ms));
  __m512 sum = _mm512_setzero_ps();
  for (int a = 0; a < nz; ++a) {
    __m512 pz = exp_nonpos(_mm512_sub_ps(z[a], ms));
    if (round_p) pz = round_bf16(pz);
    sum = _mm512_add_ps(sum, pz);
    _mm512_storeu_ps(LT + 16 * a, pz);
  }
  for (int a = nz; a < kBlock / 4; ++a) _mm512_storeu_ps(LT + 16 * a, _mm512_setzero_ps());
  sum = _mm512_add_ps(sum, _mm512_shuffle_f32x4(sum, sum, 0x4e));
  sum = _mm512_add_ps(sum, _mm512_shuffle_f32x4(sum, sum, 0xb1));
  const __m128 l = _mm_fmadd_ps(_mm_loadu_ps(l4), _mm512_castps512_ps128(alpha), _mm512_castps512_ps128(sum));
  _mm_storeu_ps(l4, l);
  _mm_storeu_ps(m4, _mm512_castps512_ps128(mn));
  _mm_storeu_ps(alpha4, _mm512_castps512_ps128(alpha));
  return true;
}

// ---- P.V stage --------------------------------------------------------------------------------
// Packed value rows of the block rebuilt row by row into a dense float32 tile [n][Dv]: P.V then
// reads a dense tile, and the rebuild walks every row once with its pointer in a register.
template <int DT>
void rebuild_tile_f32(const Operand& V, const FillState& f, int64_t row0, int n, const ValueRows& vr, float* tile) {
  const int64_t Dv = V.D, D8 = V.d8();
  for (int i = 0; i < n; ++i) {
    const uint8_t* kb = V.keep + (row0 + i) * D8;
    const uint8_t* sb = V.sign ? V.sign + (row0 + i) * D8 : nullptr;
    const __m512 sv = _mm512_set1_ps(vr.scale[i]);
    int64_t p = vr.off[i];
    for (int64_t c = 0; c < Dv; c += 16) {
      const uint16_t km = uint16_t(load_bits16(kb + c / 8)), sm = sb ? uint16_t(load_bits16(sb + c / 8)) : 0;
      _mm512_storeu_ps(tile + i * Dv + c, expand16_f32<DT>(V.vals, p, km, fill16_f32(f, sv, c, sm), vr.safe[i]));
      p += __builtin_popcount(km);
    }
  }
}

// float32 FMAs over 16-channel chunks: acc [M4][Dv16] += P^T V for value rows `rows` (dtype DT,
// Dv channels, row stride `stride` elements), P from LT [M4/4][kBlock][4]; Dv16 is Dv rounded up
// to 16. kTail (Dv % 16 != 0): the last chunk is read with masked loads, its lanes past Dv stay 0.
// A separate instance rather than a tail step after the loop: the three such forms tried (inline,
// never-inlined, chunk helper) all measured 5% slower on whole chunks (K80 + V80, float32 path,
// M = 1: 51.2 -> 53.9 ns per token-head, `cpu_decode_bench 256 1 1500 1`).
template <int DT, int MG, bool kTail>
void pv_f32(const void* rows, int64_t stride, int n, const float* LT, int64_t m0, const float* alpha, int64_t Dv,
            int64_t Dv16, float* acc) {
  for (int64_t c = 0; c < Dv; c += 16) {
    __m512 a[MG];
    for (int j = 0; j < MG; ++j)
      a[j] = _mm512_mul_ps(_mm512_loadu_ps(acc + (m0 + j) * Dv16 + c), _mm512_set1_ps(alpha[m0 + j]));
    for (int i = 0; i < n; ++i) {
      const __m512 v = kTail ? load16_f32<DT>(rows, i * stride + c, Dv - c) : load16_f32<DT>(rows, i * stride + c);
      for (int j = 0; j < MG; ++j) {
        const int64_t m = m0 + j;
        a[j] = _mm512_fmadd_ps(_mm512_set1_ps(LT[((m >> 2) * kBlock + i) * 4 + (m & 3)]), v, a[j]);
      }
    }
    for (int j = 0; j < MG; ++j) _mm512_storeu_ps(acc + (m0 + j) * Dv16 + c, a[j]);
  }
}

#if SPARKKV_BF16DOT
// Packed bf16 value rows rebuilt into a dense bf16 tile [n][Dv32] (pruned entries rounded to bf16).
inline void rebuild_tile_bf16(const Operand& V, const FillState& f, int64_t row0, int n, const ValueRows& vr,
                              uint16_t* tile, int64_t Dv32) {
  const int64_t D8 = V.d8();
  const uint16_t* base = static_cast<const uint16_t*>(V.vals);
  for (int i = 0; i < n; ++i) {
    const uint8_t* kb = V.keep + (row0 + i) * D8;
    const uint8_t* sb = V.sign ? V.sign + (row0 + i) * D8 : nullptr;
    const __m512 sv = _mm512_set1_ps(vr.scale[i]);
    const __m512i magrow = magrow_bf16(vr.scale[i]);
    const uint16_t* p = base + vr.off[i];
    for (int64_t c = 0; c < Dv32; c += 32) {
      const uint32_t km = chunk_bits(kb, c / 8, D8), sm = sb ? chunk_bits(sb, c / 8, D8) : 0;
      _mm512_storeu_si512(tile + i * Dv32 + c, expand32_bf16(p, km, fill32_bf16(f, sv, magrow, c, sm), vr.safe[i]));
      p += __builtin_popcount(km);
    }
  }
}

// bf16 dot products over token pairs: acc [M4][Dv32] (permuted layout, see permuted_channel) +=
// P^T V for bf16 value rows `rows` (row stride `stride`), P as bf16 pairs Pp [M4][kBlock/2]
// (p_t | p_{t+1} << 16).
template <int MG>
void pv_bf16(const uint16_t* rows, int64_t stride, int n, const uint32_t* Pp, int64_t m0, const float* alpha,
             int64_t Dv, int64_t Dv32, float* acc) {
  const int np = (n + 1) / 2;
  for (int64_t c = 0; c < Dv32; c += 32) {
    __m512 lo[MG], hi[MG];
    for (int j = 0; j < MG; ++j) {
      const __m512 al = _mm512_set1_ps(alpha[m0 + j]);
      lo[j] = _mm512_mul_ps(_mm512_loadu_ps(acc + (m0 + j) * Dv32 + c), al);
      hi[j] = _mm512_mul_ps(_mm512_loadu_ps(acc + (m0 + j) * Dv32 + c + 16), al);
    }
    for (int pi = 0; pi < np; ++pi) {
      const __m512i va = load32_bf16(rows + 2 * pi * stride + c, Dv - c);
      const __m512i vb = 2 * pi + 1 < n ? load32_bf16(rows + (2 * pi + 1) * stride + c, Dv - c) : _mm512_setzero_si512();
      const __m512bh l = (__m512bh)_mm512_unpacklo_epi16(va, vb), h = (__m512bh)_mm512_unpackhi_epi16(va, vb);
      for (int j = 0; j < MG; ++j) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(int(Pp[(m0 + j) * (kBlock / 2) + pi]));
        lo[j] = _mm512_dpbf16_ps(lo[j], l, w);
        hi[j] = _mm512_dpbf16_ps(hi[j], h, w);
      }
    }
    for (int j = 0; j < MG; ++j) {
      _mm512_storeu_ps(acc + (m0 + j) * Dv32 + c, lo[j]);
      _mm512_storeu_ps(acc + (m0 + j) * Dv32 + c + 16, hi[j]);
    }
  }
}

// LT [kBlock][4] probabilities (already bf16-exact) of rows 4mb..4mb+3 -> Pp[row][pair].
inline void pack_pairs(const float* LT, int64_t mb, uint32_t* Pp) {
  // word (t % 8) * 4 + m of a cvtne2ps2bf16 result -> word m * 8 + (t % 8): row m's 4 pairs per lane
  alignas(64) static const uint16_t idx_words[32] = {0, 4, 8,  12, 16, 20, 24, 28, 1, 5, 9,  13, 17, 21, 25, 29,
                                                     2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31};
  const __m512i idx = _mm512_load_si512(idx_words);
  for (int g = 0; g < kBlock / 8; ++g) {
    const __m512i x = (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(LT + 32 * g + 16), _mm512_loadu_ps(LT + 32 * g));
    const __m512i y = _mm512_permutexvar_epi16(idx, x);
    uint32_t* dst = Pp + 4 * mb * (kBlock / 2) + 4 * g;
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_castsi512_si128(y));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + kBlock / 2), _mm512_extracti32x4_epi32(y, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + kBlock), _mm512_extracti32x4_epi32(y, 2));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 3 * kBlock / 2), _mm512_extracti32x4_epi32(y, 3));
  }
}

// Channel of lane j of a 32-channel permuted chunk (unpacklo/unpackhi of 16-bit words).
inline int64_t permuted_channel(int j) { return j < 16 ? 8 * (j / 4) + j % 4 : 8 * ((j - 16) / 4) + 4 + j % 4; }
#endif  // SPARKKV_BF16DOT

// ---------------------------------------------------------------------------------------------
// AVX-512 item drivers
// ---------------------------------------------------------------------------------------------
struct Plan {  // which stages an AVX-512 item runs
  bool qk_bf16 = false, pv_bf16 = false;
};

inline Plan make_plan(const Problem& p) {
  Plan plan;
#if SPARKKV_BF16DOT
  plan.qk_bf16 = p.opt.bf16_dot && p.q_dtype == kBF16 && p.K.dtype == kBF16;
  plan.pv_bf16 = p.opt.bf16_dot && p.V.dtype == kBF16;
#endif
  return plan;
}

// Per-item buffers and the logits stage, shared by decode and qk.
struct KeyStage {
  const Problem& p;
  Plan plan;
  int64_t M4, D16, D32;
  std::vector<float> qf, chanbuf;
  std::vector<uint16_t> qb;
  FillState f;

  KeyStage(const Problem& prob, Plan pl, int64_t bh) : p(prob), plan(pl) {
    M4 = (p.M + 3) / 4 * 4;
    D16 = (p.D + 15) / 16 * 16;
    D32 = (p.D + 31) / 32 * 32;
    f = fill_state(p.K, bh, D32, chanbuf);
    const int64_t base = bh * p.M * p.D;
    if (plan.qk_bf16) {
      qb.assign(M4 * D32, 0);
      const uint16_t* q = static_cast<const uint16_t*>(p.q) + base;
      for (int64_t m = 0; m < p.M; ++m) std::memcpy(qb.data() + m * D32, q + m * p.D, p.D * 2);
    } else {
      qf.assign(M4 * D16, 0.f);
      for (int64_t m = 0; m < p.M; ++m)
        for (int64_t c = 0; c < p.D; ++c) qf[m * D16 + c] = load_elem(p.q, p.q_dtype, base + m * p.D + c);
    }
  }

  // LT [M4/4][kBlock][4] for rows row0 .. row0 + n - 1; prefetches `vr`'s rows when given
  void logits(int64_t row0, int n, Cursor& kc, float* LT, const ValueRows* vr = nullptr) const {
#if SPARKKV_BF16DOT
    if (plan.qk_bf16) {
      return p.M == 1 ? dispatch_bf16<1>(row0, n, kc, LT, vr) : dispatch_bf16<4>(row0, n, kc, LT, vr);
    }
#endif
    const bool one = p.M == 1;
    switch (p.K.dtype) {
      case kF32: return one ? dispatch_f32<kF32, 1>(row0, n, kc, LT, vr) : dispatch_f32<kF32, 4>(row0, n, kc, LT, vr);
      case kBF16: return one ? dispatch_f32<kBF16, 1>(row0, n, kc, LT, vr) : dispatch_f32<kBF16, 4>(row0, n, kc, LT, vr);
      default: return one ? dispatch_f32<kF16, 1>(row0, n, kc, LT, vr) : dispatch_f32<kF16, 4>(row0, n, kc, LT, vr);
    }
  }
  template <int DT, int R>
  void dispatch_f32(int64_t row0, int n, Cursor& kc, float* LT, const ValueRows* vr) const {
    switch (D16 / 16) {
      case 4: return qk_f32<DT, 4, R>(p.K, f, row0, n, kc, qf.data(), M4, D16, LT, vr);
      case 8: return qk_f32<DT, 8, R>(p.K, f, row0, n, kc, qf.data(), M4, D16, LT, vr);
      default: return qk_f32<DT, 0, R>(p.K, f, row0, n, kc, qf.data(), M4, D16, LT, vr);
    }
  }
#if SPARKKV_BF16DOT
  template <int R>
  void dispatch_bf16(int64_t row0, int n, Cursor& kc, float* LT, const ValueRows* vr) const {
    switch (D32 / 32) {
      case 2: return qk_bf16<2, R>(p.K, f, row0, n, kc, qb.data(), M4, D32, LT, vr);
      case 4: return qk_bf16<4, R>(p.K, f, row0, n, kc, qb.data(), M4, D32, LT, vr);
      default: return qk_bf16<0, R>(p.K, f, row0, n, kc, qb.data(), M4, D32, LT, vr);
    }
  }
#endif
};

inline void decode_item_avx(const Problem& p, int64_t bh, int64_t t0, int64_t t1, int64_t koff, int64_t voff,
                            float* m_out, float* l_out, float* acc_out) {
  const Plan plan = make_plan(p);
  KeyStage ks(p, plan, bh);
  const int64_t M4 = ks.M4;
  const int64_t lanes = plan.pv_bf16 ? 32 : 16;  // channels per P.V chunk
  const int64_t Dvp = (p.Dv + lanes - 1) / lanes * lanes;  // accumulator row length: whole chunks
  std::vector<float> chanv;
  const FillState fv = fill_state(p.V, bh, (p.Dv + 31) / 32 * 32, chanv);
  std::vector<float> LT(M4 * kBlock), acc(M4 * Dvp, 0.f), mrun(M4, -kInf), lrun(M4, 0.f), alpha(M4, 1.f);
  std::vector<uint32_t> Pp(M4 * kBlock / 2);
  std::vector<uint16_t> tile16(p.V.packed() && plan.pv_bf16 ? kBlock * Dvp : 0);  // rebuilt value rows
  std::vector<float> tile32(p.V.packed() && !plan.pv_bf16 ? kBlock * p.Dv : 0);
  const float* bias = bias_row(p, bh);
  Cursor kc{&p.K, koff}, vc{&p.V, voff};
  ValueRows vr;
  for (int64_t b0 = t0; b0 < t1; b0 += kBlock) {
    const int n = int(std::min<int64_t>(kBlock, t1 - b0));
    const int64_t row0 = bh * p.S + b0;
    vr.fill(p.V, row0, n, vc);
    ks.logits(row0, n, kc, LT.data(), &vr);
    bool any = false;
    for (int64_t mb = 0; mb < M4 / 4; ++mb)
      any |= softmax_block(LT.data() + mb * kBlock * 4, n, bias ? bias + b0 : nullptr, p.scaling, &mrun[4 * mb],
                           &lrun[4 * mb], &alpha[4 * mb], plan.pv_bf16);
    if (!any) continue;
    int64_t m0 = 0;
#if SPARKKV_BF16DOT
    if (plan.pv_bf16) {
      for (int64_t mb = 0; mb < M4 / 4; ++mb) pack_pairs(LT.data() + mb * kBlock * 4, mb, Pp.data());
      const uint16_t* rows = static_cast<const uint16_t*>(p.V.vals) + row0 * p.Dv;
      int64_t stride = p.Dv;
      if (p.V.packed()) {
        rebuild_tile_bf16(p.V, fv, row0, n, vr, tile16.data(), Dvp);
        rows = tile16.data();
        stride = Dvp;
      }
      if (p.M == 1) {  // one query row: no padded rows' dot products
        pv_bf16<1>(rows, stride, n, Pp.data(), 0, alpha.data(), p.Dv, Dvp, acc.data());
      } else {
        for (; m0 + 8 <= M4; m0 += 8) pv_bf16<8>(rows, stride, n, Pp.data(), m0, alpha.data(), p.Dv, Dvp, acc.data());
        for (; m0 < M4; m0 += 4) pv_bf16<4>(rows, stride, n, Pp.data(), m0, alpha.data(), p.Dv, Dvp, acc.data());
      }
      continue;
    }
#endif
    auto pv_rows_f32 = [&](auto dt, auto tail, const void* rows) {
      constexpr int DT = decltype(dt)::value;
      constexpr bool kTail = decltype(tail)::value;
      const float* P = LT.data();
      if (p.M == 1) return pv_f32<DT, 1, kTail>(rows, p.Dv, n, P, 0, alpha.data(), p.Dv, Dvp, acc.data());
      for (; m0 + 8 <= M4; m0 += 8) pv_f32<DT, 8, kTail>(rows, p.Dv, n, P, m0, alpha.data(), p.Dv, Dvp, acc.data());
      for (; m0 < M4; m0 += 4) pv_f32<DT, 4, kTail>(rows, p.Dv, n, P, m0, alpha.data(), p.Dv, Dvp, acc.data());
    };
    auto run = [&](auto dt) {
      constexpr int DT = decltype(dt)::value;
      const void* rows = static_cast<const char*>(p.V.vals) + row0 * p.Dv * elem_size(DT);
      if (p.V.packed()) {  // packed values: Dv % 16 == 0 (avx_serves)
        rebuild_tile_f32<DT>(p.V, fv, row0, n, vr, tile32.data());
        pv_rows_f32(std::integral_constant<int, kF32>(), std::false_type(), tile32.data());
      } else if (p.Dv % 16) {
        pv_rows_f32(dt, std::true_type(), rows);
      } else {
        pv_rows_f32(dt, std::false_type(), rows);
      }
    };
    switch (p.V.dtype) {
      case kF32: run(std::integral_constant<int, kF32>()); break;
      case kBF16: run(std::integral_constant<int, kBF16>()); break;
      default: run(std::integral_constant<int, kF16>()); break;
    }
  }
  for (int64_t m = 0; m < p.M; ++m) {
    m_out[m] = mrun[m];
    l_out[m] = lrun[m];
    float* dst = acc_out + m * p.Dv;
    const float* src = acc.data() + m * Dvp;
#if SPARKKV_BF16DOT
    if (plan.pv_bf16) {
      for (int64_t c = 0; c < Dvp; c += 32)
        for (int j = 0; j < 32; ++j) {
          const int64_t ch = c + permuted_channel(j);
          if (ch < p.Dv) dst[ch] = src[c + j];
        }
      continue;
    }
#endif
    std::copy(src, src + p.Dv, dst);
  }
}

inline void qk_item_avx(const Problem& p, int64_t bh, int64_t t0, int64_t t1, int64_t koff, float* out) {
  KeyStage ks(p, make_plan(p), bh);
  std::vector<float> LT(ks.M4 * kBlock);
  Cursor kc{&p.K, koff};
  for (int64_t b0 = t0; b0 < t1; b0 += kBlock) {
    const int n = int(std::min<int64_t>(kBlock, t1 - b0));
    ks.logits(bh * p.S + b0, n, kc, LT.data());
    for (int64_t m = 0; m < p.M; ++m)
      for (int i = 0; i < n; ++i) out[(bh * p.M + m) * p.S + b0 + i] = LT[((m >> 2) * kBlock + i) * 4 + (m & 3)];
  }
}
#endif  // SPARKKV_AVX512

#if SPARKKV_AVX2
// ---------------------------------------------------------------------------------------------
// AVX2 path: rows decoded into float32 (every operand kind), float32 FMAs
// ---------------------------------------------------------------------------------------------
namespace avx2 {

inline int64_t round8(int64_t x) { return (x + 7) / 8 * 8; }

struct Tables {
  // perm[b][l]: for keep byte b, the rank of lane l among b's set lanes (set lanes), or the sign
  // bit alone (clear lanes): vpermps reads only the low 3 bits, and the sign bit is the blend mask
  // that picks the fill there
  alignas(32) int32_t perm[256][8];
  // neg[b][l]: the float sign bit where bit l of sign byte b is clear (the pruned entry is negative)
  alignas(32) uint32_t neg[256][8];
  // ternary code byte b (five base-3 digits): keep5[b] bit j: digit j is 0 (kept); pos5[b] bit j:
  // digit j is 2 (pruned, positive)
  uint8_t keep5[256], pos5[256];
  Tables() {
    for (int b = 0; b < 256; ++b) {
      int r = 0;
      for (int l = 0; l < 8; ++l) {
        const bool set = (b >> l) & 1;
        perm[b][l] = set ? r : int32_t(0x80000000u);
        neg[b][l] = set ? 0u : 0x80000000u;
        r += set;
      }
      int v = b, k = 0, p = 0;
      for (int j = 0; j < 5; ++j, v /= 3) {
        if (v % 3 == 0) k |= 1 << j;
        if (v % 3 == 2) p |= 1 << j;
      }
      keep5[b] = uint8_t(k);
      pos5[b] = uint8_t(p);
    }
  }
};
inline const Tables& tables() {
  static const Tables t;
  return t;
}

// A row's ternary code -> keep and sign (positive) bytes, D / 8 of each (D % 8 == 0): eight code
// bytes (40 channels) at a time into five output bytes; the buffers take 16 bytes of slack.
inline void decode_trits(const uint8_t* tr, int64_t D, uint8_t* kb, uint8_t* sb) {
  const Tables& t = tables();
  const int64_t nb = (D + 4) / 5;
  for (int64_t j = 0, out = 0; j < nb; j += 8, out += 5) {
    const int64_t n = std::min<int64_t>(8, nb - j);
    uint64_t k = 0, s = 0;
    if (n == 8) {
      for (int i = 0; i < 8; ++i) {
        k |= uint64_t(t.keep5[tr[j + i]]) << (5 * i);
        s |= uint64_t(t.pos5[tr[j + i]]) << (5 * i);
      }
    } else {
      for (int i = 0; i < n; ++i) {
        k |= uint64_t(t.keep5[tr[j + i]]) << (5 * i);
        s |= uint64_t(t.pos5[tr[j + i]]) << (5 * i);
      }
    }
    std::memcpy(kb + out, &k, 8);
    std::memcpy(sb + out, &s, 8);
  }
}

// 8 raw elements from element i as float32
template <int DT>
inline __m256 load8(const void* base, int64_t i) {
  if (DT == kF32) return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
  if (DT == kBF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  return _mm256_cvtph_ps(h);
}

template <int DT>
inline void raw_row(const void* base, int64_t off, int64_t n, float* out) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, load8<DT>(base, off + j));
  for (; j < n; ++j) out[j] = load_elem(base, DT, off + j);
}

// codes n .. n + 7 of a row (n % 8 == 0, n + 8 <= N: nothing past the row is read) as float32
template <int BITS>
inline __m256 codes8(const uint8_t* r, int64_t n) {
  if (BITS == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r + n))));
  if (BITS == 4) {
    uint32_t w;
    std::memcpy(&w, r + n / 2, 4);
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(int(w)), _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28));
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
  }
  uint16_t w;
  std::memcpy(&w, r + n / 4, 2);
  const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(int(w)), _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14));
  return _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(3)));
}

// Token-axis statistics of the current group as float32 (`s`, and `z` or the mid-rise offset).
struct TokenStats {
  int64_t id = -1;
  std::vector<float> s, z;
};

// value = c * s + z, or (c - mid) * s without a zero (as quant.QuantizedTensor.dense computes it)
template <bool ZERO>
inline __m256 dequant8(__m256 c, __m256 s, __m256 z_or_mid) {
  return ZERO ? _mm256_fmadd_ps(c, s, z_or_mid) : _mm256_mul_ps(_mm256_sub_ps(c, z_or_mid), s);
}
template <bool ZERO>
inline float dequant1(float c, float s, float z_or_mid) {
  return ZERO ? c * s + z_or_mid : (c - z_or_mid) * s;
}

template <int BITS, bool ZERO>
inline void quant_row(const Operand& op, int64_t row, TokenStats& ts, float* out) {
  const Quant& q = op.q;
  const uint8_t* r = q.codes + row * q.row_bytes;
  const int64_t N = q.N;
  const float mid = q.mid();
  if (q.token_axis) {
    const int64_t id = (row / op.S) * q.groups + (q.offset + row % op.S) / q.group, W = q.width;
    if (id != ts.id) {
      ts.id = id;
      ts.s.assign(round8(W), 0.f);
      ts.z.assign(round8(W), mid);
      for (int64_t n = 0; n < W; ++n) {
        ts.s[n] = load_elem(q.scale, q.sdtype, id * W + n);
        ts.z[n] = ZERO ? load_elem(q.zero, q.sdtype, id * W + n) : mid;
      }
    }
    int64_t n = 0;
    if (q.channel) {  // (c - mid) only: Rows::decode scales each kept value by its channel's ts.s
      const __m256 one = _mm256_set1_ps(1.f), mv = _mm256_set1_ps(mid);
      for (; n + 8 <= N; n += 8) _mm256_storeu_ps(out + n, dequant8<false>(codes8<BITS>(r, n), one, mv));
      for (; n < N; ++n) out[n] = float(q.code(row, n)) - mid;
      return;
    }
    for (; n + 8 <= N; n += 8)
      _mm256_storeu_ps(out + n, dequant8<ZERO>(codes8<BITS>(r, n), _mm256_loadu_ps(&ts.s[n]), _mm256_loadu_ps(&ts.z[n])));
    for (; n < N; ++n) out[n] = dequant1<ZERO>(float(q.code(row, n)), ts.s[n], ts.z[n]);
    return;
  }
  const int64_t base = row * q.groups;
  for (int64_t g = 0, n = 0; n < N; ++g) {
    const float s = load_elem(q.scale, q.sdtype, base + g);
    const float z = ZERO ? load_elem(q.zero, q.sdtype, base + g) : mid;
    const int64_t end = std::min(N, (g + 1) * q.group);
    if (n % 8 == 0) {
      const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
      for (; n + 8 <= end; n += 8) _mm256_storeu_ps(out + n, dequant8<ZERO>(codes8<BITS>(r, n), sv, zv));
    }
    for (; n < end; ++n) out[n] = dequant1<ZERO>(float(q.code(row, n)), s, z);
  }
}

// Decodes the rows of one operand, for one (b, h), into float32 rows of round8(D) lanes (zeros
// past D): dense rows converted or dequantized; packed rows' kept values converted or dequantized
// into `kv`, then expanded over the fill 8 channels at a time.
struct Rows {
  const Operand* op = nullptr;
  int64_t D8 = 0;
  bool fill = false, sign = false;
  std::vector<float> chan, kv;
  std::vector<uint8_t> kb, sb;
  TokenStats ts;

  Rows(const Operand& o, int64_t bh) : op(&o), D8(round8(o.D)) {
    if (o.packed()) {
      fill = o.fills();
      sign = o.signs();
      if (o.chan) {
        chan.assign(D8, 0.f);
        std::memcpy(chan.data(), o.chan + bh * o.D, o.D * sizeof(float));
      }
      kv.assign(o.D + 8, 0.f);
      kb.assign(o.d8() + 16, 0);
      sb.assign(o.d8() + 16, 0);
    }
  }

  // the n stored values of `row` (first raw one at element `off`) as float32
  void values(int64_t row, int64_t off, int64_t n, float* out) {
    const Operand& o = *op;
    if (o.quantized()) {
      const bool z = o.q.zero != nullptr;
      switch (o.q.bits * 2 + z) {
        case 16: return quant_row<8, false>(o, row, ts, out);
        case 17: return quant_row<8, true>(o, row, ts, out);
        case 8: return quant_row<4, false>(o, row, ts, out);
        case 9: return quant_row<4, true>(o, row, ts, out);
        case 4: return quant_row<2, false>(o, row, ts, out);
        default: return quant_row<2, true>(o, row, ts, out);
      }
    }
    switch (o.dtype) {
      case kF32: return raw_row<kF32>(o.vals, off, n, out);
      case kBF16: return raw_row<kBF16>(o.vals, off, n, out);
      default: return raw_row<kF16>(o.vals, off, n, out);
    }
  }

  void decode(int64_t row, int64_t off, float* out) {
    const Operand& o = *op;
    if (!o.packed()) {
      values(row, off, o.D, out);
      for (int64_t c = o.D; c < D8; ++c) out[c] = 0.f;
      return;
    }
    const uint8_t *k, *s;
    int64_t n;
    if (o.trits) {
      decode_trits(o.trits + row * o.tb(), o.D, kb.data(), sb.data());
      k = kb.data();
      s = sb.data();
      n = o.T >= 0 ? o.T : popcount_bytes(k, o.d8());
    } else {
      k = o.keep + row * o.d8();
      s = o.sign ? o.sign + row * o.d8() : nullptr;
      n = o.T >= 0 ? o.T : popcount_bytes(k, o.d8());
    }
    // raw kept values are read straight from the operand where 8 lanes past the row stay inside
    // it (a staging copy would be re-read by overlapping loads: store-forwarding stalls); else staged
    if (!o.quantized() && off + n + 8 <= o.count) {
      switch (o.dtype) {
        case kF32: return expand(o, row, k, s, nullptr, [&](int64_t p) { return load8<kF32>(o.vals, off + p); }, out);
        case kBF16: return expand(o, row, k, s, nullptr, [&](int64_t p) { return load8<kBF16>(o.vals, off + p); }, out);
        default: return expand(o, row, k, s, nullptr, [&](int64_t p) { return load8<kF16>(o.vals, off + p); }, out);
      }
    }
    values(row, off, n, kv.data());
    const float* qs = o.quantized() && o.q.channel ? ts.s.data() : nullptr;  // per-channel scales of the row's group
    expand(o, row, k, s, qs, [&](int64_t p) { return _mm256_loadu_ps(kv.data() + p); }, out);
  }

  // out[c] = the row's stored value of channel c (kept lanes, read by `load(p)`: 8 values from the
  // p-th stored one) or its fill (the others)
  template <class Load>
  inline void expand(const Operand& o, int64_t row, const uint8_t* k, const uint8_t* s, const float* qs, Load load, float* out) {
    const Tables& tab = tables();
    const __m256 sv = _mm256_set1_ps(o.scale_at(row));
    const float* chp = chan.empty() ? nullptr : chan.data();
    int64_t p = 0;
    for (int64_t c = 0; c < o.D; c += 8) {
      const unsigned b = k[c >> 3];
      const __m256i perm = _mm256_load_si256(reinterpret_cast<const __m256i*>(tab.perm[b]));
      __m256 x = _mm256_permutevar8x32_ps(load(p), perm);
      if (qs) x = _mm256_mul_ps(x, _mm256_loadu_ps(qs + c));
      __m256 f = _mm256_setzero_ps();
      if (fill) {
        f = chp ? _mm256_mul_ps(sv, _mm256_loadu_ps(chp + c)) : sv;
        if (sign) f = _mm256_xor_ps(f, _mm256_load_ps(reinterpret_cast<const float*>(tab.neg[s[c >> 3]])));
      }
      _mm256_storeu_ps(out + c, _mm256_blendv_ps(x, f, _mm256_castsi256_ps(perm)));  // fill where not kept
      p += __builtin_popcount(b);
    }
  }
};

// [sum(a0), ..., sum(a7)]
inline __m256 reduce8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// LT[m * kBlock + r] = q[m] . K[r] for the 8 rows of the tile K [8][D8]; q [M][D8].
inline void logits8(const float* K, const float* q, int64_t M, int64_t D8, float* LT) {
  for (int64_t m = 0; m < M; ++m) {
    const float* qm = q + m * D8;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t c = 0; c < D8; c += 8) {
      const __m256 qc = _mm256_loadu_ps(qm + c);
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(K + c), qc, a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(K + D8 + c), qc, a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(K + 2 * D8 + c), qc, a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(K + 3 * D8 + c), qc, a3);
      a4 = _mm256_fmadd_ps(_mm256_loadu_ps(K + 4 * D8 + c), qc, a4);
      a5 = _mm256_fmadd_ps(_mm256_loadu_ps(K + 5 * D8 + c), qc, a5);
      a6 = _mm256_fmadd_ps(_mm256_loadu_ps(K + 6 * D8 + c), qc, a6);
      a7 = _mm256_fmadd_ps(_mm256_loadu_ps(K + 7 * D8 + c), qc, a7);
    }
    _mm256_storeu_ps(LT + m * kBlock, reduce8(a0, a1, a2, a3, a4, a5, a6, a7));
  }
}

// exp(x) for x <= 0; -inf -> 0; results below float32's normal range flush to 0 (about 1 ulp
// otherwise: the AVX-512 path's polynomial).
inline __m256 exp_nonpos(__m256 x) {
  const __m256 lim = _mm256_set1_ps(-87.f);
  const __m256 under = _mm256_cmp_ps(x, lim, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lim);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

inline float hmax8(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

// Online softmax of one query row over a block: lt[kBlock] logits in, probabilities out (0 for
// i >= n and masked tokens); returns whether any probability is nonzero.
inline bool softmax_row(float* lt, int n, const float* bias, float scaling, float& m_run, float& l_run, float& alpha) {
  const __m256 ninf = _mm256_set1_ps(-kInf), sc = _mm256_set1_ps(scaling);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int nv = (n + 7) / 8;
  __m256 z[kBlock / 8];
  __m256 mx = ninf;
  for (int a = 0; a < nv; ++a) {
    const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8 * a), lane);
    __m256 x = _mm256_mul_ps(_mm256_loadu_ps(lt + 8 * a), sc);
    if (bias) x = _mm256_add_ps(x, _mm256_maskload_ps(bias + 8 * a, valid));
    z[a] = _mm256_blendv_ps(ninf, x, _mm256_castsi256_ps(valid));
    mx = _mm256_max_ps(mx, z[a]);
  }
  const float mn = std::max(m_run, hmax8(mx));
  if (mn == -kInf) {  // every logit so far is masked
    std::memset(lt, 0, sizeof(float) * kBlock);
    alpha = 1.f;
    return false;
  }
  alpha = std::exp(m_run - mn);
  const __m256 mv = _mm256_set1_ps(mn);
  __m256 sum = _mm256_setzero_ps();
  for (int a = 0; a < nv; ++a) {
    const __m256 pz = exp_nonpos(_mm256_sub_ps(z[a], mv));
    sum = _mm256_add_ps(sum, pz);
    _mm256_storeu_ps(lt + 8 * a, pz);
  }
  for (int a = nv; a < kBlock / 8; ++a) _mm256_storeu_ps(lt + 8 * a, _mm256_setzero_ps());
  l_run = l_run * alpha + hsum8(sum);
  m_run = mn;
  return true;
}

// acc[m][c0 .. c0 + 8 NCH) = acc * alpha[m] + sum_i P[m][i] V[i][...] for rows m0 .. m0 + MG
template <int MG, int NCH>
inline void pv_block(const float* V, int64_t Dv8, int n, const float* P, int64_t m0, const float* alpha, float* acc,
                     int64_t c0) {
  __m256 a[MG][NCH];
  for (int j = 0; j < MG; ++j) {
    const __m256 al = _mm256_set1_ps(alpha[m0 + j]);
    for (int k = 0; k < NCH; ++k) a[j][k] = _mm256_mul_ps(_mm256_loadu_ps(acc + (m0 + j) * Dv8 + c0 + 8 * k), al);
  }
  for (int i = 0; i < n; ++i) {
    const float* v = V + i * Dv8 + c0;
    for (int j = 0; j < MG; ++j) {
      const __m256 pj = _mm256_broadcast_ss(P + (m0 + j) * kBlock + i);
      for (int k = 0; k < NCH; ++k) a[j][k] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * k), a[j][k]);
    }
  }
  for (int j = 0; j < MG; ++j)
    for (int k = 0; k < NCH; ++k) _mm256_storeu_ps(acc + (m0 + j) * Dv8 + c0 + 8 * k, a[j][k]);
}

template <int MG>
inline void pv_rows(const float* V, int64_t Dv8, int n, const float* P, int64_t m0, const float* alpha, float* acc) {
  constexpr int NCH = 8 / MG;
  int64_t c0 = 0;
  for (; c0 + 8 * NCH <= Dv8; c0 += 8 * NCH) pv_block<MG, NCH>(V, Dv8, n, P, m0, alpha, acc, c0);
  for (; c0 < Dv8; c0 += 8) pv_block<MG, 1>(V, Dv8, n, P, m0, alpha, acc, c0);
}

inline void pv(const float* V, int64_t Dv8, int n, const float* P, int64_t M, const float* alpha, float* acc) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) pv_rows<4>(V, Dv8, n, P, m0, alpha, acc);
  for (; m0 + 2 <= M; m0 += 2) pv_rows<2>(V, Dv8, n, P, m0, alpha, acc);
  for (; m0 < M; ++m0) pv_rows<1>(V, Dv8, n, P, m0, alpha, acc);
}

inline std::vector<float> query_f32(const Problem& p, int64_t bh, int64_t D8) {
  std::vector<float> q(p.M * D8, 0.f);
  for (int64_t m = 0; m < p.M; ++m)
    for (int64_t c = 0; c < p.D; ++c) q[m * D8 + c] = load_elem(p.q, p.q_dtype, (bh * p.M + m) * p.D + c);
  return q;
}

// Logits of the rows b0 .. b0 + n - 1 (n <= kBlock) into LT [M][kBlock], 8 key rows per pass.
inline void block_logits(const Problem& p, Rows& kr, Cursor& kc, int64_t row0, int n, const float* q, int64_t D8,
                         float* Kt, float* LT) {
  for (int i0 = 0; i0 < n; i0 += 8) {
    const int r = std::min(8, n - i0);
    for (int j = 0; j < r; ++j) {
      const int64_t row = row0 + i0 + j;
      kr.decode(row, kc.start(row), Kt + j * D8);
      kc.advance(row);
    }
    if (r < 8) std::memset(Kt + r * D8, 0, sizeof(float) * (8 - r) * D8);
    logits8(Kt, q, p.M, D8, LT + i0);
  }
}

inline void decode_item(const Problem& p, int64_t bh, int64_t t0, int64_t t1, int64_t koff, int64_t voff, float* m_out,
                        float* l_out, float* acc_out) {
  const int64_t M = p.M, D8 = round8(p.D), Dv8 = round8(p.Dv);
  const std::vector<float> q = query_f32(p, bh, D8);
  Rows kr(p.K, bh), vr(p.V, bh);
  std::vector<float> Kt(8 * D8), Vt(kBlock * Dv8), LT(M * kBlock), acc(M * Dv8, 0.f), alpha(M, 1.f);
  std::fill(m_out, m_out + M, -kInf);
  std::fill(l_out, l_out + M, 0.f);
  const float* bias = bias_row(p, bh);
  Cursor kc{&p.K, koff}, vc{&p.V, voff};
  for (int64_t b0 = t0; b0 < t1; b0 += kBlock) {
    const int n = int(std::min<int64_t>(kBlock, t1 - b0));
    const int64_t row0 = bh * p.S + b0;
    block_logits(p, kr, kc, row0, n, q.data(), D8, Kt.data(), LT.data());
    bool any = false;
    for (int64_t m = 0; m < M; ++m)
      any |= softmax_row(LT.data() + m * kBlock, n, bias ? bias + b0 : nullptr, p.scaling, m_out[m], l_out[m], alpha[m]);
    for (int i = 0; i < n; ++i) {
      const int64_t row = row0 + i;
      if (any) vr.decode(row, vc.start(row), Vt.data() + i * Dv8);
      vc.advance(row);
    }
    if (any) pv(Vt.data(), Dv8, n, LT.data(), M, alpha.data(), acc.data());
  }
  for (int64_t m = 0; m < M; ++m) std::copy(acc.data() + m * Dv8, acc.data() + m * Dv8 + p.Dv, acc_out + m * p.Dv);
}

inline void qk_item(const Problem& p, int64_t bh, int64_t t0, int64_t t1, int64_t koff, float* out) {
  const int64_t D8 = round8(p.D);
  const std::vector<float> q = query_f32(p, bh, D8);
  Rows kr(p.K, bh);
  std::vector<float> Kt(8 * D8), LT(p.M * kBlock);
  Cursor kc{&p.K, koff};
  for (int64_t b0 = t0; b0 < t1; b0 += kBlock) {
    const int n = int(std::min<int64_t>(kBlock, t1 - b0));
    block_logits(p, kr, kc, bh * p.S + b0, n, q.data(), D8, Kt.data(), LT.data());
    for (int64_t m = 0; m < p.M; ++m)
      for (int i = 0; i < n; ++i) out[(bh * p.M + m) * p.S + b0 + i] = LT[m * kBlock + i];
  }
}

}  // namespace avx2
#endif  // SPARKKV_AVX2

// Whether the AVX-512 item drivers serve these head dims (when compiled in and not `portable`).
// Dense operands of any head dim: the last partial 16- or 32-channel chunk of a row is a masked
// load, against zero-padded query rows and accumulators. Packed ones rebuild whole 16-channel
// chunks from 16-bit mask words, so their head dim must be a multiple of 16.
inline bool avx_serves(int64_t D, int64_t Dv, bool keys_packed, bool values_packed) {
  return SPARKKV_AVX512 && D <= 256 && (!keys_packed || D % 16 == 0) && (!values_packed || Dv % 16 == 0);
}

// Operand kinds the AVX-512 paths read: dense or keep/sign-packed, raw values.
inline bool avx512_reads(const Operand& op) { return op.trits == nullptr && !op.quantized(); }

inline bool uses_avx(const Problem& p) {
  return !p.opt.portable && p.opt.avx512 && avx512_reads(p.K) && avx512_reads(p.V) &&
         avx_serves(p.D, p.Dv, p.K.packed(), p.V.packed());
}

inline bool uses_avx2(const Problem& p) { return SPARKKV_AVX2 && !p.opt.portable; }

// ---------------------------------------------------------------------------------------------
// drivers: split the work into (bh, part) items, run them in parallel
// ---------------------------------------------------------------------------------------------
template <class F>
void parallel_items(int64_t n, const F& fn) {
#ifndef SPARKKV_STANDALONE
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) fn(i);
  });
#else
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) fn(i);
#endif
}

// Validates variable-T operands (returns false with `what` set on a count mismatch).
struct Offsets {
  std::vector<int64_t> k, v;
};

inline bool variable_offsets(const Operand& op, int64_t BH, int64_t S, int64_t parts, int64_t per,
                             std::vector<int64_t>& out, int64_t* total) {
  if (!op.packed() || op.T >= 0) return true;
  out = item_offsets(op, BH, S, parts, per, total);
  return *total == op.count;
}

inline int64_t item_start(const Operand& op, const std::vector<int64_t>& offs, int64_t item, int64_t row) {
  return op.packed() && op.T < 0 ? offs[item] : (!op.packed() ? row * op.D : row * op.T);
}

// m_out, l_out [B, H, P, M]; acc_out [B, H, P, M, Dv]
inline const char* decode(const Problem& p, int64_t parts, float* m_out, float* l_out, float* acc_out) {
  const int64_t BH = p.B * p.H, per = (p.S + parts - 1) / parts;
  Offsets offs;
  int64_t total = 0;
  if (!variable_offsets(p.K, BH, p.S, parts, per, offs.k, &total)) return "flat key vals do not match the keep masks";
  if (!variable_offsets(p.V, BH, p.S, parts, per, offs.v, &total)) return "flat value vals do not match the keep masks";
  const bool paged = p.pages.ids != nullptr;
  if (paged && ((p.K.packed() && p.K.T < 0) || (p.V.packed() && p.V.T < 0))) return "paged operands need a fixed T";
  const bool avx = uses_avx(p), avx2 = uses_avx2(p);
  parallel_items(BH * parts, [&](int64_t item) {
    const int64_t t0 = std::min(p.S, (item % parts) * per), t1 = std::min(p.S, t0 + per);
    float* mo = m_out + item * p.M;
    float* lo = l_out + item * p.M;
    float* ao = acc_out + item * p.M * p.Dv;
    // a paged item reads its page as batch item 0 of a one-item problem
    const Problem local = paged ? page_item(p, item / parts / p.H) : Problem{};
    const Problem& q = paged ? local : p;
    const int64_t bh = paged ? item / parts % p.H : item / parts, row = bh * p.S + t0;
    const int64_t koff = item_start(q.K, offs.k, item, row), voff = item_start(q.V, offs.v, item, row);
#if SPARKKV_AVX512
    if (avx) return decode_item_avx(q, bh, t0, t1, koff, voff, mo, lo, ao);
#endif
#if SPARKKV_AVX2
    if (avx2) return avx2::decode_item(q, bh, t0, t1, koff, voff, mo, lo, ao);
#endif
    (void)avx, (void)avx2;
    decode_item_scalar(q, bh, t0, t1, koff, voff, mo, lo, ao);
  });
  return nullptr;
}

// out [B, H, M, S]
inline const char* qk(const Problem& p, float* out) {
  const int64_t BH = p.B * p.H, per = 256, parts = std::max<int64_t>(1, (p.S + per - 1) / per);
  std::vector<int64_t> koffs;
  int64_t total = 0;
  if (!variable_offsets(p.K, BH, p.S, parts, per, koffs, &total)) return "flat key vals do not match the keep masks";
  const bool avx = uses_avx(p), avx2 = uses_avx2(p);
  parallel_items(BH * parts, [&](int64_t item) {
    const int64_t bh = item / parts, t0 = std::min(p.S, (item % parts) * per), t1 = std::min(p.S, t0 + per);
    const int64_t koff = item_start(p.K, koffs, item, bh * p.S + t0);
#if SPARKKV_AVX512
    if (avx) return qk_item_avx(p, bh, t0, t1, koff, out);
#endif
#if SPARKKV_AVX2
    if (avx2) return avx2::qk_item(p, bh, t0, t1, koff, out);
#endif
    (void)avx, (void)avx2;
    qk_item_scalar(p, bh, t0, t1, koff, out);
  });
  return nullptr;
}

}  // namespace sparkkv

#ifndef SPARKKV_STANDALONE
// ---------------------------------------------------------------------------------------------
// torch binding
// ---------------------------------------------------------------------------------------------
namespace {
using sparkkv::Operand;

int dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return sparkkv::kF32;
    case at::kBFloat16: return sparkkv::kBF16;
    case at::kHalf: return sparkkv::kF16;
    default: TORCH_CHECK(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return 0;
}

// An operand from its fields (kernels/operands.py: Fields), in this order:
//   tensors: vals, keep, sign, scale, chan, trits, codes, qscale, qzero (empty when absent)
//   ints:    bits, group, axis (0 row, 1 token, 2 channel), offset, N (codes per row)
// Dense when keep and trits are empty, else packed; quantized when codes are given (then vals is
// empty). Shapes checked against [B, H, S, D].
enum { kVals, kKeep, kSign, kScale, kChan, kTrits, kCodes, kQScale, kQZero, kFields };

bool shaped(const at::Tensor& t, int64_t B, int64_t H, int64_t S, int64_t last) {
  return t.dim() == 4 && t.size(0) == B && t.size(1) == H && t.size(2) == S && t.size(3) == last;
}

// `chan_batch`: the batch size of `chan` (B, except for paged operands: see Paging).
Operand make_operand(const char* name, const std::vector<at::Tensor>& f, const std::vector<int64_t>& ints, int64_t B,
                     int64_t H, int64_t S, int64_t D, int64_t chan_batch) {
  TORCH_CHECK(f.size() == kFields && ints.size() == 5, name, ": expected ", int(kFields), " fields and 5 integers");
  for (const auto& t : f)
    TORCH_CHECK(!t.numel() || (t.is_contiguous() && t.device().is_cpu()), name, " fields must be contiguous CPU tensors");
  Operand op;
  op.D = D;
  op.S = S;
  const at::Tensor &vals = f[kVals], &keep = f[kKeep], &sign = f[kSign], &scale = f[kScale], &chan = f[kChan];
  const at::Tensor &trits = f[kTrits], &codes = f[kCodes], &qscale = f[kQScale], &qzero = f[kQZero];
  const bool packed = keep.numel() || trits.numel(), quantized = codes.numel() > 0;
  int64_t per_row = D;  // values stored per row (fixed), -1 variable
  if (quantized) {
    const int64_t bits = ints[0], group = ints[1], N = ints[4];
    TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, name, ": codes of ", bits, " bits (8, 4 or 2 are read)");
    TORCH_CHECK(group >= 1 && N >= 1 && N <= D, name, ": group ", group, " and ", N, " codes per row");
    TORCH_CHECK(codes.scalar_type() == at::kByte && shaped(codes, B, H, S, (N * bits + 7) / 8), name,
                " codes must be uint8 [", B, ", ", H, ", ", S, ", ", (N * bits + 7) / 8, "], got ", codes.sizes());
    sparkkv::Quant& q = op.q;
    q.codes = codes.data_ptr<uint8_t>();
    q.bits = int(bits);
    q.N = N;
    q.row_bytes = (N * bits + 7) / 8;
    q.group = group;
    q.token_axis = ints[2] != 0;
    q.channel = ints[2] == 2;
    q.width = q.channel ? D : N;
    TORCH_CHECK(ints[2] >= 0 && ints[2] <= 2, name, ": axis ", ints[2], " (0 row, 1 token, 2 channel)");
    TORCH_CHECK(!q.channel || (packed && !qzero.numel()), name, ": per-channel scales are read for packed rows with symmetric codes");
    q.offset = ints[3];
    TORCH_CHECK(qscale.dim() == 4 && qscale.size(0) == B && qscale.size(1) == H, name, " scales must be [", B, ", ", H,
                ", ...], got ", qscale.sizes());
    if (q.token_axis) {
      q.groups = qscale.size(2);
      TORCH_CHECK(q.offset >= 0 && q.offset < group && qscale.size(3) == q.width && q.groups * group >= q.offset + S, name,
                  " token-axis scales must be [", B, ", ", H, ", >= ceil((offset + S) / group), ", q.width, "], got ",
                  qscale.sizes(), " for offset ", q.offset, ", S ", S, ", group ", group);
    } else {
      q.groups = (N + group - 1) / group;
      TORCH_CHECK(qscale.size(2) == S && qscale.size(3) == q.groups, name, " row-axis scales must be [", B, ", ", H,
                  ", ", S, ", ", q.groups, "], got ", qscale.sizes());
    }
    q.scale = qscale.data_ptr();
    q.sdtype = dtype_code(qscale, "scale");
    if (qzero.numel()) {
      TORCH_CHECK(qzero.sizes() == qscale.sizes() && qzero.scalar_type() == qscale.scalar_type(), name,
                  " zeros must be shaped and typed like the scales");
      q.zero = qzero.data_ptr();
    }
    op.dtype = sparkkv::kF32;
    op.count = B * H * S * N;
    per_row = N;
  } else {
    TORCH_CHECK(vals.numel() || !B || !H || !S || (packed && vals.dim() == 4), name, " vals missing");
    op.dtype = dtype_code(vals, name);
    op.vals = vals.data_ptr();
    op.count = vals.numel();
    if (!packed) {
      TORCH_CHECK(shaped(vals, B, H, S, D), name, " must be [", B, ", ", H, ", ", S, ", ", D, "], got ", vals.sizes());
    } else if (vals.dim() == 4) {
      TORCH_CHECK(vals.size(0) == B && vals.size(1) == H && vals.size(2) == S && vals.size(3) <= D, name,
                  " vals must be [", B, ", ", H, ", ", S, ", T <= ", D, "], got ", vals.sizes());
      per_row = vals.size(3);
    } else {
      TORCH_CHECK(vals.dim() == 1, name, " vals must be [B, H, S, T] or flat, got ", vals.sizes());
      per_row = -1;
    }
  }
  op.T = per_row;
  if (!packed) {
    TORCH_CHECK(!quantized || per_row == D, name, ": dense codes must hold ", D, " values per row, got ", per_row);
    return op;
  }
  TORCH_CHECK(D % 8 == 0, name, " head_dim ", D, " is not a multiple of 8");
  if (keep.numel()) {
    TORCH_CHECK(keep.scalar_type() == at::kByte && shaped(keep, B, H, S, D / 8), name, " keep must be contiguous uint8 [",
                B, ", ", H, ", ", S, ", ", D / 8, "], got ", keep.sizes());
    op.keep = keep.data_ptr<uint8_t>();
    if (sign.numel()) {
      TORCH_CHECK(sign.scalar_type() == at::kByte && sign.sizes() == keep.sizes(), name,
                  " sign must be contiguous uint8 shaped like keep, got ", sign.sizes());
      op.sign = sign.data_ptr<uint8_t>();
    }
  } else {
    TORCH_CHECK(trits.scalar_type() == at::kByte && shaped(trits, B, H, S, (D + 4) / 5) && !sign.numel(), name,
                " trits must be contiguous uint8 [", B, ", ", H, ", ", S, ", ", (D + 4) / 5, "] (and no sign), got ",
                trits.sizes());
    op.trits = trits.data_ptr<uint8_t>();
  }
  if (scale.numel()) {
    TORCH_CHECK(scale.numel() == B * H * S, name, " scale must be contiguous [", B, ", ", H, ", ", S, "], got ",
                scale.sizes());
    op.scale = scale.data_ptr();
    op.scale_dtype = dtype_code(scale, "scale");
  }
  if (chan.numel()) {
    TORCH_CHECK(chan.scalar_type() == at::kFloat && chan.numel() == chan_batch * H * D, name,
                " chan must be contiguous float32 [", chan_batch, ", ", H, ", ", D, "], got ", chan.sizes());
    op.chan = chan.data_ptr<float>();
  }
  return op;
}

sparkkv::Problem make_problem(const at::Tensor& q, int64_t S, int64_t Dv, bool portable, bool bf16_dot, bool avx512) {
  TORCH_CHECK(q.dim() == 4 && q.is_contiguous() && q.device().is_cpu(), "query rows must be a contiguous CPU [B, H, M, D] tensor");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "query rows must be float32 or bfloat16");
  sparkkv::Problem p;
  p.B = q.size(0);
  p.H = q.size(1);
  p.M = q.size(2);
  p.D = q.size(3);
  p.S = S;
  p.Dv = Dv;
  p.q = q.data_ptr();
  p.q_dtype = dtype_code(q, "query rows");
  p.opt.portable = portable;
  p.opt.bf16_dot = bf16_dot;
  p.opt.avx512 = avx512;
  return p;
}
}  // namespace

// Every field but chan of a paged operand (pages given) must lie in the first page of `pages`.
void check_in_page(const char* name, const std::vector<at::Tensor>& f, const at::Tensor& pages) {
  const uint8_t* base = pages.data_ptr<uint8_t>();
  for (int i = 0; i < kFields; ++i) {
    if (i == kChan || !f[i].numel()) continue;
    const uint8_t* ptr = static_cast<const uint8_t*>(f[i].data_ptr());
    TORCH_CHECK(ptr >= base && ptr + f[i].nbytes() <= base + pages.size(1), name,
                ": a paged operand's fields must be views of the first page of `pages`");
  }
}

// pages: empty, or uint8 [P, page bytes] (rows `stride(0)` bytes apart) with block_ids int64 [B]
// in [0, P): the operands are read in place (Paging).
std::vector<at::Tensor> decode_partials(at::Tensor q, std::vector<at::Tensor> kf, std::vector<int64_t> ki,
                                        std::vector<at::Tensor> vf, std::vector<int64_t> vi, at::Tensor bias, int64_t S,
                                        int64_t Dv, double scaling, int64_t splits, bool portable, bool bf16_dot,
                                        bool avx512, at::Tensor pages, at::Tensor block_ids) {
  sparkkv::Problem p = make_problem(q, S, Dv, portable, bf16_dot, avx512);
  TORCH_CHECK(splits >= 1, "splits must be >= 1, got ", splits);
  const bool paged = pages.numel() > 0;
  if (paged) {
    TORCH_CHECK(pages.scalar_type() == at::kByte && pages.dim() == 2 && pages.stride(1) == 1 && pages.device().is_cpu(),
                "pages must be a CPU uint8 [P, page bytes] tensor with contiguous rows, got ", pages.sizes());
    TORCH_CHECK(block_ids.scalar_type() == at::kLong && block_ids.dim() == 1 && block_ids.is_contiguous() &&
                    block_ids.numel() == p.B,
                "block_ids must be a contiguous int64 [", p.B, "] tensor, got ", block_ids.sizes());
    if (p.B) {
      const auto lo = block_ids.min().item<int64_t>(), hi = block_ids.max().item<int64_t>();
      TORCH_CHECK(lo >= 0 && hi < pages.size(0), "block_ids must lie in [0, ", pages.size(0), "), got [", lo, ", ", hi, "]");
    }
    check_in_page("keys", kf, pages);
    check_in_page("values", vf, pages);
    p.pages.ids = block_ids.data_ptr<int64_t>();
    p.pages.stride = pages.stride(0);
  }
  p.K = make_operand("keys", kf, ki, paged ? 1 : p.B, p.H, S, p.D, p.B);
  p.V = make_operand("values", vf, vi, paged ? 1 : p.B, p.H, S, Dv, p.B);
  p.scaling = static_cast<float>(scaling);
  if (bias.numel()) {
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.dim() == 3 && bias.size(0) == p.B &&
                    (bias.size(1) == 1 || bias.size(1) == p.H) && bias.size(2) == S,
                "bias must be contiguous float32 [", p.B, ", 1 or ", p.H, ", ", S, "], got ", bias.sizes());
    p.bias = bias.data_ptr<float>();
    p.bias_heads = bias.size(1);
  }
  auto opts = q.options().dtype(at::kFloat);
  at::Tensor m = at::empty({p.B, p.H, splits, p.M}, opts), l = at::empty({p.B, p.H, splits, p.M}, opts);
  at::Tensor acc = at::empty({p.B, p.H, splits, p.M, Dv}, opts);
  const char* err = sparkkv::decode(p, splits, m.data_ptr<float>(), l.data_ptr<float>(), acc.data_ptr<float>());
  TORCH_CHECK(err == nullptr, err);
  return {m, l, acc};
}

at::Tensor packed_qk(at::Tensor q, std::vector<at::Tensor> kf, std::vector<int64_t> ki, int64_t S, bool portable,
                     bool bf16_dot, bool avx512) {
  sparkkv::Problem p = make_problem(q, S, 0, portable, bf16_dot, avx512);
  p.K = make_operand("keys", kf, ki, p.B, p.H, S, p.D, p.B);
  at::Tensor out = at::empty({p.B, p.H, p.M, S}, q.options().dtype(at::kFloat));
  const char* err = sparkkv::qk(p, out.data_ptr<float>());
  TORCH_CHECK(err == nullptr, err);
  return out;
}

bool has_avx512_path() { return SPARKKV_AVX512; }
bool has_avx2_path() { return SPARKKV_AVX2; }
bool has_bf16_dot() { return SPARKKV_BF16DOT; }
bool avx512_serves(int64_t D, int64_t Dv, bool keys_packed, bool values_packed) {
  return sparkkv::avx_serves(D, Dv, keys_packed, values_packed);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_partials", &decode_partials, "fused logits + online softmax + P.V partials over packed/quantized/dense K, V");
  m.def("packed_qk", &packed_qk, "logits of query rows against packed, quantized or dense keys");
  m.def("has_avx512_path", &has_avx512_path, "whether the AVX-512 paths were compiled in");
  m.def("has_avx2_path", &has_avx2_path, "whether the AVX2 path was compiled in");
  m.def("has_bf16_dot", &has_bf16_dot, "whether the AVX512_BF16 dot-product stages were compiled in");
  m.def("avx512_serves", &avx512_serves,
        "whether the AVX-512 paths serve head dims (D, Dv) with keys / values packed or dense (raw values, keep/sign masks)");
}
#endif  // SPARKKV_STANDALONE
