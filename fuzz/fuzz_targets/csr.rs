//! The CA's CSR validation on arbitrary bytes: refuses what it cannot check, never panics,
//! and never signs anything but the caller's own single URI SAN.
#![no_main]
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use strait_identity::ca::{generate, spiffe_ids, CertificateAuthority};
use strait_identity::SpiffeId;

fn ca() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| {
        let g = generate(
            "cluster.local",
            Duration::from_secs(86400),
            Duration::from_secs(3600),
        )
        .expect("a CA");
        CertificateAuthority::from_pem(&g.issuer_cert_pem, &g.issuer_key_pem).expect("load")
    })
}

fuzz_target!(|data: &[u8]| {
    let caller = SpiffeId::new("cluster.local", "shop", "web").expect("id");
    if let Ok(signed) = ca().sign_csr(data, &caller, Duration::from_secs(60)) {
        assert_eq!(spiffe_ids(&signed.leaf_der), [caller.to_string()]);
    }
});
