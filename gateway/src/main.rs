//! `waygate`: wires the command line to the libraries. Logic lives in the libraries under
//! `gateway/` and `shared/`; this crate parses arguments and prints results.

mod cli;
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", cli::error_report(&err));
            std::process::ExitCode::FAILURE
        }
    }
}
