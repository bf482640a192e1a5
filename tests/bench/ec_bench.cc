// ec_bench: the codec against bare ISA-L on the same buffers, same run.
//
// For each code it lays out one step of a group whose payloads add up to
// --group_bytes, then times, single-threaded and best of --reps:
//   encode  Codec::Encode over every stripe  vs  ec_encode_data on the same chunks
//   fold    Codec::Fold chunk by chunk       vs  ec_encode_data_update, same calls
//   decode  Codec::Reconstruct of m lost slots vs ec_encode_data with decode tables
// and prints GB/s (data bytes consumed per second) and the ratio codec / raw.
// Last line: RESULT ec_encode_ratio_min=<lowest encode ratio>.
//
//   bazel run -c opt //tests/bench:ec_bench [-- --group_bytes=1073741824 --reps=5]
#include <isa-l/erasure_code.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_format.h"
#include "ec/codec.h"
#include "ec/layout.h"

ABSL_FLAG(uint64_t, group_bytes, uint64_t{1} << 30, "Payload bytes of the whole group.");
ABSL_FLAG(int, reps, 5, "Repetitions; the best is reported.");

namespace ecsnap::ec {
namespace {

double BestSeconds(int reps, const std::function<void()>& fn) {
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    best = std::min(best, std::chrono::duration<double>(t1 - t0).count());
  }
  return best;
}

struct Result {
  double codec_gbps;
  double raw_gbps;
  double ratio() const { return codec_gbps / raw_gbps; }
};

class Bench {
 public:
  Bench(int k, int m, uint64_t group_bytes)
      : layout_(*Layout::Create(k, m)), codec_(*Codec::Create(k, m)) {
    const int n = k + m;
    const uint64_t slot_bytes = group_bytes / n / 4096 * 4096;
    lens_.assign(n, slot_bytes);
    std::mt19937_64 rng(1);
    payload_.resize(n);
    for (auto& p : payload_) {
      p.resize(slot_bytes);
      uint64_t* w = reinterpret_cast<uint64_t*>(p.data());
      for (size_t i = 0; i < slot_bytes / 8; ++i) w[i] = rng();
    }
    parity_.resize(n);
    for (int s = 0; s < n; ++s) {
      for (int r = 0; r < m; ++r) {
        parity_[s].emplace_back(layout_.ChunkLength(lens_, s, k + r), 0);  // touched
      }
    }
    // Bare ISA-L's own tables for the same generator.
    std::vector<uint8_t> matrix(n * k);
    gf_gen_cauchy1_matrix(matrix.data(), n, k);
    raw_tables_.resize(32 * k * m);
    ec_init_tables(k, m, matrix.data() + k * k, raw_tables_.data());
    // Decode of slots 0..m-1 from the first k survivors of stripe 0's pattern,
    // built once: the raw baseline does no table work in its timed loop.
    BuildRawDecode(matrix);
  }

  uint64_t data_bytes() const { return lens_[0] * lens_.size(); }

  ConstBytes Data(int s, int q) const {
    const ChunkPlace p = layout_.Place(s, q);
    const Extent e = layout_.DataChunk(lens_[p.slot], p.chunk);
    return ConstBytes(payload_[p.slot].data() + e.offset, e.length);
  }

  Result Encode(int reps) {
    const int k = layout_.k(), m = layout_.m();
    const double codec = BestSeconds(reps, [&] {
      for (int s = 0; s < layout_.stripes(); ++s) {
        std::vector<ConstBytes> in;
        std::vector<MutableBytes> out;
        for (int q = 0; q < k; ++q) in.push_back(Data(s, q));
        for (auto& p : parity_[s]) out.push_back(absl::MakeSpan(p));
        if (!codec_->Encode(in, out).ok()) std::abort();
      }
    });
    const double raw = BestSeconds(reps, [&] {
      for (int s = 0; s < layout_.stripes(); ++s) {
        uint8_t* in[32];
        uint8_t* out[32];
        for (int q = 0; q < k; ++q) in[q] = const_cast<uint8_t*>(Data(s, q).data());
        for (int r = 0; r < m; ++r) out[r] = parity_[s][r].data();
        ec_encode_data(static_cast<int>(Data(s, 0).size()), k, m, raw_tables_.data(), in, out);
      }
    });
    return {data_bytes() / codec / 1e9, data_bytes() / raw / 1e9};
  }

  Result Fold(int reps) {
    const int k = layout_.k(), m = layout_.m();
    const double codec = BestSeconds(reps, [&] {
      for (int s = 0; s < layout_.stripes(); ++s) {
        std::vector<MutableBytes> out;
        for (auto& p : parity_[s]) out.push_back(absl::MakeSpan(p));
        for (int q = k - 1; q >= 0; --q) {
          if (!codec_->Fold(q, Data(s, q), out).ok()) std::abort();
        }
      }
    });
    const double raw = BestSeconds(reps, [&] {
      for (int s = 0; s < layout_.stripes(); ++s) {
        uint8_t* out[32];
        for (int r = 0; r < m; ++r) out[r] = parity_[s][r].data();
        for (int q = k - 1; q >= 0; --q) {
          ConstBytes d = Data(s, q);
          ec_encode_data_update(static_cast<int>(d.size()), k, m, q, raw_tables_.data(),
                                const_cast<uint8_t*>(d.data()), out);
        }
      }
    });
    return {data_bytes() / codec / 1e9, data_bytes() / raw / 1e9};
  }

  // Loses slots 0..m-1 and rebuilds what they held in every stripe.
  Result Decode(int reps) {
    const int k = layout_.k(), m = layout_.m(), n = k + m;
    std::vector<std::vector<uint8_t>> out_bufs(m);
    for (auto& b : out_bufs) b.assign(layout_.ChunkBytes(lens_[0]), 0);
    const double codec = BestSeconds(reps, [&] {
      for (int s = 0; s < n; ++s) {
        std::vector<ConstBytes> shards(n);
        uint32_t present = 0;
        std::vector<int> targets;
        std::vector<MutableBytes> outs;
        for (int q = 0; q < n; ++q) {
          if (layout_.SlotOf(s, q) < m) {
            targets.push_back(q);
            outs.push_back(absl::MakeSpan(out_bufs[targets.size() - 1]));
          } else {
            shards[q] = q < k ? Data(s, q) : ConstBytes(parity_[s][q - k]);
            present |= 1u << q;
          }
        }
        if (!codec_->Reconstruct(s, shards, present, targets, outs).ok()) std::abort();
      }
    });
    // Raw: the same number of ec_encode_data calls of the same shape (k
    // sources, m outputs, one chunk long) with one prepared decode table.
    const double raw = BestSeconds(reps, [&] {
      for (int s = 0; s < n; ++s) {
        uint8_t* in[32];
        uint8_t* out[32];
        int i = 0;
        for (int q = 0; q < n && i < k; ++q) {
          if (layout_.SlotOf(s, q) < m) continue;
          in[i++] = const_cast<uint8_t*>(q < k ? Data(s, q).data() : parity_[s][q - k].data());
        }
        for (int r = 0; r < m; ++r) out[r] = out_bufs[r].data();
        ec_encode_data(static_cast<int>(Data(s, 0).size()), k, m, raw_decode_tables_.data(), in,
                       out);
      }
    });
    return {data_bytes() / codec / 1e9, data_bytes() / raw / 1e9};
  }

 private:
  void BuildRawDecode(const std::vector<uint8_t>& matrix) {
    const int k = layout_.k(), m = layout_.m();
    // Survivors: positions m..n-1 of the generator (a valid k-subset); the
    // coefficients do not change the cost, only the shape does.
    std::vector<uint8_t> b(k * k), inv(k * k);
    std::memcpy(b.data(), matrix.data() + m * k, k * k);
    if (gf_invert_matrix(b.data(), inv.data(), k) != 0) std::abort();
    raw_decode_tables_.resize(32 * k * m);
    ec_init_tables(k, m, inv.data(), raw_decode_tables_.data());
  }

  Layout layout_;
  std::unique_ptr<Codec> codec_;
  std::vector<uint64_t> lens_;
  std::vector<std::vector<uint8_t>> payload_;
  std::vector<std::vector<std::vector<uint8_t>>> parity_;
  std::vector<uint8_t> raw_tables_;
  std::vector<uint8_t> raw_decode_tables_;
};

}  // namespace
}  // namespace ecsnap::ec

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  const uint64_t group_bytes = absl::GetFlag(FLAGS_group_bytes);
  const int reps = std::max(1, absl::GetFlag(FLAGS_reps));
  std::printf("ec_bench: group payload %.2f GiB, single thread, best of %d\n",
              group_bytes / double(1 << 30), reps);
  std::printf("%-9s %-7s %12s %12s %8s\n", "code", "op", "codec GB/s", "raw GB/s", "ratio");
  double encode_ratio_min = 1e30;
  for (auto [k, m] : {std::pair{4, 2}, std::pair{8, 2}, std::pair{12, 4}}) {
    ecsnap::ec::Bench bench(k, m, group_bytes);
    const std::string code = absl::StrFormat("RS(%d,%d)", k, m);
    auto print = [&](const char* op, const ecsnap::ec::Result& r) {
      std::printf("%-9s %-7s %12.2f %12.2f %8.3f\n", code.c_str(), op, r.codec_gbps, r.raw_gbps,
                  r.ratio());
    };
    const auto enc = bench.Encode(reps);
    print("encode", enc);
    print("fold", bench.Fold(reps));
    print("decode", bench.Decode(reps));
    encode_ratio_min = std::min(encode_ratio_min, enc.ratio());
  }
  std::printf("RESULT ec_encode_ratio_min=%.3f\n", encode_ratio_min);
  return 0;
}
