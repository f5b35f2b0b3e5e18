//! The rule language of Cloudflare Gateway: expressions (wirefilter dialect), their type checking
//! against each stage's fields, compilation into an allocation-free evaluator, and rule sets.

pub mod ast;
pub mod categories;
pub mod compile;
pub mod error;
pub mod fields;
pub mod input;
pub mod interp;
mod lexer;
pub mod parser;
pub mod printer;
pub mod ruleset;
pub mod typecheck;
