#![no_main]
// The target is oxcd::fuzzing::peer_message; CI runs the same function on mutated seeds for a bounded time.
libfuzzer_sys::fuzz_target!(|data: &[u8]| oxcd::fuzzing::peer_message(data));
