//! What the Waygate gateway and client share: the policy language and rule model, domain types.
#![deny(missing_docs)]

pub mod categories;
pub mod policy;
