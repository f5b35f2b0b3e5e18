//! Views over a flow's bytes that both sides of a tunnel use: which protocol a client speaks and
//! the name it asks for, from its first bytes (TLS ClientHello SNI, HTTP Host).
//!
//! Inputs: the first bytes a client sent on a TCP flow. Outputs: a [`sniff::Sniff`] verdict. The
//! flow table calls it while it holds a flow's first bytes; nothing here does I/O or keeps time.
#![deny(missing_docs)]

pub mod sniff;
