//! Errors of the expression language: each carries the position and the offending text.

use std::fmt;

use super::fields::{FieldType, Stage};

/// A 1-based line and column (in characters) inside one expression.
///
/// Positions never take part in AST equality: two ASTs that differ only in where their parts were
/// written are the same expression.
#[derive(Clone, Copy, Debug, Default, Eq)]
pub struct Pos {
    /// Line, from 1.
    pub line: u32,
    /// Column, from 1.
    pub column: u32,
}

impl PartialEq for Pos {
    fn eq(&self, _other: &Pos) -> bool {
        true
    }
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}, column {}", self.line, self.column)
    }
}

/// An expression error with its position.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{pos}: {kind}")]
pub struct ExprError {
    /// Where the problem starts.
    pub pos: Pos,
    /// What is wrong.
    pub kind: ExprErrorKind,
}

impl ExprError {
    pub(crate) fn new(pos: Pos, kind: ExprErrorKind) -> ExprError {
        ExprError { pos, kind }
    }
}

/// What is wrong with an expression.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ExprErrorKind {
    /// A character that starts no token.
    #[error("unexpected character {0:?}")]
    UnexpectedChar(char),
    /// A string without its closing quote.
    #[error("unterminated string")]
    UnterminatedString,
    /// An escape other than `\"`, `\\`, `\xHH`.
    #[error("invalid escape \"{0}\" in string")]
    BadEscape(String),
    /// A string whose `\xHH` escapes do not form UTF-8.
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    /// A token the grammar does not allow here.
    #[error("unexpected {found}; expected {expected}")]
    Unexpected {
        /// What was found.
        found: String,
        /// What would have been valid.
        expected: &'static str,
    },
    /// A name that is no field.
    #[error("unknown field \"{name}\"{}", suggestion.map(|s| format!("; did you mean \"{s}\"?")).unwrap_or_default())]
    UnknownField {
        /// The name as written.
        name: String,
        /// The closest known field name.
        suggestion: Option<&'static str>,
    },
    /// A field that the rule's stage does not have.
    #[error("field \"{field}\" is not available in {stage} rules{}", instead.map(|s| format!("; use \"{s}\"")).unwrap_or_default())]
    WrongStage {
        /// The field.
        field: &'static str,
        /// The rule's stage.
        stage: Stage,
        /// The field with the same meaning in that stage, if there is one.
        instead: Option<&'static str>,
    },
    /// An operator the field's type does not support.
    #[error("operator \"{op}\" cannot be used on \"{field}\" ({ty})")]
    BadOperator {
        /// The operator as printed.
        op: &'static str,
        /// The field (with its accessor).
        field: String,
        /// The type the operator was applied to.
        ty: FieldType,
    },
    /// A value that does not fit the field's type.
    #[error("{value} is not a valid {expected} for \"{field}\"")]
    BadValue {
        /// The field.
        field: String,
        /// The value as printed.
        value: String,
        /// The expected type.
        expected: &'static str,
    },
    /// A regex the engine rejects.
    #[error("invalid regex \"{pattern}\": {message}")]
    BadRegex {
        /// The pattern.
        pattern: String,
        /// The regex engine's message.
        message: String,
    },
    /// An accessor the field's type does not have.
    #[error("\"{field}\" ({ty}) cannot be accessed with {access}")]
    BadAccess {
        /// The field.
        field: &'static str,
        /// Its type.
        ty: FieldType,
        /// The accessor as written.
        access: String,
    },
    /// An array used as a scalar.
    #[error("\"{field}\" is an array: compare its elements with {field}[*] (any(...) / all(...))")]
    ArrayNeedsElement {
        /// The field.
        field: &'static str,
    },
    /// A non-Bool field used alone as a condition.
    #[error("\"{field}\" ({ty}) is not a Bool; compare it with a value")]
    NotACondition {
        /// The field.
        field: String,
        /// Its type.
        ty: FieldType,
    },
    /// `[*]` outside `any(...)`/`all(...)`.
    #[error("\"{field}[*]\" must be inside any(...) or all(...)")]
    ElementOutsideAny {
        /// The field.
        field: &'static str,
    },
    /// `any(...)` mixing elements of two different arrays.
    #[error("any()/all() may iterate one array only, found \"{first}\" and \"{second}\"")]
    MixedArrays {
        /// The first array.
        first: &'static str,
        /// The second array.
        second: &'static str,
    },
    /// `any(...)`/`all(...)` without `[*]` inside.
    #[error("any()/all() needs a field with [*] inside")]
    NoArrayInAny,
    /// A list that the lists file does not define.
    #[error("unknown list \"${0}\"")]
    UnknownList(String),
    /// A list whose items do not fit the field.
    #[error("list \"${list}\" holds {list_type} items, which cannot be compared with \"{field}\"")]
    ListTypeMismatch {
        /// The list as written.
        list: String,
        /// The list's type.
        list_type: String,
        /// The field.
        field: String,
    },
    /// Parentheses, `not` or `any(...)` nested deeper than the parser allows.
    #[error("expression nested too deeply")]
    TooDeep,
    /// A single `=`, `&`, `|` or `^`, where only the doubled operator exists.
    #[error("unexpected \"{found}\"; did you mean \"{meant}\"?")]
    LoneOperator {
        /// The character found.
        found: char,
        /// The operator it probably meant.
        meant: &'static str,
    },
    /// A single quote: strings are written in double quotes.
    #[error("unexpected \"'\"; strings are written in double quotes (\"...\" or r\"...\")")]
    SingleQuote,
    /// `field not OP value`: negation goes in front of the whole comparison.
    #[error("\"not\" goes before the comparison: not({field} {op} ...)")]
    InfixNot {
        /// The field as written.
        field: String,
        /// The operator after `not`.
        op: &'static str,
    },
    /// A comma, which wirefilter never uses (sets are space-separated).
    #[error("unexpected \",\"; set members are separated by spaces, not commas")]
    Comma,
    /// A range whose start is after its end.
    #[error("range {0} is empty (start after end)")]
    EmptyRange(String),
}
