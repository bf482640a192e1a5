#!/usr/bin/env bash
# Writes the seed corpora of tests/fuzz from text-format messages, with
# protoc. Run from the repository root after changing a message; the seeds
# are checked in.
set -euo pipefail
cd "$(dirname "$0")/../.."
C=tests/fuzz/corpus
enc() { protoc -I. --encode="$1" "$2"; }
le64() { python3 -c "import struct,sys; sys.stdout.buffer.write(struct.pack('<Q', int(sys.argv[1])))" "$1"; }

manifest='tensors { name: "w" kind: PARAM dtype: FLOAT32 shape: 4 shape: 4 offset: 0 length: 64 crc32c: 1 }
tensors { name: "rng" kind: RNG dtype: BYTES offset: 64 length: 10 }'
{ le64 4096; enc ecsnap.v1.Manifest proto/snapshot.proto <<<"$manifest"; } >$C/manifest_fuzz/two_tensors
{ le64 70; enc ecsnap.v1.Manifest proto/snapshot.proto <<<"$manifest"; } >$C/manifest_fuzz/past_the_window
{ le64 64; enc ecsnap.v1.Manifest proto/snapshot.proto \
    <<<'tensors { name: "a" dtype: INT8 shape: -1 shape: -64 length: 64 }'; } >$C/manifest_fuzz/negative_shape

enc ecsnap.daemon.RankRecord daemon/store/store.proto >$C/rank_record_fuzz/committed <<EOT
job_id: "gpt" step: 7 rank: 1 local_ranks: 0 local_ranks: 1 window_offset: 65536
window_bytes: 74 window_extent_bytes: 4096 committed_unix_ms: 1700000000000
manifest { $manifest }
EOT
enc ecsnap.daemon.RankRecord daemon/store/store.proto >$C/rank_record_fuzz/too_big <<<'window_bytes: 8193 window_extent_bytes: 8192'

cat >$C/config_fuzz/four_slots <<'EOT'
cluster {
  slots { peer_address: "127.0.0.1:7101" failure_domain: "a" }
  slots { peer_address: "127.0.0.1:7102" failure_domain: "b" }
  slots { peer_address: "127.0.0.1:7103" failure_domain: "c" }
  slots { peer_address: "127.0.0.1:7104" failure_domain: "d" }
  k: 2 m: 2 peer_timeout_ms: 2000
}
daemon { arena_bytes: 268435456 retain: 2 plaintext: true trainer_uids: 1000 }
EOT
printf 'cluster { k: 4294967295 m: 4294967295 slots {} }\n' >$C/config_fuzz/huge_k_m
printf 'daemon { tls { cert_file: "c" } data_address: "0.0.0.0:1" }\n' >$C/config_fuzz/half_tls

inventory='slot: 1
steps {
  job_id: "gpt" step: 9 state: PROTECTED chunks: 1 chunks: 5 chunks: 9
  slots { slot: 0 payload_bytes: 100 chunk_crc32c: 1 chunk_crc32c: 2 }
  slots { slot: 1 payload_bytes: 0 }
  rows { job_id: "gpt" step: 9 stripe: 0 holder_slot: 2 row: 0 parity_bytes: 50 }
  rows { job_id: "gpt" step: 9 stripe: 7 holder_slot: 9 row: 5 parity_bytes: 1 }
}'
{ printf '\x05'; enc ecsnap.peer.InventoryResponse proto/peer.proto <<<"$inventory"; } \
  >$C/inventory_fuzz/rs22_one_step
ranks=$(enc ecsnap.daemon.SlotManifest daemon/store/store.proto \
  <<<'ranks { rank: 0 bytes: 9223372036854775808 } ranks { rank: 1 bytes: 9223372036854775808 }' |
  python3 -c 'import sys; print("".join("\\%03o" % b for b in sys.stdin.buffer.read()))')
{ printf '\x05'; enc ecsnap.peer.InventoryResponse proto/peer.proto \
    <<<"steps { job_id: \"j\" step: 1 slots { slot: 0 payload_bytes: 0 manifests: \"$ranks\" } }"; } \
  >$C/inventory_fuzz/ranks_that_overflow
echo "seeds written under $C"

# peer_message_fuzz: RS(2,1) with this slot at position 0 (first byte 1), then
# the kind (0 push header, 1 row notice, 2 job notice, 3 chunk read).
P=$C/peer_message_fuzz
mkdir -p $P
{ printf '\x01\x00'; enc ecsnap.peer.PushChunkHeader proto/peer.proto <<<'
id { job_id: "gpt" step: 7 stripe: 1 position: 0 } length: 1000 crc32c: 1
from { slot: 1 payload_bytes: 2000 chunk_crc32c: 1 chunk_crc32c: 2 }'; } >$P/push_to_the_parity_holder
{ printf '\x01\x00'; enc ecsnap.peer.PushChunkHeader proto/peer.proto <<<'
id { job_id: "gpt" step: 7 stripe: 1 position: 0 } length: 1152921504606846976 crc32c: 1
from { slot: 1 payload_bytes: 2000 chunk_crc32c: 1 chunk_crc32c: 2 }'; } >$P/push_of_2_to_the_60
{ printf '\x01\x01'; enc ecsnap.peer.StripeProtected proto/peer.proto <<<'
job_id: "gpt" step: 7 stripe: 1 holder_slot: 0 row: 0 parity_bytes: 1000'; } >$P/row_notice
{ printf '\x01\x02'; enc ecsnap.peer.JobNotice proto/peer.proto <<<'
job_id: "gpt" slot: 2 rewound_to: 3'; } >$P/rewind_notice
{ printf '\x01\x03'; enc ecsnap.peer.GetChunkRequest proto/peer.proto <<<'
id { job_id: "gpt" step: 7 stripe: 0 position: 0 } offset: 18446744073709551615 length: 5'; } >$P/read_past_the_end
