// Standalone micro-benchmark of cpu_decode.cpp (no torch, compiles in seconds): per token-head cost
// of each path on random data at Llama-3-8B head geometry (8 kv-heads, GQA 4, head_dim 128, bf16
// storage), checked against the portable scalar path. Single-threaded runs are timed in thread CPU
// time, which a busy shared machine disturbs less than wall time.
//
//   g++ -O3 -march=native -fopenmp -std=c++17 src/sparkkv/kernels/cpu_decode_bench.cpp -o /tmp/cpu_decode_bench
//   /tmp/cpu_decode_bench [S=4096] [threads=1] [reps=20] [M=4 query rows per kv-head] [H=8] [D=128]
//   (SmolLM2-135M geometry: M=3 H=3 D=64)
//   (add -DSPARKKV_EXPAND_REGISTER to time the register-form expand instead of the memory form)
#define SPARKKV_STANDALONE
#include "cpu_decode.cpp"

#include <omp.h>
#include <time.h>

#include <cstdio>
#include <cstdlib>
#include <random>

using namespace sparkkv;

namespace {
double now(bool cpu_time) {
  timespec ts;
  clock_gettime(cpu_time ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

struct Packed {  // owns the fields behind an Operand
  std::vector<uint16_t> vals, scale;
  std::vector<uint8_t> keep, sign;
  std::vector<float> chan;
  Operand op;
};

// T kept channels per row at random positions; mean-recovery fields (sign, scale, chan) or, for
// values, scale only (compress_values).
Packed make_packed(std::mt19937& rng, int64_t rows, int64_t heads, int64_t D, int64_t T, bool key_fields) {
  std::normal_distribution<float> normal;
  Packed p;
  p.vals.resize(rows * T);
  for (auto& v : p.vals) v = f32_to_bf16(normal(rng));
  p.keep.assign(rows * D / 8, 0);
  std::vector<int> idx(D);
  for (int64_t r = 0; r < rows; ++r) {
    for (int i = 0; i < D; ++i) idx[i] = i;
    std::shuffle(idx.begin(), idx.end(), rng);
    for (int i = 0; i < T; ++i) p.keep[r * D / 8 + idx[i] / 8] |= uint8_t(1 << (idx[i] % 8));
  }
  p.scale.resize(rows);
  for (auto& v : p.scale) v = f32_to_bf16(std::abs(normal(rng)) + 0.1f);
  p.op = Operand{};
  p.op.dtype = kBF16;
  p.op.vals = p.vals.data();
  p.op.count = int64_t(p.vals.size());
  p.op.D = D;
  p.op.T = T;
  p.op.keep = p.keep.data();
  p.op.scale = p.scale.data();
  p.op.scale_dtype = kBF16;
  if (key_fields) {
    p.sign.resize(p.keep.size());
    for (size_t i = 0; i < p.sign.size(); ++i) p.sign[i] = uint8_t(rng()) & uint8_t(~p.keep[i]);
    p.chan.resize(heads * D);
    for (auto& v : p.chan) v = std::abs(normal(rng)) + 0.1f;
    p.op.sign = p.sign.data();
    p.op.chan = p.chan.data();
  }
  return p;
}

const char* expand_form() {
#if SPARKKV_AVX512
  return kRegisterExpand ? "register" : "memory";
#else
  return "n/a (no AVX-512 path)";
#endif
}

std::vector<double> output(const std::vector<float>& l, const std::vector<float>& acc, int64_t rows, int64_t Dv) {
  std::vector<double> o(rows * Dv);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t d = 0; d < Dv; ++d) o[i * Dv + d] = acc[i * Dv + d] / l[i];
  return o;
}
}  // namespace

int main(int argc, char** argv) {
  const int64_t S = argc > 1 ? std::atoll(argv[1]) : 4096;
  const int threads = argc > 2 ? std::atoi(argv[2]) : 1;
  const int reps = argc > 3 ? std::atoi(argv[3]) : 20;
  omp_set_num_threads(threads);
  const bool cpu_time = threads == 1;
  const int64_t M = argc > 4 ? std::atoll(argv[4]) : 4;
  const int64_t B = 1, H = argc > 5 ? std::atoll(argv[5]) : 8, D = argc > 6 ? std::atoll(argv[6]) : 128, BH = B * H;
  std::mt19937 rng(42);
  std::normal_distribution<float> normal;
  std::vector<uint16_t> q(BH * M * D), kd(BH * S * D), vd(BH * S * D);
  for (auto* buf : {&q, &kd, &vd})
    for (auto& v : *buf) v = f32_to_bf16(normal(rng));
  Operand dense_k;
  dense_k.dtype = kBF16;
  dense_k.vals = kd.data();
  dense_k.count = int64_t(kd.size());
  dense_k.D = dense_k.T = D;
  Operand dense_v = dense_k;
  dense_v.vals = vd.data();
  Packed k80 = make_packed(rng, BH * S, BH, D, D - D * 4 / 5, true);
  Packed k50 = make_packed(rng, BH * S, BH, D, D / 2, true), v80 = make_packed(rng, BH * S, BH, D, D - D * 4 / 5, false);
  struct Case {
    const char* name;
    Operand K, V;
  } cases[] = {{"dense K + dense V", dense_k, dense_v},
               {"K80 + dense V", k80.op, dense_v},
               {"K50 + dense V", k50.op, dense_v},
               {"K80 + V80", k80.op, v80.op}};
  std::printf("S=%lld, H=%lld, D=%lld, M=%lld, %d thread(s), %s; expand form: %s\n", (long long)S, (long long)H, (long long)D, (long long)M, threads,
              cpu_time ? "thread CPU time" : "wall time", expand_form());
  std::printf("%-18s %-9s %12s %12s %14s\n", "case", "path", "ns/token-head", "logits only", "rel err vs scalar");
  for (const Case& c : cases) {
    Problem p;
    p.B = B, p.H = H, p.S = S, p.M = M, p.D = D, p.Dv = D;
    p.q_dtype = kBF16;
    p.q = q.data();
    p.K = c.K;
    p.V = c.V;
    p.scaling = 1.f / std::sqrt(float(D));
    std::vector<float> m(BH * M), l(BH * M), acc(BH * M * D), logits(BH * M * S);
    p.opt.portable = true;
    decode(p, 1, m.data(), l.data(), acc.data());
    const std::vector<double> ref = output(l, acc, BH * M, D);
    p.opt.portable = false;
    for (int bf16 : {1, 0}) {
      p.opt.bf16_dot = bf16;
      decode(p, 1, m.data(), l.data(), acc.data());
      const std::vector<double> got = output(l, acc, BH * M, D);
      double num = 0, den = 0;
      for (size_t i = 0; i < got.size(); ++i) num += (got[i] - ref[i]) * (got[i] - ref[i]), den += ref[i] * ref[i];
      auto median = [&](auto fn) {
        std::vector<double> t;
        for (int r = 0; r < reps; ++r) {
          const double t0 = now(cpu_time);
          fn();
          t.push_back(now(cpu_time) - t0);
        }
        std::sort(t.begin(), t.end());
        return t[t.size() / 2] * 1e9 * (cpu_time ? 1 : threads) / double(BH * S);
      };
      const double full = median([&] { decode(p, 1, m.data(), l.data(), acc.data()); });
      const double qk_only = median([&] { qk(p, logits.data()); });
      std::printf("%-18s %-9s %12.1f %12.1f %14.1e\n", c.name, bf16 ? "bf16 dot" : "float32", full, qk_only,
                  std::sqrt(num / den));
    }
  }
}
