#include "daemon/peer/rebuild_plan.h"

#include <algorithm>
#include <map>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace ecsnap::daemon {
namespace {

absl::Status Decodable(const ec::Layout& layout, const Group& group, const GroupView& view,
                       const std::string& job, uint64_t step, const StepView& v) {
  const int n = layout.n(), k = layout.k(), m = layout.m(), self = group.self;
  std::vector<std::string> why;
  std::vector<uint32_t> unknown;
  for (int i = 0; i < n; ++i) {
    if (!v.slots.count(i)) unknown.push_back(group.slots[i]);
  }
  if (!unknown.empty()) {
    why.push_back(absl::StrFormat("no answering peer knows the shape of slots {%s}",
                                  absl::StrJoin(unknown, ", ")));
  }
  for (int s = 0; s < n; ++s) {
    if (n - static_cast<int>(MissingPositions(v.held, n, s).size()) < k) {
      why.push_back(StripeLoss(layout, group, v.held, s));
    }
  }
  if (why.empty()) return absl::OkStatus();
  std::vector<uint32_t> lost = {group.slots[self]};
  for (int i = 0; i < n; ++i) {
    if (i != self && !view.answered().count(i)) lost.push_back(group.slots[i]);
  }
  std::sort(lost.begin(), lost.end());
  return absl::DataLossError(absl::StrFormat(
      "job %s step %d cannot be rebuilt: group %d (RS %d+%d) has lost slots {%s}; %s; "
      "restore from a disk checkpoint",
      job, step, group.id, k, m, absl::StrJoin(lost, ", "), absl::StrJoin(why, "; ")));
}

}  // namespace

std::vector<JobPlan> PlanRebuild(const ec::Layout& layout, const Group& group,
                                 const GroupView& view, const std::set<StepKey>& have) {
  const size_t rows = static_cast<size_t>(layout.n()) * static_cast<size_t>(layout.m());
  std::map<std::string, std::vector<uint64_t>> protected_steps;
  for (const auto& [key, v] : view.steps()) {
    if (v.rows.size() == rows) protected_steps[key.first].push_back(key.second);
  }
  std::vector<JobPlan> plans;
  for (auto& [job, steps] : protected_steps) {
    std::sort(steps.rbegin(), steps.rend());
    uint64_t newest_here = 0;
    for (const auto& [j, s] : have) {
      if (j == job) newest_here = std::max(newest_here, s);
    }
    JobPlan plan;
    plan.job = job;
    for (uint64_t step : steps) {
      if (step <= newest_here) break;
      plan.candidates.push_back(
          {step, Decodable(layout, group, view, job, step, view.steps().at({job, step}))});
    }
    plans.push_back(std::move(plan));
  }
  return plans;
}

}  // namespace ecsnap::daemon
