//! The values one flow or query offers to rules: a slot per field, indexed by [`FieldId`].
//!
//! An [`Input`] is filled once per flow (or DNS query) and then read by every rule. Setters reuse
//! the slot's buffers, so a caller that keeps one `Input` per worker and calls [`Input::clear`]
//! between flows allocates only while its buffers grow. Domain-like fields are stored normalized
//! (ASCII lowercase, no trailing dot); continent fields store the two-letter code.

use std::net::IpAddr;

use super::fields::{continent_code, FieldId, FieldType, FIELD_COUNT};

/// One field's value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// A string.
    Bytes(String),
    /// An integer.
    Int(i64),
    /// An address.
    Ip(IpAddr),
    /// A boolean.
    Bool(bool),
    /// Strings.
    BytesArray(Vec<String>),
    /// Integers.
    IntArray(Vec<i64>),
    /// Addresses.
    IpArray(Vec<IpAddr>),
}

/// One element of a field's value, as a comparison sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Scalar<'a> {
    /// A string.
    Str(&'a str),
    /// An integer.
    Int(i64),
    /// An address.
    Ip(IpAddr),
    /// A boolean.
    Bool(bool),
}

impl Value {
    /// The number of elements (1 for scalars).
    pub fn len(&self) -> usize {
        match self {
            Value::BytesArray(v) => v.len(),
            Value::IntArray(v) => v.len(),
            Value::IpArray(v) => v.len(),
            _ => 1,
        }
    }

    /// True for an empty array.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// True for the array variants.
    pub fn is_array(&self) -> bool {
        matches!(
            self,
            Value::BytesArray(_) | Value::IntArray(_) | Value::IpArray(_)
        )
    }

    /// Element `i` (the value itself for scalars, at index 0).
    pub fn get(&self, i: usize) -> Option<Scalar<'_>> {
        match self {
            Value::Bytes(s) => (i == 0).then_some(Scalar::Str(s)),
            Value::Int(n) => (i == 0).then_some(Scalar::Int(*n)),
            Value::Ip(ip) => (i == 0).then_some(Scalar::Ip(*ip)),
            Value::Bool(b) => (i == 0).then_some(Scalar::Bool(*b)),
            Value::BytesArray(v) => v.get(i).map(|s| Scalar::Str(s)),
            Value::IntArray(v) => v.get(i).map(|n| Scalar::Int(*n)),
            Value::IpArray(v) => v.get(i).map(|ip| Scalar::Ip(*ip)),
        }
    }
}

/// True for fields holding host names, which are compared without case and without a trailing dot.
pub fn is_domain_field(f: FieldId) -> bool {
    matches!(
        f,
        FieldId::DnsFqdn
            | FieldId::DnsDomains
            | FieldId::DnsResponseCname
            | FieldId::HttpRequestHost
            | FieldId::HttpRequestDomains
            | FieldId::NetSniHost
            | FieldId::NetSniDomains
            | FieldId::NetFqdnHost
            | FieldId::NetFqdnDomains
    )
}

/// The `domains` field derived from a host field: the name and each of its parents.
pub fn domains_field_of(host: FieldId) -> Option<FieldId> {
    match host {
        FieldId::DnsFqdn => Some(FieldId::DnsDomains),
        FieldId::HttpRequestHost => Some(FieldId::HttpRequestDomains),
        FieldId::NetSniHost => Some(FieldId::NetSniDomains),
        FieldId::NetFqdnHost => Some(FieldId::NetFqdnDomains),
        _ => None,
    }
}

/// Normalizes a host name in place: ASCII lowercase, trailing dot removed.
pub fn normalize_domain(s: &mut String) {
    s.make_ascii_lowercase();
    while s.ends_with('.') {
        s.pop();
    }
}

/// Normalizes a string for field `f` the way inputs are stored (domains, continents).
pub(crate) fn normalize_for(f: FieldId, s: &mut String) {
    if is_domain_field(f) {
        normalize_domain(s);
    } else if f.info().is_continent() {
        let code = continent_code(s);
        if code.len() != s.len() || code != s.as_str() {
            let code = code.to_owned();
            s.clear();
            s.push_str(&code);
        }
    }
}

/// The values of one flow or query. Unset fields make every comparison on them false.
#[derive(Clone, Debug)]
pub struct Input {
    slots: Vec<Slot>,
}

#[derive(Clone, Debug)]
struct Slot {
    set: bool,
    value: Value,
}

impl Default for Input {
    fn default() -> Input {
        Input::new()
    }
}

fn reuse_strings<'a>(buf: &mut Vec<String>, items: impl IntoIterator<Item = &'a str>) {
    let mut n = 0;
    for item in items {
        if let Some(s) = buf.get_mut(n) {
            s.clear();
            s.push_str(item);
        } else {
            buf.push(item.to_owned());
        }
        n += 1;
    }
    buf.truncate(n);
}

impl Input {
    /// An input with every field unset.
    pub fn new() -> Input {
        Input {
            slots: (0..FIELD_COUNT)
                .map(|_| Slot {
                    set: false,
                    value: Value::Bool(false),
                })
                .collect(),
        }
    }

    /// Unsets every field, keeping buffers for the next flow.
    pub fn clear(&mut self) {
        self.slots.iter_mut().for_each(|s| s.set = false);
    }

    /// Unsets one field.
    pub fn unset(&mut self, f: FieldId) {
        self.slots[f as usize].set = false;
    }

    /// The field's value, or None when unset.
    #[inline]
    pub fn get(&self, f: FieldId) -> Option<&Value> {
        let slot = &self.slots[f as usize];
        slot.set.then_some(&slot.value)
    }

    fn slot(&mut self, f: FieldId) -> &mut Value {
        let slot = &mut self.slots[f as usize];
        slot.set = true;
        &mut slot.value
    }

    /// Sets a string field (normalized for domain and continent fields).
    pub fn set_str(&mut self, f: FieldId, s: &str) {
        let v = self.slot(f);
        match v {
            Value::Bytes(buf) => {
                buf.clear();
                buf.push_str(s);
            }
            _ => *v = Value::Bytes(s.to_owned()),
        }
        if let Value::Bytes(buf) = v {
            normalize_for(f, buf);
        }
    }

    /// Sets a host field and the matching `domains` field (the name and each parent).
    pub fn set_host(&mut self, f: FieldId, host: &str) {
        self.set_str(f, host);
        let Some(domains) = domains_field_of(f) else {
            return;
        };
        let v = std::mem::replace(self.slot(f), Value::Bool(false));
        if let Value::Bytes(name) = &v {
            let suffixes = std::iter::successors(Some(name.as_str()), |s| {
                s.split_once('.').map(|(_, rest)| rest)
            })
            .filter(|s| !s.is_empty());
            self.set_strs(domains, suffixes);
        }
        *self.slot(f) = v;
    }

    /// Sets a string array field (each element normalized like [`Input::set_str`]).
    pub fn set_strs<'a>(&mut self, f: FieldId, items: impl IntoIterator<Item = &'a str>) {
        let v = self.slot(f);
        if !matches!(v, Value::BytesArray(_)) {
            *v = Value::BytesArray(Vec::new());
        }
        if let Value::BytesArray(buf) = v {
            reuse_strings(buf, items);
            buf.iter_mut().for_each(|s| normalize_for(f, s));
        }
    }

    /// Sets an integer field.
    pub fn set_int(&mut self, f: FieldId, n: i64) {
        *self.slot(f) = Value::Int(n);
    }

    /// Sets an integer array field.
    pub fn set_ints(&mut self, f: FieldId, items: impl IntoIterator<Item = i64>) {
        let v = self.slot(f);
        match v {
            Value::IntArray(buf) => {
                buf.clear();
                buf.extend(items);
            }
            _ => *v = Value::IntArray(items.into_iter().collect()),
        }
    }

    /// Sets an address field.
    pub fn set_ip(&mut self, f: FieldId, ip: IpAddr) {
        *self.slot(f) = Value::Ip(ip);
    }

    /// Sets an address array field.
    pub fn set_ips(&mut self, f: FieldId, items: impl IntoIterator<Item = IpAddr>) {
        let v = self.slot(f);
        match v {
            Value::IpArray(buf) => {
                buf.clear();
                buf.extend(items);
            }
            _ => *v = Value::IpArray(items.into_iter().collect()),
        }
    }

    /// Sets a Bool field.
    pub fn set_bool(&mut self, f: FieldId, b: bool) {
        *self.slot(f) = Value::Bool(b);
    }

    /// Sets a field from an already typed value (normalizing strings as the setters do).
    pub fn set_value(&mut self, f: FieldId, value: Value) {
        match value {
            Value::Bytes(s) => self.set_str(f, &s),
            Value::BytesArray(v) => self.set_strs(f, v.iter().map(String::as_str)),
            other => *self.slot(f) = other,
        }
    }

    /// Builds an input from JSON mapping field names (or aliases) to values, as `rules eval`
    /// reads it. Integers and addresses may be given as strings; a host field without its
    /// `domains` field fills that too.
    pub fn from_json(json: &serde_json::Value) -> Result<Input, InputError> {
        let obj = json.as_object().ok_or(InputError::NotAnObject)?;
        let mut input = Input::new();
        let mut hosts = Vec::new();
        for (name, value) in obj {
            let canonical = name.replace("[*]", "").replace("[]", "");
            let f = FieldId::lookup(&canonical).ok_or_else(|| InputError::UnknownField {
                name: name.clone(),
                suggestion: FieldId::suggest(&canonical),
            })?;
            if value.is_null() {
                continue;
            }
            let bad = || InputError::BadValue {
                field: f.name(),
                expected: f.ty(),
                value: value.to_string(),
            };
            let typed = json_value(f.ty(), value).ok_or_else(bad)?;
            input.set_value(f, typed);
            if domains_field_of(f).is_some() {
                hosts.push(f);
            }
        }
        for f in hosts {
            if let Some(d) = domains_field_of(f) {
                if input.get(d).is_none() {
                    if let Some(Value::Bytes(host)) = input.get(f).cloned() {
                        input.set_host(f, &host);
                    }
                }
            }
        }
        Ok(input)
    }
}

fn json_scalar_str(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn json_int(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn json_ip(v: &serde_json::Value) -> Option<IpAddr> {
    v.as_str()?.trim().parse().ok()
}

fn json_items(v: &serde_json::Value) -> Vec<&serde_json::Value> {
    match v {
        serde_json::Value::Array(items) => items.iter().collect(),
        other => vec![other],
    }
}

fn json_value(ty: FieldType, v: &serde_json::Value) -> Option<Value> {
    Some(match ty {
        FieldType::Bytes => Value::Bytes(json_scalar_str(v)?),
        FieldType::Int => Value::Int(json_int(v)?),
        FieldType::Ip => Value::Ip(json_ip(v)?),
        FieldType::Bool => Value::Bool(match v {
            serde_json::Value::Bool(b) => *b,
            serde_json::Value::String(s) => s.parse().ok()?,
            _ => return None,
        }),
        FieldType::BytesArray | FieldType::BytesArrayMap => {
            if let serde_json::Value::Object(map) = v {
                // The map form of SAML attributes: {"claim": "value"} or {"claim": ["v1", "v2"]}.
                let mut out = Vec::new();
                for (k, val) in map {
                    for item in json_items(val) {
                        out.push(format!("{k}={}", json_scalar_str(item)?));
                    }
                }
                Value::BytesArray(out)
            } else {
                Value::BytesArray(
                    json_items(v)
                        .into_iter()
                        .map(json_scalar_str)
                        .collect::<Option<_>>()?,
                )
            }
        }
        FieldType::IntArray => Value::IntArray(
            json_items(v)
                .into_iter()
                .map(json_int)
                .collect::<Option<_>>()?,
        ),
        FieldType::IpArray => Value::IpArray(
            json_items(v)
                .into_iter()
                .map(json_ip)
                .collect::<Option<_>>()?,
        ),
    })
}

/// Why an input document was rejected.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InputError {
    /// The document is not a JSON object.
    #[error("the input must be a JSON object mapping field names to values")]
    NotAnObject,
    /// A name that is no field.
    #[error("unknown field \"{name}\"{}", suggestion.map(|s| format!("; did you mean \"{s}\"?")).unwrap_or_default())]
    UnknownField {
        /// The name as written.
        name: String,
        /// The closest known field name.
        suggestion: Option<&'static str>,
    },
    /// A value that does not fit the field's type.
    #[error("{value} is not a valid {expected} for \"{field}\"")]
    BadValue {
        /// The field.
        field: &'static str,
        /// Its type.
        expected: FieldType,
        /// The value as written.
        value: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_fills_domains_normalized() {
        let mut input = Input::new();
        input.set_host(FieldId::DnsFqdn, "A.B.Example.COM.");
        assert_eq!(
            input.get(FieldId::DnsFqdn),
            Some(&Value::Bytes("a.b.example.com".into()))
        );
        assert_eq!(
            input.get(FieldId::DnsDomains),
            Some(&Value::BytesArray(vec![
                "a.b.example.com".into(),
                "b.example.com".into(),
                "example.com".into(),
                "com".into()
            ]))
        );
        input.clear();
        assert_eq!(input.get(FieldId::DnsFqdn), None);
    }

    #[test]
    fn from_json_types_and_errors() {
        let json = serde_json::json!({
            "net.dst.ip": "198.51.100.158",
            "net.dst.port": "443",
            "identity.groups[*].name": ["eng"],
            "net.src.geo.continent": "North America",
            "dns.fqdn": "www.example.com"
        });
        let input = Input::from_json(&json).unwrap();
        assert_eq!(
            input.get(FieldId::NetDstIp),
            Some(&Value::Ip("198.51.100.158".parse().unwrap()))
        );
        assert_eq!(input.get(FieldId::NetDstPort), Some(&Value::Int(443)));
        assert_eq!(
            input.get(FieldId::NetSrcGeoContinent),
            Some(&Value::Bytes("NA".into()))
        );
        assert_eq!(input.get(FieldId::DnsDomains).map(Value::len), Some(3));
        let err = Input::from_json(&serde_json::json!({"dns.fqd": "x"})).unwrap_err();
        assert!(
            err.to_string().contains("did you mean \"dns.fqdn\""),
            "{err}"
        );
        let err = Input::from_json(&serde_json::json!({"net.dst.port": "x"})).unwrap_err();
        assert!(matches!(err, InputError::BadValue { .. }));
    }
}
