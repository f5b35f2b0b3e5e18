//! Activity records: what the sans-IO cores report for the activity logs, one record per DNS
//! query, per flow (at its close, or at its refusal) and per egress decision.
//!
//! Inputs: filled by the resolver core (`waygate-dns`) and the engine (`waygate-engine`) while
//! they decide, only when the runtime asked for them. Outputs: drained by the runtime and handed
//! to the log writer (`waygate-observe`), which adds the wall-clock time and writes them with
//! Cloudflare Logpush's field names. Plain data; times are the cores' monotonic `now`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::{DeviceInfo, LogFields, Protocol};

/// A rule that decided something, as the logs name it (Logpush `PolicyID`, `PolicyName`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// The rule's id.
    pub id: Arc<str>,
    /// The rule's name (may be empty).
    pub name: Arc<str>,
    /// The category ids the rule tests (a parent's subcategories included), sorted: a DNS
    /// line's `MatchedCategoryIDs` are those of the name's categories among them. Empty for a
    /// rule on no category.
    pub categories: Box<[u16]>,
    /// `PolicyID` and `PolicyName` as log lines spell them, made at the rule's first line (once
    /// per loaded rule set, not per query).
    pub log_fields: LogFields,
}

impl RuleRef {
    /// The rule `id` called `name`, testing no category.
    pub fn new(id: &str, name: &str) -> RuleRef {
        RuleRef {
            id: Arc::from(id),
            name: Arc::from(name),
            categories: Box::default(),
            log_fields: LogFields::default(),
        }
    }

    /// The same rule testing `categories` (any order, repeats allowed).
    pub fn with_categories(mut self, categories: impl IntoIterator<Item = u16>) -> RuleRef {
        let mut c: Vec<u16> = categories.into_iter().collect();
        c.sort_unstable();
        c.dedup();
        self.categories = c.into();
        self
    }
}

/// One record for the activity logs, owned, as the engine and the HTTP stage queue them. DNS
/// queries are not here: the resolver reports each one as a borrowed [`DnsActivity`] that the
/// log writer encodes at once (a query costs no allocation for its record).
#[derive(Debug, Clone, PartialEq)]
pub enum Activity {
    /// A flow, at its close or refusal.
    Network(Box<NetworkActivity>),
    /// The source address chosen for a flow leaving to the Internet.
    Egress(Box<EgressActivity>),
    /// An HTTP request the HTTP stage decided, once its response ended.
    Http(Box<HttpActivity>),
}

/// One HTTP request through the HTTP stage (Logpush `gateway_http`).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpActivity {
    /// When the request arrived.
    pub at: Instant,
    /// The device and its user.
    pub device: Arc<DeviceInfo>,
    /// Source inside the tunnel.
    pub src: SocketAddr,
    /// The origin connected to.
    pub dst: SocketAddr,
    /// `Host`.
    pub host: String,
    /// Method.
    pub method: String,
    /// The full URL.
    pub url: String,
    /// HTTP version spoken by the device (`HTTP/1.1`, `HTTP/2`).
    pub version: &'static str,
    /// Response status sent to the device.
    pub status: u16,
    /// Logpush `Action`: `allow`, `block`, `redirect`, or what answered instead
    /// (`untrusted_cert`, `upstream_error`).
    pub action: &'static str,
    /// The HTTP rule that decided.
    pub policy: Option<Arc<RuleRef>>,
    /// `User-Agent`.
    pub user_agent: String,
    /// Body bytes from the device.
    pub bytes_sent: u64,
    /// Body bytes to the device.
    pub bytes_received: u64,
    /// From the request to the end of the response.
    pub duration: Duration,
    /// The TLS version spoken with the origin (empty for plain HTTP).
    pub upstream_tls: String,
}

/// How the resolver answered a query, in Logpush's `ResolverDecision` words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolverDecision {
    /// Resolved; no rule matched.
    AllowedOnNoPolicyMatch,
    /// Resolved; an allow rule matched.
    AllowedByQueryName,
    /// A block rule matched the question.
    BlockedByQueryName,
    /// A block rule matched the upstream's answer (its addresses or CNAMEs).
    BlockedByResponse,
    /// An override rule answered (addresses or another host).
    OverrideApplied,
    /// A SafeSearch or YouTube restricted rule rewrote the name.
    OverrideForSafeSearch,
    /// No policy decision: the query was malformed, unsupported or could not be served.
    Unknown,
}

impl ResolverDecision {
    /// The word written to the log.
    pub fn as_str(self) -> &'static str {
        match self {
            ResolverDecision::AllowedOnNoPolicyMatch => "allowedOnNoPolicyMatch",
            ResolverDecision::AllowedByQueryName => "allowedByQueryName",
            ResolverDecision::BlockedByQueryName => "blockedByQueryName",
            ResolverDecision::BlockedByResponse => "blockedByResponse",
            ResolverDecision::OverrideApplied => "overrideApplied",
            ResolverDecision::OverrideForSafeSearch => "overrideForSafeSearch",
            ResolverDecision::Unknown => "unknown",
        }
    }
}

/// One DNS query and its answer (Logpush `gateway_dns`), borrowed from the resolver for the
/// moment it is encoded: at 500,000 queries a second an owned record (the name, the addresses)
/// cost an allocation and a free on another thread per query, a third of what logging cost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DnsActivity<'a> {
    /// When it was answered.
    pub at: Instant,
    /// The device that asked, when it came through the tunnel.
    pub device: Option<&'a DeviceInfo>,
    /// The location of a `dns.listen` query.
    pub location: Option<&'a str>,
    /// The query's source address.
    pub src_ip: IpAddr,
    /// The queried name, lowercased, without the root's dot.
    pub query_name: &'a str,
    /// The queried type's number.
    pub query_type: u16,
    /// The queried type's name (`A`, `AAAA`, ...).
    pub query_type_name: &'static str,
    /// The answer's response code's number.
    pub rcode: u16,
    /// The addresses answered.
    pub resolved_ips: &'a [IpAddr],
    /// What the policy did.
    pub decision: ResolverDecision,
    /// The rule that decided, if any.
    pub policy: Option<&'a RuleRef>,
    /// `udp`, `tcp`, `tls` or `https`.
    pub protocol: &'static str,
    /// Answered from the cache (Logpush `IsResponseCached`).
    pub cache_hit: bool,
    /// How long the upstream took, when one was asked.
    pub upstream_latency: Option<Duration>,
    /// The queried name's categories (`QueryCategoryIDs`), sorted; empty without category
    /// sources. Looked up only while activity logs are kept.
    pub query_categories: &'a [u16],
    /// The name's categories the deciding rule tested (`MatchedCategoryIDs`).
    pub matched_categories: &'a [u16],
    /// The categories of the answered addresses (`ResolvedIPCategoryIDs`).
    pub resolved_ip_categories: &'a [u16],
}

/// What became of a flow (Logpush `gateway_network` `Action`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowAction {
    /// Allowed (and proxied).
    Allow,
    /// Refused by a network rule.
    Block,
}

impl FlowAction {
    /// The word written to the log.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowAction::Allow => "allow",
            FlowAction::Block => "block",
        }
    }
}

/// One flow, at its close or refusal (Logpush `gateway_network`).
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkActivity {
    /// When it closed (or was refused).
    pub at: Instant,
    /// When its first packet arrived.
    pub opened: Instant,
    /// The device and its user.
    pub device: Arc<DeviceInfo>,
    /// Transport.
    pub protocol: Protocol,
    /// Source inside the tunnel.
    pub src: SocketAddr,
    /// Destination the device addressed.
    pub dst: SocketAddr,
    /// Where the flow was sent when a rule rewrote its destination (`OverrideIP`, `OverridePort`).
    pub override_dst: Option<SocketAddr>,
    /// Allowed or blocked.
    pub action: FlowAction,
    /// The network rule that decided, if any.
    pub policy: Option<Arc<RuleRef>>,
    /// The TLS server name the client sent, when one was read.
    pub sni: Option<Arc<str>>,
    /// The protocol its first bytes showed (`tls`, `http`, ...), when they were read.
    pub detected_protocol: Option<&'static str>,
    /// Bytes the device sent.
    pub bytes_sent: u64,
    /// Bytes the device received.
    pub bytes_received: u64,
    /// Why it ended (`closed`, `idle`, `upstream refused`, `blocked`, ...).
    pub reason: &'static str,
}

/// The source address chosen for a flow to the Internet (the egress stage's decision).
#[derive(Debug, Clone, PartialEq)]
pub struct EgressActivity {
    /// When it was decided.
    pub at: Instant,
    /// The device and its user.
    pub device: Arc<DeviceInfo>,
    /// Transport.
    pub protocol: Protocol,
    /// Source inside the tunnel.
    pub src: SocketAddr,
    /// Where the flow goes.
    pub dst: SocketAddr,
    /// The egress rule that matched (`None`: the default egress).
    pub policy: Option<Arc<RuleRef>>,
    /// The source address it leaves from (`None`: the OS picks it).
    pub egress_ip: Option<IpAddr>,
    /// The name the device resolved for the destination through the gateway's resolver.
    pub name: Option<Arc<str>>,
}
