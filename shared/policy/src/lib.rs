//! The rule language of Cloudflare Gateway: expressions (wirefilter dialect), their type checking
//! against each stage's fields, compilation into an allocation-free evaluator, and rule sets.
//!
//! Front end: [`parser::parse`] turns text into an [`ast::Expr`] (fields resolved, Gateway's
//! leniencies normalized), [`typecheck::check`] validates it for one [`fields::Stage`] and returns
//! warnings, [`typecheck::parse_checked`] does both; `Display` on [`ast::Expr`] ([`printer`]) prints
//! canonical text that parses back to the same tree. Errors are [`error::ExprError`]s carrying a
//! line and column.
//!
//! Inputs: rule files (Cloudflare's JSON) and lists, compiled once per load; field values of one
//! flow or query in an [`input::Input`]. Outputs: the first matching rule of a stage, and the
//! [`fields::Phase`] each compiled rule needs before it can decide. Called by the gateway's
//! stages and resolver for every decision, and by `waygate rules`; nothing here does I/O.

#![deny(missing_docs)]

pub mod ast;
pub mod categories;
pub mod category_db;
pub mod compile;
pub mod error;
pub mod fields;
pub mod input;
pub mod interp;
mod lexer;
pub mod lists;
pub mod parser;
pub mod printer;
pub mod ruleset;
pub mod strset;
pub mod typecheck;
