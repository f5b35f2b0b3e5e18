//! The lab's HTTPS origin for the HTTP stage's tests: HTTP/1.1 and HTTP/2 (ALPN) over TLS with a
//! certificate from the lab's CA.
//!
//! ```text
//! lab-https ADDR CERT.pem KEY.pem
//! ```
//!
//! Every request is answered with `{"src":"IP","version":"HTTP/2.0","path":"/..."}`: the client's
//! address, the HTTP version it spoke and the path. A request with `Upgrade` is answered 101 and
//! everything sent after it is echoed back (a WebSocket echo without the framing).
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [addr, cert, key] = args.as_slice() else {
        eprintln!("usage: lab-https ADDR CERT.pem KEY.pem");
        return ExitCode::from(2);
    };
    match run(addr, cert, key) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lab-https: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(addr: &str, cert: &str, key: &str) -> Result<(), String> {
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request| answer(request, peer));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await;
            });
        }
    })
}

async fn answer(
    mut request: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    if request.headers().contains_key(hyper::header::UPGRADE) {
        let upgraded = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(up) = upgraded.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(up));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = response.headers_mut();
        h.insert(
            hyper::header::CONNECTION,
            "upgrade".parse().expect("header"),
        );
        h.insert(hyper::header::UPGRADE, "websocket".parse().expect("header"));
        return Ok(response);
    }
    let ip = match peer.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer.ip(), std::net::IpAddr::V4),
        ip => ip,
    };
    let body = serde_json::json!({
        "src": ip.to_string(),
        "version": format!("{:?}", request.version()),
        "path": request.uri().path(),
    });
    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
}
