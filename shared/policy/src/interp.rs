//! The reference interpreter: walks the expression tree for every evaluation, re-reading literals,
//! scanning sets and lists linearly and compiling regexes each time. It is slow on purpose and
//! shares no data structure with [`super::compile`]; property tests check that the compiled
//! evaluator decides exactly as it does. The literal conversions at the bottom are the one place
//! both agree on what a literal means for a field.

use std::net::IpAddr;

use ipnet::IpNet;

use super::ast::{Access, CmpOp, Expr, FieldRef, Literal, Rhs, SetItem};
use super::categories;
use super::fields::FieldId;
use super::input::{is_domain_field, normalize_for, Input, Scalar, Value};
use super::lists::{List, ListType, Lists};

/// Evaluates one expression against an input.
pub fn eval(expr: &Expr, input: &Input, lists: &Lists) -> bool {
    Interp { input, lists }.expr(expr, None)
}

/// True when every given expression holds (a rule's non-empty traffic, identity and posture
/// expressions); vacuously true for none.
pub fn rule_matches(exprs: &[&Expr], input: &Input, lists: &Lists) -> bool {
    exprs.iter().all(|e| eval(e, input, lists))
}

struct Interp<'a> {
    input: &'a Input,
    lists: &'a Lists,
}

/// The field and value an index already matched, so evaluation need not compare them again.
pub(crate) type Bound<'a> = Option<(FieldId, Scalar<'a>)>;

/// The array field that `[*]` inside `any(...)`/`all(...)` iterates: the first one found outside
/// nested folds.
pub(crate) fn each_field(e: &Expr) -> Option<FieldId> {
    match e {
        Expr::Compare { lhs, .. } | Expr::Field(lhs) => {
            (lhs.access == Access::Each).then_some(lhs.field)
        }
        Expr::Not(inner) => each_field(inner),
        Expr::And(v) | Expr::Or(v) | Expr::Xor(v) => v.iter().find_map(each_field),
        Expr::Any(_) | Expr::All(_) => None,
    }
}

impl<'a> Interp<'a> {
    fn expr(&self, e: &Expr, bound: Bound<'a>) -> bool {
        match e {
            Expr::Compare { lhs, op, rhs, .. } => self.compare(lhs, *op, rhs, bound),
            Expr::Field(r) => match (self.input.get(r.field), &r.access) {
                (Some(Value::Bool(b)), Access::Whole) => *b,
                _ => false,
            },
            Expr::Not(inner) => !self.expr(inner, bound),
            Expr::And(v) => v.iter().all(|e| self.expr(e, bound)),
            Expr::Or(v) => v.iter().any(|e| self.expr(e, bound)),
            Expr::Xor(v) => v.iter().filter(|e| self.expr(e, bound)).count() % 2 == 1,
            Expr::Any(inner) | Expr::All(inner) => {
                let all = matches!(e, Expr::All(_));
                let Some(f) = each_field(inner) else {
                    return self.expr(inner, bound);
                };
                let Some(value) = self.input.get(f) else {
                    return false;
                };
                let mut elems = (0..value.len()).filter_map(|i| value.get(i));
                if all {
                    elems.all(|s| self.expr(inner, Some((f, s))))
                } else {
                    elems.any(|s| self.expr(inner, Some((f, s))))
                }
            }
        }
    }

    fn compare(&self, lhs: &FieldRef, op: CmpOp, rhs: &Rhs, bound: Bound<'a>) -> bool {
        let f = lhs.field;
        let Some(value) = self.input.get(f) else {
            return false;
        };
        let test = |s: Scalar<'_>| self.test(f, op, rhs, s);
        let any_elem = || (0..value.len()).filter_map(|i| value.get(i)).any(test);
        match &lhs.access {
            Access::Whole => any_elem(),
            Access::Each => match bound {
                Some((bf, s)) if bf == f => test(s),
                _ => any_elem(),
            },
            Access::Index(n) => value.is_array() && value.get(*n as usize).is_some_and(test),
            Access::Key(k) => {
                let Value::BytesArray(items) = value else {
                    return false;
                };
                items
                    .iter()
                    .find_map(|item| map_entry(item, k))
                    .is_some_and(|v| test(Scalar::Str(v)))
            }
        }
    }

    fn test(&self, f: FieldId, op: CmpOp, rhs: &Rhs, v: Scalar<'_>) -> bool {
        match v {
            Scalar::Str(s) => self.test_str(f, op, rhs, s),
            Scalar::Int(n) => self.test_int(f, op, rhs, n),
            Scalar::Ip(ip) => self.test_ip(op, rhs, ip),
            Scalar::Bool(_) => false,
        }
    }

    fn test_str(&self, f: FieldId, op: CmpOp, rhs: &Rhs, s: &str) -> bool {
        match (op, rhs) {
            (CmpOp::In, Rhs::Set(items)) => items
                .iter()
                .any(|i| set_item_str(f, i).is_some_and(|x| x == s)),
            (CmpOp::In, Rhs::List(name)) => self
                .lists
                .get(name)
                .is_some_and(|l| list_contains_naive(l, Scalar::Str(s))),
            (_, Rhs::Value(lit)) => match op {
                CmpOp::Matches => {
                    let (Literal::Regex(re) | Literal::Str(re)) = lit else {
                        return false;
                    };
                    regex::Regex::new(re).is_ok_and(|re| re.is_match(s))
                }
                CmpOp::Contains => contains_literal(f, lit).is_some_and(|x| s.contains(&*x)),
                CmpOp::Wildcard | CmpOp::StrictWildcard => {
                    let (Literal::Str(p) | Literal::Regex(p)) = lit else {
                        return false;
                    };
                    wildcard_match(p.as_bytes(), s.as_bytes(), op == CmpOp::Wildcard)
                }
                _ => str_literal(f, lit).is_some_and(|x| ordered(op, s.cmp(&x))),
            },
            _ => false,
        }
    }

    fn test_int(&self, f: FieldId, op: CmpOp, rhs: &Rhs, n: i64) -> bool {
        match (op, rhs) {
            (CmpOp::In, Rhs::Set(items)) => items
                .iter()
                .flat_map(|i| set_item_int_ranges(f, i))
                .any(|(a, b)| a <= n && n <= b),
            (CmpOp::Eq | CmpOp::Ne, Rhs::Value(lit)) => {
                let Some(x) = int_literal(lit) else {
                    return false;
                };
                let hit = category_ids(f, x).any(|c| c == n);
                hit == (op == CmpOp::Eq)
            }
            (_, Rhs::Value(lit)) => int_literal(lit).is_some_and(|x| ordered(op, n.cmp(&x))),
            _ => false,
        }
    }

    fn test_ip(&self, op: CmpOp, rhs: &Rhs, ip: IpAddr) -> bool {
        match (op, rhs) {
            (CmpOp::In, Rhs::Set(items)) => items
                .iter()
                .filter_map(set_item_ip_range)
                .any(|(a, b)| ip_in_range(ip, a, b)),
            (CmpOp::In, Rhs::List(name)) => self
                .lists
                .get(name)
                .is_some_and(|l| list_contains_naive(l, Scalar::Ip(ip))),
            (CmpOp::Eq | CmpOp::Ne, Rhs::Value(lit)) => {
                let Some(net) = ip_literal(lit) else {
                    return false;
                };
                net.contains(&ip) == (op == CmpOp::Eq)
            }
            (_, Rhs::Value(lit)) => match (ip_literal(lit), ip) {
                (Some(IpNet::V4(n)), IpAddr::V4(a)) => ordered(op, a.cmp(&n.addr())),
                (Some(IpNet::V6(n)), IpAddr::V6(a)) => ordered(op, a.cmp(&n.addr())),
                _ => false,
            },
            _ => false,
        }
    }
}

fn list_contains_naive(list: &List, v: Scalar<'_>) -> bool {
    match (list.kind, v) {
        (ListType::Ip, Scalar::Ip(ip)) => list
            .items
            .iter()
            .filter_map(|i| parse_net(i))
            .any(|n| n.contains(&ip)),
        (ListType::Ip, _) | (_, Scalar::Ip(_)) => false,
        (ListType::Domain, Scalar::Str(s)) => list.items.iter().any(|i| {
            let mut n = i.trim().to_owned();
            super::input::normalize_domain(&mut n);
            n == s
        }),
        (_, Scalar::Str(s)) => list.items.iter().any(|i| i.trim() == s),
        _ => false,
    }
}

fn ordered(op: CmpOp, ord: std::cmp::Ordering) -> bool {
    use std::cmp::Ordering::*;
    match op {
        CmpOp::Eq => ord == Equal,
        CmpOp::Ne => ord != Equal,
        CmpOp::Lt => ord == Less,
        CmpOp::Le => ord != Greater,
        CmpOp::Gt => ord == Greater,
        CmpOp::Ge => ord != Less,
        _ => false,
    }
}

/// The value of `key` in a `name=value` element.
pub(crate) fn map_entry<'s>(item: &'s str, key: &str) -> Option<&'s str> {
    let (k, v) = item.split_once('=')?;
    (k == key).then_some(v)
}

/// Parses an address or CIDR (a bare address is a one-address network).
pub(crate) fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// A string literal as field `f` stores values (domains lowercased, continents as codes).
pub(crate) fn str_literal(f: FieldId, lit: &Literal) -> Option<String> {
    let mut s = match lit {
        Literal::Str(s) | Literal::Regex(s) => s.clone(),
        Literal::Int(n) => n.to_string(),
        Literal::Ip(ip) => ip.to_string(),
        Literal::Cidr(n) => n.to_string(),
    };
    normalize_for(f, &mut s);
    Some(s)
}

/// The needle of `contains`: lowercased on domain fields, whose values are stored lowercase.
pub(crate) fn contains_literal(f: FieldId, lit: &Literal) -> Option<String> {
    let mut s = match lit {
        Literal::Str(s) | Literal::Regex(s) => s.clone(),
        _ => return None,
    };
    if is_domain_field(f) {
        s.make_ascii_lowercase();
    }
    Some(s)
}

/// A set member as a string for field `f`.
pub(crate) fn set_item_str(f: FieldId, item: &SetItem) -> Option<String> {
    let lit = match item {
        SetItem::Str(s) => Literal::Str(s.clone()),
        SetItem::Int(n) => Literal::Int(*n),
        SetItem::Ip(ip) => Literal::Ip(*ip),
        SetItem::Cidr(n) => Literal::Cidr(*n),
        SetItem::IntRange(..) | SetItem::IpRange(..) => return None,
    };
    str_literal(f, &lit)
}

/// An integer literal (Gateway accepts quoted integers).
pub(crate) fn int_literal(lit: &Literal) -> Option<i64> {
    match lit {
        Literal::Int(n) => Some(*n),
        Literal::Str(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The ids a category literal stands for: itself and, for a parent, its subcategories.
pub(crate) fn category_ids(f: FieldId, id: i64) -> impl Iterator<Item = i64> {
    let subs: &[i64] = if f.info().is_category() {
        categories::subcategories(id)
    } else {
        &[]
    };
    std::iter::once(id).chain(subs.iter().copied())
}

/// A set member as inclusive integer ranges (category parents expanded).
pub(crate) fn set_item_int_ranges(f: FieldId, item: &SetItem) -> Vec<(i64, i64)> {
    match item {
        SetItem::Int(n) => category_ids(f, *n).map(|c| (c, c)).collect(),
        SetItem::Str(s) => match s.trim().parse::<i64>() {
            Ok(n) => category_ids(f, n).map(|c| (c, c)).collect(),
            Err(_) => Vec::new(),
        },
        SetItem::IntRange(a, b) => vec![(*a, *b)],
        _ => Vec::new(),
    }
}

/// An address literal as a network (`==` with a CIDR means "in").
pub(crate) fn ip_literal(lit: &Literal) -> Option<IpNet> {
    match lit {
        Literal::Ip(ip) => Some(IpNet::from(*ip)),
        Literal::Cidr(n) => Some(*n),
        Literal::Str(s) => parse_net(s),
        _ => None,
    }
}

/// A set member as an inclusive address range of one family.
pub(crate) fn set_item_ip_range(item: &SetItem) -> Option<(IpAddr, IpAddr)> {
    match item {
        SetItem::Ip(ip) => Some((*ip, *ip)),
        SetItem::Cidr(n) => Some((n.network(), n.broadcast())),
        SetItem::IpRange(a, b) => Some((*a, *b)),
        SetItem::Str(s) => parse_net(s).map(|n| (n.network(), n.broadcast())),
        _ => None,
    }
}

fn ip_in_range(ip: IpAddr, a: IpAddr, b: IpAddr) -> bool {
    match (ip, a, b) {
        (IpAddr::V4(x), IpAddr::V4(a), IpAddr::V4(b)) => a <= x && x <= b,
        (IpAddr::V6(x), IpAddr::V6(a), IpAddr::V6(b)) => a <= x && x <= b,
        _ => false,
    }
}

/// Wildcard match of the whole text: `*` is any run of bytes and `\` makes the next byte literal;
/// every other byte (`?` included, unlike shell globs) stands for itself.
pub(crate) fn wildcard_match(pat: &[u8], text: &[u8], ignore_case: bool) -> bool {
    let eq = |a: u8, b: u8| {
        if ignore_case {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pat.len() && pat[p] == b'*' {
            star = Some((p + 1, t));
            p += 1;
            continue;
        }
        if p < pat.len() {
            let (lit, width) = if pat[p] == b'\\' && p + 1 < pat.len() {
                (pat[p + 1], 2)
            } else {
                (pat[p], 1)
            };
            if eq(lit, text[t]) {
                p += width;
                t += 1;
                continue;
            }
        }
        match star {
            Some((sp, st)) => {
                p = sp;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pat[p..].iter().all(|c| *c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard() {
        assert!(wildcard_match(b"*.example.com", b"a.EXAMPLE.com", true));
        assert!(!wildcard_match(b"*.example.com", b"a.EXAMPLE.com", false));
        assert!(!wildcard_match(b"a?c", b"abc", false));
        assert!(wildcard_match(b"a?c", b"a?c", false));
        assert!(wildcard_match(b"a\\*c", b"a*c", false));
        assert!(!wildcard_match(b"a\\*c", b"abc", false));
        assert!(wildcard_match(b"**", b"", false));
        assert!(!wildcard_match(b"a", b"", false));
    }
}
