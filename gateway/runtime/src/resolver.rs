//! The gateway's resolver on a thread of its own (so DNS uses the second core and never stalls the
//! data plane): devices' UDP queries arrive as [`Query`] from the data plane and their answers go
//! back as [`Answer`]; DNS over TCP, TLS and HTTPS from devices arrives as flows handed over in
//! memory with the device's identity ([`super::local`]), served on this thread; `dns.listen` serves
//! networks without the client, attributed to `[[dns.locations]]`.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
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
use waygate_engine::flow::{DeviceInfo, LocalServices};
use waygate_geoip::GeoIp;
use waygate_stages::policy::Loaded;
use waygate_wg::PeerId;

use super::drops::{RuntimeDrop, RuntimeDrops};
use super::local::LocalServer;

/// How often the resolver thread lets the core report log lines it held back.
const LOG_POLL: Duration = Duration::from_secs(1);
/// Devices' queries waiting for the resolver thread, and answers and learned names waiting for
/// the data plane: a flood fills these, not memory (what does not fit is dropped and counted).
pub const DNS_QUEUE: usize = 4096;

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

/// The running resolver.
#[derive(Clone)]
pub struct ResolverHandle {
    queries: mpsc::Sender<Query>,
    drops: Arc<RuntimeDrops>,
    /// The gateway's services for devices' TCP flows (DNS over TCP, TLS, HTTPS), on the
    /// resolver's thread.
    pub local: Arc<LocalServer<DnsRules>>,
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

/// The client for a query to a `dns.listen` address from `from`: devices never reach these
/// (their flows to host addresses are refused), so it is a location's host or just an address.
fn listener_client(from: SocketAddr, locations: &[DnsLocation]) -> ClientCtx {
    let mut client = ClientCtx::from_ip(from.ip());
    client.location = locations
        .iter()
        .find(|l| l.networks.iter().any(|n| n.contains(&from.ip())))
        .map(|l| l.id.clone().unwrap_or_else(|| l.name.clone()));
    client
}

/// The data plane's ends of the resolver's queues (each holds [`DNS_QUEUE`]), one of each per
/// shard: answers go to the shard of the asking peer, learned names to the shard of the device.
pub struct ResolverOutputs {
    /// Answers to in-tunnel UDP queries.
    pub answers: Vec<mpsc::Receiver<Answer>>,
    /// What the resolver answered each device.
    pub learned: Vec<mpsc::Receiver<Learned>>,
}

/// Starts the resolver thread; answers to in-tunnel queries and what it answered each device come
/// out of the returned [`ResolverOutputs`], what its queues drop is counted in `drops`. The
/// services of `local` serve devices' flows; DNS over TLS and HTTPS serve the certificate in `tls`.
/// `shards` says which shard each peer and device is on.
pub fn spawn(
    config: &Config,
    max_pending: usize,
    tls: TlsConfigs,
    local: &LocalServices,
    drops: Arc<RuntimeDrops>,
    shards: crate::shard::DeviceShards,
) -> anyhow::Result<(ResolverHandle, ResolverOutputs)> {
    let workers = shards.count();
    let (answers, answers_rx): (Vec<_>, Vec<_>) = (0..workers)
        .map(|_| mpsc::channel::<Answer>(DNS_QUEUE))
        .unzip();
    let answers: Arc<[mpsc::Sender<Answer>]> = answers.into();
    let (learned, learned_rx): (Vec<_>, Vec<_>) = (0..shards.count())
        .map(|_| mpsc::channel::<Learned>(DNS_QUEUE))
        .unzip();
    let shards_for_answers = shards.clone();
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
    let learn_drops = drops.clone();
    lock(&resolver).set_learn_sink(Box::new(move |device_id, ip, names, ttl| {
        let sent = learned[shards.of_device(device_id)].try_send(Learned {
            device_id: device_id.to_string(),
            ip,
            names: names.clone(),
            ttl,
        });
        if let Err(mpsc::error::TrySendError::Full(_)) = sent {
            learn_drops.add(RuntimeDrop::LearnedNameQueueFull);
        }
    }));
    let (queries_tx, mut queries_rx) = mpsc::channel::<Query>(DNS_QUEUE);
    let answer_drops = drops.clone();
    let send_answer = move |answers: &[mpsc::Sender<Answer>], answer: Answer| {
        let to = &answers[shards_for_answers.of_peer(answer.peer)];
        if let Err(mpsc::error::TrySendError::Full(_)) = to.try_send(answer) {
            answer_drops.add(RuntimeDrop::DnsAnswerQueueFull);
        }
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
            })
            .collect(),
        // dns.listen is plain DNS; DoT and DoH are for devices, through `local`.
        tls: None,
        udp_workers: 1,
    };
    let identify = {
        let locations = config.dns.locations.clone();
        Arc::new(move |from: SocketAddr| listener_client(from, &locations))
    };
    let server = DnsServer::new(resolver.clone(), upstream.clone(), identify);
    let streams = server.streams();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let upstream = Arc::new(upstream);
    let shared = resolver.clone();
    // With shards, the resolver gets as many worker threads: the query loop below stays one task
    // (the resolver is one locked state; a cached answer costs ~3,900 instructions, so one core
    // answers over 100,000 queries a second), while upstream exchanges and the DoT, DoH and TCP
    // connections of `local`, whose TLS is most of encrypted DNS's CPU, spread over the workers.
    std::thread::Builder::new()
        .name("waygate-dns".into())
        .spawn(move || {
            let rt = match crate::service_runtime(workers, "waygate-dns") {
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
                let _ = ready_tx.send(Ok(tokio::runtime::Handle::current()));
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
                        Handled::Answer => send_answer(
                            &answers[..],
                            Answer {
                                peer: q.peer,
                                to: q.from,
                                from: q.to,
                                payload: std::mem::take(&mut out),
                            },
                        ),
                        Handled::Upstream(ticket) => {
                            // Its own task, so a slow upstream holds up no other query.
                            let query = std::mem::take(&mut out);
                            let (shared, upstream, answers, send_answer) = (
                                shared.clone(),
                                upstream.clone(),
                                answers.clone(),
                                send_answer.clone(),
                            );
                            tokio::spawn(async move {
                                let mut out = Vec::new();
                                if resolve(&shared, &upstream, ticket, &query, &mut out).await {
                                    let answer = Answer {
                                        peer: q.peer,
                                        to: q.from,
                                        from: q.to,
                                        payload: out,
                                    };
                                    send_answer(&answers[..], answer);
                                }
                            });
                        }
                        Handled::Drop => {}
                    }
                }
                drop(running);
            });
        })?;
    let runtime = ready_rx.recv().context("the dns thread stopped")??;
    let handle = ResolverHandle {
        queries: queries_tx,
        drops,
        local: Arc::new(LocalServer::new(runtime, streams, &tls, local)),
        state,
        resolver,
    };
    let outputs = ResolverOutputs {
        answers: answers_rx,
        learned: learned_rx,
    };
    Ok((handle, outputs))
}

#[allow(clippy::disallowed_methods)]
fn now() -> Instant {
    // A shell: the resolver thread reads the clock for its core.
    Instant::now()
}

impl ResolverHandle {
    /// Hands a device's query to the resolver; dropped (and counted) when its queue is full.
    pub fn query(&self, query: Query) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queries.try_send(query) {
            self.drops.add(RuntimeDrop::DnsQueryQueueFull);
        }
    }

    /// Reports every answered query to the activity logs from now on.
    pub fn log_activity(&self, logs: waygate_observe::LogSender) {
        let sink = move |a: &waygate_model::activity::DnsActivity<'_>| logs.dns(a);
        lock(&self.resolver).set_activity_sink(Box::new(sink));
    }

    /// The resolver's counters.
    pub fn stats(&self) -> crate::dns::Stats {
        lock(&self.resolver).stats()
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
    fn listener_queries_belong_to_a_location_or_an_address() {
        let office = DnsLocation {
            name: "office".into(),
            id: None,
            networks: vec!["198.51.100.0/24".parse().unwrap()],
        };
        let from: SocketAddr = "198.51.100.7:5353".parse().unwrap();
        let c = listener_client(from, std::slice::from_ref(&office));
        assert_eq!(c.location.as_deref(), Some("office"));
        let c = listener_client("203.0.113.7:53".parse().unwrap(), &[office]);
        assert_eq!((c.location, c.device), (None, None));
    }
}
