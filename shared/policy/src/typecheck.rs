//! Type checking of a parsed expression against one stage's fields.
//!
//! Input: an [`Expr`] from [`super::parser::parse`] and the [`Stage`] of the rule it belongs to.
//! Output: the first error (with the position of the field or value at fault), or the warnings
//! worth showing the rule's author. A checked expression only compares fields of its stage, with
//! operators and values their types support, through accessors their types have; every regex in it
//! compiles. The checker never panics and allocates only for messages.

use std::fmt;

use super::ast::{Access, CmpOp, Expr, FieldRef, Literal, Rhs, SetItem};
use super::error::{ExprError, ExprErrorKind, Pos};
use super::fields::{FieldId, FieldType, Stage};

/// Something the author should know that does not make the expression invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// Where the field or value is written.
    pub pos: Pos,
    /// What it is about.
    pub kind: WarningKind,
}

/// The kinds of [`Warning`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WarningKind {
    /// A field of a Cloudflare feature Waygate does not fill: comparisons on it see an unset value.
    Unfilled {
        /// The field.
        field: &'static str,
    },
    /// A value on a country field that is not two capital letters (ISO 3166-1 alpha-2), which
    /// no address geolocates to.
    NotACountryCode {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// A value on a continent field that is no continent code (`AF AN AS EU NA OC SA T1`).
    UnknownContinent {
        /// The field.
        field: &'static str,
        /// The value.
        value: String,
    },
}

impl fmt::Display for WarningKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WarningKind::Unfilled { field } => write!(
                f,
                "\"{field}\" belongs to a Cloudflare feature Waygate does not have: traffic never fills it, so comparisons on it are false"
            ),
            WarningKind::NotACountryCode { field, value } => write!(
                f,
                "\"{value}\" is not an ISO 3166-1 alpha-2 country code (two capital letters) for \"{field}\""
            ),
            WarningKind::UnknownContinent { field, value } => write!(
                f,
                "\"{value}\" is not a continent code for \"{field}\" (AF AN AS EU NA OC SA T1)"
            ),
        }
    }
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.pos, self.kind)
    }
}

/// The continent codes Gateway uses, T1 being Tor.
const CONTINENTS: [&str; 8] = ["AF", "AN", "AS", "EU", "NA", "OC", "SA", "T1"];

/// Checks `expr` for a rule of `stage`; on success returns the warnings, each field warned once.
///
/// ```
/// use waygate_policy::{fields::Stage, parser::parse, typecheck::check};
///
/// let e = parse(r#"net.sni.host == "example.com""#).unwrap();
/// assert!(check(&e, Stage::L4).unwrap().is_empty());
/// assert_eq!(
///     check(&e, Stage::Egress).unwrap_err().to_string(),
///     r#"line 1, column 1: field "net.sni.host" is not available in egress rules"#
/// );
/// ```
pub fn check(expr: &Expr, stage: Stage) -> Result<Vec<Warning>, ExprError> {
    let mut c = Checker {
        stage,
        warnings: Vec::new(),
    };
    c.expr(expr, None)?;
    Ok(c.warnings)
}

/// Parses and checks in one step.
pub fn parse_checked(src: &str, stage: Stage) -> Result<(Expr, Vec<Warning>), ExprError> {
    let expr = super::parser::parse(src)?;
    let warnings = check(&expr, stage)?;
    Ok((expr, warnings))
}

/// The type a comparison on `r` works on: the element type for `[*]`, `[N]`, `["key"]` and for
/// arrays where Gateway accepts `==`/`!=`/`in` on the whole array (meaning "any element"); `None`
/// when the accessor does not fit the field or the comparison would be on a whole array.
pub fn operand_type(r: &FieldRef, op: CmpOp) -> Option<FieldType> {
    let info = r.field.info();
    match (&r.access, info.ty.element()) {
        (Access::Whole, None) => Some(info.ty),
        (Access::Whole, Some(elem)) => (info.lenient_array_eq()
            && matches!(op, CmpOp::Eq | CmpOp::Ne | CmpOp::In))
        .then_some(elem),
        (Access::Each | Access::Index(_), Some(elem)) => Some(elem),
        (Access::Key(_), Some(elem)) if info.ty == FieldType::BytesArrayMap => Some(elem),
        _ => None,
    }
}

/// Where a fold (`any(...)`/`all(...)`) is collecting the arrays it iterates.
struct Fold {
    first: Option<FieldId>,
}

struct Checker {
    stage: Stage,
    warnings: Vec<Warning>,
}

fn err(pos: Pos, kind: ExprErrorKind) -> ExprError {
    ExprError::new(pos, kind)
}

impl Checker {
    fn expr(&mut self, e: &Expr, mut fold: Option<&mut Fold>) -> Result<(), ExprError> {
        match e {
            Expr::Not(inner) => self.expr(inner, fold),
            Expr::And(v) | Expr::Or(v) | Expr::Xor(v) => {
                for x in v {
                    self.expr(x, fold.as_deref_mut())?;
                }
                Ok(())
            }
            Expr::Any(inner) | Expr::All(inner) => {
                let mut own = Fold { first: None };
                self.expr(inner, Some(&mut own))?;
                if own.first.is_none() {
                    return Err(err(first_pos(inner), ExprErrorKind::NoArrayInAny));
                }
                Ok(())
            }
            Expr::Field(r) => {
                self.field(r, fold)?;
                let ty = match (&r.access, r.field.ty().element()) {
                    (Access::Whole, _) => Some(r.field.ty()),
                    (_, elem) => elem,
                };
                if ty == Some(FieldType::Bool) {
                    Ok(())
                } else {
                    Err(err(
                        r.pos,
                        ExprErrorKind::NotACondition {
                            field: r.to_string(),
                            ty: ty.unwrap_or(r.field.ty()),
                        },
                    ))
                }
            }
            Expr::Compare {
                lhs,
                op,
                rhs,
                rhs_pos,
            } => {
                self.field(lhs, fold)?;
                self.compare(lhs, *op, rhs, *rhs_pos)
            }
        }
    }

    /// Stage, accessor and `[*]` placement of one field reference.
    fn field(&mut self, r: &FieldRef, fold: Option<&mut Fold>) -> Result<(), ExprError> {
        let info = r.field.info();
        if !info.in_stage(self.stage) {
            return Err(err(
                r.pos,
                ExprErrorKind::WrongStage {
                    field: info.name,
                    stage: self.stage,
                    instead: r.field.counterpart(self.stage).map(FieldId::name),
                },
            ));
        }
        let fits = match &r.access {
            Access::Whole => true,
            Access::Each | Access::Index(_) => info.ty.element().is_some(),
            Access::Key(_) => info.ty == FieldType::BytesArrayMap,
        };
        if !fits {
            let access = match &r.access {
                Access::Key(_) => "a [\"key\"] (it is not a map)",
                _ => "an element index (it is not an array)",
            };
            return Err(err(
                r.pos,
                ExprErrorKind::BadAccess {
                    field: info.name,
                    ty: info.ty,
                    access: access.to_string(),
                },
            ));
        }
        if r.access == Access::Each {
            let Some(fold) = fold else {
                return Err(err(
                    r.pos,
                    ExprErrorKind::ElementOutsideAny { field: info.name },
                ));
            };
            match fold.first {
                None => fold.first = Some(r.field),
                Some(first) if first != r.field => {
                    return Err(err(
                        r.pos,
                        ExprErrorKind::MixedArrays {
                            first: first.name(),
                            second: info.name,
                        },
                    ))
                }
                Some(_) => {}
            }
        }
        if info.unfilled() && !self.warned(r.field) {
            self.warnings.push(Warning {
                pos: r.pos,
                kind: WarningKind::Unfilled { field: info.name },
            });
        }
        Ok(())
    }

    fn warned(&self, field: FieldId) -> bool {
        self.warnings
            .iter()
            .any(|w| matches!(w.kind, WarningKind::Unfilled { field: f } if f == field.name()))
    }

    fn compare(
        &mut self,
        lhs: &FieldRef,
        op: CmpOp,
        rhs: &Rhs,
        rhs_pos: Pos,
    ) -> Result<(), ExprError> {
        let info = lhs.field.info();
        let Some(ty) = operand_type(lhs, op) else {
            // The accessor was checked already, so this is a whole array.
            return Err(err(
                lhs.pos,
                ExprErrorKind::ArrayNeedsElement { field: info.name },
            ));
        };
        let op_fits = match ty {
            FieldType::Bytes => !matches!(op, CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge),
            FieldType::Int => matches!(
                op,
                CmpOp::Eq | CmpOp::Ne | CmpOp::Lt | CmpOp::Le | CmpOp::Gt | CmpOp::Ge | CmpOp::In
            ),
            FieldType::Ip => matches!(op, CmpOp::Eq | CmpOp::Ne | CmpOp::In),
            _ => false,
        };
        if !op_fits {
            return Err(err(
                lhs.pos,
                ExprErrorKind::BadOperator {
                    op: op.as_str(),
                    field: lhs.to_string(),
                    ty,
                },
            ));
        }
        let bad = |value: String, expected: &'static str| {
            err(
                rhs_pos,
                ExprErrorKind::BadValue {
                    field: lhs.to_string(),
                    value,
                    expected,
                },
            )
        };
        match (op, rhs) {
            (CmpOp::In, Rhs::List(_)) => Ok(()),
            (CmpOp::In, Rhs::Set(items)) => {
                for item in items {
                    let ok = match ty {
                        FieldType::Bytes => matches!(item, SetItem::Str(_)),
                        FieldType::Int => matches!(item, SetItem::Int(_) | SetItem::IntRange(..)),
                        _ => matches!(
                            item,
                            SetItem::Ip(_) | SetItem::Cidr(_) | SetItem::IpRange(..)
                        ),
                    };
                    if !ok {
                        return Err(bad(item.to_string(), expected_for(ty, true)));
                    }
                    if let SetItem::Str(s) = item {
                        self.geo_code(lhs, s, rhs_pos);
                    }
                }
                Ok(())
            }
            (CmpOp::In, Rhs::Value(v)) => Err(bad(v.to_string(), "set {...} or list $name")),
            (_, Rhs::Set(_) | Rhs::List(_)) => Err(bad(rhs.to_string(), "single value")),
            (CmpOp::Matches, Rhs::Value(Literal::Regex(re) | Literal::Str(re))) => {
                regex::Regex::new(re).map(|_| ()).map_err(|e| {
                    err(
                        rhs_pos,
                        ExprErrorKind::BadRegex {
                            pattern: re.clone(),
                            message: regex_message(&e),
                        },
                    )
                })
            }
            (CmpOp::Matches, Rhs::Value(v)) => Err(bad(v.to_string(), "regex string")),
            (_, Rhs::Value(Literal::Regex(r))) => {
                Err(bad(format!("\"{r}\""), expected_for(ty, false)))
            }
            (_, Rhs::Value(v)) => {
                let ok = match ty {
                    FieldType::Bytes => matches!(v, Literal::Str(_)),
                    FieldType::Int => matches!(v, Literal::Int(_)),
                    _ => matches!(v, Literal::Ip(_) | Literal::Cidr(_)),
                };
                if !ok {
                    return Err(bad(v.to_string(), expected_for(ty, false)));
                }
                if let (Literal::Str(s), CmpOp::Eq | CmpOp::Ne) = (v, op) {
                    self.geo_code(lhs, s, rhs_pos);
                }
                Ok(())
            }
        }
    }

    /// Warns about geolocation values that can never match: Gateway compares codes, not names.
    fn geo_code(&mut self, lhs: &FieldRef, value: &str, pos: Pos) {
        let field = lhs.field.name();
        let kind = if lhs.field.info().is_continent() {
            (!CONTINENTS.contains(&value)).then(|| WarningKind::UnknownContinent {
                field,
                value: value.to_string(),
            })
        } else if field.ends_with(".geo.country") {
            let code = value.len() == 2 && value.bytes().all(|b| b.is_ascii_uppercase());
            (!code).then(|| WarningKind::NotACountryCode {
                field,
                value: value.to_string(),
            })
        } else {
            None
        };
        if let Some(kind) = kind {
            self.warnings.push(Warning { pos, kind });
        }
    }
}

fn expected_for(ty: FieldType, in_set: bool) -> &'static str {
    match (ty, in_set) {
        (FieldType::Bytes, _) => "string",
        (FieldType::Int, false) => "integer",
        (FieldType::Int, true) => "integer or integer range",
        (_, false) => "IP address or CIDR",
        (_, true) => "IP address, CIDR or address range",
    }
}

/// The regex crate's message without the pattern it repeats.
fn regex_message(e: &regex::Error) -> String {
    let text = e.to_string();
    text.lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .map(|l| l.trim_start_matches("error:").trim().to_string())
        .unwrap_or(text)
}

/// The position of the first field inside `e`, for errors about a whole `any(...)`.
fn first_pos(e: &Expr) -> Pos {
    let mut pos = None;
    e.walk(&mut |x| {
        if let (None, Expr::Compare { lhs: r, .. } | Expr::Field(r)) = (pos, x) {
            pos = Some(r.pos);
        }
    });
    pos.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::parse;

    fn ok(src: &str, stage: Stage) -> Vec<Warning> {
        let e = parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        check(&e, stage).unwrap_or_else(|e| panic!("{src}: {e}"))
    }

    /// The error's line, column and message.
    fn bad(src: &str, stage: Stage) -> (u32, u32, String) {
        let e = parse(src).unwrap_or_else(|e| panic!("{src}: {e}"));
        let e = check(&e, stage).expect_err(src);
        (e.pos.line, e.pos.column, e.to_string())
    }

    #[test]
    fn accepts_well_typed() {
        for (src, stage) in [
            (
                r#"dns.fqdn == "a" and any(dns.domains[*] in {"a" "b"})"#,
                Stage::Dns,
            ),
            ("any(dns.content_category[*] in {1 2..5})", Stage::Dns),
            (
                "any(dns.resolved_ips[*] in {10.0.0.0/8 ::1 1.1.1.1..1.1.1.9})",
                Stage::Dns,
            ),
            (r#"dns.dst.geo.country == "RU""#, Stage::Dns),
            (r#"dns.dst.geo.continent in {"EU" "Asia"}"#, Stage::Dns),
            ("http.response.status_code >= 400", Stage::Http),
            (
                r#"http.request.uri matches "(?i)^https://[a-z]+\.example\.com/""#,
                Stage::Http,
            ),
            (
                "net.src.ip == 10.0.0.0/8 and net.dst.port in {80 443 8000..8999}",
                Stage::L4,
            ),
            (r#"net.sni.host wildcard "*.example.com""#, Stage::L4),
            (
                r#"identity.email contains "@" and identity.saml_attributes["dept"] == "eng""#,
                Stage::Egress,
            ),
            (r#"identity.groups.name == "finance""#, Stage::Http),
            (
                r#"all(device_posture.checks.passed[*] in $2c9a9e8b4f1d4c479d4530f5f2c1a001)"#,
                Stage::Egress,
            ),
            ("dns.resolved_ips[0] == 1.2.3.4", Stage::Dns),
        ] {
            assert_eq!(ok(src, stage), vec![], "{src}");
        }
    }

    #[test]
    fn rejections_with_positions() {
        let cases: &[(&str, Stage, (u32, u32), &str)] = &[
            (
                r#"dns.fqdn == "a" or net.dst.port == 80"#,
                Stage::Dns,
                (1, 20),
                r#"field "net.dst.port" is not available in dns rules"#,
            ),
            (
                r#"net.sni.host == "a""#,
                Stage::Egress,
                (1, 1),
                r#"field "net.sni.host" is not available in egress rules"#,
            ),
            (
                r#"dns.fqdn > "a""#,
                Stage::Dns,
                (1, 1),
                r#"operator ">" cannot be used on "dns.fqdn" (Bytes)"#,
            ),
            (
                r#"net.dst.port matches "8.*""#,
                Stage::L4,
                (1, 1),
                r#"operator "matches" cannot be used on "net.dst.port" (Int)"#,
            ),
            (
                r#"net.dst.ip contains "10""#,
                Stage::L4,
                (1, 1),
                r#"operator "contains" cannot be used on "net.dst.ip" (Ip)"#,
            ),
            (r#"dns.domains == "a""#, Stage::Dns, (1, 1), "is an array"),
            (
                r#"dns.domains contains "a""#,
                Stage::Dns,
                (1, 1),
                "is an array",
            ),
            (
                r#"dns.fqdn == 3"#,
                Stage::Dns,
                (1, 13),
                "3 is not a valid string",
            ),
            (
                r#"net.dst.port == "http""#,
                Stage::L4,
                (1, 17),
                r#""http" is not a valid integer"#,
            ),
            (
                r#"net.dst.ip == """#,
                Stage::L4,
                (1, 15),
                "not a valid IP address or CIDR",
            ),
            (
                r#"net.dst.port in {80 "x"}"#,
                Stage::L4,
                (1, 17),
                "not a valid integer or integer range",
            ),
            (
                r#"net.dst.ip in {1.2.3.4 80}"#,
                Stage::L4,
                (1, 15),
                "80 is not a valid IP address",
            ),
            (
                r#"http.request.uri matches "a(b""#,
                Stage::Http,
                (1, 26),
                "invalid regex \"a(b\"",
            ),
            (
                r#"dns.fqdn[0] == "a""#,
                Stage::Dns,
                (1, 1),
                "cannot be accessed with an element index",
            ),
            (
                r#"dns.domains["k"] == "a""#,
                Stage::Dns,
                (1, 1),
                "cannot be accessed with a [\"key\"]",
            ),
            ("dns.fqdn", Stage::Dns, (1, 1), "is not a Bool"),
            (
                "dns.fqdn and access.target",
                Stage::L4,
                (1, 1),
                "not available in l4",
            ),
            (
                "access.target and\n  dns.fqdn",
                Stage::L4,
                (2, 3),
                "not available in l4",
            ),
            (
                r#"any(dns.fqdn == "a")"#,
                Stage::Dns,
                (1, 5),
                "any()/all() needs a field with [*]",
            ),
            (
                r#"any(dns.domains[*] == "a" and dns.response.cname[*] == "b")"#,
                Stage::Dns,
                (1, 31),
                "may iterate one array only",
            ),
            (
                "access.target == 1",
                Stage::L4,
                (1, 1),
                "operator \"==\" cannot be used",
            ),
        ];
        for (src, stage, (line, col), msg) in cases {
            let (l, c, m) = bad(src, *stage);
            assert_eq!((l, c), (*line, *col), "{src}: {m}");
            assert!(m.contains(msg), "{src}: {m}");
        }
    }

    #[test]
    fn hand_built_trees() {
        // The parser never produces these, but compiled rule sets may be built by hand.
        let each = FieldRef {
            field: FieldId::DnsDomains,
            access: Access::Each,
            pos: Pos { line: 1, column: 3 },
        };
        let e = Expr::Compare {
            lhs: each,
            op: CmpOp::Eq,
            rhs: Rhs::Value(Literal::Str("a".into())),
            rhs_pos: Pos::default(),
        };
        let got = check(&e, Stage::Dns).expect_err("outside any");
        assert!(matches!(got.kind, ExprErrorKind::ElementOutsideAny { .. }));
        assert_eq!(got.pos.column, 3);
        let Expr::Compare { lhs, .. } = e else {
            unreachable!()
        };
        let regex_on_eq = Expr::Compare {
            lhs,
            op: CmpOp::Eq,
            rhs: Rhs::Value(Literal::Regex("a".into())),
            rhs_pos: Pos::default(),
        };
        assert!(check(&Expr::Any(Box::new(regex_on_eq)), Stage::Dns).is_err());
    }

    #[test]
    fn warnings() {
        let w = ok(
            "any(app.ids[*] in {606}) and any(app.ids[*] in {1})",
            Stage::Dns,
        );
        assert_eq!(w.len(), 1);
        assert_eq!(
            w[0].to_string(),
            "line 1, column 5: \"app.ids\" belongs to a Cloudflare feature Waygate does not have: traffic never fills it, so comparisons on it are false"
        );
        let w = ok("dns.categories_in_request_context_matches", Stage::Dns);
        assert!(matches!(w[0].kind, WarningKind::Unfilled { .. }));
        let w = ok(r#"net.dst.geo.continent == "Europa""#, Stage::Egress);
        assert!(
            matches!(&w[0].kind, WarningKind::UnknownContinent { value, .. } if value == "Europa")
        );
        assert_eq!(w[0].pos.column, 26);
        assert!(ok(r#"net.dst.geo.continent == "Europe""#, Stage::Egress).is_empty());
        let w = ok(
            r#"any(dns.dst.geo.country[*] in {"RU" "Russia" "by"})"#,
            Stage::Dns,
        );
        let values: Vec<_> = w
            .iter()
            .filter_map(|w| match &w.kind {
                WarningKind::NotACountryCode { value, .. } => Some(value.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(values, ["Russia", "by"]);
        assert!(w[0].to_string().contains("ISO 3166-1 alpha-2"));
    }

    #[test]
    fn parse_checked_reports_either() {
        assert!(parse_checked("dns.fqdn == \"a\"", Stage::Dns).is_ok());
        assert!(parse_checked("dns.fqdn == ", Stage::Dns).is_err());
        assert!(parse_checked("dns.fqdn == \"a\"", Stage::Http).is_err());
    }
}
