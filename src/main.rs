//! The `vcid` binary: parses the command line and hands over to `vcid::cli`.

use std::process::ExitCode;

fn main() -> ExitCode {
    vcid::cli::main()
}
