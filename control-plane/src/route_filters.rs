//! HTTPRoute filters (Gateway API, GAMMA), turned into what proxies apply. A filter that cannot
//! be applied as written is never skipped: its rule answers 500, and the route's status says
//! why (`Accepted: False, UnsupportedValue` for an unsupported or invalid filter,
//! `ResolvedRefs: False` for an ExtensionRef that does not resolve).
//!
//! Supported: RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite,
//! RequestMirror (on rules; all but RequestRedirect on backendRefs too), and ExtensionRef to a
//! `policy.strait.io/v1alpha1` HTTPFault (on rules).

use strait_api::discovery::{
    filter, path_modifier, Backend, Fault, Filter, Header, HeaderModifier, PathModifier,
    RequestMirror, RequestRedirect, Route, UrlRewrite,
};

use crate::resources::{HeaderModifierSpec, HttpFault, PathModifierSpec, RouteFilter};

/// The group of Strait's own filter kinds.
pub const POLICY_GROUP: &str = "policy.strait.io";

/// Which route condition a problem turns False.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Accepted,
    ResolvedRefs,
}

/// Why a rule's filters cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub condition: Condition,
    /// The Gateway API reason: `UnsupportedValue`, `InvalidKind`, `BackendNotFound`.
    pub reason: &'static str,
    pub message: String,
}

impl Problem {
    fn unsupported(message: String) -> Self {
        Self {
            condition: Condition::Accepted,
            reason: "UnsupportedValue",
            message,
        }
    }
}

/// Where filters are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Rule,
    Backend,
}

/// What translating a rule's filters needs: its backend resolution (for mirrors) and the
/// HTTPFaults of the mesh.
pub struct Context<'a> {
    pub route_ns: &'a str,
    pub backend: &'a dyn Fn(&crate::resources::BackendRef) -> Backend,
    pub fault: &'a dyn Fn(&str, &str) -> Option<&'a HttpFault>,
}

fn modifier(m: &HeaderModifierSpec) -> HeaderModifier {
    let header = |h: &crate::resources::HeaderValueSpec| Header {
        name: h.name.to_ascii_lowercase(),
        value: h.value.clone(),
    };
    HeaderModifier {
        set: m.set.iter().map(header).collect(),
        add: m.add.iter().map(header).collect(),
        remove: m.remove.iter().map(|r| r.to_ascii_lowercase()).collect(),
    }
}

fn path(p: &PathModifierSpec, filter: &str) -> Result<PathModifier, Problem> {
    let kind = match (
        p.type_.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(full), _) => path_modifier::Kind::Full(full.clone()),
        ("ReplacePrefixMatch", _, Some(prefix)) => path_modifier::Kind::Prefix(prefix.clone()),
        (t, ..) => {
            return Err(Problem::unsupported(format!(
                "{filter}: path type {t:?} needs its value (replaceFullPath / replacePrefixMatch)"
            )))
        }
    };
    Ok(PathModifier { kind: Some(kind) })
}

/// Percent 0-100 (fractions allowed) to permille, checked.
fn permille(p: f64, what: &str) -> Result<u32, Problem> {
    if !(0.0..=100.0).contains(&p) {
        return Err(Problem::unsupported(format!(
            "{what} percentage {p} is not 0-100"
        )));
    }
    Ok((p * 10.0).round() as u32)
}

fn fault(f: &HttpFault) -> Result<Fault, Problem> {
    let name = format!("HTTPFault {}/{}", f.metadata.namespace, f.metadata.name);
    let mut out = Fault::default();
    if let Some(d) = &f.spec.delay {
        let delay = humantime::parse_duration(&d.fixed_delay).map_err(|e| {
            Problem::unsupported(format!("{name}: delay.fixedDelay {:?}: {e}", d.fixed_delay))
        })?;
        out.delay_ms = delay.as_millis() as u64;
        out.delay_permille = permille(d.percentage, &format!("{name}: delay"))?;
    }
    if let Some(a) = &f.spec.abort {
        let status = a.http_status.unwrap_or(503);
        if !(200..600).contains(&status) {
            return Err(Problem::unsupported(format!(
                "{name}: abort.httpStatus {status} is not 200-599"
            )));
        }
        if let Some(g) = a.grpc_status.filter(|g| !(1..=16).contains(g)) {
            return Err(Problem::unsupported(format!(
                "{name}: abort.grpcStatus {g} is not 1-16"
            )));
        }
        out.abort_status = status;
        out.abort_grpc_status = a.grpc_status.unwrap_or(0);
        out.abort_permille = permille(a.percentage, &format!("{name}: abort"))?;
    }
    Ok(out)
}

/// The filters of a rule (or a backendRef), in the order written.
pub fn translate(
    filters: &[RouteFilter],
    place: Place,
    cx: &Context<'_>,
) -> Result<Vec<Filter>, Problem> {
    let mut out = Vec::with_capacity(filters.len());
    for f in filters {
        let missing = || {
            Problem::unsupported(format!(
                "filter {} has no {} field",
                f.type_,
                field_of(&f.type_)
            ))
        };
        let kind = match f.type_.as_str() {
            "RequestHeaderModifier" => filter::Kind::RequestHeaderModifier(modifier(
                f.request_header_modifier.as_ref().ok_or_else(missing)?,
            )),
            "ResponseHeaderModifier" => filter::Kind::ResponseHeaderModifier(modifier(
                f.response_header_modifier.as_ref().ok_or_else(missing)?,
            )),
            "RequestRedirect" => {
                if place == Place::Backend {
                    return Err(Problem::unsupported("RequestRedirect is not allowed on a backendRef".into()));
                }
                let r = f.request_redirect.as_ref().ok_or_else(missing)?;
                filter::Kind::RequestRedirect(RequestRedirect {
                    scheme: r.scheme.clone().unwrap_or_default(),
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r.path.as_ref().map(|p| path(p, "RequestRedirect")).transpose()?,
                    port: r.port.unwrap_or(0),
                    status_code: r.status_code.unwrap_or(0),
                    matched_prefix: String::new(),
                })
            }
            "URLRewrite" => {
                let r = f.url_rewrite.as_ref().ok_or_else(missing)?;
                filter::Kind::UrlRewrite(UrlRewrite {
                    hostname: r.hostname.clone().unwrap_or_default(),
                    path: r.path.as_ref().map(|p| path(p, "URLRewrite")).transpose()?,
                    matched_prefix: String::new(),
                })
            }
            "RequestMirror" => {
                let m = f.request_mirror.as_ref().ok_or_else(missing)?;
                let (numerator, denominator) = match (&m.percent, &m.fraction) {
                    (Some(p), _) => (*p.min(&100), 100),
                    (None, Some(fr)) => {
                        let d = fr.denominator.unwrap_or(100);
                        if d == 0 || fr.numerator > d {
                            return Err(Problem::unsupported(format!(
                                "RequestMirror: fraction {}/{d} is not a share",
                                fr.numerator
                            )));
                        }
                        (fr.numerator, d)
                    }
                    (None, None) => (0, 0),
                };
                filter::Kind::RequestMirror(RequestMirror {
                    backend: Some((cx.backend)(&m.backend_ref)),
                    numerator,
                    denominator,
                })
            }
            "ExtensionRef" => {
                let r = f.extension_ref.as_ref().ok_or_else(missing)?;
                if r.group != POLICY_GROUP || r.kind != "HTTPFault" {
                    return Err(Problem {
                        condition: Condition::ResolvedRefs,
                        reason: "InvalidKind",
                        message: format!(
                            "ExtensionRef to {}/{} {}: the only extension is {POLICY_GROUP}/HTTPFault",
                            r.group, r.kind, r.name
                        ),
                    });
                }
                if place == Place::Backend {
                    return Err(Problem::unsupported("an HTTPFault is not allowed on a backendRef".into()));
                }
                let Some(found) = (cx.fault)(cx.route_ns, &r.name) else {
                    return Err(Problem {
                        condition: Condition::ResolvedRefs,
                        reason: "BackendNotFound",
                        message: format!("HTTPFault {}/{} does not exist", cx.route_ns, r.name),
                    });
                };
                filter::Kind::Fault(fault(found)?)
            }
            other => {
                return Err(Problem::unsupported(format!(
                    "filter {other} is not supported (RequestHeaderModifier, ResponseHeaderModifier, RequestRedirect, URLRewrite, RequestMirror, ExtensionRef to HTTPFault are)"
                )))
            }
        };
        out.push(Filter { kind: Some(kind) });
    }
    let count = |pred: fn(&filter::Kind) -> bool| {
        out.iter()
            .filter(|f| f.kind.as_ref().is_some_and(pred))
            .count()
    };
    let redirects = count(|k| matches!(k, filter::Kind::RequestRedirect(_)));
    let rewrites = count(|k| matches!(k, filter::Kind::UrlRewrite(_)));
    if redirects > 0 && rewrites > 0 {
        return Err(Problem::unsupported(
            "RequestRedirect and URLRewrite cannot be used on the same rule".into(),
        ));
    }
    if redirects > 1 || rewrites > 1 || count(|k| matches!(k, filter::Kind::Fault(_))) > 1 {
        return Err(Problem::unsupported(
            "RequestRedirect, URLRewrite and an HTTPFault may each appear once per rule".into(),
        ));
    }
    Ok(out)
}

fn field_of(t: &str) -> &'static str {
    match t {
        "RequestHeaderModifier" => "requestHeaderModifier",
        "ResponseHeaderModifier" => "responseHeaderModifier",
        "RequestRedirect" => "requestRedirect",
        "URLRewrite" => "urlRewrite",
        "RequestMirror" => "requestMirror",
        "ExtensionRef" => "extensionRef",
        _ => "matching",
    }
}

/// Gives ReplacePrefixMatch filters the prefix their route matched (one match per route, as
/// the control plane sends them). Not a PathPrefix match: the Gateway API says the rule is
/// invalid.
pub fn bind_matched_prefix(route: &mut Route) {
    let prefix = route
        .matches
        .first()
        .and_then(|m| m.path.as_ref())
        .and_then(|p| {
            (p.kind == strait_api::discovery::path_match::Kind::Prefix as i32)
                .then(|| p.value.clone())
        });
    let mut invalid = None;
    let filters = route
        .filters
        .iter_mut()
        .chain(route.backends.iter_mut().flat_map(|b| b.filters.iter_mut()));
    for f in filters {
        let (modifier, matched) = match &mut f.kind {
            Some(filter::Kind::RequestRedirect(r)) => (&r.path, &mut r.matched_prefix),
            Some(filter::Kind::UrlRewrite(r)) => (&r.path, &mut r.matched_prefix),
            _ => continue,
        };
        if let Some(PathModifier {
            kind: Some(path_modifier::Kind::Prefix(_)),
        }) = modifier
        {
            match &prefix {
                Some(p) => *matched = p.clone(),
                None => invalid = Some("ReplacePrefixMatch needs a PathPrefix match".to_string()),
            }
        }
    }
    if let Some(reason) = invalid {
        if route.invalid.is_empty() {
            route.invalid = reason;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters(yaml: &str) -> Vec<RouteFilter> {
        serde_yaml_ng::from_str(yaml).expect("filters")
    }

    fn backend(b: &crate::resources::BackendRef) -> Backend {
        Backend {
            service: format!("{}.shop.svc.cluster.local:80", b.name),
            weight: 1,
            endpoints: Vec::new(),
            exists: b.name != "ghost",
            filters: Vec::new(),
        }
    }

    fn translated(
        filters: &[RouteFilter],
        place: Place,
        faults: &[HttpFault],
    ) -> Result<Vec<Filter>, Problem> {
        let fault = |ns: &str, name: &str| {
            faults
                .iter()
                .find(|f| f.metadata.namespace == ns && f.metadata.name == name)
        };
        let cx = Context {
            route_ns: "shop",
            backend: &backend,
            fault: &fault,
        };
        translate(filters, place, &cx)
    }

    #[test]
    fn every_supported_filter_translates() {
        let fault: HttpFault = serde_yaml_ng::from_str(
            "metadata: {name: flaky, namespace: shop}\nspec: {delay: {fixedDelay: 200ms, percentage: 10}, abort: {httpStatus: 503, percentage: 2.5}}",
        )
        .expect("fault");
        let out = translated(
            &filters(
                r#"
- type: ResponseHeaderModifier
  responseHeaderModifier: {set: [{name: X-Served-By, value: mesh}]}
- type: URLRewrite
  urlRewrite: {hostname: api.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
- type: RequestMirror
  requestMirror: {backendRef: {name: shadow, port: 80}, percent: 25}
- type: ExtensionRef
  extensionRef: {group: policy.strait.io, kind: HTTPFault, name: flaky}
"#,
            ),
            Place::Rule,
            std::slice::from_ref(&fault),
        )
        .expect("valid");
        assert_eq!(out.len(), 4);
        let Some(filter::Kind::ResponseHeaderModifier(m)) = &out[0].kind else {
            panic!("{out:?}")
        };
        assert_eq!(m.set[0].name, "x-served-by");
        let Some(filter::Kind::RequestMirror(m)) = &out[2].kind else {
            panic!("{out:?}")
        };
        assert_eq!((m.numerator, m.denominator), (25, 100));
        assert_eq!(
            m.backend.as_ref().map(|b| b.service.as_str()),
            Some("shadow.shop.svc.cluster.local:80")
        );
        let Some(filter::Kind::Fault(f)) = &out[3].kind else {
            panic!("{out:?}")
        };
        assert_eq!(
            (
                f.delay_ms,
                f.delay_permille,
                f.abort_status,
                f.abort_permille
            ),
            (200, 100, 503, 25)
        );
    }

    #[test]
    fn filters_that_cannot_be_applied_are_problems_never_skipped() {
        let cases = [
            ("- type: CORS\n  cors: {}", Condition::Accepted, "UnsupportedValue"),
            (
                "- type: RequestRedirect\n  requestRedirect: {scheme: https}\n- type: URLRewrite\n  urlRewrite: {hostname: x}",
                Condition::Accepted,
                "UnsupportedValue",
            ),
            ("- type: URLRewrite", Condition::Accepted, "UnsupportedValue"),
            (
                "- type: ExtensionRef\n  extensionRef: {group: example.com, kind: Auth, name: a}",
                Condition::ResolvedRefs,
                "InvalidKind",
            ),
            (
                "- type: ExtensionRef\n  extensionRef: {group: policy.strait.io, kind: HTTPFault, name: missing}",
                Condition::ResolvedRefs,
                "BackendNotFound",
            ),
        ];
        for (yaml, condition, reason) in cases {
            let Err(p) = translated(&filters(yaml), Place::Rule, &[]) else {
                panic!("{yaml} must be a problem")
            };
            assert_eq!(
                (p.condition, p.reason),
                (condition, reason),
                "{yaml}: {}",
                p.message
            );
        }
        let redirect = filters("- type: RequestRedirect\n  requestRedirect: {scheme: https}");
        assert!(translated(&redirect, Place::Backend, &[]).is_err());
    }

    #[test]
    fn replace_prefix_match_binds_the_route_prefix_or_invalidates_it() {
        use strait_api::discovery::{path_match, PathMatch, RouteMatch};
        let rewrite = Filter {
            kind: Some(filter::Kind::UrlRewrite(UrlRewrite {
                path: Some(PathModifier {
                    kind: Some(path_modifier::Kind::Prefix("/v2".into())),
                }),
                ..Default::default()
            })),
        };
        let route = |kind: path_match::Kind| Route {
            matches: vec![RouteMatch {
                path: Some(PathMatch {
                    kind: kind as i32,
                    value: "/v1".into(),
                }),
                ..Default::default()
            }],
            filters: vec![rewrite.clone()],
            ..Default::default()
        };
        let mut prefix = route(path_match::Kind::Prefix);
        bind_matched_prefix(&mut prefix);
        let Some(filter::Kind::UrlRewrite(r)) = &prefix.filters[0].kind else {
            panic!("rewrite")
        };
        assert_eq!(r.matched_prefix, "/v1");
        assert!(prefix.invalid.is_empty());
        let mut exact = route(path_match::Kind::Exact);
        bind_matched_prefix(&mut exact);
        assert!(exact.invalid.contains("PathPrefix"));
    }
}
