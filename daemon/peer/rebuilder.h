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
#ifndef ECSNAP_DAEMON_PEER_REBUILDER_H_
#define ECSNAP_DAEMON_PEER_REBUILDER_H_

#include <cstdint>
#include <atomic>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "daemon/store/arena.h"
#include "common/executor.h"
#include "common/unique_fd.h"
#include "daemon/peer/group_view.h"
#include "daemon/peer/parity_store.h"
#include "daemon/peer/protector.h"
#include "daemon/store/step_store.h"
#include "ec/codec.h"
#include "proto/admin.pb.h"

namespace ecsnap::daemon {

class Rebuilder {
 public:
  struct Options {
    // Cap on the bytes a rebuild decodes per second, to leave the network to
    // training; on-demand decodes for a waiting rank are not capped.
    // Default: 0 (no cap).
    uint64_t bytes_per_second = 0;
  };

  // `fetches` runs the survivor fetches of every slice; it must outlive
  // this object.
  Rebuilder(Arena* arena, StepStore* store, ParityStore* parity, Protector* protector,
            const ec::Codec* codec, Executor* fetches, Options options);

  // One pass over every job (or `job_id`): rebuild what this slot lacks.
  // Returns the first error; the others are logged.
  //
  // One pass runs at a time. A Run called while another is running does not
  // wait and does nothing: it returns FAILED_PRECONDITION ("a rebuild is
  // already running (job X step Y, N% done); see ecsnapctl status"). The
  // running pass reads the group's inventories itself, so a caller that wants
  // a fresh look once it ends calls Run again when status().active is false.
  absl::Status Run(const std::string& job_id);

  admin::RebuildStatus status() const;
  // Blocks until no rebuild is running, at most `timeout`.
  void WaitIdle(absl::Duration timeout) const;
  // Ends the rebuild in progress promptly (its calls are cancelled through
  // the protector's watchdog, which Protector::Stop cancels) and refuses
  // later ones. For shutdown.
  void Stop();

  // Degraded restore (degraded_restore.cc): when `rank` of `job` lives in a
  // step being rebuilt, decodes that rank's bytes now, ahead of the rebuild,
  // checks them and makes them restorable (the step shows as REBUILDING). Returns once the
  // rank can be restored, or no rebuild concerns it, or after `timeout`.
  // The rank is decoded into an arena extent of its own, never into the
  // rebuild's window for it: what is served is never overwritten.
  void ServeRank(const std::string& job, uint32_t rank, absl::Duration timeout);

 private:
  struct Current;
  // What the slices of a stripe share: a buffer per survivor, and a stream
  // per survivor position, so that the k survivors are read in lockstep, a
  // slice of each at a time, instead of one request per slice.
  struct Scratch {
    struct Stream {
      uint64_t at = 0;  // the chunk offset the reader is at
      std::unique_ptr<ChunkReader> reader;
    };
    std::vector<Mapping> bufs;  // MapScratch: no fault per page
    std::map<int, Stream> streams;  // by position in the stripe
  };
  // Reads `into` (bytes [from, from + into.size()) of position `q`) from
  // `holder`, through the position's open stream when it is at `from`.
  absl::Status ReadSurvivor(const Current& c, int s, int q, int holder, uint64_t from,
                            absl::Span<uint8_t> into, Scratch::Stream* stream);
  // One look at the group's inventories and the rebuilds it calls for. Sets
  // *again when a step was retired under a rebuild and a new look is due.
  absl::Status Pass(const std::string& job_filter, bool final_pass, bool* again);
  // ABORTED when peers retired the step meanwhile.
  absl::Status RebuildStep(const std::string& job, uint64_t step, const StepView& view);
  // Decodes out.size() bytes of position `target` of stripe `s` from byte
  // `at` of the chunk, reading up to `read` bytes of each survivor in `use`
  // (accumulating their CRCs into *crcs when given). On a survivor that
  // cannot be read, sets *failed to its position.
  absl::Status DecodeSlice(const Current& c, int s, int target, const std::vector<int>& use,
                           uint64_t at, uint64_t read, absl::Span<uint8_t> out,
                           std::vector<uint32_t>* crcs, int* failed, Scratch* scratch);
  // The first k intact positions of stripe `s` but `target` and `bad`.
  std::vector<int> Survivors(const Current& c, int s, int target, const std::set<int>& bad) const;
  void WritePayload(Current& c, uint64_t offset, const uint8_t* data, uint64_t bytes);
  void Throttle(uint64_t bytes);
  // Adds `bytes` (negative: takes back) to the rebuild's bytes_done.
  void Progress(int64_t bytes);

  Arena* const arena_;
  StepStore* const store_;
  ParityStore* const parity_;
  Protector* const protector_;
  const ec::Codec* const codec_;
  Executor* const fetches_;
  const Options options_;

  std::atomic<bool> stopping_{false};
  mutable absl::Mutex mu_;
  bool stop_requested_ ABSL_GUARDED_BY(mu_) = false;
  admin::RebuildStatus status_ ABSL_GUARDED_BY(mu_);
  Current* current_ ABSL_GUARDED_BY(mu_) = nullptr;  // the step being rebuilt
  bool running_ ABSL_GUARDED_BY(mu_) = false;         // a Run is in progress
  int serving_ ABSL_GUARDED_BY(mu_) = 0;              // on-demand decodes running
  // Group positions of holders that used up their tries again after a
  // transient failure, in this pass: not waited for again.
  std::set<int> unanswering_ ABSL_GUARDED_BY(mu_);
  absl::Time throttle_start_ ABSL_GUARDED_BY(mu_);
  uint64_t throttled_bytes_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace ecsnap::daemon

#endif  // ECSNAP_DAEMON_PEER_REBUILDER_H_
