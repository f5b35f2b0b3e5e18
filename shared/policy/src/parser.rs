//! Recursive-descent parser for the wirefilter dialect Gateway rules are written in.
//!
//! Input: one expression (a rule's `traffic`, `identity` or `device_posture` string). Output: an
//! [`Expr`] whose fields are resolved to [`FieldId`]s (aliases included) and whose values are
//! normalized the way Gateway reads them, so that later passes see one spelling per meaning:
//!
//! - a quoted integer or address on an Int or Ip field becomes an integer or address
//!   (`net.dst.port == "2222"` is `net.dst.port == 2222`);
//! - a continent written in full on a continent field becomes its code (`"North America"` → `"NA"`);
//! - list names that are UUIDs are written as 32 lowercase hex digits ([`normalize_list_id`]);
//! - a bare `f[*] OP v` outside `any(...)`/`all(...)` becomes `any(f[*] OP v)`;
//! - the string after `matches`/`~` is kept as written ([`Literal::Regex`]), so backslashes reach
//!   the regex engine unchanged.
//!
//! Types are not checked here (see [`super::typecheck`]): `dns.fqdn > 3` parses. Never panics;
//! nesting deeper than [`MAX_DEPTH`] is an error rather than a stack overflow.

use std::net::IpAddr;

use ipnet::IpNet;

use super::ast::{normalize_list_id, Access, CmpOp, Expr, FieldRef, Literal, Rhs, SetItem};
use super::error::{ExprError, ExprErrorKind, Pos};
use super::fields::{continent_code, FieldId, FieldType};
use super::lexer::{tokenize, Tok};

/// How deeply parentheses, `not` and `any(...)` may nest.
pub const MAX_DEPTH: u32 = 64;

/// Parses one expression.
///
/// ```
/// use waygate_policy::parser::parse;
///
/// let e = parse(r#"net.dst.port == "2222" and any(identity.groups[*].name in {"eng"})"#).unwrap();
/// assert_eq!(e.to_string(), r#"net.dst.port == 2222 and any(identity.groups.name[*] in {"eng"})"#);
///
/// let err = parse(r#"dns.fqdn == "a" or dns.fqd == "b""#).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     r#"line 1, column 20: unknown field "dns.fqd"; did you mean "dns.fqdn"?"#
/// );
/// ```
pub fn parse(src: &str) -> Result<Expr, ExprError> {
    let toks = tokenize(src)?;
    let mut p = Parser {
        toks,
        i: 0,
        depth: 0,
        folds: 0,
    };
    let e = p.or()?;
    match p.peek() {
        Tok::Eof => Ok(e),
        Tok::RParen => {
            Err(p.unexpected("an operator, \"and\", \"or\", \"xor\" or the end (unbalanced \")\")"))
        }
        _ => {
            Err(p.unexpected("an operator, \"and\", \"or\", \"xor\" or the end of the expression"))
        }
    }
}

struct Parser {
    /// Always ends with `Eof`, which `bump` never steps past.
    toks: Vec<(Tok, Pos)>,
    i: usize,
    depth: u32,
    /// How many `any(`/`all(` enclose the current point: `f[*]` is wrapped only outside them.
    folds: u32,
}

type PResult<T> = Result<T, ExprError>;

const EOF: (Tok, Pos) = (Tok::Eof, Pos { line: 1, column: 1 });

impl Parser {
    fn at(&self, k: usize) -> &(Tok, Pos) {
        let last = self.toks.len().saturating_sub(1);
        self.toks.get((self.i + k).min(last)).unwrap_or(&EOF)
    }
    fn peek(&self) -> &Tok {
        &self.at(0).0
    }
    fn pos(&self) -> Pos {
        self.at(0).1
    }
    fn bump(&mut self) -> (Tok, Pos) {
        let t = self.at(0).clone();
        if t.0 != Tok::Eof {
            self.i += 1;
        }
        t
    }
    fn peek_word(&self, w: &str) -> bool {
        matches!(self.peek(), Tok::Word(x) if x == w)
    }
    fn unexpected(&self, expected: &'static str) -> ExprError {
        ExprError::new(
            self.pos(),
            ExprErrorKind::Unexpected {
                found: self.peek().describe(),
                expected,
            },
        )
    }
    fn expect(&mut self, tok: Tok, expected: &'static str) -> PResult<()> {
        if *self.peek() == tok {
            self.bump();
            Ok(())
        } else {
            Err(self.unexpected(expected))
        }
    }
    fn enter(&mut self) -> PResult<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ExprError::new(self.pos(), ExprErrorKind::TooDeep));
        }
        Ok(())
    }

    fn or(&mut self) -> PResult<Expr> {
        self.enter()?;
        let mut v = vec![self.xor()?];
        while matches!(self.peek(), Tok::OrOr) || self.peek_word("or") {
            self.bump();
            v.push(self.xor()?);
        }
        self.depth -= 1;
        Ok(join(v, Expr::Or))
    }

    fn xor(&mut self) -> PResult<Expr> {
        let mut v = vec![self.and()?];
        while matches!(self.peek(), Tok::XorXor) || self.peek_word("xor") {
            self.bump();
            v.push(self.and()?);
        }
        Ok(join(v, Expr::Xor))
    }

    fn and(&mut self) -> PResult<Expr> {
        let mut v = vec![self.unary()?];
        while matches!(self.peek(), Tok::AndAnd) || self.peek_word("and") {
            self.bump();
            v.push(self.unary()?);
        }
        Ok(join(v, Expr::And))
    }

    fn unary(&mut self) -> PResult<Expr> {
        if matches!(self.peek(), Tok::Bang) || self.peek_word("not") {
            self.bump();
            self.enter()?;
            let e = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(e)));
        }
        self.primary()
    }

    fn primary(&mut self) -> PResult<Expr> {
        match self.peek() {
            Tok::LParen => {
                self.bump();
                let e = self.or()?;
                self.expect(Tok::RParen, "\")\"")?;
                Ok(e)
            }
            Tok::Word(w) if (w == "any" || w == "all") && self.at(1).0 == Tok::LParen => {
                let is_any = w == "any";
                self.bump();
                self.bump();
                self.folds += 1;
                let inner = self.or();
                self.folds -= 1;
                let inner = Box::new(inner?);
                self.expect(Tok::RParen, "\")\" closing any(...)/all(...)")?;
                Ok(if is_any {
                    Expr::Any(inner)
                } else {
                    Expr::All(inner)
                })
            }
            Tok::Word(_) => self.comparison(),
            _ => Err(self.unexpected("a field, \"not\", \"(\", \"any(\" or \"all(\"")),
        }
    }

    fn comparison(&mut self) -> PResult<Expr> {
        let lhs = self.field_ref()?;
        let each = lhs.access == Access::Each;
        if self.peek_word("not") {
            // Dashboard users write "not in"; wirefilter negates the whole comparison instead.
            let pos = self.pos();
            let save = self.i;
            self.bump();
            if let Ok(Some(op)) = self.operator() {
                return Err(ExprError::new(
                    pos,
                    ExprErrorKind::InfixNot {
                        field: lhs.to_string(),
                        op: op.as_str(),
                    },
                ));
            }
            self.i = save;
        }
        let e = match self.operator()? {
            None => Expr::Field(lhs),
            Some(op) => {
                let rhs_pos = self.pos();
                let rhs = self.rhs(op)?;
                let rhs = normalize(lhs.field, op, rhs);
                Expr::Compare {
                    lhs,
                    op,
                    rhs,
                    rhs_pos,
                }
            }
        };
        // Gateway reads a bare `f[*] == v` as `any(f[*] == v)`.
        Ok(if each && self.folds == 0 {
            Expr::Any(Box::new(e))
        } else {
            e
        })
    }

    fn field_ref(&mut self) -> PResult<FieldRef> {
        let Tok::Word(name) = self.peek().clone() else {
            return Err(self.unexpected("a field"));
        };
        let pos = self.pos();
        self.bump();
        let access = if *self.peek() == Tok::LBracket {
            self.bump();
            let (tok, tpos) = self.bump();
            let bad = |found: String| {
                ExprError::new(
                    tpos,
                    ExprErrorKind::Unexpected {
                        found,
                        expected: "\"*\", an index or a \"key\"",
                    },
                )
            };
            let (access, closed) = match tok {
                Tok::RBracket => (Access::Each, true),
                Tok::Star => (Access::Each, false),
                Tok::Word(n) => (
                    Access::Index(n.parse::<u32>().map_err(|_| bad(format!("\"{n}\"")))?),
                    false,
                ),
                Tok::Str { cooked, .. } => (
                    Access::Key(cooked.map_err(|k| ExprError::new(tpos, k))?),
                    false,
                ),
                other => return Err(bad(other.describe())),
            };
            if !closed {
                self.expect(Tok::RBracket, "\"]\"")?;
            }
            access
        } else {
            Access::Whole
        };
        self.finish_field(name, pos, access)
    }

    fn finish_field(&mut self, mut name: String, pos: Pos, access: Access) -> PResult<FieldRef> {
        if access != Access::Whole {
            // `identity.groups[*].name` is the older spelling of `identity.groups.name[*]`.
            if let Tok::Word(rest) = self.peek() {
                if rest.starts_with('.') {
                    name.push_str(rest);
                    self.bump();
                }
            }
        }
        match FieldId::lookup(&name) {
            Some(field) => Ok(FieldRef { field, access, pos }),
            None => {
                let suggestion = FieldId::suggest(&name);
                Err(ExprError::new(
                    pos,
                    ExprErrorKind::UnknownField { name, suggestion },
                ))
            }
        }
    }

    fn operator(&mut self) -> PResult<Option<CmpOp>> {
        let op = match self.peek() {
            Tok::EqEq => CmpOp::Eq,
            Tok::Ne => CmpOp::Ne,
            Tok::Lt => CmpOp::Lt,
            Tok::Le => CmpOp::Le,
            Tok::Gt => CmpOp::Gt,
            Tok::Ge => CmpOp::Ge,
            Tok::Tilde => CmpOp::Matches,
            Tok::Word(w) => match w.as_str() {
                "eq" => CmpOp::Eq,
                "ne" => CmpOp::Ne,
                "lt" => CmpOp::Lt,
                "le" => CmpOp::Le,
                "gt" => CmpOp::Gt,
                "ge" => CmpOp::Ge,
                "in" => CmpOp::In,
                "matches" => CmpOp::Matches,
                "contains" => CmpOp::Contains,
                "wildcard" => CmpOp::Wildcard,
                "strict" => {
                    self.bump();
                    if !self.peek_word("wildcard") {
                        return Err(self.unexpected("\"wildcard\" after \"strict\""));
                    }
                    CmpOp::StrictWildcard
                }
                _ => return Ok(None),
            },
            _ => return Ok(None),
        };
        self.bump();
        Ok(Some(op))
    }

    fn rhs(&mut self, op: CmpOp) -> PResult<Rhs> {
        if op == CmpOp::In {
            return match self.peek().clone() {
                Tok::LBrace => {
                    self.bump();
                    self.set()
                }
                Tok::List(name) => {
                    self.bump();
                    Ok(Rhs::List(normalize_list_id(&name)))
                }
                _ => Err(self.unexpected("a set {...} or a list $name after \"in\"")),
            };
        }
        let pos = self.pos();
        let lit = match self.peek().clone() {
            Tok::Str { raw, .. } if op == CmpOp::Matches => Literal::Regex(raw),
            Tok::Str { cooked, .. } => Literal::Str(cooked.map_err(|k| ExprError::new(pos, k))?),
            Tok::Word(w) => match word_literal(&w) {
                Some(l) => l,
                None => return Err(self.bad_word(&w, "a value (a \"string\", number or address)")),
            },
            Tok::LBrace => {
                return Err(self.unexpected("a single value (sets {...} go after \"in\")"));
            }
            _ => return Err(self.unexpected("a value (a \"string\", number or address)")),
        };
        self.bump();
        Ok(Rhs::Value(lit))
    }

    fn bad_word(&self, w: &str, expected: &'static str) -> ExprError {
        ExprError::new(
            self.pos(),
            ExprErrorKind::Unexpected {
                found: format!("\"{w}\""),
                expected,
            },
        )
    }

    fn set(&mut self) -> PResult<Rhs> {
        let mut items = Vec::new();
        loop {
            let pos = self.pos();
            let item = match self.peek().clone() {
                Tok::RBrace => {
                    self.bump();
                    return Ok(Rhs::Set(items));
                }
                Tok::Str { cooked, .. } => {
                    SetItem::Str(cooked.map_err(|k| ExprError::new(pos, k))?)
                }
                Tok::Word(w) => set_word(&w).map_err(|kind| match kind {
                    Some(kind) => ExprError::new(pos, kind),
                    None => self.bad_word(
                        &w,
                        "a set member (a \"string\", number, address, CIDR or range)",
                    ),
                })?,
                _ => return Err(self.unexpected("a set member or \"}\"")),
            };
            self.bump();
            items.push(item);
        }
    }
}

fn join(mut v: Vec<Expr>, make: fn(Vec<Expr>) -> Expr) -> Expr {
    if v.len() == 1 {
        if let Some(e) = v.pop() {
            return e;
        }
    }
    make(v)
}

fn word_literal(w: &str) -> Option<Literal> {
    if let Ok(i) = w.parse::<i64>() {
        return Some(Literal::Int(i));
    }
    if let Ok(ip) = w.parse::<IpAddr>() {
        return Some(Literal::Ip(ip));
    }
    w.parse::<IpNet>().ok().map(Literal::Cidr)
}

/// A set member written as a word: `Err(None)` when it is no value at all.
fn set_word(w: &str) -> Result<SetItem, Option<ExprErrorKind>> {
    if let Some((a, b)) = w.split_once("..") {
        if let (Ok(a), Ok(b)) = (a.parse::<i64>(), b.parse::<i64>()) {
            return if a <= b {
                Ok(SetItem::IntRange(a, b))
            } else {
                Err(Some(ExprErrorKind::EmptyRange(w.to_string())))
            };
        }
        if let (Ok(a), Ok(b)) = (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
            return if a.is_ipv4() == b.is_ipv4() && a <= b {
                Ok(SetItem::IpRange(a, b))
            } else {
                Err(Some(ExprErrorKind::EmptyRange(w.to_string())))
            };
        }
        return Err(None);
    }
    match word_literal(w) {
        Some(Literal::Int(i)) => Ok(SetItem::Int(i)),
        Some(Literal::Ip(ip)) => Ok(SetItem::Ip(ip)),
        Some(Literal::Cidr(n)) => Ok(SetItem::Cidr(n)),
        _ => Err(None),
    }
}

/// Applies Gateway's leniencies for quoted numbers and addresses and continent names, by the
/// type of value the field (or its elements) holds.
fn normalize(field: FieldId, op: CmpOp, rhs: Rhs) -> Rhs {
    if op == CmpOp::Matches {
        return rhs;
    }
    let info = field.info();
    let scalar = info.ty.element().unwrap_or(info.ty);
    let value = |s: String| -> Literal {
        match scalar {
            FieldType::Int | FieldType::Ip => match word_literal(s.trim()) {
                Some(Literal::Int(i)) if scalar == FieldType::Int => Literal::Int(i),
                Some(l @ (Literal::Ip(_) | Literal::Cidr(_))) if scalar == FieldType::Ip => l,
                _ => Literal::Str(s),
            },
            FieldType::Bytes if info.is_continent() => Literal::Str(continent_code(&s).to_string()),
            _ => Literal::Str(s),
        }
    };
    match rhs {
        Rhs::Value(Literal::Str(s)) => Rhs::Value(value(s)),
        Rhs::Set(items) => {
            Rhs::Set(
                items
                    .into_iter()
                    .map(|item| match item {
                        SetItem::Str(s) => match scalar {
                            FieldType::Int | FieldType::Ip => match set_word(s.trim()) {
                                Ok(it @ (SetItem::Int(_) | SetItem::IntRange(..)))
                                    if scalar == FieldType::Int =>
                                {
                                    it
                                }
                                Ok(
                                    it @ (SetItem::Ip(_) | SetItem::Cidr(_) | SetItem::IpRange(..)),
                                ) if scalar == FieldType::Ip => it,
                                _ => SetItem::Str(s),
                            },
                            FieldType::Bytes if info.is_continent() => {
                                SetItem::Str(continent_code(&s).to_string())
                            }
                            _ => SetItem::Str(s),
                        },
                        other => other,
                    })
                    .collect(),
            )
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Expr {
        match parse(s) {
            Ok(e) => e,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn err(s: &str) -> (u32, u32, String) {
        let e = parse(s).expect_err(s);
        (e.pos.line, e.pos.column, e.to_string())
    }

    fn cmp(field: FieldId, access: Access, op: CmpOp, rhs: Rhs) -> Expr {
        Expr::Compare {
            lhs: FieldRef {
                field,
                access,
                pos: Pos::default(),
            },
            op,
            rhs,
            rhs_pos: Pos::default(),
        }
    }

    fn s(x: &str) -> Rhs {
        Rhs::Value(Literal::Str(x.into()))
    }

    #[test]
    fn operators_and_word_forms() {
        for (a, b) in [
            ("==", "eq"),
            ("!=", "ne"),
            ("<", "lt"),
            ("<=", "le"),
            (">", "gt"),
            (">=", "ge"),
            ("~", "matches"),
        ] {
            let x = format!("http.response.status_code {a} 200");
            let y = format!("http.response.status_code {b} 200");
            assert_eq!(p(&x), p(&y), "{a} vs {b}");
        }
        assert_eq!(
            p(r#"dns.fqdn strict wildcard "*.Example.com""#),
            cmp(
                FieldId::DnsFqdn,
                Access::Whole,
                CmpOp::StrictWildcard,
                s("*.Example.com")
            )
        );
        assert!(matches!(
            p(r#"dns.fqdn contains "x""#),
            Expr::Compare {
                op: CmpOp::Contains,
                ..
            }
        ));
    }

    #[test]
    fn precedence() {
        let e = p("!access.private_app && access.target ^^ access.target || access.private_app");
        let f = |id| {
            Expr::Field(FieldRef {
                field: id,
                access: Access::Whole,
                pos: Pos::default(),
            })
        };
        let expected = Expr::Or(vec![
            Expr::Xor(vec![
                Expr::And(vec![
                    Expr::Not(Box::new(f(FieldId::AccessPrivateApp))),
                    f(FieldId::AccessTarget),
                ]),
                f(FieldId::AccessTarget),
            ]),
            f(FieldId::AccessPrivateApp),
        ]);
        assert_eq!(e, expected);
        assert_eq!(
            p("not access.private_app and access.target or access.target xor access.private_app"),
            p("((not access.private_app) and access.target) or (access.target xor access.private_app)")
        );
        assert_eq!(
            p(r#"not dns.fqdn == "a" and dns.fqdn == "b""#),
            p(r#"(not (dns.fqdn == "a")) and dns.fqdn == "b""#)
        );
    }

    #[test]
    fn sets() {
        let e = p(
            "net.dst.ip in {10.0.0.0/8 192.0.2.1..192.0.2.9 2001:db8::/32 ::1 \"198.51.100.1\"}",
        );
        let Expr::Compare {
            rhs: Rhs::Set(items),
            ..
        } = e
        else {
            panic!()
        };
        assert_eq!(items.len(), 5);
        assert!(matches!(items[1], SetItem::IpRange(..)));
        assert!(matches!(items[4], SetItem::Ip(_)));
        assert_eq!(
            p("net.dst.port in {80 443 8000..8999 \"22\"}"),
            cmp(
                FieldId::NetDstPort,
                Access::Whole,
                CmpOp::In,
                Rhs::Set(vec![
                    SetItem::Int(80),
                    SetItem::Int(443),
                    SetItem::IntRange(8000, 8999),
                    SetItem::Int(22)
                ])
            )
        );
    }

    #[test]
    fn leniencies() {
        assert_eq!(p(r#"net.dst.port == "2222""#), p("net.dst.port == 2222"));
        assert_eq!(
            p(r#"net.dst.ip == "198.51.100.158""#),
            p("net.dst.ip == 198.51.100.158")
        );
        assert_eq!(
            p(r#"net.src.geo.continent == "North America""#),
            p(r#"net.src.geo.continent == "NA""#)
        );
        assert!(matches!(
            p("net.src.ip == 10.0.0.0/8"),
            Expr::Compare {
                rhs: Rhs::Value(Literal::Cidr(_)),
                ..
            }
        ));
        // Only continent fields translate names.
        assert_eq!(
            p(r#"dns.fqdn == "Europe""#),
            cmp(FieldId::DnsFqdn, Access::Whole, CmpOp::Eq, s("Europe"))
        );
    }

    #[test]
    fn arrays_and_aliases() {
        let any = p(r#"any(dns.domains[*] == "example.com")"#);
        assert_eq!(p(r#"dns.domains[*] == "example.com""#), any);
        assert_eq!(p(r#"dns.domains[] == "example.com""#), any);
        assert_eq!(
            p(r#"any(identity.groups[*].name in {"Admins"})"#),
            p(r#"any(identity.groups.name[*] in {"Admins"})"#)
        );
        assert_eq!(
            p(r#"http.conn.hostname == "a""#),
            p(r#"http.request.host == "a""#)
        );
        assert!(matches!(
            p("dns.resolved_ips[2] == 1.2.3.4"),
            Expr::Compare {
                lhs: FieldRef {
                    access: Access::Index(2),
                    ..
                },
                ..
            }
        ));
        assert!(matches!(
            p(r#"identity.saml_attributes["dept"] == "eng""#),
            Expr::Compare { lhs: FieldRef { access: Access::Key(k), .. }, .. } if k == "dept"
        ));
        assert!(matches!(p(r#"all(dns.domains[*] != "a")"#), Expr::All(_)));
    }

    #[test]
    fn regex_keeps_backslashes() {
        assert_eq!(
            p(r#"dns.fqdn matches "example\.com""#),
            cmp(
                FieldId::DnsFqdn,
                Access::Whole,
                CmpOp::Matches,
                Rhs::Value(Literal::Regex(r"example\.com".into()))
            )
        );
        assert_eq!(
            p(r##"dns.fqdn ~ r#"a"b\d"#"##),
            cmp(
                FieldId::DnsFqdn,
                Access::Whole,
                CmpOp::Matches,
                Rhs::Value(Literal::Regex(r#"a"b\d"#.into()))
            )
        );
        // Outside `matches`, escapes are cooked and `\.` is not one.
        assert_eq!(err(r#"dns.fqdn == "a\.b""#).1, 13);
    }

    #[test]
    fn lists() {
        let dashed = p("dns.fqdn in $2C9A9E8B-4F1D-4C47-9D45-30F5F2C1A001");
        let plain = p("dns.fqdn in $2c9a9e8b4f1d4c479d4530f5f2c1a001");
        assert_eq!(dashed, plain);
        assert_eq!(
            p("dns.fqdn in $my-list"),
            cmp(
                FieldId::DnsFqdn,
                Access::Whole,
                CmpOp::In,
                Rhs::List("my-list".into())
            )
        );
    }

    #[test]
    fn errors_have_positions() {
        assert_eq!(
            err(r#"dns.fqdn == "a" or dns.fqd == "b""#),
            (
                1,
                20,
                "line 1, column 20: unknown field \"dns.fqd\"; did you mean \"dns.fqdn\"?".into()
            )
        );
        assert_eq!(err("dns.fqdn ==").0, 1);
        assert_eq!(err("dns.fqdn ==").1, 12);
        assert_eq!(err("(dns.fqdn == \"a\"").1, 17);
        assert_eq!(err("dns.fqdn == \"a\")").1, 16);
        assert_eq!(err("net.dst.port in {80, 443}").1, 20);
        assert_eq!(err("net.dst.port in {9..1}").1, 18);
        assert_eq!(err("net.dst.port in 80").1, 17);
        assert_eq!(err("net.dst.port == {80}").1, 17);
        assert_eq!(err("dns.fqdn strict \"a\"").1, 17);
        assert_eq!(
            err("dns.fqdn == \"a\"\n and\n dns.fqdn =").2,
            "line 3, column 11: unexpected \"=\"; did you mean \"==\"?"
        );
        assert_eq!(err("dns.domains[x] == \"a\"").1, 13);
        assert_eq!(
            err("dns.fqdn not in {\"a\"}"),
            (
                1,
                10,
                "line 1, column 10: \"not\" goes before the comparison: not(dns.fqdn in ...)"
                    .into()
            )
        );
        assert_eq!(err("dns.domains[*] not matches \"a\"").1, 16);
        assert_eq!(err("\"a\" == dns.fqdn").1, 1);
        assert_eq!(err("dns.fqdn == abc").1, 13);
        assert_eq!(err("").1, 1);
        assert_eq!(err("not").1, 4);
        let deep = format!("{}access.target{}", "(".repeat(200), ")".repeat(200));
        assert!(matches!(
            parse(&deep).unwrap_err().kind,
            ExprErrorKind::TooDeep
        ));
        let nots = format!("{}access.target", "not ".repeat(200));
        assert!(matches!(
            parse(&nots).unwrap_err().kind,
            ExprErrorKind::TooDeep
        ));
    }
}
