//! HTTPRoute filters through the mesh, with curl: RequestRedirect, URLRewrite,
//! ResponseHeaderModifier, a backendRef's RequestHeaderModifier, RequestMirror (the mirror gets
//! copies, bodies included, while the original does not wait for it), an unsupported filter
//! (500), and HTTPFault fault injection (shares within tolerance over a bounded load).

use std::time::{Duration, Instant};

use strait_e2e::{metric, Mesh, ServiceDef};
use strait_testbed::Pod;

const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: filters, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}}]
  - matches: [{path: {type: PathPrefix, value: /secure}}]
    filters: [{type: RequestRedirect, requestRedirect: {scheme: https, hostname: secure.example}}]
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters: [{type: URLRewrite, urlRewrite: {hostname: internal.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}]
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {type: Exact, value: /split}}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /headers}}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-through, value: strait}], remove: [x-served-by]}}
    backendRefs:
    - {name: web-v1, port: 80}
    - name: web-v2
      port: 80
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-backend, value: v2}]}}]
  - matches: [{path: {type: PathPrefix, value: /cors}}]
    filters: [{type: CORS, cors: {allowOrigins: ["*"]}}]
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /mirrored}}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 80}}}
    backendRefs: [{name: web-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /chaos}}]
    filters: [{type: ExtensionRef, extensionRef: {group: policy.strait.io, kind: HTTPFault, name: flaky}}]
    backendRefs: [{name: web-v1, port: 80}]
  - backendRefs: [{name: web-v1, port: 80}]
---
apiVersion: policy.strait.io/v1alpha1
kind: HTTPFault
metadata: {name: flaky, namespace: default}
spec:
  abort: {httpStatus: 503, percentage: 50}
  delay: {fixedDelay: 100ms, percentage: 20}
"#;

/// v1, v2 and a slow `shadow` (3 s per response) behind `web` (10.96.0.10), `web-v1`, `web-v2`
/// and `shadow`, the route above, and a client.
fn filter_mesh(tag: &str) -> anyhow::Result<(Mesh, Pod, Pod)> {
    let mesh = Mesh::new(tag)?;
    let v1 = mesh.meshed_pod("v1")?;
    let v2 = mesh.meshed_pod("v2")?;
    let shadow = mesh.meshed_pod("shadow")?;
    for pod in [&v1, &v2] {
        mesh.net.start_app(
            pod,
            "app",
            &["http", "--listen", "0.0.0.0:8080", "--name", &pod.name],
        )?;
    }
    mesh.net.start_app(
        &shadow,
        "app",
        &[
            "http",
            "--listen",
            "0.0.0.0:8080",
            "--name",
            "shadow",
            "--delay-ms",
            "3000",
        ],
    )?;
    for (name, ip, pod) in [
        ("web", "10.96.0.10", &v1),
        ("web-v1", "10.96.0.11", &v1),
        ("web-v2", "10.96.0.12", &v2),
        ("shadow", "10.96.0.13", &shadow),
    ] {
        mesh.config
            .service(&ServiceDef::new(name, ip, 80, 8080, &[pod]))?;
    }
    mesh.config.write("route.yaml", ROUTE)?;
    let client = mesh.meshed_pod("client")?;
    // The route is in place once a redirect comes back.
    mesh.eventually(Duration::from_secs(5), || {
        Ok(mesh
            .curl(
                &client,
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://10.96.0.10/old",
                ],
            )?
            .trim()
            == "301")
    })?;
    Ok((mesh, client, shadow))
}

fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    response.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[test]
fn redirects_rewrites_header_modifiers_and_an_unsupported_filter() -> anyhow::Result<()> {
    let (mesh, client, _) = filter_mesh("filters")?;
    // RequestRedirect: answered by the client's proxy, path prefix replaced, query kept.
    let out = mesh.curl(&client, &["-si", "http://10.96.0.10/old/page?id=7"])?;
    assert!(out.starts_with("HTTP/1.1 301"), "{out}");
    assert_eq!(
        header(&out, "location"),
        Some("http://10.96.0.10/new/page?id=7"),
        "{out}"
    );
    let out = mesh.curl(&client, &["-si", "http://10.96.0.10/secure/x"])?;
    assert!(out.starts_with("HTTP/1.1 302"), "{out}");
    assert_eq!(
        header(&out, "location"),
        Some("https://secure.example/secure/x"),
        "{out}"
    );

    // URLRewrite: /api/headers reaches the app as /headers, with the new Host.
    let out = mesh.curl(&client, &["-s", "http://10.96.0.10/api/headers"])?;
    assert!(out.contains("host: internal.example"), "{out}");

    // ResponseHeaderModifier on the rule; RequestHeaderModifier on the v2 backendRef only.
    let (mut to_v2, n) = (0, 40);
    for _ in 0..n {
        let out = mesh.curl(&client, &["-si", "http://10.96.0.10/split"])?;
        assert_eq!(header(&out, "x-through"), Some("strait"), "{out}");
        assert!(header(&out, "x-served-by").is_none(), "removed: {out}");
        assert!(
            out.contains("version: HTTP/1.1"),
            "rewritten to /headers: {out}"
        );
        to_v2 += usize::from(out.contains("x-backend: v2"));
    }
    assert!(
        (16..=24).contains(&to_v2),
        "half of {n} to v2 with its header: {to_v2}"
    );

    // A filter the mesh does not support: its rule answers 500, never skips it.
    let out = mesh.curl(&client, &["-si", "http://10.96.0.10/cors"])?;
    assert!(out.starts_with("HTTP/1.1 500"), "{out}");
    let reason = header(&out, "strait-proxy-error").unwrap_or("");
    assert!(
        reason.contains("is invalid") && reason.contains("CORS"),
        "{out}"
    );
    // Other rules are unaffected.
    assert_eq!(
        mesh.curl(&client, &["-s", "http://10.96.0.10/"])?.trim(),
        "hello from v1"
    );
    Ok(())
}

#[test]
fn a_mirror_gets_copies_while_the_original_does_not_wait_for_it() -> anyhow::Result<()> {
    let (mesh, client, shadow) = filter_mesh("mirror")?;
    // 10 GETs: each answered by v1 at once, though the mirror takes 3 s per request.
    let started = Instant::now();
    let out = mesh.curl(&client, &["-s", "http://10.96.0.10/mirrored/?n=[1-10]"])?;
    let took = started.elapsed();
    assert_eq!(out.matches("hello from v1").count(), 10, "{out}");
    assert!(
        took < Duration::from_secs(5),
        "10 originals took {took:?}: they waited for the 3 s mirror"
    );
    // A POST with a body: the original echoes it whole; the mirror gets its own copy.
    let body = "m".repeat(200_000);
    let file = mesh.net.dir.join("body.txt");
    std::fs::write(&file, &body)?;
    let echoed = mesh.curl(
        &client,
        &[
            "-s",
            "--data-binary",
            &format!("@{}", file.to_string_lossy()),
            "http://10.96.0.10/mirrored/echo",
        ],
    )?;
    assert_eq!(echoed.len(), body.len(), "the original's body is intact");
    // Every mirror answered (3 s each, in parallel), counted by the client's proxy.
    let sent = mesh.eventually(Duration::from_secs(12), || {
        let m = mesh.metrics(&client)?;
        Ok(metric(&m, "strait_http_mirror_total", &["outcome=\"sent\""]) == Some(11.0))
    });
    if sent.is_err() {
        let m = mesh.metrics(&client)?;
        let mirror: Vec<&str> = m.lines().filter(|l| l.contains("mirror")).collect();
        panic!("mirrors not all sent: {mirror:?}\n{}", mesh.net.logs());
    }
    let m = mesh.metrics(&client)?;
    assert_eq!(
        metric(&m, "strait_http_mirror_total", &["outcome=\"failed\""]),
        None,
        "{m}"
    );
    // The shadow's proxy saw the 11 mirrored requests, the POST's body included.
    let s = mesh.metrics(&shadow)?;
    assert_eq!(
        metric(&s, "strait_request_total", &["direction=\"inbound\""]),
        Some(11.0),
        "{s}"
    );
    assert_eq!(
        metric(
            &s,
            "strait_request_size_bytes_sum",
            &["direction=\"inbound\""]
        ),
        Some(200_000.0),
        "{s}"
    );
    Ok(())
}

#[test]
fn an_httpfault_aborts_and_delays_its_shares_of_a_bounded_load() -> anyhow::Result<()> {
    let (mesh, client, _) = filter_mesh("fault")?;
    let n = 300;
    let out = mesh.curl(
        &client,
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{time_total}\n",
            &format!("http://10.96.0.10/chaos/?n=[1-{n}]"),
        ],
    )?;
    let (mut aborted, mut delayed, mut ok) = (0, 0, 0);
    for line in out.lines() {
        let (code, secs) = line.split_once(' ').unwrap_or(("", ""));
        match code {
            "503" => aborted += 1,
            "200" => ok += 1,
            other => panic!("unexpected status {other}: {out}"),
        }
        if secs.parse::<f64>().unwrap_or(0.0) >= 0.1 {
            delayed += 1;
        }
    }
    assert_eq!(aborted + ok, n, "{out}");
    assert!(
        (120..=180).contains(&aborted),
        "50% of {n} aborted: {aborted}"
    );
    assert!(
        (35..=95).contains(&delayed),
        "20% of {n} delayed 100 ms: {delayed}"
    );
    // The abort is the proxy's own answer, and a metric says why.
    let out = mesh.eventually(Duration::from_secs(5), || {
        let out = mesh.curl(&client, &["-si", "http://10.96.0.10/chaos/"])?;
        Ok(out.starts_with("HTTP/1.1 503"))
    });
    assert!(out.is_ok());
    let m = mesh.metrics(&client)?;
    assert!(
        metric(&m, "strait_response_total", &["error=\"fault injected\""])
            .is_some_and(|v| v >= 120.0),
        "{m}"
    );
    Ok(())
}
