//! Activity logs: one JSON object per line for every DNS query, flow and egress decision, with
//! Cloudflare Logpush's field names, in `dns.jsonl`, `network.jsonl`, `http.jsonl` and
//! `egress.jsonl` under `logs.dir`, rotated by size as `NAME.1.jsonl` (the newest) to
//! `NAME.<keep>.jsonl`.
//!
//! Inputs: [`Activity`](waygate_model::activity::Activity) records the runtime drains from the
//! sans-IO cores and hands to a [`LogSender`] (never blocking: a full queue drops the record and
//! counts it). Outputs: the files, written by one thread of its own ([`spawn`]); a full disk or
//! another write error drops lines and counts them too ([`LogStats`], exported as metrics), and
//! the data plane never waits for a disk. [`read`] reads the files back for `waygate logs`.
//! Nothing polls this crate: the writer thread runs until every sender is gone.
#![deny(missing_docs)]

pub mod read;
pub mod record;
pub mod write;

pub use record::{datetime, LogKind};
pub use write::{spawn, LogSender, LogSettings, LogStats, LogWriter};
