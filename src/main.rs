//! The `keygate` command: parse the command line, load the config, run or check it.

#![forbid(unsafe_code)]

use clap::Parser;
use keygate::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

/// A Gemini API gateway that rotates keys and replays quota-refused requests on another key.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Path of the YAML configuration file.
    #[arg(long, default_value = "conf/keygate.yaml")]
    config: PathBuf,
    /// Validate the configuration, print a one-line summary, and exit.
    #[arg(long)]
    check: bool,
    /// Take over the listening sockets of a running keygate (Pingora's graceful upgrade): start
    /// the new binary with `-u`, then send SIGQUIT to the old one.
    #[arg(short = 'u', long)]
    upgrade: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    keygate::logging::init();

    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keygate: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}", config.summary());
        return ExitCode::SUCCESS;
    }
    let launch = keygate::Launch {
        config_path: args.config.clone(),
        upgrade: args.upgrade,
    };
    let ran = keygate::run(config, launch);
    // Access lines still waiting for their batch.
    log::logger().flush();
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate: {e}");
            ExitCode::from(1)
        }
    }
}
