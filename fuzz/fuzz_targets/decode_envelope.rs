//! Any invocation body: the envelope decoder, then the message parser on what it yields.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cvchain_core::fuzzing::envelope(data);
});
