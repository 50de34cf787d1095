#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| gorpc_proto::sim::targets::pair_ops(data));
