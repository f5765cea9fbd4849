//! `Authorization` headers and key-file lines: parsed or refused, never a panic; a parsed
//! record writes back to a line that parses to the same record.
#![no_main]

use kiln_codec::keys::{Record, is_key_id, parse_bearer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok((id, secret)) = parse_bearer(Some(text)) {
        assert!(is_key_id(id) && !secret.is_empty());
    }
    if let Some(record) = Record::parse_line(text) {
        assert_eq!(Record::parse_line(&record.to_line()), Some(record));
    }
});
