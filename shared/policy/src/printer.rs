//! Canonical text for expressions: `Display` for [`Expr`] and its parts.
//!
//! The output uses the symbolic operators and canonical field names, parenthesizes only where
//! precedence needs it (plus where the tree itself nests a connective inside the same one, which
//! only explicit parentheses produce), and picks between `"..."` and `r#"..."#` so a regex comes
//! back unchanged. [`super::parser::parse`] reads the output back to an equal tree (property-tested
//! below), provided the tree is one the parser can produce (values already normalized, `f[*]` only
//! inside `any(...)`/`all(...)`, connectives with two or more operands).

use std::fmt;

use super::ast::{Access, Expr, FieldRef, Literal, Rhs, SetItem};

fn precedence(e: &Expr) -> u8 {
    match e {
        Expr::Or(_) => 1,
        Expr::Xor(_) => 2,
        Expr::And(_) => 3,
        _ => 4,
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

/// A regex is printed between plain quotes when the lexer would hand back exactly `raw` from
/// them, else as a raw string with enough `#`s.
fn write_regex(f: &mut fmt::Formatter<'_>, raw: &str) -> fmt::Result {
    if plain_quotes_keep(raw) {
        return write!(f, "\"{raw}\"");
    }
    let mut hashes = 1;
    while raw.contains(&format!("\"{}", "#".repeat(hashes))) {
        hashes += 1;
    }
    let h = "#".repeat(hashes);
    write!(f, "r{h}\"{raw}\"{h}")
}

/// The lexer pairs each backslash inside `"..."` with the next character (`\x` then takes only hex
/// digits), so the text comes back unchanged when it has no quote and no unpaired final backslash.
fn plain_quotes_keep(raw: &str) -> bool {
    let mut it = raw.chars();
    while let Some(c) = it.next() {
        match c {
            '"' => return false,
            '\\' if it.next().is_none() => return false,
            _ => {}
        }
    }
    true
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
                if precedence(e) <= prec {
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
                if precedence(e) < 4 {
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

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use ipnet::IpNet;
    use proptest::prelude::*;

    use super::super::ast::{
        normalize_list_id, Access, CmpOp, Expr, FieldRef, Literal, Rhs, SetItem,
    };
    use super::super::error::Pos;
    use super::super::fields::{FieldId, FieldType, Stage, FIELDS};
    use super::super::parser::parse;
    use super::super::typecheck::check;

    fn fields_of(ty: FieldType) -> Vec<FieldId> {
        // Continent fields rewrite full names, so a random string might not come back as written.
        FIELDS
            .iter()
            .filter(|f| f.ty == ty && !f.is_continent())
            .map(|f| f.id)
            .collect()
    }

    fn field(ty: FieldType) -> impl Strategy<Value = FieldId> {
        proptest::sample::select(fields_of(ty))
    }

    fn ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
            any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
            // Mapped addresses print in dotted form.
            any::<u32>().prop_map(|v| IpAddr::V6(Ipv4Addr::from(v).to_ipv6_mapped())),
        ]
    }

    fn cidr() -> impl Strategy<Value = IpNet> {
        (ip(), any::<u8>()).prop_map(|(ip, p)| {
            let max = if ip.is_ipv4() { 33 } else { 129 };
            IpNet::new(ip, p % max).unwrap_or_else(|_| IpNet::from(ip))
        })
    }

    fn ip_range() -> impl Strategy<Value = SetItem> {
        (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(a, b, v6)| {
            let (a, b) = (a.min(b), a.max(b));
            if v6 {
                SetItem::IpRange(
                    IpAddr::V6(Ipv6Addr::from(u128::from(a) << 64)),
                    IpAddr::V6(Ipv6Addr::from(u128::from(b) << 64)),
                )
            } else {
                SetItem::IpRange(Ipv4Addr::from(a).into(), Ipv4Addr::from(b).into())
            }
        })
    }

    fn list() -> impl Strategy<Value = Rhs> {
        prop_oneof![
            "[a-zA-Z0-9_.:/-]{1,40}".prop_map(|n| Rhs::List(normalize_list_id(&n))),
            any::<u128>().prop_map(|v| Rhs::List(normalize_list_id(&format!("{v:032x}")))),
        ]
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

    /// A comparison on a value of `ty` read through `access`.
    fn scalar_cmp(fid: FieldId, access: Access, ty: FieldType) -> BoxedStrategy<Expr> {
        let a = access.clone();
        let c = move |op, rhs| cmp(fid, a.clone(), op, rhs);
        match ty {
            FieldType::Int => {
                let c2 = c.clone();
                prop_oneof![
                    (
                        proptest::sample::select(vec![
                            CmpOp::Eq,
                            CmpOp::Ne,
                            CmpOp::Lt,
                            CmpOp::Le,
                            CmpOp::Gt,
                            CmpOp::Ge
                        ]),
                        any::<i64>()
                    )
                        .prop_map(move |(op, v)| c(op, Rhs::Value(Literal::Int(v)))),
                    proptest::collection::vec(
                        prop_oneof![
                            any::<i64>().prop_map(SetItem::Int),
                            (any::<i64>(), any::<i64>())
                                .prop_map(|(a, b)| SetItem::IntRange(a.min(b), a.max(b))),
                        ],
                        0..5
                    )
                    .prop_map(move |items| c2(CmpOp::In, Rhs::Set(items))),
                ]
                .boxed()
            }
            FieldType::Ip => {
                let c2 = c.clone();
                let c3 = c.clone();
                prop_oneof![
                    (
                        proptest::sample::select(vec![CmpOp::Eq, CmpOp::Ne]),
                        prop_oneof![ip().prop_map(Literal::Ip), cidr().prop_map(Literal::Cidr)]
                    )
                        .prop_map(move |(op, v)| c(op, Rhs::Value(v))),
                    proptest::collection::vec(
                        prop_oneof![
                            ip().prop_map(SetItem::Ip),
                            cidr().prop_map(SetItem::Cidr),
                            ip_range()
                        ],
                        0..5
                    )
                    .prop_map(move |items| c2(CmpOp::In, Rhs::Set(items))),
                    list().prop_map(move |l| c3(CmpOp::In, l)),
                ]
                .boxed()
            }
            _ => {
                let (c2, c3, c4) = (c.clone(), c.clone(), c.clone());
                prop_oneof![
                    (
                        proptest::sample::select(vec![
                            CmpOp::Eq,
                            CmpOp::Ne,
                            CmpOp::Contains,
                            CmpOp::Wildcard,
                            CmpOp::StrictWildcard
                        ]),
                        any::<String>()
                    )
                        .prop_map(move |(op, v)| c(op, Rhs::Value(Literal::Str(v)))),
                    prop_oneof![any::<String>(), r##"[a\\"#x.]{0,8}"##]
                        .prop_map(move |r| c2(CmpOp::Matches, Rhs::Value(Literal::Regex(r)))),
                    proptest::collection::vec(any::<String>().prop_map(SetItem::Str), 0..4)
                        .prop_map(move |items| c3(CmpOp::In, Rhs::Set(items))),
                    list().prop_map(move |l| c4(CmpOp::In, l)),
                ]
                .boxed()
            }
        }
    }

    fn leaf() -> BoxedStrategy<Expr> {
        let whole = |ty| field(ty).prop_flat_map(move |f| scalar_cmp(f, Access::Whole, ty));
        let indexed = (
            prop_oneof![
                field(FieldType::BytesArray),
                field(FieldType::IntArray),
                field(FieldType::IpArray)
            ],
            any::<u32>(),
        )
            .prop_flat_map(|(f, n)| {
                scalar_cmp(f, Access::Index(n), f.ty().element().unwrap_or(f.ty()))
            });
        let keyed = any::<String>().prop_flat_map(|k| {
            scalar_cmp(
                FieldId::IdentitySamlAttributes,
                Access::Key(k),
                FieldType::Bytes,
            )
        });
        let boolean = field(FieldType::Bool).prop_map(|f| {
            Expr::Field(FieldRef {
                field: f,
                access: Access::Whole,
                pos: Pos::default(),
            })
        });
        prop_oneof![
            whole(FieldType::Bytes),
            whole(FieldType::Int),
            whole(FieldType::Ip),
            indexed,
            keyed,
            boolean
        ]
        .boxed()
    }

    fn element_leaf() -> BoxedStrategy<Expr> {
        prop_oneof![
            field(FieldType::BytesArray),
            field(FieldType::IntArray),
            field(FieldType::IpArray),
            Just(FieldId::IdentitySamlAttributes)
        ]
        .prop_flat_map(|f| scalar_cmp(f, Access::Each, f.ty().element().unwrap_or(f.ty())))
        .boxed()
    }

    fn fold() -> BoxedStrategy<Expr> {
        let body = prop_oneof![
            element_leaf(),
            element_leaf().prop_map(|e| Expr::Not(Box::new(e))),
            (element_leaf(), leaf()).prop_map(|(a, b)| Expr::And(vec![a, b])),
        ];
        (body, any::<bool>())
            .prop_map(|(b, all)| {
                if all {
                    Expr::All(Box::new(b))
                } else {
                    Expr::Any(Box::new(b))
                }
            })
            .boxed()
    }

    pub(crate) fn expr() -> impl Strategy<Value = Expr> {
        prop_oneof![3 => leaf(), 1 => fold()].prop_recursive(5, 32, 4, |inner| {
            prop_oneof![
                inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
                proptest::collection::vec(inner.clone(), 2..4).prop_map(Expr::And),
                proptest::collection::vec(inner.clone(), 2..4).prop_map(Expr::Xor),
                proptest::collection::vec(inner, 2..4).prop_map(Expr::Or),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn printed_ast_parses_back(e in expr()) {
            let text = e.to_string();
            match parse(&text) {
                Ok(back) => prop_assert_eq!(back, e, "{}", text),
                Err(err) => prop_assert!(false, "{text}\n{err}"),
            }
        }
    }

    /// Fragments that make the parser go deep instead of failing on the first character.
    fn soup() -> impl Strategy<Value = String> {
        let piece = proptest::sample::select(vec![
            "dns.fqdn",
            "net.dst.port",
            "net.dst.ip",
            "dns.domains",
            "identity.groups",
            "identity.saml_attributes",
            "access.target",
            ".name",
            "net.src.geo.continent",
            "[",
            "]",
            "[*]",
            "[]",
            "[0]",
            "(",
            ")",
            "{",
            "}",
            "any(",
            "all(",
            "not",
            "!",
            "and",
            "&&",
            "or",
            "||",
            "xor",
            "^^",
            "==",
            "!=",
            "eq",
            "<",
            ">=",
            "in",
            "matches",
            "~",
            "contains",
            "strict",
            "wildcard",
            "\"a\"",
            "\"North America\"",
            "\"80\"",
            "\"x\\.y\"",
            "r#\"q\"#",
            "r\"\"",
            "80",
            "8000..8999",
            "9..1",
            "10.0.0.0/8",
            "::1",
            "1.2.3.4..1.2.3.9",
            "$list",
            "$2C9A9E8B-4F1D-4C47-9D45-30F5F2C1A001",
            "\n",
            ",",
            "\"\\x4",
            "-1",
            "identity.groups.name",
            "\"(\"",
            "dns.dst.geo.country",
            "dns.resolved_ips",
            "[\"k\"]",
            "r#\"a\"b\"#",
            "'",
            "=",
            "&",
        ]);
        proptest::collection::vec(piece, 0..24).prop_map(|v| v.join(" "))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn any_text_parses_or_errs(s in any::<String>()) {
            let _ = parse(&s);
        }

        #[test]
        fn soup_round_trips_when_it_parses(s in soup()) {
            if let Ok(e) = parse(&s) {
                for stage in Stage::ALL {
                    let _ = check(&e, stage);
                }
                let text = e.to_string();
                prop_assert_eq!(parse(&text).ok(), Some(e), "{} -> {}", s, text);
            }
        }
    }

    #[test]
    fn canonical_text() {
        for (src, want) in [
            (
                r#"dns.fqdn eq "a" && !(dns.fqdn ne "b" || dns.fqdn ~ "c\.d")"#,
                r#"dns.fqdn == "a" and not (dns.fqdn != "b" or dns.fqdn matches "c\.d")"#,
            ),
            (
                r#"identity.groups[*].name == "x""#,
                r#"any(identity.groups.name[*] == "x")"#,
            ),
            ("net.dst.port == \"2222\"", "net.dst.port == 2222"),
            (
                "(access.target and access.target) and access.target",
                "(access.target and access.target) and access.target",
            ),
            (r#"dns.fqdn == "q\"\\\x01""#, r#"dns.fqdn == "q\"\\\x01""#),
            (r#"dns.fqdn matches "a\x""#, r#"dns.fqdn matches "a\x""#),
            (
                r##"dns.fqdn matches r"a\""##,
                r##"dns.fqdn matches r#"a\"#"##,
            ),
            (
                r##"dns.fqdn matches r#"a"b"#"##,
                r##"dns.fqdn matches r#"a"b"#"##,
            ),
            (
                "net.dst.ip in {10.0.0.0/8 192.0.2.1..192.0.2.9}",
                "net.dst.ip in {10.0.0.0/8 192.0.2.1..192.0.2.9}",
            ),
        ] {
            let e = parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
            assert_eq!(e.to_string(), want, "{src}");
            assert_eq!(parse(want).ok(), Some(e));
        }
    }
}
