//! What a request or response must be to cross the proxy, checked once for every side: the
//! RFC's rules the HTTP library leaves to applications (Host, Transfer-Encoding) and the
//! header limits, each refused with the status the RFCs give and a `strait-proxy-error`
//! naming the rule or the setting.

use http::{HeaderMap, Request, Response, Version};

use super::error::ProxyError;

/// The HTTP library's own header-count ceiling: above the proxy's default limits, so that a
/// request past a limit gets the proxy's answer (naming the setting), not a bare 431. Limits
/// are capped to it. (It sizes a per-message parse buffer of 48 bytes per header.)
pub const LIBRARY_MAX_HEADERS: usize = 1024;

/// Header limits (`STRAIT_MAX_REQUEST_HEADERS`, `STRAIT_MAX_RESPONSE_HEADERS`,
/// `STRAIT_MAX_HEADER_BYTES`). The defaults are above nginx's (no count limit, 4 x 8 KiB of
/// request headers) and hyper's (100 headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_request_headers: usize,
    pub max_response_headers: usize,
    /// Total size of a header section: names, values and 4 bytes each (`: ` and CRLF).
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_headers: 500,
            max_response_headers: 500,
            max_header_bytes: 64 * 1024,
        }
    }
}

impl Limits {
    /// HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE` that carries any section within the limits
    /// (it counts 32 bytes of overhead per field).
    pub fn h2_header_list_size(&self) -> u32 {
        let fields = self.max_request_headers.max(self.max_response_headers);
        u32::try_from(self.max_header_bytes + fields * 32).unwrap_or(u32::MAX)
    }
}

fn section_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

/// Checks a request before it is forwarded.
pub fn check_request<B>(req: &Request<B>, limits: &Limits) -> Result<(), ProxyError> {
    let headers = req.headers();
    if req.version() == Version::HTTP_11 && !headers.contains_key(http::header::HOST) {
        return Err(ProxyError::BadRequest(
            "the request has no Host header, which HTTP/1.1 requires (RFC 9112 section 3.2)".into(),
        ));
    }
    let mut codings: Vec<String> = Vec::new();
    for value in headers.get_all(http::header::TRANSFER_ENCODING) {
        let Ok(value) = value.to_str() else {
            return Err(ProxyError::BadRequest(
                "the Transfer-Encoding header is not text".into(),
            ));
        };
        codings.extend(
            value
                .split(',')
                .map(|c| c.trim().to_ascii_lowercase())
                .filter(|c| !c.is_empty()),
        );
    }
    if let Some(other) = codings.iter().find(|c| *c != "chunked") {
        return Err(ProxyError::NotImplemented(format!(
            "Transfer-Encoding {other} is not supported (only chunked)"
        )));
    }
    if codings.len() > 1 {
        return Err(ProxyError::BadRequest(
            "Transfer-Encoding names chunked more than once (RFC 9112 section 6.1)".into(),
        ));
    }
    check_section(
        headers,
        (limits.max_request_headers, "STRAIT_MAX_REQUEST_HEADERS"),
        limits.max_header_bytes,
        false,
    )
}

/// Checks an upstream's response before it is returned.
pub fn check_response<B>(resp: &Response<B>, limits: &Limits) -> Result<(), ProxyError> {
    check_section(
        resp.headers(),
        (limits.max_response_headers, "STRAIT_MAX_RESPONSE_HEADERS"),
        limits.max_header_bytes,
        true,
    )
}

/// The count and size limits of one header section (a request's, or a response's).
fn check_section(
    headers: &HeaderMap,
    (max_count, count_setting): (usize, &'static str),
    max_bytes: usize,
    response: bool,
) -> Result<(), ProxyError> {
    let whose = if response {
        "the upstream's response"
    } else {
        "the request"
    };
    if headers.len() > max_count {
        return Err(ProxyError::HeadersTooLarge {
            what: format!("{whose} has {} headers", headers.len()),
            setting: count_setting,
            limit: max_count,
            response,
        });
    }
    let bytes = section_bytes(headers);
    if bytes > max_bytes {
        return Err(ProxyError::HeadersTooLarge {
            what: format!("{whose} headers are {bytes} bytes"),
            setting: "STRAIT_MAX_HEADER_BYTES",
            limit: max_bytes,
            response,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(version: Version, headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().uri("/").version(version);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).expect("request")
    }

    #[test]
    fn host_is_required_of_http_1_1_only() {
        let l = Limits::default();
        let e = check_request(&request(Version::HTTP_11, &[]), &l).expect_err("no host");
        assert_eq!(e.status(), 400);
        assert!(e.to_string().contains("no Host header"));
        assert!(check_request(&request(Version::HTTP_10, &[]), &l).is_ok());
        assert!(check_request(&request(Version::HTTP_2, &[]), &l).is_ok());
        assert!(check_request(&request(Version::HTTP_11, &[("host", "x")]), &l).is_ok());
    }

    #[test]
    fn only_a_single_chunked_transfer_coding_passes() {
        let l = Limits::default();
        let te = |v: &str| request(Version::HTTP_11, &[("host", "x"), ("transfer-encoding", v)]);
        assert!(check_request(&te("chunked"), &l).is_ok());
        assert!(check_request(&te("Chunked"), &l).is_ok());
        assert_eq!(
            check_request(&te("gzip, chunked"), &l)
                .expect_err("gzip")
                .status(),
            501
        );
        assert_eq!(
            check_request(&te("chunked, gzip"), &l)
                .expect_err("gzip")
                .status(),
            501
        );
        assert_eq!(
            check_request(&te("chunked, chunked"), &l)
                .expect_err("twice")
                .status(),
            400
        );
    }

    #[test]
    fn header_limits_name_their_setting() {
        let l = Limits {
            max_request_headers: 3,
            max_response_headers: 2,
            max_header_bytes: 100,
        };
        let many = request(
            Version::HTTP_11,
            &[("host", "x"), ("a", "1"), ("b", "2"), ("c", "3")],
        );
        let e = check_request(&many, &l).expect_err("too many");
        assert_eq!(e.status(), 431);
        assert!(e.to_string().contains("STRAIT_MAX_REQUEST_HEADERS"), "{e}");
        let big = request(Version::HTTP_11, &[("host", "x"), ("a", &"x".repeat(200))]);
        let e = check_request(&big, &l).expect_err("too big");
        assert!(e.to_string().contains("STRAIT_MAX_HEADER_BYTES"), "{e}");
        let mut resp = Response::new(());
        for h in ["a", "b", "c"] {
            resp.headers_mut().insert(h, "1".parse().expect("value"));
        }
        let e = check_response(&resp, &l).expect_err("too many");
        assert_eq!(e.status(), 502);
        assert!(e.to_string().contains("STRAIT_MAX_RESPONSE_HEADERS"), "{e}");
    }
}
