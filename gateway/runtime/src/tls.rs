//! The certificates the gateway serves: a leaf for its tunnel addresses (and public name),
//! signed by the data dir's CA, in the TLS settings of each encrypted listener (DNS over TLS and
//! HTTPS inside the tunnel, the admin API, the enrollment listener).

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use waygate_keys::{CertificateAuthority, IssuedCert};

use crate::dns::TlsConfigs;
use waygate_config::Config;

/// Common name of a CA the gateway creates.
pub const CA_NAME: &str = "Waygate Gateway CA";

/// Loads the data dir's CA, creating it (valid from `now`) on first use.
pub fn load_ca(data_dir: &Path, now: SystemTime) -> anyhow::Result<CertificateAuthority> {
    CertificateAuthority::load_or_create(data_dir, CA_NAME, now)
        .with_context(|| format!("certificate authority in {}", data_dir.display()))
}

/// The names a device may use to reach the gateway's encrypted DNS: its tunnel addresses, the
/// `dns.listen` addresses and the host of `wireguard.public_endpoint` when it is a name.
pub fn gateway_names(config: &Config) -> (Vec<String>, Vec<IpAddr>) {
    let mut ips = vec![
        IpAddr::V4(config.tunnel.gateway_ipv4()),
        IpAddr::V6(config.tunnel.gateway_ipv6()),
    ];
    for listen in &config.dns.listen {
        if !listen.ip().is_unspecified() && !ips.contains(&listen.ip()) {
            ips.push(listen.ip());
        }
    }
    let mut names = Vec::new();
    if let Some(endpoint) = &config.wireguard.public_endpoint {
        let host = endpoint
            .rsplit_once(':')
            .map_or(endpoint.as_str(), |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match host.parse::<IpAddr>() {
            Ok(ip) if !ips.contains(&ip) => ips.push(ip),
            Ok(_) => {}
            Err(_) if !host.is_empty() => names.push(host.to_string()),
            Err(_) => {}
        }
    }
    (names, ips)
}

/// TLS settings for DNS over TLS and DNS over HTTPS serving `cert`.
pub fn dns_tls(cert: &IssuedCert) -> anyhow::Result<TlsConfigs> {
    let chain: Vec<CertificateDer<'static>> = cert
        .chain_der
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.to_vec()));
    let base = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("tls protocol versions")?
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .context("the issued certificate")?;
    let with_alpn = |alpn: &[&[u8]]| {
        let mut config = base.clone();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    };
    Ok(TlsConfigs {
        dot: with_alpn(&[b"dot"]),
        doh: with_alpn(&[b"h2", b"http/1.1"]),
    })
}

/// TLS settings for the admin API's listener (`admin.listen`): the certificate and key files of
/// `admin.tls_cert`/`admin.tls_key` when set, else a certificate from `ca` (valid from `now`) for
/// the listen address, the loopback addresses, `localhost` and the gateway's names.
pub fn admin_tls(
    ca: &CertificateAuthority,
    config: &Config,
    now: SystemTime,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    let (chain, key) = match (&config.admin.tls_cert, &config.admin.tls_key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .with_context(|| format!("admin.tls_cert: {}", cert.display()))?;
            if chain.is_empty() {
                anyhow::bail!("admin.tls_cert: {} holds no certificate", cert.display());
            }
            let key = PrivateKeyDer::from_pem_file(key)
                .with_context(|| format!("admin.tls_key: {}", key.display()))?;
            (chain, key)
        }
        _ => issue_for_listener(ca, config, config.admin.listen, now)
            .context("cannot issue the admin API's certificate")?,
    };
    http1_settings(chain, key).context("the admin API's certificate")
}

/// TLS settings for the enrollment listener (`control.listen`): always a certificate from `ca`
/// (valid from `now`), since clients pin that CA by the hash in their token.
pub fn control_tls(
    ca: &CertificateAuthority,
    config: &Config,
    now: SystemTime,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let (chain, key) = issue_for_listener(ca, config, config.control.listen, now)
        .context("cannot issue the enrollment listener's certificate")?;
    http1_settings(chain, key).context("the enrollment listener's certificate")
}

/// A certificate from `ca` for a listener at `listen`: its address, the loopback addresses,
/// `localhost` and the gateway's names; the chain ends with the CA's certificate.
fn issue_for_listener(
    ca: &CertificateAuthority,
    config: &Config,
    listen: Option<std::net::SocketAddr>,
    now: SystemTime,
) -> anyhow::Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let (mut names, mut ips) = gateway_names(config);
    names.push("localhost".into());
    let loopback: [IpAddr; 2] = [
        std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ];
    for ip in loopback.into_iter().chain(listen.map(|a| a.ip())) {
        if !ip.is_unspecified() && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let cert = ca.issue(&names, &ips, now)?;
    let chain = cert
        .chain_der
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_der.to_vec()));
    Ok((chain, key))
}

/// Server settings for an HTTP/1.1-only listener serving `chain`.
fn http1_settings(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let mut settings = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("tls protocol versions")?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    settings.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(settings))
}

/// Issues the gateway's certificate (valid from `now`) from `ca` and builds the encrypted DNS
/// listeners' settings.
pub fn gateway_dns_tls(
    ca: &CertificateAuthority,
    config: &Config,
    now: SystemTime,
) -> anyhow::Result<TlsConfigs> {
    let (names, ips) = gateway_names(config);
    let cert = ca
        .issue(&names, &ips, now)
        .context("cannot issue the gateway's certificate")?;
    dns_tls(&cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_tunnel_listen_and_public_endpoint() {
        let mut config = Config::default();
        config.wireguard.public_endpoint = Some("gw.example.com:51820".into());
        config.dns.listen = vec!["198.51.100.1:53".parse().unwrap()];
        let (names, ips) = gateway_names(&config);
        assert_eq!(names, vec!["gw.example.com".to_string()]);
        assert!(ips.contains(&"100.96.0.1".parse().unwrap()));
        assert!(ips.contains(&"198.51.100.1".parse().unwrap()));
        config.wireguard.public_endpoint = Some("[2001:db8::1]:51820".into());
        let (names, ips) = gateway_names(&config);
        assert!(names.is_empty());
        assert!(ips.contains(&"2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn the_admin_listener_gets_a_certificate_from_the_ca() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        let ca = CertificateAuthority::generate(CA_NAME, now).unwrap();
        let mut config = Config::default();
        config.admin.listen = Some("127.0.0.1:8443".parse().unwrap());
        let settings = admin_tls(&ca, &config, now).unwrap();
        assert_eq!(settings.alpn_protocols, vec![b"http/1.1".to_vec()]);
        config.admin.tls_cert = Some("/nonexistent/cert.pem".into());
        config.admin.tls_key = Some("/nonexistent/key.pem".into());
        let err = format!("{:#}", admin_tls(&ca, &config, now).unwrap_err());
        assert!(err.contains("admin.tls_cert"), "{err}");
        config.control.listen = Some("198.51.100.1:8444".parse().unwrap());
        let settings = control_tls(&ca, &config, now).unwrap();
        assert_eq!(settings.alpn_protocols, vec![b"http/1.1".to_vec()]);
    }

    #[test]
    fn the_issued_certificate_makes_a_tls_server() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_795_000_000);
        let ca = CertificateAuthority::generate(CA_NAME, now).unwrap();
        let configs = gateway_dns_tls(&ca, &Config::default(), now).unwrap();
        assert_eq!(configs.dot.alpn_protocols, vec![b"dot".to_vec()]);
        assert_eq!(configs.doh.alpn_protocols.len(), 2);
    }
}
