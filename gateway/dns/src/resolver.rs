//! The sans-IO resolver core.
//!
//! Inputs: a client's query bytes ([`Resolver::handle_query`]) and an upstream's response bytes, or
//! its failure ([`Resolver::handle_upstream`]), each with `now`. Outputs: the bytes to send, written
//! into the caller's buffer, and a [`Handled`] naming the next action. The shell owns sockets and
//! the clock and keeps the reply route of each [`Ticket`]. Nothing here panics on input bytes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::svcb::{SvcParamKey, SVCB};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, HTTPS};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};

use super::cache::{Address, Cache, Replay};
use super::memory::Names;
use super::policy::{
    BlockMode, ClientCtx, ClientKey, Decision, DnsPolicy, LogCategories, PolicyVerdict, QueryInfo,
};
use super::wire::{push_record, NameText, QueryView, WireAnswer};
use crate::loglimit::LogLimit;
use waygate_model::activity::{DnsActivity, ResolverDecision, RuleRef};
use waygate_model::DeviceInfo;

/// Largest DNS message over TCP.
pub const MAX_MESSAGE: usize = 65535;
/// UDP payload without EDNS (RFC 1035).
pub const CLASSIC_UDP: usize = 512;
/// UDP payload we accept and advertise upstream (the DNS Flag Day 2020 value).
pub const EDNS_UDP: u16 = 1232;
/// Malformed queries logged per [`MALFORMED_LOG_EVERY`]; the rest are summed up in one line.
/// One device flooding garbage once wrote 221,510 lines in 12 s.
pub const MALFORMED_LOG_BURST: u32 = 10;
/// Interval of the malformed-query log limit.
pub const MALFORMED_LOG_EVERY: Duration = Duration::from_secs(10);

/// Resolver sizes and TTLs; `Default` gives the documented values.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// Cached answers (default 100,000).
    pub cache_capacity: usize,
    /// Cap on positive TTLs in the cache (default 1 day).
    pub max_ttl: u32,
    /// Cap on negative TTLs (default 1 hour, RFC 2308 suggests 1-3 hours).
    pub max_negative_ttl: u32,
    /// TTL of locally made answers: blocks and overrides (default 10 s, as AdGuard Home).
    pub local_ttl: u32,
    /// Upstream queries in flight at once; more are answered SERVFAIL (default 4,096).
    pub max_pending: usize,
    /// Upstream queries in flight at once for one client (a device, or a source address);
    /// more are answered SERVFAIL, so one client cannot take every upstream socket (default
    /// 256).
    pub max_pending_per_client: usize,
}

impl Default for ResolverConfig {
    fn default() -> Self {
        ResolverConfig {
            cache_capacity: 100_000,
            max_ttl: 86_400,
            max_negative_ttl: 3_600,
            local_ttl: 10,
            max_pending: 4_096,
            max_pending_per_client: 256,
        }
    }
}

/// How the query arrived; decides the answer's size limit and the log's `Protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Datagram: answers beyond the client's payload size are truncated (TC).
    Udp,
    /// Plain TCP: up to 64 KiB.
    Stream,
    /// DNS over TLS (RFC 7858): a stream, up to 64 KiB.
    Tls,
    /// DNS over HTTPS (RFC 8484): one message per request, up to 64 KiB.
    Https,
}

impl Transport {
    /// Logpush's `Protocol` word: `udp`, `tcp`, `tls` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Stream => "tcp",
            Transport::Tls => "tls",
            Transport::Https => "https",
        }
    }
}

/// Identifies one upstream query; it is also the upstream message id, drawn at random.
pub type Ticket = u16;

/// What the shell does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// Send the buffer to the client.
    Answer,
    /// Send the buffer (a query) upstream; feed the response back with this ticket.
    Upstream(Ticket),
    /// Send nothing (unreadable bytes, a response instead of a query, unknown ticket).
    Drop,
}

/// Which address hints an HTTPS/SVCB answer loses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Hints {
    v4: bool,
    v6: bool,
}

struct Pending {
    client: ClientCtx,
    id: u16,
    qname: Name,
    qtype: RecordType,
    /// Set when the answer is a CNAME to this target followed by the target's records.
    target: Option<Name>,
    verdict: PolicyVerdict,
    /// Address hints to drop from HTTPS/SVCB answers: the family the policy blocks.
    strip: Hints,
    limit: usize,
    recursion_desired: bool,
    edns: bool,
    started: Instant,
    transport: Transport,
}

/// Counters since start, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Queries handled (all outcomes).
    pub queries: u64,
    /// Answered from the cache.
    pub cache_hits: u64,
    /// Of those, replayed from the bytes sent before (the fast path).
    pub replayed: u64,
    /// Sent upstream.
    pub upstream: u64,
    /// Answered FORMERR.
    pub formerr: u64,
    /// Answered SERVFAIL because the upstream failed or too many were pending.
    pub servfail: u64,
    /// Of those, because the client had `max_pending_per_client` queries pending.
    pub client_limited: u64,
    /// Answered locally by a policy decision.
    pub local: u64,
    /// Unreadable datagrams dropped.
    pub dropped: u64,
    /// Upstream queries that failed: no usable response from any upstream (answered SERVFAIL).
    pub upstream_errors: u64,
    /// Answers by question type ([`QTYPES`]) and response code ([`RCODES`]).
    pub answers: [[u64; RCODES.len()]; QTYPES.len()],
    /// Policy decisions by action ([`DNS_ACTIONS`]).
    pub decisions: [u64; DNS_ACTIONS.len()],
    /// How long upstream queries took.
    pub upstream_latency: LatencyHistogram,
}

/// Question types counted apart; the last, `other`, takes every other type (the label set of
/// the metrics stays bounded whatever devices ask).
pub const QTYPES: [&str; 13] = [
    "A", "AAAA", "CNAME", "HTTPS", "MX", "NS", "PTR", "SOA", "SRV", "SVCB", "TXT", "ANY", "other",
];
/// Response codes counted apart; the last, `other`, takes the rest.
pub const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "other",
];
/// Policy actions of the DNS stage, as the metrics label them.
pub const DNS_ACTIONS: [&str; 4] = ["allow", "block", "override", "safesearch"];
/// Upper bounds, in seconds, of the upstream latency histogram's buckets (the last bucket,
/// +Inf, is implied).
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// A latency histogram with fixed buckets: counts per bucket (not cumulative), then +Inf.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyHistogram {
    /// Observations per bucket of [`LATENCY_BUCKETS`], the last one above them all.
    pub buckets: [u64; LATENCY_BUCKETS.len() + 1],
    /// Sum of the observations, in microseconds.
    pub sum_micros: u64,
}

impl LatencyHistogram {
    /// Adds one observation.
    pub fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i] += 1;
        self.sum_micros = self
            .sum_micros
            .saturating_add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }

    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

fn qtype_index(qtype: RecordType) -> usize {
    let name: &'static str = qtype.into();
    QTYPES[..QTYPES.len() - 1]
        .iter()
        .position(|t| *t == name)
        .unwrap_or(QTYPES.len() - 1)
}

fn rcode_index(rcode: ResponseCode) -> usize {
    match rcode {
        ResponseCode::NoError => 0,
        ResponseCode::FormErr => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::NXDomain => 3,
        ResponseCode::NotImp => 4,
        ResponseCode::Refused => 5,
        _ => 6,
    }
}

fn action_index(decision: ResolverDecision) -> Option<usize> {
    match decision {
        ResolverDecision::AllowedOnNoPolicyMatch | ResolverDecision::AllowedByQueryName => Some(0),
        ResolverDecision::BlockedByQueryName | ResolverDecision::BlockedByResponse => Some(1),
        ResolverDecision::OverrideApplied => Some(2),
        ResolverDecision::OverrideForSafeSearch => Some(3),
        ResolverDecision::Unknown => None,
    }
}

/// Told of every answered query with its activity record, while the runtime keeps activity
/// logs; building the record is skipped when none is set.
pub type ActivitySink = Box<dyn FnMut(&DnsActivity<'_>) + Send>;

/// What one answered query was, for its counters and its activity record.
struct Answered<'a> {
    client: &'a ClientCtx,
    name: &'a str,
    /// The name the record shows, when it differs from `name` (the host of a cached answer).
    shared: Option<&'a Arc<str>>,
    qtype: RecordType,
    rcode: ResponseCode,
    decision: ResolverDecision,
    policy: Option<Arc<RuleRef>>,
    transport: Transport,
    cache_hit: bool,
    upstream_latency: Option<Duration>,
    now: Instant,
}

/// Told of every address the resolver answers to a device (by its registry id), with the names
/// behind it and the answer's TTL; the data plane's name memory is built from these.
pub type LearnSink = Box<dyn FnMut(&str, IpAddr, &Names, u32) + Send>;

/// The resolver state machine: policy, cache, pending upstream queries.
pub struct Resolver<P> {
    policy: P,
    learn: Option<LearnSink>,
    activity: Option<ActivitySink>,
    config: ResolverConfig,
    cache: Cache,
    pending: HashMap<Ticket, Pending>,
    /// Pending queries per client.
    pending_by_client: HashMap<ClientKey, usize>,
    rng: u64,
    stats: Stats,
    malformed_log: LogLimit,
    /// Who sent the last malformed query that was not logged, for the summary line.
    malformed_last: Option<(Option<Arc<DeviceInfo>>, IpAddr)>,
    /// The answered addresses of the activity record being made, reused: a replayed answer
    /// cost an allocation and a free per query for its record (callgrind, dns_query bench).
    scratch_ips: Vec<IpAddr>,
    /// The categories of the activity record being made, reused likewise.
    log_categories: LogCategories,
}

/// What the fast path made of a query.
enum Fast {
    /// Answered.
    Done(Handled),
    /// Decided, not answered: the full path goes on with this verdict.
    Decided(PolicyVerdict),
}

/// Fixed parts of the answer being built.
struct Reply<'a> {
    id: u16,
    query: &'a Query,
    rd: bool,
    edns: bool,
    limit: usize,
    transport: Transport,
    now: Instant,
}

impl<P: DnsPolicy> Resolver<P> {
    /// A resolver; `seed` feeds the upstream id generator (the shell passes OS randomness).
    pub fn new(policy: P, config: ResolverConfig, seed: u64) -> Self {
        Resolver {
            policy,
            learn: None,
            activity: None,
            cache: Cache::new(
                config.cache_capacity,
                config.max_ttl,
                config.max_negative_ttl,
            ),
            config,
            pending: HashMap::new(),
            pending_by_client: HashMap::new(),
            // xorshift must not start at zero.
            rng: seed | 1,
            stats: Stats::default(),
            malformed_log: LogLimit::new(MALFORMED_LOG_BURST, MALFORMED_LOG_EVERY),
            malformed_last: None,
            scratch_ips: Vec::new(),
            log_categories: LogCategories::default(),
        }
    }

    /// Counters since start.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Logs how many malformed queries went unlogged once their interval is over; the shell
    /// calls it every few seconds so a flood that stopped is still summed up.
    pub fn poll_log(&mut self, now: Instant) {
        if let Some(suppressed) = self.malformed_log.poll(now) {
            self.log_suppressed(suppressed);
        }
    }

    /// Upstream queries awaiting an answer.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Reports every answered address to `sink` from now on.
    pub fn set_learn_sink(&mut self, sink: LearnSink) {
        self.learn = Some(sink);
    }

    /// Reports every answered query to `sink` from now on (activity logs).
    pub fn set_activity_sink(&mut self, sink: ActivitySink) {
        self.activity = Some(sink);
    }

    /// Counts an answered query and, while activity logs are kept, reports it; `answers` puts
    /// the addresses into the record's list only then (the fast path has put them in
    /// `scratch_ips` already).
    fn answered(&mut self, a: Answered<'_>, answers: impl FnOnce(&mut Vec<IpAddr>)) {
        self.stats.answers[qtype_index(a.qtype)][rcode_index(a.rcode)] += 1;
        if let Some(i) = action_index(a.decision) {
            self.stats.decisions[i] += 1;
        }
        let Some(sink) = &mut self.activity else {
            return;
        };
        let mut resolved_ips = std::mem::take(&mut self.scratch_ips);
        answers(&mut resolved_ips);
        let name = a.shared.map_or(a.name, |s| &**s);
        let categories = &mut self.log_categories;
        categories.clear();
        self.policy
            .log_categories(name, a.policy.as_deref(), &resolved_ips, categories);
        sink(&DnsActivity {
            at: a.now,
            device: a.client.device.as_deref(),
            location: a.client.location.as_deref(),
            src_ip: a.client.src_ip,
            query_name: name,
            query_type: u16::from(a.qtype),
            query_type_name: a.qtype.into(),
            rcode: u16::from(a.rcode),
            resolved_ips: &resolved_ips,
            decision: a.decision,
            policy: a.policy.as_deref(),
            protocol: a.transport.as_str(),
            cache_hit: a.cache_hit,
            upstream_latency: a.upstream_latency,
            query_categories: &categories.query,
            matched_categories: &categories.matched,
            resolved_ip_categories: &categories.resolved_ips,
        });
        resolved_ips.clear();
        self.scratch_ips = resolved_ips;
    }

    /// Replaces the policy (a rules reload); pending queries keep their decisions.
    pub fn set_policy(&mut self, policy: P) {
        self.policy = policy;
    }

    /// Handles one query from `client`; writes the answer or the upstream query into `out`.
    pub fn handle_query(
        &mut self,
        client: &ClientCtx,
        bytes: &[u8],
        transport: Transport,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Handled {
        self.stats.queries += 1;
        out.clear();
        let mut text = NameText::default();
        let mut decided = None;
        if let Some(view) = QueryView::parse(bytes, &mut text) {
            match self.fast_query(client, &view, text.as_str(), transport, now, out) {
                Fast::Done(handled) => return handled,
                Fast::Decided(verdict) => decided = Some(verdict),
            }
        }
        let msg = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(_) => return self.formerr(client, bytes, now, out),
        };
        if msg.message_type() != MessageType::Query {
            // Answering responses would let two resolvers ping-pong forever.
            self.stats.dropped += 1;
            return Handled::Drop;
        }
        let edns = msg.extensions().is_some();
        let limit = match transport {
            Transport::Stream | Transport::Tls | Transport::Https => MAX_MESSAGE,
            Transport::Udp => msg.extensions().as_ref().map_or(CLASSIC_UDP, |e| {
                usize::from(e.max_payload()).clamp(CLASSIC_UDP, 4096)
            }),
        };
        let [query] = msg.queries() else {
            return self.formerr(client, bytes, now, out);
        };
        let reply = Reply {
            id: msg.id(),
            query,
            rd: msg.recursion_desired(),
            edns,
            limit,
            transport,
            now,
        };
        if msg.op_code() != OpCode::Query || query.query_class() != DNSClass::IN {
            // Not a policy decision, and anyone can send these as fast as garbage.
            if !self.admit_malformed(client, now) {
                self.stats.local += 1;
                let (t, r) = (
                    qtype_index(query.query_type()),
                    rcode_index(ResponseCode::NotImp),
                );
                self.stats.answers[t][r] += 1;
                emit(&reply, ResponseCode::NotImp, Vec::new(), Vec::new(), out);
                return Handled::Answer;
            }
            return self.local(
                &reply,
                ResponseCode::NotImp,
                Vec::new(),
                client,
                "notimp",
                None,
                (ResolverDecision::Unknown, None),
                out,
            );
        }
        let qname = query.name().to_lowercase();
        let name = display_name(&qname);
        let qtype = query.query_type();
        // The fast path read the same name and type, and its verdict stands.
        let verdict = decided.unwrap_or_else(|| {
            self.policy.decide(&QueryInfo {
                client,
                name: &name,
                qtype,
            })
        });
        let ttl = self.config.local_ttl;
        let rewritable = matches!(qtype, RecordType::A | RecordType::AAAA | RecordType::HTTPS);
        let (resolve, target) = match &verdict.decision {
            Decision::Resolve => (qname.clone(), None),
            Decision::Block(mode) => {
                let (rcode, answers) = block_answer(*mode, query, ttl);
                let label = verdict.decision.label();
                let rule = verdict.rule.clone();
                let decided = (verdict.resolver_decision(false), verdict.policy.clone());
                return self.local(&reply, rcode, answers, client, label, rule, decided, out);
            }
            Decision::OverrideIps(ips) => {
                let (rcode, answers) = if rewritable {
                    let answers = ips
                        .iter()
                        .filter_map(|ip| address_record(query.name(), *ip, qtype, ttl))
                        .collect();
                    (ResponseCode::NoError, answers)
                } else {
                    (ResponseCode::Refused, Vec::new())
                };
                let rule = verdict.rule.clone();
                let decided = (verdict.resolver_decision(false), verdict.policy.clone());
                return self.local(
                    &reply,
                    rcode,
                    answers,
                    client,
                    "override_ips",
                    rule,
                    decided,
                    out,
                );
            }
            Decision::OverrideHost(host) if rewritable => (host.to_lowercase(), Some(host.clone())),
            Decision::OverrideHost(_) => {
                let rule = verdict.rule.clone();
                let decided = (verdict.resolver_decision(false), verdict.policy.clone());
                return self.local(
                    &reply,
                    ResponseCode::Refused,
                    Vec::new(),
                    client,
                    "override_host",
                    rule,
                    decided,
                    out,
                );
            }
            Decision::SafeSearch(host) if rewritable => (host.to_lowercase(), Some(host.clone())),
            // SafeSearch rewrites only address lookups; MX, TXT & co. resolve as asked.
            Decision::SafeSearch(_) => (qname.clone(), None),
        };

        // A client that may not learn addresses of one family must not learn them from hints.
        let mut strip = Hints::default();
        if matches!(qtype, RecordType::HTTPS | RecordType::SVCB) {
            let blocked = |t| {
                let v = self.policy.decide(&QueryInfo {
                    client,
                    name: &name,
                    qtype: t,
                });
                matches!(v.decision, Decision::Block(_))
            };
            strip = Hints {
                v4: blocked(RecordType::A),
                v6: blocked(RecordType::AAAA),
            };
        }
        let resolve_name = match &target {
            Some(_) => display_name(&resolve),
            None => name.clone(),
        };
        {
            if let Some(hit) = self.cache.get(&resolve_name, qtype, now) {
                self.stats.cache_hits += 1;
                let age = hit.age(now);
                let rcode = hit.rcode;
                let mut answers = Vec::with_capacity(hit.answers.len() + 1);
                if let Some(t) = &target {
                    answers.push(cname(query.name(), t, ttl));
                }
                answers.extend(hit.answers.iter().map(|r| strip_hints(aged(r, age), strip)));
                let authority: Vec<Record> = hit.authority.iter().map(|r| aged(r, age)).collect();
                if self.policy.wants_answer() && matches!(verdict.decision, Decision::Resolve) {
                    let info = QueryInfo {
                        client,
                        name: &name,
                        qtype,
                    };
                    if let Some(v) = self.policy.decide_answer(&info, &answers) {
                        if let Decision::Block(mode) = v.decision {
                            let (rcode, blocked) = block_answer(mode, query, ttl);
                            let rule = v.rule.clone();
                            let decided = (v.resolver_decision(true), v.policy.clone());
                            return self.local(
                                &reply,
                                rcode,
                                blocked,
                                client,
                                v.decision.label(),
                                rule,
                                decided,
                                out,
                            );
                        }
                    }
                }
                let learned = self.remember(client, &qname, &answers);
                let answered = Answered {
                    client,
                    name: &name,
                    shared: Some(&name),
                    qtype,
                    rcode,
                    decision: verdict.resolver_decision(false),
                    policy: verdict.policy.clone(),
                    transport,
                    cache_hit: true,
                    upstream_latency: None,
                    now,
                };
                self.answered(answered, |v| *v = ips_of(&learned));
                emit(&reply, rcode, answers, authority, out);
                if self.replayable(qtype, &verdict.decision, target.is_some()) {
                    self.keep_replay(&name, qtype, out, learned, now);
                }
                log_query(
                    client,
                    &name,
                    qtype,
                    &verdict,
                    rcode,
                    None,
                    true,
                    Duration::ZERO,
                );
                return Handled::Answer;
            }
        }

        let key = client.key();
        let held = self.pending_by_client.get(&key).copied().unwrap_or(0);
        if held >= self.config.max_pending_per_client {
            self.stats.servfail += 1;
            self.stats.client_limited += 1;
            return self.local(
                &reply,
                ResponseCode::ServFail,
                Vec::new(),
                client,
                "client limit",
                None,
                (ResolverDecision::Unknown, None),
                out,
            );
        }
        if self.pending.len() >= self.config.max_pending {
            self.stats.servfail += 1;
            return self.local(
                &reply,
                ResponseCode::ServFail,
                Vec::new(),
                client,
                "overload",
                None,
                (ResolverDecision::Unknown, None),
                out,
            );
        }
        let ticket = self.fresh_ticket();
        let mut up = Message::new();
        up.set_id(ticket)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(resolve, qtype));
        let mut e = Edns::new();
        e.set_max_payload(EDNS_UDP);
        up.set_edns(e);
        if emit_message(&up, out).is_err() {
            return self.local(
                &reply,
                ResponseCode::ServFail,
                Vec::new(),
                client,
                "encode",
                None,
                (ResolverDecision::Unknown, None),
                out,
            );
        }
        *self.pending_by_client.entry(key).or_default() += 1;
        self.pending.insert(
            ticket,
            Pending {
                client: client.clone(),
                id: reply.id,
                qname,
                qtype,
                target,
                verdict,
                strip,
                limit,
                recursion_desired: reply.rd,
                edns,
                started: now,
                transport,
            },
        );
        self.stats.upstream += 1;
        Handled::Upstream(ticket)
    }

    /// Handles the upstream's response for `ticket` (`None`: every upstream failed or timed out);
    /// writes the client's answer into `out`. `upstream` names the server for the log line.
    pub fn handle_upstream(
        &mut self,
        ticket: Ticket,
        response: Option<&[u8]>,
        upstream: &str,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Handled {
        out.clear();
        let Some(p) = self.pending.remove(&ticket) else {
            return Handled::Drop;
        };
        let key = p.client.key();
        if let Some(n) = self.pending_by_client.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending_by_client.remove(&key);
            }
        }
        let query = Query::query(p.qname.clone(), p.qtype);
        let reply = Reply {
            id: p.id,
            query: &query,
            rd: p.recursion_desired,
            edns: p.edns,
            limit: p.limit,
            transport: p.transport,
            now,
        };
        let resolved = p.target.as_ref().map_or(&p.qname, |t| t).to_lowercase();
        let parsed = response
            .and_then(|b| Message::from_vec(b).ok())
            .filter(|m| {
                m.id() == ticket
                    && m.message_type() == MessageType::Response
                    && m.queries().len() == 1
                    && m.queries()[0].name() == &resolved
                    && m.queries()[0].query_type() == p.qtype
            });
        let latency = now.saturating_duration_since(p.started);
        self.stats.upstream_latency.observe(latency);
        let name = display_name(&p.qname);
        let mut answered = Answered {
            client: &p.client,
            name: &name,
            shared: Some(&name),
            qtype: p.qtype,
            rcode: ResponseCode::ServFail,
            decision: p.verdict.resolver_decision(false),
            policy: p.verdict.policy.clone(),
            transport: p.transport,
            cache_hit: false,
            upstream_latency: Some(latency),
            now,
        };
        let Some(mut m) = parsed else {
            self.stats.servfail += 1;
            self.stats.upstream_errors += 1;
            self.answered(answered, |_| {});
            emit(&reply, ResponseCode::ServFail, Vec::new(), Vec::new(), out);
            let up = Some(upstream);
            log_query(
                &p.client,
                &display_name(&p.qname),
                p.qtype,
                &p.verdict,
                ResponseCode::ServFail,
                up,
                false,
                latency,
            );
            return Handled::Answer;
        };
        let rcode = m.response_code();
        let answers = m.take_answers();
        let authority = m.take_name_servers();
        let cached = !m.truncated()
            && self
                .cache
                .insert(
                    &display_name(&resolved),
                    p.qtype,
                    rcode,
                    &answers,
                    &authority,
                    now,
                )
                .is_some();
        answered.rcode = rcode;
        let mut verdict = p.verdict;
        if self.policy.wants_answer() && matches!(verdict.decision, Decision::Resolve) {
            let info = QueryInfo {
                client: &p.client,
                name: &name,
                qtype: p.qtype,
            };
            if let Some(v) = self.policy.decide_answer(&info, &answers) {
                verdict = v;
                if let Decision::Block(mode) = verdict.decision {
                    let (rcode, blocked) = block_answer(mode, &query, self.config.local_ttl);
                    answered.rcode = rcode;
                    answered.decision = verdict.resolver_decision(true);
                    answered.policy = verdict.policy.clone();
                    let ips = ips_of_records(&blocked);
                    self.answered(answered, move |v| *v = ips);
                    emit(&reply, rcode, blocked, Vec::new(), out);
                    self.stats.local += 1;
                    let up = Some(upstream);
                    log_query(
                        &p.client, &name, p.qtype, &verdict, rcode, up, false, latency,
                    );
                    return Handled::Answer;
                }
            }
        }
        let mut out_answers = Vec::with_capacity(answers.len() + 1);
        if let Some(t) = &p.target {
            out_answers.push(cname(query.name(), t, self.config.local_ttl));
        }
        out_answers.extend(answers.into_iter().map(|r| strip_hints(r, p.strip)));
        let learned = self.remember(&p.client, &p.qname, &out_answers);
        self.answered(answered, |v| *v = ips_of(&learned));
        emit(&reply, rcode, out_answers, authority, out);
        let replayable = self.replayable(p.qtype, &verdict.decision, p.target.is_some());
        if replayable && cached {
            self.keep_replay(&name, p.qtype, out, learned, now);
        }
        log_query(
            &p.client,
            &name,
            p.qtype,
            &verdict,
            rcode,
            Some(upstream),
            false,
            latency,
        );
        Handled::Answer
    }

    fn fresh_ticket(&mut self) -> Ticket {
        loop {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            let t = (self.rng >> 32) as u16;
            if !self.pending.contains_key(&t) {
                return t;
            }
        }
    }

    /// Reports every address in `answers` for `client` under the CNAME chain from `qname`, and
    /// returns them for a replay to report again.
    fn remember(
        &mut self,
        client: &ClientCtx,
        qname: &Name,
        answers: &[Record],
    ) -> Option<(Names, Vec<Address>)> {
        let (names, ips) = addresses(qname, answers)?;
        learn(&mut self.learn, client, &names, &ips, 0);
        Some((names, ips))
    }

    /// Whether answers to `qtype` decided so may be replayed from their bytes: resolved as asked
    /// (`rewritten`: not through a CNAME the policy chose), with no rule reading the answer and
    /// no address hints the policy might strip.
    fn replayable(&self, qtype: RecordType, decision: &Decision, rewritten: bool) -> bool {
        matches!(decision, Decision::Resolve)
            && !rewritten
            && !matches!(qtype, RecordType::HTTPS | RecordType::SVCB)
            && !self.policy.wants_answer()
    }

    /// Keeps `response` (just sent for `name`/`qtype`) with the cached answer it came from,
    /// for the fast path.
    fn keep_replay(
        &mut self,
        name: &str,
        qtype: RecordType,
        response: &[u8],
        learned: Option<(Names, Vec<Address>)>,
        now: Instant,
    ) {
        if let Some(wire) = WireAnswer::capture(response, now) {
            let learned = learned.map(|(names, ips)| (names, ips.into_boxed_slice()));
            self.cache
                .attach_replay(name, qtype, Replay { wire, learned });
        }
    }

    /// The common query without a message object: policy blocks answered from the query's own
    /// bytes, resolved names replayed from the bytes sent last time. Anything else goes down
    /// the full path with the verdict made here.
    fn fast_query(
        &mut self,
        client: &ClientCtx,
        query: &QueryView<'_>,
        name: &str,
        transport: Transport,
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Fast {
        let qtype = RecordType::from(query.qtype);
        let verdict = self.policy.decide(&QueryInfo {
            client,
            name,
            qtype,
        });
        // The asked name, shared, when the cache holds it so (replays of learned answers).
        let mut host: Option<Arc<str>> = None;
        // The record's addresses go into `scratch_ips` (empty here) for `answered`.
        let (rcode, cache_hit, decision) = match &verdict.decision {
            Decision::Block(mode) => {
                let (rcode, address) = match *mode {
                    BlockMode::Refused => (ResponseCode::Refused, None),
                    BlockMode::NxDomain => (ResponseCode::NXDomain, None),
                    BlockMode::ZeroIp if qtype == RecordType::AAAA => {
                        (ResponseCode::NoError, Some(IpAddr::from([0u16; 8])))
                    }
                    BlockMode::ZeroIp => (ResponseCode::NoError, Some(IpAddr::from([0u8; 4]))),
                    BlockMode::Address(ip) => (ResponseCode::NoError, Some(ip)),
                };
                // Like `block_answer`: an address only for a question of its family.
                let (v4, v6);
                let rdata: Option<&[u8]> = match (address, qtype) {
                    (Some(IpAddr::V4(a)), RecordType::A) => {
                        v4 = a.octets();
                        Some(&v4)
                    }
                    (Some(IpAddr::V6(a)), RecordType::AAAA) => {
                        v6 = a.octets();
                        Some(&v6)
                    }
                    _ => None,
                };
                query.start_response(rcode.low(), u16::from(rdata.is_some()), 0, out);
                if let Some(rdata) = rdata {
                    push_record(query.qtype, self.config.local_ttl, rdata, out);
                }
                query.finish(EDNS_UDP, out);
                self.stats.local += 1;
                if let (Some(ip), true) = (address, rdata.is_some()) {
                    if self.activity.is_some() {
                        self.scratch_ips.push(ip);
                    }
                }
                (rcode, false, verdict.resolver_decision(false))
            }
            Decision::Resolve if self.replayable(qtype, &verdict.decision, false) => {
                let limit = match transport {
                    Transport::Stream | Transport::Tls | Transport::Https => MAX_MESSAGE,
                    Transport::Udp => query
                        .edns_payload
                        .map_or(CLASSIC_UDP, |p| usize::from(p).clamp(CLASSIC_UDP, 4096)),
                };
                let Some(hit) = self
                    .cache
                    .get(name, qtype, now)
                    .and_then(|e| e.replay.as_ref())
                else {
                    return Fast::Decided(verdict);
                };
                hit.wire.replay(query, EDNS_UDP, now, out);
                if out.len() > limit {
                    // The full path answers with TC set.
                    out.clear();
                    return Fast::Decided(verdict);
                }
                if let Some((names, ips)) = &hit.learned {
                    let age = hit.wire.age(now);
                    learn(&mut self.learn, client, names, ips, age);
                    if self.activity.is_some() {
                        self.scratch_ips.extend(ips.iter().map(|a| a.0));
                        host = Some(names.host.clone());
                    }
                }
                self.stats.cache_hits += 1;
                self.stats.replayed += 1;
                (
                    ResponseCode::from(0, out.get(3).map_or(0, |b| b & 0x0f)),
                    true,
                    verdict.resolver_decision(false),
                )
            }
            _ => return Fast::Decided(verdict),
        };
        let answered = Answered {
            client,
            name,
            shared: host.as_ref(),
            qtype,
            rcode,
            decision,
            policy: verdict.policy.clone(),
            transport,
            cache_hit,
            upstream_latency: None,
            now,
        };
        self.answered(answered, |_| {});
        log_query(
            client,
            name,
            qtype,
            &verdict,
            rcode,
            None,
            cache_hit,
            Duration::ZERO,
        );
        Fast::Done(Handled::Answer)
    }

    fn formerr(
        &mut self,
        client: &ClientCtx,
        bytes: &[u8],
        now: Instant,
        out: &mut Vec<u8>,
    ) -> Handled {
        // Too short for an id, or a response: nothing sensible to answer.
        let (Some(&hi), Some(&lo)) = (bytes.first(), bytes.get(1)) else {
            self.stats.dropped += 1;
            return Handled::Drop;
        };
        if bytes.get(2).is_some_and(|flags| flags & 0x80 != 0) {
            self.stats.dropped += 1;
            return Handled::Drop;
        }
        self.stats.formerr += 1;
        self.stats.answers[QTYPES.len() - 1][rcode_index(ResponseCode::FormErr)] += 1;
        let id = u16::from_be_bytes([hi, lo]);
        let msg = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
        if emit_message(&msg, out).is_err() {
            out.clear();
            return Handled::Drop;
        }
        if self.admit_malformed(client, now) {
            let device = client.device.as_deref();
            tracing::info!(
                target: "waygate::dns",
                device = device.map_or("", |d| d.name.as_str()),
                device_id = device.map_or("", |d| d.id.as_str()),
                location = client.location.as_deref().unwrap_or(""),
                src_ip = %client.src_ip,
                public_ip = %client.public_ip.map(|ip| ip.to_string()).unwrap_or_default(),
                id,
                rcode = "FORMERR",
                len = bytes.len(),
                "malformed dns query"
            );
        }
        Handled::Answer
    }

    /// Counts a malformed query from `client`; true when it gets its own log line. Reports the
    /// previous interval's unlogged ones first.
    fn admit_malformed(&mut self, client: &ClientCtx, now: Instant) -> bool {
        let admit = self.malformed_log.admit(now);
        if let Some(suppressed) = admit.suppressed_before {
            self.log_suppressed(suppressed);
        }
        if !admit.log {
            self.malformed_last = Some((client.device.clone(), client.src_ip));
        }
        admit.log
    }

    fn log_suppressed(&mut self, suppressed: u64) {
        let (device, src) = match self.malformed_last.take() {
            Some((device, src)) => (device, Some(src)),
            None => (None, None),
        };
        tracing::warn!(
            target: "waygate::dns",
            suppressed,
            interval_s = self.malformed_log.every().as_secs(),
            last_device = device.as_deref().map_or("", |d| d.name.as_str()),
            last_device_id = device.as_deref().map_or("", |d| d.id.as_str()),
            last_src_ip = %src.map(|ip| ip.to_string()).unwrap_or_default(),
            "malformed dns queries not logged"
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn local(
        &mut self,
        reply: &Reply<'_>,
        rcode: ResponseCode,
        answers: Vec<Record>,
        client: &ClientCtx,
        decision: &'static str,
        rule: Option<Arc<str>>,
        (resolver, policy): (ResolverDecision, Option<Arc<RuleRef>>),
        out: &mut Vec<u8>,
    ) -> Handled {
        self.stats.local += 1;
        let qname = reply.query.name().to_lowercase();
        // The name is spelled out for the activity record only.
        let shown = self.activity.as_ref().map(|_| display_name(&qname));
        let ips = match &shown {
            Some(_) => ips_of_records(&answers),
            None => Vec::new(),
        };
        let answered = Answered {
            client,
            name: shown.as_deref().unwrap_or(""),
            shared: shown.as_ref(),
            qtype: reply.query.query_type(),
            rcode,
            decision: resolver,
            policy,
            transport: reply.transport,
            cache_hit: false,
            upstream_latency: None,
            now: reply.now,
        };
        self.answered(answered, move |v| *v = ips);
        emit(reply, rcode, answers, Vec::new(), out);
        tracing::info!(
            target: "waygate::dns",
            client = %client.label(),
            user = client.email().unwrap_or(""),
            src_ip = %client.src_ip,
            name = %qname,
            qtype = %reply.query.query_type(),
            decision,
            rule = rule.as_deref().unwrap_or(""),
            rcode = %rcode,
            upstream = "",
            cache_hit = false,
            upstream_latency_us = 0u64,
            latency_us = 0u64,
            "dns query"
        );
        Handled::Answer
    }
}

/// The addresses a device learned from an answer (see [`Resolver::remember`]).
fn ips_of(learned: &Option<(Names, Vec<Address>)>) -> Vec<IpAddr> {
    learned
        .as_ref()
        .map(|(_, ips)| ips.iter().map(|a| a.0).collect())
        .unwrap_or_default()
}

/// The addresses of the A and AAAA records in `records`.
fn ips_of_records(records: &[Record]) -> Vec<IpAddr> {
    records
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// The addresses in `answers` with their TTLs, and the names behind them (the CNAME chain from
/// `qname`).
fn addresses(qname: &Name, answers: &[Record]) -> Option<(Names, Vec<Address>)> {
    let ips: Vec<Address> = answers
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((IpAddr::V4(a.0), r.ttl())),
            RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl())),
            _ => None,
        })
        .collect();
    if ips.is_empty() {
        return None;
    }
    let host = display_name(qname);
    let mut domains: Vec<Arc<str>> = vec![host.clone()];
    domains.extend(answers.iter().filter_map(|r| match r.data() {
        RData::CNAME(c) => Some(display_name(&c.0)),
        _ => None,
    }));
    let names = Names {
        host,
        domains: Arc::from(domains),
    };
    Some((names, ips))
}

/// Tells the learn sink that a device got `ips` for `names`, `age` seconds after their TTLs were
/// read. Only devices' flows pass the gateway's flow stages, so only their answers are worth
/// remembering; a location's queries would only push devices' names out of a bounded memory.
fn learn(
    sink: &mut Option<LearnSink>,
    client: &ClientCtx,
    names: &Names,
    ips: &[Address],
    age: u32,
) {
    let (Some(sink), Some(device)) = (sink, &client.device) else {
        return;
    };
    for &(ip, ttl) in ips {
        sink(&device.id, ip, names, ttl.saturating_sub(age));
    }
}

#[allow(clippy::too_many_arguments)]
fn log_query(
    client: &ClientCtx,
    name: &str,
    qtype: RecordType,
    verdict: &PolicyVerdict,
    rcode: ResponseCode,
    upstream: Option<&str>,
    cache_hit: bool,
    latency: Duration,
) {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    tracing::info!(
        target: "waygate::dns",
        client = %client.label(),
        user = client.email().unwrap_or(""),
        src_ip = %client.src_ip,
        name,
        qtype = %qtype,
        decision = verdict.decision.label(),
        rule = verdict.rule.as_deref().unwrap_or(""),
        rcode = %rcode,
        upstream = upstream.unwrap_or(""),
        cache_hit,
        // Sent upstream the moment it arrived, so the upstream's share is the whole wait.
        upstream_latency_us = if upstream.is_some() { micros } else { 0 },
        latency_us = micros,
        "dns query"
    );
}

fn display_name(name: &Name) -> Arc<str> {
    let s = name.to_lowercase().to_ascii();
    Arc::from(s.strip_suffix('.').unwrap_or(&s))
}

/// `r` without the address hints `strip` names, when it is an HTTPS or SVCB record.
fn strip_hints(r: Record, strip: Hints) -> Record {
    if strip == Hints::default() {
        return r;
    }
    let svcb = match r.data() {
        RData::HTTPS(h) => &h.0,
        RData::SVCB(s) => s,
        _ => return r,
    };
    let params = svcb
        .svc_params()
        .iter()
        .filter(|(k, _)| match k {
            SvcParamKey::Ipv4Hint => !strip.v4,
            SvcParamKey::Ipv6Hint => !strip.v6,
            _ => true,
        })
        .cloned()
        .collect();
    let new = SVCB::new(svcb.svc_priority(), svcb.target_name().clone(), params);
    let data = match r.data() {
        RData::HTTPS(_) => RData::HTTPS(HTTPS(new)),
        _ => RData::SVCB(new),
    };
    let mut out = Record::from_rdata(r.name().clone(), r.ttl(), data);
    out.set_dns_class(r.dns_class());
    out
}

fn aged(r: &Record, age: u32) -> Record {
    let mut r = r.clone();
    r.set_ttl(r.ttl().saturating_sub(age));
    r
}

fn cname(owner: &Name, target: &Name, ttl: u32) -> Record {
    Record::from_rdata(owner.clone(), ttl, RData::CNAME(CNAME(target.clone())))
}

fn address_record(owner: &Name, ip: IpAddr, qtype: RecordType, ttl: u32) -> Option<Record> {
    let rdata = match (ip, qtype) {
        (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
        (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
        _ => return None,
    };
    Some(Record::from_rdata(owner.clone(), ttl, rdata))
}

fn block_answer(mode: BlockMode, query: &Query, ttl: u32) -> (ResponseCode, Vec<Record>) {
    let qtype = query.query_type();
    let owner = query.name();
    match mode {
        BlockMode::Refused => (ResponseCode::Refused, Vec::new()),
        BlockMode::NxDomain => (ResponseCode::NXDomain, Vec::new()),
        BlockMode::ZeroIp => {
            let zero = match qtype {
                RecordType::AAAA => IpAddr::from([0u16; 8]),
                _ => IpAddr::from([0u8; 4]),
            };
            let answers = address_record(owner, zero, qtype, ttl)
                .into_iter()
                .collect();
            (ResponseCode::NoError, answers)
        }
        BlockMode::Address(ip) => {
            let answers = address_record(owner, ip, qtype, ttl).into_iter().collect();
            (ResponseCode::NoError, answers)
        }
    }
}

fn emit(
    reply: &Reply<'_>,
    rcode: ResponseCode,
    answers: Vec<Record>,
    authority: Vec<Record>,
    out: &mut Vec<u8>,
) {
    let mut m = Message::new();
    m.set_id(reply.id)
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(reply.rd)
        .set_recursion_available(true)
        .set_response_code(rcode)
        .add_query(reply.query.clone());
    if reply.edns {
        let mut e = Edns::new();
        e.set_max_payload(EDNS_UDP);
        m.set_edns(e);
    }
    m.insert_answers(answers);
    m.insert_name_servers(authority);
    if emit_message(&m, out).is_ok() && out.len() <= reply.limit {
        return;
    }
    // Too big for the client's datagram (or unencodable): header and question with TC set.
    m.take_answers();
    m.take_name_servers();
    m.set_truncated(true);
    if emit_message(&m, out).is_err() {
        out.clear();
    }
}

fn emit_message(m: &Message, out: &mut Vec<u8>) -> Result<(), hickory_proto::ProtoError> {
    out.clear();
    let mut enc = BinEncoder::new(out);
    m.emit(&mut enc)
}
