//! The `snapgate` binary. Parsing and dispatch live in `cli`; this file only
//! turns every failure into the one-line form scripts rely on:
//! `snapgate: error: <message>` on stderr and a non-zero exit status.

mod cli;

use clap::Parser as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = match cli::Cli::try_parse() {
        Ok(args) => args,
        Err(e) => return usage_error(e),
    };
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            // Messages carry their causes inline (see cli.rs): print only the top.
            eprintln!("snapgate: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Help and version go out as clap writes them. A usage mistake becomes one
/// line: clap's first paragraph with its line breaks folded, since it alone
/// names the problem (the rest is the usage synopsis and a hint at --help).
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        _ => {
            let text = e.render().to_string();
            let first = text.split("\n\n").next().unwrap_or_default();
            let first = first.trim().trim_start_matches("error:").trim();
            let line = first.split_whitespace().collect::<Vec<_>>().join(" ");
            eprintln!("snapgate: error: {line} (see `snapgate --help`)");
            ExitCode::from(2)
        }
    }
}
