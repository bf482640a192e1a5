// Rebuilder: restores a slot's steps from its group after the node was lost
// and replaced (DESIGN.md §5).
//
// It asks every peer for its inventory, then per job picks the newest step
// that was fully protected (all n * m parity rows announced) and whose every
// stripe still has k intact chunks among the answering peers. For each of the
// n stripes it fetches k surviving chunks in bounded slices, checks each
// against the CRC-32C recorded when it was pushed or completed (a chunk that
// fails is treated as lost and another survivor used), decodes what this
// slot held there (a data chunk or a parity row) and, once every tensor
// checksum of every rank verifies, installs the step as PROTECTED. When more
// than m slots of the group are gone, the job is marked unrecoverable with a
// DATA_LOSS status naming the group, the step and the missing slots.
//
// It also hands the rows peers announced to the Protector, so that steps a
// restarted daemon re-adopted as LOCAL become PROTECTED again.
#ifndef ECSNAP_DAEMON_REBUILDER_H_
#define ECSNAP_DAEMON_REBUILDER_H_

#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "daemon/arena.h"
#include "daemon/parity_store.h"
#include "daemon/protector.h"
#include "daemon/step_store.h"
#include "ec/codec.h"
#include "proto/admin.pb.h"

namespace ecsnap::daemon {

class Rebuilder {
 public:
  Rebuilder(Arena* arena, StepStore* store, ParityStore* parity, Protector* protector,
            const ec::Codec* codec);

  // One pass over every job (or `job_id`): rebuild what this slot lacks.
  // Returns the first error; the others are logged.
  absl::Status Run(const std::string& job_id);

  admin::RebuildStatus status() const;
  // Blocks until no rebuild is running, at most `timeout`.
  void WaitIdle(absl::Duration timeout) const;

 private:
  struct StepView;
  absl::Status RebuildStep(const std::string& job, uint64_t step, const StepView& view);

  Arena* const arena_;
  StepStore* const store_;
  ParityStore* const parity_;
  Protector* const protector_;
  const ec::Codec* const codec_;

  mutable absl::Mutex mu_;
  admin::RebuildStatus status_ ABSL_GUARDED_BY(mu_);
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_REBUILDER_H_
