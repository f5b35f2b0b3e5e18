//! Lists that rules name (`$name` or `$uuid`): IPs, domains, emails, URLs, serials, read from a
//! lists file, and the error a rules or lists document reports with its line and column.
//!
//! Below both the rule sets and the evaluators, so neither has to import the other to name a
//! list.

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::ast::normalize_list_id;

/// A rules or lists document that is not valid JSON of the expected shape.
#[derive(Debug, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct DocumentError {
    /// 1-based line in the file.
    pub line: usize,
    /// 1-based column in the file.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl From<serde_json::Error> for DocumentError {
    fn from(e: serde_json::Error) -> DocumentError {
        let text = e.to_string();
        // serde_json appends " at line L column C"; the position is reported separately.
        let message = match text.rfind(" at line ") {
            Some(i) => text[..i].to_owned(),
            None => text,
        };
        DocumentError {
            line: e.line(),
            column: e.column(),
            message,
        }
    }
}

/// What a list holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum ListType {
    /// Addresses and CIDRs.
    #[serde(alias = "ip")]
    Ip,
    /// Host names (compared like domain fields).
    #[serde(alias = "domain")]
    Domain,
    /// Email addresses.
    #[serde(alias = "email")]
    Email,
    /// URLs.
    #[serde(alias = "url")]
    Url,
    /// Device serial numbers.
    #[serde(alias = "serial")]
    Serial,
}

impl ListType {
    /// The type as written in lists files.
    pub fn as_str(self) -> &'static str {
        match self {
            ListType::Ip => "IP",
            ListType::Domain => "DOMAIN",
            ListType::Email => "EMAIL",
            ListType::Url => "URL",
            ListType::Serial => "SERIAL",
        }
    }
}

/// One list.
#[derive(Clone, Debug, PartialEq)]
pub struct List {
    /// Id (UUID).
    pub id: String,
    /// Name.
    pub name: String,
    /// Item type.
    pub kind: ListType,
    /// Items as written.
    pub items: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawItem {
    Plain(String),
    Object { value: String },
}

#[derive(Deserialize)]
struct RawList {
    #[serde(default)]
    id: String,
    #[serde(default)]
    name: String,
    #[serde(rename = "type")]
    kind: ListType,
    #[serde(default)]
    items: Vec<RawItem>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawLists {
    Array(Vec<RawList>),
    Envelope { result: Vec<RawList> },
}

/// The 1-based line and column where `needle` is first written as a JSON string in `text`.
fn position_of(text: &str, needle: &str) -> (usize, usize) {
    let quoted = serde_json::to_string(needle).unwrap_or_default();
    let at = text.find(&quoted).map_or(0, |i| i + 1);
    let before = &text[..at.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count());
    (line, column.max(1))
}

/// Every list a rule set may name, found by `$name` or `$uuid` (with or without dashes).
#[derive(Clone, Debug, Default)]
pub struct Lists {
    lists: Vec<List>,
    by_key: FxHashMap<String, usize>,
}

impl Lists {
    /// Lists from values.
    pub fn new(lists: Vec<List>) -> Lists {
        let mut by_key = FxHashMap::default();
        for (i, l) in lists.iter().enumerate() {
            for key in [normalize_list_id(&l.id), normalize_list_id(&l.name)] {
                if !key.is_empty() {
                    by_key.entry(key).or_insert(i);
                }
            }
        }
        Lists { lists, by_key }
    }

    /// Reads `[{"id", "name", "type", "items": [...]}]` (or the API's envelope); items are strings
    /// or `{"value": ...}` objects.
    pub fn from_json(text: &str) -> Result<Lists, DocumentError> {
        let raw: Vec<RawList> = if text.trim_start().starts_with('[') {
            serde_json::from_str(text)?
        } else {
            match serde_json::from_str::<RawLists>(text)? {
                RawLists::Array(v) | RawLists::Envelope { result: v } => v,
            }
        };
        let lists: Vec<List> = raw
            .into_iter()
            .map(|l| List {
                id: l.id,
                name: l.name,
                kind: l.kind,
                items: l
                    .items
                    .into_iter()
                    .map(|i| match i {
                        RawItem::Plain(s) | RawItem::Object { value: s } => s,
                    })
                    .collect(),
            })
            .collect();
        for l in lists.iter().filter(|l| l.kind == ListType::Ip) {
            if let Some(bad) = l
                .items
                .iter()
                .find(|i| super::interp::parse_net(i).is_none())
            {
                let (line, column) = position_of(text, bad);
                return Err(DocumentError {
                    line,
                    column,
                    message: format!("list \"{}\": \"{bad}\" is not an address or CIDR", l.name),
                });
            }
        }
        Ok(Lists::new(lists))
    }

    /// The position of the list a reference names.
    pub fn position(&self, reference: &str) -> Option<usize> {
        self.by_key.get(&normalize_list_id(reference)).copied()
    }

    /// The list a reference names.
    pub fn get(&self, reference: &str) -> Option<&List> {
        self.position(reference).and_then(|i| self.lists.get(i))
    }

    /// Every list, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &List> {
        self.lists.iter()
    }
}
