//! `waygate-client`: the device side of Waygate. For now it only reports its version.
use clap::Parser;

/// Command line of `waygate-client`.
#[derive(Parser)]
#[command(name = "waygate-client", version, about = "Waygate device client")]
struct Cli {}

fn main() {
    let _ = Cli::parse();
    println!("waygate-client {}", env!("CARGO_PKG_VERSION"));
}
