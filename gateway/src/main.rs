//! `accord-gateway`: runs a gateway from a TOML file, or checks one.
use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: accord_gateway::Allocator = accord_gateway::ALLOCATOR;

#[derive(Parser)]
#[command(
    name = "accord-gateway",
    version,
    about = "Accord gateway: mTLS store-and-forward relay of sealed envelopes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway described by CONFIG until SIGINT or SIGTERM.
    Run { config: PathBuf },
    /// Check CONFIG and exit 0 if it is valid, 64 if not.
    CheckConfig { config: PathBuf },
}

fn main() -> std::process::ExitCode {
    accord_gateway::tls::install_default_provider();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        // Colours only on a terminal: journald and log files get plain lines to grep.
        .with_ansi(std::io::stdout().is_terminal())
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => match accord_gateway::config::Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::ExitCode::from(64)
            }
        },
        Command::Run { config } => match run(config) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

#[tokio::main]
async fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = accord_gateway::config::Config::load(&path)?;
    accord_gateway::server::run_until_signal(&config)
        .await
        .with_context(|| format!("running the gateway of {}", path.display()))
}
