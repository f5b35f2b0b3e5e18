//! The enrollment listener (`control.listen`): HTTPS with a certificate from the gateway's CA,
//! one endpoint, `POST /v1/enroll` with `{"token", "public_key"}`, answered in Cloudflare's
//! envelope with the device's tunnel settings ([`waygate_control::enrollment::EnrollResult`]).
//! It faces the network, so failed attempts are limited per source address
//! ([`GuessLimiter`]) and refused ones counted; bodies are small and headers must come quickly.
//!
//! [`Enrollment::handle`] is the request logic without sockets (the tests call it); [`start`]
//! binds the listener and serves it on a thread and runtime of its own.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;
use waygate_config::Config;
use waygate_control::enrollment::{self, EnrollBody, Refusal};
use waygate_control::ratelimit::GuessLimiter;
use waygate_control::ErrorKind;
use waygate_registry::Registry;

use crate::api::{codes, failure, success, Answer};
use crate::server::bind_tls;
use crate::StartError;

/// Largest enrollment body (a token and a key are some 250 bytes).
const MAX_ENROLL_BODY: usize = 16 * 1024;

/// The enrollment logic: the registry connection, the guess limiter, the clocks.
pub struct Enrollment {
    config: Config,
    registry: Mutex<Registry>,
    limiter: Mutex<GuessLimiter>,
    unix_now: fn() -> i64,
    started: Instant,
}

impl Enrollment {
    /// Enrollment over `registry` with `config`'s tunnel and endpoint settings.
    pub fn new(config: Config, registry: Registry, unix_now: fn() -> i64) -> Self {
        Enrollment {
            config,
            registry: Mutex::new(registry),
            limiter: Mutex::new(GuessLimiter::new()),
            unix_now,
            #[allow(clippy::disallowed_methods)] // an I/O shell: the limiter's time origin
            started: Instant::now(),
        }
    }

    /// Attempts refused by the guess limiter so far.
    pub fn limited(&self) -> u64 {
        self.limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .limited()
    }

    /// Answers one request from `peer` at `now` (time since any fixed start).
    pub fn handle(
        &self,
        method: &str,
        path: &str,
        peer: IpAddr,
        body: &[u8],
        now: Duration,
    ) -> Answer {
        if path.split('?').next() != Some(enrollment::ENROLL_PATH) {
            return failure(404, codes::NOT_FOUND, "nothing here; POST /v1/enroll");
        }
        if method != "POST" {
            let mut answer = failure(405, codes::METHOD_NOT_ALLOWED, "only POST");
            answer.allow = Some("POST");
            return answer;
        }
        let mut limiter = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(retry_after) = limiter.check(peer, now) {
            if limiter.limited().is_power_of_two() {
                tracing::warn!(%peer, limited = limiter.limited(), "enrollment attempts limited");
            }
            return refused(&Refusal::RateLimited { retry_after });
        }
        let body: EnrollBody = match waygate_control::parse_body(body) {
            Ok(b) => b,
            Err(e) => {
                limiter.failed(peer, now);
                return failure(400, codes::INVALID, e.to_string());
            }
        };
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        match enrollment::redeem(&self.config, &registry, &body, (self.unix_now)()) {
            Ok(result) => {
                tracing::info!(%peer, device = %result.name, id = %result.device_id, "device enrolled with a token");
                success(201, json!(result))
            }
            Err(Ok(refusal)) => {
                limiter.failed(peer, now);
                tracing::info!(%peer, %refusal, "enrollment refused");
                refused(&refusal)
            }
            Err(Err(err)) => {
                let (status, code) = match err.kind() {
                    ErrorKind::Invalid => (400, codes::INVALID),
                    ErrorKind::NotFound => (404, codes::NOT_FOUND),
                    ErrorKind::Conflict => (409, codes::CONFLICT),
                    ErrorKind::Internal => (500, codes::INTERNAL),
                };
                if status == 500 {
                    tracing::error!(%peer, %err, "enrollment failed");
                }
                failure(status, code, err.to_string())
            }
        }
    }
}

/// The answer to a refused token: 403, or 429 when rate-limited.
fn refused(refusal: &Refusal) -> Answer {
    match refusal {
        Refusal::RateLimited { .. } => failure(429, codes::RATE_LIMITED, refusal.to_string()),
        _ => failure(403, codes::TOKEN_REFUSED, refusal.to_string()),
    }
}

/// The running listener (it ends with the process).
pub struct EnrollHandle {
    /// Where it listens.
    pub addr: Option<SocketAddr>,
}

/// Binds `control.listen` now, so a failure stops the start, then serves it with `tls` on a
/// thread of its own.
pub fn start(
    config: &Config,
    listen: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
) -> Result<EnrollHandle, StartError> {
    let listener = bind_tls(listen)?;
    let addr = listener.local_addr().ok();
    let registry = Registry::open(&config.data_dir, &config.tunnel)?;
    let enrollment = Arc::new(Enrollment::new(config.clone(), registry, crate::unix_now));
    std::thread::Builder::new()
        .name("waygate-enroll".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt.block_on(serve(enrollment, listener, tls)),
                Err(err) => tracing::error!(%err, "enrollment runtime did not start"),
            }
        })
        .map_err(StartError::Thread)?;
    Ok(EnrollHandle { addr })
}

async fn serve(
    enrollment: Arc<Enrollment>,
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
) {
    let tcp = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(err) => {
            tracing::error!(%err, "enrollment listener unusable");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(s) => s,
            Err(err) => {
                tracing::debug!(%err, "enrollment accept failed");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let enrollment = enrollment.clone();
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(crate::server::HEADER_TIMEOUT, acceptor.accept(stream))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(err)) => {
                        tracing::debug!(%peer, %err, "enrollment TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
            let service = hyper::service::service_fn(move |req| {
                serve_request(enrollment.clone(), peer.ip(), req)
            });
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(crate::server::HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, %err, "enrollment connection ended with an error");
            }
        });
    }
}

async fn serve_request(
    enrollment: Arc<Enrollment>,
    peer: IpAddr,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let body = match Limited::new(req.into_body(), MAX_ENROLL_BODY)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Ok(crate::server::respond(failure(
                413,
                codes::TOO_LARGE,
                format!("the body is larger than {MAX_ENROLL_BODY} bytes"),
            )))
        }
    };
    #[allow(clippy::disallowed_methods)] // an I/O shell reads the clock for the limiter
    let now = enrollment.started.elapsed();
    // The registry calls block this thread's runtime, which serves nothing else (requests are
    // answered one at a time, like the admin API's).
    let answer = enrollment.handle(&method, &path, peer, &body, now);
    Ok(crate::server::respond(answer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use waygate_control::enrollment::NewEnrollToken;

    fn setup() -> (tempfile::TempDir, Enrollment, Registry) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config {
            data_dir: dir.path().to_path_buf(),
            ..Config::default()
        };
        config.wireguard.public_endpoint = Some("198.51.100.1:51820".into());
        let registry = Registry::open(dir.path(), &config.tunnel).unwrap();
        let other = Registry::open(dir.path(), &config.tunnel).unwrap();
        (dir, Enrollment::new(config, registry, || 1_000), other)
    }

    fn key(seed: u64) -> String {
        waygate_keys::PrivateKey::generate(&mut StdRng::seed_from_u64(seed))
            .public_key()
            .to_string()
    }

    #[test]
    fn a_token_enrolls_once_then_guessing_is_limited() {
        let (_d, e, reg) = setup();
        let (token, _) = enrollment::create(
            &reg,
            NewEnrollToken {
                email: "ada@example.com".into(),
                ..NewEnrollToken::default()
            },
            b"ca",
            &mut StdRng::seed_from_u64(1),
            900,
        )
        .unwrap();
        let peer: IpAddr = "198.51.100.7".parse().unwrap();
        let body = |k: u64| json!({"token": token.to_string(), "public_key": key(k)}).to_string();
        let t0 = Duration::ZERO;
        let ok = e.handle("POST", "/v1/enroll", peer, body(1).as_bytes(), t0);
        assert_eq!(ok.status, 201, "{:?}", ok.body);
        assert_eq!(ok.body["result"]["addresses"][0], "100.96.0.2/32");
        assert_eq!(ok.body["result"]["endpoint"], "198.51.100.1:51820");
        let again = e.handle("POST", "/v1/enroll", peer, body(2).as_bytes(), t0);
        assert_eq!(again.status, 403);
        let message = again.body["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains("used up"), "{message}");
        assert_eq!(e.handle("GET", "/v1/enroll", peer, b"", t0).status, 405);
        assert_eq!(e.handle("POST", "/x", peer, b"", t0).status, 404);
        // Nine more failures use up the burst; then even a good body is refused until refill.
        for _ in 0..9 {
            let a = e.handle("POST", "/v1/enroll", peer, b"{\"token\": 1}", t0);
            assert_eq!(a.status, 400);
        }
        let limited = e.handle("POST", "/v1/enroll", peer, body(3).as_bytes(), t0);
        assert_eq!(limited.status, 429, "{:?}", limited.body);
        assert_eq!(e.limited(), 1);
        let other: IpAddr = "198.51.100.8".parse().unwrap();
        assert_eq!(
            e.handle("POST", "/v1/enroll", other, body(3).as_bytes(), t0)
                .status,
            403
        );
    }
}
