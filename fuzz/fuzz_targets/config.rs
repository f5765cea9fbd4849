//! Config text: parsed into its tables or refused with a line and column, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Err(message) = kiln_codec::config::parse(text) {
        assert!(!message.is_empty());
    }
});
