//! Query parameters whose values are secrets (tokens, signatures, passwords) are written
//! `name=REDACTED` in the access log and in spans; the list is `STRAIT_ACCESS_LOG_REDACT`.

use std::borrow::Cow;
use std::sync::Arc;

/// The default list: OAuth and API tokens, passwords, and the signed-URL parameters of the
/// big object stores (S3, GCS, Azure).
pub const DEFAULT: &str = "token,access_token,id_token,refresh_token,code,auth,password,passwd,secret,client_secret,api_key,apikey,key,sig,signature,x-amz-signature,x-amz-credential,x-amz-security-token,x-goog-signature,x-goog-credential";

/// What a redacted value becomes.
pub const REDACTED: &str = "REDACTED";

/// The parameter names to redact, compared without regard to case.
#[derive(Debug, Clone, Default)]
pub struct Redact(Arc<[String]>);

impl Redact {
    /// A comma-separated list of names (empty: redact nothing).
    pub fn parse(list: &str) -> Result<Self, String> {
        let names: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_ascii_lowercase)
            .collect();
        if let Some(bad) = names.iter().find(|n| n.contains(['=', '&', '?', '#', ' '])) {
            return Err(format!("{bad:?} is not a query parameter name"));
        }
        Ok(Self(names.into()))
    }

    fn secret(&self, name: &str) -> bool {
        self.0.iter().any(|n| n.eq_ignore_ascii_case(name))
    }

    /// `path_and_query` with every listed parameter's value replaced; borrowed when nothing is
    /// listed or nothing matches (the common case costs no allocation).
    pub fn apply<'a>(&self, path_and_query: &'a str) -> Cow<'a, str> {
        let Some((path, query)) = path_and_query.split_once('?') else {
            return Cow::Borrowed(path_and_query);
        };
        match self.query(query) {
            Cow::Borrowed(_) => Cow::Borrowed(path_and_query),
            Cow::Owned(q) => Cow::Owned(format!("{path}?{q}")),
        }
    }

    /// A query string with every listed parameter's value replaced.
    pub fn query<'a>(&self, query: &'a str) -> Cow<'a, str> {
        let name_of = |pair: &str| pair.split_once('=').map_or(pair, |(n, _)| n).to_owned();
        let matches = |pair: &str| {
            let name = name_of(pair);
            self.secret(&name) || self.secret(&percent_decode(&name))
        };
        if self.0.is_empty() || !query.split('&').any(|p| p.contains('=') && matches(p)) {
            return Cow::Borrowed(query);
        }
        let pairs: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((name, _)) if matches(p) => format!("{name}={REDACTED}"),
                _ => p.to_owned(),
            })
            .collect();
        Cow::Owned(pairs.join("&"))
    }
}

/// `%XX` escapes decoded (an invalid escape is kept as written).
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_redacted_and_the_rest_kept_as_written() {
        let r = Redact::parse(DEFAULT).expect("the default list");
        assert_eq!(
            r.apply("/download?file=a.txt&X-Amz-Signature=abc123&sig=zz&Token=t"),
            "/download?file=a.txt&X-Amz-Signature=REDACTED&sig=REDACTED&Token=REDACTED"
        );
        assert_eq!(
            r.apply("/cb?acc%65ss_token=x&state=1"),
            "/cb?acc%65ss_token=REDACTED&state=1"
        );
        assert!(matches!(r.apply("/plain?page=2&q=token"), Cow::Borrowed(_)));
        assert!(matches!(r.apply("/no-query"), Cow::Borrowed(_)));
        // A name without a value has nothing to hide.
        assert_eq!(r.apply("/x?token"), "/x?token");
    }

    #[test]
    fn the_list_is_a_setting() {
        let none = Redact::parse("").expect("empty");
        assert_eq!(none.apply("/x?token=t"), "/x?token=t");
        let own = Redact::parse(" session , Ticket").expect("a list");
        assert_eq!(
            own.apply("/x?ticket=1&token=2"),
            "/x?ticket=REDACTED&token=2"
        );
        assert!(Redact::parse("a=b").is_err());
    }
}
