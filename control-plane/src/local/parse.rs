//! Parsing a local-mode YAML file: any number of `---`-separated documents, of which the
//! known kinds become [`Resource`]s. A file is parsed whole or not at all, so a typo never
//! leaves half a file applied.

use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::resources::Resource;

/// Why a file could not be used. The message names the document and the field.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("document {doc}: invalid YAML: {source}")]
    Yaml {
        doc: usize,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("document {doc} ({kind} {name:?}): field `{path}`: {source}")]
    Shape {
        doc: usize,
        kind: String,
        name: String,
        path: String,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("document {doc}: {message}")]
    Invalid { doc: usize, message: String },
}

/// Parses every document of one file. Documents are numbered from 1 in errors.
pub fn parse_documents(text: &str) -> Result<Vec<Resource>, ParseError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        let value = Value::deserialize(de).map_err(|source| ParseError::Yaml { doc, source })?;
        parse_value(doc, value, &mut out)?;
    }
    Ok(out)
}

/// Parses one object (a Kubernetes API object, as JSON turned into a YAML value): what the
/// Kubernetes mode feeds through the same code as local files.
pub fn parse_object(value: Value) -> Result<Vec<Resource>, ParseError> {
    let mut out = Vec::new();
    parse_value(1, value, &mut out)?;
    Ok(out)
}

fn parse_value(doc: usize, value: Value, out: &mut Vec<Resource>) -> Result<(), ParseError> {
    if value.is_null() {
        return Ok(()); // an empty document, e.g. a trailing `---`
    }
    let Some(kind) = value.get("kind").and_then(Value::as_str).map(str::to_owned) else {
        return Err(ParseError::Invalid {
            doc,
            message: "missing `kind`".into(),
        });
    };
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let shape = |e: serde_path_to_error::Error<serde_yaml_ng::Error>| ParseError::Shape {
        doc,
        kind: kind.clone(),
        name: name.clone(),
        path: e.path().to_string(),
        source: e.into_inner(),
    };
    let resource = match kind.as_str() {
        "Service" => Resource::Service(typed(value).map_err(shape)?),
        "EndpointSlice" => Resource::EndpointSlice(typed(value).map_err(shape)?),
        "Pod" => Resource::Pod(typed(value).map_err(shape)?),
        "Namespace" => Resource::Namespace(typed(value).map_err(shape)?),
        "Secret" => Resource::Secret(typed(value).map_err(shape)?),
        "AuthorizationPolicy" => Resource::AuthorizationPolicy(typed(value).map_err(shape)?),
        "TrafficSplit" => Resource::TrafficSplit(typed(value).map_err(shape)?),
        "HTTPRouteGroup" => Resource::HttpRouteGroup(typed(value).map_err(shape)?),
        "HTTPRoute" => Resource::HttpRoute(typed(value).map_err(shape)?),
        "ReferenceGrant" => Resource::ReferenceGrant(typed(value).map_err(shape)?),
        "HTTPFault" => Resource::HttpFault(typed(value).map_err(shape)?),
        "GRPCRoute" => Resource::GrpcRoute(typed(value).map_err(shape)?),
        "HTTPLocalRateLimitPolicy" => Resource::RateLimitPolicy(typed(value).map_err(shape)?),
        list if list.ends_with("List") => {
            // `kubectl get -o yaml` output: a List of items.
            if let Some(Value::Sequence(items)) = value.get("items") {
                for item in items.clone() {
                    parse_value(doc, item, out)?;
                }
            }
            return Ok(());
        }
        other => {
            tracing::debug!(
                kind = other,
                name,
                "skipping a document of a kind Strait does not use"
            );
            return Ok(());
        }
    };
    if name.is_empty() {
        return Err(ParseError::Invalid {
            doc,
            message: format!("{kind} has no metadata.name"),
        });
    }
    out.push(resource);
    Ok(())
}

fn typed<T: serde::de::DeserializeOwned>(
    value: Value,
) -> Result<T, serde_path_to_error::Error<serde_yaml_ng::Error>> {
    serde_path_to_error::deserialize(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_services_slices_and_skips_other_kinds() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
endpoints:
- addresses: [10.0.0.2]
ports: [{name: http, port: 8080}]
---
"#;
        let docs = parse_documents(text).expect("valid");
        assert_eq!(docs.len(), 2);
        let Resource::Service(svc) = &docs[0] else {
            panic!("first is a Service")
        };
        assert_eq!(svc.spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        let Resource::EndpointSlice(slice) = &docs[1] else {
            panic!("second is a slice")
        };
        assert_eq!(slice.service_name(), Some("web"));
    }

    #[test]
    fn a_bad_field_names_the_document_and_object() {
        let text = "kind: Service\nmetadata: {name: web}\nspec: {ports: [{port: not-a-number}]}\n";
        let err = parse_documents(text)
            .expect_err("port must be a number")
            .to_string();
        assert!(err.contains("document 1 (Service \"web\")"), "{err}");
        assert!(err.contains("spec.ports[0].port"), "{err}");
    }

    #[test]
    fn broken_yaml_is_an_error_not_a_panic() {
        let err = parse_documents("kind: Service\nmetadata: {name: [unclosed\n").expect_err("bad");
        assert!(err.to_string().contains("invalid YAML"), "{err}");
        assert!(parse_documents("just a string").is_err());
    }

    #[test]
    fn lists_are_flattened() {
        let text = "kind: List\nitems:\n- kind: Pod\n  metadata: {name: a, namespace: x}\n  spec: {serviceAccountName: sa}\n";
        let docs = parse_documents(text).expect("valid");
        assert!(
            matches!(&docs[0], Resource::Pod(p) if p.spec.service_account_name.as_deref() == Some("sa"))
        );
    }
}
