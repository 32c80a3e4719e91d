//! Golden signals from the proxies' Prometheus text: requests per second, success rate, and
//! latency quantiles, computed from the difference between two scrapes.

use std::collections::BTreeMap;

/// Cumulative counters of one target, as scraped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetCounters {
    pub success: f64,
    pub failure: f64,
    /// Responses that came over mTLS (`tls="true"`).
    pub tls: f64,
    /// Responses by the server's SPIFFE ID.
    pub server_ids: BTreeMap<String, f64>,
    /// (upper bound in seconds, cumulative count), ascending; the last is +Inf.
    pub buckets: Vec<(f64, f64)>,
}

/// Counters by the grouping label (`target` unless asked otherwise) of one direction.
pub type Scrape = BTreeMap<String, TargetCounters>;

/// Adds `other` (another proxy's scrape) into `into`.
pub fn merge(into: &mut Scrape, other: Scrape) {
    for (key, c) in other {
        let e = into.entry(key).or_default();
        e.success += c.success;
        e.failure += c.failure;
        e.tls += c.tls;
        for (id, n) in c.server_ids {
            *e.server_ids.entry(id).or_default() += n;
        }
        e.buckets.extend(c.buckets);
        e.buckets = merge_buckets(std::mem::take(&mut e.buckets));
    }
}

/// Sorts buckets and sums those with the same bound (series of several routes or proxies).
fn merge_buckets(mut buckets: Vec<(f64, f64)>) -> Vec<(f64, f64)> {
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(buckets.len());
    for (le, count) in buckets {
        match out.last_mut() {
            Some(last) if last.0 == le => last.1 += count,
            _ => out.push((le, count)),
        }
    }
    out
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    // `name="` at the start or after a comma: `workload` is not the end of `src_workload`.
    let key = format!("{name}=\"");
    let at = labels
        .match_indices(&key)
        .find(|(i, _)| *i == 0 || labels.as_bytes()[i - 1] == b',')?;
    let start = at.0 + key.len();
    let end = labels[start..].find('"')?;
    Some(&labels[start..start + end])
}

/// Parses the `strait_response_total` and latency buckets of `direction`, by `target`.
/// Whether `text` is a whole exposition: the proxies' ends with `# EOF`. A cut one (a timeout
/// mid-body) would make counters seem to go back, and rates wrong.
pub fn is_complete(text: &str) -> bool {
    text.trim_end().ends_with("# EOF")
}

pub fn parse(text: &str, direction: &str) -> Scrape {
    parse_by(text, direction, "target")
}

/// As [`parse`], grouped by label `by` (series without it are left out; the latency histogram
/// only has `target`, `route` and `backend`).
pub fn parse_by(text: &str, direction: &str, by: &str) -> Scrape {
    let mut out = Scrape::new();
    for line in text.lines() {
        // An exemplar (` # {trace_id="..."} value`, OpenMetrics) is not the sample's value.
        let line = line.split_once(" # {").map_or(line, |(sample, _)| sample);
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        if label(labels, "direction") != Some(direction) {
            continue;
        }
        let Some(target) = label(labels, by) else {
            continue;
        };
        let entry = out.entry(target.to_string()).or_default();
        match name {
            "strait_response_total" => {
                match label(labels, "classification") {
                    Some("success") => entry.success += value,
                    Some(_) => entry.failure += value,
                    None => {}
                }
                if label(labels, "tls") == Some("true") {
                    entry.tls += value;
                }
                if let Some(id) = label(labels, "server_id").filter(|id| !id.is_empty()) {
                    *entry.server_ids.entry(id.to_string()).or_default() += value;
                }
            }
            "strait_response_latency_seconds_bucket" => {
                let le = match label(labels, "le") {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => le.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                entry.buckets.push((le, value));
            }
            _ => {}
        }
    }
    for c in out.values_mut() {
        c.buckets = merge_buckets(std::mem::take(&mut c.buckets));
    }
    out
}

/// One row of the live table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub target: String,
    pub rps: f64,
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Share of the interval's responses that came over mTLS.
    pub mtls: Option<f64>,
    /// The server identity that answered most of them.
    pub server_id: Option<String>,
}

/// Rows for the interval between `before` and `after`, `seconds` apart.
pub fn rows(before: &Scrape, after: &Scrape, seconds: f64) -> Vec<Row> {
    after
        .iter()
        // A target that never had a response (a counter registered ahead) is no row.
        .filter(|(_, now)| now.success + now.failure > 0.0)
        .map(|(target, now)| {
            let mut prev = before.get(target).cloned().unwrap_or_default();
            // A counter that went down was reset (a proxy restarted): count from zero, as
            // Prometheus' rate() does, never a negative rate.
            let reset = now.success < prev.success
                || now.failure < prev.failure
                || now.tls < prev.tls
                || now
                    .buckets
                    .iter()
                    .any(|(le, c)| prev.buckets.iter().any(|(l, p)| l == le && p > c));
            if reset {
                prev = Default::default();
            }
            let ok = now.success - prev.success;
            let failed = now.failure - prev.failure;
            let total = ok + failed;
            let deltas: Vec<(f64, f64)> = now
                .buckets
                .iter()
                .map(|(le, c)| {
                    let p = prev
                        .buckets
                        .iter()
                        .find(|(l, _)| l == le)
                        .map_or(0.0, |(_, c)| *c);
                    (*le, c - p)
                })
                .collect();
            let tls = now.tls - prev.tls;
            let server_id = now
                .server_ids
                .iter()
                .map(|(id, n)| (id, n - prev.server_ids.get(id).copied().unwrap_or(0.0)))
                .filter(|(_, n)| *n > 0.0)
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(id, _)| id.clone());
            Row {
                target: target.clone(),
                rps: total / seconds.max(1e-9),
                success_rate: (total > 0.0).then(|| ok / total),
                mtls: (total > 0.0).then(|| (tls / total).clamp(0.0, 1.0)),
                server_id,
                p50_ms: quantile(&deltas, 0.5).map(|s| s * 1000.0),
                p95_ms: quantile(&deltas, 0.95).map(|s| s * 1000.0),
                p99_ms: quantile(&deltas, 0.99).map(|s| s * 1000.0),
            }
        })
        .collect()
}

/// The `q` quantile of cumulative buckets, interpolated linearly inside the bucket (as
/// Prometheus' `histogram_quantile` does).
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let inside = count - prev.1;
            let frac = if inside > 0.0 {
                (rank - prev.1) / inside
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, count);
    }
    Some(prev.0)
}

/// The table as text; the first column titled `title` (what the rows are by), as wide as its
/// longest name.
pub fn render(rows: &[Row], title: &str) -> String {
    let fmt = |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v:.1}{unit}"));
    let w = rows
        .iter()
        .map(|r| r.target.chars().count())
        .chain([title.len(), 20])
        .max()
        .unwrap_or(20);
    let mut out = format!(
        "{:<w$} {:>8} {:>9} {:>9} {:>9} {:>9} {:>7}  {}\n",
        title, "RPS", "SUCCESS", "P50", "P95", "P99", "MTLS", "SERVER ID"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<w$} {:>8.1} {:>9} {:>9} {:>9} {:>9} {:>7}  {}\n",
            r.target,
            r.rps,
            fmt(r.success_rate.map(|s| s * 100.0), "%"),
            fmt(r.p50_ms, "ms"),
            fmt(r.p95_ms, "ms"),
            fmt(r.p99_ms, "ms"),
            r.mtls
                .map_or("-".to_string(), |m| format!("{:.0}%", m * 100.0)),
            r.server_id.as_deref().unwrap_or("-"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = r#"strait_response_total{direction="outbound",target="web:80",status_code="200",classification="success",error=""} 10
strait_response_latency_seconds_bucket{le="0.001",direction="outbound",target="web:80"} 0
strait_response_latency_seconds_bucket{le="0.002",direction="outbound",target="web:80"} 10
strait_response_latency_seconds_bucket{le="+Inf",direction="outbound",target="web:80"} 10
strait_response_total{direction="inbound",target="8080",status_code="200",classification="success",error=""} 99
"#;
    const B: &str = r#"strait_response_total{direction="outbound",target="web:80",status_code="200",classification="success",error=""} 28
strait_response_total{direction="outbound",target="web:80",status_code="500",classification="failure",error=""} 2
strait_response_latency_seconds_bucket{le="0.001",direction="outbound",target="web:80"} 10
strait_response_latency_seconds_bucket{le="0.002",direction="outbound",target="web:80"} 28
strait_response_latency_seconds_bucket{le="+Inf",direction="outbound",target="web:80"} 30
"#;

    #[test]
    fn rows_come_from_the_difference_of_two_scrapes() {
        let rows = rows(&parse(A, "outbound"), &parse(B, "outbound"), 2.0);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.target, "web:80");
        assert!((r.rps - 10.0).abs() < 1e-9);
        assert!((r.success_rate.expect("traffic") - 0.9).abs() < 1e-9);
        // 10 of 20 new samples are under 1 ms: the median sits at the first bucket's edge.
        assert!((r.p50_ms.expect("p50") - 1.0).abs() < 1e-6, "{r:?}");
        // 2 samples above 2 ms (in +Inf): p99 is reported at the highest finite bound.
        assert!((r.p99_ms.expect("p99") - 2.0).abs() < 1e-6, "{r:?}");
        assert!(render(&rows, "SERVICE").contains("90.0%"));
    }

    #[test]
    fn a_label_is_found_by_its_whole_name() {
        let text = r#"strait_response_total{direction="outbound",target="web:80",dst_workload="web",src_workload="client",classification="success"} 4
"#;
        let by = parse_by(text, "outbound", "workload");
        assert!(by.is_empty(), "{by:?}");
        let by = parse_by(text, "outbound", "dst_workload");
        assert_eq!(by.keys().collect::<Vec<_>>(), ["web"]);
        let by = parse_by(text, "outbound", "src_workload");
        assert_eq!(by.keys().collect::<Vec<_>>(), ["client"]);
    }

    #[test]
    fn exemplars_are_not_values() {
        let with = B.replace(
            "target=\"web:80\"} 28\n",
            "target=\"web:80\"} 28 # {trace_id=\"4bf9\"} 0.0015\n",
        );
        assert_ne!(with, B);
        assert_eq!(parse(&with, "outbound"), parse(B, "outbound"));
    }

    #[test]
    fn a_reset_counter_counts_from_zero_never_negative() {
        // The proxy restarted between the reads: its counters start again below the last read.
        let rows = rows(&parse(B, "outbound"), &parse(A, "outbound"), 1.0);
        assert_eq!(rows.len(), 1);
        assert!((rows[0].rps - 10.0).abs() < 1e-9, "{rows:?}");
        assert_eq!(rows[0].success_rate, Some(1.0));
    }

    #[test]
    fn the_first_column_is_titled_by_what_rows_are_and_fits_the_longest_name() {
        let long = "spiffe://cluster.local/ns/payments-production/sa/checkout-service-account";
        let row = |t: &str| Row {
            target: t.to_string(),
            rps: 1.0,
            success_rate: Some(1.0),
            p50_ms: None,
            p95_ms: None,
            p99_ms: None,
            mtls: None,
            server_id: None,
        };
        let table = render(
            &[row(long), row("spiffe://cluster.local/ns/a/sa/b")],
            "CLIENT ID",
        );
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("CLIENT ID "), "{table}");
        // Every row's RPS column starts where the title's does.
        let col = lines[0].find("     RPS").expect("RPS");
        for l in &lines[1..] {
            assert_eq!(l.find(" 1.0").map(|i| i + 4), Some(col + 8), "{table}");
        }
    }

    #[test]
    fn scrapes_of_several_proxies_and_routes_add_up() {
        // Two backends of one target: their buckets are summed per bound, not listed twice.
        let one = r#"strait_response_total{direction="outbound",target="web:80",backend="v1",classification="success"} 3
strait_response_total{direction="outbound",target="web:80",backend="v2",classification="failure"} 1
strait_response_latency_seconds_bucket{le="0.001",direction="outbound",target="web:80",backend="v1"} 3
strait_response_latency_seconds_bucket{le="+Inf",direction="outbound",target="web:80",backend="v1"} 3
strait_response_latency_seconds_bucket{le="0.001",direction="outbound",target="web:80",backend="v2"} 0
strait_response_latency_seconds_bucket{le="+Inf",direction="outbound",target="web:80",backend="v2"} 1
"#;
        let mut total = parse(one, "outbound");
        assert_eq!(
            total["web:80"].buckets,
            vec![(0.001, 3.0), (f64::INFINITY, 4.0)]
        );
        merge(&mut total, parse(one, "outbound"));
        let web = &total["web:80"];
        assert_eq!((web.success, web.failure), (6.0, 2.0));
        assert_eq!(web.buckets, vec![(0.001, 6.0), (f64::INFINITY, 8.0)]);
        let by_backend = parse_by(one, "outbound", "backend");
        assert_eq!(by_backend.keys().collect::<Vec<_>>(), ["v1", "v2"]);
        assert_eq!(by_backend["v2"].failure, 1.0);
    }

    #[test]
    fn only_whole_expositions_are_complete() {
        assert!(is_complete(&format!("{B}# EOF\n")));
        assert!(!is_complete(B));
        assert!(!is_complete(""));
    }

    #[test]
    fn quantiles_interpolate_and_handle_empty_histograms() {
        assert_eq!(quantile(&[], 0.5), None);
        assert_eq!(quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
        let q = quantile(&[(1.0, 0.0), (3.0, 4.0), (f64::INFINITY, 4.0)], 0.5).expect("q");
        assert!((q - 2.0).abs() < 1e-9);
    }

    #[test]
    fn rows_show_the_mtls_share_and_the_main_server_identity() {
        let before = r#"strait_response_total{direction="outbound",target="web:80",tls="true",server_id="spiffe://cluster.local/ns/demo/sa/web",classification="success"} 10
strait_request_total{direction="outbound",target="passthrough"} 0
"#;
        let after = r#"strait_response_total{direction="outbound",target="web:80",tls="true",server_id="spiffe://cluster.local/ns/demo/sa/web",classification="success"} 28
strait_response_total{direction="outbound",target="web:80",tls="false",server_id="",classification="success"} 2
strait_request_total{direction="outbound",target="passthrough"} 0
"#;
        let rows = rows(&parse(before, "outbound"), &parse(after, "outbound"), 1.0);
        assert_eq!(
            rows.len(),
            1,
            "no row for a target without responses: {rows:?}"
        );
        assert_eq!(rows[0].mtls, Some(0.9));
        assert_eq!(
            rows[0].server_id.as_deref(),
            Some("spiffe://cluster.local/ns/demo/sa/web")
        );
        let table = render(&rows, "SERVICE");
        assert!(
            table.contains("90%") && table.contains("SERVER ID"),
            "{table}"
        );
    }
}
