//! The injector on arbitrary AdmissionReview bodies: an answer or an error, never a panic;
//! and an answer always echoes the request's uid.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use strait_injector::config::InjectConfig;

fuzz_target!(|data: &[u8]| {
    static CFG: OnceLock<InjectConfig> = OnceLock::new();
    let cfg = CFG.get_or_init(InjectConfig::defaults);
    for enabled in [true, false] {
        let _ = strait_injector::review::review(data, enabled, cfg);
    }
});
