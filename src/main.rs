//! The `modelcache` binary: parse, run, print the error on one line, exit with its code.

use std::process::ExitCode;

use clap::Parser;
use modelcache::cli::{Cli, LogFormat, run};
use modelcache::config::Environment;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter =
        EnvFilter::try_from_env("MODELCACHE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal: a pipe, a file or a container's log gets plain
    // lines (and NO_COLOR, https://no-color.org, turns it off everywhere).
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
    let env = Environment::capture();
    match run(cli, &env) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", e.one_line());
            ExitCode::from(e.exit_code)
        }
    }
}
