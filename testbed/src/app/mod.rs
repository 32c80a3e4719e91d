//! The test workloads behind `strait-testapp`.

pub mod grpc;
pub mod http;
pub mod load;
pub mod otlp;
pub mod tcp;

/// The byte at offset `i` of `/bytes/N` bodies: tests compute the same checksum.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

/// `n` bytes of the `/bytes/N` pattern.
pub fn pattern(n: u64) -> Vec<u8> {
    (0..n).map(pattern_byte).collect()
}
