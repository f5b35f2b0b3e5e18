//! Harness for Waygate's end-to-end tests: the lab's namespaces, processes and their cleanup.
#![deny(missing_docs)]
