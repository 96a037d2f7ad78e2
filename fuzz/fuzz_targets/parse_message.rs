//! Any queue message text: the parser returns a notification or an error, never panics, and
//! the history row for either outcome can be built.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    cvchain_core::fuzzing::message(data);
});
