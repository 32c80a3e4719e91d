//! Protocol detection on arbitrary first bytes: never panics, and a decision never changes
//! when more bytes arrive (what was decided on a prefix stays decided).
#![no_main]
use libfuzzer_sys::fuzz_target;
use strait_proxy::detect::classify;

fuzz_target!(|data: &[u8]| {
    let whole = classify(data);
    for cut in [1, 2, 5, 16, 24, 64] {
        if cut < data.len() {
            if let Some(early) = classify(&data[..cut]) {
                assert_eq!(Some(early), whole, "decided on {cut} bytes, then changed");
            }
        }
    }
});
