//! The policy stages that decide over a flow: the loaded rule sets ([`policy`]), the egress
//! stage ([`egress`]) that picks the source address a flow leaves from, and the [`pipeline`]
//! that runs the stages in Cloudflare's order over what is known about a flow so far.
//!
//! Inputs: compiled rule sets (loaded away from the serving loop and swapped in whole) and a
//! flow's context. Outputs: decisions the engine carries out. Polled by the engine for each new
//! flow and by the resolver for each query; nothing here does I/O or keeps time.
#![deny(missing_docs)]

pub mod egress;
pub mod pipeline;
pub mod policy;
