//! The expression tree as parsed, before type checking. `Display` (in [`super::printer`]) prints it
//! back in a form the parser reads to the same tree (property-tested).

use std::net::IpAddr;

use ipnet::IpNet;

use super::error::Pos;
use super::fields::FieldId;

/// How a field is read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// The whole value.
    Whole,
    /// Each element (`f[*]`, also written `f[]`), inside `any(...)`/`all(...)`.
    Each,
    /// One element (`f[N]`).
    Index(u32),
    /// A map entry (`m["key"]`).
    Key(String),
}

/// A field with its accessor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldRef {
    /// The field.
    pub field: FieldId,
    /// The accessor.
    pub access: Access,
    /// Where the field name starts.
    pub pos: Pos,
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    /// `==`, `eq`
    Eq,
    /// `!=`, `ne`
    Ne,
    /// `<`, `lt`
    Lt,
    /// `<=`, `le`
    Le,
    /// `>`, `gt`
    Gt,
    /// `>=`, `ge`
    Ge,
    /// `in {set}` or `in $list`
    In,
    /// `matches`, `~`
    Matches,
    /// `contains`
    Contains,
    /// `wildcard` (case-insensitive glob)
    Wildcard,
    /// `strict wildcard` (case-sensitive glob)
    StrictWildcard,
}

impl CmpOp {
    /// The canonical spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CmpOp::Eq => "==",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
            CmpOp::In => "in",
            CmpOp::Matches => "matches",
            CmpOp::Contains => "contains",
            CmpOp::Wildcard => "wildcard",
            CmpOp::StrictWildcard => "strict wildcard",
        }
    }
}

/// A single value on the right of a comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Literal {
    /// A string. The parser turns a quoted number or address on an Int or Ip field into
    /// [`Literal::Int`] / [`Literal::Ip`] / [`Literal::Cidr`], and a continent name on a continent
    /// field into its code, so a `Str` there is a value that fits no other variant.
    Str(String),
    /// A regex as written between the quotes (backslashes unchanged); only after `matches`.
    Regex(String),
    /// An integer.
    Int(i64),
    /// An address.
    Ip(IpAddr),
    /// A CIDR: after `==` it means "the address is in it" (and after `!=`, "is not"). Host bits
    /// are kept as written.
    Cidr(IpNet),
}

/// One member of `{...}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetItem {
    /// A string (quoted numbers, addresses and ranges on Int/Ip fields become the variants below).
    Str(String),
    /// An integer.
    Int(i64),
    /// An inclusive integer range `a..b`; the parser guarantees `a <= b`.
    IntRange(i64, i64),
    /// An address.
    Ip(IpAddr),
    /// A CIDR.
    Cidr(IpNet),
    /// An inclusive address range `a..b`; the parser guarantees one family and `a <= b`.
    IpRange(IpAddr, IpAddr),
}

/// The right-hand side of a comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rhs {
    /// One value.
    Value(Literal),
    /// `{...}`
    Set(Vec<SetItem>),
    /// `$name` or `$uuid` without the `$`; UUIDs are normalized by [`normalize_list_id`].
    List(String),
}

/// An expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    /// `lhs op rhs`
    Compare {
        /// The field.
        lhs: FieldRef,
        /// The operator.
        op: CmpOp,
        /// The value, set or list.
        rhs: Rhs,
        /// Where the value starts.
        rhs_pos: Pos,
    },
    /// A bare Bool field.
    Field(FieldRef),
    /// `not e`
    Not(Box<Expr>),
    /// `a and b and ...`
    And(Vec<Expr>),
    /// `a xor b xor ...`
    Xor(Vec<Expr>),
    /// `a or b or ...`
    Or(Vec<Expr>),
    /// `any(e)`: true when `e` holds for some element of the `[*]` array inside.
    Any(Box<Expr>),
    /// `all(e)`: true when `e` holds for every element of the `[*]` array inside.
    All(Box<Expr>),
}

impl Expr {
    /// Visits every node, outermost first.
    pub fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Expr)) {
        f(self);
        match self {
            Expr::Not(e) | Expr::Any(e) | Expr::All(e) => e.walk(f),
            Expr::And(v) | Expr::Xor(v) | Expr::Or(v) => v.iter().for_each(|e| e.walk(f)),
            Expr::Compare { .. } | Expr::Field(_) => {}
        }
    }

    /// Every field the expression reads.
    pub fn fields(&self) -> Vec<FieldId> {
        let mut out = Vec::new();
        self.walk(&mut |e| match e {
            Expr::Compare { lhs, .. } | Expr::Field(lhs) => out.push(lhs.field),
            _ => {}
        });
        out
    }
}

/// The one spelling of a list reference.
///
/// Gateway's dashboard writes a list UUID with dashes (`$2c9a9e8b-4f1d-4c47-9d45-30f5f2c1a001`) and
/// its API stores the same list as 32 hex digits (`$2c9a9e8b4f1d4c479d4530f5f2c1a001`). A name that
/// is a UUID in either form (any case) becomes 32 lowercase hex digits; any other name is kept as
/// written (names are case-sensitive). Lists files should key their lists through this function.
pub fn normalize_list_id(name: &str) -> String {
    let dashed = name.len() == 36
        && name
            .char_indices()
            .all(|(i, c)| matches!(i, 8 | 13 | 18 | 23) == (c == '-'));
    let plain = name.len() == 32;
    let hex: String = name.chars().filter(|c| *c != '-').collect();
    if (dashed || plain) && hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        hex.to_ascii_lowercase()
    } else {
        name.to_string()
    }
}
