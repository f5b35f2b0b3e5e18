//! Compilation of expressions into an evaluator that neither parses nor allocates per evaluation.
//!
//! Literals are converted once: regexes compiled, string and integer sets hashed, address sets
//! turned into interval tables, category parents expanded, lists compiled once and shared (by
//! `Arc`) by every rule naming them. A rule set becomes an [`Evaluator`]: the compiled rules in
//! evaluation order plus an index from (field, value) to the rules that require that value, so a
//! query touches only the rules it can match. Rules without an indexable required condition are
//! evaluated for every input. Evaluation returns the first matching rule's position.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use regex::Regex;
use rustc_hash::{FxHashMap, FxHashSet};

use super::ast::{Access, CmpOp, Expr, Literal, Rhs};
use super::error::{ExprError, ExprErrorKind, Pos};
use super::fields::{FieldId, FieldType};
use super::input::{Input, Scalar, Value};
use super::interp::{
    category_ids, contains_literal, each_field, int_literal, ip_literal, map_entry, parse_net,
    set_item_int_ranges, set_item_ip_range, set_item_str, str_literal, wildcard_match, Bound,
};
use super::lists::{List, ListType, Lists};
use super::strset::StringSet;

/// A list compiled for membership tests: names and strings hashed, addresses as intervals.
#[derive(Debug)]
pub enum CompiledList {
    /// DOMAIN, EMAIL, URL and SERIAL lists.
    Strings(StringSet),
    /// IP lists.
    Ips(IpTable),
}

impl CompiledList {
    /// Compiles a list; DOMAIN items are normalized like domain inputs.
    pub fn new(list: &List) -> CompiledList {
        match list.kind {
            ListType::Ip => CompiledList::Ips(IpTable::new(
                list.items
                    .iter()
                    .filter_map(|i| parse_net(i))
                    .map(|n| (n.network(), n.broadcast())),
            )),
            kind => {
                let mut set = StringSet::with_capacity(list.items.len());
                let mut scratch = String::new();
                for item in &list.items {
                    scratch.clear();
                    scratch.push_str(item.trim());
                    if kind == ListType::Domain {
                        super::input::normalize_domain(&mut scratch);
                    }
                    set.insert(&scratch);
                }
                CompiledList::Strings(set.finish())
            }
        }
    }

    /// True when the value is in the list.
    #[inline]
    pub fn contains(&self, v: Scalar<'_>) -> bool {
        match (self, v) {
            (CompiledList::Strings(set), Scalar::Str(s)) => set.contains(s),
            (CompiledList::Ips(t), Scalar::Ip(ip)) => t.contains(ip),
            _ => false,
        }
    }
}

/// Every list of a lists file, compiled, in the file's order.
#[derive(Debug, Default)]
pub struct CompiledLists {
    lists: Vec<Arc<CompiledList>>,
}

impl CompiledLists {
    /// Compiles every list once.
    pub fn new(lists: &Lists) -> CompiledLists {
        CompiledLists {
            lists: lists
                .iter()
                .map(|l| Arc::new(CompiledList::new(l)))
                .collect(),
        }
    }
}

/// Sorted, merged inclusive address intervals, one table per family.
#[derive(Debug, Default, Clone)]
pub struct IpTable {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

fn merge<T: Ord + Copy>(mut v: Vec<(T, T)>, next: impl Fn(T) -> Option<T>) -> Vec<(T, T)> {
    v.retain(|(a, b)| a <= b);
    v.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        if let Some(last) = out.last_mut() {
            if next(last.1).is_none_or(|n| a <= n) {
                if b > last.1 {
                    last.1 = b;
                }
                continue;
            }
        }
        out.push((a, b));
    }
    out.shrink_to_fit();
    out
}

impl IpTable {
    /// Builds a table from inclusive ranges (ranges across families are empty and dropped).
    pub fn new(ranges: impl IntoIterator<Item = (IpAddr, IpAddr)>) -> IpTable {
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for r in ranges {
            match r {
                (IpAddr::V4(a), IpAddr::V4(b)) => v4.push((u32::from(a), u32::from(b))),
                (IpAddr::V6(a), IpAddr::V6(b)) => v6.push((u128::from(a), u128::from(b))),
                _ => {}
            }
        }
        IpTable {
            v4: merge(v4, |x: u32| x.checked_add(1)),
            v6: merge(v6, |x: u128| x.checked_add(1)),
        }
    }

    /// True when `ip` is inside one of the intervals.
    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn find<T: Ord + Copy>(v: &[(T, T)], x: T) -> bool {
            let i = v.partition_point(|(a, _)| *a <= x);
            i > 0 && x <= v[i - 1].1
        }
        match ip {
            IpAddr::V4(a) => find(&self.v4, u32::from(a)),
            IpAddr::V6(a) => find(&self.v6, u128::from(a)),
        }
    }

    /// The table as CIDRs, or None when it needs more than `max` of them.
    fn cidrs(&self, max: usize) -> Option<Vec<IpNet>> {
        let mut out = Vec::new();
        for (a, b) in &self.v4 {
            let subnets = ipnet::Ipv4Subnets::new((*a).into(), (*b).into(), 0);
            for n in subnets {
                out.push(IpNet::V4(n));
                if out.len() > max {
                    return None;
                }
            }
        }
        for (a, b) in &self.v6 {
            let subnets = ipnet::Ipv6Subnets::new((*a).into(), (*b).into(), 0);
            for n in subnets {
                out.push(IpNet::V6(n));
                if out.len() > max {
                    return None;
                }
            }
        }
        Some(out)
    }
}

/// Hashed integers plus the ranges too wide to enumerate.
#[derive(Debug, Default)]
struct IntSet {
    singles: FxHashSet<i64>,
    ranges: Vec<(i64, i64)>,
}

impl IntSet {
    fn new(ranges: impl IntoIterator<Item = (i64, i64)>) -> IntSet {
        let mut set = IntSet::default();
        for (a, b) in ranges {
            if a <= b && b.saturating_sub(a) < 64 {
                set.singles.extend(a..=b);
            } else if a <= b {
                set.ranges.push((a, b));
            }
        }
        set
    }
    #[inline]
    fn contains(&self, n: i64) -> bool {
        self.singles.contains(&n) || self.ranges.iter().any(|(a, b)| *a <= n && n <= *b)
    }
}

/// A comparison with its literal already converted.
#[derive(Debug)]
enum Test {
    Never,
    StrEq(Box<str>),
    StrNe(Box<str>),
    StrOrd(CmpOp, Box<str>),
    StrSet(FxHashSet<Box<str>>),
    Contains(Box<str>),
    Regex(Arc<Regex>),
    Wildcard(Box<[u8]>, bool),
    IntEq(i64),
    IntNe(i64),
    IntOrd(CmpOp, i64),
    IntIn(IntSet),
    IntNotIn(IntSet),
    IpIn(IpTable),
    IpNotIn(IpTable),
    IpOrd(CmpOp, IpAddr),
    List(Arc<CompiledList>),
}

#[inline]
fn ordered<T: Ord + ?Sized>(op: CmpOp, a: &T, b: &T) -> bool {
    match op {
        CmpOp::Lt => a < b,
        CmpOp::Le => a <= b,
        CmpOp::Gt => a > b,
        CmpOp::Ge => a >= b,
        CmpOp::Eq => a == b,
        CmpOp::Ne => a != b,
        _ => false,
    }
}

impl Test {
    #[inline]
    fn eval(&self, v: Scalar<'_>) -> bool {
        match (self, v) {
            (Test::StrEq(x), Scalar::Str(s)) => **x == *s,
            (Test::StrNe(x), Scalar::Str(s)) => **x != *s,
            (Test::StrOrd(op, x), Scalar::Str(s)) => ordered(*op, s, x),
            (Test::StrSet(set), Scalar::Str(s)) => set.contains(s),
            (Test::Contains(x), Scalar::Str(s)) => s.contains(&**x),
            (Test::Regex(re), Scalar::Str(s)) => re.is_match(s),
            (Test::Wildcard(p, ci), Scalar::Str(s)) => wildcard_match(p, s.as_bytes(), *ci),
            (Test::IntEq(x), Scalar::Int(n)) => *x == n,
            (Test::IntNe(x), Scalar::Int(n)) => *x != n,
            (Test::IntOrd(op, x), Scalar::Int(n)) => ordered(*op, &n, x),
            (Test::IntIn(set), Scalar::Int(n)) => set.contains(n),
            (Test::IntNotIn(set), Scalar::Int(n)) => !set.contains(n),
            (Test::IpIn(t), Scalar::Ip(ip)) => t.contains(ip),
            (Test::IpNotIn(t), Scalar::Ip(ip)) => !t.contains(ip),
            (Test::IpOrd(op, x), Scalar::Ip(ip)) => match (ip, x) {
                (IpAddr::V4(a), IpAddr::V4(b)) => ordered(*op, &a, b),
                (IpAddr::V6(a), IpAddr::V6(b)) => ordered(*op, &a, b),
                _ => false,
            },
            (Test::List(l), v) => l.contains(v),
            _ => false,
        }
    }
}

/// Where a comparison reads its operand.
#[derive(Debug)]
enum Src {
    /// Each element of the field's value (one for scalars); true when any passes.
    Any(FieldId),
    /// `f[*]`: inside a fold over `f` the current element, elsewhere like `Any`.
    Elem(FieldId),
    /// Element N of an array.
    Index(FieldId, u32),
    /// The value of a `name=value` entry.
    Key(FieldId, Box<str>),
}

#[derive(Debug)]
enum Node {
    Const(bool),
    Test(Src, Test),
    BoolField(FieldId),
    Not(Box<Node>),
    And(Box<[Node]>),
    Or(Box<[Node]>),
    Xor(Box<[Node]>),
    Fold {
        all: bool,
        field: FieldId,
        body: Box<Node>,
    },
}

impl Node {
    fn eval<'a>(&self, input: &'a Input, bound: Bound<'a>) -> bool {
        match self {
            Node::Const(b) => *b,
            Node::Test(src, test) => match src {
                Src::Any(f) | Src::Elem(f) => {
                    if let (Src::Elem(_), Some((bf, s))) = (src, bound) {
                        if bf == *f {
                            return test.eval(s);
                        }
                    }
                    match input.get(*f) {
                        None => false,
                        Some(Value::BytesArray(v)) => v.iter().any(|s| test.eval(Scalar::Str(s))),
                        Some(Value::IntArray(v)) => v.iter().any(|n| test.eval(Scalar::Int(*n))),
                        Some(Value::IpArray(v)) => v.iter().any(|ip| test.eval(Scalar::Ip(*ip))),
                        Some(v) => v.get(0).is_some_and(|s| test.eval(s)),
                    }
                }
                Src::Index(f, n) => match input.get(*f) {
                    Some(v) if v.is_array() => v.get(*n as usize).is_some_and(|s| test.eval(s)),
                    _ => false,
                },
                Src::Key(f, k) => match input.get(*f) {
                    Some(Value::BytesArray(items)) => items
                        .iter()
                        .find_map(|i| map_entry(i, k))
                        .is_some_and(|v| test.eval(Scalar::Str(v))),
                    _ => false,
                },
            },
            Node::BoolField(f) => matches!(input.get(*f), Some(Value::Bool(true))),
            Node::Not(n) => !n.eval(input, bound),
            Node::And(v) => v.iter().all(|n| n.eval(input, bound)),
            Node::Or(v) => v.iter().any(|n| n.eval(input, bound)),
            Node::Xor(v) => v.iter().fold(false, |acc, n| acc ^ n.eval(input, bound)),
            Node::Fold { all, field, body } => {
                let Some(value) = input.get(*field) else {
                    return false;
                };
                let mut elems = (0..value.len()).filter_map(|i| value.get(i));
                if *all {
                    elems.all(|s| body.eval(input, Some((*field, s))))
                } else {
                    elems.any(|s| body.eval(input, Some((*field, s))))
                }
            }
        }
    }
}

/// One compiled expression (or a rule's expressions joined by `and`).
#[derive(Debug)]
pub struct Program {
    node: Node,
}

impl Program {
    /// True when the expression holds for `input`.
    pub fn eval(&self, input: &Input) -> bool {
        self.node.eval(input, None)
    }
}

/// Compiles expressions against one set of lists, sharing regexes between rules.
pub struct Compiler<'l> {
    lists: &'l Lists,
    compiled: &'l CompiledLists,
    regexes: FxHashMap<String, Arc<Regex>>,
    /// With no lists file, references compile to "matches nothing" and are collected here.
    missing: Option<Vec<(String, Pos)>>,
}

impl<'l> Compiler<'l> {
    /// A compiler resolving `$list` references in `lists` (compiled as `compiled`).
    pub fn new(lists: &'l Lists, compiled: &'l CompiledLists) -> Compiler<'l> {
        Compiler {
            lists,
            compiled,
            regexes: FxHashMap::default(),
            missing: None,
        }
    }

    /// Lets references to lists that do not exist compile to lists that match nothing (for
    /// checking rules without their lists file); [`Compiler::take_missing_lists`] reports them.
    pub fn allow_missing_lists(mut self) -> Compiler<'l> {
        self.missing = Some(Vec::new());
        self
    }

    /// The missing lists met since the last call, with where they were named.
    pub fn take_missing_lists(&mut self) -> Vec<(String, Pos)> {
        self.missing
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Compiles a rule's non-empty expressions; the program holds when all of them do.
    pub fn compile_rule(&mut self, exprs: &[&Expr]) -> Result<Program, ExprError> {
        let mut nodes = exprs
            .iter()
            .map(|e| self.node(e))
            .collect::<Result<Vec<_>, _>>()?;
        let node = if nodes.len() == 1 {
            nodes.pop().unwrap_or(Node::Const(true))
        } else {
            Node::And(nodes.into_boxed_slice())
        };
        Ok(Program { node })
    }

    fn node(&mut self, e: &Expr) -> Result<Node, ExprError> {
        Ok(match e {
            Expr::Compare {
                lhs,
                op,
                rhs,
                rhs_pos,
            } => {
                let src = match &lhs.access {
                    Access::Whole => Src::Any(lhs.field),
                    Access::Each => Src::Elem(lhs.field),
                    Access::Index(n) => Src::Index(lhs.field, *n),
                    Access::Key(k) => Src::Key(lhs.field, k.as_str().into()),
                };
                let ty = match lhs.access {
                    Access::Key(_) => FieldType::Bytes,
                    _ => lhs.field.ty().element().unwrap_or(lhs.field.ty()),
                };
                let test = self.test(lhs.field, ty, *op, rhs, *rhs_pos)?;
                Node::Test(src, test)
            }
            Expr::Field(r) => match r.access {
                Access::Whole => Node::BoolField(r.field),
                _ => Node::Const(false),
            },
            Expr::Not(inner) => match self.node(inner)? {
                Node::Const(b) => Node::Const(!b),
                n => Node::Not(Box::new(n)),
            },
            Expr::And(v) => Node::And(self.nodes(v)?),
            Expr::Or(v) => Node::Or(self.nodes(v)?),
            Expr::Xor(v) => Node::Xor(self.nodes(v)?),
            Expr::Any(inner) | Expr::All(inner) => {
                let all = matches!(e, Expr::All(_));
                let body = self.node(inner)?;
                match each_field(inner) {
                    None => body,
                    // any() over one comparison of the element is that comparison on the field.
                    Some(f) if !all && matches!(&body, Node::Test(Src::Elem(g), _) if *g == f) => {
                        match body {
                            Node::Test(_, test) => Node::Test(Src::Any(f), test),
                            other => other,
                        }
                    }
                    Some(field) => Node::Fold {
                        all,
                        field,
                        body: Box::new(body),
                    },
                }
            }
        })
    }

    fn nodes(&mut self, v: &[Expr]) -> Result<Box<[Node]>, ExprError> {
        v.iter().map(|e| self.node(e)).collect()
    }

    fn list(&self, name: &str, pos: Pos) -> Result<Arc<CompiledList>, ExprError> {
        self.lists
            .position(name)
            .and_then(|i| self.compiled.lists.get(i))
            .cloned()
            .ok_or_else(|| ExprError::new(pos, ExprErrorKind::UnknownList(name.to_owned())))
    }

    fn test(
        &mut self,
        f: FieldId,
        ty: FieldType,
        op: CmpOp,
        rhs: &Rhs,
        pos: Pos,
    ) -> Result<Test, ExprError> {
        if let (CmpOp::In, Rhs::List(name)) = (op, rhs) {
            let list = match (self.list(name, pos), &mut self.missing) {
                (Ok(list), _) => list,
                (Err(_), Some(missing)) => {
                    missing.push((name.to_owned(), pos));
                    return Ok(Test::Never);
                }
                (Err(e), None) => return Err(e),
            };
            let fits = matches!(
                (&*list, ty),
                (CompiledList::Ips(_), FieldType::Ip)
                    | (CompiledList::Strings(_), FieldType::Bytes)
            );
            if !fits {
                let kind = self.lists.get(name).map(|l| l.kind.as_str()).unwrap_or("?");
                return Err(ExprError::new(
                    pos,
                    ExprErrorKind::ListTypeMismatch {
                        list: name.to_owned(),
                        list_type: kind.to_owned(),
                        field: f.name().to_owned(),
                    },
                ));
            }
            return Ok(Test::List(list));
        }
        Ok(match ty {
            FieldType::Bytes => match (op, rhs) {
                (CmpOp::In, Rhs::Set(items)) => Test::StrSet(
                    items
                        .iter()
                        .filter_map(|i| set_item_str(f, i))
                        .map(String::into_boxed_str)
                        .collect(),
                ),
                (CmpOp::Matches, Rhs::Value(Literal::Regex(re) | Literal::Str(re))) => {
                    Test::Regex(self.regex(re, pos)?)
                }
                (CmpOp::Contains, Rhs::Value(lit)) => contains_literal(f, lit)
                    .map_or(Test::Never, |s| Test::Contains(s.into_boxed_str())),
                (
                    CmpOp::Wildcard | CmpOp::StrictWildcard,
                    Rhs::Value(Literal::Str(p) | Literal::Regex(p)),
                ) => Test::Wildcard(p.as_bytes().into(), op == CmpOp::Wildcard),
                (CmpOp::Eq, Rhs::Value(lit)) => {
                    str_literal(f, lit).map_or(Test::Never, |s| Test::StrEq(s.into_boxed_str()))
                }
                (CmpOp::Ne, Rhs::Value(lit)) => {
                    str_literal(f, lit).map_or(Test::Never, |s| Test::StrNe(s.into_boxed_str()))
                }
                (CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge, Rhs::Value(lit)) => {
                    str_literal(f, lit)
                        .map_or(Test::Never, |s| Test::StrOrd(op, s.into_boxed_str()))
                }
                _ => Test::Never,
            },
            FieldType::Int => match (op, rhs) {
                (CmpOp::In, Rhs::Set(items)) => Test::IntIn(IntSet::new(
                    items.iter().flat_map(|i| set_item_int_ranges(f, i)),
                )),
                (CmpOp::Eq | CmpOp::Ne, Rhs::Value(lit)) => match int_literal(lit) {
                    None => Test::Never,
                    Some(x) => {
                        let ids: Vec<i64> = category_ids(f, x).collect();
                        match (op, ids.as_slice()) {
                            (CmpOp::Eq, [one]) => Test::IntEq(*one),
                            (_, [one]) => Test::IntNe(*one),
                            (CmpOp::Eq, _) => {
                                Test::IntIn(IntSet::new(ids.iter().map(|c| (*c, *c))))
                            }
                            _ => Test::IntNotIn(IntSet::new(ids.iter().map(|c| (*c, *c)))),
                        }
                    }
                },
                (CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge, Rhs::Value(lit)) => {
                    int_literal(lit).map_or(Test::Never, |x| Test::IntOrd(op, x))
                }
                _ => Test::Never,
            },
            FieldType::Ip => match (op, rhs) {
                (CmpOp::In, Rhs::Set(items)) => {
                    Test::IpIn(IpTable::new(items.iter().filter_map(set_item_ip_range)))
                }
                (CmpOp::Eq | CmpOp::Ne, Rhs::Value(lit)) => match ip_literal(lit) {
                    None => Test::Never,
                    Some(net) => {
                        let t = IpTable::new([(net.network(), net.broadcast())]);
                        if op == CmpOp::Eq {
                            Test::IpIn(t)
                        } else {
                            Test::IpNotIn(t)
                        }
                    }
                },
                (CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge, Rhs::Value(lit)) => {
                    ip_literal(lit).map_or(Test::Never, |n| Test::IpOrd(op, n.addr()))
                }
                _ => Test::Never,
            },
            _ => Test::Never,
        })
    }

    fn regex(&mut self, re: &str, pos: Pos) -> Result<Arc<Regex>, ExprError> {
        if let Some(r) = self.regexes.get(re) {
            return Ok(r.clone());
        }
        let compiled = Regex::new(re).map_err(|e| {
            ExprError::new(
                pos,
                ExprErrorKind::BadRegex {
                    pattern: re.to_owned(),
                    message: e.to_string(),
                },
            )
        })?;
        let compiled = Arc::new(compiled);
        self.regexes.insert(re.to_owned(), compiled.clone());
        Ok(compiled)
    }
}

/// Values that a rule requires one of, found in a required conjunct of the rule.
enum Keys {
    Str(FieldId, Vec<Box<str>>),
    Int(FieldId, Vec<i64>),
    Ip(FieldId, Vec<IpNet>),
    List(FieldId, Arc<CompiledList>),
    Union(Vec<Keys>),
}

/// How many candidates a key on this field is expected to bring (lower is more selective).
fn field_weight(f: FieldId) -> u32 {
    use FieldId::*;
    match f {
        DnsFqdn | DnsDomains | HttpRequestHost | HttpRequestDomains | NetSniHost
        | NetSniDomains | NetFqdnHost | NetFqdnDomains | IdentityEmail | IdentityName
        | HttpRequestUri | HttpRequestUriPath => 1,
        IdentityGroupsId | IdentityGroupsName | IdentityGroupsEmail | IdentitySamlAttributes => 8,
        NetDstPort | NetSrcPort => 16,
        DnsContentCategory
        | DnsSecurityCategory
        | HttpRequestUriContentCategory
        | HttpRequestUriSecurityCategory => 24,
        NetProtocol
        | DnsQueryRtype
        | HttpRequestMethod
        | NetOnrampType
        | NetDetectedProtocol
        | DnsSrcGeoContinent
        | DnsDstGeoContinent
        | NetSrcGeoContinent
        | NetDstGeoContinent
        | HttpSrcIpGeoContinent
        | HttpDstIpGeoContinent => 64,
        _ => 4,
    }
}

impl Keys {
    fn score(&self) -> u32 {
        match self {
            Keys::Str(f, _) | Keys::Int(f, _) | Keys::List(f, _) => field_weight(*f),
            Keys::Ip(f, nets) => nets.iter().fold(field_weight(*f), |acc, n| {
                // An IPv6 /64 is as specific in practice as an IPv4 address.
                let wide = match n {
                    IpNet::V4(n) => 32 - n.prefix_len(),
                    IpNet::V6(n) => 64u8.saturating_sub(n.prefix_len()),
                };
                acc.saturating_add(u32::from(wide) * u32::from(wide))
            }),
            Keys::Union(parts) => parts.iter().map(Keys::score).fold(0, u32::saturating_add),
        }
    }

    fn of(node: &Node) -> Option<Keys> {
        match node {
            Node::Const(false) => Some(Keys::Union(Vec::new())),
            Node::Test(Src::Any(f) | Src::Elem(f), test) => match test {
                Test::StrEq(s) => Some(Keys::Str(*f, vec![s.clone()])),
                Test::StrSet(set) => Some(Keys::Str(*f, set.iter().cloned().collect())),
                Test::IntEq(n) => Some(Keys::Int(*f, vec![*n])),
                Test::IntIn(set) if set.ranges.is_empty() => {
                    Some(Keys::Int(*f, set.singles.iter().copied().collect()))
                }
                Test::IpIn(t) => t.cidrs(64).map(|c| Keys::Ip(*f, c)),
                Test::List(l) => Some(Keys::List(*f, l.clone())),
                _ => None,
            },
            Node::And(v) => v.iter().filter_map(Keys::of).min_by_key(Keys::score),
            Node::Or(v) => v
                .iter()
                .map(Keys::of)
                .collect::<Option<Vec<_>>>()
                .map(Keys::Union),
            _ => None,
        }
    }
}

type Span = (u32, u32);

#[derive(Debug)]
struct FieldIndex {
    field: FieldId,
    strs: FxHashMap<Box<str>, Span>,
    ints: FxHashMap<i64, Span>,
    /// Per (prefix length, is v6): masked network address -> rules.
    ips: Vec<(u8, bool, FxHashMap<u128, Span>)>,
    lists: Vec<(Arc<CompiledList>, Span)>,
}

#[derive(Default)]
struct FieldIndexBuilder {
    strs: FxHashMap<Box<str>, Vec<u32>>,
    ints: FxHashMap<i64, Vec<u32>>,
    ips: FxHashMap<(u8, bool), FxHashMap<u128, Vec<u32>>>,
    lists: Vec<(Arc<CompiledList>, Vec<u32>)>,
}

fn push_unique(v: &mut Vec<u32>, r: u32) {
    if v.last() != Some(&r) {
        v.push(r);
    }
}

fn net_key(n: &IpNet) -> (u8, bool, u128) {
    match n {
        IpNet::V4(n) => (n.prefix_len(), false, u128::from(u32::from(n.network()))),
        IpNet::V6(n) => (n.prefix_len(), true, u128::from(n.network())),
    }
}

#[inline]
fn mask(ip: IpAddr, prefix: u8, v6: bool) -> Option<u128> {
    match (ip, v6) {
        (IpAddr::V4(a), false) => {
            let m = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
            Some(u128::from(u32::from(a) & m))
        }
        (IpAddr::V6(a), true) => {
            let m = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
            Some(u128::from(a) & m)
        }
        _ => None,
    }
}

/// Rules in evaluation order with an index of their required values.
#[derive(Debug, Default)]
pub struct Evaluator {
    programs: Vec<Program>,
    postings: Vec<u32>,
    fields: Vec<FieldIndex>,
    always: Span,
}

/// Cursors over posting spans, kept on the stack unless an input hits very many keys.
struct Cursors {
    inline: [Span; 32],
    len: usize,
    spill: Vec<Span>,
}

impl Cursors {
    fn push(&mut self, s: Span) {
        if s.0 >= s.1 {
            return;
        }
        if self.len < self.inline.len() {
            self.inline[self.len] = s;
            self.len += 1;
        } else {
            self.spill.push(s);
        }
    }
}

impl Evaluator {
    /// Builds an evaluator over programs in evaluation order.
    pub fn new(programs: Vec<Program>) -> Evaluator {
        let mut by_field: FxHashMap<FieldId, FieldIndexBuilder> = FxHashMap::default();
        let mut always = Vec::new();
        for (r, p) in programs.iter().enumerate() {
            let r = r as u32;
            match Keys::of(&p.node) {
                Some(keys) => add_keys(&mut by_field, keys, r),
                _ => always.push(r),
            }
        }
        let mut postings = Vec::new();
        let mut span = |v: Vec<u32>| {
            let start = postings.len() as u32;
            postings.extend(v);
            (start, postings.len() as u32)
        };
        let always = span(always);
        let mut fields: Vec<FieldIndex> = by_field
            .into_iter()
            .map(|(field, b)| {
                let mut ips: Vec<_> = b
                    .ips
                    .into_iter()
                    .map(|((len, v6), m)| {
                        (len, v6, m.into_iter().map(|(k, v)| (k, span(v))).collect())
                    })
                    .collect();
                ips.sort_by_key(|(len, v6, _)| (*v6, std::cmp::Reverse(*len)));
                FieldIndex {
                    field,
                    strs: b.strs.into_iter().map(|(k, v)| (k, span(v))).collect(),
                    ints: b.ints.into_iter().map(|(k, v)| (k, span(v))).collect(),
                    ips,
                    lists: b.lists.into_iter().map(|(l, v)| (l, span(v))).collect(),
                }
            })
            .collect();
        fields.sort_by_key(|f| f.field);
        Evaluator {
            programs,
            postings,
            fields,
            always,
        }
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.programs.len()
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.programs.is_empty()
    }

    /// How many rules are evaluated for every input (no indexable condition).
    pub fn unindexed(&self) -> usize {
        (self.always.1 - self.always.0) as usize
    }

    /// The position of the first rule whose program holds, evaluating only candidate rules.
    pub fn first_match(&self, input: &Input) -> Option<usize> {
        let mut cur = Cursors {
            inline: [(0, 0); 32],
            len: 0,
            spill: Vec::new(),
        };
        cur.push(self.always);
        for fi in &self.fields {
            let Some(v) = input.get(fi.field) else {
                continue;
            };
            for i in 0..v.len() {
                match v.get(i) {
                    Some(Scalar::Str(s)) if !fi.strs.is_empty() => {
                        if let Some(sp) = fi.strs.get(s) {
                            cur.push(*sp);
                        }
                    }
                    Some(Scalar::Int(n)) if !fi.ints.is_empty() => {
                        if let Some(sp) = fi.ints.get(&n) {
                            cur.push(*sp);
                        }
                    }
                    Some(Scalar::Ip(ip)) => {
                        for (len, v6, m) in &fi.ips {
                            if let Some(sp) = mask(ip, *len, *v6).and_then(|k| m.get(&k)) {
                                cur.push(*sp);
                            }
                        }
                    }
                    _ => {}
                }
            }
            for (list, sp) in &fi.lists {
                if (0..v.len()).any(|i| v.get(i).is_some_and(|s| list.contains(s))) {
                    cur.push(*sp);
                }
            }
        }
        let Cursors {
            mut inline,
            len,
            mut spill,
        } = cur;
        let spans: &mut [Span] = if spill.is_empty() {
            &mut inline[..len]
        } else {
            spill.extend_from_slice(&inline[..len]);
            &mut spill
        };
        loop {
            let mut min = u32::MAX;
            for (pos, end) in spans.iter() {
                if pos < end {
                    min = min.min(self.postings[*pos as usize]);
                }
            }
            if min == u32::MAX {
                return None;
            }
            for (pos, end) in spans.iter_mut() {
                if pos < end && self.postings[*pos as usize] == min {
                    *pos += 1;
                }
            }
            if self.programs[min as usize].eval(input) {
                return Some(min as usize);
            }
        }
    }

    /// The position of the first rule whose program holds, trying every rule in order.
    pub fn first_match_linear(&self, input: &Input) -> Option<usize> {
        self.programs.iter().position(|p| p.eval(input))
    }
}

fn add_keys(by_field: &mut FxHashMap<FieldId, FieldIndexBuilder>, keys: Keys, r: u32) {
    match keys {
        Keys::Str(f, vals) => {
            let b = by_field.entry(f).or_default();
            for v in vals {
                push_unique(b.strs.entry(v).or_default(), r);
            }
        }
        Keys::Int(f, vals) => {
            let b = by_field.entry(f).or_default();
            for v in vals {
                push_unique(b.ints.entry(v).or_default(), r);
            }
        }
        Keys::Ip(f, nets) => {
            let b = by_field.entry(f).or_default();
            for n in nets {
                let (len, v6, key) = net_key(&n);
                push_unique(
                    b.ips.entry((len, v6)).or_default().entry(key).or_default(),
                    r,
                );
            }
        }
        Keys::List(f, list) => {
            let b = by_field.entry(f).or_default();
            match b.lists.iter_mut().find(|(l, _)| Arc::ptr_eq(l, &list)) {
                Some((_, v)) => push_unique(v, r),
                None => b.lists.push((list, vec![r])),
            }
        }
        Keys::Union(parts) => parts.into_iter().for_each(|k| add_keys(by_field, k, r)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ip_table_merges_overlapping_and_adjacent_ranges() {
        let t = IpTable::new([
            (ip("10.0.0.0"), ip("10.0.0.255")),
            (ip("10.0.1.0"), ip("10.0.1.9")),
            (ip("10.0.0.128"), ip("10.0.0.200")),
            (ip("192.0.2.9"), ip("192.0.2.1")),
            (ip("2001:db8::"), ip("2001:db8::ffff")),
            (ip("10.0.0.1"), ip("2001:db8::1")),
        ]);
        assert_eq!(t.v4, vec![(0x0a00_0000, 0x0a00_0109)]);
        assert_eq!(t.v6.len(), 1);
        assert!(t.contains(ip("10.0.1.9")));
        assert!(!t.contains(ip("10.0.1.10")));
        assert!(!t.contains(ip("192.0.2.5")));
        assert!(t.contains(ip("2001:db8::abcd")));
        assert!(!t.contains(ip("::ffff:10.0.0.1")));
        let all = IpTable::new([(ip("0.0.0.0"), ip("255.255.255.255"))]);
        assert!(all.contains(ip("255.255.255.255")));
        assert_eq!(all.cidrs(4), Some(vec!["0.0.0.0/0".parse().unwrap()]));
    }

    #[test]
    fn int_set_enumerates_small_ranges_only() {
        let s = IntSet::new([(1, 3), (10, 1_000_000), (5, 4), (i64::MIN, i64::MIN + 1)]);
        assert_eq!(s.singles.len(), 5);
        assert_eq!(s.ranges, vec![(10, 1_000_000)]);
        assert!(s.contains(500) && s.contains(i64::MIN) && !s.contains(4) && !s.contains(5));
    }

    #[test]
    fn masks() {
        assert_eq!(mask(ip("10.1.2.3"), 8, false), Some(0x0a00_0000));
        assert_eq!(mask(ip("10.1.2.3"), 0, false), Some(0));
        assert_eq!(mask(ip("10.1.2.3"), 32, false), Some(0x0a01_0203));
        assert_eq!(mask(ip("2001:db8::1"), 0, true), Some(0));
        assert_eq!(mask(ip("2001:db8::1"), 32, false), None);
    }
}
