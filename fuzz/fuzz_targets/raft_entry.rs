#![no_main]
// The target is oxcd::fuzzing::raft_entry; CI runs the same function on mutated seeds for a bounded time.
libfuzzer_sys::fuzz_target!(|data: &[u8]| oxcd::fuzzing::raft_entry(data));
