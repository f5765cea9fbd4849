//! What a registry answers with and what a config names: a manifest is read or refused, never
//! a panic, and a reference that reads writes back to itself.
#![no_main]

use kiln_codec::oci::{HandlerManifest, OciRef, parse_digest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = HandlerManifest::parse(data) {
        assert!(parse_digest(&manifest.component.digest).is_ok());
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(reference) = OciRef::parse(text)
    {
        assert_eq!(OciRef::parse(&reference.to_string()), Ok(reference));
    }
});
