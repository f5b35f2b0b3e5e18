//! `waygate`: wires the command line to the library. All logic lives in the library.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = waygate::cli::Cli::parse();
    match waygate::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", waygate::cli::error_report(&err));
            std::process::ExitCode::FAILURE
        }
    }
}
