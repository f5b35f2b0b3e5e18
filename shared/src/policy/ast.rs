//! The expression tree as parsed, before type checking. `Display` prints it back in a form the
//! parser reads to the same tree (property-tested).

use std::fmt;
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
    /// A string (also a quoted number or address, which Gateway accepts for Int and Ip fields).
    Str(String),
    /// A regex as written between the quotes (backslashes unchanged).
    Regex(String),
    /// An integer.
    Int(i64),
    /// An address.
    Ip(IpAddr),
    /// A CIDR (after `==` it means "in").
    Cidr(IpNet),
}

/// One member of `{...}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetItem {
    /// A string (or quoted number/address).
    Str(String),
    /// An integer.
    Int(i64),
    /// An inclusive integer range `a..b`.
    IntRange(i64, i64),
    /// An address.
    Ip(IpAddr),
    /// A CIDR.
    Cidr(IpNet),
    /// An inclusive address range `a..b`.
    IpRange(IpAddr, IpAddr),
}

/// The right-hand side of a comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rhs {
    /// One value.
    Value(Literal),
    /// `{...}`
    Set(Vec<SetItem>),
    /// `$name` or `$uuid`, as written without the `$`.
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

    fn precedence(&self) -> u8 {
        match self {
            Expr::Or(_) => 1,
            Expr::Xor(_) => 2,
            Expr::And(_) => 3,
            _ => 4,
        }
    }
}

fn write_str_lit(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        match c {
            '"' => f.write_str("\\\"")?,
            '\\' => f.write_str("\\\\")?,
            c if (c as u32) < 0x20 || c as u32 == 0x7f => write!(f, "\\x{:02x}", c as u32)?,
            c => write!(f, "{c}")?,
        }
    }
    f.write_str("\"")
}

/// A regex is printed so that the lexer returns exactly `raw` between the quotes.
fn write_regex(f: &mut fmt::Formatter<'_>, raw: &str) -> fmt::Result {
    let trailing_backslashes = raw.chars().rev().take_while(|c| *c == '\\').count();
    let plain_ok = !raw.contains('"') && trailing_backslashes % 2 == 0 && {
        // A backslash must pair with the next char exactly as the lexer pairs them.
        let mut ok = true;
        let mut it = raw.chars();
        while let Some(c) = it.next() {
            if c == '\\' && it.next().is_none() {
                ok = false;
            }
        }
        ok
    };
    if plain_ok {
        return write!(f, "\"{raw}\"");
    }
    let mut hashes = 1;
    while raw.contains(&format!("\"{}", "#".repeat(hashes))) {
        hashes += 1;
    }
    let h = "#".repeat(hashes);
    write!(f, "r{h}\"{raw}\"{h}")
}

impl fmt::Display for FieldRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.field.name())?;
        match &self.access {
            Access::Whole => Ok(()),
            Access::Each => f.write_str("[*]"),
            Access::Index(n) => write!(f, "[{n}]"),
            Access::Key(k) => {
                f.write_str("[")?;
                write_str_lit(f, k)?;
                f.write_str("]")
            }
        }
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Str(s) => write_str_lit(f, s),
            Literal::Regex(r) => write_regex(f, r),
            Literal::Int(i) => write!(f, "{i}"),
            Literal::Ip(ip) => write!(f, "{ip}"),
            Literal::Cidr(net) => write!(f, "{net}"),
        }
    }
}

impl fmt::Display for SetItem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetItem::Str(s) => write_str_lit(f, s),
            SetItem::Int(i) => write!(f, "{i}"),
            SetItem::IntRange(a, b) => write!(f, "{a}..{b}"),
            SetItem::Ip(ip) => write!(f, "{ip}"),
            SetItem::Cidr(net) => write!(f, "{net}"),
            SetItem::IpRange(a, b) => write!(f, "{a}..{b}"),
        }
    }
}

impl fmt::Display for Rhs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rhs::Value(v) => write!(f, "{v}"),
            Rhs::List(name) => write!(f, "${name}"),
            Rhs::Set(items) => {
                f.write_str("{")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("}")
            }
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let joined = |f: &mut fmt::Formatter<'_>, v: &[Expr], word: &str, prec: u8| {
            for (i, e) in v.iter().enumerate() {
                if i > 0 {
                    write!(f, " {word} ")?;
                }
                // Same-precedence children came from explicit parentheses; keep them.
                if e.precedence() <= prec {
                    write!(f, "({e})")?;
                } else {
                    write!(f, "{e}")?;
                }
            }
            Ok(())
        };
        match self {
            Expr::Compare { lhs, op, rhs, .. } => write!(f, "{lhs} {} {rhs}", op.as_str()),
            Expr::Field(r) => write!(f, "{r}"),
            Expr::Not(e) => {
                if e.precedence() < 4 {
                    write!(f, "not ({e})")
                } else {
                    write!(f, "not {e}")
                }
            }
            Expr::And(v) => joined(f, v, "and", 3),
            Expr::Xor(v) => joined(f, v, "xor", 2),
            Expr::Or(v) => joined(f, v, "or", 1),
            Expr::Any(e) => write!(f, "any({e})"),
            Expr::All(e) => write!(f, "all({e})"),
        }
    }
}
