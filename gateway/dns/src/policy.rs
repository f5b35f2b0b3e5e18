//! The policy seam: the resolver asks a [`DnsPolicy`] once per query and answers from its
//! [`Decision`]. The rule engine plugs in through [`super::rules::DnsRules`]; tests use closures.

use std::net::IpAddr;
use std::sync::Arc;

use waygate_model::activity::{ResolverDecision, RuleRef};
use waygate_model::DeviceInfo;

use hickory_proto::rr::{Name, Record, RecordType};

/// Who asked: a tunnel device or a location (an office network) querying a plain listener.
///
/// Opaque to the resolver except for [`ClientCtx::key`], which scopes the name memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCtx {
    /// The device, when the query came through the tunnel (or from a device's tunnel address):
    /// its id, user, groups and posture, shared with the data plane rather than copied.
    pub device: Option<Arc<DeviceInfo>>,
    /// Location name, for queries to a `dns.listen` address from a configured network.
    pub location: Option<String>,
    /// Source address of the query (the device's tunnel address, or the location's host).
    pub src_ip: IpAddr,
    /// The device's public address (its WireGuard endpoint), for `dns.src.geo.*`.
    pub public_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ClientKeyInner {
    Device(Arc<str>),
    Ip(IpAddr),
}

/// Identity the name memory is scoped by: the device id when known, else the source address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientKey(ClientKeyInner);

impl ClientKey {
    /// The key of a device by its registry id.
    pub fn device(id: &str) -> Self {
        ClientKey(ClientKeyInner::Device(Arc::from(id)))
    }

    /// The device id, for a device's key.
    pub fn device_id(&self) -> Option<&str> {
        match &self.0 {
            ClientKeyInner::Device(id) => Some(id),
            ClientKeyInner::Ip(_) => None,
        }
    }

    /// The key of a client known only by its address.
    pub fn ip(ip: IpAddr) -> Self {
        ClientKey(ClientKeyInner::Ip(ip))
    }
}

impl ClientCtx {
    /// A client known only by its source address (tests, locations).
    pub fn from_ip(src_ip: IpAddr) -> Self {
        ClientCtx {
            device: None,
            location: None,
            src_ip,
            public_ip: None,
        }
    }

    /// Key for the name memory: flows find their device by id, so prefer it over the address.
    pub fn key(&self) -> ClientKey {
        match &self.device {
            Some(d) => ClientKey::device(&d.id),
            None => ClientKey::ip(self.src_ip),
        }
    }

    /// The user's email, when a device asked.
    pub fn email(&self) -> Option<&str> {
        self.device.as_deref().map(|d| d.email.as_str())
    }

    /// Short label for logs: device name, else location, else address.
    pub fn label(&self) -> String {
        match (&self.device, &self.location) {
            (Some(d), _) => d.name.clone(),
            (None, Some(location)) => location.clone(),
            (None, None) => self.src_ip.to_string(),
        }
    }
}

/// How a blocked query is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockMode {
    /// REFUSED, no records (the default).
    #[default]
    Refused,
    /// `0.0.0.0` for A, `::` for AAAA, NOERROR without records for other types.
    ZeroIp,
    /// NXDOMAIN.
    NxDomain,
    /// An address serving a block page, for the matching family; NOERROR without records otherwise.
    Address(IpAddr),
}

/// What the resolver does with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Resolve upstream (through the cache).
    Resolve,
    /// Answer locally without asking upstream.
    Block(BlockMode),
    /// Answer A/AAAA with these addresses (per family); other types are REFUSED.
    OverrideIps(Vec<IpAddr>),
    /// Answer A/AAAA/HTTPS with a CNAME to this host followed by its resolved records.
    OverrideHost(Name),
    /// Like [`Decision::OverrideHost`], for SafeSearch / YouTube restricted targets; logged apart.
    SafeSearch(Name),
}

impl Decision {
    /// Stable word for logs.
    pub fn label(&self) -> &'static str {
        match self {
            Decision::Resolve => "resolve",
            Decision::Block(BlockMode::Refused) => "block_refused",
            Decision::Block(BlockMode::ZeroIp) => "block_zero_ip",
            Decision::Block(BlockMode::NxDomain) => "block_nxdomain",
            Decision::Block(BlockMode::Address(_)) => "block_address",
            Decision::OverrideIps(_) => "override_ips",
            Decision::OverrideHost(_) => "override_host",
            Decision::SafeSearch(_) => "safesearch",
        }
    }
}

/// The question as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct QueryInfo<'a> {
    /// Who asked.
    pub client: &'a ClientCtx,
    /// The queried name, lowercased, without the root's trailing dot (`""` for the root).
    pub name: &'a str,
    /// The queried type.
    pub qtype: RecordType,
}

/// Decides per query; must be cheap and must not block (it runs on the resolver's hot path).
pub trait DnsPolicy: Send + Sync {
    /// The decision for one query, with an optional rule label for the log line.
    fn decide(&self, query: &QueryInfo<'_>) -> PolicyVerdict;

    /// Whether some rule reads the upstream's answer ([`DnsPolicy::decide_answer`]).
    fn wants_answer(&self) -> bool {
        false
    }

    /// The decision on a resolved answer, when a rule on the answer matches.
    fn decide_answer(&self, _query: &QueryInfo<'_>, _answers: &[Record]) -> Option<PolicyVerdict> {
        None
    }

    /// The categories of an answered query for its activity log line, into `out` (empty):
    /// of the name, of those the deciding `rule` tested, of the answered `ips`. Asked only
    /// while activity logs are kept; the default knows no categories.
    fn log_categories(
        &self,
        _name: &str,
        _rule: Option<&RuleRef>,
        _ips: &[IpAddr],
        _out: &mut LogCategories,
    ) {
    }
}

/// A query's categories as its log line shows them, in lists the resolver reuses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogCategories {
    /// The name's (`QueryCategoryIDs`), sorted.
    pub query: Vec<u16>,
    /// The name's categories the deciding rule tested (`MatchedCategoryIDs`), sorted.
    pub matched: Vec<u16>,
    /// The answered addresses' (`ResolvedIPCategoryIDs`), sorted, each once.
    pub resolved_ips: Vec<u16>,
}

impl LogCategories {
    /// Empties the lists, keeping their room.
    pub fn clear(&mut self) {
        self.query.clear();
        self.matched.clear();
        self.resolved_ips.clear();
    }
}

/// A decision plus the rule that made it, for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVerdict {
    /// What to do.
    pub decision: Decision,
    /// Id or name of the matching rule, if any.
    pub rule: Option<Arc<str>>,
    /// The matching rule's id and name apart, for the activity logs.
    pub policy: Option<Arc<RuleRef>>,
}

impl From<Decision> for PolicyVerdict {
    fn from(decision: Decision) -> Self {
        PolicyVerdict {
            decision,
            rule: None,
            policy: None,
        }
    }
}

impl PolicyVerdict {
    /// The decision as Logpush's `ResolverDecision` words it (`by_answer`: a rule on the
    /// upstream's answer made it).
    pub fn resolver_decision(&self, by_answer: bool) -> ResolverDecision {
        match &self.decision {
            Decision::Resolve if self.rule.is_some() => ResolverDecision::AllowedByQueryName,
            Decision::Resolve => ResolverDecision::AllowedOnNoPolicyMatch,
            Decision::Block(_) if by_answer => ResolverDecision::BlockedByResponse,
            Decision::Block(_) => ResolverDecision::BlockedByQueryName,
            Decision::OverrideIps(_) | Decision::OverrideHost(_) => {
                ResolverDecision::OverrideApplied
            }
            Decision::SafeSearch(_) => ResolverDecision::OverrideForSafeSearch,
        }
    }
}

/// Resolves everything: the policy until the engine is wired in.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl DnsPolicy for AllowAll {
    fn decide(&self, _: &QueryInfo<'_>) -> PolicyVerdict {
        Decision::Resolve.into()
    }
}

impl<F> DnsPolicy for F
where
    F: Fn(&QueryInfo<'_>) -> PolicyVerdict + Send + Sync,
{
    fn decide(&self, query: &QueryInfo<'_>) -> PolicyVerdict {
        self(query)
    }
}
