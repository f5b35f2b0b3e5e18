//! The gateway's resolver on a thread of its own (so DNS uses the second core and never stalls the
//! data plane): devices' UDP queries arrive as [`Query`] from the data plane and their answers go
//! back as [`Answer`]; DNS over TCP, TLS and HTTPS from devices arrives on loopback listeners after
//! a PROXY line naming the device; `dns.listen` serves networks without the client, attributed to
//! `[[dns.locations]]`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::mpsc;

use waygate_policy::category_db::CategoryDb;

use crate::dns::memory::Names;
use crate::dns::rules::DnsRules;
use crate::dns::server::resolve;
use crate::dns::{
    ClientCtx, DnsServer, Handled, Resolver, ResolverConfig, ServerConfig, StreamKind,
    StreamListener, TlsConfigs, Transport, Upstream, UpstreamClient,
};
use waygate_config::{Config, DnsLocation};
use waygate_engine::flow::DeviceInfo;
use waygate_geoip::GeoIp;
use waygate_stages::policy::Loaded;
use waygate_wg::PeerId;

/// How often the resolver thread lets the core report log lines it held back.
const LOG_POLL: Duration = Duration::from_secs(1);

/// A device's query over UDP, from the data plane.
#[derive(Debug)]
pub struct Query {
    /// The device's peer.
    pub peer: PeerId,
    /// Who asked.
    pub client: ClientCtx,
    /// The query's source.
    pub from: SocketAddr,
    /// Where it was sent.
    pub to: SocketAddr,
    /// The message.
    pub payload: bytes::Bytes,
}

/// The answer to a [`Query`], for the data plane to send to the device.
#[derive(Debug)]
pub struct Answer {
    /// The device's peer.
    pub peer: PeerId,
    /// The device's address (the answer's destination).
    pub to: SocketAddr,
    /// Where the query was sent (the answer's source).
    pub from: SocketAddr,
    /// The message.
    pub payload: Vec<u8>,
}

/// An address the resolver answered to a device, for the data plane's name memory.
#[derive(Debug)]
pub struct Learned {
    /// The device's registry id.
    pub device_id: String,
    /// The answered address.
    pub ip: IpAddr,
    /// The names behind it.
    pub names: Names,
    /// The answer's TTL.
    pub ttl: u32,
}

/// Devices by tunnel address, for queries that arrive by address only (DNS over TCP).
pub type Clients = Arc<RwLock<HashMap<IpAddr, ClientCtx>>>;

/// The running resolver.
pub struct ResolverHandle {
    queries: mpsc::UnboundedSender<Query>,
    /// The loopback listener DNS over TCP from devices is carried to.
    pub tcp_listener: SocketAddr,
    /// The loopback listener DNS over TLS from devices is carried to.
    pub tls_listener: SocketAddr,
    /// The loopback listener DNS over HTTPS from devices is carried to.
    pub https_listener: SocketAddr,
    clients: Clients,
    state: Arc<Mutex<RulesState>>,
    resolver: Arc<Mutex<Resolver<DnsRules>>>,
}

struct RulesState {
    loaded: Arc<Loaded>,
    geoip: Option<Arc<GeoIp>>,
    categories: Option<Arc<CategoryDb>>,
    block_page: Option<IpAddr>,
}

impl RulesState {
    fn rules(&self) -> DnsRules {
        DnsRules::new(self.loaded.clone(), self.geoip.clone(), self.block_page)
            .with_categories(self.categories.clone())
    }
}

/// The client a device is to its resolver.
pub fn device_client(device: &Arc<DeviceInfo>, src: IpAddr, public: Option<IpAddr>) -> ClientCtx {
    ClientCtx {
        device: Some(device.clone()),
        location: None,
        src_ip: src,
        public_ip: public,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The upstreams of `dns.upstreams`, or the host's resolvers.
fn upstreams(config: &Config) -> anyhow::Result<Vec<Upstream>> {
    if config.dns.upstreams.is_empty() {
        let found = host_resolvers(Path::new("/etc/resolv.conf"));
        if found.is_empty() {
            tracing::warn!("dns.upstreams is empty and /etc/resolv.conf names no nameserver: queries that need an upstream fail");
        }
        return Ok(found);
    }
    config
        .dns
        .upstreams
        .iter()
        .map(|u| {
            u.parse::<Upstream>()
                .with_context(|| format!("dns.upstreams: {u:?}"))
        })
        .collect()
}

/// The nameservers of a resolv.conf file, in order.
fn host_resolvers(path: &Path) -> Vec<Upstream> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next()?.parse::<IpAddr>().ok())
                .flatten()
        })
        // A host resolver on loopback (systemd-resolved's 127.0.0.53) cannot be reached from
        // the egress address, but it can from the default source.
        .map(|ip| Upstream::Plain(SocketAddr::new(ip, 53)))
        .collect()
}

/// The client for a query to a `dns.listen` address from `from`.
fn listener_client(from: SocketAddr, clients: &Clients, locations: &[DnsLocation]) -> ClientCtx {
    let known = clients
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&from.ip())
        .cloned();
    if let Some(client) = known {
        return client;
    }
    let mut client = ClientCtx::from_ip(from.ip());
    client.location = locations
        .iter()
        .find(|l| l.networks.iter().any(|n| n.contains(&from.ip())))
        .map(|l| l.id.clone().unwrap_or_else(|| l.name.clone()));
    client
}

/// Starts the resolver thread; answers to in-tunnel queries go to `answers`, and what it answered
/// each device to `learned`. DNS over TLS and HTTPS serve the certificate in `tls`.
pub fn spawn(
    config: &Config,
    max_pending: usize,
    tls: TlsConfigs,
    answers: mpsc::UnboundedSender<Answer>,
    learned: mpsc::UnboundedSender<Learned>,
) -> anyhow::Result<ResolverHandle> {
    let mut upstream = UpstreamClient::new(
        upstreams(config)?,
        config.egress.default_ipv4.map(IpAddr::V4),
        crate::dns::upstream::DEFAULT_TIMEOUT,
    );
    if let Some(ca) = &config.dns.upstream_ca {
        let roots = crate::dns::encrypted::trust_roots(Some(ca)).context("dns.upstream_ca")?;
        upstream = upstream.with_roots(&roots);
    }
    let state = Arc::new(Mutex::new(RulesState {
        loaded: Arc::new(Loaded::empty()),
        geoip: None,
        categories: None,
        block_page: config.dns.block_page,
    }));
    let seed = rand::RngCore::next_u64(&mut rand::rngs::OsRng);
    let resolver = Arc::new(Mutex::new(Resolver::new(
        lock(&state).rules(),
        ResolverConfig {
            max_pending,
            max_pending_per_client: config.limits.dns_queries_per_device,
            ..ResolverConfig::default()
        },
        seed,
    )));
    lock(&resolver).set_learn_sink(Box::new(move |device_id, ip, names, ttl| {
        let _ = learned.send(Learned {
            device_id: device_id.to_string(),
            ip,
            names: names.clone(),
            ttl,
        });
    }));
    let clients: Clients = Arc::default();
    let (queries_tx, mut queries_rx) = mpsc::unbounded_channel::<Query>();
    let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    let proxied = |kind| StreamListener {
        addr: loopback,
        kind,
        proxied: true,
    };
    let server_config = ServerConfig {
        udp: config.dns.listen.clone(),
        streams: config
            .dns
            .listen
            .iter()
            .map(|&addr| StreamListener {
                addr,
                kind: StreamKind::Tcp,
                proxied: false,
            })
            .chain([
                proxied(StreamKind::Tcp),
                proxied(StreamKind::Tls),
                proxied(StreamKind::Https),
            ])
            .collect(),
        tls: Some(tls),
        udp_workers: 1,
    };
    let identify = {
        let clients = clients.clone();
        let locations = config.dns.locations.clone();
        Arc::new(move |from: SocketAddr| listener_client(from, &clients, &locations))
    };
    let server = DnsServer::new(resolver.clone(), upstream.clone(), identify);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let upstream = Arc::new(upstream);
    let shared = resolver.clone();
    std::thread::Builder::new()
        .name("waygate-dns".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("dns runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let running = match server.start(&server_config).await {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!(
                            "cannot listen on dns.listen {:?}: {e}",
                            server_config.udp
                        )));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((
                    running.stream_addr(StreamKind::Tcp, true),
                    running.stream_addr(StreamKind::Tls, true),
                    running.stream_addr(StreamKind::Https, true),
                )));
                let mut out = Vec::new();
                // Sums up malformed queries whose lines were held back, also after a flood ends.
                let mut log_tick = tokio::time::interval(LOG_POLL);
                log_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    let q = tokio::select! {
                        q = queries_rx.recv() => match q {
                            Some(q) => q,
                            None => break,
                        },
                        _ = log_tick.tick() => {
                            lock(&shared).poll_log(now());
                            continue;
                        }
                    };
                    let handled = lock(&shared).handle_query(
                        &q.client,
                        &q.payload,
                        Transport::Udp,
                        now(),
                        &mut out,
                    );
                    match handled {
                        Handled::Answer => {
                            let _ = answers.send(Answer {
                                peer: q.peer,
                                to: q.from,
                                from: q.to,
                                payload: std::mem::take(&mut out),
                            });
                        }
                        Handled::Upstream(ticket) => {
                            // Its own task, so a slow upstream holds up no other query.
                            let query = std::mem::take(&mut out);
                            let (shared, upstream, answers) =
                                (shared.clone(), upstream.clone(), answers.clone());
                            tokio::spawn(async move {
                                let mut out = Vec::new();
                                if resolve(&shared, &upstream, ticket, &query, &mut out).await {
                                    let _ = answers.send(Answer {
                                        peer: q.peer,
                                        to: q.from,
                                        from: q.to,
                                        payload: out,
                                    });
                                }
                            });
                        }
                        Handled::Drop => {}
                    }
                }
                drop(running);
            });
        })?;
    let (tcp, dot, doh) = ready_rx.recv().context("the dns thread stopped")??;
    Ok(ResolverHandle {
        queries: queries_tx,
        tcp_listener: tcp.context("no loopback listener for DNS over TCP")?,
        tls_listener: dot.context("no loopback listener for DNS over TLS")?,
        https_listener: doh.context("no loopback listener for DNS over HTTPS")?,
        clients,
        state,
        resolver,
    })
}

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    // A shell: the resolver thread reads the clock for its core.
    Instant::now()
}

impl ResolverHandle {
    /// Hands a device's query to the resolver.
    pub fn query(&self, query: Query) {
        let _ = self.queries.send(query);
    }

    /// Replaces the rules; queries already sent upstream keep their decisions.
    pub fn set_policy(&self, loaded: Arc<Loaded>) {
        let rules = {
            let mut s = lock(&self.state);
            s.loaded = loaded;
            s.rules()
        };
        lock(&self.resolver).set_policy(rules);
    }

    /// Replaces the GeoIP database the rules read.
    pub fn set_geoip(&self, geoip: Option<Arc<GeoIp>>) {
        let rules = {
            let mut s = lock(&self.state);
            s.geoip = geoip;
            s.rules()
        };
        lock(&self.resolver).set_policy(rules);
    }

    /// Replaces the domain categories the rules read.
    pub fn set_categories(&self, categories: Option<Arc<CategoryDb>>) {
        let rules = {
            let mut s = lock(&self.state);
            s.categories = categories;
            s.rules()
        };
        lock(&self.resolver).set_policy(rules);
    }

    /// Replaces the devices known by tunnel address.
    pub fn set_devices<'a>(&self, devices: impl IntoIterator<Item = &'a DeviceInfo>) {
        let mut map = HashMap::new();
        for d in devices {
            let d = Arc::new(d.clone());
            for ip in [IpAddr::V4(d.ipv4), IpAddr::V6(d.ipv6)] {
                map.insert(ip, device_client(&d, ip, None));
            }
        }
        *self.clients.write().unwrap_or_else(PoisonError::into_inner) = map;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(
            &path,
            "# comment\nsearch example.com\nnameserver 203.0.113.53\nnameserver 203.0.113.54\n",
        )
        .unwrap();
        assert_eq!(
            host_resolvers(&path),
            vec![
                Upstream::Plain("203.0.113.53:53".parse().unwrap()),
                Upstream::Plain("203.0.113.54:53".parse().unwrap())
            ]
        );
        assert!(host_resolvers(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn listener_queries_belong_to_a_device_a_location_or_an_address() {
        let clients: Clients = Arc::default();
        let office = DnsLocation {
            name: "office".into(),
            id: None,
            networks: vec!["198.51.100.0/24".parse().unwrap()],
        };
        let from: SocketAddr = "198.51.100.7:5353".parse().unwrap();
        let c = listener_client(from, &clients, std::slice::from_ref(&office));
        assert_eq!(c.location.as_deref(), Some("office"));
        let c = listener_client("203.0.113.7:53".parse().unwrap(), &clients, &[office]);
        assert_eq!((c.location, c.device), (None, None));
    }
}
