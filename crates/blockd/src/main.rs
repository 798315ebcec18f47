//! The `blockd` command: parses the command line and runs the server.

fn main() {
    std::process::exit(blockd::main_with_args(std::env::args_os()));
}
