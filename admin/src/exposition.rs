//! `/metrics` in the format the scraper asks for. The registries write OpenMetrics text; a
//! scraper that does not accept it (`promtool check metrics`, older Prometheus, curl) gets the
//! Prometheus text format 0.0.4, where a counter family is typed under its sample name
//! (`strait_request_total`), and there is no `# EOF`, `# UNIT` or exemplar.

/// The content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format.
pub const TEXT_0_0_4: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The body and content type for a request whose `Accept` header is `accept`.
pub fn negotiate(openmetrics: String, accept: Option<&str>) -> (&'static str, String) {
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        (OPENMETRICS, openmetrics)
    } else {
        (TEXT_0_0_4, to_text_0_0_4(&openmetrics))
    }
}

/// OpenMetrics text as Prometheus text 0.0.4.
pub fn to_text_0_0_4(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                out.push_str(prefix);
                out.push_str(&name);
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None if line.starts_with('#') => out.push_str(line),
            // A sample: its exemplar (` # {...} value`) is OpenMetrics only.
            None => out.push_str(line.split_once(" # {").map_or(line, |(sample, _)| sample)),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const OM: &str = "# HELP strait_request HTTP requests received.\n\
                      # TYPE strait_request counter\n\
                      strait_request_total{direction=\"inbound\"} 3 # {trace_id=\"ab\"} 1.0\n\
                      # HELP strait_open TCP connections open now.\n\
                      # TYPE strait_open gauge\n\
                      strait_open 2\n\
                      # UNIT strait_latency_seconds seconds\n\
                      # EOF\n";

    #[test]
    fn counters_are_typed_under_their_sample_name_in_text_0_0_4() {
        let text = to_text_0_0_4(OM);
        assert!(text.contains("# HELP strait_request_total HTTP requests received.\n"));
        assert!(text.contains("# TYPE strait_request_total counter\n"));
        assert!(text.contains("strait_request_total{direction=\"inbound\"} 3\n"));
        assert!(text.contains("# TYPE strait_open gauge\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT") && !text.contains("trace_id"));
    }

    #[test]
    fn the_accept_header_chooses() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(OM.into(), Some(prometheus)).0, OPENMETRICS);
        assert_eq!(negotiate(OM.into(), None).0, TEXT_0_0_4);
        assert_eq!(negotiate(OM.into(), Some("*/*")).0, TEXT_0_0_4);
    }
}
