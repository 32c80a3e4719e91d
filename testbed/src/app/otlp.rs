//! An OpenTelemetry collector for tests: receives OTLP/gRPC trace exports and prints one JSON
//! line per span on stdout (ids in hex, attributes as strings), for the test to read.

use std::net::SocketAddr;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use tonic::{Request, Response, Status};

struct Printer {
    quiet: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn text(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attributes(kvs: &[KeyValue]) -> serde_json::Map<String, serde_json::Value> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref()).into()))
        .collect()
}

#[tonic::async_trait]
impl TraceService for Printer {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        use std::io::Write;
        if self.quiet {
            return Ok(Response::new(ExportTraceServiceResponse::default()));
        }
        let mut out = std::io::stdout().lock();
        for rs in request.into_inner().resource_spans {
            let resource = attributes(rs.resource.as_ref().map_or(&[][..], |r| &r.attributes));
            for ss in rs.scope_spans {
                for span in ss.spans {
                    let line = serde_json::json!({
                        "resource": resource,
                        "trace_id": hex(&span.trace_id),
                        "span_id": hex(&span.span_id),
                        "parent_span_id": hex(&span.parent_span_id),
                        "name": span.name,
                        "kind": span.kind,
                        "status_code": span.status.as_ref().map_or(0, |s| s.code),
                        "attributes": attributes(&span.attributes),
                    });
                    let _ = writeln!(out, "{line}");
                }
            }
        }
        let _ = out.flush();
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

pub async fn serve(listen: SocketAddr, quiet: bool) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {listen}");
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(Printer { quiet }))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
        .await?;
    Ok(())
}
