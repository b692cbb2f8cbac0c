#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| cleanroom_tests::node_fuzz::node_requests(data));
