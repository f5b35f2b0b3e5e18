//! Waygate's secret material: WireGuard keys and key files.
#![deny(missing_docs)]
