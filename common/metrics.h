// Process-wide counters and histograms in the Prometheus text format
// (https://prometheus.io/docs/instrumenting/exposition_formats/). Debian 12
// packages no Prometheus client library for C++, so this is the small part
// of one that ecsnapd needs: monotonic counters and fixed-bucket histograms,
// each a name plus a fixed label set, updated with relaxed atomics (no lock
// on the hot path) and rendered on scrape. Gauges are the scraper's: values
// read from the daemon's own state when /metrics is asked for.
//
//   static auto& pushed = Metrics().GetCounter("ecsnap_peer_pushed_bytes_total",
//       "Chunk bytes pushed to a parity holder.", {{"peer", "3"}});
//   pushed.Add(n);
//
// Names follow Prometheus conventions (ecsnap_..._total, _bytes, _seconds).
// Thread-safe. Series are never removed: label values must come from a
// bounded set (slots, error codes), never from job names or steps.
#ifndef ECSNAP_COMMON_METRICS_H_
#define ECSNAP_COMMON_METRICS_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace ecsnap {

using MetricLabels = std::vector<std::pair<std::string, std::string>>;

class Counter {
 public:
  void Add(uint64_t n = 1) { value_.fetch_add(n, std::memory_order_relaxed); }
  uint64_t value() const { return value_.load(std::memory_order_relaxed); }

 private:
  std::atomic<uint64_t> value_{0};
};

class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double value);
  // Appends `name`'s _bucket, _sum and _count lines with `labels`.
  void Render(const std::string& name, const std::string& labels, std::string* out) const;

 private:
  const std::vector<double> bounds_;  // upper bounds, ascending; +Inf implied
  std::unique_ptr<std::atomic<uint64_t>[]> counts_;  // per bucket (not cumulative)
  std::atomic<uint64_t> sum_micros_{0};  // sum in millionths
};

// Latency buckets in seconds, 1 ms .. 5 min.
std::vector<double> LatencyBuckets();

class MetricsRegistry {
 public:
  // The series `name{labels}`, made on first use; the same object after.
  Counter& GetCounter(const std::string& name, const std::string& help,
                      const MetricLabels& labels = {});
  Histogram& GetHistogram(const std::string& name, const std::string& help,
                          const MetricLabels& labels = {},
                          const std::vector<double>& bounds = LatencyBuckets());
  // Every series, grouped by name with HELP and TYPE lines.
  std::string Render() const;

 private:
  struct Family {
    std::string help;
    bool histogram = false;
    std::map<std::string, std::unique_ptr<Counter>> counters;      // by rendered labels
    std::map<std::string, std::unique_ptr<Histogram>> histograms;  // by rendered labels
  };
  mutable absl::Mutex mu_;
  std::map<std::string, Family> families_ ABSL_GUARDED_BY(mu_);
};

// The process's registry.
MetricsRegistry& Metrics();

// `{a="x",b="y"}` with values escaped as the text format wants ("" for none).
std::string RenderLabels(const MetricLabels& labels);

}  // namespace ecsnap

#endif  // ECSNAP_COMMON_METRICS_H_
