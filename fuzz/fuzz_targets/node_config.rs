#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cleanroom_tests::fuzz::node_config(data));
