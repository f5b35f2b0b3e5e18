//! The field registry: every field a rule may name, its type, the stages that fill it and its
//! aliases. Field ids index the evaluation context, so they are dense small integers.

use std::fmt;

/// A pipeline stage: which rules a rule set runs and which fields exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// DNS queries to the gateway's resolver.
    Dns,
    /// HTTP requests (inspected or not).
    Http,
    /// Network (layer 4) flows.
    L4,
    /// Egress: source address selection.
    Egress,
}

impl Stage {
    /// All stages, in evaluation order across a flow.
    pub const ALL: [Stage; 4] = [Stage::Dns, Stage::Egress, Stage::L4, Stage::Http];

    /// The name used in a rule's `filters` and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Dns => "dns",
            Stage::Http => "http",
            Stage::L4 => "l4",
            Stage::Egress => "egress",
        }
    }

    /// Parses a filter name (`dns`, `http`, `l4`, `egress`).
    pub fn parse(s: &str) -> Option<Stage> {
        match s {
            "dns" => Some(Stage::Dns),
            "http" => Some(Stage::Http),
            "l4" => Some(Stage::L4),
            "egress" => Some(Stage::Egress),
            _ => None,
        }
    }

    fn bit(self) -> u8 {
        match self {
            Stage::Dns => DNS,
            Stage::Http => HTTP,
            Stage::L4 => L4,
            Stage::Egress => EGRESS,
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The type of a field's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FieldType {
    /// A string.
    Bytes,
    /// A signed integer.
    Int,
    /// An IPv4 or IPv6 address.
    Ip,
    /// A boolean; a bare Bool field is a condition.
    Bool,
    /// An array of strings.
    BytesArray,
    /// An array of integers.
    IntArray,
    /// An array of addresses.
    IpArray,
    /// An array of `name=value` strings that can also be read as a map (`f["name"]`).
    BytesArrayMap,
}

impl FieldType {
    /// The element type when indexed (`f[*]`, `f[N]`, `m["k"]`), or None for scalars.
    pub fn element(self) -> Option<FieldType> {
        match self {
            FieldType::BytesArray | FieldType::BytesArrayMap => Some(FieldType::Bytes),
            FieldType::IntArray => Some(FieldType::Int),
            FieldType::IpArray => Some(FieldType::Ip),
            _ => None,
        }
    }

    /// The wirefilter spelling of the type, for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            FieldType::Bytes => "Bytes",
            FieldType::Int => "Int",
            FieldType::Ip => "Ip",
            FieldType::Bool => "Bool",
            FieldType::BytesArray => "Array<Bytes>",
            FieldType::IntArray => "Array<Int>",
            FieldType::IpArray => "Array<Ip>",
            FieldType::BytesArrayMap => "Array<Bytes> / Map<Bytes>",
        }
    }
}

impl fmt::Display for FieldType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const DNS: u8 = 1;
const HTTP: u8 = 2;
const L4: u8 = 4;
const EGRESS: u8 = 8;
const NET: u8 = L4 | EGRESS;
const ALL: u8 = DNS | HTTP | L4 | EGRESS;

/// Field flags.
const NONE: u8 = 0;
/// Known only after the upstream DNS answer.
const POST: u8 = 1;
/// A Cloudflare feature Waygate does not fill yet.
const UNFILLED: u8 = 2;
/// Category ids: a parent id in a rule also matches its subcategories.
const CATEGORY: u8 = 4;
/// Continent codes: full names in rules are accepted.
const CONTINENT: u8 = 8;
/// An array on which Gateway accepts `==`/`!=`/`in` without `[*]` (meaning any element): the
/// resolved geolocation (one value per resolved address, usually one country) and the identity
/// arrays, which Cloudflare's own identity selector examples compare with `==`.
const ARRAY_EQ: u8 = 16;

/// Static facts about one field.
#[derive(Debug)]
pub struct FieldInfo {
    /// The field's id.
    pub id: FieldId,
    /// Canonical name.
    pub name: &'static str,
    /// Value type.
    pub ty: FieldType,
    stages: u8,
    flags: u8,
}

impl FieldInfo {
    /// True when rules of `stage` may use this field.
    pub fn in_stage(&self, stage: Stage) -> bool {
        self.stages & stage.bit() != 0
    }
    /// True for DNS fields known only after resolution.
    pub fn post_resolution(&self) -> bool {
        self.flags & POST != 0
    }
    /// True for fields of Cloudflare features Waygate does not fill yet.
    pub fn unfilled(&self) -> bool {
        self.flags & UNFILLED != 0
    }
    /// True for category id fields (parent ids match subcategories).
    pub fn is_category(&self) -> bool {
        self.flags & CATEGORY != 0
    }
    /// True for continent fields (full continent names are accepted).
    pub fn is_continent(&self) -> bool {
        self.flags & CONTINENT != 0
    }
    /// True for arrays on which `==`, `!=` and `in` mean "any element".
    pub fn lenient_array_eq(&self) -> bool {
        self.flags & ARRAY_EQ != 0
    }
}

/// When, in a flow's life, a field's value is known; a rule can be decided once every field it
/// reads is. Ordered: a later phase knows everything an earlier one did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// The flow's first packet (addresses, ports, identity, posture, geolocation) or, for DNS,
    /// the query.
    FirstPacket,
    /// The client's first bytes: TLS SNI and the detected protocol (TCP flows only).
    FirstBytes,
    /// An HTTP request's head (host, URI, method) and uploaded bodies.
    Request,
    /// An HTTP response (status, downloaded bodies), or for DNS the upstream's answer.
    Response,
}

impl FieldId {
    /// The phase from which this field has its value.
    pub fn phase(self) -> Phase {
        use FieldId::*;
        match self {
            NetDetectedProtocol | NetSniHost | NetSniDomains => Phase::FirstBytes,
            HttpResponseStatusCode
            | HttpDownloadFileTypes
            | HttpDownloadFileType
            | HttpDownloadMime
            | HttpDownloadFileSize => Phase::Response,
            HttpRequestHost
            | HttpRequestDomains
            | HttpRequestUri
            | HttpRequestUriPath
            | HttpRequestUriQuery
            | HttpRequestUriPathAndQuery
            | HttpRequestUriContentCategory
            | HttpRequestUriSecurityCategory
            | HttpRequestMethod
            | HttpUploadFileTypes
            | HttpUploadFileType
            // "upload" from the request on, "download" once the response arrives: a condition
            // on it is decidable with the request (rules on download fields wait for those).
            | HttpBodyPhase
            | HttpUploadMime
            | HttpUploadFileSize => Phase::Request,
            _ if self.info().post_resolution() => Phase::Response,
            _ => Phase::FirstPacket,
        }
    }
}

macro_rules! fields {
    ($( $variant:ident = $name:literal : $ty:ident, $stages:expr, $flags:expr; )*) => {
        /// A field's id: a dense index into the field table and the evaluation context.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u16)]
        pub enum FieldId {
            $( #[doc = concat!("`", $name, "`")] $variant, )*
        }

        /// Every field, indexed by `FieldId as usize`.
        pub static FIELDS: &[FieldInfo] = &[
            $( FieldInfo { id: FieldId::$variant, name: $name, ty: FieldType::$ty, stages: $stages, flags: $flags }, )*
        ];
    };
}

fields! {
    DnsFqdn = "dns.fqdn": Bytes, DNS, NONE;
    DnsDomains = "dns.domains": BytesArray, DNS, NONE;
    DnsContentCategory = "dns.content_category": IntArray, DNS, CATEGORY;
    DnsSecurityCategory = "dns.security_category": IntArray, DNS, CATEGORY;
    DnsQueryRtype = "dns.query_rtype": Bytes, DNS, NONE;
    DnsSrcIp = "dns.src_ip": Ip, DNS, NONE;
    DnsSrcGeoCountry = "dns.src.geo.country": Bytes, DNS, NONE;
    DnsSrcGeoContinent = "dns.src.geo.continent": Bytes, DNS, CONTINENT;
    DnsResolvedIps = "dns.resolved_ips": IpArray, DNS, POST;
    DnsResponseCname = "dns.response.cname": BytesArray, DNS, POST;
    DnsDstGeoCountry = "dns.dst.geo.country": BytesArray, DNS, POST | ARRAY_EQ;
    DnsDstGeoContinent = "dns.dst.geo.continent": BytesArray, DNS, POST | ARRAY_EQ | CONTINENT;
    DnsLocation = "dns.location": Bytes, DNS, NONE;
    HttpRequestHost = "http.request.host": Bytes, HTTP, NONE;
    HttpRequestDomains = "http.request.domains": BytesArray, HTTP, NONE;
    HttpRequestUri = "http.request.uri": Bytes, HTTP, NONE;
    HttpRequestUriPath = "http.request.uri.path": Bytes, HTTP, NONE;
    HttpRequestUriQuery = "http.request.uri.query": Bytes, HTTP, NONE;
    HttpRequestUriPathAndQuery = "http.request.uri.path_and_query": Bytes, HTTP, NONE;
    HttpRequestUriContentCategory = "http.request.uri.content_category": IntArray, HTTP, CATEGORY;
    HttpRequestUriSecurityCategory = "http.request.uri.security_category": IntArray, HTTP, CATEGORY;
    HttpRequestMethod = "http.request.method": Bytes, HTTP, NONE;
    HttpResponseStatusCode = "http.response.status_code": Int, HTTP, NONE;
    HttpUploadFileTypes = "http.upload.file.types": BytesArray, HTTP, NONE;
    HttpDownloadFileTypes = "http.download.file.types": BytesArray, HTTP, NONE;
    HttpUploadMime = "http.upload.mime": Bytes, HTTP, NONE;
    HttpDownloadMime = "http.download.mime": Bytes, HTTP, NONE;
    HttpUploadFileType = "http.upload.file.type": BytesArray, HTTP, ARRAY_EQ;
    HttpDownloadFileType = "http.download.file.type": BytesArray, HTTP, ARRAY_EQ;
    HttpBodyPhase = "http.body_phase": Bytes, HTTP, NONE;
    HttpConnSrcIp = "http.conn.src_ip": Ip, HTTP, NONE;
    HttpConnDstIp = "http.conn.dst_ip": Ip, HTTP, NONE;
    HttpConnVnetId = "http.conn.vnet_id": Bytes, HTTP, NONE;
    HttpSrcIpGeoCountry = "http.src_ip.geo.country": Bytes, HTTP, NONE;
    HttpSrcIpGeoContinent = "http.src_ip.geo.continent": Bytes, HTTP, CONTINENT;
    HttpDstIpGeoCountry = "http.dst_ip.geo.country": Bytes, HTTP, NONE;
    HttpDstIpGeoContinent = "http.dst_ip.geo.continent": Bytes, HTTP, CONTINENT;
    ProxyEndpoint = "proxy.endpoint": Bytes, HTTP | NET, NONE;
    NetSrcIp = "net.src.ip": Ip, NET, NONE;
    NetDstIp = "net.dst.ip": Ip, NET, NONE;
    NetSrcPort = "net.src.port": Int, NET, NONE;
    NetDstPort = "net.dst.port": Int, NET, NONE;
    NetProtocol = "net.protocol": Bytes, NET, NONE;
    NetDetectedProtocol = "net.detected_protocol": Bytes, L4, NONE;
    NetSniHost = "net.sni.host": Bytes, L4, NONE;
    NetSniDomains = "net.sni.domains": BytesArray, L4, NONE;
    NetSrcGeoCountry = "net.src.geo.country": Bytes, NET, NONE;
    NetSrcGeoContinent = "net.src.geo.continent": Bytes, NET, CONTINENT;
    NetDstGeoCountry = "net.dst.geo.country": Bytes, NET, NONE;
    NetDstGeoContinent = "net.dst.geo.continent": Bytes, NET, CONTINENT;
    NetVnetId = "net.vnet_id": Bytes, NET, NONE;
    NetFqdnHost = "net.fqdn.host": Bytes, NET, NONE;
    NetFqdnDomains = "net.fqdn.domains": BytesArray, NET, NONE;
    NetOnrampType = "net.onramp.type": Bytes, NET, NONE;
    IdentityEmail = "identity.email": Bytes, ALL, NONE;
    IdentityName = "identity.name": Bytes, ALL, NONE;
    IdentityGroupsId = "identity.groups.id": BytesArray, ALL, ARRAY_EQ;
    IdentityGroupsName = "identity.groups.name": BytesArray, ALL, ARRAY_EQ;
    IdentityGroupsEmail = "identity.groups.email": BytesArray, ALL, ARRAY_EQ;
    IdentitySamlAttributes = "identity.saml_attributes": BytesArrayMap, ALL, ARRAY_EQ;
    DevicePostureChecksPassed = "device_posture.checks.passed": BytesArray, ALL, NONE;
    DevicePostureChecksFailed = "device_posture.checks.failed": BytesArray, ALL, NONE;
    AppIds = "app.ids": IntArray, DNS | HTTP | L4, UNFILLED;
    AppTypeIds = "app.type.ids": IntArray, DNS | HTTP | L4, UNFILLED;
    AppControlControls = "app_control.controls": IntArray, HTTP | L4, UNFILLED;
    AppStatuses = "app.statuses": BytesArray, HTTP, UNFILLED;
    DlpProfiles = "dlp.profiles": BytesArray, HTTP, UNFILLED;
    NetProxyEndpointIds = "net.proxy_endpoint.ids": BytesArray, HTTP | NET, UNFILLED;
    DnsCategoriesInRequestContextMatches = "dns.categories_in_request_context_matches": Bool, DNS, UNFILLED;
    AccessTarget = "access.target": Bool, L4, UNFILLED;
    AccessPrivateApp = "access.private_app": Bool, L4, UNFILLED;
    DnsSrcInternalIp = "dns.src_internal_ip": Ip, DNS, UNFILLED;
    HttpConnInternalSrcIp = "http.conn.internal_src_ip": Ip, HTTP, UNFILLED;
    HttpUploadFileSize = "http.upload.file.size": Int, HTTP, NONE;
    HttpDownloadFileSize = "http.download.file.size": Int, HTTP, NONE;
    IdentityOidcClaims = "identity.oidc_claims": BytesArrayMap, ALL, ARRAY_EQ | UNFILLED;
    DnsDohSubdomain = "dns.doh_subdomain": Bytes, DNS, UNFILLED;
}

/// Number of fields; the size of an evaluation context.
pub const FIELD_COUNT: usize = FieldId::DnsDohSubdomain as usize + 1;

/// Older names Gateway still accepts, with the field they mean.
pub static ALIASES: &[(&str, FieldId)] = &[
    ("http.conn.hostname", FieldId::HttpRequestHost),
    ("http.conn.domains", FieldId::HttpRequestDomains),
    (
        "http.conn.content_category",
        FieldId::HttpRequestUriContentCategory,
    ),
    (
        "http.conn.security_category",
        FieldId::HttpRequestUriSecurityCategory,
    ),
    // Cloudflare's Detected Protocol selector page spells the field this way.
    ("net.protocol.detection", FieldId::NetDetectedProtocol),
];

impl FieldId {
    /// The field's static facts.
    pub fn info(self) -> &'static FieldInfo {
        &FIELDS[self as usize]
    }
    /// Canonical name.
    pub fn name(self) -> &'static str {
        self.info().name
    }
    /// Value type.
    pub fn ty(self) -> FieldType {
        self.info().ty
    }
    /// Looks a field up by its canonical name or an alias.
    pub fn lookup(name: &str) -> Option<FieldId> {
        FIELDS
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.id)
            .or_else(|| ALIASES.iter().find(|(a, _)| *a == name).map(|(_, id)| *id))
    }
    /// The known field name closest to `name`, for "did you mean" hints.
    pub fn suggest(name: &str) -> Option<&'static str> {
        FIELDS
            .iter()
            .map(|f| f.name)
            .chain(ALIASES.iter().map(|(a, _)| *a))
            .map(|cand| (strsim::damerau_levenshtein(name, cand), cand))
            .filter(|(d, cand)| *d <= 3.max(cand.len() / 4))
            .min_by_key(|(d, _)| *d)
            .map(|(_, cand)| cand)
    }
    /// The field that plays this field's part in `stage` (`http.request.host` → `dns.fqdn` in DNS
    /// rules), for hints when a rule is moved between stages.
    pub fn counterpart(self, stage: Stage) -> Option<FieldId> {
        use FieldId::*;
        // One dashboard selector, one field per stage.
        const SAME_SELECTOR: &[&[FieldId]] = &[
            &[DnsFqdn, HttpRequestHost, NetSniHost],
            &[DnsDomains, HttpRequestDomains, NetSniDomains],
            &[DnsSrcIp, HttpConnSrcIp, NetSrcIp],
            &[DnsResolvedIps, HttpConnDstIp, NetDstIp],
            &[DnsContentCategory, HttpRequestUriContentCategory],
            &[DnsSecurityCategory, HttpRequestUriSecurityCategory],
            &[DnsSrcGeoCountry, HttpSrcIpGeoCountry, NetSrcGeoCountry],
            &[
                DnsSrcGeoContinent,
                HttpSrcIpGeoContinent,
                NetSrcGeoContinent,
            ],
            &[DnsDstGeoCountry, HttpDstIpGeoCountry, NetDstGeoCountry],
            &[
                DnsDstGeoContinent,
                HttpDstIpGeoContinent,
                NetDstGeoContinent,
            ],
            &[HttpConnVnetId, NetVnetId],
            &[DnsSrcInternalIp, HttpConnInternalSrcIp],
        ];
        SAME_SELECTOR
            .iter()
            .find(|group| group.contains(&self))?
            .iter()
            .copied()
            .find(|f| *f != self && f.info().in_stage(stage))
    }
    /// Every field id, in table order.
    pub fn all() -> impl Iterator<Item = FieldId> {
        FIELDS.iter().map(|f| f.id)
    }
}

impl fmt::Display for FieldId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Maps a continent written in full (`"North America"`) to its two-letter code; other text is
/// returned unchanged.
pub fn continent_code(s: &str) -> &str {
    const NAMES: &[(&str, &str)] = &[
        ("africa", "AF"),
        ("antarctica", "AN"),
        ("asia", "AS"),
        ("europe", "EU"),
        ("north america", "NA"),
        ("oceania", "OC"),
        ("south america", "SA"),
        ("tor network", "T1"),
        ("tor", "T1"),
    ];
    NAMES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(s))
        .map(|(_, c)| *c)
        .unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_index_the_table() {
        for (i, f) in FIELDS.iter().enumerate() {
            assert_eq!(f.id as usize, i, "{}", f.name);
        }
        assert_eq!(FIELDS.len(), FIELD_COUNT);
    }

    #[test]
    fn lookup_and_aliases() {
        assert_eq!(FieldId::lookup("dns.fqdn"), Some(FieldId::DnsFqdn));
        assert_eq!(
            FieldId::lookup("http.conn.hostname"),
            Some(FieldId::HttpRequestHost)
        );
        assert_eq!(FieldId::lookup("dns.fqd"), None);
        assert_eq!(FieldId::suggest("dns.fqd"), Some("dns.fqdn"));
        assert_eq!(FieldId::suggest("zzzzzzzzzzzzzzzzzzzzzzzzzzz"), None);
    }

    #[test]
    fn stages_and_flags() {
        assert!(FieldId::NetDstIp.info().in_stage(Stage::Egress));
        assert!(!FieldId::NetSniHost.info().in_stage(Stage::Egress));
        assert!(FieldId::IdentityEmail.info().in_stage(Stage::Dns));
        assert!(FieldId::DnsResolvedIps.info().post_resolution());
        assert!(!FieldId::DnsFqdn.info().post_resolution());
        assert!(FieldId::DlpProfiles.info().unfilled());
        // The deprecated singular file type, the body phase and file sizes are filled by the
        // HTTP stage; the singular form compares with `==`/`in` like Cloudflare's older rules.
        for f in [
            FieldId::HttpUploadFileType,
            FieldId::HttpDownloadFileType,
            FieldId::HttpBodyPhase,
            FieldId::HttpUploadFileSize,
            FieldId::HttpDownloadFileSize,
        ] {
            assert!(!f.info().unfilled(), "{}", f.name());
            assert!(f.info().in_stage(Stage::Http), "{}", f.name());
        }
        assert!(FieldId::HttpDownloadFileType.info().lenient_array_eq());
        assert_eq!(FieldId::HttpUploadFileType.phase(), Phase::Request);
        assert_eq!(FieldId::HttpBodyPhase.phase(), Phase::Request);
        assert_eq!(FieldId::HttpDownloadFileType.phase(), Phase::Response);
        assert_eq!(FieldId::HttpDownloadFileSize.phase(), Phase::Response);
        assert_eq!(
            FieldId::HttpRequestHost.counterpart(Stage::Dns),
            Some(FieldId::DnsFqdn)
        );
        assert_eq!(
            FieldId::DnsFqdn.counterpart(Stage::Egress),
            None,
            "SNI is l4 only"
        );
        assert_eq!(
            FieldId::DnsSrcGeoCountry.counterpart(Stage::Egress),
            Some(FieldId::NetSrcGeoCountry)
        );
        assert_eq!(FieldId::IdentityEmail.counterpart(Stage::Dns), None);
    }

    #[test]
    fn continents() {
        assert_eq!(continent_code("North America"), "NA");
        assert_eq!(continent_code("EU"), "EU");
    }
}
