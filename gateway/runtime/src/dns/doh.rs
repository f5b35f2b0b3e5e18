//! DNS over HTTPS (RFC 8484): the request rules as plain functions, and the hyper service that
//! applies them.
//!
//! `GET /dns-query?dns=BASE64URL` and `POST /dns-query` with an `application/dns-message` body
//! carry one DNS message each; the answer comes back as `application/dns-message` with a
//! `cache-control: max-age` of its smallest TTL so HTTP caches never outlive the records.

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

/// The path DoH clients use by convention (RFC 8484's examples, every public resolver).
pub const DOH_PATH: &str = "/dns-query";
/// The media type of a DNS message.
pub const DNS_MESSAGE: &str = "application/dns-message";
/// A DNS message is at most 64 KiB; anything larger is not one.
const MAX_BODY: usize = 65_535;

/// Why a request carries no DNS query; its HTTP status says so to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The status to answer with.
    pub status: StatusCode,
    /// A short reason for the body.
    pub reason: &'static str,
}

fn reject(status: StatusCode, reason: &'static str) -> Rejection {
    Rejection { status, reason }
}

/// The DNS query a GET request carries in its `dns` parameter.
pub fn query_from_get(path: &str, query: Option<&str>) -> Result<Vec<u8>, Rejection> {
    if path != DOH_PATH {
        return Err(reject(
            StatusCode::NOT_FOUND,
            "not found; DNS over HTTPS is at /dns-query",
        ));
    }
    let param = query
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("dns="))
        .ok_or_else(|| reject(StatusCode::BAD_REQUEST, "missing dns parameter"))?;
    // RFC 8484 says unpadded base64url; some clients pad anyway.
    let trimmed = param.trim_end_matches("%3D").trim_end_matches('=');
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(trimmed)
        .map_err(|_| reject(StatusCode::BAD_REQUEST, "dns parameter is not base64url"))?;
    check_size(bytes)
}

/// The DNS query of a POST request, given its content type and body.
pub fn query_from_post(
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Result<Vec<u8>, Rejection> {
    if path != DOH_PATH {
        return Err(reject(
            StatusCode::NOT_FOUND,
            "not found; DNS over HTTPS is at /dns-query",
        ));
    }
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    if !media.eq_ignore_ascii_case(DNS_MESSAGE) {
        return Err(reject(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content-type must be application/dns-message",
        ));
    }
    check_size(body)
}

fn check_size(bytes: Vec<u8>) -> Result<Vec<u8>, Rejection> {
    match bytes.len() {
        0..12 => Err(reject(StatusCode::BAD_REQUEST, "not a DNS message")),
        n if n > MAX_BODY => Err(reject(StatusCode::PAYLOAD_TOO_LARGE, "message too large")),
        _ => Ok(bytes),
    }
}

/// The smallest TTL of an answer's records (0 for an answer without any).
pub fn min_ttl(answer: &[u8]) -> u32 {
    use hickory_proto::op::Message;
    let Ok(message) = Message::from_vec(answer) else {
        return 0;
    };
    message
        .answers()
        .iter()
        .chain(message.name_servers())
        .map(|r| r.ttl())
        .min()
        .unwrap_or(0)
}

/// The HTTP response carrying `answer`.
pub fn answer_response(answer: Vec<u8>) -> Response<Full<Bytes>> {
    let ttl = min_ttl(&answer);
    let mut response = Response::new(Full::new(Bytes::from(answer)));
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(DNS_MESSAGE));
    if let Ok(v) = HeaderValue::from_str(&format!("max-age={ttl}")) {
        headers.insert(CACHE_CONTROL, v);
    }
    response
}

/// The HTTP response for a request without a query.
pub fn rejection_response(rejection: &Rejection) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{}\n", rejection.reason))));
    *response.status_mut() = rejection.status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// Reads the DNS query out of a request (collecting a POST body up to the message limit).
pub async fn read_query(request: Request<Incoming>) -> Result<Vec<u8>, Rejection> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    match parts.method {
        Method::GET => query_from_get(&path, parts.uri.query()),
        Method::POST => {
            let content_type = parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|_| reject(StatusCode::PAYLOAD_TOO_LARGE, "message too large"))?
                .to_bytes();
            query_from_post(&path, content_type.as_deref(), body.to_vec())
        }
        _ => Err(reject(StatusCode::METHOD_NOT_ALLOWED, "use GET or POST")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, Record, RecordType};

    fn message() -> Vec<u8> {
        let mut m = Message::new();
        m.add_query(Query::query(
            Name::from_ascii("example.com.").unwrap(),
            RecordType::A,
        ));
        m.to_vec().unwrap()
    }

    #[test]
    fn get_decodes_unpadded_and_padded_base64url() {
        let q = message();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&q);
        assert_eq!(
            query_from_get("/dns-query", Some(&format!("dns={b64}"))),
            Ok(q.clone())
        );
        let padded = base64::engine::general_purpose::URL_SAFE.encode(&q);
        assert_eq!(
            query_from_get("/dns-query", Some(&format!("ct&dns={padded}"))),
            Ok(q)
        );
    }

    #[test]
    fn bad_requests_get_their_status() {
        let status = |r: Result<Vec<u8>, Rejection>| r.unwrap_err().status;
        assert_eq!(
            status(query_from_get("/", Some("dns=AAAA"))),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            status(query_from_get("/dns-query", None)),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(query_from_get("/dns-query", Some("dns=!!"))),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(query_from_get("/dns-query", Some("dns=AAAA"))),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(query_from_post("/dns-query", Some("text/plain"), message())),
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        );
        assert_eq!(
            status(query_from_post(
                "/dns-query",
                Some(DNS_MESSAGE),
                vec![0; MAX_BODY + 1]
            )),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert!(query_from_post(
            "/dns-query",
            Some("application/dns-message; x=1"),
            message()
        )
        .is_ok());
    }

    #[test]
    fn cache_lifetime_is_the_smallest_ttl() {
        let mut m = Message::new();
        let name = Name::from_ascii("example.com.").unwrap();
        m.add_answer(Record::from_rdata(
            name.clone(),
            300,
            RData::A("203.0.113.10".parse().unwrap()),
        ));
        m.add_answer(Record::from_rdata(
            name,
            60,
            RData::A("203.0.113.11".parse().unwrap()),
        ));
        let response = answer_response(m.to_vec().unwrap());
        assert_eq!(response.headers()[CACHE_CONTROL], "max-age=60");
        assert_eq!(response.headers()[CONTENT_TYPE], DNS_MESSAGE);
        assert_eq!(min_ttl(b"garbage"), 0);
    }
}
