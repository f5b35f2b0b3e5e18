//! The compiled evaluator (hashed sets, interval tables, shared lists, rule index) decides exactly
//! as the tree-walking reference interpreter, on random expressions, rule sets and inputs.

// is_multiple_of is newer than the workspace MSRV.
#![allow(clippy::manual_is_multiple_of)]

use std::net::IpAddr;

use proptest::prelude::*;
use waygate_policy::ast::{Access, CmpOp, Expr, FieldRef, Literal, Rhs, SetItem};
use waygate_policy::compile::{CompiledLists, Compiler, Evaluator};
use waygate_policy::error::Pos;
use waygate_policy::fields::FieldId;
use waygate_policy::input::Input;
use waygate_policy::interp;
use waygate_policy::ruleset::{List, ListType, Lists, Policy, RuleSet};

const STRS: &[&str] = &[
    "a.example.com",
    "example.com",
    "com",
    "B.Example.com.",
    "eng",
    "ops",
    "tcp",
    "udp",
    "NA",
    "North America",
    "EU",
    "x@y.com",
    "US",
    "admin",
    "",
];
const INTS: &[i64] = &[0, 2, 67, 80, 443, 170, 31, 1000, -1];
const IPS: &[&str] = &[
    "10.0.0.1",
    "10.1.2.3",
    "192.0.2.5",
    "2001:db8::1",
    "198.51.100.158",
    "0.0.0.0",
];

#[derive(Clone, Copy, Debug)]
enum Kind {
    Str,
    Int,
    Ip,
    Bool,
}

/// Fields with their element kind and whether they are arrays.
const FIELDS: &[(FieldId, Kind, bool)] = &[
    (FieldId::DnsFqdn, Kind::Str, false),
    (FieldId::IdentityEmail, Kind::Str, false),
    (FieldId::NetProtocol, Kind::Str, false),
    (FieldId::NetSrcGeoContinent, Kind::Str, false),
    (FieldId::DnsDomains, Kind::Str, true),
    (FieldId::IdentityGroupsName, Kind::Str, true),
    (FieldId::DnsDstGeoCountry, Kind::Str, true),
    (FieldId::IdentitySamlAttributes, Kind::Str, true),
    (FieldId::NetDstPort, Kind::Int, false),
    (FieldId::DnsContentCategory, Kind::Int, true),
    (FieldId::NetDstIp, Kind::Ip, false),
    (FieldId::DnsResolvedIps, Kind::Ip, true),
    (FieldId::AccessPrivateApp, Kind::Bool, false),
];

fn ip(i: usize) -> IpAddr {
    IPS[i % IPS.len()].parse().unwrap()
}

fn pos() -> Pos {
    Pos::default()
}

fn lists() -> Lists {
    Lists::new(vec![
        List {
            id: "2c9a9e8b-4f1d-4c47-9d45-30f5f2c1a001".into(),
            name: "doms".into(),
            kind: ListType::Domain,
            items: vec!["example.com".into(), "Foo.Test.".into(), "eng".into()],
        },
        List {
            id: "2c9a9e8b-4f1d-4c47-9d45-30f5f2c1a002".into(),
            name: "nets".into(),
            kind: ListType::Ip,
            items: vec!["10.0.0.0/8".into(), "2001:db8::/32".into()],
        },
        List {
            id: "2c9a9e8b-4f1d-4c47-9d45-30f5f2c1a003".into(),
            name: "mails".into(),
            kind: ListType::Email,
            items: vec!["x@y.com".into()],
        },
    ])
}

fn op_of(i: usize) -> CmpOp {
    [
        CmpOp::Eq,
        CmpOp::Ne,
        CmpOp::Lt,
        CmpOp::Le,
        CmpOp::Gt,
        CmpOp::Ge,
        CmpOp::In,
        CmpOp::Matches,
        CmpOp::Contains,
        CmpOp::Wildcard,
        CmpOp::StrictWildcard,
    ][i % 11]
}

/// A random comparison; `a`..`e` are raw choices interpreted per field kind.
fn compare(field: usize, acc: usize, op: usize, a: usize, b: usize, c: usize) -> Expr {
    let (f, kind, array) = FIELDS[field % FIELDS.len()];
    let mut op = op_of(op);
    let access = if f == FieldId::IdentitySamlAttributes && acc % 2 == 0 {
        Access::Key("role".into())
    } else if array {
        match acc % 3 {
            0 => Access::Each,
            1 => Access::Index((acc / 3 % 3) as u32),
            _ => Access::Whole,
        }
    } else {
        Access::Whole
    };
    let rhs = match kind {
        Kind::Str => match op {
            CmpOp::In if a % 3 == 0 => {
                Rhs::List(["doms", "mails", "2c9a9e8b4f1d4c479d4530f5f2c1a001"][b % 3].into())
            }
            CmpOp::In => Rhs::Set(
                (0..=b % 4)
                    .map(|k| SetItem::Str(STRS[(a + k * c) % STRS.len()].into()))
                    .collect(),
            ),
            CmpOp::Matches => Rhs::Value(Literal::Regex(
                ["^a\\.", "com$", "(?i)EXAMPLE", "e.g", "^$", "[0-9]"][a % 6].into(),
            )),
            CmpOp::Wildcard | CmpOp::StrictWildcard => Rhs::Value(Literal::Str(
                ["*.example.com", "*", "e?g", "B*", "\\*", ""][a % 6].into(),
            )),
            _ => Rhs::Value(Literal::Str(STRS[a % STRS.len()].into())),
        },
        Kind::Int => match op {
            CmpOp::In => Rhs::Set(
                (0..=b % 3)
                    .map(|k| {
                        let x = INTS[(a + k * c) % INTS.len()];
                        if k == 1 {
                            SetItem::IntRange(x, x + (c as i64 % 200))
                        } else if k == 2 {
                            SetItem::Str(x.to_string())
                        } else {
                            SetItem::Int(x)
                        }
                    })
                    .collect(),
            ),
            _ => {
                if b % 5 == 0 {
                    Rhs::Value(Literal::Str(INTS[a % INTS.len()].to_string()))
                } else {
                    Rhs::Value(Literal::Int(INTS[a % INTS.len()]))
                }
            }
        },
        Kind::Ip => match op {
            CmpOp::In if a % 3 == 0 => Rhs::List("nets".into()),
            CmpOp::In => Rhs::Set(
                (0..=b % 3)
                    .map(|k| {
                        let x = ip(a + k * c);
                        match (k + c) % 3 {
                            0 => SetItem::Ip(x),
                            1 => SetItem::Cidr(
                                ipnet::IpNet::new(
                                    x,
                                    if x.is_ipv4() {
                                        (c % 33) as u8
                                    } else {
                                        (c % 129) as u8
                                    },
                                )
                                .unwrap(),
                            ),
                            _ => SetItem::IpRange(x, ip(a + k * c + 1)),
                        }
                    })
                    .collect(),
            ),
            _ => {
                if b % 3 == 0 {
                    let x = ip(a);
                    let len = if x.is_ipv4() {
                        (c % 33) as u8
                    } else {
                        (c % 129) as u8
                    };
                    Rhs::Value(Literal::Cidr(ipnet::IpNet::new(x, len).unwrap()))
                } else {
                    Rhs::Value(Literal::Ip(ip(a)))
                }
            }
        },
        Kind::Bool => {
            return Expr::Field(FieldRef {
                field: f,
                access: Access::Whole,
                pos: pos(),
            })
        }
    };
    if matches!(rhs, Rhs::Set(_) | Rhs::List(_)) {
        op = CmpOp::In;
    }
    let cmp = Expr::Compare {
        lhs: FieldRef {
            field: f,
            access: access.clone(),
            pos: pos(),
        },
        op,
        rhs,
        rhs_pos: pos(),
    };
    if access == Access::Each {
        if c % 2 == 0 {
            Expr::Any(Box::new(cmp))
        } else {
            Expr::All(Box::new(cmp))
        }
    } else {
        cmp
    }
}

fn leaf() -> impl Strategy<Value = Expr> {
    (
        0..64usize,
        0..64usize,
        0..64usize,
        0..64usize,
        0..64usize,
        0..64usize,
    )
        .prop_map(|(f, acc, op, a, b, c)| compare(f, acc, op, a, b, c))
}

fn expr() -> impl Strategy<Value = Expr> {
    leaf().prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            inner.clone().prop_map(|e| Expr::Not(Box::new(e))),
            prop::collection::vec(inner.clone(), 1..4).prop_map(Expr::And),
            prop::collection::vec(inner.clone(), 1..4).prop_map(Expr::Or),
            prop::collection::vec(inner.clone(), 1..3).prop_map(Expr::Xor),
            // A fold whose body mixes element tests with other conditions.
            (inner, 0..64usize, 0..64usize, any::<bool>()).prop_map(|(e, a, b, all)| {
                let elem = compare(4, 0, a, b, a + b, a * 7);
                let elem = match elem {
                    Expr::Any(x) | Expr::All(x) => *x,
                    other => other,
                };
                let body = Expr::And(vec![elem, e]);
                if all {
                    Expr::All(Box::new(body))
                } else {
                    Expr::Any(Box::new(body))
                }
            }),
        ]
    })
}

fn input() -> impl Strategy<Value = Input> {
    prop::collection::vec((any::<bool>(), 0..64usize, 0..4usize), FIELDS.len()).prop_map(|picks| {
        let mut input = Input::new();
        for ((f, kind, array), (set, a, n)) in FIELDS.iter().zip(picks) {
            if !set {
                continue;
            }
            match (kind, array) {
                (Kind::Str, false) if *f == FieldId::DnsFqdn => {
                    input.set_host(*f, STRS[a % STRS.len()])
                }
                (Kind::Str, false) => input.set_str(*f, STRS[a % STRS.len()]),
                (Kind::Str, true) if *f == FieldId::IdentitySamlAttributes => input.set_strs(
                    *f,
                    (0..n)
                        .map(|k| ["role=admin", "role=user", "team=eng", "noequals"][(a + k) % 4]),
                ),
                (Kind::Str, true) => {
                    input.set_strs(*f, (0..n).map(|k| STRS[(a + k * 3) % STRS.len()]))
                }
                (Kind::Int, false) => input.set_int(*f, INTS[a % INTS.len()]),
                (Kind::Int, true) => {
                    input.set_ints(*f, (0..n).map(|k| INTS[(a + k * 2) % INTS.len()]))
                }
                (Kind::Ip, false) => input.set_ip(*f, ip(a)),
                (Kind::Ip, true) => input.set_ips(*f, (0..n).map(|k| ip(a + k))),
                (Kind::Bool, _) => input.set_bool(*f, a % 2 == 0),
            }
        }
        input
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn compiled_expression_agrees_with_interpreter(e in expr(), inputs in prop::collection::vec(input(), 4)) {
        let lists = lists();
        let compiled = CompiledLists::new(&lists);
        let mut c = Compiler::new(&lists, &compiled);
        let p = c.compile_rule(&[&e]).expect("compiles");
        for i in &inputs {
            prop_assert_eq!(p.eval(i), interp::eval(&e, i, &lists), "expr: {}", e);
        }
    }

    #[test]
    fn indexed_first_match_agrees_with_interpreter(
        rules in prop::collection::vec(prop::collection::vec(expr(), 1..3), 1..24),
        inputs in prop::collection::vec(input(), 8),
    ) {
        let lists = lists();
        let compiled = CompiledLists::new(&lists);
        let mut c = Compiler::new(&lists, &compiled);
        let programs = rules
            .iter()
            .map(|r| c.compile_rule(&r.iter().collect::<Vec<_>>()).expect("compiles"))
            .collect();
        let ev = Evaluator::new(programs);
        for i in &inputs {
            let naive = rules
                .iter()
                .position(|r| interp::rule_matches(&r.iter().collect::<Vec<_>>(), i, &lists));
            prop_assert_eq!(ev.first_match(i), naive);
            prop_assert_eq!(ev.first_match_linear(i), naive);
        }
    }
}

const SOUP: &[&str] = &[
    "dns.fqdn",
    "dns.domains[*]",
    "any(",
    "all(",
    ")",
    "(",
    " and ",
    " or ",
    " xor ",
    "not ",
    " == ",
    " != ",
    " in ",
    " matches ",
    " contains ",
    " wildcard ",
    " < ",
    " >= ",
    "{",
    "}",
    "\"a.b\"",
    "\"(\"",
    "80",
    "1..9",
    "10.0.0.0/8",
    "::1",
    "$doms",
    "$nets",
    "net.dst.ip",
    "net.dst.port",
    "identity.saml_attributes[\"x\"]",
    "dns.content_category[0]",
    "\"*\"",
    "r#\"x\"#",
    "\"\\x41\"",
    "access.private_app",
    "http.request.host",
    ",",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

    /// Any rules document, expression text and flow either loads or is refused; none panics.
    #[test]
    fn hostile_rules_and_inputs_never_panic(
        parts in prop::collection::vec(0..SOUP.len(), 0..16),
        stage in 0..4usize,
        flow in prop::collection::vec((0..FIELDS.len(), 0..STRS.len(), 0..3usize), 0..6),
    ) {
        let traffic: String = parts.iter().map(|i| SOUP[*i]).collect();
        let filter = ["dns", "http", "l4", "egress"][stage];
        let doc = serde_json::json!([{"name": "r", "action": "block", "filters": [filter], "traffic": traffic}]);
        let set = RuleSet::from_json(&doc.to_string()).expect("well-formed JSON");
        let policy = Policy::compile(&set, &lists());
        let mut obj = serde_json::Map::new();
        for (f, s, shape) in flow {
            let v = match shape {
                0 => serde_json::json!(STRS[s]),
                1 => serde_json::json!([STRS[s], INTS[s % INTS.len()]]),
                _ => serde_json::json!(INTS[s % INTS.len()]),
            };
            obj.insert(FIELDS[f].0.name().to_owned(), v);
        }
        if let (Ok(p), Ok(input)) = (policy, Input::from_json(&serde_json::Value::Object(obj))) {
            let st = p.stage(waygate_policy::fields::Stage::parse(filter).unwrap());
            prop_assert_eq!(st.evaluate(&input).is_some(), st.evaluate_linear(&input).is_some());
        }
    }
}
